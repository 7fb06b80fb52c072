"""Weighted federated averaging over plain adapter states, and reply validation.

API-neutral on purpose: the Message-API strategy and the legacy SecAgg+ path call the
same functions, so there is one implementation of the maths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from flower_llm.adapters import AdapterState


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> AdapterState:
    """``w = sum_k (n_k / n) * w_k`` for every array, accumulated in float64.

    Parameters
    ----------
    states : sequence of adapter states
        Client updates with identical keys and shapes.
    weights : sequence of float
        Non-negative weights ``n_k`` (examples or tokens), not all zero.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(
            f"need one weight per state, got {len(states)} states, {len(weights)} weights"
        )
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    factors = [float(w) / total for w in weights]
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
    return next((key for key, value in state.items() if not np.isfinite(value).all()), None)


def update_problem(
    state: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    weight: float,
    *,
    check_finite: bool = True,
) -> str | None:
    """Why a client update cannot be averaged into ``reference``, or None if it can.

    ``check_finite=False`` leaves out the NaN/Inf scan, which reads every value: a caller
    that averages first can check the aggregate once instead. With positive finite weights
    the weighted average of finite values is finite (each term is at most the largest
    value in size), so a non-finite aggregate means some reply holds NaN or Inf, and only
    then is each reply scanned to find it.
    """
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        return f"weight {weight!r} is not a number"
    if not np.isfinite(weight) or weight <= 0:
        return f"weight {weight!r} is not positive"
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
        if not np.issubdtype(value.dtype, np.floating):
            return f"'{key}' has dtype {value.dtype}, expected float"
    if check_finite:
        bad = non_finite_key(state)
        if bad is not None:
            return f"'{bad}' holds NaN or Inf"
    return None
