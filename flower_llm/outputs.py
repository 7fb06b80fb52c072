"""The run directory the server writes: adapters, metrics.jsonl, summary.json.

Layout::

    <output.dir>/<run-name>/
        config.json              the parsed run-config
        metrics.jsonl            one JSON object per finished round
        round-001/               global adapter after round 1 (PEFT format)
        ...
        final/                   global adapter after the last round (only if a round
                                 updated the model)
        eval-round-0.json        held-out metrics of the adapter before any training
        summary.json             written when the run ends; "status" is "ok" or "failed"
        run-id                   the Flower run this directory belongs to
        .lock                    held (flock) by the one ServerApp writing the directory

One run directory has one writer: a ServerApp locks it before it writes anything, and a
second one started on the same ``output.run-name`` while the first runs is refused
(:class:`RunDirectoryBusy`). The lock is an OS file lock, so a crashed server leaves none.

A run directory also belongs to one Flower run: the ServerApp records its run id in
``run-id`` and every write checks it first, so a run that should have stopped (an
interrupted run still training in a leftover process) never writes into the next run's
directory.

``python -m flower_llm.report finished RUN_DIR RUN_ID`` is what ``run-default.sh`` calls
when the log stream ends: it reports the run's outcome and exits non-zero if it failed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flower_llm.config import RunConfig

if TYPE_CHECKING:  # peft is slow to import; `flower-llm report` does not need it
    from peft import LoraConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
FINAL_ADAPTER = "final"
INITIAL_EVAL_FILE = "eval-round-0.json"
LOCK_FILE = ".lock"
RUN_ID_FILE = "run-id"
STATUS_OK = "ok"
STATUS_FAILED = "failed"


class RunDirectoryBusy(RuntimeError):
    """Another process is writing the run directory."""


class RunFailed(RuntimeError):
    """The run updated the model in no round, or could not start: Flower marks it failed."""


class RunDirectoryTaken(RuntimeError):
    """Another run owns the run directory now: this run must not write into it."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a uniquely named temporary file and a rename.

    Readers never see half a file, and two writers never share a temporary file.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=_default))


def lock_directory(path: Path) -> int:
    """Take the exclusive lock of ``path/.lock``; return its descriptor (keep it open).

    The file's content (the holder's pid) is written when the run claims the directory
    (:meth:`RunDirectory.check_owner`), so a run refused before that changes nothing.

    Raises
    ------
    RunDirectoryBusy
        Another process holds it; the message names the directory and that process.
    """
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirectoryBusy(
            f"run directory {path} is being written by another ServerApp (pid {holder}); "
            "wait for it to finish or choose another output.run-name"
        ) from None
    return fd


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunDirectory:
    """Where one run's outputs go."""

    def __init__(
        self,
        root: str | Path,
        run_name: str = "",
        *,
        resume: bool = False,
        run_id: int | None = None,
        lock: bool = False,
    ) -> None:
        self.run_id = run_id
        name = run_name or time.strftime("run-%Y%m%d-%H%M%S")
        self.path = Path(root) / name
        self._lock_fd: int | None = None
        if lock and self.path.is_dir():
            # Before anything moves: a running run's directory is never renamed away.
            self._lock_fd = lock_directory(self.path)
        if (
            not resume
            and self.path.exists()
            and any(p.name != LOCK_FILE for p in self.path.iterdir())
        ):
            # A fresh run never writes into, or deletes, an earlier run's results.
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.path.stat().st_mtime))
            kept = self.path.with_name(f"{name}.previous-{stamp}")
            self.path.rename(kept)
            self.unlock()  # the lock moved with the earlier run
            log.warning("Kept the earlier run in %s", kept)
        if not resume:
            # A resumed run writes only into the directory of the run it continues; if
            # that is missing, resuming fails on the missing checkpoint and leaves no
            # empty directory behind.
            self.path.mkdir(parents=True, exist_ok=True)
        if lock and self._lock_fd is None and self.path.is_dir():
            self._lock_fd = lock_directory(self.path)
        self._claimed = False
        """Whether this run has written its id (done by the first write, after the checks
        a resume makes: a refused resume leaves the directory byte for byte as it was)."""

    def unlock(self) -> None:
        """Release the directory lock (process exit releases it too)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def check_owner(self) -> None:
        """Claim the directory on the first write; later, raise :class:`RunDirectoryTaken`
        if another run has claimed it since."""
        if not self._claimed:
            self._claimed = True
            if self._lock_fd is not None:
                os.ftruncate(self._lock_fd, 0)
                os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
            if self.run_id is not None:
                # From here on, an older run still writing here stops.
                write_text_atomic(self.path / RUN_ID_FILE, f"{self.run_id}\n")
            return
        if self.run_id is None:
            return
        file = self.path / RUN_ID_FILE
        owner = file.read_text().strip() if file.is_file() else None
        if owner != str(self.run_id):
            raise RunDirectoryTaken(
                f"{self.path} now belongs to run {owner or '(none: moved away)'}; run "
                f"{self.run_id} stops writing there"
            )

    def save_config(self, cfg: RunConfig) -> None:
        """Record the settings the run used."""
        self.check_owner()
        write_json_atomic(self.path / CONFIG_FILE, dataclasses.asdict(cfg))

    def save_adapter(self, state: Mapping[str, np.ndarray], config: LoraConfig, name: str) -> Path:
        """Save a PEFT-format adapter under ``name`` (``round-003``, ``final``)."""
        from flower_llm.adapters import save_adapter

        self.check_owner()
        return save_adapter(state, config, self.path / name)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed to disk."""
        self.check_owner()
        with (self.path / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True, default=_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rounds recorded so far."""
        file = self.path / METRICS_FILE
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def save_initial_eval(self, metrics: Mapping[str, Any] | None) -> None:
        """Record the held-out metrics of the untrained adapter (round 0)."""
        self.check_owner()
        write_json_atomic(self.path / INITIAL_EVAL_FILE, dict(metrics or {}))

    def read_initial_eval(self) -> dict[str, Any]:
        """What :meth:`save_initial_eval` wrote (empty if nothing was)."""
        file = self.path / INITIAL_EVAL_FILE
        return dict(json.loads(file.read_text())) if file.is_file() else {}

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json``."""
        self.check_owner()
        write_json_atomic(self.path / SUMMARY_FILE, dict(summary))


def round_name(server_round: int) -> str:
    """Directory name of the adapter saved after ``server_round``."""
    return f"round-{server_round:03d}"


# --------------------------------------------------------------------------------------
# Outcome of a run: did any round update the model?
# --------------------------------------------------------------------------------------


def run_outcome(history: Sequence[Mapping[str, Any]], planned_rounds: int) -> dict[str, Any]:
    """``status``, ``reason`` and per-round failures of a run, for summary.json.

    A run whose rounds never updated the global adapter learned nothing: it is
    ``"failed"``, with the reason, whatever Flower says about the run. Rounds that did not
    update the model are listed with every node's drop reason.
    """
    failed_rounds = {
        str(row["round"]): {
            "clients-sampled": row.get("clients-sampled", 0),
            "clients-replied": row.get("clients-replied", 0),
            "dropped": row.get("dropped", {}),
        }
        for row in history
        if not row.get("updated", False)
    }
    updated = len(history) - len(failed_rounds)
    outcome: dict[str, Any] = {
        "status": STATUS_OK if updated else STATUS_FAILED,
        "rounds-updated": updated,
        "rounds-failed": len(failed_rounds),
        "failed-rounds": failed_rounds,
    }
    if not history:
        outcome["reason"] = f"no round of {planned_rounds} finished"
    elif not updated:
        reasons = sorted({r for f in failed_rounds.values() for r in f["dropped"].values()})
        outcome["reason"] = (
            f"no round updated the model ({len(history)} of {planned_rounds} ran); "
            + ("replies dropped: " + "; ".join(reasons) if reasons else "no valid replies")
        )
    elif failed_rounds:
        outcome["reason"] = (
            f"{len(failed_rounds)} of {len(history)} rounds did not update the model "
            f"(rounds {', '.join(failed_rounds)})"
        )
    return outcome


def site_name(content: Any, node_id: int) -> str:
    """The label a reply's ``site`` record gives its sender, else ``node <id>``."""
    from flower_llm import wire

    record = content.config_records.get(wire.SITE)
    label = record.get("label") if record is not None else None
    return str(label) if label else f"node {node_id}"


def unique_site_names(names: Mapping[int, str]) -> dict[int, str]:
    """``names`` (node id -> label) with every label given by more than one node suffixed
    ``(node <id>)``, so that no two sites share a row of a table keyed by label."""
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {
        node: name if counts[name] == 1 else f"{name} (node {node})" for node, name in names.items()
    }


SETUP_ERRORS = ("DataError", "ConfigError", "FileNotFoundError")
"""Exceptions of a site's setup that the next round would raise again."""


def setup_failure(dropped: Mapping[Any, str]) -> str | None:
    """The reason to stop now if every dropped reply is a setup error that will repeat."""
    if dropped and all(any(e in r for e in SETUP_ERRORS) for r in dropped.values()):
        return "every site failed to set up: " + "; ".join(sorted(set(dropped.values())))
    return None


def conclude(summary: dict[str, Any], history: Sequence[Mapping[str, Any]], planned: int) -> bool:
    """Add the run's outcome to ``summary``; True if it updated the model at all.

    A failed run has no ``final/`` adapter (``final-adapter`` is null): nothing that
    looks like a result.
    """
    summary.update(run_outcome(history, planned))
    if summary["status"] != STATUS_OK:
        summary["final-adapter"] = None
    return bool(summary["status"] == STATUS_OK)


def end_run(run_dir: RunDirectory, summary: Mapping[str, Any]) -> None:
    """The run's last log line; raises :class:`RunFailed` (Flower: finished:failed) if failed."""
    if summary.get("status") == STATUS_OK:
        if summary.get("rounds-failed"):
            log.warning("Run finished with %s: %s", summary["reason"], run_dir.path)
        else:
            log.info("Run finished: %s", run_dir.path)
        return
    log.error("Run FAILED: %s. See %s", summary.get("reason"), run_dir.path / SUMMARY_FILE)
    raise RunFailed(str(summary.get("reason")))


def failure_summary(reason: str, **extra: Any) -> dict[str, Any]:
    """summary.json of a run that stopped before or between rounds, with the reason."""
    return {"status": STATUS_FAILED, "reason": reason, **extra}
