"""Server side of SecAgg+: a legacy strategy that only ever sees the sum, and one round of it.

SecAgg+ exists only on Flower's legacy API (1.42): ``SecAggPlusWorkflow`` drives a legacy
``flwr.server.strategy.Strategy`` through four message exchanges (setup, share keys, collect
masked vectors, unmask) and hands ``aggregate_fit`` the unmasked *aggregate*, attached to
every surviving client's ``FitRes``. :class:`SecAggFedAvg` checks that it is indeed one
aggregate, never per-client updates, and keeps it; :func:`secagg_round` runs one round and
says what happened (who dropped in which stage, why a round failed, bytes on the wire);
:class:`SecAggRounds` is the round loop's SecAgg+ mode (:mod:`strategies.rounds`): it samples
the cohort from the run's train stream (Poisson under client-level DP, as accounted), runs
one workflow within ``fed.round-timeout``, adds the mean update to the global adapter, and
under DP hands the sum to the same :class:`strategies.dp.CentralDP` DP-FedAvg uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from flower_llm import metrics as columns
from flower_llm import secagg, wire
from flower_llm.config import RunConfig
from flower_llm.secagg import SecAggParams, dp_sensitivity
from flower_llm.updates import InitialRecipe
from strategies.dp import CentralDP
from strategies.fedavg import RoundReport, ValidReply, WeightedFedAvg
from strategies.rounds import TrainRound, evaluate_with
from strategies.sampling import FixedSizeSampler, Sampler, wait_for_nodes

log = logging.getLogger(__name__)

STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")


# --------------------------------------------------------------------------------------
# The legacy strategy
# --------------------------------------------------------------------------------------


class SecAggFedAvg(Strategy):
    """Hands the workflow the round's cohort; receives their already-summed update.

    The cohort is drawn by :class:`SecAggRounds` (from the run's train stream, by the
    sampler the accountant composes), not here: Flower's client manager samples with the
    global ``random``.

    Parameters
    ----------
    min_train_clients : int
        Fewest clients whose updates must be in the sum for it to be used.
    fit_config : callable
        ``server_round -> dict`` sent to every sampled client (learning rate, clipping range).
    """

    def __init__(
        self,
        *,
        min_train_clients: int = 3,
        fit_config: Callable[[int], dict[str, Scalar]] | None = None,
    ) -> None:
        super().__init__()
        self.min_train_clients = min_train_clients
        self.fit_config = fit_config or (lambda _: {})
        self.cohort: list[int] = []
        """Node ids of the round's cohort (set before the workflow runs)."""
        self.aggregate: NDArrays | None = None
        """The unmasked aggregate of the last round, None if it failed."""
        self.num_aggregated = 0
        """Clients whose masked update made it into :attr:`aggregate`."""

    def __repr__(self) -> str:
        return f"SecAggFedAvg(min_train_clients={self.min_train_clients})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The server loop owns the global adapter."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The cohort's proxies; all get the same global adapter and config."""
        self.aggregate, self.num_aggregated = None, 0
        proxies = client_manager.all()  # refreshes the node list first
        # A cohort node that left since it was drawn is missing here: setup runs without
        # it and the round's report counts it as dropped.
        clients = [proxies[str(node)] for node in self.cohort if str(node) in proxies]
        fit_ins = FitIns(parameters, self.fit_config(server_round))
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the one aggregate that every surviving client's ``FitRes`` carries."""
        if not results:
            return None, {}
        first = results[0][1].parameters
        # SecAggPlusWorkflow attaches the same unmasked sum to every FitRes. Anything else
        # would mean per-client updates reached the strategy: refuse to go on.
        if any(res.parameters is not first for _, res in results):
            raise RuntimeError("SecAgg+ strategy received per-client updates, not one aggregate")
        self.aggregate = parameters_to_ndarrays(first)
        self.num_aggregated = len(results)
        return first, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Evaluation runs on the Message API (see server_apps.secagg)."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Unused: evaluation runs on the Message API."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation."""
        return None


# --------------------------------------------------------------------------------------
# The workflow, observed
# --------------------------------------------------------------------------------------


@dataclass
class SecAggRoundReport:
    """What one SecAgg+ round did, in terms the run's metrics can hold."""

    sampled: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    """Clients whose masked update is in the sum."""
    dropped: dict[int, str] = field(default_factory=dict)
    """node id -> the stage it dropped out in."""
    failed: str | None = None
    """Why the round produced no aggregate, None if it did."""
    num_shares: int = 0
    threshold: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_by_node: dict[int, list[int]] = field(default_factory=dict)
    """node id -> [bytes sent to it, bytes received from it] over the protocol's stages."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each protocol stage (client work included)."""
    privacy: dict[str, float] = field(default_factory=dict)
    """Under client-fixed DP: epsilon, delta, clip norm, noise std, expected clients."""


class ObservedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow`` that records who is left after every stage.

    ``deadline`` (a ``time.monotonic()`` value) caps every stage's wait so that the four
    stages together end by it: a round honours ``fed.round-timeout`` as a whole.
    """

    def __init__(self, *args: Any, deadline: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = SecAggRoundReport()
        self._stage_start = time.perf_counter()
        self.deadline = deadline
        self.stage_timeout = self.timeout

    def _cap_timeout(self) -> None:
        if self.deadline is None:
            return
        left = max(0.0, self.deadline - time.monotonic())
        self.timeout = left if self.stage_timeout is None else min(self.stage_timeout, left)

    def _observe(self, stage: str, state: WorkflowState, ok: bool) -> bool:
        report = self.report
        now = time.perf_counter()
        report.stage_seconds[stage] = now - self._stage_start
        self._stage_start = now
        if stage == "setup":
            report.sampled = sorted(state.sampled_node_ids)
            report.num_shares, report.threshold = state.num_shares, state.threshold
        for node in sorted(set(report.sampled) - state.active_node_ids - set(report.dropped)):
            report.dropped[node] = f"dropped out in SecAgg+ stage '{stage}'"
        report.active = sorted(state.active_node_ids)
        if not ok and report.failed is None:
            report.failed = (
                f"secure aggregation halted in stage '{stage}': {len(report.active)} of "
                f"{len(report.sampled)} sampled clients left, and every client needs "
                f"{state.threshold} live neighbours (shares) to be unmasked"
            )
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """As Flower's, observed."""
        self._cap_timeout()
        return self._observe("setup", state, super().setup_stage(grid, context, state))

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """As Flower's, observed."""
        self._cap_timeout()
        return self._observe("share-keys", state, super().share_keys_stage(grid, context, state))

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        """As Flower's, observed."""
        self._cap_timeout()
        ok = super().collect_masked_vectors_stage(grid, context, state)
        return self._observe("collect-masked-vectors", state, ok)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """As Flower's, observed. Clients dropping here are still in the sum."""
        in_sum = sorted(state.active_node_ids)
        self._cap_timeout()
        ok = self._observe("unmask", state, super().unmask_stage(grid, context, state))
        self.report.active = in_sum
        return ok


# --------------------------------------------------------------------------------------
# Bytes on the wire
# --------------------------------------------------------------------------------------


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data, byte strings and scalars in ``content`` (framing excluded)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
            continue
        for value in record.values():  # ConfigRecord / MetricRecord
            items = value if isinstance(value, list) else [value]
            for item in items:
                total += len(item) if isinstance(item, bytes | str) else 8
    return total


class CountingGrid:
    """A ``Grid`` that adds up payload bytes sent to and received from each node."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.bytes_down: dict[int, int] = {}
        self.bytes_up: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward to the real grid, counting both directions."""
        messages = list(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.bytes_down[node] = self.bytes_down.get(node, 0) + payload_bytes(msg.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                node = reply.metadata.src_node_id
                self.bytes_up[node] = self.bytes_up.get(node, 0) + payload_bytes(reply.content)
        return replies

    def reset(self) -> None:
        """Start counting afresh."""
        self.bytes_down, self.bytes_up = {}, {}


# --------------------------------------------------------------------------------------
# One round
# --------------------------------------------------------------------------------------


def secagg_round(
    grid: CountingGrid,
    context: LegacyContext,
    server_round: int,
    arrays: NDArrays,
    params: SecAggParams,
    deadline: float | None = None,
) -> tuple[NDArrays | None, SecAggRoundReport]:
    """Run SecAgg+ once over ``arrays`` (the global adapter, keys in order).

    Returns the unmasked weighted average of what the clients sent (float64), or None when
    the round failed, and the round's report. ``context.strategy`` must be a
    :class:`SecAggFedAvg`.
    """
    strategy = cast(SecAggFedAvg, context.strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), keep_input=True
    )
    workflow = ObservedSecAggPlusWorkflow(
        num_shares=params.num_shares,
        reconstruction_threshold=params.reconstruction_threshold,
        max_weight=params.max_weight,
        clipping_range=params.clipping_range,
        quantization_range=params.quantization_range,
        modulus_range=params.modulus_range,
        timeout=params.timeout,
        deadline=deadline,
    )
    grid.reset()
    workflow._stage_start = time.perf_counter()
    workflow(cast(Grid, grid), context)
    report = workflow.report
    report.bytes_down, report.bytes_up = sum(grid.bytes_down.values()), sum(grid.bytes_up.values())
    report.bytes_by_node = {
        node: [grid.bytes_down.get(node, 0), grid.bytes_up.get(node, 0)]
        for node in sorted(set(grid.bytes_down) | set(grid.bytes_up))
    }
    aggregate = strategy.aggregate
    if report.failed is None and aggregate is None:
        report.failed = "secure aggregation produced no aggregate"
    if aggregate is not None and strategy.num_aggregated < strategy.min_train_clients:
        report.failed = (
            f"{strategy.num_aggregated} updates in the sum, fewer than "
            f"fed.min-train-clients = {strategy.min_train_clients}"
        )
        aggregate = None
    if aggregate is not None and not all(np.all(np.isfinite(a)) for a in aggregate):
        report.failed, aggregate = "the unmasked aggregate holds NaN or Inf", None
    return aggregate, report


# --------------------------------------------------------------------------------------
# The round loop's SecAgg+ mode
# --------------------------------------------------------------------------------------


CLIENTS_IN_SUM = "clients-in-sum"
"""Train metric: clients whose masked update is in the sum (``train/clients-in-sum``)."""


def secagg_columns(
    report: SecAggRoundReport,
    params: SecAggParams,
    counts: secagg.SecureCounts | None = None,
) -> dict[str, Any]:
    """The metrics-row columns of a SecAgg+ round (:mod:`flower_llm.metrics`).

    With the round's ``counts`` (it produced an aggregate), the error bound is the one for
    the weights the sites sent; without, the bound at full weight.
    """
    row: dict[str, Any] = {
        columns.SECAGG_FAILED: report.failed,
        columns.SECAGG_NUM_SHARES: report.num_shares,
        columns.SECAGG_THRESHOLD: report.threshold,
        columns.SECAGG_CLIPPING_RANGE: params.clipping_range,
        columns.SECAGG_QUANTIZATION_RANGE: params.quantization_range,
        columns.SECAGG_MAX_WEIGHT: params.max_weight,
        columns.SECAGG_ERROR_BOUND: params.error_bound(),
    }
    if counts is not None:
        row[columns.SECAGG_CLAMPED] = counts.clamped
        row[columns.SECAGG_WEIGHT_TOTAL] = counts.weight_total
        row[columns.SECAGG_ERROR_BOUND] = secagg.error_bound_for_total(
            params.clipping_range,
            params.quantization_range,
            len(report.active),
            counts.weight_total,
        )
    return row


def secagg_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's ``secagg`` section: clamped weights over the run, with a warning.

    A clamped site weighs ``W`` where it holds more: the aggregate is then FedAvg with that
    site's weight cut, not the FedAvg by data held the run-config asked for.
    """
    clamped = {
        int(row[columns.ROUND]): int(row[columns.SECAGG_CLAMPED])
        for row in history
        if row.get(columns.SECAGG_CLAMPED)
    }
    out: dict[str, Any] = {
        "sites-clamped": sum(clamped.values()),
        "rounds-with-clamped-sites": sorted(clamped),
        "warnings": [],
    }
    if clamped:
        max_weight = max(float(row.get(columns.SECAGG_MAX_WEIGHT) or 0.0) for row in history)
        out["warnings"].append(
            f"{len(clamped)} round(s) had sites whose weight exceeded the max weight W = "
            f"{max_weight:g} and was clamped to W ({sum(clamped.values())} site-rounds, "
            "secagg-clamped in metrics.jsonl): those sites weighed less than the data they "
            "hold; set the max weight (secagg.max-weight, or fed.max-weight when that is 0) "
            "to the largest n_k any site holds"
        )
    return out


def add_traffic(report: RoundReport, evaluation: RoundReport) -> None:
    """Add an evaluation exchange's bytes (down, and per node) and the site labels its
    replies gave to a round's report."""
    report.bytes_down_eval += evaluation.bytes_down_eval
    report.site_labels.update(evaluation.site_labels)
    for node, (sent, received) in evaluation.bytes_by_node.items():
        both = report.bytes_by_node.setdefault(node, [0, 0])
        both[0] += sent
        both[1] += received


class SecAggRounds:
    """One SecAgg+ round per call of :meth:`train_round`, for :func:`strategies.rounds.federate`.

    Parameters
    ----------
    cfg : RunConfig
        The run's settings (``fed.*``, ``secagg.*``, ``privacy.*``, ``train.*``).
    context : Context
        The ServerApp's context; Flower's workflow keeps its state in a legacy view of it.
    keys : list of str
        Adapter keys in wire order (:func:`flower_llm.secagg.ordered_keys`).
    evaluation : WeightedFedAvg
        Samples (from the eval stream) and pools the evaluation, as in every mode.
    train_rng : numpy.random.Generator
        The train-sampling stream.
    central : CentralDP, optional
        Client-level DP: clients clip to ``C``; the server noises the sum and accounts.
        Cohorts are then Poisson-sampled by ``central.sampler``, the accounted event.
    strategy : SecAggFedAvg, optional
        The legacy strategy the workflow drives (tests pass a recording one).
    """

    aggregation = "secagg+"

    def __init__(
        self,
        cfg: RunConfig,
        context: Context,
        keys: list[str],
        *,
        evaluation: WeightedFedAvg,
        train_rng: np.random.Generator,
        central: CentralDP | None = None,
        strategy: SecAggFedAvg | None = None,
    ) -> None:
        self.cfg = cfg
        self.keys = keys
        self.evaluation = evaluation
        self.train_rng = train_rng
        self.central = central
        fed = cfg.fed
        # Under DP a round releases whenever SecAgg+ succeeds: skipping rounds with few
        # clients would reveal participation, which the noise does not cover (strategies.dp).
        self.strategy = strategy or SecAggFedAvg(
            min_train_clients=1 if central is not None else fed.min_train_clients
        )
        self.sampler: Sampler
        if central is not None:
            central.rng_for_sampling = train_rng
            self.sampler = central.sampler
            central.check_sampler(self.sampler)
            central.release_only_cohorts_of(secagg.MIN_SAMPLED_CLIENTS)
        else:
            self.sampler = FixedSizeSampler(
                fed.fraction_train, max(fed.min_train_clients, secagg.MIN_SAMPLED_CLIENTS)
            )
        self.min_available = max(fed.min_available_clients, secagg.MIN_SAMPLED_CLIENTS)
        self.legacy = LegacyContext(
            context,
            config=ServerConfig(num_rounds=fed.num_rounds),
            strategy=self.strategy,
            client_manager=SimpleClientManager(),
        )
        self._thread: Any = None
        self._stop: Any = None
        self._counting: CountingGrid | None = None
        self.last_report: SecAggRoundReport | None = None
        self.last_params: SecAggParams | None = None
        self._round: tuple[int, RoundReport] | None = None
        """The current round and its report, which its evaluation's bytes join."""
        self._eval_bytes = RoundReport()
        """Evaluation traffic no round has taken yet (round 0's, before round 1)."""

    # ----------------------------------------------------------------------------------
    # A round
    # ----------------------------------------------------------------------------------

    def _grid(self, grid: Grid) -> CountingGrid:
        """The counting grid, and Flower's node-list thread for the legacy client manager."""
        if self._counting is None:
            self._counting = CountingGrid(grid)
            thread, stop, registered = start_update_client_manager_thread(
                cast(Grid, self._counting), self.legacy.client_manager
            )
            registered.wait()
            self._thread, self._stop = thread, stop
        return self._counting

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Sample, run the workflow within the round timeout, add the (noised) mean update.

        The round's report also counts the evaluation traffic no round has taken yet
        (round 0's), and its own evaluation's (:meth:`evaluate_round`), as in every mode.
        """
        trained = self._train_round(server_round, arrays, config, grid)
        self._round = (server_round, trained.report)
        add_traffic(trained.report, self._eval_bytes)
        self._eval_bytes = RoundReport()
        return trained

    def _train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.fed.round_timeout
        counting = self._grid(grid)
        nodes = wait_for_nodes(grid, self.min_available, cfg.fed.round_timeout)
        if self.central is not None:
            cohort = self.central.start_round(server_round, nodes)
        else:
            cohort = self.sampler.sample(nodes, self.train_rng)
        state = wire.from_array_record(arrays)
        if len(cohort) < secagg.MIN_SAMPLED_CLIENTS:
            return self._too_small(server_round, state, cohort)

        params = secagg.derive_params(
            cfg,
            num_sampled=len(cohort),
            server_round=server_round,
            global_max_abs=secagg.max_abs(state),
        )
        fit_config: dict[str, Scalar] = {
            wire.SERVER_ROUND: server_round,
            wire.LEARNING_RATE: float(config[wire.LEARNING_RATE]),  # type: ignore[arg-type]
            secagg.CLIPPING_RANGE: params.clipping_range,
            secagg.MAX_WEIGHT: params.max_weight,
        }
        self.strategy.fit_config = lambda _round: fit_config
        self.strategy.cohort = cohort
        self.last_params = params

        # ---- the protocol: the strategy receives the sum only ----
        dtype = wire.WIRE_DTYPES[cfg.fed.wire_dtype]
        download = [np.asarray(a, dtype=dtype) for a in secagg.state_to_arrays(state)]
        aggregate, report = secagg_round(
            counting, self.legacy, server_round, download, params, deadline
        )
        self.last_report = report
        if aggregate is None:
            row = secagg_columns(report, params)
            log.error("Round %d failed, global adapter unchanged: %s", server_round, report.failed)
            return TrainRound(None, None, self._round_report(report, updated=False), row)

        delta, means = secagg.decode_aggregate(aggregate, self.keys, params.clipping_range)
        counts: secagg.SecureCounts | None = None
        try:
            counts = secagg.decode_counts(
                aggregate, params.clipping_range, params.quantization_range, len(report.active)
            )
        except ValueError as err:  # the aggregate itself is sound: record the round without
            log.warning("Round %d: no clamp count or weight total: %s", server_round, err)
        row = secagg_columns(report, params, counts)
        if counts is not None and counts.clamped:
            log.warning(
                "Round %d: %d of %d sites claimed a weight above the max weight W = %g and "
                "were clamped to it (which ones stays hidden); raise secagg.max-weight, or "
                "fed.max-weight when that is 0, to the largest n_k any site holds",
                server_round,
                counts.clamped,
                len(report.active),
                params.max_weight,
            )
        metrics = MetricRecord({CLIENTS_IN_SUM: len(report.active)})
        if self.central is None:
            metrics[wire.TRAIN_LOSS] = means[wire.TRAIN_LOSS]
            new_state = secagg.apply_update(state, delta)
        else:
            # Every client weighs 1 under DP, so the unmasked mean times the clients in
            # it is their sum; noise it before anything (outputs, evaluation) sees it.
            in_sum = len(report.active)
            total = {k: v * in_sum for k, v in delta.items()}
            num_values = sum(v.size for v in delta.values())
            sensitivity = dp_sensitivity(
                self.central.clip_norm,
                params.clipping_range,
                params.quantization_range,
                num_values,
            )
            new_state = self.central.release(state, total, sensitivity=sensitivity)
            assert self.central.last_round is not None
            row.update(self.central.last_round.as_row())
            log.info(
                "DP round %d: %d updates in the sum, noise std %.3g, epsilon %.4g",
                server_round,
                in_sum,
                self.central.last_round.noise_stddev,
                self.central.last_round.epsilon,
            )
        out = wire.to_array_record(new_state)  # float32 on the server, as in every mode
        return TrainRound(out, metrics, self._round_report(report, updated=True), row)

    def _too_small(
        self, server_round: int, state: dict[str, np.ndarray], cohort: list[int]
    ) -> TrainRound:
        """A cohort below SecAgg+'s minimum: no exchange (its sum would expose updates).

        Under DP the round still releases: noise around the unchanged adapter, accounted
        like every other round (see docs/privacy.md on what this costs the guarantee).
        """
        reason = (
            f"{len(cohort)} sites sampled, fewer than the {secagg.MIN_SAMPLED_CLIENTS} "
            "SecAgg+ needs; no secure aggregation this round"
        )
        log.warning("Round %d: %s", server_round, reason)
        report = RoundReport(sampled=list(cohort), dropped={n: reason for n in cohort})
        row: dict[str, Any] = {columns.SECAGG_FAILED: reason}
        if self.central is None:
            return TrainRound(None, None, report, row)
        zeros = {k: np.zeros(v.shape, np.float64) for k, v in state.items()}
        new_state = self.central.release(state, zeros)
        assert self.central.last_round is not None
        row.update(self.central.last_round.as_row())
        report.updated = True
        return TrainRound(wire.to_array_record(new_state), MetricRecord(), report, row)

    @staticmethod
    def _round_report(report: SecAggRoundReport, *, updated: bool) -> RoundReport:
        dropped = dict(report.dropped)
        if report.failed is not None:
            dropped.update({n: report.failed for n in report.active if n not in dropped})
        return RoundReport(
            sampled=report.sampled,
            accepted=report.active if updated else [],
            dropped=dropped,
            bytes_down=report.bytes_down,
            bytes_up=report.bytes_up,
            updated=updated,
            bytes_by_node=dict(report.bytes_by_node),
        )

    def evaluate_round(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> MetricRecord | None:
        """Evaluation on the Message API, as in every mode; the bytes the server sends
        for it (counted from the messages) join this round's report."""
        self.evaluation.report = RoundReport()
        try:
            return evaluate_with(
                self.evaluation, server_round, arrays, grid, self.cfg.fed.round_timeout
            )
        finally:
            if self._round is not None and self._round[0] == server_round:
                add_traffic(self._round[1], self.evaluation.report)
            else:
                add_traffic(self._eval_bytes, self.evaluation.report)

    def last_valid(self) -> list[ValidReply]:
        """None: the server never sees an individual update."""
        return []

    def use_initial(self, arrays: ArrayRecord, recipe: InitialRecipe) -> None:
        """Evaluation messages only (round 0's): the train download is the legacy
        workflow's ``FitIns``, the adapter itself in every round."""
        self.evaluation.use_initial(arrays, recipe)

    def state_dict(self) -> dict[str, Any]:
        """The central DP state (nothing without DP); SecAgg+ keeps no state across rounds."""
        return {"dp": self.central.state_dict()} if self.central is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        if self.central is not None:
            if "dp" not in state:
                raise ValueError("the checkpoint holds no DP state but this run has DP")
            self.central.load_state_dict(state["dp"])
        elif state:
            raise ValueError("the checkpoint holds DP state but this run has no DP")

    def close(self) -> None:
        """Stop Flower's node-list thread."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = self._thread = None
