"""The run directory the server writes: adapters, metrics.jsonl, summary.json.

Layout::

    <output.dir>/<run-name>/
        config.json              the parsed run-config
        metrics.jsonl            one JSON object per finished round
        round-001/               global adapter after round 1 (PEFT format)
        ...
        final/                   global adapter after the last round
        summary.json             written when the run ends
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
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


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_default))
    os.replace(tmp, path)


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunDirectory:
    """Where one run's outputs go."""

    def __init__(self, root: str | Path, run_name: str = "", *, resume: bool = False) -> None:
        name = run_name or time.strftime("run-%Y%m%d-%H%M%S")
        self.path = Path(root) / name
        if not resume and self.path.exists() and any(self.path.iterdir()):
            # A fresh run never writes into, or deletes, an earlier run's results.
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.path.stat().st_mtime))
            kept = self.path.with_name(f"{name}.previous-{stamp}")
            self.path.rename(kept)
            log.warning("Kept the earlier run in %s", kept)
        if not resume:
            # A resumed run writes only into the directory of the run it continues; if
            # that is missing, resuming fails on the missing checkpoint and leaves no
            # empty directory behind.
            self.path.mkdir(parents=True, exist_ok=True)

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
