"""SecAgg+ for LoRA adapters: protocol parameters derived from the run, and the update encoding.

Pure functions, no Flower imports: the legacy SecAgg+ ClientApp and ServerApp call them, and
tests pin them down without starting anything.

What a client masks is its adapter *update* ``delta = local - global`` (plus a small vector of
securely averaged metrics), never the adapter itself. Updates are small, so a clipping range
fitted to them keeps the integer quantization of SecAgg+ fine-grained, and
``global + weighted_mean(delta_k)`` is exactly weighted FedAvg of the local adapters.

How a value travels (Flower 1.42, ``secaggplus_mod`` and ``SecAggPlusWorkflow``)::

    x  -> x * q_k / Q                          weight n_k as q_k = round(min(n_k, W) / W * Q)
       -> clip to [-c, c], stochastic round of (x + c) * Q / (2c) to an integer in [0, Q]
       -> + masks, mod M = 2^32                per client; masks cancel in the sum
       -> + counts (:func:`add_counts`)        unweighted: clamped to W or not, and 1
    server: sum_k, unmask, dequantize, divide by sum_k q_k / Q

``c`` is the clipping range, ``Q`` the quantization range, ``W`` the max weight and ``M`` the
modulus. :func:`aggregate_error_bound` is the resulting worst-case difference to exact FedAvg;
the server learns ``sum_k q_k / Q`` and how many sites were clamped (:func:`decode_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flower_llm.config import ConfigError, RunConfig, check_secagg_max_weight
from flower_llm.privacy.mechanism import clip_update

if TYPE_CHECKING:  # adapters imports torch and peft; the key-exchange stages need neither
    from flower_llm.adapters import AdapterState

MODULUS_RANGE = 2**32
"""Flower's default and documented maximum modulus (``modulus_range`` must be < 2^32 + 1)."""
MAX_QUANTIZATION_RANGE = 2**30
"""Flower's stochastic rounding casts to int32, so ``Q`` must stay below 2^31."""
MIN_QUANTIZATION_RANGE = 2**16
"""Fewer levels than this make the worst-case rounding error (``2c/Q`` per client) coarser
than 2^-15 of the clipping range: below float16 precision for updates 16x smaller than ``c``."""
NUM_STAGES = 4
"""SecAgg+ stages per round: setup, share keys, collect masked vectors, unmask."""
MIN_SAMPLED_CLIENTS = 3
"""Flower refuses ``num_shares <= 2``; with two clients the sum reveals the other's update."""

ADAM_BETAS = (0.9, 0.999)
"""torch.optim.AdamW defaults, which :func:`flower_llm.train.train_adapter` uses."""
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
"""Relative rounding error of one store in the LoRA weights' dtype (``model.compute-dtype``)."""
SAFETY_MARGIN = 1.25
"""Headroom on the automatic clipping range for optimizer states kept in low precision."""

CLIPPING_RANGE = "secagg-clipping-range"
"""Train-config key: the round's clipping range, which clients clip their update to."""
MAX_WEIGHT = "secagg-max-weight"
"""Train-config key: the round's max weight, which clients clamp their weight to."""

LOSS_BOUND = 32.0
"""Train losses are clipped to [0, LOSS_BOUND] before they are securely averaged."""
METRICS_KEY = "__secagg-metrics__"
"""Name of the extra vector (securely averaged metrics) appended after the adapter arrays."""
SECURE_METRICS = ("train-loss",)
"""Metrics averaged inside the masked vector, in this order."""
SECURE_COUNTS = ("clamped", "in-sum")
"""Counts summed (not weighted) in the masked vector, after the metrics: whether the site's
weight was clamped to ``W`` (0/1), and 1 (so the server can read the sum of weights)."""
COUNT_STEP = 2**12
"""Integer levels one count adds to its slot of the masked vector (:func:`add_counts`):
far above the one level stochastic rounding can add per site, far below the modulus."""
COUNTS_RECORD = "flower-llm.secagg-counts"
"""Context-state record in which a client's fit leaves its counts for :func:`add_counts`
(it never leaves the client)."""


# --------------------------------------------------------------------------------------
# Protocol parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggParams:
    """The SecAgg+ settings of one round, every ``0 = auto`` resolved."""

    num_sampled: int
    """Clients sampled this round."""
    num_shares: int
    """Neighbours (itself included) each client secret-shares its keys with."""
    reconstruction_threshold: int
    """Shares needed to rebuild a secret; each client needs this many live neighbours."""
    clipping_range: float
    """Elementwise bound ``c`` on every value sent; clients clip their update to it."""
    quantization_range: int
    """Integer levels ``Q`` per value over ``[-c, c]``."""
    max_weight: float
    """``W``, the largest weight a client may report; clients clamp to it."""
    timeout: float
    """Seconds each of the four protocol stages waits for replies (at most)."""
    modulus_range: int = MODULUS_RANGE

    def error_bound(self, weight_ratios: Sequence[float] | None = None) -> float:
        """Worst-case per-value difference to exact weighted FedAvg (see module docs)."""
        ratios = [1.0] * self.num_sampled if weight_ratios is None else list(weight_ratios)
        return aggregate_error_bound(self.clipping_range, self.quantization_range, ratios)


def adam_step_bound(t: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """Largest ``|m_hat_t / sqrt(v_hat_t)|`` of Adam's ``t``-th step, over all gradients.

    By Cauchy-Schwarz on ``m_t = (1-b1) sum_i b1^(t-i) g_i`` against
    ``v_t = (1-b2) sum_i b2^(t-i) g_i^2``, with ``gamma = b1^2 / b2 < 1``::

        |m_hat_t| / sqrt(v_hat_t) <= (1-b1)/sqrt(1-b2) * sqrt((1-gamma^t)/(1-gamma))
                                     * sqrt(1-b2^t) / (1-b1^t)

    It is 1 at ``t = 1`` and grows slowly (1.16 at ``t = 20`` with torch's defaults).
    Adam's eps only shrinks the step.
    """
    b1, b2 = betas
    gamma = b1 * b1 / b2
    if not 0 < gamma < 1:
        raise ValueError(f"need beta1^2 < beta2, got betas {betas}")
    return (
        (1 - b1)
        / math.sqrt(1 - b2)
        * math.sqrt((1 - gamma**t) / (1 - gamma))
        * math.sqrt(1 - b2**t)
        / (1 - b1**t)
    )


def local_update_bound(
    *,
    learning_rate: float,
    steps: int,
    weight_decay: float = 0.0,
    start_max_abs: float = 0.0,
    dtype: str = "float32",
    betas: tuple[float, float] = ADAM_BETAS,
) -> float:
    """Bound on ``|local - global|`` of any single weight after one round of local AdamW.

    A fresh AdamW per round (as :func:`flower_llm.train.train_adapter` makes) moves each
    weight by at most ``lr * adam_step_bound(t)`` at step ``t``, whatever the data: the
    server can compute this from public settings, without seeing any update. Decoupled
    weight decay adds ``lr * wd * |w|`` per step; weights held in ``dtype`` add one
    rounding per step (and one when the global adapter is loaded).
    """
    adam = learning_rate * sum(adam_step_bound(t, betas) for t in range(1, steps + 1))
    reach = start_max_abs + adam  # largest |w| any step can see, decay aside
    decay = steps * learning_rate * weight_decay * reach
    rounding = (steps + 1) * UNIT_ROUNDOFF[dtype] * (reach + decay)
    return adam + decay + rounding


def auto_num_shares(num_sampled: int) -> int:
    """All sampled clients up to 32 (classic SecAgg); an odd ``~4 log2 n`` beyond.

    SecAgg+ (Bell et al. 2020) shows that an ``O(log n)`` neighbourhood suffices; the
    constant here is a conservative choice, not the paper's proof for a target failure
    probability: set ``secagg.num-shares`` from its tables for large cohorts.
    """
    if num_sampled <= 32:
        return num_sampled
    shares = 4 * math.ceil(math.log2(num_sampled))
    return min(num_sampled, shares + 1 if shares % 2 == 0 else shares)


def auto_threshold(num_shares: int) -> int:
    """A strict majority of the shares: the server and a minority cannot rebuild a secret."""
    return num_shares // 2 + 1


def auto_quantization_range(num_sampled: int, modulus_range: int = MODULUS_RANGE) -> int:
    """Largest power of two ``Q <= 2^30`` whose sum over all clients cannot wrap the modulus.

    Every quantized value (and every quantized weight) lies in ``[0, Q]``, so the masked sum
    of ``n`` clients stays below the modulus when ``n * Q < M``.
    """
    bits = math.floor(math.log2((modulus_range - 1) / num_sampled))
    return min(MAX_QUANTIZATION_RANGE, 2**bits)


def weighs_by_held(cfg: RunConfig) -> bool:
    """Whether SecAgg+ weighs by data held: ``fed.weighting`` = examples or tokens, as on
    every other path, unless client-level DP weighs every site 1.

    The weight ``n_k`` travels as ``round(min(n_k, W) / W * Q)`` and scales the site's
    values by that ratio before they are quantized, so ``W`` must be stated by the user
    (``fed.max-weight`` or ``secagg.max-weight``; :func:`flower_llm.config.
    check_secagg_max_weight` refuses the run otherwise): a derived bound loose enough for
    any site (2^24 examples) would cost four orders of magnitude of precision (error bound
    9.4e-4 of the clipping range where W = 10 x the largest n_k gives 8.9e-8, for 4 sites
    holding 40-160 examples; docs/security.md).
    """
    return cfg.fed.weighting in ("examples", "tokens") and not cfg.privacy.client_level


def auto_max_weight(cfg: RunConfig) -> float:
    """``W``, the largest weight a client may report, when ``secagg.max-weight`` is 0.

    1 with client-level DP (the accountant assumes equal weights) or ``uniform``;
    ``fed.max-weight`` when SecAgg+ weighs by data held (:func:`weighs_by_held`); for
    ``seen``, ``local-steps x grad-accum x batch-size`` examples, an exact bound.

    Raises
    ------
    ConfigError
        Weighting by data held with no max weight stated (the run-config is refused at
        start-up already; a ``RunConfig`` built without ``fed.aggregation = secagg+`` is
        caught here, before any round).
    """
    if cfg.privacy.client_level or cfg.fed.weighting == "uniform":
        return 1.0
    if weighs_by_held(cfg):
        check_secagg_max_weight(cfg)
        return cfg.secagg.max_weight or cfg.fed.max_weight
    return float(cfg.train.local_steps * cfg.train.grad_accum * cfg.train.batch_size)


def auto_clipping_range(cfg: RunConfig, server_round: int, global_max_abs: float) -> float:
    """Elementwise bound on a client's update this round, with a safety margin.

    From :func:`local_update_bound` at this round's learning rate and the largest weight of
    the global adapter. Under client-level DP every update is first clipped to L2 norm
    ``privacy.clip-norm``, which bounds each of its values too.
    """
    train = cfg.train
    bound = SAFETY_MARGIN * local_update_bound(
        learning_rate=train.learning_rate_at(server_round, cfg.fed.num_rounds),
        steps=train.local_steps,
        weight_decay=train.weight_decay,
        start_max_abs=global_max_abs,
        dtype=cfg.model.compute_dtype,
    )
    if cfg.privacy.client_level:
        bound = min(bound, cfg.privacy.clip_norm)
    return bound


def derive_params(
    cfg: RunConfig, *, num_sampled: int, server_round: int = 1, global_max_abs: float = 0.0
) -> SecAggParams:
    """Resolve every ``secagg.*`` setting for a round with ``num_sampled`` clients.

    Raises
    ------
    ConfigError
        A setting cannot work with this many clients; the message names the key.
    """
    s = cfg.secagg
    if num_sampled < MIN_SAMPLED_CLIENTS:
        raise ConfigError(
            f"run-config 'fed.aggregation' = 'secagg+': needs at least {MIN_SAMPLED_CLIENTS} "
            f"sampled clients per round, got {num_sampled} (connect more nodes or raise "
            "'fed.fraction-train' / 'fed.min-train-clients')"
        )
    num_shares = s.num_shares or auto_num_shares(num_sampled)
    if num_shares > num_sampled:
        raise ConfigError(
            f"run-config 'secagg.num-shares' = {num_shares}: more than the {num_sampled} "
            "clients sampled this round"
        )
    threshold = s.reconstruction_threshold or auto_threshold(num_shares)
    if not 2 <= threshold < num_shares:
        raise ConfigError(
            f"run-config 'secagg.reconstruction-threshold' = {threshold}: must be in "
            f"[2, num-shares = {num_shares}) (Flower needs room for at least one dropout)"
        )
    quantization = s.quantization_range or auto_quantization_range(num_sampled)
    if num_sampled * quantization >= MODULUS_RANGE:
        raise ConfigError(
            f"run-config 'secagg.quantization-range' = {quantization}: with {num_sampled} "
            f"clients the masked sum can reach {num_sampled} x {quantization} >= 2^32 and wrap; "
            f"use at most {auto_quantization_range(num_sampled)}"
        )
    if quantization < MIN_QUANTIZATION_RANGE:
        raise ConfigError(
            f"run-config 'secagg.quantization-range' = {quantization}: too coarse; with "
            f"{num_sampled} clients at most {auto_quantization_range(num_sampled)} fits the "
            f"modulus and at least {MIN_QUANTIZATION_RANGE} is needed for the precision"
        )
    return SecAggParams(
        num_sampled=num_sampled,
        num_shares=num_shares,
        reconstruction_threshold=threshold,
        clipping_range=s.clipping_range or auto_clipping_range(cfg, server_round, global_max_abs),
        quantization_range=quantization,
        max_weight=s.max_weight or auto_max_weight(cfg),
        # Four stages share the round: by default each waits a quarter of it, so a site
        # silent in one stage leaves the others their time (the loop also caps every
        # stage at what is left of fed.round-timeout).
        timeout=s.timeout or cfg.fed.round_timeout / NUM_STAGES,
    )


def error_bound_for_total(
    clipping_range: float, quantization_range: int, num_clients: int, weight_total: float
) -> float:
    """:func:`aggregate_error_bound` for a round whose quantized weights ``q_k / Q`` sum to
    ``weight_total`` (what the server learns, :func:`decode_counts`): ``3 c m / (Q total)``."""
    if num_clients < 1 or not weight_total > 0:
        raise ValueError(f"need clients and a positive weight total, got {weight_total}")
    return 3 * clipping_range * num_clients / (quantization_range * weight_total)


def aggregate_error_bound(
    clipping_range: float, quantization_range: int, weight_ratios: Sequence[float]
) -> float:
    """Worst-case ``|SecAgg+ aggregate - weighted FedAvg|`` of one value.

    For clients with weight ratios ``r_k = n_k / W <= 1`` and values ``|x_k| <= c``, let
    ``m`` be the number of clients and ``q = Q * sum_k r_k - m/2`` the smallest possible
    sum of quantized weights. Stochastic rounding moves each client's value by less than one
    level, ``2c/Q``, which the division by ``q/Q`` turns into ``< 2cm/q`` on the average;
    rounding each weight to a multiple of ``1/Q`` shifts the weighted average by at most
    ``cm/q``. Together::

        |error| < 3 c m / (Q sum_k r_k - m/2)

    about ``3c/Q`` when every client reports the max weight.
    """
    m = len(weight_ratios)
    if m == 0 or any(not 0 < r <= 1 for r in weight_ratios):
        raise ValueError(f"weight ratios must be in (0, 1], got {list(weight_ratios)}")
    smallest_total = quantization_range * sum(weight_ratios) - m / 2
    return 3 * clipping_range * m / smallest_total


# --------------------------------------------------------------------------------------
# Encoding: adapter update <-> the list of arrays SecAgg+ masks
# --------------------------------------------------------------------------------------


def ordered_keys(state: Mapping[str, np.ndarray]) -> list[str]:
    """Adapter keys in the order both sides put them on the legacy (nameless) wire."""
    return sorted(state)


def state_to_arrays(state: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The arrays of ``state`` in :func:`ordered_keys` order."""
    return [state[key] for key in ordered_keys(state)]


def arrays_to_state(arrays: Sequence[np.ndarray], keys: Sequence[str]) -> AdapterState:
    """Name nameless arrays by ``keys`` (already in :func:`ordered_keys` order), as float32."""
    if len(arrays) != len(keys):
        raise ValueError(f"got {len(arrays)} arrays for {len(keys)} adapter keys")
    return {key: np.asarray(a, dtype=np.float32) for key, a in zip(keys, arrays, strict=True)}


@dataclass(frozen=True)
class EncodedUpdate:
    """What a client hands to ``secaggplus_mod``, and what it learned doing so."""

    arrays: list[np.ndarray]
    """Update arrays in key order, then the secure metrics vector."""
    clipped_values: int
    """Values that the elementwise clip to the clipping range changed."""
    norm_before_clip: float
    """L2 norm of the raw update (it stays on the client)."""


def encode_update(
    local: Mapping[str, np.ndarray],
    global_state: Mapping[str, np.ndarray],
    *,
    clipping_range: float,
    l2_clip_norm: float | None = None,
    metrics: Mapping[str, float] | None = None,
) -> EncodedUpdate:
    """``local - global``, optionally clipped to an L2 norm, then clipped to ``+-c``.

    Clipping here rather than in Flower's quantizer keeps the meaning simple: the aggregate
    is the weighted mean of exactly these clipped updates. ``metrics`` (``SECURE_METRICS``)
    travel in one extra array, scaled into ``[0, c]``; None sends zeros (their mean is then
    meaningless, which the server knows from the run-config).
    """
    if set(local) != set(global_state):
        raise ValueError("local and global adapters have different keys")
    # In float64 the difference of two float32 adapters is exact, so the server's
    # global + mean(delta) is FedAvg of the local adapters up to quantization alone.
    delta = {
        k: np.asarray(local[k], np.float64) - np.asarray(global_state[k], np.float64) for k in local
    }
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    if l2_clip_norm is not None:
        delta, _, _ = clip_update(delta, l2_clip_norm)
    arrays, clipped = [], 0
    for key in ordered_keys(delta):
        value = delta[key]
        clipped += int(np.count_nonzero(np.abs(value) > clipping_range))
        # float64: secaggplus_mod scales and quantizes in the dtype it gets, and float32
        # cannot resolve the 2^25..2^30 levels of a large quantization range. These arrays
        # never leave the client (the masked integers do), so the width costs nothing.
        arrays.append(np.clip(value, -clipping_range, clipping_range))
    arrays.append(encode_metrics(metrics, clipping_range))
    return EncodedUpdate(arrays, clipped, norm)


def encode_metrics(metrics: Mapping[str, float] | None, clipping_range: float) -> np.ndarray:
    """``SECURE_METRICS`` clipped to ``[0, LOSS_BOUND]`` and scaled into ``[0, c]``, then a
    zero for each of ``SECURE_COUNTS`` (the counts enter after masking, :func:`add_counts`)."""
    values = [float((metrics or {}).get(name, 0.0)) for name in SECURE_METRICS]
    clipped = np.clip(np.nan_to_num(values, nan=LOSS_BOUND), 0.0, LOSS_BOUND)
    return np.concatenate([clipped * (clipping_range / LOSS_BOUND), np.zeros(len(SECURE_COUNTS))])


def add_counts(
    masked: Sequence[np.ndarray], counts: Mapping[str, int], modulus_range: int = MODULUS_RANGE
) -> list[np.ndarray]:
    """Add ``COUNT_STEP x count`` to each count's slot of a masked vector, mod ``M``.

    The slots sit at the end of the last array (the metrics vector) and hold a 0, which
    quantizes to ``Q/2`` whatever the weight: what is added there reaches the unmasked sum
    as is, *unweighted* (the masks cancel mod ``M`` and nothing else scales it), which a
    value inside the update could not (``secaggplus_mod`` multiplies every value by the
    weight ratio before quantizing). ``in-sum`` is always 1.
    """
    values = [int(counts.get(name, 0)) for name in SECURE_COUNTS[:-1]] + [1]
    if any(v not in (0, 1) for v in values):
        raise ValueError(f"counts must be 0 or 1, got {dict(counts)}")
    out = [np.asarray(a, dtype=np.int64).copy() for a in masked]
    tail = out[-1].reshape(-1)  # a view: the metrics vector is 1-D
    tail[-len(SECURE_COUNTS) :] += COUNT_STEP * np.asarray(values, dtype=np.int64)
    tail[-len(SECURE_COUNTS) :] %= modulus_range
    return out


@dataclass(frozen=True)
class SecureCounts:
    """What the unmasked sum says about the round's weights, and nothing per site."""

    clamped: int
    """Sites whose weight was clamped to ``W``."""
    weight_total: float
    """``sum_k q_k / Q``: the sites' quantized weight ratios ``min(n_k, W) / W``, summed."""


def decode_aggregate(
    arrays: Sequence[np.ndarray], keys: Sequence[str], clipping_range: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Split the unmasked aggregate into the mean update (float64) and the mean metrics."""
    if len(arrays) != len(keys) + 1:
        raise ValueError(f"aggregate has {len(arrays)} arrays, expected {len(keys) + 1}")
    delta = {k: np.asarray(a, dtype=np.float64) for k, a in zip(keys, arrays, strict=False)}
    scaled = np.asarray(arrays[-1], dtype=np.float64)[: len(SECURE_METRICS)]
    scaled = scaled * (LOSS_BOUND / clipping_range)
    return delta, {name: float(v) for name, v in zip(SECURE_METRICS, scaled, strict=True)}


def decode_counts(
    aggregate: Sequence[np.ndarray], clipping_range: float, quantization_range: int, in_sum: int
) -> SecureCounts:
    """The counts of :func:`add_counts` from the unmasked aggregate of ``in_sum`` sites.

    Flower's workflow dequantizes the sum and divides it by ``sum_k q_k / Q``, so a slot
    to which every site added ``COUNT_STEP x f_k`` reads ``2c COUNT_STEP sum_k f_k /
    sum_k q_k``: the ``in-sum`` slot (``f_k = 1``) gives the total ``sum_k q_k``, and the
    ratio of the two slots the count of clamped sites.
    """
    tail = np.asarray(aggregate[-1], dtype=np.float64).reshape(-1)[-len(SECURE_COUNTS) :]
    clamped_slot, ones_slot = float(tail[0]), float(tail[1])
    if in_sum < 1 or not ones_slot > 0:
        raise ValueError(
            f"the count slots hold {tail.tolist()} for {in_sum} sites: a client without "
            "the counting mod (client_apps.secagg.make_app) is in the sum"
        )
    ratio = clamped_slot / ones_slot
    weight_total = 2 * clipping_range * COUNT_STEP * in_sum / ones_slot / quantization_range
    # Each site writes its own slots before masking: a hostile one can put anything there.
    # Honest sums give a count in [0, m] and a total of m weights of at most 1 each.
    if not (
        math.isfinite(ratio)
        and -0.5 <= in_sum * ratio <= in_sum + 0.5
        and 0 < weight_total <= in_sum * (1 + 1 / quantization_range)
    ):
        raise ValueError(
            f"the count slots read {in_sum * ratio:g} clamped sites and a weight total of "
            f"{weight_total:g} for {in_sum} sites in the sum: a site wrote into them"
        )
    return SecureCounts(clamped=round(in_sum * ratio), weight_total=weight_total)


def apply_update(
    global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
) -> AdapterState:
    """``global + delta`` in float64, stored as float32."""
    return {
        k: (np.asarray(global_state[k], np.float64) + delta[k]).astype(np.float32)
        for k in global_state
    }


def dp_sensitivity(
    clip_norm: float, clipping_range: float, quantization_range: int, num_values: int
) -> float:
    """L2 sensitivity of one client on the SecAgg+ sum under client-side clipping.

    The client clips its update to L2 norm ``clip_norm``; stochastic rounding can then move
    each of its ``num_values`` values by less than one level, ``2c/Q``, which adds at most
    ``2c sqrt(d) / Q`` to the norm of what enters the sum.
    """
    return clip_norm + 2 * clipping_range / quantization_range * math.sqrt(num_values)


def max_abs(state: Mapping[str, np.ndarray]) -> float:
    """Largest absolute value in an adapter state."""
    return max((float(np.max(np.abs(v))) for v in state.values() if v.size), default=0.0)
