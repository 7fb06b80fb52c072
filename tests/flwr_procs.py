"""Start and stop real Flower processes from tests, the way a user does.

Every test gets its own ``FLWR_HOME``; the local SuperLink that ``flwr run`` starts in the
background is found by the log file it writes under that home and stopped by PID.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def flwr_env(flwr_home: Path, cache: Path | None = None) -> dict[str, str]:
    """Environment for Flower commands: isolated home, no per-run installs, offline hub."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "pyproject-flwr.toml", flwr_home / "config.toml")
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    # Each FLWR_HOME (each test) gets its own local SuperLink ports, kept in the home: a
    # `flwr run . local` elsewhere on the machine never reaches this test's SuperLink.
    ports_file = flwr_home / "local-ports"
    if not ports_file.exists():
        ports_file.write_text(" ".join(map(str, free_ports(2))))
    http, control = ports_file.read_text().split()
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=http, FLWR_LOCAL_CONTROL_API_PORT=control)
    if cache is not None:
        env["FLOWER_LLM_CACHE"] = str(cache)
    return env


def local_superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the local SuperLink processes started for ``flwr_home``."""
    marker = str(flwr_home / "local-superlink" / "superlink.log")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if any("flower-superlink" in a for a in args[:2]) and marker in args:
            pids.append(int(proc.name))
    return pids


def stop_pids(pids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``timeout``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # gone between the two reads
                break
            if "zombie" in status:
                break
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def flwr_run(
    flwr_home: Path,
    *,
    run_config: str,
    num_supernodes: int,
    timeout: float,
    cache: Path | None = None,
    profile: str = "local",
    extra: list[str] | None = None,
    app: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``flwr run . <profile> --stream`` from ``app`` (default: ``project_copy()``); output
    captured."""
    cmd = [
        str(BIN / "flwr"),
        "run",
        ".",
        profile,
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
        "--run-config",
        run_config,
        *(extra or []),
    ]
    return subprocess.run(
        cmd,
        cwd=app or project_copy(),
        env=flwr_env(flwr_home, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------------------
# Deployments: a SuperLink and SuperNodes started by scripts/deploy/, found by PID
# --------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` consecutive TCP ports on 127.0.0.1 that nothing listens on right now.

    They are drawn below the kernel's ephemeral range (``ip_local_port_range``), from which
    every outgoing connection takes its local port: a port drawn from inside it can be
    taken by, say, one SuperNode's connection to the SuperLink between this check and the
    next SuperNode binding it (a deployment fixture failed that way once).
    """
    import random
    import socket

    low, high = _ephemeral_range()
    # 10000 up to the range's start; above its end where the range starts too low for that.
    start, stop = (10000, low) if low >= 11000 + count else (high + 1, 65536)
    for _ in range(200):
        first = random.randint(start, stop - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(first, first + count))
    raise RuntimeError(f"no {count} consecutive free ports found outside {low}-{high}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def add_connection(flwr_home: Path, name: str, address: str, root_certificates: Path) -> None:
    """Append a ``[superlink.<name>]`` connection to ``$FLWR_HOME/config.toml``."""
    with (flwr_home / "config.toml").open("a") as fh:
        fh.write(
            f'\n[superlink.{name}]\naddress = "{address}"\n'
            f'root-certificates = "{root_certificates}"\n'
        )


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # Field 4 of /proc/<pid>/stat is the parent; the name before it may hold spaces.
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(proc.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' if it is gone)."""
    try:
        return (Path(f"/proc/{pid}") / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants_running(pid: int, program: str) -> list[int]:
    """Live (non-zombie) descendants of ``pid`` whose command line names ``program``."""
    found = []
    for child in descendants(pid):
        try:
            state = (Path(f"/proc/{child}") / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and program in cmdline(child):
            found.append(child)
    return found


def read_pid_file(path: Path) -> dict[str, int]:
    """``{name: pid}`` from a pid file of "name pid" lines (scripts/deploy/)."""
    pids = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, pid = line.split()
            pids[name] = int(pid)
    return pids


APP_PARTS = ("flower_llm", "strategies", "client_apps", "server_apps", "tests")
APP_FILES = ("pyproject.toml", "LICENSE", "README.md")


def copy_app(dest: Path) -> Path:
    """The Flower App's parts of this checkout (no .venv, caches or outputs) under ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for part in APP_PARTS:
        shutil.copytree(ROOT / part, dest / part, ignore=ignore)
    for name in APP_FILES:
        shutil.copy(ROOT / name, dest / name)
    return dest


@functools.cache
def project_copy() -> Path:
    """One copy of the App per test process, for ``flwr run .`` to build.

    ``flwr run .`` walks every file under the directory before it applies .gitignore: in a
    checkout with its .venv that is ~75,000 files and 10-25 s of every run (measured on a
    2-core machine). The FAB built from the copy holds the same files.
    """
    dest = Path(tempfile.mkdtemp(prefix="flower-llm-app-"))
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    return copy_app(dest / "app")


def app_with_clientapp(dest: Path, clientapp: str) -> Path:
    """A copy of this project under ``dest/app`` whose ClientApp is ``clientapp``.

    For e2e tests with sites that misbehave: the ServerApp and everything else are the
    project's own, and ``flwr run`` builds the copy like any Flower App.
    """
    app = copy_app(dest / "app")
    pyproject = (ROOT / "pyproject.toml").read_text()
    ours = 'clientapp = "client_apps.qlora:app"'
    assert ours in pyproject
    (app / "pyproject.toml").write_text(pyproject.replace(ours, f'clientapp = "{clientapp}"'))
    return app
