"""Where a deployment round's time goes: a timeline of every message, site and process.

Starts a local TLS deployment of 3 SuperNodes with site workers (``scripts/deploy``,
``SITE_WORKERS=1``), runs one job through ``flwr run``, and traces every Flower and
flower-llm process on one clock (``benchmarks/trace_site/sitecustomize.py`` on their
``PYTHONPATH``; it only observes). For each message a site handles it reports:

==================  ===============================================================
``pull-wait``       ServerApp pushed the wave -> the SuperNode's pull got the message
                    (the SuperNode sleeps 3 s between empty pulls)
``download``        the SuperNode fetching the message's objects from the SuperLink
``spawn``           message received -> the ClientApp process forked (SuperExec polls
                    the SuperNode for tasks every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``)
``interpreter``     fork -> Python up
``flwr-import``     Python up -> ``flwr-clientapp`` running (imports flwr's runtime)
``input+fab``       pulling the message and context, installing the FAB (waits for
                    the download when the process started before it finished)
``app-import``      importing the ClientApp module (``client_apps.qlora``)
``to-worker``       connected to the site worker -> the worker starts the job
``job``             the worker's own job time (train or evaluate)
``back``            job done -> the SuperNode starts sending the reply (relay, push to
                    the SuperNode, its reply poll of 0.5 s)
``upload``          the SuperNode pushing the reply's objects to the SuperLink
``server-pickup``   last reply sent -> the ServerApp has them all (its 0.25 s poll and
                    pulling the replies' objects)
==================  ===============================================================

and per wave (all sites' train or evaluate messages of a round): its wall time and the
ServerApp's time between waves (aggregation, checkpoint, report). It also records the
CPU seconds each kind of process used during the job: on a small machine the processes
compete for the same cores, so CPU is what the waits above are made of.

Run under the e2e lock (it starts real Flower processes)::

    flock /tmp/flower-llm-e2e.lock python -m benchmarks.deployment_timeline \
        [--rounds 3] [--env NAME=VALUE ...] [--keep DIR]

``--env`` sets variables for every deployment process (e.g. Flower's
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2``) to see what a setting changes.
"""

from __future__ import annotations

import itertools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.deployment import NUM_SITES, ROOT, job, round_seconds, script

TRACE_SITE = Path(__file__).resolve().parent / "trace_site"
PROFILE = "bench-timeline"

SEGMENTS = (
    "pull-wait",
    "download",
    "spawn",
    "interpreter",
    "flwr-import",
    "input+fab",
    "app-import",
    "to-worker",
    "job",
    "back",
    "upload",
)

_LINE = re.compile(r"^@@ (\d+\.\d+) pid=(\d+) (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --------------------------------------------------------------------------------------
# Parsing the traced logs
# --------------------------------------------------------------------------------------


def events(path: Path) -> list[tuple[float, int, str]]:
    """(time, pid, text) of every traced line of a log file, in file order."""
    found = []
    for raw in path.read_text(errors="replace").splitlines():
        match = _LINE.match(_ANSI.sub("", raw))
        if match:
            found.append((float(match.group(1)), int(match.group(2)), match.group(3)))
    return found


@dataclass
class SiteMessage:
    """One message as one site handled it; times are epoch seconds (None: not seen)."""

    kind: str
    received: float
    stamps: dict[str, float] = field(default_factory=dict)
    pid: int | None = None
    cpu: float | None = None
    job: float | None = None


def site_messages(supernode_log: Path, worker_log: Path | None) -> list[SiteMessage]:
    """The messages of one site, from its SuperNode's log and its worker's."""
    messages: list[SiteMessage] = []
    current: SiteMessage | None = None
    for t, pid, text in events(supernode_log):
        if (m := re.search(r"Receiving: (\w+) message", text)) is not None:
            current = SiteMessage(kind=m.group(1), received=t)
            messages.append(current)
        elif current is None:
            continue
        elif "Received successfully" in text:
            current.stamps.setdefault("downloaded", t)
        elif text.startswith("START") and "flwr-clientapp" in text and current.pid is None:
            lag = float(re.search(r"lag=(-?[\d.]+)", text).group(1))  # type: ignore[union-attr]
            current.pid = pid
            current.stamps["forked"] = t - lag
            current.stamps["python-up"] = t
        elif pid == current.pid and "Start `flwr-clientapp` process" in text:
            current.stamps["flwr-up"] = t
        elif pid == current.pid and text.startswith("IMPORTBEGIN client_apps"):
            current.stamps.setdefault("app-import", t)
        elif pid == current.pid and text.startswith("UNIXCONNECT"):
            current.stamps.setdefault("connected", t)
        elif pid == current.pid and text.startswith("EXIT"):
            current.stamps["exited"] = t
            current.cpu = float(re.search(r"cpu=([\d.]+)", text).group(1))  # type: ignore[union-attr]
        elif re.search(r"Sending: \w+ message", text):
            current.stamps.setdefault("sending", t)
        elif "Sent successfully" in text:
            current.stamps.setdefault("sent", t)
    if worker_log is not None and worker_log.exists():
        jobs = []
        for t, _, text in events(worker_log):
            if (m := re.search(r"Running (\w+) for node", text)) is not None:
                jobs.append({"kind": m.group(1), "running": t})
            elif (m := re.search(r"Ran (\w+) for node \d+ in ([\d.]+) s", text)) and jobs:
                jobs[-1].update(ran=t, seconds=float(m.group(2)))
        for message, worker_job in zip(messages, jobs, strict=False):
            if worker_job["kind"] == message.kind and "ran" in worker_job:
                message.stamps["job-start"] = worker_job["running"]
                message.stamps["job-end"] = worker_job["ran"]
                message.job = worker_job["seconds"]
    return messages


@dataclass
class Wave:
    """One ServerApp push of a message type to every sampled site, and its replies."""

    kind: str
    began: float
    pushed: float
    sites: int
    replies_in: float | None = None


def waves(serverapp_log: Path) -> list[Wave]:
    """The ServerApp's waves, from the GRID_PUSH / GRID_PULL lines of its log."""
    found: list[Wave] = []
    got = 0
    for t, _, text in events(serverapp_log):
        if (m := re.search(r"GRID_PUSH n=(\d+) type=(\w+) began=([\d.]+)", text)) is not None:
            found.append(Wave(m.group(2), float(m.group(3)), t, int(m.group(1))))
            got = 0
        elif (m := re.search(r"GRID_PULL n=(\d+)", text)) is not None and found:
            got += int(m.group(1))
            found[-1].replies_in = t
    return found


def segments(message: SiteMessage, wave: Wave) -> dict[str, float]:
    """The message's time split into :data:`SEGMENTS` (those whose ends were seen)."""
    s = {"pushed": wave.pushed, "received": message.received, **message.stamps}
    spans = {
        "pull-wait": ("pushed", "received"),
        "download": ("received", "downloaded"),
        "spawn": ("received", "forked"),
        "interpreter": ("forked", "python-up"),
        "flwr-import": ("python-up", "flwr-up"),
        "input+fab": ("flwr-up", "app-import"),
        "app-import": ("app-import", "connected"),
        "to-worker": ("connected", "job-start"),
        "job": ("job-start", "job-end"),
        "back": ("job-end", "sending"),
        "upload": ("sending", "sent"),
    }
    return {name: s[b] - s[a] for name, (a, b) in spans.items() if a in s and b in s}


# --------------------------------------------------------------------------------------
# CPU of the long-lived processes
# --------------------------------------------------------------------------------------

KINDS = ("flower-superlink", "flwr-serverapp", "flower-supernode", "flower-superexec")


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(deploy_dir: Path) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) of the deployment's long-lived processes."""
    from tests.flwr_procs import cmdline, descendants, read_pid_file

    found: dict[int, tuple[str, float]] = {}
    for name, root in read_pid_file(deploy_dir / "pids").items():
        for pid in [root, *descendants(root)]:
            line = cmdline(pid)
            kind = next((k for k in KINDS if k in line), None)
            if kind is None and name.startswith("worker-"):
                kind = "site-worker"
            cpu = _cpu_seconds(pid)
            if kind is not None and cpu is not None:
                found[pid] = (kind, cpu)
    return found


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict:
    used: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        used[kind] = used.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return used


# --------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------


def trace_run(
    model_dir: str, rounds: int, tmp: Path, extra_env: dict[str, str], settings: str = ""
) -> dict[str, Any]:
    """Deployment up, one job, deployment down; return the parsed timeline."""
    from tests.flwr_procs import add_connection, flwr_env, free_ports

    home, deploy_dir, out = tmp / "home", tmp / "deploy", tmp / "out"
    port, base = free_ports(1 + NUM_SITES)[:2]
    env = flwr_env(home, tmp / "cache")
    env.update(
        DEPLOY_DIR=str(deploy_dir),
        SUPERLINK_PORT=str(port),
        SUPERNODE_BASE_PORT=str(base),
        PROFILE=PROFILE,
        SITE_WORKERS="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(TRACE_SITE),
        **extra_env,
    )
    add_connection(home, PROFILE, f"127.0.0.1:{port}", deploy_dir / "certs" / "ca.crt")
    log = tmp / "serverapp.log"
    try:
        script("start-local-deployment.sh", str(NUM_SITES), env=env)
        before = process_cpu(deploy_dir)
        started = time.time()
        proc = subprocess.run(
            [
                *(str(Path(sys.executable).parent / "flwr"), "run", ".", PROFILE, "--stream"),
                *("--run-config", f"{job(model_dir, rounds, out, 'timeline')} {settings}"),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        wall = time.time() - started
        after = process_cpu(deploy_dir)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    finally:
        script("stop-local-deployment.sh", env=env)
    logs = deploy_dir / "logs"
    sites = [
        site_messages(logs / f"supernode-{i}.log", logs / f"worker-{i}.log")
        for i in range(NUM_SITES)
    ]
    cpu = cpu_used(before, after)
    clientapps = [m.cpu for site in sites for m in site if m.cpu is not None]
    cpu["flwr-clientapp"] = sum(clientapps)
    return {
        "round-seconds": round_seconds(out / "timeline"),
        "waves": waves(log),
        "sites": sites,
        "cpu-s": cpu,
        "clientapp-processes": len(clientapps),
        "run-wall-s": wall,
    }


def summarize(trace: dict[str, Any]) -> dict[str, Any]:
    """Median segment times over the steady rounds' messages, wave times, CPU shares."""
    wave_list: list[Wave] = trace["waves"]
    # Waves in order: round 0's evaluation (a fresh run), then train and evaluate per round.
    labels = []
    round_no = 0
    for wave in wave_list:
        if wave.kind == "train":
            round_no += 1
        labels.append(round_no)
    rows: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    per_kind: dict[str, dict[str, list[float]]] = {}
    for site in trace["sites"]:
        # A site's messages in order match the waves it was sampled in (all, here).
        for message, wave, round_no in zip(site, wave_list, labels, strict=False):
            if message.kind != wave.kind or round_no < 2:
                continue
            for name, value in segments(message, wave).items():
                rows[name].append(value)
                per_kind.setdefault(wave.kind, {}).setdefault(name, []).append(value)
    steady = [w for w, r in zip(wave_list, labels, strict=True) if r >= 2 and w.replies_in]
    wave_wall = {
        kind: [w.replies_in - w.began for w in steady if w.kind == kind]  # type: ignore[operator]
        for kind in ("train", "evaluate")
    }
    between = [
        nxt.began - cur.replies_in
        for cur, nxt in itertools.pairwise(steady)
        if cur.replies_in is not None
    ]
    pickup = []
    for w in steady:
        index = wave_list.index(w)
        sent = [
            site[index].stamps.get("sent")
            for site in trace["sites"]
            if index < len(site) and site[index].kind == w.kind
        ]
        if w.replies_in is not None and all(sent):
            pickup.append(w.replies_in - max(sent))  # type: ignore[type-var]

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    return {
        "segments-median-s": {k: med(v) for k, v in rows.items()},
        "segments-by-kind-median-s": {
            kind: {k: med(v) for k, v in d.items()} for kind, d in per_kind.items()
        },
        "segments-range-s": {k: [min(v), max(v)] for k, v in rows.items() if v},
        "wave-wall-median-s": {k: med(v) for k, v in wave_wall.items()},
        "server-pickup-median-s": med(pickup),
        "server-between-waves-median-s": med(between),
        "server-push-median-s": med([w.pushed - w.began for w in steady]),
        "messages": len(rows["pull-wait"]),
    }


def run(
    model: str, rounds: int, extra_env: dict[str, str], keep: Path | None, wire_layout: str
) -> dict:
    from flower_llm.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir() if model == "tiny" else common.mid_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="bench-timeline-"))
    try:
        settings = f'fed.wire-layout="{wire_layout}"'
        trace = trace_run(model_dir, rounds, tmp, extra_env, settings)
    finally:
        if keep is not None:
            shutil.copytree(tmp / "deploy" / "logs", keep / "logs", dirs_exist_ok=True)
            if (tmp / "serverapp.log").exists():
                shutil.copy(tmp / "serverapp.log", keep / "serverapp.log")
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = trace["round-seconds"]
    steady = statistics.median(seconds[1:] or seconds)
    return {
        "model": model,
        "rounds": rounds,
        "env": extra_env,
        "wire-layout": wire_layout,
        "round-seconds": seconds,
        "steady-round-s": steady,
        "cpu-s": trace["cpu-s"],
        "clientapp-processes": trace["clientapp-processes"],
        "run-wall-s": trace["run-wall-s"],
        **summarize(trace),
        "headlines": [common.headline("steady deployment round (traced)", f"{steady:.1f} s")],
    }


def to_markdown(result: dict[str, Any]) -> str:
    env = " ".join(f"{k}={v}" for k, v in result["env"].items()) or "(defaults)"
    text = (
        f"Model: {result['model']}, 3 sites with site workers, TLS, 2 local steps, "
        f"{result['rounds']} rounds, fed.wire-layout = {result.get('wire-layout', 'arrays')}; "
        f"settings: {env}.\n\n"
        f"Round seconds: {', '.join(f'{s:.1f}' for s in result['round-seconds'])} "
        f"(steady {result['steady-round-s']:.1f} s).\n\n"
    )
    kinds = result["segments-by-kind-median-s"]
    rows = []
    for name in SEGMENTS:
        lo_hi = result["segments-range-s"].get(name)
        rows.append(
            [
                name,
                *(
                    "-" if kinds.get(k, {}).get(name) is None else f"{kinds[k][name]:.2f}"
                    for k in ("train", "evaluate")
                ),
                "-" if lo_hi is None else f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}",
            ]
        )
    text += "Per message and site, rounds 2 on (median seconds):\n\n"
    text += common.table(["segment", "train", "evaluate", "range"], rows) + "\n"

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    walls = result["wave-wall-median-s"]
    text += (
        f"Wave wall time (push -> all replies at the ServerApp): train {fmt(walls['train'])}, "
        f"evaluate {fmt(walls['evaluate'])}; ServerApp push {fmt(result['server-push-median-s'])}, "
        f"last reply sent -> ServerApp has all {fmt(result['server-pickup-median-s'])}, "
        f"ServerApp between waves {fmt(result['server-between-waves-median-s'])}.\n\n"
    )
    cpu = result["cpu-s"]
    rows = [[k, f"{v:.1f}"] for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])]
    text += (
        f"CPU seconds used during the run ({result['run-wall-s']:.0f} s wall, "
        f"{result['clientapp-processes']} ClientApp processes):\n\n"
    )
    text += common.table(["process", "CPU s"], rows)
    return text


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--model", choices=("tiny", "mid"), default="tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for every deployment process (repeatable)",
    )
    p.add_argument("--keep", type=Path, help="copy the traced logs here")
    p.add_argument(
        "--wire-layout",
        choices=("packed", "arrays"),
        default="packed",
        help="fed.wire-layout of the traced run (packed: one array a record)",
    )
    p.add_argument("--name", default="deployment-timeline", help="result file name")
    args = p.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    common.setup(args.threads)
    common.run_and_finish(
        args.name,
        args,
        lambda: run(args.model, args.rounds, extra, args.keep, args.wire_layout),
        to_markdown,
    )


if __name__ == "__main__":
    main()
