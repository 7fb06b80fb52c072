"""Weighted federated averaging over plain adapter states, reply bounds and robust rules.

API-neutral on purpose: the Message-API strategy and the legacy SecAgg+ path call the
same functions, so there is one implementation of the maths.

A reply passes three kinds of check before it is averaged:

- structure (:func:`update_problem`): keys, shapes, float dtypes, a positive finite weight;
- bounds (:func:`bound_reply`): every value representable in float32 (a float64 ``1e300``
  is finite but overflows in the cast), its weight at most ``max_weight``, every value of
  its update ``local - global`` within a per-value bound (derived from local AdamW, see
  :func:`derive_update_bound`) and the update's L2 norm within a bound.
  Beyond a bound the reply is dropped with the reason, or clamped to the bound;
- the aggregation rule (:func:`robust_aggregate`): weighted FedAvg, or one of the robust
  rules over the accepted updates.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from flower_llm import sumkernel, wire

if TYPE_CHECKING:
    from flower_llm.adapters import AdapterState
    from flower_llm.config import RunConfig

FLOAT32_MAX = float(np.finfo(np.float32).max)

MAX_HELD_EXAMPLES = 2.0**24
"""Derived ``fed.max-weight`` for weighting by examples held: 16.7 M training examples, far
above any instruction-tuning site and exactly representable in float32. Set the key to your
largest site's size for a tighter bound."""

WIRE_UNIT_ROUNDOFF = {
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    # Compressed formats send the update; the server adds it to the float32 reference.
    "bfloat16": 2.0**-24,
    "int8": 2.0**-24,
    "nf4": 2.0**-24,
}
"""Relative rounding of one value of a whole adapter stored in the wire dtype."""

COMPRESSED_FORMATS = ("bfloat16", "int8", "nf4")
"""``fed.wire-dtype`` values that send updates (:mod:`flower_llm.compression`)."""


MAX_SITE_METRIC = float(2**53)
"""Largest magnitude of any metric a site sends: counts up to 2^53 are exact in float64,
and a mean of values this size cannot overflow."""


def metric_problem(metrics: Mapping[str, object], counts: Collection[str] = ()) -> str | None:
    """Why a reply's metrics cannot be used, or None.

    Every value (a list's every element) must be a finite number within
    ``+-MAX_SITE_METRIC``; a metric ending in ``epsilon`` may also be ``+inf`` (a site
    training without noise) but never negative or NaN. This holds for the metrics a site
    chose to send too: the server averages them into metrics.jsonl. Counts (``counts``,
    the weights among them) need only be finite and >= 0: their size is
    ``fed.max-weight``'s to bound, and a sum of counts leaves out any beyond 2^53.
    """
    for key, value in metrics.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, int | float):
                return f"metric '{key}' = {item!r} is not a number"
            if key in counts:
                if not (math.isfinite(item) and item >= 0):
                    return f"metric '{key}' = {item!r} is not a count (finite, >= 0)"
                continue
            if key.endswith("epsilon"):
                if not item >= 0:  # NaN fails too
                    return f"metric '{key}' = {item!r} is not an epsilon (>= 0)"
                if item == math.inf:
                    continue
            if not math.isfinite(item) or abs(item) > MAX_SITE_METRIC:
                return f"metric '{key}' = {item!r} is not a finite number within +-2^53"
    return None


def eval_metrics_problem(
    loss: float, tokens: float, accuracy: float, examples: float
) -> str | None:
    """Why an evaluation reply's pooled metrics are impossible, or None.

    A mean token loss is finite and >= 0, a token accuracy lies in [0, 1], and the token
    and example counts are whole numbers in [1, 2^53] and [0, 2^53].
    """
    if not (math.isfinite(loss) and loss >= 0):
        return f"loss {loss!r} is not a finite number >= 0"
    if not 0.0 <= accuracy <= 1.0:
        return f"token accuracy {accuracy!r} is outside [0, 1]"
    if not (1 <= tokens <= MAX_SITE_METRIC and float(tokens).is_integer()):
        return f"{tokens!r} tokens is not a whole number in [1, 2^53]"
    if not (0 <= examples <= MAX_SITE_METRIC and float(examples).is_integer()):
        return f"{examples!r} examples is not a whole number in [0, 2^53]"
    return None


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> AdapterState:
    """``w = sum_k (n_k / n) * w_k`` for every array, accumulated in float64.

    Parameters
    ----------
    states : sequence of adapter states
        Client updates with identical keys and shapes.
    weights : sequence of float
        Non-negative finite weights ``n_k`` (examples or tokens), not all zero. They are
        divided by the largest one before they are summed, so the sum cannot overflow
        whatever their size (two weights of 1e308 average like two weights of 1).
    """
    if len(states) != len(weights) or not states:
        raise ValueError(
            f"need one weight per state, got {len(states)} states, {len(weights)} weights"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or max(weights) <= 0:
        raise ValueError(
            f"weights must be finite and non-negative with a positive sum, got {list(weights)}"
        )
    largest = max(float(w) for w in weights)
    relative = [float(w) / largest for w in weights]  # in [0, 1]: the sum is at most len
    total = math.fsum(relative)
    factors = [r / total for r in relative]
    result: AdapterState = {}
    for key, first in states[0].items():
        # One float64 accumulator and one scratch buffer per array, whatever the number
        # of clients; the replies are read as they are (float32 or float16, views of the
        # messages' bytes) and cast inside the ufunc loop, so no client's array is copied.
        acc = np.zeros(first.shape, dtype=np.float64)
        scratch = np.empty(first.shape, dtype=np.float64)
        for state, factor in zip(states, factors, strict=True):
            np.multiply(state[key], factor, out=scratch, dtype=np.float64)
            acc += scratch
        result[key] = acc.astype(np.float32)
    return result


def non_finite_key(state: Mapping[str, np.ndarray]) -> str | None:
    """The first array of ``state`` that holds NaN or Inf, or None."""
    if isinstance(state, wire.FlatState) and np.isfinite(state.flat).all():
        return None  # one call over every value (the usual case)
    return next((key for key, value in state.items() if not np.isfinite(value).all()), None)


def update_problem(
    state: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    weight: float,
    *,
    check_finite: bool = True,
) -> str | None:
    """Why a client update cannot be averaged into ``reference``, or None if it can.

    Structure only (keys, shapes, dtypes, weight), plus NaN/Inf unless ``check_finite``
    is False; :func:`bound_reply` checks the values against bounds.
    """
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        return f"weight {weight!r} is not a number"
    if not math.isfinite(weight) or weight <= 0:
        return f"weight {weight!r} is not positive"
    if (
        isinstance(state, wire.FlatState)
        and isinstance(reference, wire.FlatState)
        and state.layout == reference.layout
        and state.flat.dtype.kind == "f"
    ):
        # The same keys and shapes by construction; one dtype for all (a packed reply).
        if check_finite and not np.isfinite(state.flat).all():
            return f"'{non_finite_key(state)}' holds NaN or Inf"
        return None
    missing = set(reference) - set(state)
    if missing:
        return f"missing {len(missing)} adapter arrays, e.g. '{sorted(missing)[0]}'"
    extra = set(state) - set(reference)
    if extra:
        return f"{len(extra)} unexpected arrays, e.g. '{sorted(extra)[0]}'"
    for key, ref in reference.items():
        value = state[key]
        if value.shape != ref.shape:
            return f"'{key}' has shape {value.shape}, expected {ref.shape}"
        if value.dtype.kind != "f":
            return f"'{key}' has dtype {value.dtype}, expected float"
    if check_finite:
        bad = non_finite_key(state)
        if bad is not None:
            return f"'{bad}' holds NaN or Inf"
    return None


# --------------------------------------------------------------------------------------
# Bounds on one reply
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyBounds:
    """What one reply may claim and move in a round."""

    max_weight: float = math.inf
    """Largest weight a reply may claim (``fed.max-weight``)."""
    max_abs_update: float | None = None
    """Per-value bound on ``|local - global|`` (``fed.update-bound``); None = none."""
    max_update_norm: float | None = None
    """L2 bound on the whole update (``fed.max-update-norm``); None = none."""
    clamp: bool = False
    """Clamp a reply beyond a bound to it instead of dropping the reply."""


@dataclass
class BoundedReply:
    """A reply within its bounds, possibly after clamping."""

    state: AdapterState
    """The reply's arrays as sent, or ``global + clamped update`` (float64) if clamped."""
    weight: float
    update_norm: float | None
    """L2 norm of ``local - global`` as sent, before any clamping (None: not computed)."""
    clamped: list[str] = field(default_factory=list)
    """What was clamped and why; empty if nothing was."""


def bound_reply(
    state: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    weight: float,
    bounds: ReplyBounds,
    scratch: dict[str, np.ndarray] | None = None,
    *,
    want_norm: bool = False,
) -> BoundedReply | str:
    """The reply within ``bounds`` (see :class:`BoundedReply`), or why it is dropped.

    A float64 value beyond float32's range (finite, but Inf once the aggregate is cast)
    is named and always dropped, as is NaN or Inf; a clamp cannot repair a reply that
    holds those. ``state`` must have passed :func:`update_problem` (same keys and shapes).

    Each value is read once, and only as far as needed: the update ``value - ref`` when a
    per-value or norm bound is set (its squares only for a norm bound or ``want_norm``);
    with no value bound, a float32 or float16 reply is not read here at all, and its
    NaN/Inf is left to the caller's check of the aggregate (the weighted average of
    finite values is finite). ``scratch`` (key -> float32 buffer, filled on first use)
    lets a caller that checks many replies of one layout reuse one buffer per array
    instead of faulting in fresh memory for every reply.
    """
    clamped: list[str] = []
    values_clamped = False
    if weight > bounds.max_weight:
        if not bounds.clamp:
            return f"weight {weight:.6g} above fed.max-weight = {bounds.max_weight:.6g}"
        clamped.append(f"weight {weight:.6g} clamped to fed.max-weight = {bounds.max_weight:.6g}")
        weight = bounds.max_weight
    need_norm = want_norm or bounds.max_update_norm is not None
    need_update = need_norm or bounds.max_abs_update is not None
    updates: dict[str, np.ndarray] = {}
    squares = 0.0
    for key, ref in reference.items():
        value = state[key]
        if value.size == 0:
            updates[key] = np.zeros(value.shape, np.float64)
            continue
        if value.dtype.itemsize > 4:
            peak = float(np.max(np.abs(value)))
            if not math.isfinite(peak):
                return f"'{key}' holds NaN or Inf"
            if peak > FLOAT32_MAX:
                return f"'{key}' holds {peak:.3g}, beyond float32's range"
        if not need_update:
            continue
        buffer = None
        if scratch is not None and not bounds.clamp:
            buffer = scratch.get(key)
            if buffer is None or buffer.shape != value.shape:
                buffer = scratch[key] = np.empty(value.shape, np.float32)
        update, largest = _update_of(value, ref, exact=bounds.clamp, out=buffer)
        if not math.isfinite(largest):
            return f"'{key}' holds NaN or Inf"
        if bounds.max_abs_update is not None and largest > bounds.max_abs_update:
            reason = (
                f"'{key}' moves a value by {largest:.3g}, beyond the per-value update bound "
                f"{bounds.max_abs_update:.3g} (fed.update-bound)"
            )
            if not bounds.clamp:
                return reason
            clamped.append(reason + ": clamped")
            values_clamped = True
            np.clip(update, -bounds.max_abs_update, bounds.max_abs_update, out=update)
        if need_norm:
            flat = update.ravel()
            key_squares = float(np.dot(flat, flat))
            if not math.isfinite(key_squares):  # float32 squares overflow: redo in float64
                key_squares = float(np.sum(np.square(flat, dtype=np.float64)))
            squares += key_squares
        updates[key] = update
    norm = math.sqrt(squares) if need_norm else None
    if bounds.max_update_norm is not None and norm is not None and norm > bounds.max_update_norm:
        reason = (
            f"update L2 norm {norm:.4g} above fed.max-update-norm = {bounds.max_update_norm:.4g}"
        )
        if not bounds.clamp:
            return reason
        clamped.append(reason + ": scaled down")
        values_clamped = True
        scale = bounds.max_update_norm / norm
        for update in updates.values():
            update *= scale
    if not values_clamped:
        return BoundedReply(dict(state), weight, norm, clamped)
    bounded = {key: reference[key].astype(np.float64) + updates[key] for key in reference}
    return BoundedReply(bounded, weight, norm, clamped)


def _update_of(
    value: np.ndarray, ref: np.ndarray, *, exact: bool, out: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """``(value - ref, max |value - ref|)``.

    float32 and float16 replies are differenced in float32, which is exact to one
    rounding and half the memory traffic of float64; only if that overflows (values
    near float32's limit) or ``exact`` asks for an update to clamp is float64 used.
    """
    if value.dtype.itemsize <= 4 and not exact:
        update = np.subtract(value, ref, out=out, dtype=np.float32)
        largest = max(float(update.max()), -float(update.min()))
        if math.isfinite(largest):
            return update, largest
    update = np.subtract(value, ref, dtype=np.float64)
    return update, max(float(update.max()), -float(update.min()))


def derive_max_weight(cfg: RunConfig) -> float:
    """``fed.max-weight``, or the largest weight a site can honestly claim under ``cfg``.

    ``seen``: a round trains ``local-steps x grad-accum`` micro-batches of at most
    ``batch-size`` examples, an exact bound. ``uniform``: 1. Examples or tokens *held*
    cannot be derived from the settings: :data:`MAX_HELD_EXAMPLES` (times the response
    tokens an example can hold, ``max-seq-length - 1``). Under client-level DP weights are
    not used (every site weighs the same) and nothing is bounded.
    """
    fed = cfg.fed
    if cfg.privacy.client_level:
        return math.inf
    if fed.max_weight > 0:
        return fed.max_weight
    if fed.weighting == "uniform":
        return 1.0
    if fed.weighting == "seen":
        return float(cfg.train.local_steps * cfg.train.grad_accum * cfg.train.batch_size)
    if fed.weighting == "tokens":
        return MAX_HELD_EXAMPLES * (cfg.data.max_seq_length - 1)
    return MAX_HELD_EXAMPLES


def derive_update_bound(cfg: RunConfig, server_round: int, global_max_abs: float) -> float | None:
    """Per-value bound on a site's update this round (``fed.update-bound``), or None if off.

    :func:`flower_llm.secagg.local_update_bound` (what one round of local AdamW can move a
    weight, whatever the data) with SecAgg+'s safety margin, plus one rounding of the
    weight and of the update in the wire dtype, since the server compares the float32
    decodings of what was sent.
    """
    if cfg.fed.update_bound == "off":
        return None
    from flower_llm.secagg import SAFETY_MARGIN, local_update_bound

    train = cfg.train

    def adamw_bound(learning_rate: float) -> float:
        # Client-side DP clipping (client-fixed) only makes an update smaller: the AdamW
        # bound holds in every mode.
        return SAFETY_MARGIN * local_update_bound(
            learning_rate=learning_rate,
            steps=train.local_steps,
            weight_decay=train.weight_decay,
            start_max_abs=global_max_abs,
            dtype=cfg.model.compute_dtype,
        )

    num_rounds = cfg.fed.num_rounds
    bound = adamw_bound(train.learning_rate_at(server_round, num_rounds))
    wire_dtype = cfg.fed.wire_dtype
    if wire_dtype in COMPRESSED_FORMATS and cfg.fed.error_feedback:
        # A decoded value is at most its block's absmax, so quantization alone never
        # exceeds the bound. With error feedback a site sends Q(u + e): |e| <= h (b' + |e'|)
        # round after round (h: the format's largest error relative to a block's absmax),
        # so |e| <= h b_max / (1 - h), b_max the bound of the round with the largest
        # learning rate (it may decay), computed at today's global (larger or equal).
        from flower_llm.compression import RELATIVE_ERROR

        h = RELATIVE_ERROR[wire_dtype]
        largest = max(
            adamw_bound(train.learning_rate_at(r, num_rounds)) for r in range(1, num_rounds + 1)
        )
        bound += h / (1 - h) * largest
    roundoff = WIRE_UNIT_ROUNDOFF[wire_dtype] * (global_max_abs + bound)
    return bound + 2 * roundoff


# --------------------------------------------------------------------------------------
# Aggregation rules
# --------------------------------------------------------------------------------------


def robust_aggregate(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    reference: Mapping[str, np.ndarray],
    rule: str = "none",
    trim_fraction: float = 0.2,
    norms: Sequence[float] | None = None,
) -> AdapterState:
    """The new global state from accepted replies under ``fed.robust = rule``.

    - ``none``: :func:`weighted_average` of the states (FedAvg).
    - ``norm-bound``: every update ``u_k = w_k - w`` is scaled to at most the median of
      the round's update norms, ``u_k * min(1, median / ||u_k||)``, then weighted FedAvg
      of ``w + u_k``. A minority cannot scale its update up; honest updates above the
      median shrink a little (bias), which is the cost.
    - ``trimmed-mean``: per value, the ``floor(trim_fraction * K)`` largest and smallest
      of the ``K`` updates are cut and the rest averaged, unweighted (Yin et al. 2018).
    - ``median``: per value, the median of the ``K`` updates, unweighted.

    Trimmed mean and median ignore the weights (a weighted median of a value that one
    site can claim a huge weight for would be that site's), hold all ``K`` updates of an
    array at once and sort them: ``O(K log K)`` per value and ``K`` times the memory.
    ``norms`` are the updates' L2 norms when the caller has them (:func:`bound_reply`
    does), saving ``norm-bound`` a pass over every reply.
    """
    if rule == "none":
        return weighted_average(states, weights)
    if not states:
        raise ValueError("no state to aggregate")
    if rule == "norm-bound":
        norms = (
            list(norms)
            if norms is not None
            else [
                math.sqrt(
                    sum(
                        float(np.sum(np.square(np.subtract(s[k], reference[k], dtype=np.float64))))
                        for k in reference
                    )
                )
                for s in states
            ]
        )
        bound = float(np.median(norms))
        scaled = []
        for state, norm in zip(states, norms, strict=True):
            if norm <= bound or norm == 0:
                scaled.append(state)
                continue
            scale = bound / norm
            scaled.append(
                {
                    k: reference[k] + scale * np.subtract(state[k], reference[k], dtype=np.float64)
                    for k in reference
                }
            )
        return weighted_average(scaled, weights)
    if rule not in ("trimmed-mean", "median"):
        raise ValueError(f"unknown aggregation rule {rule!r}")
    count = len(states)
    cut = min(math.floor(trim_fraction * count), (count - 1) // 2)
    result: AdapterState = {}
    for key, ref in reference.items():
        ref64 = ref.astype(np.float64)
        stacked = np.stack([np.subtract(s[key], ref64, dtype=np.float64) for s in states])
        if rule == "median":
            central = np.median(stacked, axis=0)
        else:
            stacked.sort(axis=0)
            central = stacked[cut : count - cut].mean(axis=0)
        result[key] = (ref64 + central).astype(np.float32)
    return result


# --------------------------------------------------------------------------------------
# Checks and aggregation in one sweep (the server's default path)
# --------------------------------------------------------------------------------------

STACK_BYTES = 4 << 20
"""Size of the block of stacked updates a sweep works on: it stays in the last-level
cache, so every reply's bytes come from memory once and every later use is a cache hit."""

REPLIES_PER_BLOCK = 64
"""Most replies stacked at once by FedAvg (the robust rules stack all of them)."""


@dataclass
class CheckedAggregate:
    """What :func:`checked_aggregate` found and made."""

    state: AdapterState | None
    """The aggregate of the kept replies (None: none kept)."""
    dropped: dict[int, str]
    """Index in ``states`` -> why that reply was dropped."""
    kept: list[int]
    """Indices of the replies in ``state``, in order."""
    norms: list[float | None]
    """L2 norm of each kept reply's update (None where not computed)."""


def checked_aggregate(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    reference: Mapping[str, np.ndarray],
    bounds: ReplyBounds,
    rule: str = "none",
    trim_fraction: float = 0.2,
    *,
    want_norm: bool = False,
) -> CheckedAggregate:
    """:func:`bound_reply` on every reply and :func:`robust_aggregate` of the rest, with
    each reply read from memory once (twice for ``norm-bound``, whose scale needs every
    norm first).

    The sweep goes array by array and, inside a large array, block by block of columns;
    for each block it copies every reply into one float64 stack that stays in cache (the
    reply's only read from memory) and subtracts the reference there (exact: the
    difference of two float32 values fits a float64 unless their exponents are more than
    29 apart), checks each row (NaN/Inf, the
    per-value bound, squares for the norm) and adds the rows to the result: FedAvg is one
    float64 matrix-vector product ``sum_k p_k (w_k - w)`` per block (groups of at most
    :data:`REPLIES_PER_BLOCK` replies, their sums added in float64), the robust rules
    sort each column of the stack. The result is ``w + sum`` in float64, rounded once to
    float32: the same float64-grade arithmetic as :func:`weighted_average`, not
    bit-for-bit the same sum.

    A reply found beyond a bound in a later array was already summed into the earlier
    ones, so the sweep starts again without it: the result is always the aggregate of
    the kept replies alone, as :func:`robust_aggregate` of them would give. Clamping is
    not done here (``bounds.clamp`` must be False).
    """
    if bounds.clamp:
        raise ValueError("checked_aggregate does not clamp: use bound_reply")
    if rule not in ("none", "norm-bound", "trimmed-mean", "median"):
        raise ValueError(f"unknown aggregation rule {rule!r}")
    return _checked_aggregate(states, weights, reference, bounds, rule, trim_fraction, want_norm)


def _checked_aggregate(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    reference: Mapping[str, np.ndarray],
    bounds: ReplyBounds,
    rule: str,
    trim_fraction: float,
    want_norm: bool,
) -> CheckedAggregate:
    dropped: dict[int, str] = {}
    need_norm = want_norm or rule == "norm-bound" or bounds.max_update_norm is not None
    while True:
        kept = [i for i in range(len(states)) if i not in dropped]
        if not kept:
            return CheckedAggregate(None, dropped, [], [])
        chosen = [states[i] for i in kept]
        for j, candidate in enumerate(chosen):
            if weights[kept[j]] > bounds.max_weight:
                dropped[kept[j]] = (
                    f"weight {weights[kept[j]]:.6g} above fed.max-weight = {bounds.max_weight:.6g}"
                )
            else:
                problem = _float32_range_problem(candidate)
                if problem is not None:
                    dropped[kept[j]] = problem
        if len(dropped) > len(states) - len(kept):
            continue
        factors = _normalised(
            [weights[i] for i in kept] if rule in ("none", "norm-bound") else [1.0] * len(kept)
        )
        sweep = _Sweep(chosen, reference, bounds, need_norm)
        summed: dict[str, np.ndarray] | None
        if rule in ("none", "norm-bound"):
            summed = sweep.run(np.asarray(factors), None, wide=rule == "norm-bound")
            if rule == "norm-bound" and summed is not None:
                summed = _scale_to_median(summed, chosen, reference, factors, sweep.norms())
        else:
            count = len(chosen)
            cut = (
                count // 2
                if rule == "median"
                else min(math.floor(trim_fraction * count), (count - 1) // 2)
            )
            summed = sweep.run(None, (rule, cut))
        if sweep.problems:
            dropped.update({kept[j]: reason for j, reason in sweep.problems.items()})
            continue
        norms_out: list[float | None] = list(sweep.norms()) if need_norm else [None] * len(kept)
        if bounds.max_update_norm is not None:
            over = {
                kept[j]: (
                    f"update L2 norm {n:.4g} above fed.max-update-norm = "
                    f"{bounds.max_update_norm:.4g}"
                )
                for j, n in enumerate(norms_out)
                if n is not None and n > bounds.max_update_norm
            }
            if over:
                dropped.update(over)
                continue
        assert summed is not None
        state = _rounded(summed, reference)
        return CheckedAggregate(state, dict(sorted(dropped.items())), kept, norms_out)


def _scale_to_median(
    summed: dict[str, np.ndarray],
    states: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    factors: Sequence[float],
    norms: Sequence[float],
) -> dict[str, np.ndarray]:
    """``summed = w + sum_k p_k u_k`` turned into ``w + sum_k p_k s_k u_k``, ``s_k =
    min(1, median / ||u_k||)``, by adding ``sum_k p_k (s_k - 1) u_k`` over the replies
    above the median only (about half): a second read of those replies, not of all."""
    median = float(np.median(norms))
    scaled = [j for j, n in enumerate(norms) if n > median and n > 0]
    if not scaled:
        return summed
    extra = np.asarray([factors[j] * (median / norms[j] - 1.0) for j in scaled])
    more = _Sweep([states[j] for j in scaled], reference, None, False).run(
        extra, None, wide=False, base=summed
    )
    assert more is not None
    return more


def _rounded(summed: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> AdapterState:
    """The float64 sums rounded once to float32, in the reference's shapes."""
    return {
        k: v.astype(np.float32, copy=False).reshape(reference[k].shape) for k, v in summed.items()
    }


def _normalised(weights: Sequence[float]) -> list[float]:
    """``n_k / n``, divided by the largest first so that no sum overflows."""
    largest = max(float(w) for w in weights)
    relative = [float(w) / largest for w in weights]
    total = math.fsum(relative)
    return [r / total for r in relative]


def _float32_range_problem(state: Mapping[str, np.ndarray]) -> str | None:
    """Why a float64 reply cannot be cast to float32 (NaN, Inf, beyond its range), or None.

    Only arrays sent wider than float32 are read; float32 and float16 ones cannot hold a
    value beyond float32's range, and their NaN/Inf is found by the sweep."""
    for key, value in state.items():
        if value.dtype.itemsize > 4 and value.size:
            peak = float(np.max(np.abs(value)))
            if not math.isfinite(peak):
                return f"'{key}' holds NaN or Inf"
            if peak > FLOAT32_MAX:
                return f"'{key}' holds {peak:.3g}, beyond float32's range"
    return None


class _Sweep:
    """One pass over every reply, array by array, block of columns by block (see
    :func:`checked_aggregate`). ``bounds`` None: no checks (a second pass)."""

    def __init__(
        self,
        states: Sequence[Mapping[str, np.ndarray]],
        reference: Mapping[str, np.ndarray],
        bounds: ReplyBounds | None,
        need_norm: bool,
    ) -> None:
        self.states = states
        self.reference = reference
        self.bounds = bounds
        self.need_norm = need_norm
        self.problems: dict[int, str] = {}
        self.squares = np.zeros(len(states))

    def norms(self) -> list[float]:
        """L2 norm of each reply's update (after a run with ``need_norm``)."""
        return [math.sqrt(float(s)) for s in self.squares]

    def run(
        self,
        factors: np.ndarray | None,
        central: tuple[str, int] | None,
        *,
        add_reference: bool = True,
        wide: bool = True,
        base: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray] | None:
        """Check every row; with ``factors`` the weighted sum, with ``central`` = (rule,
        cut) the trimmed mean or median, of the updates, added to the reference (unless
        ``add_reference`` is False): flat float64 arrays (``wide`` False: a weighted sum
        may come back as float32, rounded once), None if a row failed a check (or if
        there is nothing to sum). ``base``: flat float64 arrays the weighted sum is added
        to instead of the reference (one rounding for both).

        The sum (weighted or central) goes through the compiled kernel
        (:mod:`flower_llm.sumkernel`), every array in one call, where it is on, and
        through the NumPy blocks below where it is off or cannot take an array (replies
        of mixed dtypes)."""
        count = len(self.states)
        if central is not None and add_reference:
            compiled = self._compiled(None, add_reference, wide, None, central)
            if compiled is not None:
                return compiled
        if central is None and factors is not None:
            compiled = self._compiled(factors, add_reference, wide, base)
            if compiled is not None:
                return compiled
            if base is not None:
                extra = self.run(factors, None, add_reference=False)
                return None if extra is None else {k: base[k] + v for k, v in extra.items()}
        rows = count if central is not None else min(count, REPLIES_PER_BLOCK)
        summing = factors is not None or central is not None
        result: dict[str, np.ndarray] = {}
        stack = np.empty(0, np.float64)
        for key, ref in self.reference.items():
            flat_ref = ref.reshape(-1).astype(np.float64)
            size = flat_ref.size
            out = np.empty(size, np.float64) if summing else None
            width = max(1024, STACK_BYTES // (8 * rows))
            if stack.size < rows * min(width, size):
                stack = np.empty(rows * min(width, size), np.float64)
            values = [s[key].reshape(-1) for s in self.states]
            for start in range(0, size, width):
                stop = min(size, start + width)
                ref_block = flat_ref[start:stop]
                if central is not None:
                    block = stack[: count * (stop - start)].reshape(count, stop - start)
                    self._fill(block, values, range(count), start, stop, ref_block, key)
                    if self.problems:
                        return None
                    assert out is not None
                    if add_reference:
                        np.add(ref_block, _central(block, *central), out=out[start:stop])
                    else:
                        out[start:stop] = _central(block, *central)
                    continue
                carry = None
                for first in range(0, count, rows):
                    chosen = range(first, min(count, first + rows))
                    block = stack[: len(chosen) * (stop - start)].reshape(len(chosen), -1)
                    self._fill(block, values, chosen, start, stop, ref_block, key)
                    if factors is None:
                        continue
                    partial = factors[first : first + len(chosen)] @ block
                    if carry is None:
                        carry = ref_block + partial if add_reference else partial
                    else:
                        carry += partial
                if self.problems and factors is not None:
                    return None
                if out is not None and carry is not None:
                    out[start:stop] = carry
            if out is not None:
                result[key] = out
        return result if summing else None

    def _compiled(
        self,
        factors: np.ndarray | None,
        add_reference: bool,
        wide: bool,
        base: dict[str, np.ndarray] | None,
        central: tuple[str, int] | None = None,
    ) -> dict[str, np.ndarray] | None:
        """:meth:`run`'s weighted sum (or, with ``central``, its median or trimmed mean)
        through the compiled kernel, or None (nothing checked or recorded) if the kernel
        is off or cannot take every array."""
        flat = _flat_inputs(self.states, self.reference, base)
        if flat is not None:
            # Every reply, the reference (and base) one array each: one kernel call
            # over 20 arrays instead of 20 x 56, say.
            arrays = {"": flat[0]}
            refs = {"": flat[1]}
            bases = None if flat[2] is None else {"": flat[2]}
        else:
            arrays = {key: [s[key].reshape(-1) for s in self.states] for key in self.reference}
            refs = {k: np.ascontiguousarray(r.reshape(-1)) for k, r in self.reference.items()}
            bases = None if base is None else {k: v.reshape(-1) for k, v in base.items()}
        limit = None if self.bounds is None else self.bounds.max_abs_update
        if central is not None:
            sums = sumkernel.central_sums(arrays, refs, *central, limit)
        else:
            assert factors is not None
            sums = sumkernel.weighted_sums(
                arrays, refs, factors, limit, add_reference=add_reference, wide=wide, base=bases
            )
        if sums is None:
            return None
        if self.bounds is not None:
            self._record(sums)
            if self.problems:
                return None
        if flat is not None:
            assert isinstance(self.reference, wire.FlatState)
            return wire.FlatState(sums.out[""], self.reference.layout)
        return sums.out

    def _record(self, sums: sumkernel.Sums) -> None:
        """The compiled kernel's findings: each failing reply's reason, named by the
        first array where it fails (as the NumPy blocks name it), and the squares."""
        limit = self.bounds.max_abs_update if self.bounds is not None else None
        for index, square in enumerate(sums.squares):
            if math.isfinite(square) and not any(over[index] for over in sums.over.values()):
                continue
            # A failing reply (rare): find the first array that fails, as the NumPy
            # blocks would (the kernel counted per array, or per reply when flat).
            for key, ref in self.reference.items():
                values = self.states[index][key]
                if not np.isfinite(values).all():
                    self.problems[index] = f"'{key}' holds NaN or Inf"
                    break
                peak = float(np.max(np.abs(values.astype(np.float64) - ref), initial=0.0))
                if limit is not None and peak > limit:
                    self.problems[index] = (
                        f"'{key}' moves a value by {peak:.3g}, beyond the per-value update "
                        f"bound {limit:.3g} (fed.update-bound)"
                    )
                    break
        if self.need_norm:
            self.squares += sums.squares

    def _fill(
        self,
        block: np.ndarray,
        values: list[np.ndarray],
        chosen: range,
        start: int,
        stop: int,
        ref_block: np.ndarray,
        key: str,
    ) -> None:
        """Rows of ``block`` = the updates of replies ``chosen`` on columns
        ``[start, stop)``, each checked (NaN/Inf, per-value bound, squares)."""
        for row, index in enumerate(chosen):
            np.copyto(block[row], values[index][start:stop])
        block -= ref_block
        if self.bounds is None:
            return
        largest = np.maximum(block.max(axis=1), -block.min(axis=1))
        # One BLAS dot per row: ~2x faster here than an einsum over the block.
        squares = (
            np.fromiter((np.dot(row, row) for row in block), np.float64, len(block))
            if self.need_norm
            else None
        )
        limit = self.bounds.max_abs_update
        if np.isfinite(largest).all() and (limit is None or (largest <= limit).all()):
            # Every row passes (the usual case): no per-row Python below.
            if squares is not None:
                self.squares[chosen.start : chosen.stop] += squares
            return
        for row, index in enumerate(chosen):
            peak = float(largest[row])
            if not math.isfinite(peak):
                self.problems.setdefault(index, f"'{key}' holds NaN or Inf")
                continue
            if limit is not None and peak > limit:
                self.problems.setdefault(
                    index,
                    f"'{key}' moves a value by {peak:.3g}, beyond the per-value update "
                    f"bound {limit:.3g} (fed.update-bound)",
                )
            if squares is not None:
                self.squares[index] += float(squares[row])


def _flat_inputs(
    states: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray] | None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None] | None:
    """``(one array per reply, the reference's, base's)`` when every state, the
    reference (float32) and ``base`` (float64, if any) are flat states
    (:class:`wire.FlatState`) of one layout (same keys, order and shapes), so that each
    can be read as one array; else None."""
    if not isinstance(reference, wire.FlatState) or reference.flat.dtype != np.float32:
        return None
    layout = reference.layout
    if not all(isinstance(s, wire.FlatState) and s.layout == layout for s in states):
        return None
    flat_base = None
    if base is not None:
        if not isinstance(base, wire.FlatState) or base.layout != layout:
            return None
        if base.flat.dtype != np.float64:
            return None
        flat_base = base.flat
    return [s.flat for s in states], reference.flat, flat_base  # type: ignore[attr-defined]


def _central(block: np.ndarray, rule: str, cut: int) -> np.ndarray:
    """Per column of ``block`` (one update per row): the median, or the mean after cutting
    ``cut`` values at each end, in float64.

    Both sort the columns in place: for the few rows of a round (tens of replies), a sort
    of every column is about 5x faster than ``np.median``'s partition of each, and the
    median is the same number (the middle value, or the mean of the two middle values).
    """
    count = block.shape[0]
    block.sort(axis=0)
    if rule == "median":
        middle = count // 2
        if count % 2:
            return block[middle].copy()
        return (block[middle - 1] + block[middle]) / 2
    return block[cut : count - cut].mean(axis=0)
