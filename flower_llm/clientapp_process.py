"""A faster start for Flower's per-message ClientApp process (``flwr-clientapp``).

A SuperNode's SuperExec starts ``flwr-clientapp`` (found on ``PATH``) once per message.
Flower's console script for it is ``flwr.supernode.cli:flwr_clientapp``, and the package
``flwr.supernode.cli`` imports the whole SuperNode server in its ``__init__`` (flwr 1.42,
``flwr/supernode/cli/__init__.py`` line 18: ``from .flower_supernode import
flower_supernode``: uvicorn, the SQL object store, alembic), which a ClientApp process
never uses. That import is about 0.4 s of CPU (1-2 s of wall time on a busy 2-core
machine) in every message's process.

:func:`main` runs the same function, ``flwr.supernode.cli.flwr_clientapp.flwr_clientapp``,
without executing that package ``__init__``: it registers ``flwr.supernode.cli`` as a bare
package (same directory) before importing the submodule. Nothing else changes: same
arguments, same code, same exit codes. ``scripts/deploy/bin/flwr-clientapp`` calls it; the
deploy scripts put that directory first on the SuperNode's ``PATH``.

It also ends the process without the interpreter's teardown (:func:`end`): by the time
Flower's function exits, it has pushed the reply and the context to the SuperNode and run
its own exit handlers, and what is left is Python freeing every module it imported, about
0.17 s of CPU per message on a 2-core machine (measured: 0.17-0.18 s to exit normally,
0.01 s this way, for a process that imported Flower's runtime and the app). Output is
flushed first and the exit status is the one ``sys.exit`` would give.

This depends on Flower's layout, so :mod:`tests.test_clientapp_process` pins it: Flower's
console script must still name ``flwr.supernode.cli:flwr_clientapp``, and that function
must be the one in ``flwr.supernode.cli.flwr_clientapp``. If the layout ever differs,
:func:`main` falls back to Flower's own entry point (slower, never broken).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable
from typing import NoReturn

PACKAGE = "flwr.supernode.cli"
MODULE = "flwr.supernode.cli.flwr_clientapp"
ENTRY_POINT = "flwr.supernode.cli:flwr_clientapp"
"""Flower's console script for ``flwr-clientapp`` that :func:`main` stands in for."""


def load_flwr_clientapp() -> Callable[[], None]:
    """Flower's ``flwr_clientapp`` function, imported without the SuperNode server."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{PACKAGE} is not a package")
        package = types.ModuleType(PACKAGE)
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = PACKAGE
        package.__spec__ = spec
        sys.modules[PACKAGE] = package
    module = importlib.import_module(MODULE)
    function: Callable[[], None] = module.flwr_clientapp
    return function


def run() -> object:
    """Run ``flwr-clientapp`` with the arguments of this process; the exit code it gives
    (``SystemExit``'s, or 0 if it returns)."""
    try:
        flwr_clientapp = load_flwr_clientapp()
    except (ImportError, AttributeError):
        # Flower's layout changed: drop a bare package of ours and take the full import.
        if getattr(sys.modules.get(PACKAGE), "__file__", None) is None:
            sys.modules.pop(PACKAGE, None)
            sys.modules.pop(MODULE, None)
        from flwr.supernode.cli import flwr_clientapp
    try:
        flwr_clientapp()
    except SystemExit as stop:
        return stop.code
    return 0


def end(code: object) -> NoReturn:
    """Exit as ``sys.exit(code)`` would (None: 0; an int: itself; anything else printed
    to stderr, then 1), after flushing logging and both streams, but without the
    interpreter's teardown (module by module freeing: most of a short process's exit)."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a closed pipe
            stream.flush()
    os._exit(status)


def main() -> NoReturn:
    """``flwr-clientapp``: :func:`run`, then :func:`end`."""
    end(run())


if __name__ == "__main__":
    main()
