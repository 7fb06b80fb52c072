"""Who takes part in a round: waiting for sites, and the two samplers.

Flower's own helper waits for nodes without a time limit and samples with Python's global
``random``; here waiting ends after ``fed.round-timeout`` with an error that says so, and
every draw comes from a stream the caller owns (:mod:`flower_llm.streams`).

A sampler names the sampling it performs (:attr:`Sampler.kind`): a DP accountant composes
the Poisson-subsampled Gaussian, and :class:`strategies.dp.CentralDP` refuses to account
a round drawn by anything but a :class:`PoissonSampler` of its own rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

NODE_POLL_SECONDS = 0.5


class NotEnoughNodes(RuntimeError):
    """Fewer sites connected than a round needs, for longer than the round timeout."""


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """The connected node ids (sorted) once at least ``min_nodes`` are; wait ``timeout`` s."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if time.monotonic() >= deadline:
            raise NotEnoughNodes(
                f"{len(nodes)} sites connected after waiting fed.round-timeout = {timeout:g} s, "
                f"fewer than the {min_nodes} the round needs (fed.min-available-clients)"
            )
        if not announced:
            log.info("Waiting for sites: %d connected, %d needed", len(nodes), min_nodes)
            announced = True
        time.sleep(min(NODE_POLL_SECONDS, max(0.0, deadline - time.monotonic())))


class Sampler(Protocol):
    """Draws a round's cohort from the connected nodes."""

    kind: str
    """``"poisson"`` or ``"fixed-size"``: the sampling event an accountant must compose."""

    def sample(self, nodes: Sequence[int], rng: np.random.Generator) -> list[int]:
        """The cohort, sorted."""
        ...


class PoissonSampler:
    """Each node takes part independently with probability ``rate`` (cohort size varies)."""

    kind = "poisson"

    def __init__(self, rate: float) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"Poisson sampling rate must be in (0, 1], got {rate!r}")
        self.rate = float(rate)

    def sample(self, nodes: Sequence[int], rng: np.random.Generator) -> list[int]:
        """One uniform draw per node, in node order (a repeatable sequence of draws)."""
        ordered = sorted(nodes)
        draws = rng.random(len(ordered))
        return [node for node, u in zip(ordered, draws, strict=True) if u < self.rate]


class FixedSizeSampler:
    """``max(int(fraction * N), min_nodes)`` nodes, uniformly without replacement."""

    kind = "fixed-size"

    def __init__(self, fraction: float, min_nodes: int) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"sampling fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.min_nodes = int(min_nodes)

    def size(self, num_nodes: int) -> int:
        """Cohort size out of ``num_nodes`` (all of them if fewer than the minimum)."""
        return min(num_nodes, max(int(num_nodes * self.fraction), self.min_nodes))

    def sample(self, nodes: Sequence[int], rng: np.random.Generator) -> list[int]:
        """A uniform subset of :meth:`size` nodes."""
        ordered = sorted(nodes)
        chosen = rng.choice(len(ordered), size=self.size(len(ordered)), replace=False)
        return sorted(ordered[int(i)] for i in chosen)
