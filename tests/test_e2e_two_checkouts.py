"""Two checkouts of this project on one machine run the default job at the same time.

Each copy gets its own local SuperLink from ``scripts/flwr-env.sh`` (its own ``FLWR_HOME``
and ports, derived from the checkout's path); a run submitted from one checkout must never
land in the other's SuperLink, and either checkout's cleanup must leave the other's run
alone. Both copies share this checkout's virtualenv, as two clones on one machine would
share an interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.flwr_procs import ROOT, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]

CHECKOUT_PARTS = ("flower_llm", "strategies", "client_apps", "server_apps", "scripts")
CHECKOUT_FILES = ("pyproject.toml", "pyproject-flwr.toml", "README.md", "LICENSE")
# The variables a shell that sourced flwr-env.sh (as the test runner's did) would pass on
FLWR_ENV_VARS = (
    "FLWR_HOME",
    "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT",
    "FLWR_LOCAL_CONTROL_API_PORT",
    "FLOWER_LLM_CHECKOUT",
    "VIRTUAL_ENV",
)


def checkout(dest: Path) -> Path:
    """A copy of this project's tracked parts at ``dest``, using this checkout's venv."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in CHECKOUT_PARTS:
        shutil.copytree(ROOT / part, dest / part, ignore=ignore)
    for name in CHECKOUT_FILES:
        shutil.copy(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def fresh_shell_env(cache: Path, outputs: Path) -> dict[str, str]:
    """A user's shell: nothing of flwr-env.sh's exported, its own cache and outputs."""
    env = {k: v for k, v in os.environ.items() if k not in FLWR_ENV_VARS}
    env.update(FLOWER_LLM_CACHE=str(cache), FLOWER_LLM_OUTPUTS=str(outputs))
    return env


def superlink_pids(flwr_home: Path) -> list[int]:
    """The local SuperLink of ``flwr_home`` and whatever is left of its run."""
    marker = str(flwr_home / "local-superlink" / "superlink.log")
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def test_two_checkouts_run_the_default_job_side_by_side(tmp_path: Path) -> None:
    # Prepare: two checkouts, each with its own outputs and model cache
    roots = [checkout(tmp_path / name) for name in ("site-a", "site-b")]
    outputs = [tmp_path / f"outputs-{i}" for i in range(2)]

    # Execute: both default jobs at once (one round, to keep the test short)
    procs = [
        subprocess.Popen(
            ["bash", str(root / "scripts" / "run-default.sh"), "--run-config", "fed.num-rounds=1"],
            env=fresh_shell_env(tmp_path / f"cache-{i}", outputs[i]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, root in enumerate(roots)
    ]
    try:
        logs = [proc.communicate(timeout=900)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for root in roots:
            stop_pids(superlink_pids(root / ".flwr-home"))

    # Assert: both finished with their own run, each run known only to its own SuperLink,
    # whose ports differ
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    run_ids = []
    for i, log in enumerate(logs):
        run_dir = outputs[i] / "default"
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["round"] for r in rows] == [1]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"
        run_id = (run_dir / "run-id").read_text().strip()
        assert f"run {run_id} started" in log, log[-4000:]
        run_ids.append(run_id)
    assert run_ids[0] != run_ids[1]
    superlink_logs = [
        (root / ".flwr-home" / "local-superlink" / "superlink.log").read_text() for root in roots
    ]
    for own, other, superlink_log in zip(run_ids, reversed(run_ids), superlink_logs, strict=True):
        assert own in superlink_log and other not in superlink_log
    ports = [
        subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "python"),
                str(root / "scripts" / "local-ports.py"),
                str(root),
                str(root / ".flwr-home"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for root in roots
    ]
    assert ports[0] != ports[1]
