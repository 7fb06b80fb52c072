"""Weighted FedAvg over LoRA adapters that survives bad clients.

Flower's ``FedAvg`` raises ``InconsistentMessageReplies`` on one malformed reply, which
ends the whole ServerApp. Here each reply is checked on its own (keys, shapes, dtypes,
NaN/Inf, weight); a bad one is dropped with a logged reason, and a round left with too
few valid replies keeps the previous global adapter instead of failing the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flower_llm import wire
from flower_llm.adapters import AdapterState
from flower_llm.aggregation import non_finite_key, update_problem, weighted_average

log = logging.getLogger(__name__)

WEIGHT_KEYS = {"examples": wire.NUM_EXAMPLES, "tokens": wire.NUM_TOKENS}


@dataclass
class RoundReport:
    """Who took part in a round and what happened to their replies."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    """node id -> reason its reply was not used."""
    bytes_down: int = 0
    bytes_up: int = 0
    updated: bool = False
    """Whether the global adapter changed this round."""


@dataclass
class ValidReply:
    """A train reply that passed every check."""

    node_id: int
    state: AdapterState
    """Read-only views of the reply's arrays, as sent (float32 or float16)."""
    weight: float
    metrics: MetricRecord
    content: RecordDict
    """The whole reply, for records beyond the adapter (a local-only baseline, say)."""


class WeightedFedAvg(FedAvg):
    """FedAvg of adapter states, ``w = sum_k (n_k / n) * w_k``, with per-reply validation.

    Parameters
    ----------
    weighting : str
        ``"examples"`` weighs each client by ``num-examples``; ``"tokens"`` by the
        response tokens it trained on (``num-tokens``).
    fraction_train, fraction_evaluate : float
        Fractions of connected nodes sampled per round.
    min_train_clients : int
        Valid replies needed to update the global adapter; fewer keeps the previous one.
    min_evaluate_clients, min_available_clients : int
        As Flower's ``min_evaluate_nodes`` and ``min_available_nodes``.
    """

    def __init__(
        self,
        *,
        weighting: str = "examples",
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_clients: int = 2,
        min_evaluate_clients: int = 1,
        min_available_clients: int = 2,
    ) -> None:
        if weighting not in WEIGHT_KEYS:
            raise ValueError(f"weighting must be one of {sorted(WEIGHT_KEYS)}, got {weighting!r}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_clients,
            min_evaluate_nodes=min_evaluate_clients,
            min_available_nodes=min_available_clients,
            weighted_by_key=WEIGHT_KEYS[weighting],
            arrayrecord_key=wire.ARRAYS,
            configrecord_key=wire.CONFIG,
        )
        self.weighting = weighting
        self.min_train_clients = min_train_clients
        self.reference: AdapterState | None = None
        self.report = RoundReport()
        self.last_valid: list[ValidReply] = []
        self.instructions: list[Message] = []
        """The last round's train messages (the Grid gives them their ids when it sends)."""

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info(
            "WeightedFedAvg: weighting by %s, fraction train %.2f / evaluate %.2f, "
            "min valid train replies %d",
            self.weighting,
            self.fraction_train,
            self.fraction_evaluate,
            self.min_train_clients,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and remember the adapter they start from."""
        self.reference = wire.from_array_record(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.instructions = messages
        self.report = RoundReport(
            sampled=[m.metadata.dst_node_id for m in messages],
            bytes_down=wire.num_bytes(arrays) * len(messages),
        )
        return messages

    # ----------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------

    def check_reply(self, reply: Message, check_finite: bool = True) -> ValidReply | str:
        """A :class:`ValidReply`, or the reason ``reply`` cannot be aggregated.

        ``check_finite=False`` skips the NaN/Inf scan of every value (see
        :meth:`aggregate_train`, which checks the aggregate instead).
        """
        if reply.has_error():
            return f"client error: {reply.error.reason}"
        content = reply.content
        if wire.ARRAYS not in content.array_records:
            return f"no ArrayRecord '{wire.ARRAYS}'"
        if wire.METRICS not in content.metric_records:
            return f"no MetricRecord '{wire.METRICS}'"
        metrics = content.metric_records[wire.METRICS]
        if self.weighted_by_key not in metrics:
            return f"metric '{self.weighted_by_key}' missing"
        weight = metrics[self.weighted_by_key]
        try:
            state = wire.array_views(content.array_records[wire.ARRAYS])
        except (ValueError, TypeError) as err:
            return f"unreadable adapter: {err}"
        assert self.reference is not None, "configure_train sets the reference"
        problem = update_problem(
            state,
            self.reference,
            weight,  # type: ignore[arg-type]
            check_finite=check_finite,
        )
        if problem is not None:
            return problem
        return ValidReply(reply.metadata.src_node_id, state, float(weight), metrics, content)  # type: ignore[arg-type]

    def valid_replies(
        self, replies: Iterable[Message], check_finite: bool = True
    ) -> list[ValidReply]:
        """Check every reply, log and record the dropped ones."""
        valid: list[ValidReply] = []
        # For a node that stopped heartbeating, the SuperLink itself replies with an error
        # (src = the SuperLink): attribute it to the node the instruction went to.
        addressed = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in self.instructions
            if m.metadata.message_id  # set by the Grid when it sends
        }
        for reply in replies:
            self.report.bytes_up += (
                sum(wire.num_bytes(r) for r in reply.content.array_records.values())
                if not reply.has_error()
                else 0
            )
            checked = self.check_reply(reply, check_finite)
            if isinstance(checked, str):
                node = addressed.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                log.warning("Dropping reply of node %d: %s", node, checked)
                self.report.dropped[node] = checked
            else:
                valid.append(checked)
        replied = {r.node_id for r in valid} | set(self.report.dropped)
        for node in self.report.sampled:
            if node not in replied:
                self.report.dropped[node] = "no reply before the round timeout"
                log.warning("Node %d did not reply before the round timeout", node)
        # Replies arrive in any order; summing them in node order makes the aggregate
        # bit-for-bit repeatable (a one-ulp difference grows through bf16 training and
        # AdamW into visibly different adapters, so a resumed run would drift).
        valid.sort(key=lambda r: r.node_id)
        self.report.accepted = [r.node_id for r in valid]
        self.last_valid = valid
        return valid

    # ----------------------------------------------------------------------------------
    # Aggregation
    # ----------------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the valid replies, or None to keep the previous adapter.

        Replies are averaged as read-only views of their bytes, and NaN/Inf is checked
        once, on the aggregate: it is finite exactly when every reply is (see
        :func:`flower_llm.aggregation.update_problem`). Only when it is not are the
        replies scanned one by one, the offenders dropped and logged, and the rest
        averaged again.
        """
        valid = self.valid_replies(replies, check_finite=False)
        state = self.average(valid)
        if state is not None and non_finite_key(state) is not None:
            valid = self.drop_non_finite(valid)
            state = self.average(valid)
        if state is None:
            log.warning(
                "Round %d: %d valid replies, fewer than fed.min-train-clients = %d; "
                "keeping the previous global adapter",
                server_round,
                len(valid),
                self.min_train_clients,
            )
            return None, None
        self.report.updated = True
        return wire.to_array_record(state), self.aggregate_train_metrics(valid)

    def average(self, valid: list[ValidReply]) -> AdapterState | None:
        """Weighted average of ``valid``, or None when fewer than the minimum replied."""
        if len(valid) < self.min_train_clients or not valid:
            return None
        return weighted_average([r.state for r in valid], [r.weight for r in valid])

    def drop_non_finite(self, valid: list[ValidReply]) -> list[ValidReply]:
        """``valid`` without the replies holding NaN or Inf, each dropped with its reason."""
        kept: list[ValidReply] = []
        for reply in valid:
            key = non_finite_key(reply.state)
            if key is None:
                kept.append(reply)
                continue
            reason = f"'{key}' holds NaN or Inf"
            log.warning("Dropping reply of node %d: %s", reply.node_id, reason)
            self.report.dropped[reply.node_id] = reason
        self.report.accepted = [r.node_id for r in kept]
        self.last_valid = kept
        return kept

    def aggregate_train_metrics(self, valid: list[ValidReply]) -> MetricRecord:
        """Weighted mean of scalar metrics; sums of counts; the maximum of any epsilon."""
        total = sum(r.weight for r in valid)
        out = MetricRecord()
        for key in (wire.NUM_EXAMPLES, wire.NUM_TOKENS):
            counts: list[int] = [int(r.metrics.get(key, 0)) for r in valid]  # type: ignore[arg-type]
            out[key] = sum(counts)
        # A privacy guarantee is only as strong as its weakest site: report the worst
        # epsilon of any replying site, never an average that would understate it.
        reported = set().union(*(set(r.metrics) for r in valid))
        for key in sorted(k for k in reported if k.endswith("epsilon")):
            values = [r.metrics[key] for r in valid if key in r.metrics]
            if all(isinstance(v, int | float) for v in values):
                out[key] = max(float(v) for v in values)  # type: ignore[arg-type]
        shared = set.intersection(*(set(r.metrics) for r in valid)) - {
            wire.NUM_EXAMPLES,
            wire.NUM_TOKENS,
            *(k for k in reported if k.endswith("epsilon")),
        }
        for key in sorted(shared):
            values = [r.metrics[key] for r in valid]
            if all(isinstance(v, int | float) for v in values):
                weighted = (float(v) * r.weight / total for v, r in zip(values, valid, strict=True))  # type: ignore[arg-type]
                out[key] = sum(weighted)
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Token-weighted held-out loss and accuracy; perplexity from the pooled loss."""
        return aggregate_eval_replies(replies)


def aggregate_eval_replies(replies: Iterable[Message]) -> MetricRecord | None:
    """Pool evaluation replies as if all held-out tokens were one set.

    Replies with errors or without the expected metrics are skipped with a log line.
    """
    import math

    loss_sum = acc_sum = 0.0
    tokens = examples = clients = 0
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("Evaluation reply of node %d is an error: %s", node, reply.error.reason)
            continue
        metrics = reply.content.metric_records.get(wire.METRICS)
        needed = (wire.EVAL_LOSS, wire.EVAL_TOKENS, wire.EVAL_TOKEN_ACCURACY, wire.NUM_EXAMPLES)
        missing = [k for k in needed if metrics is None or k not in metrics]
        if metrics is None or missing:
            log.warning("Evaluation reply of node %d lacks metrics %s; skipped", node, missing)
            continue
        loss, n_tok = float(metrics[wire.EVAL_LOSS]), int(metrics[wire.EVAL_TOKENS])  # type: ignore[arg-type]
        if not math.isfinite(loss) or n_tok <= 0:
            log.warning(
                "Evaluation reply of node %d has loss %s on %d tokens; skipped", node, loss, n_tok
            )
            continue
        loss_sum += loss * n_tok
        acc_sum += float(metrics[wire.EVAL_TOKEN_ACCURACY]) * n_tok  # type: ignore[arg-type]
        tokens += n_tok
        examples += int(metrics[wire.NUM_EXAMPLES])  # type: ignore[arg-type]
        clients += 1
    if tokens == 0:
        return None
    loss = loss_sum / tokens
    return MetricRecord(
        {
            wire.EVAL_LOSS: loss,
            wire.EVAL_PERPLEXITY: math.exp(min(loss, 50.0)),
            wire.EVAL_TOKEN_ACCURACY: acc_sum / tokens,
            wire.EVAL_TOKENS: tokens,
            wire.NUM_EXAMPLES: examples,
            "clients": clients,
        }
    )
