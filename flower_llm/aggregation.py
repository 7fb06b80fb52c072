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
    result: AdapterState = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].astype(np.float64) * (weight / total)
        result[key] = acc.astype(np.float32)
    return result


def update_problem(
    state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], weight: float
) -> str | None:
    """Why a client update cannot be averaged into ``reference``, or None if it can."""
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
        if not np.all(np.isfinite(value)):
            return f"'{key}' holds NaN or Inf"
    return None
