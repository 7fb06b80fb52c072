"""The round loop: train, aggregate, evaluate, record; one callback per finished round.

Flower's ``Strategy.start`` owns a similar loop but offers no hook between rounds, and
everything a user cares about happens there: saving the adapter, appending metrics,
accounting privacy, checkpointing for resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from flower_llm import wire
from strategies.fedavg import RoundReport

log = logging.getLogger(__name__)


REPLY_POLL_SECONDS = 0.25
"""How often :class:`PollingGrid` asks the SuperLink for replies."""


class PollingGrid:
    """A ``Grid`` that collects replies every 0.25 s instead of every 3 s.

    Flower's SuperLink-backed grid sleeps 3 s between pulls in ``send_and_receive``, so
    each wave of messages (train, evaluate, each SecAgg+ stage) waits 1.5 s on average
    after its last reply arrived. Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Any, poll_seconds: float = REPLY_POLL_SECONDS) -> None:
        self._grid = grid
        self.poll_seconds = poll_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push ``messages``; return the replies that arrive within ``timeout`` seconds."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            wait = self.poll_seconds
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            time.sleep(wait)
        return replies


class RoundStrategy(Protocol):
    """What the loop needs: ``WeightedFedAvg`` and the wrappers around it (DP-FedAvg)."""

    @property
    def report(self) -> RoundReport:
        """Who took part in the last round and what happened to their replies."""
        ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Instructions of a training round."""
        ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global adapter (None keeps the previous one) and train metrics."""
        ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Instructions of an evaluation round."""
        ...

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Pooled evaluation metrics."""
        ...


@dataclass
class RoundResult:
    """Everything known about a finished round."""

    server_round: int
    arrays: ArrayRecord
    """The global adapter after the round (unchanged if the round did not update it)."""
    train_metrics: MetricRecord | None
    eval_metrics: MetricRecord | None
    report: RoundReport
    seconds: float


def federate(
    strategy: RoundStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    timeout: float,
    train_config: Callable[[int], ConfigRecord],
    on_round_end: Callable[[RoundResult], bool | None],
    evaluate: Callable[[int], bool] = lambda _round: True,
) -> ArrayRecord:
    """Run rounds ``first_round .. num_rounds``; return the final global adapter.

    ``train_config(round)`` gives the instruction config of a round (its learning rate,
    for instance). ``evaluate(round)``, asked once the round's update is aggregated, says
    whether the sites evaluate it (a round that is not evaluated has no eval metrics).
    ``on_round_end`` sees each finished round; returning True stops the run early (a
    privacy budget about to be exceeded, say).
    """
    for server_round in range(first_round, num_rounds + 1):
        start = time.perf_counter()
        log.info("[ROUND %d/%d]", server_round, num_rounds)
        messages = strategy.configure_train(server_round, arrays, train_config(server_round), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays

        eval_metrics = None
        if evaluate(server_round):
            eval_config = ConfigRecord({wire.SERVER_ROUND: server_round})
            eval_messages = strategy.configure_evaluate(server_round, arrays, eval_config, grid)
            eval_replies = grid.send_and_receive(eval_messages, timeout=timeout)
            eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)

        result = RoundResult(
            server_round=server_round,
            arrays=arrays,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            report=strategy.report,
            seconds=time.perf_counter() - start,
        )
        if on_round_end(result):
            log.info("Stopping after round %d", server_round)
            break
    return arrays
