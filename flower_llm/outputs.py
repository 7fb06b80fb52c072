"""The run directory the server writes: adapters, metrics.jsonl, summary.json.

Layout::

    <output.dir>/<run-name>/
        config.json              the parsed run-config
        metrics.jsonl            one JSON object per finished round
        round-001/               global adapter after round 1 (PEFT format)
        ...
        final/                   global adapter after the last round
        summary.json             written when the run ends
        .lock                    held (flock) by the one ServerApp writing the directory

One run directory has one writer: a ServerApp locks it before it writes anything, and a
second one started on the same ``output.run-name`` while the first runs is refused
(:class:`RunDirectoryBusy`). The lock is an OS file lock, so a crashed server leaves none.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
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
LOCK_FILE = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another process is writing the run directory."""


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
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunDirectory:
    """Where one run's outputs go."""

    def __init__(
        self, root: str | Path, run_name: str = "", *, resume: bool = False, lock: bool = False
    ) -> None:
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

    def unlock(self) -> None:
        """Release the directory lock (process exit releases it too)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def save_config(self, cfg: RunConfig) -> None:
        """Record the settings the run used."""
        write_json_atomic(self.path / CONFIG_FILE, dataclasses.asdict(cfg))

    def save_adapter(self, state: Mapping[str, np.ndarray], config: LoraConfig, name: str) -> Path:
        """Save a PEFT-format adapter under ``name`` (``round-003``, ``final``)."""
        from flower_llm.adapters import save_adapter

        return save_adapter(state, config, self.path / name)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed to disk."""
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

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json``."""
        write_json_atomic(self.path / SUMMARY_FILE, dict(summary))


def round_name(server_round: int) -> str:
    """Directory name of the adapter saved after ``server_round``."""
    return f"round-{server_round:03d}"
