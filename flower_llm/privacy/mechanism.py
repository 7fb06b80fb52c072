"""The DP-FedAvg mechanism on adapter updates: clip, add noise, adapt the clip norm.

Pure numpy over ``dict[str, np.ndarray]`` (one array per LoRA tensor), so the Message-API
strategy and the legacy SecAgg+ path share it. The accounting lives in
:mod:`flower_llm.privacy.accounting`; nothing here knows about epsilon.

User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", Alg. 1): each sampled client's update ``u_i`` is clipped to L2 norm ``C``
over ALL its tensors together, the clipped updates are averaged with a fixed denominator
``m`` and Gaussian noise of standard deviation ``sigma * C / m`` is added to the average.
Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping") moves ``C`` towards a quantile of the update norms using a noised count of the
updates that were not clipped.

Security notes: every computation that bounds sensitivity happens in float64 and a clipped
update is checked in its own dtype, so rounding cannot push its norm above ``C``. Noise comes
from the caller's ``numpy.random.Generator``; ``np.random.default_rng()`` seeds it from OS
entropy, but PCG64 is not a cryptographic generator and textbook floating-point Gaussian
sampling leaks through its low-order bits (Mironov 2012; Jin et al. 2022, "Are We There Yet?
Timing and Floating-Point Attacks on Differential Privacy Systems"). Never seed it with a
value a client can know.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "adaptive_clip_norm",
    "adaptive_update_noise_multiplier",
    "add_gaussian_noise",
    "clip_update",
    "dp_fedavg_noise_stddev",
    "global_l2_norm",
    "noisy_unclipped_fraction",
]

# Rescaling attempts after which clip_update gives up (more than two never observed).
_MAX_CLIP_ATTEMPTS = 8


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_positive(name: str, value: Any) -> float:
    checked = _check_real(name, value)
    if checked <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return checked


def _check_non_negative(name: str, value: Any) -> float:
    checked = _check_real(name, value)
    if checked < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return checked


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_update(update: Mapping[str, np.ndarray]) -> None:
    if not isinstance(update, Mapping):
        raise TypeError(
            f"an adapter update is a mapping name -> array, got {type(update).__name__}"
        )
    for key, value in update.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"update[{key!r}] is a {type(value).__name__}, not a numpy array")
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(f"update[{key!r}] has dtype {value.dtype}; expected a float dtype")


def _check_rng(rng: Any) -> np.random.Generator:
    # A legacy RandomState or None would silently change where the noise comes from.
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


# ---------------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------------


def global_l2_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all arrays of ``update`` taken together, as one flat vector.

    Computed in float64. Values too large to square in float64 are handled by rescaling.

    Raises
    ------
    TypeError
        If a value is not a floating-point numpy array.
    ValueError
        If an array holds NaN or infinity (its norm, hence its clipping, is undefined), naming
        the array.
    """
    _check_update(update)
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # handled below
        for value in update.values():
            flat = value.astype(np.float64, copy=False).ravel()
            total += float(np.dot(flat, flat))
    if math.isfinite(total):
        return math.sqrt(total)
    for key, value in update.items():
        if not np.isfinite(value).all():
            raise ValueError(f"update[{key!r}] contains NaN or infinity")
    # Finite values whose squares overflow float64: scale by the largest magnitude first.
    largest = max(float(np.max(np.abs(v))) for v in update.values() if v.size)
    total = 0.0
    for value in update.values():
        flat = value.astype(np.float64).ravel() / largest
        total += float(np.dot(flat, flat))
    return largest * math.sqrt(total)


def _scale_toward_zero(value: np.ndarray, scale: float) -> np.ndarray:
    """``value * scale`` in float64, cast back to ``value.dtype`` rounding toward zero.

    Rounding to nearest can round a magnitude UP, and in float16 (or near the subnormals of
    any dtype) by enough to push the clipped norm past ``C``; toward zero it never grows.
    """
    # np.asarray: arithmetic on a 0-d array yields a numpy scalar, not an array.
    exact = np.asarray(value.astype(np.float64) * scale)
    rounded = exact.astype(value.dtype)
    if np.finfo(value.dtype).bits < 64:
        grew = np.abs(rounded.astype(np.float64)) > np.abs(exact)
        rounded = np.where(grew, np.nextafter(rounded, value.dtype.type(0)), rounded)
    return np.asarray(rounded, dtype=value.dtype)


def clip_update(
    update: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float, bool]:
    """Scale ``update`` so that its global L2 norm is at most ``clip_norm``.

    ``u <- u * min(1, C / ||u||)`` (McMahan et al. 2018, Alg. 1, "ClipFn"); the norm is over
    all arrays together, which is what bounds a client's contribution to the average.

    Parameters
    ----------
    update : mapping of str to numpy.ndarray
        A client's adapter update (floating point; any shapes).
    clip_norm : float
        ``C > 0``.

    Returns
    -------
    clipped : dict of str to numpy.ndarray
        New arrays in the input dtypes and key order (copies even when nothing is clipped).
        ``global_l2_norm(clipped) <= clip_norm`` holds exactly: casting back to the input dtype
        rounds toward zero, and should float64 rounding still overshoot, the scale is reduced
        by a few ulps and applied again.
    scale : float
        The factor applied, ``min(1, C / ||u||)`` up to that correction (before rounding).
    was_clipped : bool
        ``||u|| > C``; the bit adaptive clipping counts (negated).
    """
    limit = _check_positive("clip_norm", clip_norm)
    norm = global_l2_norm(update)
    if norm <= limit:
        return {key: value.copy() for key, value in update.items()}, 1.0, False

    scale = limit / norm
    for _ in range(_MAX_CLIP_ATTEMPTS):
        clipped = {key: _scale_toward_zero(value, scale) for key, value in update.items()}
        clipped_norm = global_l2_norm(clipped)
        if clipped_norm <= limit:
            return clipped, scale, True
        # Only float64 rounding of the products and the norm is left: shave a few ulps.
        scale *= (limit / clipped_norm) * (1.0 - 4.0 * float(np.finfo(np.float64).eps))
    raise ArithmeticError(f"could not clip an update of norm {norm!r} to {limit!r}")


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


def add_gaussian_noise(
    update: Mapping[str, np.ndarray], stddev: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Add i.i.d. ``N(0, stddev^2)`` noise to every element of ``update``.

    The sum is formed in float64 and cast back to each array's dtype. Arrays draw their noise
    in sorted key order, so the result for a seed does not depend on the mapping's order; the
    returned dict keeps the input order. ``stddev = 0`` returns exact copies.

    Parameters
    ----------
    update : mapping of str to numpy.ndarray
        Usually the average of clipped updates.
    stddev : float
        Standard deviation ``>= 0``; for DP-FedAvg :func:`dp_fedavg_noise_stddev`.
    rng : numpy.random.Generator
        Source of the noise (see the module's security notes).
    """
    scale = _check_non_negative("stddev", stddev)
    generator = _check_rng(rng)
    _check_update(update)
    if scale == 0.0:
        return {key: value.copy() for key, value in update.items()}
    noised: dict[str, np.ndarray] = {}
    for key in sorted(update):
        value = update[key]
        noise = generator.normal(0.0, scale, size=value.shape)
        noised[key] = np.asarray(value.astype(np.float64) + noise).astype(value.dtype)
    return {key: noised[key] for key in update}


def dp_fedavg_noise_stddev(
    noise_multiplier: float, clip_norm: float, num_sampled_clients: int
) -> float:
    """Standard deviation of the noise on the AVERAGE of clipped updates: ``sigma * C / m``.

    Adding or removing one client moves the sum of clipped updates by at most ``C``, so the
    sum needs ``N(0, (sigma C)^2)``; divided by ``m``, the average needs ``sigma C / m``.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma >= 0``, the value the accountant is given.
    clip_norm : float
        ``C > 0``.
    num_sampled_clients : int
        ``m >= 1``, the FIXED denominator of the average: the cohort size when a fixed
        number is sampled, the expected cohort ``q * N`` under Poisson sampling (McMahan et
        al. 2018's fixed-denominator estimator). Dividing by the realised count instead
        makes the sensitivity data dependent.
    """
    sigma = _check_non_negative("noise_multiplier", noise_multiplier)
    limit = _check_positive("clip_norm", clip_norm)
    m = _check_int("num_sampled_clients", num_sampled_clients, 1)
    return sigma * limit / m


# ---------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al. 2021)
# ---------------------------------------------------------------------------------------------


def noisy_unclipped_fraction(
    count: int, num_clients: int, stddev: float, rng: np.random.Generator
) -> float:
    """Noised fraction of clients whose update was NOT clipped: ``(count + N(0, s^2)) / m``.

    Andrew et al. 2021, Alg. 1: ``b = (sum_i b_i + N(0, sigma_b^2)) / m`` with ``b_i =
    [||u_i|| <= C]``. The value may fall outside ``[0, 1]``; it is used as is, as in the
    paper. Its privacy cost is paid by raising the update noise, see
    :func:`adaptive_update_noise_multiplier`.

    Parameters
    ----------
    count : int
        Clients with ``||u_i|| <= C``, in ``[0, num_clients]``.
    num_clients : int
        Clients whose bit was counted, ``>= 1``.
    stddev : float
        ``sigma_b >= 0``; the paper suggests ``m / 20``.
    rng : numpy.random.Generator
        Source of the noise.
    """
    m = _check_int("num_clients", num_clients, 1)
    unclipped = _check_int("count", count, 0)
    if unclipped > m:
        raise ValueError(f"count ({count}) cannot exceed num_clients ({num_clients})")
    scale = _check_non_negative("stddev", stddev)
    generator = _check_rng(rng)
    noise = float(generator.normal(0.0, scale)) if scale > 0 else 0.0
    return (unclipped + noise) / m


def adaptive_clip_norm(
    clip_norm: float,
    unclipped_fraction_noisy: float,
    target_quantile: float,
    learning_rate: float,
) -> float:
    """Geometric clip-norm update ``C <- C * exp(-eta * (b - gamma))`` (Andrew et al. 2021).

    If more than the target fraction ``gamma`` of updates went unclipped, ``C`` shrinks, else
    it grows, so ``C`` tracks the ``gamma``-quantile of update norms.

    Parameters
    ----------
    clip_norm : float
        Current ``C > 0``.
    unclipped_fraction_noisy : float
        ``b`` from :func:`noisy_unclipped_fraction` (finite; may leave ``[0, 1]``).
    target_quantile : float
        ``gamma`` in ``[0, 1]``.
    learning_rate : float
        ``eta >= 0``; the paper uses 0.2.
    """
    current = _check_positive("clip_norm", clip_norm)
    fraction = _check_real("unclipped_fraction_noisy", unclipped_fraction_noisy)
    gamma = _check_real("target_quantile", target_quantile)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    eta = _check_non_negative("learning_rate", learning_rate)
    return current * math.exp(-eta * (fraction - gamma))


def adaptive_update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier for the UPDATE when the clip count is released too.

    The count is released with noise ``sigma_b`` at sensitivity 1/2 (bits centred at 1/2), so
    the pair (update, count) is one Gaussian mechanism with multiplier ``sigma`` when the
    update gets ``sigma_u = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021, Sec. 3).
    The accountant keeps ``sigma``; the update's noise must use ``sigma_u`` or the reported
    epsilon is wrong.

    Raises
    ------
    ValueError
        If ``clipped_count_stddev <= noise_multiplier / 2``: the count alone would then cost
        more than the whole budget.
    """
    sigma = _check_non_negative("noise_multiplier", noise_multiplier)
    count_stddev = _check_non_negative("clipped_count_stddev", clipped_count_stddev)
    if sigma == 0.0:
        return 0.0
    if 2.0 * count_stddev <= sigma:
        raise ValueError(
            f"clipped_count_stddev ({clipped_count_stddev}) must exceed noise_multiplier / 2 "
            f"({sigma / 2}); raise it (Andrew et al. suggest num_sampled_clients / 20)"
        )
    return (sigma**-2 - (2.0 * count_stddev) ** -2) ** -0.5


def small_cohort_probability(population: int, sampling_rate: float, min_cohort: int) -> float:
    """Chance, per round, that one site's presence decides whether the round's sum is used.

    A mode that releases the noised sum of a Poisson cohort only when the cohort has at
    least ``k = min_cohort`` sites (SecAgg+, ``k = 3``), and noise alone otherwise, departs
    from the subsampled Gaussian exactly when the site is sampled with ``k - 1`` others:
    with it the sum of ``k`` updates is released, without it none (sensitivity ``k C``,
    not ``C``). Every other draw of the others behaves as the accounted mechanism (fewer
    than ``k - 1``: noise alone either way; more: the site moves the sum by at most ``C``).
    The others' draw does not depend on the site's data, so over a run the bad event costs
    at most the sum of its per-round chances in delta. The number of other sites is ``N - 1``
    if the site is among the ``N`` connected and ``N`` if it is not; the larger is returned:
    ``max_n P(Binomial(n, q) = k - 1)`` over ``n`` in ``{N - 1, N}``.
    """
    n_sites = _check_int("population", population, 0)
    q = _check_real("sampling_rate", sampling_rate)
    k = _check_int("min_cohort", min_cohort, 0)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling_rate must be in [0, 1], got {q!r}")
    if k <= 1:
        return 0.0  # a cohort of 0 others is always released with the site: no regime change

    def pmf(n: int, j: int) -> float:
        if j > n:
            return 0.0
        return math.comb(n, j) * q**j * (1.0 - q) ** (n - j)

    return max(pmf(n, k - 1) for n in (max(n_sites - 1, 0), n_sites))
