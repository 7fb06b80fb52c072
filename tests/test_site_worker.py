"""The site worker: jobs relayed over its Unix socket give the replies in-process runs give.

The worker runs in a thread of the test process (real sockets, real Flower messages); the
relaying side is checked in a fresh process for what it imports. A real deployment with
site workers, and a worker killed mid-run, are in tests/test_e2e_deployment.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_apps.qlora import app
from flower_llm import __version__, wire
from flower_llm.adapters import adapter_state
from flower_llm.worker import (
    MAGIC,
    NODE_CONFIG_KEY,
    SiteWorker,
    WorkerError,
    call_worker,
    ping,
    prepare_socket_dir,
    recv_frame,
    send_frame,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short path: a Unix socket address holds at most 107 bytes, pytest's tmp_path may not.
    parent = Path(tempfile.mkdtemp(prefix="flw-", dir="/tmp"))
    yield parent / "site"
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def worker(socket_dir: Path) -> Iterator[SiteWorker]:
    site_worker = SiteWorker(socket_dir / "worker.sock", max_job_bytes=64 * 2**20)
    site_worker.bind()
    thread = threading.Thread(target=site_worker.serve_forever, daemon=True)
    thread.start()
    yield site_worker
    site_worker.shutdown()
    thread.join(timeout=10)


def run_config(model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"model.name": str(model_dir), "train.local-steps": 2, **extra}


def context(cfg: dict[str, Any], worker_socket: Path | None, state: RecordDict | None = None):
    node_config: dict[str, Any] = {"partition-id": 1, "num-partitions": 2}
    if worker_socket is not None:
        node_config[NODE_CONFIG_KEY] = str(worker_socket)
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=state or RecordDict(), run_config=cfg
    )


def message(kind: str, state: dict[str, np.ndarray], server_round: int = 1) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: wire.to_array_record(state),
            wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round, wire.LEARNING_RATE: 0.01}),
        }
    )
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"{kind}-{server_round}"
    return msg


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1


@pytest.fixture(scope="module")
def start_state(tiny_model_dir: Path) -> dict[str, np.ndarray]:
    from client_apps.qlora import sessions
    from flower_llm.client import SiteIdentity
    from flower_llm.config import parse_run_config

    session = sessions().get(parse_run_config(run_config(tiny_model_dir)), SiteIdentity(None, 1, 2))
    return adapter_state(session.model)


def test_relayed_train_and_evaluate_equal_in_process(
    worker: SiteWorker, tiny_model_dir: Path, start_state: dict[str, np.ndarray]
) -> None:
    # Prepare: the process's sessions hold the model (start_state loaded it); the
    # worker runs in this process, so its count of loads is the process's
    from client_apps.qlora import sessions

    cfg = run_config(tiny_model_dir)
    loads_before = sessions().model_loads

    # Execute: the same train and evaluate messages, in process and through the worker
    local_train = app(message("train", start_state), context(cfg, None))
    relayed_train = app(message("train", start_state), context(cfg, worker.socket_path))
    trained = wire.from_array_record(relayed_train.content.array_records[wire.ARRAYS])
    local_eval = app(message("evaluate", trained), context(cfg, None))
    relayed_eval = app(message("evaluate", trained), context(cfg, worker.socket_path))
    status = ping(str(worker.socket_path))

    # Assert: identical adapters and metrics, replies addressed to the received message
    local = wire.from_array_record(local_train.content.array_records[wire.ARRAYS])
    assert local.keys() == trained.keys()
    for key in local:
        np.testing.assert_array_equal(trained[key], local[key])
    assert any(not np.array_equal(trained[k], start_state[k]) for k in trained)
    assert metrics_but_seconds(relayed_train) == metrics_but_seconds(local_train)
    relayed_metrics = dict(relayed_eval.content.metric_records[wire.METRICS])
    local_metrics = dict(local_eval.content.metric_records[wire.METRICS])
    assert relayed_metrics == local_metrics
    assert relayed_train.metadata.reply_to_message_id == "train-1"
    assert relayed_eval.metadata.message_type == "evaluate"
    assert status["jobs"] == 2 and status["failed-jobs"] == 0
    # one model for every job (and the in-process ones): none loaded since start_state
    assert status["model-loads"] == loads_before


def metrics_but_seconds(reply: Message) -> dict[str, Any]:
    metrics = dict(reply.content.metric_records[wire.METRICS])
    metrics.pop(wire.TRAIN_SECONDS)
    return metrics


def test_dpsgd_state_stays_at_the_site_across_relayed_rounds(
    worker: SiteWorker,
    tiny_model_dir: Path,
    start_state: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    # Prepare: DP-SGD keeps its accountant in the site's state store (node-config)
    cfg = run_config(
        tiny_model_dir, **{"privacy.dpsgd": True, "privacy.dpsgd-noise-multiplier": 1.0}
    )
    ctx = context(cfg, worker.socket_path)
    ctx.node_config["site-state-dir"] = str(tmp_path / "site-state")

    # Execute: two rounds through the worker, one context as a SuperNode keeps it
    first = app(message("train", start_state, 1), ctx)
    kept = sorted((tmp_path / "site-state").rglob("*.json"))
    after_first = [p.read_text() for p in kept]
    second = app(message("train", start_state, 2), ctx)
    after_second = [p.read_text() for p in kept]

    # Assert: the worker wrote the accountant where the node-config says, and epsilon grew
    eps1 = first.content.metric_records[wire.METRICS][wire.DPSGD_EPSILON]
    eps2 = second.content.metric_records[wire.METRICS][wire.DPSGD_EPSILON]
    assert 0 < eps1 < eps2
    assert len(kept) == 1 and after_first != after_second


# --------------------------------------------------------------------------------------
# Protocol: only documented jobs, validated
# --------------------------------------------------------------------------------------


def raw_exchange(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(data)
        header, _ = recv_frame(sock, 2**20)
    return header


@pytest.mark.parametrize(
    ("header", "blobs", "error"),
    [
        ({"job": "shell"}, [], "unknown job 'shell'"),
        ({"job": "ping", "flower-llm": "0.0.0"}, [], "restart the worker after upgrading"),
        ({"job": "run"}, [b"x"], "carries 2 blobs"),
        ({"job": "run", "task": [1, 2, 3], "message-type": "query"}, [b"", b""], "query"),
        ({"job": "run", "task": [1, 2, 3], "message-type": "train"}, [b"junk", b""], "parse"),
        ({"job": "run", "task": "x", "message-type": "train"}, [b"", b""], "'task' must be"),
    ],
)
def test_bad_jobs_are_refused_with_a_reason(
    worker: SiteWorker, header: dict[str, Any], blobs: list[bytes], error: str
) -> None:
    with pytest.raises(WorkerError, match=error):
        call_worker(str(worker.socket_path), header, blobs)
    assert ping(str(worker.socket_path))["pid"] == os.getpid()  # still serving


def test_malformed_and_oversized_frames_are_refused(worker: SiteWorker) -> None:
    bad_magic = raw_exchange(worker.socket_path, b"GET / HTTP/1.1\r\n\r\n")
    assert bad_magic["status"] == "error" and "not a flower-llm worker frame" in bad_magic["error"]
    header = json.dumps({"protocol": 1, "job": "run", "blobs": [2**40]}).encode()
    oversized = raw_exchange(worker.socket_path, MAGIC + len(header).to_bytes(4, "big") + header)
    assert oversized["status"] == "error" and "exceed the limit" in oversized["error"]
    old = json.dumps({"protocol": 0, "job": "ping", "blobs": []}).encode()
    assert (
        "protocol version 0"
        in raw_exchange(worker.socket_path, MAGIC + len(old).to_bytes(4, "big") + old)["error"]
    )
    assert ping(str(worker.socket_path))["refused"] == 3


def test_a_failing_job_is_an_error_reply_and_the_worker_serves_on(
    worker: SiteWorker, start_state: dict[str, np.ndarray]
) -> None:
    cfg = {"model.name": "/nonexistent/model", "train.local-steps": 1}
    with pytest.raises(WorkerError, match="job failed"):
        app(message("train", start_state), context(cfg, worker.socket_path))
    assert ping(str(worker.socket_path))["failed-jobs"] == 1


def test_no_worker_or_a_worker_that_dies_mid_job_is_an_error(socket_dir: Path) -> None:
    # Nobody listening: the relay says where it looked and how to start a worker
    path = socket_dir / "worker.sock"
    with pytest.raises(WorkerError, match=r"no site worker listening .*flower-llm site-worker"):
        ping(str(path))

    # A "worker" that reads the job and dies before replying
    prepare_socket_dir(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def die_mid_job() -> None:
        conn, _ = server.accept()
        recv_frame(conn, 2**20)
        conn.close()

    thread = threading.Thread(target=die_mid_job)
    thread.start()
    with pytest.raises(WorkerError, match="closed the connection before replying"):
        ping(str(path))
    thread.join()
    server.close()


# --------------------------------------------------------------------------------------
# Owner-only socket
# --------------------------------------------------------------------------------------


def test_socket_and_directory_are_owner_only(worker: SiteWorker, socket_dir: Path) -> None:
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(worker.socket_path.stat().st_mode) == 0o600
    assert socket_dir.stat().st_uid == worker.socket_path.stat().st_uid == os.getuid()


def test_an_open_socket_directory_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(PermissionError, match=r"mode 755.*chmod 700"):
        SiteWorker(open_dir / "w.sock").bind()


def test_a_second_worker_on_a_live_socket_is_refused(worker: SiteWorker) -> None:
    with pytest.raises(RuntimeError, match="already listening"):
        SiteWorker(worker.socket_path).bind()


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root")
def test_another_user_cannot_connect(worker: SiteWorker, socket_dir: Path) -> None:
    nobody = 65534

    def connect_as_nobody() -> str:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody, try to connect, report, exit
            os.close(read)
            try:
                os.setgid(nobody)
                os.setuid(nobody)
                # Raw, so that the worker's own check answers (the relay would refuse a
                # worker of another uid itself: checked below with the relay).
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(str(worker.socket_path))
                    send_frame(sock, {"job": "ping", "flower-llm": __version__})
                    result = str(recv_frame(sock, 2**20)[0])
            except BaseException as err:
                result = f"{type(err).__name__}: {err}"
            os.write(write, result.encode()[:4000])
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            return pipe.read()

    # The 0700 directory stops another user before the socket is even reached
    assert "Permission denied" in connect_as_nobody()
    # With the directory and socket opened by mistake, the peer-credential check refuses
    socket_dir.parent.chmod(0o755)  # mkdtemp's own directory is 0700 too
    socket_dir.chmod(0o755)
    worker.socket_path.chmod(0o666)
    refused = connect_as_nobody()
    # The worker answers the refusal and closes at once: a peer still sending its job
    # then sees the closed connection instead of the answer (seen under load).
    assert "connections from other users are refused" in refused or refused.startswith(
        ("BrokenPipeError", "ConnectionResetError")
    ), refused
    assert ping(str(worker.socket_path))["refused"] == 1


# --------------------------------------------------------------------------------------
# The relaying ClientApp process stays light
# --------------------------------------------------------------------------------------

RELAY_PROCESS = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client_apps.qlora import app

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
node_config = {"worker-socket": sys.argv[1]}
# A SecAgg+ key exchange stage and an evaluate message, both relayed to the worker
setup = ConfigRecord({
    Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
    Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 2**20, Key.MOD_RANGE: 2**32,
    Key.MAX_WEIGHT: 1000.0,
})
msg = Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=7, message_type="train")
msg.metadata.__dict__["_message_id"] = "setup"
context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                  run_config={"fed.aggregation": "secagg+", "fed.max-weight": 1000.0,
                              "model.name": sys.argv[2]})
reply = app(msg, context)
heavy = ("torch", "transformers", "peft", "datasets", "bitsandbytes", "opacus", "scipy")
print(json.dumps({
    "reply": sorted(reply.content.config_records[RECORD_KEY_CONFIGS]),
    "state": sorted(context.state.config_records) + sorted(context.state.array_records),
    "imported": [name for name in heavy if name in sys.modules],
}))
"""


def test_the_relaying_clientapp_imports_nothing_heavy(
    worker: SiteWorker, tiny_model_dir: Path
) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    proc = subprocess.run(
        [sys.executable, "-c", RELAY_PROCESS, str(worker.socket_path), str(tiny_model_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reply"] == [Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2]
    assert result["state"], "the SecAgg+ protocol state came back into the context"
    assert result["imported"] == []
    assert ping(str(worker.socket_path))["jobs"] == 1


# --------------------------------------------------------------------------------------
# SecAgg+: all four stages through the worker
# --------------------------------------------------------------------------------------


def relaying_client_app(socket_path: str, run_config: dict[str, Any]) -> Any:
    """The project's ClientApp as a SuperNode with ``worker-socket`` would run it.

    The simulation engine gives apps an empty run-config and no ``worker-socket``: both are
    set here, as a deployment's SuperNode and ``flwr run`` would. Ray pickles the app, so
    everything it needs travels in the closure.
    """
    from flwr.clientapp import ClientApp

    relaying = ClientApp()

    def via_worker(msg: Message, ctx: Context) -> Message:
        from client_apps.qlora import app as qlora_app

        # Flower refuses a context whose run-config a ClientApp changed: use a copy.
        node_config = {**ctx.node_config, NODE_CONFIG_KEY: socket_path}
        inner = Context(ctx.run_id, ctx.node_id, node_config, ctx.state, dict(run_config))
        return qlora_app(msg, inner)

    relaying.train()(via_worker)
    relaying.evaluate()(via_worker)
    return relaying


@pytest.fixture
def worker_process(socket_dir: Path) -> Iterator[str]:
    """``flower-llm site-worker`` in a process of its own, as a site runs it.

    (A worker thread would share Flower's process-global TaskIdentity with the in-process
    ServerApp of a simulation.)
    """
    import time

    path = str(socket_dir / "worker.sock")
    # One worker serves all the simulated sites here, which queue for it (a real site has
    # its own): on a loaded machine the first job (model load) outlasts the default 30 s.
    proc = subprocess.Popen(
        [
            *(str(Path(sys.executable).parent / "flower-llm"), "site-worker"),
            *("--socket", path, "--busy-timeout", "600"),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(300):
            try:
                ping(path)
                break
            except WorkerError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.long
def test_secagg_rounds_run_through_a_site_worker(
    worker_process: str, tiny_model_dir: Path, start_state: dict[str, np.ndarray]
) -> None:
    from flwr.app import ConfigRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from flower_llm import wire
    from flower_llm.config import parse_run_config
    from flower_llm.streams import RandomStreams
    from strategies.fedavg import WeightedFedAvg
    from strategies.rounds import RoundResult, federate
    from strategies.secagg import SecAggRounds

    # Prepare: 3 sites, one SecAgg+ round, every site relaying to the one worker
    settings = {
        "model.name": str(tiny_model_dir),
        "fed.aggregation": "secagg+",
        "fed.max-weight": 1000.0,  # bounds any partition of the 900 embedded examples
        "fed.num-rounds": 1,
        "fed.min-available-clients": 3,
        "fed.min-train-clients": 3,
        "train.local-steps": 1,
        "output.local-only-baseline": False,
    }
    cfg = parse_run_config(settings)
    out: dict[str, Any] = {}

    def main(grid: Grid, context: Context) -> None:
        streams = RandomStreams(0)
        mode = SecAggRounds(
            cfg,
            context,
            sorted(start_state),
            evaluation=WeightedFedAvg(min_available_clients=1, eval_rng=streams.evaluate),
            train_rng=streams.train,
        )

        def on_round_end(result: RoundResult) -> None:
            out["report"] = mode.last_report

        try:
            final = federate(
                mode,
                grid,
                wire.to_array_record(start_state),
                first_round=1,
                num_rounds=1,
                train_config=lambda r: ConfigRecord(
                    {wire.SERVER_ROUND: r, wire.LEARNING_RATE: 1e-3}
                ),
                on_round_end=on_round_end,
                evaluate=lambda _r: False,
            )
        finally:
            mode.close()
        out["final"] = wire.from_array_record(final)

    server = ServerApp()
    server.main()(main)

    # Execute
    run_simulation(
        server_app=server,
        client_app=relaying_client_app(worker_process, settings),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )

    # Assert: the round aggregated all three sites' masked updates, all run by the worker
    status = ping(worker_process)
    assert status["failed-jobs"] == 0, status
    assert status["model-loads"] == 1
    assert status["jobs"] == 3 * 4  # setup, share keys, collect masked vectors, unmask
    assert "final" in out
    assert any(not np.array_equal(out["final"][k], start_state[k]) for k in start_state)


def test_cli_names_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flower_llm.cli import main

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    assert main(["site-worker", "--socket", str(open_dir / "w.sock")]) == 2
    assert "chmod 700" in capsys.readouterr().err
    assert main(["site-worker", "--socket", str(tmp_path / "none.sock"), "--status"]) == 1
    assert "no site worker listening" in capsys.readouterr().err
    too_long = tmp_path / ("x" * 120) / "w.sock"
    assert main(["site-worker", "--socket", str(too_long)]) == 2
    assert "limit of a Unix socket address" in capsys.readouterr().err


def test_cli_status_of_a_running_worker(
    worker: SiteWorker, capsys: pytest.CaptureFixture[str]
) -> None:
    from flower_llm.cli import main

    assert main(["site-worker", "-q", "--socket", str(worker.socket_path), "--status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pid"] == os.getpid() and status["jobs"] == 0
