"""A real Flower deployment on 127.0.0.1: TLS, SuperNode authentication, per-site data, faults.

One deployment serves the whole module, started with the project's own scripts the way the
README says: ``scripts/deploy/start-local-deployment.sh 3`` (a SuperLink with TLS and node
authentication, three registered SuperNodes, each on its own data file) plus a fourth
SuperNode whose key was never registered. The default test run checks the deployment
itself (TLS refuses plaintext and unknown certificates; the unregistered SuperNode is
refused and never listed). The runs, minutes each because every ClientApp is a process
that imports torch and loads the model, are in the ``long`` set CI runs after the default
one, in this order:

1. a 2-round run over TLS, compared with a simulation run of the same job (same files,
   same metrics and summary keys), which also shows the unregistered SuperNode refused;
   SuperNode 0's node-config names a task file (``task-file``), whose accuracy and chance
   every round's metrics carry;
2. a run (evaluated every second round) whose ServerApp is SIGKILLed after round 1 and
   resumed with ``output.resume``: its final adapter equals the uninterrupted run's; a
   resume from a truncated checkpoint fails naming the file and leaves the run directory
   as it was (that a resumed DP run keeps one epsilon is checked through ``flwr run`` in
   simulation, tests/test_e2e_dp.py, where it costs a fraction of a deployment run);
3. a one-round run during which one SuperNode is SIGKILLed: it finishes with the other
   two, and metrics.jsonl and ``flower-llm report`` name the lost node.

Every ClientApp is a fresh process in a deployment (it imports torch and loads the model
per message), so the runs are kept to 2 rounds of 2 local steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flower_llm.tasks import TASK_FILE_NODE_KEY, bundled_task_file
from tests.flwr_procs import (
    BIN,
    ROOT,
    add_connection,
    descendants,
    descendants_running,
    flwr_env,
    flwr_run,
    free_ports,
    local_superlink_pids,
    project_copy,
    read_pid_file,
    stop_pids,
)

DEPLOY = ROOT / "scripts" / "deploy"
PROFILE = "e2e-deployment"
NUM_SITES = 3
# The lean job every run of this module shares (a resume must match it exactly).
JOB = "train.local-steps=2 fed.num-rounds=2 output.local-only-baseline=false"
SITE_0_TASK = "medical"
"""The bundled task file SuperNode 0's node-config names (``task-file``)."""


@dataclass
class Deployment:
    """A running local deployment and where its pieces are."""

    home: Path
    deploy_dir: Path
    env: dict[str, str]
    out: Path

    @property
    def pids(self) -> dict[str, int]:
        return read_pid_file(self.deploy_dir / "pids")

    def log(self, name: str) -> str:
        return (self.deploy_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def node_id(self, site: int) -> int:
        """The node id SuperNode ``site`` got from the SuperLink (from its log)."""
        for line in self.log(f"supernode-{site}").splitlines():
            if "SuperNode ID:" in line:
                return int(line.rsplit(":", 1)[1])
        raise AssertionError(f"supernode-{site} logged no node id")

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=project_copy(),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run(self, name: str, extra: str = "", stream: bool = True) -> subprocess.CompletedProcess:
        """``flwr run`` of JOB as run ``name``; ``extra`` settings add to or override JOB's."""
        settings = dict(
            pair.split("=", 1)
            for pair in f'{JOB} output.dir="{self.out}" output.run-name="{name}" {extra}'.split()
        )
        run_config = " ".join(f"{key}={value}" for key, value in settings.items())
        args = ["run", ".", PROFILE, "--run-config", run_config]
        return self.flwr(*args, *(["--stream"] if stream else []))


def script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def final_adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def heldout_examples(deployment: Deployment) -> list[int]:
    """Each registered site's held-out examples: its own file's eval split (fraction 0.2)."""
    data = deployment.deploy_dir / "data"
    return [
        round(len((data / f"site-{i}.jsonl").read_text().splitlines()) * 0.2)
        for i in range(NUM_SITES)
    ]


def failure(proc: subprocess.CompletedProcess[str], deployment: Deployment) -> str:
    return (
        proc.stdout[-3000:]
        + proc.stderr[-3000:]
        + "\n--- superlink.log\n"
        + deployment.log("superlink")[-3000:]
    )


# --------------------------------------------------------------------------------------
# Fixtures: the deployment, and the runs several tests look at
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """start-local-deployment.sh 3, plus a SuperNode with an unregistered key."""
    home = tmp_path_factory.mktemp("flwr-home")
    deploy_dir = tmp_path_factory.mktemp("deploy")
    port, *node_ports = free_ports(1 + NUM_SITES + 1)
    env = flwr_env(home, Path(os.environ["FLOWER_LLM_CACHE"]))
    env.update(
        DEPLOY_DIR=str(deploy_dir),
        SUPERLINK_PORT=str(port),
        SUPERNODE_BASE_PORT=str(node_ports[0]),
        PROFILE=PROFILE,
        # Site 0 names its own task file in its node-config (the others name none).
        NODE_CONFIG_0=f'{TASK_FILE_NODE_KEY}="{bundled_task_file(SITE_0_TASK)}"',
    )
    add_connection(home, PROFILE, f"127.0.0.1:{port}", deploy_dir / "certs" / "ca.crt")
    # One key more than there are registered sites: site 3's key is never registered.
    certs = script("make-certs.sh", str(NUM_SITES + 1), env=env)
    assert certs.returncode == 0, certs.stderr
    try:
        started = script("start-local-deployment.sh", str(NUM_SITES), env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        data = deploy_dir / "data"
        (data / f"site-{NUM_SITES}.jsonl").write_text((data / "site-0.jsonl").read_text())
        intruder = script("start-supernode.sh", str(NUM_SITES), env=env)
        # The script waits for the SuperNode to join, sees it refused, and says why
        assert intruder.returncode == 1, intruder.stdout + intruder.stderr
        assert f"keys/supernode-{NUM_SITES}.pub is not registered" in intruder.stderr
        yield Deployment(home, deploy_dir, env, tmp_path_factory.mktemp("outputs"))
    finally:
        stopped = script("stop-local-deployment.sh", env=env)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def deployment_run(deployment: Deployment) -> Path:
    """The uninterrupted reference run: 3 sites, 2 rounds, over TLS."""
    proc = deployment.run("tls")
    run_dir = deployment.out / "tls"
    assert proc.returncode == 0, failure(proc, deployment)
    assert (run_dir / "summary.json").exists(), failure(proc, deployment)
    return run_dir


@pytest.fixture(scope="module")
def simulation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job in Flower's simulation engine (3 virtual sites)."""
    home = tmp_path_factory.mktemp("flwr-home-sim")
    out = tmp_path_factory.mktemp("outputs-sim")
    try:
        proc = flwr_run(
            home,
            run_config=f'{JOB} output.dir="{out}" output.run-name="sim"',
            num_supernodes=NUM_SITES,
            timeout=600,
            cache=Path(os.environ["FLOWER_LLM_CACHE"]),
        )
    finally:
        stop_pids(local_superlink_pids(home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "sim"


# --------------------------------------------------------------------------------------
# 1. TLS + node authentication + per-site data
# --------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.long  # minutes each: in CI's long set, for the default run's 15 minutes
def test_deployment_writes_what_a_simulation_writes(
    deployment_run: Path, simulation_run: Path
) -> None:
    # Same files: config, metrics, per-round and final adapters, checkpoint, summary
    assert files(deployment_run) == files(simulation_run)
    assert "checkpoint.safetensors" in files(deployment_run)
    # Same keys in every metrics row, the summary and the recorded config
    deployed, simulated = rows(deployment_run), rows(simulation_run)
    assert [r["round"] for r in deployed] == [r["round"] for r in simulated] == [1, 2]

    # ...except task accuracy: a simulated site on the embedded data answers its domain's
    # bundled task, a deployed site only the task file its node-config names (site 0's)
    def untasked(row: dict[str, object]) -> list[str]:
        return sorted(k for k in row if not k.startswith("eval/task-"))

    assert [untasked(r) for r in deployed] == [untasked(r) for r in simulated]
    assert any(k.startswith("eval/task-") for r in simulated for k in r)
    for row in deployed:  # site 0's node-config task file, answered every round
        tasked = [k for k in row if k.startswith("eval/task-")]
        assert tasked and all(k.endswith(f"/{SITE_0_TASK}") for k in tasked), row
        assert 0 <= row[f"eval/task-accuracy/{SITE_0_TASK}"] <= 1
        assert 0 < row[f"eval/task-chance/{SITE_0_TASK}"] < 1
    for name in ("summary.json", "config.json"):
        d = json.loads((deployment_run / name).read_text())
        s = json.loads((simulation_run / name).read_text())
        assert sorted(d) == sorted(s), name
    # ...and it learned: the held-out loss fell
    losses = json.loads((deployment_run / "summary.json").read_text())["eval-loss-by-round"]
    assert losses[1] < losses[0]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.long  # minutes each: in CI's long set, for the default run's 15 minutes
def test_each_registered_site_trained_on_its_own_file(
    deployment: Deployment, deployment_run: Path
) -> None:
    for row in rows(deployment_run):
        assert row["clients-sampled"] == row["clients-replied"] == NUM_SITES, row
        assert row["dropped"] == {}
    # Held-out examples are the sum of every site's own file's split
    assert rows(deployment_run)[0]["eval/num-examples"] == sum(heldout_examples(deployment))


@pytest.mark.e2e
@pytest.mark.slow
def test_supernode_with_unregistered_key_is_refused(deployment: Deployment) -> None:
    # It gave up (Flower's exit code 305) instead of retrying forever
    assert not running(deployment.pids[f"supernode-{NUM_SITES}"])
    assert "Failed to activate SuperNode" in deployment.log(f"supernode-{NUM_SITES}")
    assert "No SuperNode found with the given public key" in deployment.log("superlink")
    listed = deployment.flwr("supernode", "ls", PROFILE, "--format", "json", timeout=60)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    assert sorted(int(n["node-id"]) for n in nodes) == sorted(
        deployment.node_id(i) for i in range(NUM_SITES)
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_superlink_refuses_plaintext_and_unknown_certificates(deployment: Deployment) -> None:
    port = deployment.env["SUPERLINK_PORT"]
    plain = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/health"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert plain.returncode != 0 or "HTTP" not in plain.stdout  # no plaintext API
    untrusted = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"https://127.0.0.1:{port}/health"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert untrusted.returncode == 60, untrusted.stderr  # curl: certificate not trusted
    trusted = subprocess.run(
        [
            "curl",
            "-sSf",
            "--max-time",
            "10",
            "--cacert",
            str(deployment.deploy_dir / "certs" / "ca.crt"),
            f"https://localhost:{port}/health",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert trusted.returncode == 0, trusted.stderr  # the SAN covers localhost too


# --------------------------------------------------------------------------------------
# 2. Kill the ServerApp after round 1, resume, and end where an uninterrupted run ends
# --------------------------------------------------------------------------------------


def interrupt_after_round_1(deployment: Deployment, name: str, extra: str = "") -> Path:
    """Start run ``name``, SIGKILL its ServerApp once round 1 is checkpointed; its run dir."""
    run_dir = deployment.out / name
    started = deployment.run(name, extra, stream=False)
    assert started.returncode == 0, failure(started, deployment)
    checkpoint = run_dir / "checkpoint.safetensors"
    wait_for(checkpoint.exists, 400, "round 1's checkpoint")
    superlink = deployment.pids["superlink"]
    server_apps = descendants_running(superlink, "flwr-serverapp")
    assert len(server_apps) == 1, server_apps
    os.kill(server_apps[0], signal.SIGKILL)
    wait_for(lambda: not descendants_running(superlink, "flwr-serverapp"), 30, "the kill")
    # As an operator would: mark the dead run stopped, so that the SuperNodes do not spend
    # CPU on round-2 instructions it may have sent just before it died.
    run_id = re.search(r"Successfully started run (\d+)", started.stdout)
    assert run_id, started.stdout
    deployment.flwr("stop", run_id.group(1), PROFILE, timeout=60)
    assert not (run_dir / "summary.json").exists()  # it really was interrupted
    assert [r["round"] for r in rows(run_dir)] == [1]
    return run_dir


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.long  # minutes each: in CI's long set, for the default run's 15 minutes
def test_resumed_run_ends_with_the_uninterrupted_adapter(
    deployment: Deployment, deployment_run: Path
) -> None:
    # Prepare: start the run (evaluating every second round only), wait for round 1's
    # checkpoint, SIGKILL the ServerApp
    run_dir = interrupt_after_round_1(deployment, "resumed", "fed.evaluate-every=2")
    assert "eval-loss" not in rows(run_dir)[0]  # round 1 was not evaluated

    # Execute: resume, evaluating every round again (a setting a resume may change)
    resumed = deployment.run("resumed", "output.resume=true")

    # Assert
    assert resumed.returncode == 0, failure(resumed, deployment)
    assert "Resuming" in resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed-after-round"] == 1
    assert [r["round"] for r in rows(run_dir)] == [1, 2]
    expected, got = final_adapter(deployment_run), final_adapter(run_dir)
    assert list(got) == list(expected)
    for key in expected:
        # Replies arrive in any order and float sums are not associative: ulps, no more.
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert not np.allclose(expected[next(k for k in expected if "lora_B" in k)], 0)
    assert rows(run_dir)[1]["eval-loss"] == pytest.approx(
        rows(deployment_run)[1]["eval-loss"], rel=1e-5
    )


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.long  # minutes each: in CI's long set, for the default run's 15 minutes
def test_resume_from_a_corrupt_checkpoint_fails_naming_it_and_changes_nothing(
    deployment: Deployment, deployment_run: Path
) -> None:
    # Prepare: a copy of the finished run whose checkpoint lost its second half
    run_dir = deployment.out / "corrupt"
    shutil.copytree(deployment_run, run_dir)
    checkpoint = run_dir / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = {name: (run_dir / name).read_bytes() for name in sorted(files(run_dir))}

    # Execute
    proc = deployment.run("corrupt", "output.resume=true")

    # Assert: the ServerApp refused, naming the file, in the streamed log and the run status
    output = proc.stdout + proc.stderr
    assert f"checkpoint {checkpoint} is corrupt or incomplete" in output, output[-3000:]
    run_id = re.search(r"Successfully started run (\d+)", output)
    assert run_id, output[-3000:]
    listed = deployment.flwr("ls", PROFILE, "--run-id", run_id.group(1), "--format", "json")
    (run,) = json.loads(listed.stdout)["runs"]
    assert run["status"] == "finished:failed"
    assert str(checkpoint) in run["status-details"]
    # ...and it did not start over: the run directory is exactly as it was
    assert {name: (run_dir / name).read_bytes() for name in sorted(files(run_dir))} == before


# --------------------------------------------------------------------------------------
# 3. A SuperNode dies mid-run (last: it takes one site down for good)
# --------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.long  # minutes each: in CI's long set, for the default run's 15 minutes
def test_run_survives_a_killed_supernode_and_reports_it(deployment: Deployment) -> None:
    # Prepare: SIGKILL site 2's SuperNode (and its ClientApp) as soon as it starts training
    victim = deployment.pids[f"supernode-{NUM_SITES - 1}"]
    victim_id = deployment.node_id(NUM_SITES - 1)
    run_dir = deployment.out / "faults"
    # One round is enough to lose a site in; the heartbeat timeout it waits for dominates.
    started = deployment.run("faults", "fed.round-timeout=120 fed.num-rounds=1", stream=False)
    assert started.returncode == 0, failure(started, deployment)
    # Round 0 evaluates the untrained adapter first: wait until that is over, so the
    # ClientApp killed is the one that trains round 1.
    wait_for(lambda: (run_dir / "eval-round-0.json").exists(), 400, "round 0's evaluation")
    time.sleep(2.0)  # the evaluating ClientApps have replied and are exiting
    wait_for(lambda: descendants_running(victim, "flwr-clientapp"), 400, "site 2's ClientApp")
    for pid in [victim, *descendants(victim)]:
        os.kill(pid, signal.SIGKILL)

    # Execute: wait for the run to finish with the two sites left
    wait_for(lambda: (run_dir / "summary.json").exists(), 500, "the run to finish", 1.0)

    # Assert
    (first,) = rows(run_dir)
    assert first["clients-sampled"] == NUM_SITES
    assert first["clients-replied"] == NUM_SITES - 1
    assert first["updated"] is True  # fed.min-train-clients = 2 replied
    assert list(first["dropped"]) == [str(victim_id)], first["dropped"]
    reason = first["dropped"][str(victim_id)]
    assert "Node Unavailable" in reason or "round timeout" in reason
    # The two sites left evaluated the new adapter, on their own held-out splits
    assert first["eval/num-examples"] == sum(heldout_examples(deployment)[: NUM_SITES - 1])
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    # ...and the run report a user reads names the lost site and why
    report = subprocess.run(
        [str(BIN / "flower-llm"), "report", str(run_dir)],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert "Dropped replies:" in report.stdout
    assert f"round 1, node {victim_id}: " in report.stdout
    assert "Dropped replies:" in (run_dir / "report.md").read_text()


# --------------------------------------------------------------------------------------
# Fast checks of the pieces (no Flower processes)
# --------------------------------------------------------------------------------------


def test_site_files_are_disjoint_cover_everything_and_lean_to_one_domain(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_site_data", DEPLOY / "make_site_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from flower_llm.embedded import DOMAINS, generate_instruction_dataset

    paths = module.write_site_files(tmp_path, 4, heavy=0.8, seed=0)
    sites = [[json.loads(line) for line in p.read_text().splitlines()] for p in paths]
    every = sorted(json.dumps(r, sort_keys=True) for s in sites for r in s)
    assert every == sorted(json.dumps(r, sort_keys=True) for r in generate_instruction_dataset())
    for i, records in enumerate(sites):
        home = sum(r["domain"] == DOMAINS[i % 3] for r in records)
        assert home / len(records) > 0.6, (i, home, len(records))
    assert module.write_site_files(tmp_path / "again", 4)[0].read_text() == paths[0].read_text()


def test_a_supernode_whose_port_is_taken_exits_naming_the_port(tmp_path: Path) -> None:
    import socket

    # Prepare: site 0's certificates, key and data (no SuperLink), and a listener on its port
    deploy_dir = tmp_path / "deploy"
    superlink_port, node_port = free_ports(2)
    env = flwr_env(tmp_path / "home")
    env.update(
        DEPLOY_DIR=str(deploy_dir),
        SUPERLINK_PORT=str(superlink_port),
        SUPERNODE_BASE_PORT=str(node_port),
    )
    certs = script("make-certs.sh", "1", env=env)
    assert certs.returncode == 0, certs.stderr
    (deploy_dir / "data").mkdir()
    (deploy_dir / "data" / "site-0.jsonl").write_text('{"instruction": "x", "response": "y"}\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node_port))
        taken.listen()

        # Execute
        started = script("start-supernode.sh", "0", env=env)

    # Assert: a clear reason, not "see the log", and nothing left running
    assert started.returncode == 1, started.stdout + started.stderr
    assert f"its port 127.0.0.1:{node_port} is in use" in started.stderr
    pid = int((deploy_dir / "pids").read_text().split()[1])
    assert not running(pid)


def test_flwr_env_anchors_the_deployment_ca_at_the_checkout(tmp_path: Path) -> None:
    # Prepare: source it from another directory, as a user in any cwd would
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "FLWR_HOME": str(home), "HOME": str(tmp_path)}

    # Execute
    subprocess.run(
        ["bash", "-c", f". {ROOT}/scripts/flwr-env.sh"],
        cwd=tmp_path,
        env=env,
        check=True,
    )

    # Assert
    config = tomllib.loads((home / "config.toml").read_text())["superlink"]
    source = tomllib.loads((ROOT / "pyproject-flwr.toml").read_text())["superlink"]
    assert config["local"] == source["local"]
    assert config["deployment"]["address"] == source["deployment"]["address"]
    ca = Path(config["deployment"]["root-certificates"])
    assert ca.is_absolute() and ca == ROOT / source["deployment"]["root-certificates"]


def test_an_error_reply_from_the_superlink_is_charged_to_the_lost_node() -> None:
    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from flower_llm import wire
    from strategies.fedavg import WeightedFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [11, 22]

    # Prepare: instructions as the Grid leaves them (with ids), one good reply, and the
    # SuperLink's own error for node 22 (src = the SuperLink's id, 1)
    strategy = WeightedFedAvg(min_train_clients=1)
    state = {"w": np.zeros((2, 2), np.float32)}
    messages = list(
        strategy.configure_train(1, wire.to_array_record(state), ConfigRecord(), Grid())  # type: ignore[arg-type]
    )
    for m in messages:
        m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"
    by_node = {m.metadata.dst_node_id: m for m in messages}
    good = Message(
        RecordDict(
            {
                wire.ARRAYS: wire.to_array_record({"w": np.ones((2, 2), np.float32)}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4}),
            }
        ),
        reply_to=by_node[11],
    )
    good.metadata.__dict__["_src_node_id"] = 11
    lost = Message(Error(code=1, reason="Node Unavailable"), reply_to=by_node[22])
    lost.metadata.__dict__["_src_node_id"] = 1

    # Execute
    strategy.aggregate_train(1, [good, lost])

    # Assert
    assert strategy.report.accepted == [11]
    assert list(strategy.report.dropped) == [22]
    assert "Node Unavailable" in strategy.report.dropped[22]
