"""Privacy accounting of the Poisson-subsampled Gaussian mechanism: maths only, no mechanism.

What is accounted is user-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"): every round each of the ``N`` clients takes part
independently with probability ``q`` (Poisson sampling), every update is clipped to L2 norm
``C`` and the sum gets Gaussian noise of standard deviation ``sigma * C``. One round is then
the sampled Gaussian mechanism with noise multiplier ``sigma`` and sampling rate ``q``, and the
guarantee is with respect to adding or removing all the data of one client. A site's DP-SGD
is the same mechanism one level down (one optimizer step, one example, ``q = batch / n``).

Two accountants implement one :class:`Accountant` interface (``privacy.accountant``):

- :class:`PldAccountant` (the default): the privacy loss distribution of each round,
  discretised pessimistically and composed by FFT, through dp-accounting; its epsilon is an
  upper bound and, on this project's runs, 8-16 % below RDP's.
- :class:`RdpAccountant`: exact Rényi DP, computed here without any other accountant.

The Rényi divergence of order ``alpha`` of one round is (Mironov, Talwar & Zhang 2019,
"Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530)::

    rdp(alpha) = log(A_alpha) / (alpha - 1)
    A_alpha    = E_{z ~ N(0, sigma^2)} [ ((1 - q) + q * exp((2z - 1) / (2 sigma^2)))^alpha ]

computed here for integer orders by the binomial expansion (their Sec. 3.3, eq. for integer
alpha) and for fractional orders by their two-sided series, every term in log space.
Compositions add RDP order by order (Mironov 2017, "Rényi Differential Privacy", Prop. 1), and
the total converts to ``(epsilon, delta)`` by the tighter bound of Balle et al. 2020
("Hypothesis Testing Interpretations and Renyi Differential Privacy", Thm. 21) and
Canonne, Kamath & Steinke 2020 (arXiv:2004.00010, Prop. 12)::

    epsilon = min over alpha of
              rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1)

The RDP code deliberately calls no other accountant (dp-accounting, Opacus, Flower): the
tests compare it against two of them. Nothing here knows about arrays, models or Flower.

Caveat: both bounds assume Poisson sampling. Sampling a fixed number of clients without
replacement, as Flower's ``fraction_train`` does, is a different mechanism; its guarantee is
close but not identical (Balle, Barthe & Gaboardi 2018; Zhu & Wang 2019).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "Accountant",
    "DualAccountant",
    "PldAccountant",
    "RdpAccountant",
    "accountant_from_state_dict",
    "calibrate_noise_multiplier",
    "compute_rdp",
    "epsilon_after",
    "epsilons",
    "make_accountant",
    "max_rounds_within",
    "rdp_to_epsilon",
    "would_exceed",
]

#: RDP orders tried by default: dp-accounting's default orders (fractional 1.1 .. 10.9,
#: every integer 11 .. 63, then 128 .. 1024) plus 2048 and 4096, which only matter for
#: single-digit-hundredths epsilons.
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1.0 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(11, 64))
    + (128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0)
)

_STATE_FORMAT = "flower-llm/rdp-accountant"
_STATE_VERSION = 1
_STATE_KEYS = frozenset(
    {"format", "version", "noise_multiplier", "sampling_rate", "delta", "orders", "rounds", "rdp"}
)

# Fractional-order series: terms evaluated per chunk; beyond this many terms the order falls
# back to the (always valid, slightly looser) log-convexity bound.
_SERIES_CHUNK = 512
_SERIES_MAX_TERMS = 1 << 20
# Truncation makes the series an upper bound whose excess in log(A) is at most this fraction
# of log(A) (or 1e-16 absolute, float64 resolution, whichever is larger).
_SERIES_RTOL = 1e-10
_SERIES_ROUNDING_MARGIN = 64 * float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _check_noise_multiplier(value: Any, name: str = "noise_multiplier") -> float:
    sigma = _check_real(name, value)
    if not 0.0 <= sigma < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return sigma


def _check_sampling_rate(value: Any, name: str = "sampling_rate") -> float:
    q = _check_real(name, value)
    if not 0.0 < q <= 1.0:
        raise ValueError(
            f"{name} must be in (0, 1] (clients per round / population), got {value!r}"
        )
    return q


def _check_delta(value: Any, name: str = "delta") -> float:
    delta = _check_real(name, value)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return delta


def _check_target_epsilon(value: Any, name: str = "target_epsilon") -> float:
    eps = _check_real(name, value)
    if not 0.0 < eps < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return eps


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_orders(orders: Sequence[float] | None) -> tuple[float, ...]:
    if orders is None:
        return DEFAULT_ORDERS
    if isinstance(orders, str | bytes) or not isinstance(orders, Sequence | np.ndarray):
        raise ValueError(f"orders must be a sequence of numbers > 1, got {orders!r}")
    checked = tuple(_check_real("orders[i]", a) for a in orders)
    if not checked:
        raise ValueError("orders must not be empty")
    bad = [a for a in checked if not 1.0 < a < math.inf]
    if bad:
        raise ValueError(f"every RDP order must be finite and > 1, got {bad[:3]}")
    if len(set(checked)) != len(checked):
        raise ValueError("orders must not repeat")
    return checked


# ---------------------------------------------------------------------------------------------
# RDP of one round
# ---------------------------------------------------------------------------------------------


def _logsumexp(log_terms: np.ndarray) -> float:
    # scipy.special.logsumexp costs ~100 us of array-API dispatch per call; this is called
    # for every integer order at every step of a calibration.
    top = float(np.max(log_terms))
    return top + math.log(float(np.sum(np.exp(log_terms - top))))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """``log A_alpha`` for integer ``alpha >= 1`` and ``0 < q < 1`` (Mironov et al. 2019, Sec. 3.3).

    ``A_alpha = sum_k binom(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))``. The
    binomial weights sum to 1 and the ``k = 0, 1`` exponents are 0, so

        A_alpha - 1 = sum_{k>=2} binom(alpha, k) (1-q)^(alpha-k) q^k expm1((k^2 - k) / (2 sigma^2)),

    a sum of positive terms. Summing that (in log space) and taking ``log1p`` keeps full
    relative precision when ``A - 1`` is far below float64 resolution (tiny ``q``), where
    summing ``A`` directly would round the RDP to zero, i.e. report no privacy loss at all.
    """
    from scipy import special  # lazily: 0.6 s to import, and a relaying ClientApp needs none

    if alpha < 2:
        return 0.0
    k = np.arange(2, alpha + 1, dtype=np.float64)
    exponent = (k * k - k) / (2.0 * sigma**2)
    log_expm1 = exponent + np.log(-np.expm1(-exponent))  # log(e^x - 1), stable for all x > 0
    log_terms = (
        special.gammaln(alpha + 1.0)
        - special.gammaln(k + 1.0)
        - special.gammaln(alpha - k + 1.0)
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + log_expm1
    )
    log_excess = _logsumexp(log_terms)  # log(A - 1)
    return float(np.logaddexp(0.0, log_excess))


def _log_a_fractional_series(q: float, sigma: float, alpha: float) -> float | None:
    """``log A_alpha`` for fractional ``alpha`` by the series of Mironov et al. 2019, Sec. 3.3.

    The integral is split at ``z0``, where ``(1-q) mu0 = q mu1``; on each side the integrand is
    expanded by the generalised binomial series that converges there, giving ``A = sum_k
    binom(alpha, k) (s0_k + s1_k)`` with ``s0_k, s1_k > 0`` (Gaussian moments times normal
    tail probabilities). For ``k >= ceil(alpha)`` the signs of ``binom(alpha, k)`` alternate,
    starting positive, and ``s0_k + s1_k`` strictly decreases: the ratio of consecutive
    magnitudes is at most ``(k - alpha) / (k + 1)`` because ``Phi(u - d) <= exp(ud - d^2/2)
    Phi(u)``. So, by the alternating-series (Leibniz) bound, a partial sum that stops just
    before a negative term is an UPPER bound on ``A`` within the magnitude of that term: the
    result errs only on the safe side. Unlike a sum of absolute values it converges fast.

    Returns None if the series needs more than ``_SERIES_MAX_TERMS`` terms.
    """
    from scipy import special  # lazily, as in _log_a_integer

    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma**2 * (log_1mq - log_q) + 0.5
    first_alternating = math.ceil(alpha)
    log_binom_top = float(special.gammaln(alpha + 1.0))

    running = 0.0  # partial sum of all earlier chunks, in units of exp(scale)
    scale: float | None = None  # log of the largest term, which lies in the first chunk
    start = 0
    chunk = max(_SERIES_CHUNK, 2 * first_alternating + 2)
    while start < _SERIES_MAX_TERMS:
        k = np.arange(start, start + chunk, dtype=np.float64)
        j = alpha - k
        # gammaln is log|Gamma|, so this is log|binom(alpha, k)|; alpha - k + 1 is never a
        # pole because alpha is not an integer.
        log_binom = log_binom_top - special.gammaln(k + 1.0) - special.gammaln(j + 1.0)
        log_s0 = (
            log_binom
            + k * log_q
            + j * log_1mq
            + (k * k - k) / (2.0 * sigma**2)
            + special.log_ndtr((z0 - k) / sigma)
        )
        log_s1 = (
            log_binom
            + j * log_q
            + k * log_1mq
            + (j * j - j) / (2.0 * sigma**2)
            + special.log_ndtr((j - z0) / sigma)
        )
        log_t = np.logaddexp(log_s0, log_s1)
        negative = (k > first_alternating) & ((k - first_alternating) % 2 == 1)
        if scale is None:
            scale = float(np.max(log_t))
        signed = np.where(negative, -1.0, 1.0) * np.exp(log_t - scale)
        partial = running + np.cumsum(signed)

        # Stop after index K (last included term positive, so the next is negative and the
        # tail is <= 0) once the next term is negligible against log(A).
        idx = np.arange(chunk - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sum = scale + np.log(partial[:-1])
            allowed = log_sum + np.log(np.maximum(_SERIES_RTOL * np.maximum(log_sum, 0.0), 1e-16))
        ok = (k[:-1] >= first_alternating) & negative[1:] & (log_t[1:] <= allowed)
        hits = idx[ok]
        if hits.size:
            stop = int(hits[0])
            total = running + float(np.sum(signed[: stop + 1]))  # pairwise summation
            # The sum of mostly positive terms near 1 carries a rounding error of a few dozen
            # ulps of A; add that much to log(A) so rounding cannot land below the true value.
            return scale + math.log(total) + _SERIES_ROUNDING_MARGIN
        running = float(partial[-1])
        start += chunk
        chunk *= 2
    return None


def _log_a(q: float, sigma: float, alpha: float, integer_log_a: dict[int, float]) -> float:
    """``log A_alpha`` for any order ``alpha > 1`` and ``0 < q < 1``.

    ``integer_log_a`` memoises integer orders across the orders of one ``(q, sigma)``.
    """

    def at_integer(n: int) -> float:
        if n not in integer_log_a:
            integer_log_a[n] = _log_a_integer(q, sigma, n)
        return integer_log_a[n]

    if float(alpha).is_integer():
        return at_integer(int(alpha))
    # log A_alpha is convex in alpha (a log moment generating function) and log A_1 = 0, so the
    # chord between the neighbouring integer orders is a valid upper bound. It guards the
    # series against rounding and replaces it should the series not converge.
    lo, hi = math.floor(alpha), math.ceil(alpha)
    chord = (hi - alpha) * at_integer(lo) + (alpha - lo) * at_integer(hi)
    series = _log_a_fractional_series(q, sigma, alpha)
    return chord if series is None else min(series, chord)


@functools.lru_cache(maxsize=512)
def _rdp_cached(noise_multiplier: float, sampling_rate: float, orders: tuple[float, ...]) -> bytes:
    sigma, q = noise_multiplier, sampling_rate
    if sigma == 0.0:
        rdp = np.full(len(orders), np.inf)
    elif q == 1.0:
        rdp = np.array(orders) / (2.0 * sigma**2)
    else:
        memo: dict[int, float] = {}
        rdp = np.array([max(_log_a(q, sigma, a, memo), 0.0) / (a - 1.0) for a in orders])
    return rdp.tobytes()  # immutable, so the cache can never be mutated by a caller


def compute_rdp(
    noise_multiplier: float, sampling_rate: float, orders: Sequence[float] | None = None
) -> np.ndarray:
    """RDP of ONE round of the Poisson-subsampled Gaussian mechanism, order by order.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``: noise standard deviation divided by the L2 sensitivity (the clip norm).
        Zero means no privacy: every order is ``inf``.
    sampling_rate : float
        ``q`` in ``(0, 1]``: the probability that a client takes part in a round. ``q = 1``
        gives the plain Gaussian mechanism, ``alpha / (2 sigma^2)`` (Mironov 2017, Prop. 7).
    orders : sequence of float, optional
        RDP orders, each ``> 1``; ``DEFAULT_ORDERS`` if omitted.

    Returns
    -------
    numpy.ndarray
        ``rdp[i]`` at ``orders[i]`` (float64, non-negative, possibly ``inf``); a fresh copy.

    References
    ----------
    Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
    Mechanism", arXiv:1908.10530, Sec. 3.3.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    checked = _check_orders(orders)
    return np.frombuffer(_rdp_cached(sigma, q, checked), dtype=np.float64).copy()


# ---------------------------------------------------------------------------------------------
# RDP -> (epsilon, delta)
# ---------------------------------------------------------------------------------------------


def rdp_to_epsilon(
    orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """Smallest ``epsilon`` such that RDP curve ``rdp`` implies ``(epsilon, delta)``-DP.

    Per order, ``rdp + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha-1)`` (Balle
    et al. 2020, Thm. 21; Canonne, Kamath & Steinke 2020, Prop. 12), which is tighter than
    Mironov's ``rdp + log(1/delta)/(alpha-1)``. An order whose RDP is so small that the
    Bretagnolle-Huber bound ``TV <= sqrt(1 - exp(-KL))`` with ``KL <= rdp`` already gives
    ``TV <= delta`` certifies ``epsilon = 0``, as in dp-accounting.

    Returns
    -------
    tuple of float
        ``(epsilon, order)``: epsilon is ``>= 0``; ``(inf, nan)`` if every order is infinite.
    """
    checked = np.array(_check_orders(orders))
    values = np.asarray(rdp, dtype=np.float64)
    delta = _check_delta(delta)
    if values.shape != checked.shape:
        raise ValueError(f"need one rdp value per order, got {values.shape} and {checked.shape}")
    if np.isnan(values).any() or (values < 0).any():
        raise ValueError("rdp values must be >= 0 (and not NaN)")
    with np.errstate(over="ignore", invalid="ignore"):
        eps = (
            values
            + np.log1p(-1.0 / checked)
            - (math.log(delta) + np.log(checked)) / (checked - 1.0)
        )
        eps = np.where(delta**2 + np.expm1(-values) > 0.0, 0.0, eps)
    if not np.isfinite(eps).any():
        return math.inf, math.nan
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(checked[best])


# ---------------------------------------------------------------------------------------------
# The accountant
# ---------------------------------------------------------------------------------------------


class _GaussianRoundsAccountant:
    """What both accountants share: the default round, ``delta``, checks and projection.

    A subclass says how ``steps`` rounds of ``(sigma, q)`` compose (:meth:`_compose`), what
    ``epsilon`` would be after more of them (:meth:`_epsilon_with`) and how many rounds it
    holds (:attr:`rounds`).
    """

    kind: str

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        self._noise_multiplier = _check_noise_multiplier(noise_multiplier)
        self._sampling_rate = _check_sampling_rate(sampling_rate)
        self._delta = _check_delta(delta)

    @property
    def noise_multiplier(self) -> float:
        """Default ``sigma`` of a round."""
        return self._noise_multiplier

    @property
    def sampling_rate(self) -> float:
        """Default ``q`` of a round."""
        return self._sampling_rate

    @property
    def delta(self) -> float:
        """The ``delta`` at which :meth:`epsilon` is reported."""
        return self._delta

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        raise NotImplementedError

    def epsilon(self) -> float:
        """``epsilon`` after the rounds so far at :attr:`delta` (0 before any, inf if sigma 0)."""
        raise NotImplementedError

    def _compose(self, sigma: float, q: float, steps: int) -> None:
        raise NotImplementedError

    def _epsilon_with(self, sigma: float, q: float, steps: int) -> float:
        raise NotImplementedError

    def _round(
        self, noise_multiplier: float | None, sampling_rate: float | None
    ) -> tuple[float, float]:
        """A round's ``(sigma, q)``: the overrides, checked, else the defaults."""
        sigma = (
            self._noise_multiplier
            if noise_multiplier is None
            else _check_noise_multiplier(noise_multiplier)
        )
        q = self._sampling_rate if sampling_rate is None else _check_sampling_rate(sampling_rate)
        return sigma, q

    def step(
        self,
        num_steps: int = 1,
        *,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> None:
        """Compose ``num_steps`` rounds, optionally with their own ``sigma`` and ``q``.

        Parameters
        ----------
        num_steps : int
            Rounds to add, ``>= 1``.
        noise_multiplier, sampling_rate : float, optional
            Overrides for these rounds only; the defaults stay unchanged.
        """
        steps = _check_count("num_steps", num_steps, 1)
        self._compose(*self._round(noise_multiplier, sampling_rate), steps)

    def projected_epsilon(
        self,
        num_steps: int = 1,
        *,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> float:
        """``epsilon`` if ``num_steps`` more rounds were composed; the accountant is unchanged."""
        steps = _check_count("num_steps", num_steps, 0)
        if steps == 0:
            return self.epsilon()
        return self._epsilon_with(*self._round(noise_multiplier, sampling_rate), steps)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(noise_multiplier={self._noise_multiplier}, "
            f"sampling_rate={self._sampling_rate}, delta={self._delta}, rounds={self.rounds})"
        )


class RdpAccountant(_GaussianRoundsAccountant):
    """Composes rounds of user-level DP-FedAvg and reports ``epsilon`` at a fixed ``delta``.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma`` of every round unless :meth:`step` overrides it.
    sampling_rate : float
        ``q`` = expected clients per round / population, in ``(0, 1]``, unless overridden.
    delta : float
        Target ``delta`` in ``(0, 1)``; conventionally well below ``1 / population``.
    orders : sequence of float, optional
        RDP orders (each > 1); ``DEFAULT_ORDERS`` if omitted.

    Notes
    -----
    Rounds may differ (:meth:`step` takes per-call overrides): RDP composes additively order
    by order (Mironov 2017, Prop. 1), so the accountant keeps the accumulated RDP vector, not
    a count, and :meth:`state_dict` saves that vector so a resumed run continues exactly.
    """

    kind = "rdp"

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        orders: Sequence[float] | None = None,
    ) -> None:
        super().__init__(noise_multiplier, sampling_rate, delta)
        self._orders = _check_orders(orders)
        self._rdp = np.zeros(len(self._orders), dtype=np.float64)
        self._rounds = 0

    # --- read-only views ---------------------------------------------------------------------

    @property
    def orders(self) -> tuple[float, ...]:
        """The RDP orders tracked."""
        return self._orders

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return self._rounds

    @property
    def rdp(self) -> np.ndarray:
        """Accumulated RDP per order (a copy)."""
        return self._rdp.copy()

    # --- composition -------------------------------------------------------------------------

    def _compose(self, sigma: float, q: float, steps: int) -> None:
        self._rdp = self._rdp + steps * compute_rdp(sigma, q, self._orders)
        self._rounds += steps

    def epsilon(self) -> float:
        """``epsilon`` after the rounds so far at :attr:`delta` (0 before any, inf if sigma 0)."""
        return rdp_to_epsilon(self._orders, self._rdp, self._delta)[0]

    def best_order(self) -> float:
        """The RDP order that attains :meth:`epsilon` (NaN when epsilon is infinite)."""
        return rdp_to_epsilon(self._orders, self._rdp, self._delta)[1]

    def _epsilon_with(self, sigma: float, q: float, steps: int) -> float:
        rdp = self._rdp + steps * compute_rdp(sigma, q, self._orders)
        return rdp_to_epsilon(self._orders, rdp, self._delta)[0]

    # --- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: parameters, rounds and the accumulated RDP vector.

        Infinite RDP (a round without noise) is written as the string ``"inf"`` so the
        result is strict JSON.
        """
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "noise_multiplier": self._noise_multiplier,
            "sampling_rate": self._sampling_rate,
            "delta": self._delta,
            "orders": list(self._orders),
            "rounds": self._rounds,
            "rdp": [float(r) if math.isfinite(r) else "inf" for r in self._rdp],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RdpAccountant:
        """Rebuild an accountant from :meth:`state_dict`; ``ValueError`` names what is wrong."""
        _check_state_header(state, _STATE_KEYS, _STATE_FORMAT, _STATE_VERSION)
        try:
            accountant = cls(
                noise_multiplier=state["noise_multiplier"],
                sampling_rate=state["sampling_rate"],
                delta=state["delta"],
                orders=state["orders"],
            )
            rounds = _check_count("rounds", state["rounds"], 0)
        except ValueError as err:
            raise ValueError(f"accountant state: {err}") from err
        rdp = state["rdp"]
        if not isinstance(rdp, Sequence) or isinstance(rdp, str | bytes):
            raise ValueError("accountant state 'rdp' must be a list")
        if len(rdp) != len(accountant.orders):
            raise ValueError(
                f"accountant state 'rdp' has {len(rdp)} values for {len(accountant.orders)} orders"
            )
        values = []
        for i, r in enumerate(rdp):
            value = math.inf if r == "inf" else r
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"accountant state 'rdp'[{i}] = {r!r} is not a number >= 0")
            values.append(float(value))
        if rounds == 0 and any(v != 0 for v in values):
            raise ValueError("accountant state has 'rounds' = 0 but a non-zero 'rdp'")
        accountant._rdp = np.array(values, dtype=np.float64)
        accountant._rounds = rounds
        return accountant


# ---------------------------------------------------------------------------------------------
# PLD accounting (dp-accounting)
# ---------------------------------------------------------------------------------------------

#: Width of the grid on which dp-accounting discretises the privacy loss. Rounding is
#: pessimistic (every loss value is rounded UP to the grid), so the reported epsilon is an
#: upper bound whatever the width; a finer grid is tighter and slower. 1e-4 is
#: dp-accounting's default and costs 0.5-1 s per epsilon on this project's runs.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4

_PLD_STATE_FORMAT = "flower-llm/pld-accountant"
_PLD_STATE_VERSION = 1
_PLD_STATE_KEYS = frozenset(
    {
        "format",
        "version",
        "noise_multiplier",
        "sampling_rate",
        "delta",
        "value_discretization_interval",
        "rounds",
        "events",
    }
)


@functools.lru_cache(maxsize=64)
def _one_round_pld(
    noise_multiplier: float, sampling_rate: float, interval: float
) -> PrivacyLossDistribution:
    """PLD of one round of the Poisson-subsampled Gaussian, pessimistically discretised.

    Every choice that keeps the result an upper bound is spelled out rather than inherited:
    ``pessimistic_estimate`` rounds privacy losses up and moves truncated tail mass to the
    worst case (infinite loss); ``use_connect_dots`` (Doroshenko et al. 2022) is itself a
    pessimistic discretisation; the add-or-remove relation is the one RDP accounts. Building
    it is the slow part (~0.8 s at q < 1), hence the cache: a run's rounds share one.
    dp-accounting is imported here, not at the top: it loads scipy.signal and scipy.stats
    (~1 s), which a ClientApp that only clips (``privacy.mechanism``) must not pay for.
    """
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sensitivity=1.0,
        pessimistic_estimate=True,
        value_discretization_interval=interval,
        sampling_prob=sampling_rate,
        use_connect_dots=True,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


@functools.lru_cache(maxsize=256)
def _composed_pld(
    noise_multiplier: float, sampling_rate: float, count: int, interval: float
) -> PrivacyLossDistribution:
    """PLD of ``count`` rounds of ``(sigma, q)`` (dp-accounting's FFT self-composition, whose
    tail truncation is pessimistic too). With ``q = 1`` the ``count``-fold Gaussian is
    exactly one Gaussian of std ``sigma / sqrt(count)``, which avoids compounding the
    discretisation ``count`` times."""
    if sampling_rate == 1.0:
        return _one_round_pld(noise_multiplier / math.sqrt(count), 1.0, interval)
    one_round = _one_round_pld(noise_multiplier, sampling_rate, interval)
    return one_round if count == 1 else one_round.self_compose(count)


def _pld_epsilon(
    events: Sequence[tuple[float, float, int]], delta: float, interval: float
) -> float:
    """epsilon at ``delta`` of the composition of ``(sigma, q, count)`` events."""
    if not events:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in events):
        return math.inf  # a round without noise is not differentially private at all
    composed = None
    for sigma, q, count in events:
        pld = _composed_pld(sigma, q, count, interval)
        composed = pld if composed is None else composed.compose(pld)
    assert composed is not None
    return max(0.0, float(composed.get_epsilon_for_delta(delta)))


def _merged(
    events: Sequence[tuple[float, float, int]], sigma: float, q: float, count: int
) -> list[tuple[float, float, int]]:
    """``events`` followed by ``count`` rounds of ``(sigma, q)``, merged into the last run."""
    out = list(events)
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + count)
    else:
        out.append((sigma, q, count))
    return out


class PldAccountant(_GaussianRoundsAccountant):
    """Composes rounds by privacy loss distributions (dp-accounting) and reports ``epsilon``.

    Same mechanism, parameters and interface as :class:`RdpAccountant`; the epsilon is the
    exact hockey-stick bound of the discretised PLD (Koskela et al. 2020; Doroshenko et al.
    2022, "Connect the Dots"), which on this project's runs is 8-16 % below RDP's. The
    discretisation is pessimistic, so the reported epsilon is an upper bound on the true one
    (see :func:`_composed_pld` and docs/privacy.md).

    The state is the history of ``(sigma, q, count)`` events, consecutive equal ones merged;
    :meth:`from_state_dict` replays it, so a resumed run reports the same epsilon.

    Parameters
    ----------
    noise_multiplier, sampling_rate, delta
        As for :class:`RdpAccountant`.
    value_discretization_interval : float
        Grid width of the privacy loss (> 0); smaller is tighter and slower.
    """

    kind = "pld"

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        value_discretization_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
    ) -> None:
        super().__init__(noise_multiplier, sampling_rate, delta)
        interval = _check_real("value_discretization_interval", value_discretization_interval)
        if not 0.0 < interval <= 0.1:
            raise ValueError(f"value_discretization_interval must be in (0, 0.1], got {interval!r}")
        self._interval = interval
        self._events: list[tuple[float, float, int]] = []
        self._epsilon: float | None = 0.0  # cached epsilon of _events (None: stale)

    @property
    def value_discretization_interval(self) -> float:
        """Grid width of the privacy loss."""
        return self._interval

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return sum(count for _, _, count in self._events)

    @property
    def events(self) -> list[tuple[float, float, int]]:
        """The ``(sigma, q, count)`` history (a copy)."""
        return list(self._events)

    def _compose(self, sigma: float, q: float, steps: int) -> None:
        self._events = _merged(self._events, sigma, q, steps)
        self._epsilon = None

    def epsilon(self) -> float:
        """``epsilon`` after the rounds so far at :attr:`delta` (0 before any, inf if sigma 0)."""
        if self._epsilon is None:
            self._epsilon = _pld_epsilon(self._events, self._delta, self._interval)
        return self._epsilon

    def _epsilon_with(self, sigma: float, q: float, steps: int) -> float:
        return _pld_epsilon(_merged(self._events, sigma, q, steps), self._delta, self._interval)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: parameters and the event history."""
        return {
            "format": _PLD_STATE_FORMAT,
            "version": _PLD_STATE_VERSION,
            "noise_multiplier": self._noise_multiplier,
            "sampling_rate": self._sampling_rate,
            "delta": self._delta,
            "value_discretization_interval": self._interval,
            "rounds": self.rounds,
            "events": [[sigma, q, count] for sigma, q, count in self._events],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PldAccountant:
        """Rebuild an accountant from :meth:`state_dict`; ``ValueError`` names what is wrong."""
        _check_state_header(state, _PLD_STATE_KEYS, _PLD_STATE_FORMAT, _PLD_STATE_VERSION)
        try:
            accountant = cls(
                noise_multiplier=state["noise_multiplier"],
                sampling_rate=state["sampling_rate"],
                delta=state["delta"],
                value_discretization_interval=state["value_discretization_interval"],
            )
            rounds = _check_count("rounds", state["rounds"], 0)
            events = state["events"]
            if not isinstance(events, Sequence) or isinstance(events, str | bytes):
                raise ValueError("'events' must be a list of [sigma, q, count]")
            for i, event in enumerate(events):
                if not isinstance(event, Sequence) or len(event) != 3:
                    raise ValueError(f"'events'[{i}] = {event!r} is not [sigma, q, count]")
                accountant.step(
                    _check_count(f"events[{i}] count", event[2], 1),
                    noise_multiplier=_check_noise_multiplier(event[0], f"events[{i}] sigma"),
                    sampling_rate=_check_sampling_rate(event[1], f"events[{i}] q"),
                )
        except ValueError as err:
            raise ValueError(f"accountant state: {err}") from err
        if accountant.rounds != rounds:
            raise ValueError(
                f"accountant state has 'rounds' = {rounds} but its events add up to "
                f"{accountant.rounds}"
            )
        return accountant


# ---------------------------------------------------------------------------------------------
# One interface, two accountants
# ---------------------------------------------------------------------------------------------

#: The accountants ``privacy.accountant`` can name; the first is the default.
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")


@runtime_checkable
class Accountant(Protocol):
    """What the server's client-level DP and the sites' DP-SGD need from an accountant.

    One composition is one round (DP-FedAvg) or one optimizer step (DP-SGD) of the
    Poisson-subsampled Gaussian mechanism with noise multiplier ``sigma`` and sampling rate
    ``q``. Implementations also provide ``from_state_dict`` (a classmethod);
    :func:`accountant_from_state_dict` picks the right one from a saved state.
    """

    @property
    def kind(self) -> str:
        """``"pld"`` or ``"rdp"``: whose epsilon :meth:`epsilon` reports."""
        ...

    @property
    def noise_multiplier(self) -> float:
        """Default ``sigma`` of a composition."""
        ...

    @property
    def sampling_rate(self) -> float:
        """Default ``q`` of a composition."""
        ...

    @property
    def delta(self) -> float:
        """The ``delta`` at which epsilon is reported."""
        ...

    @property
    def rounds(self) -> int:
        """Compositions so far."""
        ...

    def step(
        self,
        num_steps: int = 1,
        *,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> None:
        """Compose ``num_steps`` more, optionally with their own ``sigma`` and ``q``."""
        ...

    def epsilon(self) -> float:
        """epsilon so far at :attr:`delta`."""
        ...

    def projected_epsilon(
        self,
        num_steps: int = 1,
        *,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> float:
        """epsilon after ``num_steps`` more, without composing them."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, versioned."""
        ...


def _check_kind(kind: Any) -> str:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {kind!r}")
    return str(kind)


def make_accountant(
    kind: str, noise_multiplier: float, sampling_rate: float, delta: float
) -> RdpAccountant | PldAccountant:
    """A fresh accountant of ``kind`` (``"pld"`` or ``"rdp"``) with default ``sigma``, ``q``."""
    if _check_kind(kind) == "pld":
        return PldAccountant(noise_multiplier, sampling_rate, delta)
    return RdpAccountant(noise_multiplier, sampling_rate, delta)


_DUAL_STATE_FORMAT = "flower-llm/dual-accountant"
_DUAL_STATE_VERSION = 1
_DUAL_STATE_KEYS = frozenset({"format", "version", "headline", "pld", "rdp"})


class DualAccountant:
    """Both accountants kept in step: the chosen one is the headline, the other is reported.

    Everything that decides (:meth:`epsilon`, :meth:`projected_epsilon`, hence the budget
    stop) uses the headline accountant, ``kind``; :meth:`epsilons` gives both numbers for
    metrics. The state holds both accountants' states.
    """

    def __init__(
        self, kind: str, noise_multiplier: float, sampling_rate: float, delta: float
    ) -> None:
        self._kind = _check_kind(kind)
        self.pld = PldAccountant(noise_multiplier, sampling_rate, delta)
        self.rdp = RdpAccountant(noise_multiplier, sampling_rate, delta)

    @property
    def headline(self) -> RdpAccountant | PldAccountant:
        """The accountant whose epsilon is reported as ``epsilon`` and drives the budget."""
        return self.pld if self._kind == "pld" else self.rdp

    @property
    def kind(self) -> str:
        """The headline accountant's kind."""
        return self._kind

    @property
    def noise_multiplier(self) -> float:
        """Default ``sigma``."""
        return self.headline.noise_multiplier

    @property
    def sampling_rate(self) -> float:
        """Default ``q``."""
        return self.headline.sampling_rate

    @property
    def delta(self) -> float:
        """The ``delta`` of both epsilons."""
        return self.headline.delta

    @property
    def rounds(self) -> int:
        """Compositions so far."""
        return self.headline.rounds

    def step(
        self,
        num_steps: int = 1,
        *,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> None:
        """Compose into both accountants."""
        for accountant in (self.pld, self.rdp):
            accountant.step(
                num_steps, noise_multiplier=noise_multiplier, sampling_rate=sampling_rate
            )

    def epsilon(self) -> float:
        """The headline epsilon."""
        return self.headline.epsilon()

    def projected_epsilon(
        self,
        num_steps: int = 1,
        *,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> float:
        """The headline epsilon after ``num_steps`` more."""
        return self.headline.projected_epsilon(
            num_steps, noise_multiplier=noise_multiplier, sampling_rate=sampling_rate
        )

    def epsilons(self) -> dict[str, float]:
        """``{"epsilon": headline, "pld-epsilon": ..., "rdp-epsilon": ...}``."""
        return {
            "epsilon": self.epsilon(),
            "pld-epsilon": self.pld.epsilon(),
            "rdp-epsilon": self.rdp.epsilon(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Both accountants' states and which one is the headline."""
        return {
            "format": _DUAL_STATE_FORMAT,
            "version": _DUAL_STATE_VERSION,
            "headline": self._kind,
            "pld": self.pld.state_dict(),
            "rdp": self.rdp.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DualAccountant:
        """Rebuild from :meth:`state_dict`; ``ValueError`` names what is wrong."""
        _check_state_header(state, _DUAL_STATE_KEYS, _DUAL_STATE_FORMAT, _DUAL_STATE_VERSION)
        pld = PldAccountant.from_state_dict(state["pld"])
        rdp = RdpAccountant.from_state_dict(state["rdp"])
        if pld.rounds != rdp.rounds:
            raise ValueError(
                f"accountant state: the PLD accountant has {pld.rounds} rounds, "
                f"the RDP one {rdp.rounds}"
            )
        dual = cls(state["headline"], rdp.noise_multiplier, rdp.sampling_rate, rdp.delta)
        dual.pld, dual.rdp = pld, rdp
        return dual

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], kind: str) -> DualAccountant:
        """The accountant of a checkpoint, with ``kind`` (today's setting) as the headline.

        Either kind may be the headline on resume, as both are kept and both are upper
        bounds. A checkpoint from before PLD accounting holds only an RDP state; its PLD
        history is rebuilt when the RDP vector is exactly ``rounds`` default rounds (always
        so for DP-FedAvg, which never overrides), and refused otherwise.
        """
        kind = _check_kind(kind)
        if isinstance(state, Mapping) and state.get("format") == _STATE_FORMAT:
            rdp = RdpAccountant.from_state_dict(state)
            dual = cls(kind, rdp.noise_multiplier, rdp.sampling_rate, rdp.delta)
            if rdp.rounds:
                dual.step(rdp.rounds)
            if not np.allclose(dual.rdp.rdp, rdp.rdp, rtol=1e-12, atol=0.0):
                raise ValueError(
                    "accountant state: this RDP-only checkpoint composed rounds with other "
                    "parameters than its defaults, so its PLD history cannot be rebuilt"
                )
            dual.rdp = rdp
            return dual
        dual = cls.from_state_dict(state)
        dual._kind = kind
        return dual

    def __repr__(self) -> str:
        return f"DualAccountant(headline={self._kind!r}, {self.pld!r}, {self.rdp!r})"


def epsilons(accountant: Accountant) -> dict[str, float]:
    """The epsilons to report for ``accountant``: ``epsilon`` (the headline) and per kind.

    A :class:`DualAccountant` gives both ``pld-epsilon`` and ``rdp-epsilon``; a single
    accountant gives its own. Key names end in ``epsilon`` so that metrics aggregation takes
    their maximum over sites, never the mean.
    """
    if isinstance(accountant, DualAccountant):
        return accountant.epsilons()
    eps = accountant.epsilon()
    return {"epsilon": eps, f"{accountant.kind}-epsilon": eps}


def accountant_from_state_dict(
    state: Mapping[str, Any],
) -> RdpAccountant | PldAccountant | DualAccountant:
    """The accountant a :meth:`state_dict` describes, whichever kind it is."""
    if not isinstance(state, Mapping):
        raise ValueError(f"accountant state must be a mapping, got {type(state).__name__}")
    readers: dict[str, Any] = {
        _STATE_FORMAT: RdpAccountant.from_state_dict,
        _PLD_STATE_FORMAT: PldAccountant.from_state_dict,
        _DUAL_STATE_FORMAT: DualAccountant.from_state_dict,
    }
    reader = readers.get(state.get("format"))  # type: ignore[arg-type]
    if reader is None:
        raise ValueError(
            f"accountant state 'format' is {state.get('format')!r}, not one of {sorted(readers)}"
        )
    result: RdpAccountant | PldAccountant | DualAccountant = reader(state)
    return result


def _check_state_header(
    state: Mapping[str, Any], keys: frozenset[str], fmt: str, version: int
) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"accountant state must be a mapping, got {type(state).__name__}")
    missing = sorted(keys - set(state))
    if missing:
        raise ValueError(f"accountant state is missing {missing}")
    unknown = sorted(str(k) for k in set(state) - keys)
    if unknown:
        raise ValueError(f"accountant state has unknown keys {unknown}")
    if state["format"] != fmt:
        raise ValueError(f"accountant state 'format' is {state['format']!r}, not {fmt!r}")
    if type(state["version"]) is not int or state["version"] != version:
        raise ValueError(
            f"accountant state 'version' {state['version']!r} is not supported (expected {version})"
        )


# ---------------------------------------------------------------------------------------------
# Planning helpers (either accountant)
# ---------------------------------------------------------------------------------------------


def _epsilon_function(
    accountant: str, delta: float, orders: Sequence[float] | None
) -> Callable[[int, float, float], float]:
    """``(rounds, sigma, q) -> epsilon`` under ``accountant``, arguments already checked."""
    kind = _check_kind(accountant)
    if kind == "pld":
        if orders is not None:
            raise ValueError("orders are RDP orders: pass them only with accountant='rdp'")
        return lambda rounds, sigma, q: _pld_epsilon(
            [(sigma, q, rounds)] if rounds else [], delta, PLD_VALUE_DISCRETIZATION_INTERVAL
        )
    checked = _check_orders(orders)

    def rdp_epsilon(rounds: int, sigma: float, q: float) -> float:
        if rounds == 0:
            return 0.0
        return rdp_to_epsilon(checked, rounds * compute_rdp(sigma, q, checked), delta)[0]

    return rdp_epsilon


def epsilon_after(
    rounds: int,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    orders: Sequence[float] | None = None,
    *,
    accountant: str = "pld",
) -> float:
    """``epsilon`` after ``rounds`` identical rounds (0 for zero rounds).

    Parameters
    ----------
    rounds : int
        Number of rounds, ``>= 0``.
    noise_multiplier, sampling_rate, delta
        As for :class:`RdpAccountant`.
    orders : sequence of float, optional
        RDP orders (``accountant="rdp"`` only); ``DEFAULT_ORDERS`` if omitted.
    accountant : str
        ``"pld"`` (default, as ``privacy.accountant``) or ``"rdp"``.
    """
    count = _check_count("rounds", rounds, 0)
    delta = _check_delta(delta)
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    return _epsilon_function(accountant, delta, orders)(count, sigma, q)


def max_rounds_within(
    target_epsilon: float,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    orders: Sequence[float] | None = None,
    *,
    accountant: str = "pld",
) -> int:
    """The largest number of rounds whose ``epsilon`` does not exceed ``target_epsilon``.

    Epsilon is non-decreasing in the number of rounds, so an exponential search brackets the
    answer and a bisection over integers finds it. Returns 0 when even one round exceeds the
    target (e.g. ``noise_multiplier = 0``). ``accountant`` and ``orders`` as in
    :func:`epsilon_after`.

    Raises
    ------
    ValueError
        On invalid arguments, or when the budget is never spent within 2**62 rounds (the
        per-round RDP underflows to zero).
    """
    target = _check_target_epsilon(target_epsilon)
    delta = _check_delta(delta)
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    epsilon = _epsilon_function(accountant, delta, orders)

    def within(rounds: int) -> bool:
        return epsilon(rounds, sigma, q) <= target

    if not within(1):
        return 0
    lo, hi = 1, 2
    while within(hi):
        lo, hi = hi, 2 * hi
        if hi > 2**62:
            raise ValueError(
                f"epsilon stays within {target} for more than 2**62 rounds "
                f"(noise_multiplier={noise_multiplier}, sampling_rate={sampling_rate})"
            )
    while hi - lo > 1:  # invariant: within(lo) and not within(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float,
    tol: float = 1e-4,
    orders: Sequence[float] | None = None,
    *,
    accountant: str = "pld",
) -> float:
    """The smallest ``sigma`` (within ``tol``) whose ``epsilon`` after ``rounds`` is within target.

    Epsilon is non-increasing in ``sigma``: a bracket ``[lo, hi]`` with ``epsilon(lo) >
    target >= epsilon(hi)`` is found by doubling/halving from 1, then bisected until
    ``hi - lo <= tol * hi``. The returned value is ``hi``, so its epsilon is guaranteed to be
    ``<= target_epsilon``, and ``sigma * (1 - tol)`` already exceeds it.

    Parameters
    ----------
    target_epsilon : float
        Budget, ``> 0``.
    delta : float
        In ``(0, 1)``.
    rounds : int
        Rounds to be run, ``>= 1``.
    sampling_rate : float
        ``q`` in ``(0, 1]``.
    tol : float
        Relative tolerance on ``sigma``, in ``(0, 0.1]``.
    orders : sequence of float, optional
        RDP orders (``accountant="rdp"`` only); ``DEFAULT_ORDERS`` if omitted.
    accountant : str
        ``"pld"`` (default, as ``privacy.accountant``) or ``"rdp"``: calibrate for the
        accountant the run will use, or the budget stop comes early (RDP sigma under a PLD
        run) or late.

    Raises
    ------
    ValueError
        On invalid arguments, or if no ``sigma`` up to 1e6 reaches the target.
    """
    target = _check_target_epsilon(target_epsilon)
    delta = _check_delta(delta)
    count = _check_count("rounds", rounds, 1)
    q = _check_sampling_rate(sampling_rate)
    tolerance = _check_real("tol", tol)
    if not 0.0 < tolerance <= 0.1:
        raise ValueError(f"tol must be in (0, 0.1], got {tol!r}")
    epsilon = _epsilon_function(accountant, delta, orders)

    def within(sigma: float) -> bool:
        return epsilon(count, sigma, q) <= target

    # Start from 1 and double/halve; under PLD, each epsilon costs ~1 s, so start from the
    # (cheap) RDP answer instead and widen by 10 %: PLD needs 5-10 % less noise than RDP.
    start, factor = 1.0, 2.0
    if _check_kind(accountant) == "pld":
        start = calibrate_noise_multiplier(target, delta, count, q, tol=0.01, accountant="rdp")
        factor = 1.1
    max_sigma, min_sigma = 1e6, 1e-6
    lo = hi = start
    if within(hi):
        while within(lo):
            lo /= factor
            if lo < min_sigma:
                raise ValueError(
                    f"target_epsilon={target_epsilon} is met even at noise_multiplier "
                    f"{min_sigma}: it is not a meaningful privacy budget"
                )
        hi = factor * lo
    else:
        while not within(hi):
            hi *= factor
            if hi > max_sigma:
                raise ValueError(
                    f"target_epsilon={target_epsilon} at delta={delta} after {rounds} rounds "
                    f"cannot be reached with noise_multiplier <= {max_sigma:g} under the "
                    f"{accountant} accountant; raise the target"
                )
        lo = hi / factor
    while hi - lo > tolerance * hi:  # invariant: not within(lo) and within(hi)
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return hi


def would_exceed(accountant: Accountant, target_epsilon: float) -> bool:
    """Whether ONE more default round would take ``accountant`` above ``target_epsilon``.

    A server asks this before sampling a round, so it stops while the budget still holds
    rather than after it is spent. The accountant's own kind (its headline) decides.
    """
    target = _check_target_epsilon(target_epsilon)
    return accountant.projected_epsilon(1) > target
