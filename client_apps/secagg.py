"""Legacy ClientApp for SecAgg+; ``client_apps.qlora`` builds one and hands it secagg+ trains.

SecAgg+ exists only on Flower's legacy API (1.42): ``secaggplus_mod`` runs the client's side of
the four-stage protocol and calls the wrapped ``NumPyClient.fit`` in its third stage. So
``client_apps.qlora:app`` (the one ClientApp of the Flower App) stays on the Message API and,
when the run uses SecAgg+, calls the app :func:`make_app` built around its own sessions with
the same message and context; Flower keeps the protocol's per-node state in that context
between the stages. This module imports nothing from ``client_apps.qlora`` (dependencies
point one way).

:class:`SecAggClient` is a thin adapter: training is the shared
:class:`~flower_llm.client.ClientSession`, the encoding is :mod:`flower_llm.secagg`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import NDArrays, Scalar, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from flower_llm import secagg, wire
from flower_llm.config import RunConfig

if TYPE_CHECKING:  # the torch stack: only the masked-vectors stage trains and needs it
    from flower_llm.adapters import AdapterState
    from flower_llm.train import TrainStats

log = logging.getLogger(__name__)

FITRES_WEIGHT = "fitres.num_examples"
"""Where Flower's legacy ``FitRes`` puts a client's weight, in plaintext."""


class AdapterTrainer(Protocol):
    """What the client needs of a session: :class:`flower_llm.client.SiteTrainer` is one."""

    @property
    def cfg(self) -> RunConfig:
        """The run-config the session trains with."""
        ...

    def train(
        self, global_state: AdapterState, server_round: int, learning_rate: float
    ) -> tuple[AdapterState, TrainStats]:
        """Train from ``global_state``; return the local adapter and what training saw."""
        ...

    def train_reply_metrics(self, stats: TrainStats) -> Mapping[str, object]:
        """The counts a plain train reply reports (held and seen), for the weight."""
        ...


def claimed_weight(cfg: RunConfig, counts: Mapping[str, object], stats: TrainStats) -> float:
    """The FedAvg weight ``n_k`` of this client, before SecAgg+'s max weight bounds it.

    ``fed.weighting`` as on every path (:func:`flower_llm.secagg.weighs_by_held`):
    examples or response tokens *held* (``counts``, as the plain train reply reports them)
    for ``examples`` / ``tokens``; examples trained on this round (``stats``) for ``seen``;
    1 for ``uniform`` and under client-level DP (its accountant assumes equal weights).
    """
    if cfg.privacy.client_level or cfg.fed.weighting == "uniform":
        return 1.0
    if secagg.weighs_by_held(cfg):
        key = wire.NUM_TOKENS if cfg.fed.weighting == "tokens" else wire.NUM_EXAMPLES
        return float(counts[key])  # type: ignore[arg-type]
    return float(stats.examples)


def client_weight(
    cfg: RunConfig, counts: Mapping[str, object], stats: TrainStats, max_weight: float
) -> int:
    """:func:`claimed_weight`, clamped to the max weight ``W`` SecAgg+ was set up for."""
    weight = claimed_weight(cfg, counts, stats)
    if weight > max_weight:
        log.warning("Weight %d above secagg max weight %g: clamped", weight, max_weight)
    return max(1, min(int(weight), int(max_weight)))


class SecAggClient(NumPyClient):
    """Trains like the plain ClientApp; returns the clipped update for ``secaggplus_mod``."""

    def __init__(
        self, session: AdapterTrainer, keys: list[str], context: Context | None = None
    ) -> None:
        self.session = session
        self.keys = keys
        """Adapter keys in wire order (:func:`flower_llm.secagg.ordered_keys`)."""
        self.context = context
        """Where :meth:`fit` leaves its counts for :func:`secure_counts_mod` (None: nowhere)."""

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train, then encode ``local - global``; metrics travel masked, not here."""
        cfg = self.session.cfg
        global_state = secagg.arrays_to_state(parameters, self.keys)
        local, stats = self.session.train(
            global_state, int(config[wire.SERVER_ROUND]), float(config[wire.LEARNING_RATE])
        )
        clipping_range = float(config[secagg.CLIPPING_RANGE])
        dp = cfg.privacy.client_level
        encoded = secagg.encode_update(
            local,
            global_state,
            clipping_range=clipping_range,
            l2_clip_norm=cfg.privacy.clip_norm if dp else None,
            # Under DP the mean train loss would leak without noise: send nothing.
            metrics=None if dp else {wire.TRAIN_LOSS: stats.loss},
        )
        if encoded.clipped_values:
            # Only this client can see it: the server never sees the update.
            log.warning(
                "%d update values exceeded the SecAgg+ clipping range %.3g and were clipped",
                encoded.clipped_values,
                clipping_range,
            )
        counts = self.session.train_reply_metrics(stats)
        max_weight = float(config[secagg.MAX_WEIGHT])
        weight = client_weight(cfg, counts, stats, max_weight)
        if self.context is not None:
            # Read by secure_counts_mod on the way out, which adds it to the masked sum.
            clamped = int(claimed_weight(cfg, counts, stats) > max_weight)
            self.context.state.config_records[secagg.COUNTS_RECORD] = ConfigRecord(
                {"clamped": clamped}
            )
        return encoded.arrays, weight, {}


def hide_weight_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: keep the weight masked and send the masked vector as 32-bit integers.

    ``secaggplus_mod`` masks the weight inside the vector but leaves the legacy ``FitRes``
    weight in plaintext next to it; every client reports 1 there instead. Its masked values
    are integers mod 2^32 sent as int64; uint32 halves the upload, and the server's
    int arithmetic on them stays exact mod 2^32 (numpy wraps uint32 sums).
    """
    reply = call_next(msg, context)
    if not reply.has_content():
        return reply
    content = reply.content
    if FITRES_WEIGHT in content.metric_records:
        content.metric_records[FITRES_WEIGHT] = MetricRecord({"num_examples": 1})
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.MASKED_PARAMETERS in configs:
        assert secagg.MODULUS_RANGE == 2**32, "uint32 wraps mod 2^32 only"
        masked = [bytes_to_ndarray(b) for b in cast(list[bytes], configs[Key.MASKED_PARAMETERS])]
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a.astype(np.uint32)) for a in masked]
    return reply


def secure_counts_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Add the counts :meth:`SecAggClient.fit` left in the context to the masked vector.

    Between ``secaggplus_mod`` (whose masked reply it edits) and :func:`hide_weight_mod`.
    The counts enter the sum unweighted, and masked like every other value: the server
    learns how many sites were clamped, not which (:func:`flower_llm.secagg.add_counts`).
    """
    reply = call_next(msg, context)
    counts = context.state.config_records.pop(secagg.COUNTS_RECORD, None)
    if not reply.has_content():
        return reply
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return reply
    masked = [bytes_to_ndarray(b) for b in cast(list[bytes], configs[Key.MASKED_PARAMETERS])]
    values = {"clamped": int(cast(int, counts["clamped"]))} if counts is not None else {}
    summed = secagg.add_counts(masked, values)
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in summed]
    return reply


def make_app(trainer_for: Callable[[Context], tuple[AdapterTrainer, list[str]]]) -> ClientApp:
    """A legacy SecAgg+ ClientApp; ``trainer_for`` gives a session and its adapter keys."""

    def client_fn(context: Context) -> Client:
        session, keys = trainer_for(context)
        return SecAggClient(session, keys, context).to_client()

    # Order matters: mods[0] is outermost, so each mod sees the reply of the ones after it:
    # secure_counts_mod edits secaggplus_mod's masked vector, hide_weight_mod packs it.
    return ClientApp(client_fn=client_fn, mods=[hide_weight_mod, secure_counts_mod, secaggplus_mod])
