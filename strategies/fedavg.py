"""Weighted FedAvg over LoRA adapters that survives bad and hostile clients.

Flower's ``FedAvg`` raises ``InconsistentMessageReplies`` on one malformed reply, which
ends the whole ServerApp. Here each reply is checked on its own: who sent it (a node
sampled this round, once), its structure (keys, shapes, dtypes, weight) and its values
against bounds (float32 range, NaN/Inf, ``fed.max-weight``, the per-value update bound,
``fed.max-update-norm``; see :mod:`flower_llm.aggregation`). A bad reply is dropped with
its reason (or clamped, if asked), the rest are aggregated exactly as if it had never
been sent, and a round left with too few valid replies keeps the previous global adapter
instead of failing the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flower_llm import metrics as columns
from flower_llm import wire
from flower_llm.aggregation import (
    COMPRESSED_FORMATS,
    ReplyBounds,
    bound_reply,
    checked_aggregate,
    derive_max_weight,
    derive_update_bound,
    eval_metrics_problem,
    metric_problem,
    non_finite_key,
    robust_aggregate,
    update_problem,
)
from flower_llm.compression import WIRE_FORMAT, Header, WireFormatError, decode, digest
from flower_llm.config import ROBUST_RULES, WIRE_LAYOUTS, RunConfig
from flower_llm.lora_aggregation import (
    LORA_AGGREGATIONS,
    exact_average,
    rank_of,
    sent_keys,
    to_rank,
)
from flower_llm.tasks import pool_task_metrics
from flower_llm.updates import Downlink, Held, InitialRecipe, initial_message
from strategies.sampling import FixedSizeSampler, wait_for_nodes

if TYPE_CHECKING:
    from flower_llm.adapters import AdapterState  # torch-free at run time

log = logging.getLogger(__name__)

WEIGHT_KEYS: dict[str, str | None] = {
    "examples": wire.NUM_EXAMPLES,
    "tokens": wire.NUM_TOKENS,
    "seen": wire.NUM_EXAMPLES_SEEN,
    "uniform": None,
}
"""``fed.weighting`` -> the reply metric that holds a site's weight (None: every site 1)."""

UpdateBound = Callable[[int, float], float | None]
"""(server round, largest |value| of the global adapter) -> per-value update bound."""


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
    refused: list[str] = field(default_factory=list)
    """Replies refused for who sent them (a node not sampled, a second reply), with why."""
    clamped: dict[int, list[str]] = field(default_factory=dict)
    """node id -> what was clamped in its (accepted) reply."""
    lora_error: float | None = None
    """``lora.aggregation = exact``: relative Frobenius truncation error of the round."""
    bytes_down_eval: int = 0
    """Bytes of the adapters sent for evaluation (this round's, and round 0's in round 1)."""
    bytes_by_node: dict[int, list[int]] = field(default_factory=dict)
    """node id -> [bytes sent to it, bytes received from it] in train and evaluation."""
    site_labels: dict[int, str] = field(default_factory=dict)
    """node id -> the label its replies give it (when they give one)."""

    def note_label(self, node: int, reply: Message) -> None:
        """Remember the site label a reply carries (its ``site`` record), if any."""
        if reply.has_error():
            return
        record = reply.content.config_records.get(wire.SITE)
        label = record.get("label") if record is not None else None
        if isinstance(label, str) and label:
            self.site_labels[node] = label

    def aggregation_row(self) -> dict[str, Any]:
        """metrics.jsonl keys beyond the basic ones, present only when they say something."""
        row: dict[str, Any] = {}
        if self.refused:
            row[columns.REFUSED] = list(self.refused)
        if self.clamped:
            row[columns.CLAMPED] = {str(k): v for k, v in self.clamped.items()}
        if self.lora_error is not None:
            row[columns.LORA_TRUNCATION_ERROR] = self.lora_error
        if self.bytes_down_eval:
            row[columns.BYTES_DOWN_EVAL] = self.bytes_down_eval
        if self.bytes_by_node:
            row[columns.BYTES_BY_SITE] = {str(k): v for k, v in sorted(self.bytes_by_node.items())}
        if self.site_labels:
            row[columns.SITE_LABELS] = {str(k): v for k, v in sorted(self.site_labels.items())}
        return row


@dataclass
class ValidReply:
    """A train reply that passed every check."""

    node_id: int
    state: AdapterState
    """Read-only views of the reply's arrays, as sent (float32 or float16), or the
    clamped state when a bound was applied."""
    weight: float
    metrics: MetricRecord
    content: RecordDict
    """The whole reply, for records beyond the adapter (a local-only baseline, say)."""
    update_norm: float | None = None
    """L2 norm of ``local - global`` as sent, when the bound checks computed it."""
    values_checked: bool = True
    """False: the values are yet to be checked against the bounds, in the same sweep that
    aggregates them (:func:`flower_llm.aggregation.checked_aggregate`)."""


@dataclass
class InitialAdapter:
    """The run's seeded initial adapter as the server holds it (see
    :meth:`WeightedFedAvg.use_initial`)."""

    arrays: ArrayRecord
    state: AdapterState
    """Its float32 values (rounded to float16 in a float16 run, as held)."""
    held: Held
    """Version 0 and its digest."""
    recipe: InitialRecipe
    codec: str
    """``fed.wire-dtype`` of a compressed run; else float32 or float16, as held."""


class WeightedFedAvg(FedAvg):
    """FedAvg of adapter states, ``w = sum_k (n_k / n) * w_k``, with per-reply validation.

    Parameters
    ----------
    weighting : str
        ``n_k``: ``"examples"`` training examples the site holds (``num-examples``),
        ``"tokens"`` response tokens it holds, ``"seen"`` examples it trained on this
        round, ``"uniform"`` 1 for every site.
    fraction_train, fraction_evaluate : float
        Fractions of connected nodes sampled per round.
    min_train_clients : int
        Valid replies needed to update the global adapter; fewer keeps the previous one.
    min_evaluate_clients, min_available_clients : int
        As Flower's ``min_evaluate_nodes`` and ``min_available_nodes``.
    train_rng, eval_rng : numpy.random.Generator, optional
        The streams that draw train and evaluation cohorts (:mod:`flower_llm.streams`);
        separate, so evaluation settings never change who trains. Default: unseeded.
    wait_timeout : float
        Seconds to wait for ``min_available_clients`` before a round fails.
    wire_dtype : str
        ``fed.wire-dtype``, both directions, every round: float32 and float16 send whole
        adapters; bfloat16, int8 and nf4 send updates (:mod:`flower_llm.updates`).
    wire_layout : str
        ``fed.wire-layout``: ``packed`` (one array per record, :func:`flower_llm.wire.pack`)
        or ``arrays`` (one array per tensor). Replies are read in either layout.
    wire_block_size : int
        Values per scale of int8 and nf4.
    error_feedback : bool
        Error feedback of the compressed formats (the server's residual lives here).
    max_weight : float
        Largest weight a reply may claim.
    update_bound : callable, optional
        ``(round, largest |global value|) -> per-value bound`` on ``|local - global|``.
    max_update_norm : float, optional
        L2 bound on one site's update.
    clamp : bool
        Clamp a reply beyond a bound instead of dropping it.
    robust : str
        ``fed.robust``: none | norm-bound | trimmed-mean | median.
    trim_fraction : float
        Cut at each end per value by ``trimmed-mean``.
    lora_aggregation : str
        ``lora.aggregation``: fedavg | ffa | exact.
    lora_rank : int
        Rank ``exact`` re-factors the global adapter to (``lora.r``).
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
        train_rng: np.random.Generator | None = None,
        eval_rng: np.random.Generator | None = None,
        wait_timeout: float = 600.0,
        wire_dtype: str = "float32",
        wire_layout: str = "arrays",
        wire_block_size: int = 64,
        error_feedback: bool = True,
        max_weight: float = math.inf,
        update_bound: UpdateBound | None = None,
        max_update_norm: float | None = None,
        clamp: bool = False,
        robust: str = "none",
        trim_fraction: float = 0.2,
        lora_aggregation: str = "fedavg",
        lora_rank: int = 16,
    ) -> None:
        if weighting not in WEIGHT_KEYS:
            raise ValueError(f"weighting must be one of {sorted(WEIGHT_KEYS)}, got {weighting!r}")
        if wire_dtype not in wire.WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(wire.WIRE_DTYPES)}")
        if wire_layout not in WIRE_LAYOUTS:
            raise ValueError(f"wire_layout must be one of {WIRE_LAYOUTS}, got {wire_layout!r}")
        if robust not in ROBUST_RULES:
            raise ValueError(f"robust must be one of {ROBUST_RULES}, got {robust!r}")
        if lora_aggregation not in LORA_AGGREGATIONS:
            raise ValueError(f"lora_aggregation must be one of {LORA_AGGREGATIONS}")
        if robust != "none" and lora_aggregation == "exact":
            raise ValueError("robust rules apply to fedavg and ffa, not to exact aggregation")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_clients,
            min_evaluate_nodes=min_evaluate_clients,
            min_available_nodes=min_available_clients,
            weighted_by_key=WEIGHT_KEYS[weighting] or wire.NUM_EXAMPLES,
            arrayrecord_key=wire.ARRAYS,
            configrecord_key=wire.CONFIG,
        )
        self.weighting = weighting
        self.min_train_clients = min_train_clients
        self.wire_dtype = wire_dtype
        self.wire_layout = wire_layout
        self.wire_block_size = wire_block_size
        self.downlink = (
            Downlink(wire_dtype, wire_block_size, error_feedback)
            if wire_dtype in COMPRESSED_FORMATS
            else None
        )
        """The compressed downlink (None: whole adapters in ``wire_dtype``)."""
        self.max_weight = max_weight
        self.update_bound = update_bound
        self.max_update_norm = max_update_norm
        self.clamp = clamp
        self.robust = robust
        self.trim_fraction = trim_fraction
        self.lora_aggregation = lora_aggregation
        self.lora_rank = lora_rank
        self.reference: AdapterState | None = None
        """The global adapter the round's sites start from (float32 decoding of what went
        down); the reference every reply is checked and aggregated against."""
        self._expected: tuple[AdapterState, AdapterState] | None = None
        """``(reference, what a reply must hold)``, cached for that reference."""
        self.bounds = ReplyBounds(max_weight=max_weight, clamp=clamp)
        self._reference_by_rank: dict[int, AdapterState] = {}
        self.node_ranks: dict[int, int] = {}
        """LoRA rank of each node's last valid reply under ``exact`` aggregation: a node
        below ``lora.r`` gets the global adapter re-factored to its rank (its download
        shrinks with its rank; until its first reply it gets rank ``lora.r``)."""
        self._down_at_rank: tuple[ArrayRecord | None, dict[int, ArrayRecord]] = (None, {})
        self._scratch: dict[str, np.ndarray] = {}
        """One float32 buffer per array for the bound checks, reused by every reply."""
        self.initial: InitialAdapter | None = None
        """The run's seeded initial adapter, sent as an ``initial`` instruction while it is
        the global one (:meth:`use_initial`; None: always as arrays)."""
        self.refuses_initial: set[int] = set()
        """Nodes whose reply to an ``initial`` instruction was an error: they get arrays."""
        self._sent_initial: set[int] = set()
        self.report = RoundReport()
        self.last_valid: list[ValidReply] = []
        self.instructions: list[Message] = []
        """The last round's train messages (the Grid gives them their ids when it sends)."""
        self.train_rng = train_rng if train_rng is not None else np.random.default_rng()
        self.eval_rng = eval_rng if eval_rng is not None else np.random.default_rng()
        self.wait_timeout = float(wait_timeout)
        self.train_sampler = FixedSizeSampler(fraction_train, min_train_clients)
        self.eval_sampler = FixedSizeSampler(fraction_evaluate, min_evaluate_clients)

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        *,
        train_rng: np.random.Generator | None = None,
        eval_rng: np.random.Generator | None = None,
    ) -> WeightedFedAvg:
        """The strategy of ``cfg``'s ``fed.*`` and ``lora.aggregation`` settings."""
        fed = cfg.fed
        return cls(
            train_rng=train_rng,
            eval_rng=eval_rng,
            wait_timeout=fed.round_timeout,
            weighting=fed.weighting,
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_clients=fed.min_train_clients,
            min_evaluate_clients=fed.min_evaluate_clients,
            min_available_clients=fed.min_available_clients,
            wire_dtype=fed.wire_dtype,
            wire_layout=fed.wire_layout,
            wire_block_size=fed.wire_block_size,
            error_feedback=fed.error_feedback,
            max_weight=derive_max_weight(cfg),
            update_bound=(
                (lambda server_round, peak: derive_update_bound(cfg, server_round, peak))
                if fed.update_bound != "off"
                else None
            ),
            max_update_norm=fed.max_update_norm or None,
            clamp=fed.bound_action == "clamp",
            robust=fed.robust,
            trim_fraction=fed.trim_fraction,
            lora_aggregation=cfg.lora.aggregation,
            lora_rank=cfg.lora.r,
        )

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info(
            "WeightedFedAvg: weighting by %s, fraction train %.2f / evaluate %.2f, "
            "min valid train replies %d, max weight %g, update bound %s, max update norm %s "
            "(%s), robust %s, LoRA aggregation %s, wire %s (%s layout)",
            self.weighting,
            self.fraction_train,
            self.fraction_evaluate,
            self.min_train_clients,
            self.max_weight,
            "adamw" if self.update_bound is not None else "off",
            self.max_update_norm or "off",
            "clamp" if self.clamp else "drop",
            self.robust,
            self.lora_aggregation,
            self.wire_dtype,
            self.wire_layout,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients from the train stream, remember the adapter they start from and
        the round's bounds."""
        self.start_round(server_round, arrays)
        nodes = wait_for_nodes(grid, self.min_available_nodes, self.wait_timeout)
        sampled = self.train_sampler.sample(nodes, self.train_rng)
        log.info(
            "Round %d: sampled %d of %d sites to train", server_round, len(sampled), len(nodes)
        )
        config = ConfigRecord(dict(config))
        config[wire.SERVER_ROUND] = server_round
        self.report = self.new_report(sampled)
        messages = self.messages_for(sampled, arrays, config, MessageType.TRAIN)
        self.instructions = messages
        return messages

    def new_report(self, sampled: list[int]) -> RoundReport:
        """A round's report; it takes over the traffic of an evaluation no round recorded
        (round 0's, of the untrained adapter)."""
        report = RoundReport(sampled=sampled)
        if not self.report.sampled:
            report.bytes_down_eval = self.report.bytes_down_eval
            report.bytes_by_node = self.report.bytes_by_node
            report.site_labels = self.report.site_labels
        return report

    def messages_for(
        self, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str
    ) -> list[Message]:
        """One message per node: the same ``arrays`` for all, or with a compressed downlink
        what each node needs (:meth:`flower_llm.updates.Downlink.payload`), in
        ``fed.wire-layout``; their bytes (with the packed header) are counted in the
        round's report."""
        shared = self.laid_out(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}))
        # The whole adapter and the update are packed once, not per node (the payload is
        # kept with its message so its id stays its own).
        by_payload: dict[int, tuple[ArrayRecord, RecordDict]] = {}
        initial = self.initial_instruction(arrays, config)
        messages = []
        for node in nodes:
            content = shared
            rank = self.node_ranks.get(node, self.lora_rank)
            if self.downlink is None and rank < self.lora_rank:
                content = RecordDict(
                    {wire.ARRAYS: self.arrays_at_rank(arrays, rank), wire.CONFIG: config}
                )
            holds_it = self.downlink is not None and self.downlink.holds_current(node)
            if initial is not None and node not in self.refuses_initial and not holds_it:
                # The seeded initial adapter: the site rebuilds it (a site of another
                # rank re-factors it itself, as it does the arrays).
                content = initial
                self._sent_initial.add(node)
            elif self.downlink is not None:
                payload, header = self.downlink.payload(node)
                if id(payload) not in by_payload:
                    whole = RecordDict(
                        {wire.ARRAYS: payload, wire.CONFIG: config, WIRE_FORMAT: header}
                    )
                    by_payload[id(payload)] = (payload, self.laid_out(whole))
                content = by_payload[id(payload)][1]
            sent = wire.payload_bytes(content)
            if message_type == MessageType.TRAIN:
                self.report.bytes_down += sent
            else:
                self.report.bytes_down_eval += sent
            self.report.bytes_by_node.setdefault(node, [0, 0])[0] += sent
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def use_initial(self, arrays: ArrayRecord, recipe: InitialRecipe) -> None:
        """Send an ``initial`` instruction instead of ``arrays`` (the run's seeded initial
        adapter, as the server holds it) while the global adapter is still that one, to
        every site that does not hold it and has not refused it (``fed.initial-from-seed``)."""
        state = wire.from_array_record(arrays)
        if self.downlink is not None:
            codec = self.wire_dtype
        else:
            float16 = any(array.dtype == "float16" for array in arrays.values())
            codec = "float16" if float16 else "float32"
        self.initial = InitialAdapter(arrays, state, Held(0, digest(state)), recipe, codec)

    def is_initial(self, arrays: ArrayRecord) -> bool:
        """Whether ``arrays`` is the run's initial adapter (a compressed run compares the
        downlink's digest; a whole-adapter run the values, stopping at the first array
        that differs: after round 1, the first B, or the first A)."""
        initial = self.initial
        if initial is None:
            return False
        if self.downlink is not None and self.downlink.global_state is not None:
            return self.downlink.held.digest == initial.held.digest
        if arrays is initial.arrays:
            return True
        views = wire.array_views(arrays)
        return views.keys() == initial.state.keys() and all(
            views[k].shape == v.shape and np.array_equal(views[k], v)
            for k, v in initial.state.items()
        )

    def initial_instruction(self, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict | None:
        """The ``initial`` instruction of this exchange, in ``fed.wire-layout``, or None
        when the global adapter ``arrays`` is not the initial one."""
        initial = self.initial
        if initial is None or not self.is_initial(arrays):
            return None
        held = self.downlink.held if self.downlink is not None else initial.held
        content = initial_message(initial.codec, self.wire_block_size, held, initial.recipe)
        content[wire.CONFIG] = config
        return self.laid_out(content)

    def laid_out(self, content: RecordDict) -> RecordDict:
        """``content`` in ``fed.wire-layout``."""
        return wire.pack(content) if self.wire_layout == "packed" else content

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample evaluating clients from the evaluation stream (never the train one)."""
        nodes = wait_for_nodes(grid, self.min_available_nodes, self.wait_timeout)
        sampled = self.eval_sampler.sample(nodes, self.eval_rng)
        config = ConfigRecord(dict(config))
        config[wire.SERVER_ROUND] = server_round
        if self.downlink is not None:
            # Round 0 evaluates before any round trained: the initial adapter, version 0.
            self.downlink.start(wire.from_array_record(arrays), server_round)
        return self.messages_for(sampled, arrays, config, MessageType.EVALUATE)

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Set the reference adapter and this round's bounds (also for wrappers)."""
        # One float32 buffer: the sweep reads it (and replies of the same layout) as one
        # array.
        self.reference = wire.flat_copy(wire.array_views(arrays))
        if self.downlink is not None:
            self.downlink.start(self.reference, server_round - 1)
        self._reference_by_rank = {}
        peak = max(
            (float(np.max(np.abs(v))) for v in self.reference.values() if v.size), default=0.0
        )
        per_value = self.update_bound(server_round, peak) if self.update_bound else None
        self.bounds = ReplyBounds(
            max_weight=self.max_weight,
            max_abs_update=per_value,
            max_update_norm=self.max_update_norm,
            clamp=self.clamp,
        )

    def arrays_at_rank(self, arrays: ArrayRecord, rank: int) -> ArrayRecord:
        """``arrays`` (the global adapter, rank ``lora.r``) re-factored to ``rank`` by
        :func:`flower_llm.lora_aggregation.to_rank`, as a site of that rank would re-factor
        it itself: what goes down to it, at its rank's size. Cached per adapter sent."""
        if self._down_at_rank[0] is not arrays:
            self._down_at_rank = (arrays, {})
        cache = self._down_at_rank[1]
        if rank not in cache:
            state = to_rank(wire.from_array_record(arrays), rank)
            cache[rank] = wire.to_array_record(state, self.wire_dtype)
        return cache[rank]

    def reference_at_rank(self, rank: int) -> AdapterState:
        """The reference re-factored to ``rank``, as a site of that rank receives it."""
        assert self.reference is not None, "configure_train sets the reference"
        if rank not in self._reference_by_rank:
            self._reference_by_rank[rank] = to_rank(self.reference, rank)
        return self._reference_by_rank[rank]

    @property
    def expected(self) -> AdapterState:
        """The arrays a reply must hold: the reference, less the frozen A under ``ffa``."""
        reference = self.reference
        assert reference is not None, "configure_train sets the reference"
        if self._expected is None or self._expected[0] is not reference:
            # Once a round: the sweep reads a FlatState as one array.
            keys = sent_keys(reference, self.lora_aggregation)
            expected = reference
            if keys != list(reference):
                expected = {k: reference[k] for k in keys}
                if isinstance(reference, wire.FlatState):
                    expected = wire.flat_copy(expected)
            self._expected = (reference, expected)
        return self._expected[1]

    # ----------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------

    def reply_weight(self, metrics: MetricRecord) -> object:
        """The weight a reply claims under ``fed.weighting`` (1 under ``uniform``)."""
        key = WEIGHT_KEYS[self.weighting]
        return 1.0 if key is None else metrics[key]

    def check_reply(
        self, reply: Message, check_finite: bool = True, *, defer_values: bool = False
    ) -> ValidReply | str:
        """A :class:`ValidReply` (clamped where asked), or why ``reply`` cannot be aggregated.

        ``check_finite`` is kept for callers of the old interface: every value is read
        once by the bound checks, which find NaN and Inf anyway. ``defer_values`` leaves
        the weight and value bounds to :meth:`average`, which checks them in the sweep
        that aggregates (each reply read once); wrappers that clip or noise the replies
        themselves (DP) check here.
        """
        if reply.has_error():
            return f"client error: {reply.error.reason}"
        views: AdapterState | None = None
        try:  # either layout: a site replies in the one it received
            if self.downlink is None:
                # The adapter as views into the reply's bytes (no copy, even when packed)
                content, views = wire.unpack_views(reply.content)
            else:
                content, _ = wire.unpack(reply.content)
        except wire.PackedLayoutError as err:
            return f"bad packed layout: {err}"
        except (ValueError, TypeError) as err:
            return f"unreadable adapter: {err}"
        if (views is None) if self.downlink is None else wire.ARRAYS not in content.array_records:
            return f"no ArrayRecord '{wire.ARRAYS}'"
        if wire.METRICS not in content.metric_records:
            return f"no MetricRecord '{wire.METRICS}'"
        metrics = content.metric_records[wire.METRICS]
        key = WEIGHT_KEYS[self.weighting]
        if key is not None and key not in metrics:
            return f"metric '{key}' missing"
        weight = self.reply_weight(metrics)
        if self.downlink is not None:
            decoded = self.decode_update(content)
            if isinstance(decoded, str):
                return decoded
            state = decoded
        else:
            assert views is not None
            state = views
        expected = self.expected
        if self.lora_aggregation == "exact":
            # A site may train at its own rank (at most lora.r): check it against the
            # global adapter at that rank, as the site itself re-factored it.
            try:
                rank = rank_of(state)
            except ValueError as err:
                return f"unreadable LoRA factors: {err}"
            if not 0 < rank <= self.lora_rank:
                return f"LoRA rank {rank} outside [1, lora.r = {self.lora_rank}]"
            expected = self.reference_at_rank(rank)
            self.node_ranks[reply.metadata.src_node_id] = rank
        if self.downlink is not None:
            # The reply is an update: the adapter it stands for is the reference plus it.
            if set(state) != set(expected):
                return update_problem(state, expected, weight, check_finite=False)  # type: ignore[arg-type,return-value]
            misfit = next((k for k in expected if state[k].shape != expected[k].shape), None)
            if misfit is not None:
                got, want = state[misfit].shape, expected[misfit].shape
                return f"'{misfit}' has shape {got}, expected {want}"
            state = {k: expected[k] + state[k] for k in expected}
        problem = update_problem(state, expected, weight, check_finite=False)  # type: ignore[arg-type]
        if problem is not None:
            return problem
        problem = metric_problem(metrics, counts=wire.COUNT_METRICS)
        if problem is not None:
            return problem
        node = reply.metadata.src_node_id
        if defer_values and self.sweeps:
            return ValidReply(node, state, float(weight), metrics, content, values_checked=False)  # type: ignore[arg-type]
        bounded = bound_reply(
            state,
            expected,
            float(weight),  # type: ignore[arg-type]
            self.bounds,
            self._scratch,
            # Robust rules and the SVD of exact aggregation must see only finite values
            # (the aggregate check would not catch a NaN a trimmed mean cut, and an SVD
            # of NaN raises): read every reply in full for them.
            want_norm=self.robust != "none" or self.lora_aggregation == "exact",
        )
        if isinstance(bounded, str):
            return bounded
        if bounded.clamped:
            log.warning("Reply of node %d clamped: %s", node, "; ".join(bounded.clamped))
            self.report.clamped[node] = bounded.clamped
        return ValidReply(
            node, bounded.state, bounded.weight, metrics, content, bounded.update_norm
        )

    def decode_update(self, content: RecordDict) -> AdapterState | str:
        """The decoded update of a compressed reply, or why it cannot be used."""
        assert self.downlink is not None
        record = content.config_records.get(WIRE_FORMAT)
        if record is None:
            return f"no ConfigRecord '{WIRE_FORMAT}' (fed.wire-dtype = {self.wire_dtype})"
        try:
            header = Header.from_record(record)
            if header.content != "update" or header.codec != self.wire_dtype:
                raise WireFormatError(
                    f"a {header.codec} '{header.content}' message, expected a "
                    f"{self.wire_dtype} update"
                )
            if header.block_size != self.downlink.block_size:
                raise WireFormatError(
                    f"block size {header.block_size}, expected {self.downlink.block_size}"
                )
            held = self.downlink.held
            if (header.global_version, header.global_digest) != (held.version, held.digest):
                raise WireFormatError(
                    f"trained from global version {header.global_version}, not this "
                    f"round's {held.version}"
                )
            return decode(content.array_records[wire.ARRAYS], header)
        except (WireFormatError, KeyError) as err:
            return f"bad compressed update: {err}"

    def sender_problem(
        self, reply: Message, addressed: dict[str, int], seen: set[int]
    ) -> str | None:
        """Why a reply is refused for who sent it, or None.

        Flower's SuperLink delivers only replies to instructions it sent, once each; the
        strategy does not rely on that: a reply from a node that was not sampled this
        round, a reply to an instruction addressed to another node, and a second reply
        from the same node are refused.
        """
        if reply.has_error():
            return None  # the SuperLink answers for a node that stopped: attributed below
        node = reply.metadata.src_node_id
        if node not in self.report.sampled:
            return f"node {node} was not sampled this round"
        target = addressed.get(reply.metadata.reply_to_message_id)
        if target is not None and target != node:
            return f"node {node} replied to the instruction sent to node {target}"
        if node in seen:
            return f"second reply from node {node} this round"
        return None

    @property
    def sweeps(self) -> bool:
        """Whether :meth:`average` checks values in its aggregation sweep: not when it
        clamps (a clamp rewrites the reply) nor for ``exact`` (an SVD, not a sum)."""
        return not self.clamp and self.lora_aggregation != "exact"

    def valid_replies(
        self, replies: Iterable[Message], check_finite: bool = True, *, defer_values: bool = False
    ) -> list[ValidReply]:
        """Check every reply, log and record the dropped and refused ones."""
        valid: list[ValidReply] = []
        # For a node that stopped heartbeating, the SuperLink itself replies with an error
        # (src = the SuperLink): attribute it to the node the instruction went to.
        addressed = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in self.instructions
            if m.metadata.message_id  # set by the Grid when it sends
        }
        seen: set[int] = set()
        for reply in replies:
            received = wire.message_bytes(reply.content) if not reply.has_error() else 0
            self.report.bytes_up += received
            refused = self.sender_problem(reply, addressed, seen)
            if refused is not None:
                log.warning("Refusing a reply: %s", refused)
                self.report.refused.append(refused)
                continue
            node = addressed.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            seen.add(node)
            self.report.bytes_by_node.setdefault(node, [0, 0])[1] += received
            self.report.note_label(node, reply)
            self.note_holds(node, reply)
            checked = self.check_reply(reply, check_finite, defer_values=defer_values)
            if isinstance(checked, str):
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
        self.report.dropped = dict(sorted(self.report.dropped.items()))
        self.report.accepted = [r.node_id for r in valid]
        self.last_valid = valid
        return valid

    # ----------------------------------------------------------------------------------
    # Aggregation
    # ----------------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregate of the valid replies, or None to keep the previous adapter.

        Sent down in ``fed.wire-dtype``: the float16 saving holds in every round, not
        only the first.
        """
        valid = self.valid_replies(replies, defer_values=True)
        state = self.average(valid)
        valid = self.last_valid
        if state is not None and non_finite_key(state) is not None:
            valid = self.drop_non_finite(valid)  # unreachable with bounds; kept as a guard
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
        return self.publish(state), self.aggregate_train_metrics(valid)

    def publish(self, state: AdapterState) -> ArrayRecord:
        """The new global adapter as the sites will hold it.

        Whole adapters: ``state`` in ``fed.wire-dtype``. Compressed: the previous global
        plus the decoded update ``D(Q(state - previous + e))`` (float32), which is what
        every site reconstructs; wrappers call this after their noise, so compression of
        what goes down is post-processing of the released aggregate.
        """
        if self.downlink is None:
            return wire.to_array_record(state, self.wire_dtype)
        keys = sent_keys(state, self.lora_aggregation)
        return wire.to_array_record(self.downlink.commit(state, keys))

    def note_holds(self, node: int, reply: Message) -> None:
        """Remember which global version a reply says its site holds (compressed only), and
        a site that answered an ``initial`` instruction with an error (it gets arrays)."""
        if node in self._sent_initial:
            self._sent_initial.discard(node)
            if reply.has_error() and node not in self.refuses_initial:
                log.warning(
                    "Node %d could not rebuild the initial adapter (%s); it is sent the "
                    "adapter itself from now on",
                    node,
                    reply.error.reason,
                )
                self.refuses_initial.add(node)
        if self.downlink is None:
            return
        header = None if reply.has_error() else reply.content.config_records.get(WIRE_FORMAT)
        self.downlink.note(node, header)

    def average(self, valid: list[ValidReply]) -> AdapterState | None:
        """The ``lora.aggregation`` / ``fed.robust`` aggregate of ``valid``, or None when
        fewer than the minimum replied."""
        if len(valid) < self.min_train_clients or not valid:
            return None
        assert self.reference is not None, "configure_train sets the reference"
        states = [r.state for r in valid]
        weights = [r.weight for r in valid]
        if self.lora_aggregation == "exact":
            state, exact = exact_average(states, weights, self.lora_rank)
            self.report.lora_error = exact.relative_error
            log.info(
                "Exact LoRA aggregation: relative truncation error %.3g (worst module %.3g)",
                exact.relative_error,
                exact.max_module_relative_error,
            )
            return state
        expected = self.expected
        if not all(r.values_checked for r in valid):
            averaged = self.sweep(valid, expected)
            if averaged is None:
                return None
            return {k: averaged.get(k, self.reference[k]) for k in self.reference}
        norms = [r.update_norm for r in valid]
        averaged = robust_aggregate(
            states,
            weights,
            expected,
            self.robust,
            self.trim_fraction,
            None if None in norms or self.clamp else norms,  # type: ignore[arg-type]
        )
        # ffa: the frozen A matrices never left the server; they stay as they are.
        return {k: averaged.get(k, self.reference[k]) for k in self.reference}

    def sweep(self, valid: list[ValidReply], expected: AdapterState) -> AdapterState | None:
        """Check and aggregate ``valid`` in one sweep; the replies beyond a bound are
        dropped with their reason (None: fewer than the minimum remain)."""
        checked = checked_aggregate(
            [r.state for r in valid],
            [r.weight for r in valid],
            expected,
            self.bounds,
            self.robust,
            self.trim_fraction,
            want_norm=self.robust != "none",
        )
        for index, reason in checked.dropped.items():
            node = valid[index].node_id
            log.warning("Dropping reply of node %d: %s", node, reason)
            self.report.dropped[node] = reason
        kept = [valid[i] for i in checked.kept]
        for reply, norm in zip(kept, checked.norms, strict=True):
            reply.update_norm = norm
            reply.values_checked = True
        self.report.dropped = dict(sorted(self.report.dropped.items()))
        self.report.accepted = [r.node_id for r in kept]
        self.last_valid = kept
        if checked.state is None or len(kept) < self.min_train_clients:
            return None
        return checked.state

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
        largest = max(r.weight for r in valid)
        total = math.fsum(r.weight / largest for r in valid)  # cannot overflow
        out = MetricRecord()
        for key in wire.COUNT_METRICS:
            if any(key in r.metrics for r in valid):
                # A reply's counts are its own claims: one that is not a count a site
                # could hold (negative, non-finite, beyond 2^53) adds nothing.
                counts = [r.metrics.get(key, 0) for r in valid]
                out[key] = sum(
                    int(c) for c in counts if isinstance(c, int | float) and 0 <= c <= 2**53
                )
        # A privacy guarantee is only as strong as its weakest site: report the worst
        # epsilon of any replying site, never an average that would understate it.
        reported = set().union(*(set(r.metrics) for r in valid))
        for key in sorted(k for k in reported if k.endswith("epsilon")):
            values = [r.metrics[key] for r in valid if key in r.metrics]
            if all(isinstance(v, int | float) for v in values):
                out[key] = max(float(v) for v in values)  # type: ignore[arg-type]
        shared = set.intersection(*(set(r.metrics) for r in valid)) - {
            *wire.COUNT_METRICS,
            *(k for k in reported if k.endswith("epsilon")),
        }
        for key in sorted(shared):
            values = [r.metrics[key] for r in valid]
            if all(isinstance(v, int | float) for v in values):
                weighted = (
                    float(v) * (r.weight / largest) / total  # type: ignore[arg-type]
                    for v, r in zip(values, valid, strict=True)
                )
                out[key] = math.fsum(weighted)
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Token-weighted held-out loss and accuracy; perplexity from the pooled loss."""
        replies = list(replies)
        for reply in replies:
            self.note_holds(reply.metadata.src_node_id, reply)
            self.report.note_label(reply.metadata.src_node_id, reply)
        return aggregate_eval_replies(replies)


def aggregate_eval_replies(replies: Iterable[Message]) -> MetricRecord | None:
    """Pool evaluation replies as if all held-out tokens were one set.

    Task-question counts pool the same way (:func:`flower_llm.tasks.pool_task_metrics`).
    Replies with errors or without the expected metrics are skipped with a log line.
    """
    import math

    loss_sum = acc_sum = 0.0
    tokens = examples = clients = 0
    used: list[MetricRecord] = []
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
        try:
            loss, n_tok, accuracy, n_examples = (
                float(metrics[k])  # type: ignore[arg-type]
                for k in needed
            )
        except (TypeError, ValueError):
            log.warning("Evaluation reply of node %d has non-scalar metrics; skipped", node)
            continue
        problem = eval_metrics_problem(loss, n_tok, accuracy, n_examples)
        if problem is not None:
            log.warning("Evaluation reply of node %d: %s; skipped", node, problem)
            continue
        loss_sum += loss * n_tok
        acc_sum += accuracy * n_tok
        tokens += int(n_tok)
        examples += int(n_examples)
        clients += 1
        used.append(metrics)
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
            # Task questions: counts summed over the sites, accuracy = correct / questions.
            **pool_task_metrics(used),
        }
    )
