"""Fail early, fail loud, stop cleanly: real `flwr run`s and `run-default.sh`, as a user.

Few runs, several checks each: a run whose sites all have unusable data, a simulation
smaller than fed.min-*, and Ctrl-C on run-default.sh followed at once by a second run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.flwr_procs import ROOT, flwr_env, flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAST = "train.local-steps=2 fed.num-rounds=2"


def processes_of(flwr_home: Path) -> list[str]:
    """Live Flower and Ray processes whose environment holds ``FLWR_HOME=flwr_home``."""
    found = []
    marker = f"FLWR_HOME={flwr_home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        training = any(k in cmdline for k in ("ray::", "raylet", "flwr-simulation", "superlink"))
        if marker in environ and training and state != "Z":
            found.append(f"{proc.name} {cmdline[:80]}")
    return found


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two runs on one local SuperLink: every site's data file empty; one node too few."""
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    empty = out / "sites.jsonl"
    empty.write_text("\n")
    runs: dict[str, object] = {"out": out, "empty": empty}
    try:
        started = time.monotonic()
        runs["bad-data"] = flwr_run(
            home,
            run_config=f'{FAST} data.source="{empty}" output.dir="{out}" output.run-name="bad"',
            num_supernodes=2,
            timeout=300,
        )
        runs["bad-data-seconds"] = time.monotonic() - started
        started = time.monotonic()
        runs["one-node"] = flwr_run(
            home,
            run_config=f'{FAST} output.dir="{out}" output.run-name="one"',
            num_supernodes=1,
            timeout=300,
        )
        runs["one-node-seconds"] = time.monotonic() - started
    finally:
        stop_pids(local_superlink_pids(home))
    return runs


def test_unusable_data_fails_the_run_loudly_before_any_model_loads(
    failed_runs: dict[str, object],
) -> None:
    proc = failed_runs["bad-data"]
    assert isinstance(proc, subprocess.CompletedProcess)
    output = proc.stdout + proc.stderr
    run_dir = Path(str(failed_runs["out"])) / "bad"
    summary = json.loads((run_dir / "summary.json").read_text())
    # The file and the problem are named, and no site loaded the base model for it
    assert f"{failed_runs['empty']}': the file is empty" in output
    assert "Loaded base model" not in output
    # The run stopped after its first round, marked failed, with no final adapter
    assert summary["status"] == "failed"
    assert "no round updated the model (1 of 2 ran)" in summary["reason"]
    assert "the file is empty" in summary["reason"]
    assert len(summary["failed-rounds"]["1"]["dropped"]) == 2
    assert summary["final-adapter"] is None and not (run_dir / "final").exists()
    assert "Run FAILED" in output


def test_a_simulation_smaller_than_the_minimum_fails_within_seconds(
    failed_runs: dict[str, object],
) -> None:
    proc = failed_runs["one-node"]
    assert isinstance(proc, subprocess.CompletedProcess)
    output = proc.stdout + proc.stderr
    assert "has 1 node(s) (num-supernodes of this simulation)" in output
    assert "'fed.min-available-clients' = 2" in output
    assert float(str(failed_runs["one-node-seconds"])) < 90
    assert not (Path(str(failed_runs["out"])) / "one" / "metrics.jsonl").exists()


@pytest.mark.long
def test_ctrl_c_stops_everything_and_a_second_run_owns_its_directory(tmp_path: Path) -> None:
    # Prepare: run-default.sh with its own FLWR_HOME, ports and outputs
    home, outputs = tmp_path / "flwr-home", tmp_path / "outputs"
    env = flwr_env(home) | {"FLOWER_LLM_OUTPUTS": str(outputs), "NUM_CLIENTS": "2"}
    script = [str(ROOT / "scripts" / "run-default.sh"), "--run-config"]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        # 50 rounds (2-3 s each here): the run must still be going when round 2 shows
        first = subprocess.Popen(
            ["bash", *script, "fed.num-rounds=50 train.local-steps=40"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # As a terminal's foreground job has it: a test runner started in the
            # background (nohup, `&`) ignores SIGINT, and bash cannot trap a signal it
            # was started ignoring
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 240
            while "[ROUND 2/50]" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(1)
            assert "[ROUND 2/50]" in log.read_text(), log.read_text()[-3000:]

            # Execute: Ctrl-C, as a terminal sends it to the foreground process group
            interrupted = time.monotonic()
            os.killpg(first.pid, signal.SIGINT)
            code = first.wait(timeout=60)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    stopped_after = time.monotonic() - interrupted
    left = processes_of(home)
    while left and time.monotonic() - interrupted < 30:  # the bound: 30 s
        time.sleep(1)
        left = processes_of(home)
    second = subprocess.run(
        ["bash", *script, "fed.num-rounds=1 train.local-steps=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Assert: the first run is gone within seconds; the second owns outputs/default
    assert code == 130, log.read_text()[-2000:]
    assert stopped_after < 30
    assert left == []
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    run_dir = outputs / "default"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"
    assert "status: ok" in second.stdout and "local-only, partition 0/2" in second.stdout
    assert processes_of(home) == []
