"""Timeline tracing for ``benchmarks.deployment_timeline`` (never on a real deployment).

Put on ``PYTHONPATH`` of every process of a local deployment, Python imports this module
at start-up in each of them (SuperLink, SuperNodes, SuperExecs, each ClientApp, the
ServerApp, the site workers). It only observes and writes ``@@ <epoch> pid=<pid> ...``
lines to stderr (which the deploy scripts log):

- every log record (Flower's and ours) gets that prefix, so all logs share one clock;
- ``START`` when the interpreter is up, with ``lag``: seconds since the kernel started
  the process (/proc/self/stat), and ``EXIT`` with the process's CPU seconds;
- ``IMPORTBEGIN`` when the ClientApp module starts to import, ``UNIXCONNECT`` when a
  process connects to a Unix socket (the relay reaching its site worker);
- ``GRID_PUSH`` / ``GRID_PULL`` from the ServerApp's grid (wrapped around the grid that
  ``strategies.rounds.PollingGrid`` polls): when a wave of messages was pushed, when
  replies came back.
"""

import atexit
import importlib.util
import logging
import os
import socket
import sys
import time

_PID = os.getpid()


def _cmdline() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
        return " ".join(a.decode(errors="replace") for a in args[:3])
    except OSError:
        return "?"


def _start_lag() -> float:
    """Seconds between the kernel starting this process and now."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return -1.0


def _write(text: str) -> None:
    try:
        sys.stderr.write(f"@@ {time.time():.3f} pid={_PID} {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


_CMD = _cmdline()
_write(f"START lag={_start_lag():.3f} cmd={_CMD}")


def _at_exit() -> None:
    t = os.times()
    _write(f"EXIT cpu={t.user + t.system:.3f} cmd={_CMD}")


atexit.register(_at_exit)

_format = logging.Formatter.format


def _stamped_format(self: logging.Formatter, record: logging.LogRecord) -> str:
    return f"@@ {record.created:.3f} pid={_PID} " + _format(self, record)


logging.Formatter.format = _stamped_format  # type: ignore[method-assign]

_connect = socket.socket.connect


def _traced_connect(self: socket.socket, address: object) -> None:
    if self.family == socket.AF_UNIX:
        _write(f"UNIXCONNECT {address}")
    _connect(self, address)  # type: ignore[arg-type]


socket.socket.connect = _traced_connect  # type: ignore[method-assign]


class _GridProbe:
    """Delegates to a grid; logs when pushes end and when pulls return replies."""

    def __init__(self, grid: object) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        began = time.time()
        ids = list(self._grid.push_messages(messages))  # type: ignore[attr-defined]
        kind = messages[0].metadata.message_type if messages else "-"
        _write(f"GRID_PUSH n={len(ids)} type={kind} began={began:.3f}")
        return ids

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        began = time.time()
        replies = list(self._grid.pull_messages(ids))  # type: ignore[attr-defined]
        if replies:
            _write(f"GRID_PULL n={len(replies)} began={began:.3f}")
        return replies


class _Finder:
    """Notes the ClientApp's import; wraps PollingGrid's grid when strategies.rounds loads."""

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name in ("client_apps", "client_apps.qlora"):
            _write(f"IMPORTBEGIN {name}")
            return None
        if name != "strategies.rounds":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def traced_exec_module(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            init = module.PollingGrid.__init__

            def probed_init(grid_self, grid, *args, **kwargs):  # type: ignore[no-untyped-def]
                init(grid_self, _GridProbe(grid), *args, **kwargs)

            module.PollingGrid.__init__ = probed_init

        spec.loader.exec_module = traced_exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _Finder())
