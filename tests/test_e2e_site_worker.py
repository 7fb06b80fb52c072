"""A real TLS deployment whose sites train through long-lived site workers.

One deployment serves the module: ``SITE_WORKERS=1 start-local-deployment.sh 3`` (a
SuperLink with TLS and node authentication, three SuperNodes, each with a
``flower-llm site-worker`` whose socket its node-config names). In this order:

1. a 2-round run through the workers: each worker loaded the model once, and its socket
   and directory are owner-only;
2. a 2-round run during which site 1's worker is SIGKILLed mid-job and restarted: site 1
   misses round 1's training, round 2 has every site, the run finishes;
3. the SuperNodes restarted without workers (per-message ClientApp processes, as
   before): the same job's held-out losses equal run 1's.

That another user id cannot connect is checked in tests/test_site_worker.py (it needs
root to switch uid; this module checks the permission bits).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flwr_procs import BIN, add_connection, flwr_env, free_ports
from tests.test_e2e_deployment import (
    NUM_SITES,
    PROFILE,
    Deployment,
    failure,
    rows,
    running,
    script,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """start-local-deployment.sh 3 with SITE_WORKERS=1."""
    home = tmp_path_factory.mktemp("flwr-home")
    deploy_dir = tmp_path_factory.mktemp("deploy")
    port, *node_ports = free_ports(1 + NUM_SITES)
    env = flwr_env(home, Path(os.environ["FLOWER_LLM_CACHE"]))
    env.update(
        DEPLOY_DIR=str(deploy_dir),
        SUPERLINK_PORT=str(port),
        SUPERNODE_BASE_PORT=str(node_ports[0]),
        PROFILE=PROFILE,
        SITE_WORKERS="1",
        WORKER_THREADS="1",  # 3 workers share 2 cores: no oversubscribed OpenMP threads
    )
    add_connection(home, PROFILE, f"127.0.0.1:{port}", deploy_dir / "certs" / "ca.crt")
    try:
        started = script("start-local-deployment.sh", str(NUM_SITES), env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        yield Deployment(home, deploy_dir, env, tmp_path_factory.mktemp("outputs"))
    finally:
        stopped = script("stop-local-deployment.sh", env=env)
        assert stopped.returncode == 0, stopped.stderr


def worker_status(deployment: Deployment, site: int) -> dict[str, object]:
    import json

    proc = subprocess.run(
        [
            str(BIN / "flower-llm"),
            "site-worker",
            "-q",
            "--status",
            "--socket",
            socket_of(deployment, site),
        ],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def socket_of(deployment: Deployment, site: int) -> str:
    return str(deployment.deploy_dir / "workers" / f"site-{site}" / "worker.sock")


def eval_losses(run_dir: Path) -> list[float]:
    return [float(r["eval-loss"]) for r in rows(run_dir)]


@pytest.fixture(scope="module")
def worker_run(deployment: Deployment) -> Path:
    proc = deployment.run("workers")
    assert proc.returncode == 0, failure(proc, deployment)
    return deployment.out / "workers"


def test_sites_train_through_their_workers_which_load_the_model_once(
    deployment: Deployment, worker_run: Path
) -> None:
    # Every site trained and evaluated in both rounds
    assert [r["clients-replied"] for r in rows(worker_run)] == [NUM_SITES, NUM_SITES]
    losses = eval_losses(worker_run)
    assert losses[1] < losses[0]
    for site in range(NUM_SITES):
        status = worker_status(deployment, site)
        # One model load for 2 rounds of train + evaluate messages, none failed
        assert status["model-loads"] == 1, status
        assert int(status["jobs"]) >= 4 and status["failed-jobs"] == 0, status  # type: ignore[call-overload]
        assert status["pid"] == deployment.pids[f"worker-{site}"]
        # Owner-only: directory 0700, socket 0600, both ours
        sock = Path(socket_of(deployment, site))
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert sock.stat().st_uid == sock.parent.stat().st_uid == os.getuid()
    # The SuperNodes' ClientApps only relayed: no model load in their logs
    for site in range(NUM_SITES):
        assert "Loaded base model" not in deployment.log(f"supernode-{site}")
        assert "Loaded base model" in deployment.log(f"worker-{site}")


def test_a_worker_killed_mid_job_costs_its_site_one_round(
    deployment: Deployment, worker_run: Path
) -> None:
    # Prepare: SIGKILL site 1's worker as soon as it starts a training job, restart it
    victim = deployment.pids["worker-1"]
    log_before = deployment.log("worker-1").count("Running train")
    run_dir = deployment.out / "killed-worker"
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    # Evaluated in round 2 only: the test looks at who trained, not at losses.
    runner = threading.Thread(
        target=lambda: result.update(run=deployment.run("killed-worker", "fed.evaluate-every=2"))
    )
    runner.start()
    wait_for(
        lambda: deployment.log("worker-1").count("Running train") > log_before,
        400,
        "site 1's worker to start training",
        0.05,
    )
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not running(victim), 30, "the worker to die")
    restarted = script("start-site-worker.sh", "1", env=deployment.env)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr

    # Execute: the run goes on
    runner.join(timeout=900)
    proc = result["run"]

    # Assert: it finished; site 1 was dropped from round 1 only, with the worker's error
    assert proc.returncode == 0, failure(proc, deployment)
    first, second = rows(run_dir)
    assert first["clients-replied"] == NUM_SITES - 1
    (lost,) = first["dropped"]
    assert int(lost) == deployment.node_id(1)
    assert "site worker" in first["dropped"][lost], first["dropped"]
    assert second["clients-replied"] == NUM_SITES and not second.get("dropped")
    assert (run_dir / "summary.json").exists()
    assert deployment.pids["worker-1"] != victim and running(deployment.pids["worker-1"])


def test_without_workers_the_same_job_gives_the_same_heldout_loss(
    deployment: Deployment, worker_run: Path
) -> None:
    # Prepare: the SuperNodes again, without worker-socket (per-message ClientApps)
    names = [f"supernode-{i}" for i in range(NUM_SITES)]
    stopped = script("stop-local-deployment.sh", *names, env=deployment.env)
    assert stopped.returncode == 0, stopped.stderr
    plain_env = {**deployment.env, "SITE_WORKERS": "0"}
    for i in range(NUM_SITES):
        started = script("start-supernode.sh", str(i), env=plain_env)
        assert started.returncode == 0, started.stdout + started.stderr
    jobs_before = [worker_status(deployment, i)["jobs"] for i in range(NUM_SITES)]

    # Execute
    start = time.monotonic()
    proc = deployment.run("plain")
    assert proc.returncode == 0, failure(proc, deployment)

    # Assert: the workers were not used, and the losses match run 1's
    assert [worker_status(deployment, i)["jobs"] for i in range(NUM_SITES)] == jobs_before
    plain = eval_losses(deployment.out / "plain")
    assert plain == pytest.approx(eval_losses(worker_run), rel=1e-3), time.monotonic() - start
