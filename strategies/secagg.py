"""Server side of SecAgg+: a legacy strategy that only ever sees the sum, and one round of it.

SecAgg+ exists only on Flower's legacy API (1.42): ``SecAggPlusWorkflow`` drives a legacy
``flwr.server.strategy.Strategy`` through four message exchanges (setup, share keys, collect
masked vectors, unmask) and hands ``aggregate_fit`` the unmasked *aggregate*, attached to
every surviving client's ``FitRes``. :class:`SecAggFedAvg` checks that it is indeed one
aggregate, never per-client updates, and keeps it; :func:`secagg_round` runs one round and
says what happened (who dropped in which stage, why a round failed, bytes on the wire).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
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
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from flower_llm.config import PrivacyConfig
from flower_llm.privacy import RdpAccountant, add_gaussian_noise, dp_fedavg_noise_stddev
from flower_llm.secagg import SecAggParams, dp_sensitivity

log = logging.getLogger(__name__)

STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")


# --------------------------------------------------------------------------------------
# The legacy strategy
# --------------------------------------------------------------------------------------


class SecAggFedAvg(Strategy):
    """Samples clients for SecAgg+ and receives their already-summed, unmasked update.

    Parameters
    ----------
    fraction_train : float
        Fraction of connected clients sampled each round.
    min_train_clients : int
        Fewest clients whose updates must be in the sum for it to be used.
    min_available_clients : int
        Clients that must be connected before a round starts.
    fit_config : callable
        ``server_round -> dict`` sent to every sampled client (learning rate, clipping range).
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        min_train_clients: int = 3,
        min_available_clients: int = 3,
        fit_config: Callable[[int], dict[str, Scalar]] | None = None,
    ) -> None:
        super().__init__()
        self.fraction_train = fraction_train
        self.min_train_clients = min_train_clients
        self.min_available_clients = min_available_clients
        self.fit_config = fit_config or (lambda _: {})
        self.sample_size: int | None = None
        """Clients to sample next round (the loop fixes it with the SecAgg+ parameters)."""
        self.aggregate: NDArrays | None = None
        """The unmasked aggregate of the last round, None if it failed."""
        self.num_aggregated = 0
        """Clients whose masked update made it into :attr:`aggregate`."""

    def __repr__(self) -> str:
        return f"SecAggFedAvg(fraction_train={self.fraction_train})"

    def num_to_sample(self, num_available: int) -> int:
        """Clients to sample out of ``num_available``, as FedAvg counts them."""
        return max(int(num_available * self.fraction_train), self.min_train_clients)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The server loop owns the global adapter."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients; all get the same global adapter and config."""
        self.aggregate, self.num_aggregated = None, 0
        client_manager.wait_for(self.min_available_clients, timeout=86400)
        num = self.sample_size or self.num_to_sample(client_manager.num_available())
        # Fewer connected than ``num`` gives no clients: setup fails and the round says so.
        clients = client_manager.sample(num_clients=num, min_num_clients=num)
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
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each protocol stage (client work included)."""
    privacy: dict[str, float] = field(default_factory=dict)
    """Under client-fixed DP: epsilon, delta, clip norm, noise std, expected clients."""


class ObservedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow`` that records who is left after every stage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = SecAggRoundReport()
        self._stage_start = time.perf_counter()

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
        return self._observe("setup", state, super().setup_stage(grid, context, state))

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """As Flower's, observed."""
        return self._observe("share-keys", state, super().share_keys_stage(grid, context, state))

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        """As Flower's, observed."""
        ok = super().collect_masked_vectors_stage(grid, context, state)
        return self._observe("collect-masked-vectors", state, ok)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """As Flower's, observed. Clients dropping here are still in the sum."""
        in_sum = sorted(state.active_node_ids)
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
    )
    grid.reset()
    workflow._stage_start = time.perf_counter()
    workflow(cast(Grid, grid), context)
    report = workflow.report
    report.bytes_down, report.bytes_up = sum(grid.bytes_down.values()), sum(grid.bytes_up.values())
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
# Client-fixed DP on top of the sum
# --------------------------------------------------------------------------------------


class SecAggCentralNoise:
    """DP-FedAvg's server half under SecAgg+: noise the unmasked mean, account the round.

    Clients clipped their update to ``privacy.clip-norm`` before masking; the server cannot
    check it (it never sees an update). Every client weighs 1, and the mean is rescaled to
    the fixed denominator ``m`` (the clients sampled), as :mod:`strategies.dp` does: dividing
    by the clients that survived would make one client's influence depend on the others.
    """

    def __init__(self, privacy: PrivacyConfig, rng: np.random.Generator | None = None) -> None:
        self.privacy = privacy
        self.rng = rng or np.random.default_rng()  # OS entropy: the run-config seed is public
        self.accountant = RdpAccountant(privacy.noise_multiplier, 1.0, privacy.delta)
        if privacy.noise_multiplier == 0:
            log.warning(
                "privacy.noise-multiplier is 0: updates are clipped but NOT noised, so this "
                "run has NO differential privacy (epsilon is infinite)"
            )

    def would_exceed_budget(self, sampling_rate: float) -> bool:
        """Whether one more round would take epsilon above ``privacy.target-epsilon``."""
        target = self.privacy.target_epsilon
        projected = self.accountant.projected_epsilon(1, sampling_rate=sampling_rate)
        return target > 0 and projected > target

    def noise(
        self,
        mean_update: dict[str, np.ndarray],
        *,
        num_in_sum: int,
        num_sampled: int,
        params: SecAggParams,
        sampling_rate: float,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The noised mean update, and the round's privacy row (keys as strategies.dp's)."""
        num_values = sum(v.size for v in mean_update.values())
        sensitivity = dp_sensitivity(
            self.privacy.clip_norm, params.clipping_range, params.quantization_range, num_values
        )
        stddev = dp_fedavg_noise_stddev(self.privacy.noise_multiplier, sensitivity, num_sampled)
        fixed = {k: v * (num_in_sum / num_sampled) for k, v in mean_update.items()}
        noised = add_gaussian_noise(fixed, stddev, self.rng)
        self.accountant.step(sampling_rate=sampling_rate)
        row = {
            "epsilon": self.accountant.epsilon(),
            "delta": self.accountant.delta,
            "dp-clip-norm": self.privacy.clip_norm,
            "dp-noise-stddev": stddev,
            "dp-expected-clients": float(num_sampled),
        }
        log.info(
            "DP round: %d of %d sampled updates in the sum, noise std %.3g, epsilon %.4g",
            num_in_sum,
            num_sampled,
            stddev,
            row["epsilon"],
        )
        return noised, row
