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

This depends on Flower's layout, so :mod:`tests.test_clientapp_process` pins it: Flower's
console script must still name ``flwr.supernode.cli:flwr_clientapp``, and that function
must be the one in ``flwr.supernode.cli.flwr_clientapp``. If the layout ever differs,
:func:`main` falls back to Flower's own entry point (slower, never broken).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable

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


def main() -> None:
    """Run ``flwr-clientapp`` with the arguments of this process."""
    try:
        flwr_clientapp = load_flwr_clientapp()
    except (ImportError, AttributeError):
        # Flower's layout changed: drop a bare package of ours and take the full import.
        if getattr(sys.modules.get(PACKAGE), "__file__", None) is None:
            sys.modules.pop(PACKAGE, None)
            sys.modules.pop(MODULE, None)
        from flwr.supernode.cli import flwr_clientapp
    flwr_clientapp()


if __name__ == "__main__":
    main()
