"""Checks the ServerApp runs before anything heavy: is the federation big enough?

A simulation's size (``num-supernodes``) is fixed when it starts, so a run whose
``fed.min-available-clients`` or ``fed.min-train-clients`` exceeds it would wait for
nodes forever; it fails at once instead, with both numbers. A deployment's nodes come
and go, so there the ServerApp waits as Flower does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flower_llm.config import FederationConfig, check_federation_size

log = logging.getLogger(__name__)


def is_simulation(grid: Any) -> bool:
    """Whether ``grid`` (or the grid it wraps) is Flower's in-process simulation grid."""
    inner = getattr(grid, "_grid", grid)
    return type(inner).__name__ == "InMemoryGrid"


def simulated_nodes(grid: Any, *, settle: float = 1.0, limit: float = 20.0) -> int:
    """Number of simulated nodes, once it has not changed for ``settle`` seconds.

    Flower's simulation registers all ``num-supernodes`` nodes together, just after the
    ServerApp thread starts.
    """
    deadline = time.monotonic() + limit
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle:
            break
        time.sleep(0.1)
    return max(count, 0)


def check_simulation_size(grid: Any, fed: FederationConfig) -> None:
    """In a simulation, refuse ``fed.min-*`` above ``num-supernodes`` (ConfigError)."""
    if not is_simulation(grid):
        return
    check_federation_size(fed, simulated_nodes(grid), "num-supernodes of this simulation")
