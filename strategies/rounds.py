"""The one round loop of every run: train, evaluate, record; one callback per round.

Flower's ``Strategy.start`` owns a similar loop but offers no hook between rounds, and
everything a user cares about happens there: saving the adapter, appending metrics,
accounting privacy, checkpointing for resume. Every aggregation mode goes through
:func:`federate`; a mode only says how one round gets from the global adapter to the
next (:class:`RoundMode`):

- :class:`MessageRounds`: a Message-API strategy (``WeightedFedAvg``, or the DP-FedAvg
  wrapper around it) samples, sends, validates and aggregates the replies;
- :class:`strategies.secagg.SecAggRounds`: Flower's SecAgg+ workflow for that round.

Evaluation, the round's result and everything downstream of it (outputs, checkpoint,
summary: ``server_apps.fedavg``) are the same for all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from flower_llm import wire
from flower_llm.updates import InitialRecipe
from strategies.dp import CentralDP, DifferentialPrivacyFedAvg
from strategies.fedavg import RoundReport, ValidReply, WeightedFedAvg

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


@dataclass
class TrainRound:
    """What a mode's round produced, before evaluation."""

    arrays: ArrayRecord | None
    """The new global adapter; None keeps the previous one."""
    metrics: MetricRecord | None
    report: RoundReport
    columns: dict[str, Any] = field(default_factory=dict)
    """The mode's own metrics-row columns (DP, SecAgg+), named in flower_llm.metrics."""


class RoundMode(Protocol):
    """How one round gets from the global adapter to the next."""

    aggregation: str
    """``fedavg`` or ``secagg+``: the metrics row's ``aggregation``."""
    central: CentralDP | None
    """The client-level DP component, if the run has one."""

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Sample, exchange and aggregate one round from ``arrays``."""
        ...

    def evaluate_round(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> MetricRecord | None:
        """Pooled evaluation metrics of ``arrays`` (None if no site answered)."""
        ...

    def last_valid(self) -> list[ValidReply]:
        """The last round's validated individual replies (none under SecAgg+)."""
        ...

    def use_initial(self, arrays: ArrayRecord, recipe: InitialRecipe) -> None:
        """Send sites an ``initial`` instruction instead of ``arrays``, the run's seeded
        initial adapter, while it is the global one (``fed.initial-from-seed``)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state a checkpoint keeps."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        ...

    def close(self) -> None:
        """Release what the mode holds (threads)."""
        ...


def evaluate_with(
    strategy: WeightedFedAvg, server_round: int, arrays: ArrayRecord, grid: Grid, timeout: float
) -> MetricRecord | None:
    """One evaluation exchange: sample from the eval stream, send, pool the replies."""
    # Sites answer their task files too (eval.tasks decides at the site).
    config = ConfigRecord(
        {wire.SERVER_ROUND: server_round, wire.EVAL_TASKS: True, wire.SITE_LABEL: True}
    )
    messages = strategy.configure_evaluate(server_round, arrays, config, grid)
    replies = grid.send_and_receive(messages, timeout=timeout)
    return strategy.aggregate_evaluate(server_round, replies)


class MessageRounds:
    """Rounds on the Message API: a strategy samples, sends, validates and aggregates.

    Parameters
    ----------
    strategy : WeightedFedAvg or DifferentialPrivacyFedAvg
        The aggregation (its DP wrapper outermost, so everything downstream sees the
        noised adapter only).
    timeout : float
        ``fed.round-timeout``: how long each exchange waits for replies.
    """

    aggregation = "fedavg"

    def __init__(
        self, strategy: WeightedFedAvg | DifferentialPrivacyFedAvg, timeout: float
    ) -> None:
        self.strategy = strategy
        self.timeout = timeout
        self.central = strategy.central if isinstance(strategy, DifferentialPrivacyFedAvg) else None
        self._inner = (
            strategy.strategy if isinstance(strategy, DifferentialPrivacyFedAvg) else strategy
        )
        self._pending_downlink: dict[str, Any] | None = None

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """configure_train, one exchange, aggregate_train."""
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        new_arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        columns: dict[str, Any] = {}
        if self.central is not None and self.central.last_round is not None:
            columns.update(self.central.last_round.as_row())
        return TrainRound(new_arrays, metrics, self.strategy.report, columns)

    def evaluate_round(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> MetricRecord | None:
        """The wrapped strategy's evaluation."""
        return evaluate_with(self._inner, server_round, arrays, grid, self.timeout)

    def last_valid(self) -> list[ValidReply]:
        """The last round's validated replies."""
        return self._inner.last_valid

    def use_initial(self, arrays: ArrayRecord, recipe: InitialRecipe) -> None:
        """Train and evaluation messages both (the wrapped strategy sends them)."""
        self._inner.use_initial(arrays, recipe)

    def state_dict(self) -> dict[str, Any]:
        """The DP wrapper's state and the compressed downlink's (nothing without either)."""
        state: dict[str, Any] = {}
        if isinstance(self.strategy, DifferentialPrivacyFedAvg):
            state["dp"] = self.strategy.state_dict()
        if self._inner.downlink is not None:
            state["downlink"] = self._inner.downlink.state_dict()
        return state

    def state_arrays(self) -> dict[str, Any]:
        """The downlink's error-feedback residual (checkpoint tensors)."""
        downlink = self._inner.downlink
        return downlink.state_arrays() if downlink is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        state = dict(state)
        downlink = state.pop("downlink", None)
        if (downlink is None) != (self._inner.downlink is None):
            raise ValueError("the checkpoint and this run differ in fed.wire-dtype compression")
        self._pending_downlink = downlink
        if isinstance(self.strategy, DifferentialPrivacyFedAvg):
            if "dp" not in state:
                raise ValueError("the checkpoint holds no DP state but this run has DP")
            self.strategy.load_state_dict(state["dp"])
        elif state:
            raise ValueError("the checkpoint holds DP state but this run has no DP")

    def load_state_arrays(self, arrays: dict[str, Any]) -> None:
        """The downlink's residual, after :meth:`load_state_dict`."""
        if self._inner.downlink is not None and self._pending_downlink is not None:
            self._inner.downlink.load_state(self._pending_downlink, arrays)

    def close(self) -> None:
        """Nothing to release."""


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
    columns: dict[str, Any] = field(default_factory=dict)
    """The mode's own columns for the metrics row."""


def federate(
    mode: RoundMode,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
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
        log.info("[ROUND %d/%d] %s", server_round, num_rounds, mode.aggregation)
        trained = mode.train_round(server_round, arrays, train_config(server_round), grid)
        if trained.arrays is not None:
            arrays = trained.arrays
        eval_metrics = (
            mode.evaluate_round(server_round, arrays, grid) if evaluate(server_round) else None
        )
        result = RoundResult(
            server_round=server_round,
            arrays=arrays,
            train_metrics=trained.metrics,
            eval_metrics=eval_metrics,
            report=trained.report,
            seconds=time.perf_counter() - start,
            columns=trained.columns,
        )
        if on_round_end(result):
            log.info("Stopping after round %d", server_round)
            break
    return arrays
