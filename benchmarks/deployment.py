"""Deployment round time: per-message ClientApps, the pre-quantized cache, site workers, simulation.

Four ways to run the same job (3 sites, the same model, local steps and rounds):

- **(a) per message**: a real local TLS deployment (``scripts/deploy``), every ClientApp a
  fresh process that imports torch, reads the full-precision base and quantizes it
  (``FLOWER_LLM_BASE_CACHE=off``): what deployments did before the cache and workers;
- **(b) cache**: the same, each ClientApp reading the pre-quantized base from the cache;
- **(c) site workers**: ``SITE_WORKERS=1``: the ClientApps relay to a long-lived worker
  per site that keeps its session loaded;
- **(d) simulation**: ``flwr run`` on the local simulation engine (3 virtual sites).

Round time is the ServerApp's ``seconds`` per round in metrics.jsonl. Also measured: one
base load from the cache vs from the original weights (in this process), and the wall time
of one ClientApp process split into start (interpreter up), import (flwr and the app) and
work (one evaluate message: in-process, or relayed to a warm worker).

Targets (issue 14): a round with site workers at most 1.25x the simulation round, and the
per-message ClientApp overhead (start + import + relay beyond the worker's own job time)
under 1 s.

Not in ``run_all``: it starts a SuperLink, 3 SuperNodes and 3 workers, and runs 4 jobs,
several minutes on 2 cores. Run it on its own (it takes the e2e lock's place: run it
under ``flock /tmp/flower-llm-e2e.lock`` where tests may run)::

    python -m benchmarks.deployment [--quick] [--model tiny|mid] [--rounds N]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "scripts" / "deploy"
PROFILE = "bench-deployment"
NUM_SITES = 3
ROUND_RATIO_TARGET = 1.25
OVERHEAD_TARGET_S = 1.0
MODES = ("per-message", "cache", "workers", "simulation")
SPLIT = ("start-s", "import-flwr-s", "import-app-s", "work-s", "exit-s", "total-s")
"""One ClientApp process: interpreter up, Flower's ClientApp runtime imported, the app
imported, the message answered, the process gone."""


def job(model: str, rounds: int, out: Path, name: str) -> str:
    return (
        f'model.name="{model}" train.local-steps=2 fed.num-rounds={rounds} '
        f'output.local-only-baseline=false output.dir="{out}" output.run-name="{name}"'
    )


def round_seconds(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["seconds"]) for line in lines]


# --------------------------------------------------------------------------------------
# Base load: cache vs original
# --------------------------------------------------------------------------------------


def base_load_seconds(model_dir: str, cache_root: Path, repeats: int) -> dict[str, float]:
    import torch

    from flower_llm.config import ModelConfig
    from flower_llm.models import QuantizedBaseCache, load_base_model

    cfg = ModelConfig(name=model_dir)
    cache = QuantizedBaseCache(cache_root)
    load_base_model(cfg, torch.device("cpu"), cache=cache)  # builds the entry

    def original() -> None:
        load_base_model(cfg, torch.device("cpu"), cache=False)

    def cached() -> None:
        load_base_model(cfg, torch.device("cpu"), cache=cache)

    times = common.interleaved({"original": original, "cache": cached}, repeats)
    return {k: common.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------
# One ClientApp process: start / import / work
# --------------------------------------------------------------------------------------

CLIENTAPP_PROCESS = """
import json, sys, time
t_start = time.time()
# What a SuperNode's flwr-clientapp process imports before it loads the app: Flower's
# ClientApp runtime (through the deploy scripts' faster start, flower_llm.clientapp_process).
from flower_llm.clientapp_process import load_flwr_clientapp
load_flwr_clientapp()
import flwr.supernode.runtime.run_clientapp
t_flwr = time.time()
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client_apps.qlora import app
from flower_llm import wire
t_import = time.time()
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
node_config = {"partition-id": 0, "num-partitions": 3}
if sys.argv[1]:
    node_config["worker-socket"] = sys.argv[1]
msg = Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}),
              dst_node_id=7, message_type="evaluate")
msg.metadata.__dict__["_message_id"] = "m"
context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                  run_config={"model.name": sys.argv[2]})
state = json.loads(sys.argv[3])
import numpy as np
msg.content[wire.ARRAYS] = wire.to_array_record(
    {k: np.load(v) for k, v in state.items()})
reply = app(msg, context)
t_work = time.time()
heavy = [m for m in ("torch", "transformers", "peft") if m in sys.modules]
print(json.dumps({"start": t_start, "flwr": t_flwr, "import": t_import, "work": t_work,
                  "heavy": heavy}))
# The deploy scripts' flwr-clientapp ends this way once Flower's function has exited.
from flower_llm.clientapp_process import end
end(0)
"""


def clientapp_split(model_dir: str, worker_socket: str, state_files: dict[str, str]) -> dict:
    """Wall time of one ClientApp process answering an evaluate message."""
    spawned = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENTAPP_PROCESS,
            worker_socket,
            model_dir,
            json.dumps(state_files),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    done = time.time()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "start-s": t["start"] - spawned,
        "import-flwr-s": t["flwr"] - t["start"],
        "import-app-s": t["import"] - t["flwr"],
        "import-s": t["import"] - t["start"],
        "work-s": t["work"] - t["import"],
        "exit-s": done - t["work"],
        "total-s": done - spawned,
        "heavy-imports": t["heavy"],
    }


def clientapp_splits(model_dir: str, tmp: Path, repeats: int) -> dict[str, Any]:
    """In-process vs relayed ClientApp processes; the worker runs in a process of its own."""
    import numpy as np

    from flower_llm.adapters import adapter_state
    from flower_llm.client import SessionCache, SiteIdentity
    from flower_llm.config import parse_run_config
    from flower_llm.worker import ping

    session = SessionCache().get(
        parse_run_config({"model.name": model_dir}), SiteIdentity(None, 0, 3)
    )
    state_files = {}
    for i, (key, value) in enumerate(adapter_state(session.model).items()):
        path = tmp / f"a{i}.npy"
        np.save(path, value)
        state_files[key] = str(path)
    sock_dir = Path(tempfile.mkdtemp(prefix="flwbench-", dir="/tmp"))
    sock = str(sock_dir / "w" / "worker.sock")
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "flower-llm"), "site-worker", "-q", "--socket", sock],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                ping(sock)
                break
            except Exception:
                time.sleep(0.1)
        clientapp_split(model_dir, sock, state_files)  # warms the worker's session
        relayed = []
        for _ in range(repeats):
            row = clientapp_split(model_dir, sock, state_files)
            row["worker-job-s"] = float(ping(sock)["last-job-s"])
            relayed.append(row)
        in_process = [clientapp_split(model_dir, "", state_files) for _ in range(repeats)]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        shutil.rmtree(sock_dir, ignore_errors=True)

    def med(rows: list[dict], key: str) -> float:
        return common.median([r[key] for r in rows])

    split = {
        name: {k: med(rows, k) for k in (*SPLIT, "import-s")}
        for name, rows in (("relayed", relayed), ("in-process", in_process))
    }
    split["relayed"]["heavy-imports"] = relayed[0]["heavy-imports"]
    # Overhead: the relaying process's whole life minus the job it waited for.
    split["relayed"]["worker-job-s"] = med(relayed, "worker-job-s")
    split["relayed"]["overhead-s"] = common.median(
        [r["total-s"] - r["worker-job-s"] for r in relayed]
    )
    return split


# --------------------------------------------------------------------------------------
# Deployment and simulation rounds
# --------------------------------------------------------------------------------------


def script(name: str, *args: str, env: dict[str, str]) -> None:
    proc = subprocess.run(
        ["bash", str(DEPLOY / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def flwr(env: dict[str, str], *args: str) -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"flwr {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def restart_supernodes(env: dict[str, str], **overrides: str) -> None:
    script("stop-local-deployment.sh", *[f"supernode-{i}" for i in range(NUM_SITES)], env=env)
    for i in range(NUM_SITES):
        script("start-supernode.sh", str(i), env={**env, **overrides})


def deployment_rounds(
    model_dir: str, rounds: int, tmp: Path, modes: tuple[str, ...] = MODES
) -> dict[str, list[float]]:
    from tests.flwr_procs import (
        add_connection,
        flwr_env,
        flwr_run,
        free_ports,
        local_superlink_pids,
        stop_pids,
    )

    home, deploy_dir, out = tmp / "home", tmp / "deploy", tmp / "out"
    port, base = free_ports(1 + NUM_SITES)[:2]
    cache = tmp / "cache"
    env = flwr_env(home, cache)
    env.update(
        DEPLOY_DIR=str(deploy_dir),
        SUPERLINK_PORT=str(port),
        SUPERNODE_BASE_PORT=str(base),
        PROFILE=PROFILE,
        SITE_WORKERS="1",
        # One torch thread per process, as the simulation's 1-CPU actors get: 3 sites on a
        # small machine otherwise oversubscribe its cores in every mode.
        OMP_NUM_THREADS="1",
    )
    add_connection(home, PROFILE, f"127.0.0.1:{port}", deploy_dir / "certs" / "ca.crt")
    result: dict[str, list[float]] = {}

    def run(mode: str) -> None:
        run_config = job(model_dir, rounds, out, mode)
        flwr(env, "run", ".", PROFILE, "--stream", "--run-config", run_config)
        result[mode] = round_seconds(out / mode)

    try:
        # Workers and SuperNodes relaying to them; then SuperNodes without, twice.
        script("start-local-deployment.sh", str(NUM_SITES), env=env)
        if "workers" in modes:
            run("workers")
        if "cache" in modes:
            restart_supernodes(env, SITE_WORKERS="0")
            run("cache")
        if "per-message" in modes:
            restart_supernodes(env, SITE_WORKERS="0", FLOWER_LLM_BASE_CACHE="off")
            run("per-message")
    finally:
        script("stop-local-deployment.sh", env=env)
    sim_home = tmp / "sim-home"
    try:
        proc = flwr_run(
            sim_home,
            run_config=job(model_dir, rounds, out, "simulation"),
            num_supernodes=NUM_SITES,
            timeout=3600,
            cache=cache,
        )
    finally:
        stop_pids(local_superlink_pids(sim_home))
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    result["simulation"] = round_seconds(out / "simulation")
    return result


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def run(model: str, rounds: int, quick: bool, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    from flower_llm.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir() if model == "tiny" else common.mid_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        loads = base_load_seconds(model_dir, tmp / "load-cache", 1 if quick else 3)
        split = clientapp_splits(model_dir, tmp, 1 if quick else 3)
        rounds_s = {} if quick else deployment_rounds(model_dir, rounds, tmp, modes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # A round's time without the first one (model loads, compilation warm-up) where there
    # are several; the first round alone otherwise.
    steady = {m: common.median(s[1:] or s) for m, s in rounds_s.items()}
    ratio = (
        steady["workers"] / steady["simulation"]
        if "workers" in steady and "simulation" in steady
        else None
    )
    return {
        "model": model,
        "rounds": rounds,
        "base-load-s": loads,
        "clientapp": split,
        "round-seconds": rounds_s,
        "steady-round-s": steady,
        "workers-vs-simulation": ratio,
        "headlines": [
            common.headline(
                "deployment round with site workers / simulation round",
                "n/a" if ratio is None else f"{ratio:.2f}x",
                f"<= {ROUND_RATIO_TARGET}x",
                None if ratio is None else ratio <= ROUND_RATIO_TARGET,
            ),
            common.headline(
                "per-message ClientApp overhead with a worker",
                f"{split['relayed']['overhead-s']:.2f} s",
                f"< {OVERHEAD_TARGET_S:.0f} s",
                split["relayed"]["overhead-s"] < OVERHEAD_TARGET_S,
            ),
            common.headline(
                "base load: cache vs original",
                f"{loads['cache']:.2f} s vs {loads['original']:.2f} s",
            ),
        ],
    }


def to_markdown(result: dict[str, Any]) -> str:
    loads, split = result["base-load-s"], result["clientapp"]
    text = f"Model: {result['model']}, 3 sites, 2 local steps, {result['rounds']} rounds.\n\n"
    if result["round-seconds"]:
        rows = [
            [
                m,
                ", ".join(f"{s:.1f}" for s in result["round-seconds"][m]),
                f"{result['steady-round-s'][m]:.1f}",
            ]
            for m in MODES
            if m in result["round-seconds"]
        ]
        text += common.table(["mode", "round seconds", "steady round (s)"], rows) + "\n"
        ratio = result["workers-vs-simulation"]
        if ratio is not None:
            text += f"Workers vs simulation: {ratio:.2f}x (target <= {ROUND_RATIO_TARGET}x)\n\n"
    text += (
        f"Base load: {loads['cache']:.2f} s from the cache, "
        f"{loads['original']:.2f} s from the original weights.\n\n"
    )
    rows = [
        [name, *(f"{split[name][k]:.2f}" if k in split[name] else "-" for k in SPLIT)]
        for name in ("in-process", "relayed")
    ]
    text += "One ClientApp process answering an evaluate message (median seconds):\n\n"
    text += common.table(
        ["ClientApp", "start", "import flwr", "import app", "work", "exit", "total"], rows
    )
    text += (
        f"\nRelayed: the worker's own job took {split['relayed']['worker-job-s']:.2f} s, so the "
        f"per-message overhead is {split['relayed']['overhead-s']:.2f} s "
        f"(target < {OVERHEAD_TARGET_S:.0f} s); heavy modules imported by the relaying "
        f"process: {split['relayed']['heavy-imports'] or 'none'}.\n"
    )
    return text


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--model", choices=("tiny", "mid"), default="tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="which ways to run the job"
    )
    p.add_argument("--name", help="result file name (default deployment-<model>)")
    args = p.parse_args()
    common.setup(args.threads)
    common.run_and_finish(
        args.name or f"deployment-{args.model}",
        args,
        lambda: run(args.model, args.rounds, args.quick, tuple(args.modes)),
        to_markdown,
    )


if __name__ == "__main__":
    main()
