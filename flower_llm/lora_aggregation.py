"""How the server combines LoRA factors (``lora.aggregation``). Pure numpy, no Flower.

A LoRA module adds ``s * B A`` to a frozen weight (``B``: d_out x r, ``A``: r x d_in,
``s = alpha / r``). Sites train ``B_k, A_k``; what the server should average is the
product the model uses, ``sum_k p_k B_k A_k`` with ``p_k = n_k / n``.

- ``fedavg`` averages A and B apart. ``avg(B) avg(A) = sum_jk p_j p_k B_j A_k`` holds the
  cross terms ``B_j A_k`` of different sites: not the average of the products.
- ``ffa`` (FFA-LoRA, Sun et al. 2024) freezes every ``A`` at its shared seeded
  initialisation, so all sites have the same ``A`` and ``avg(B) A = sum_k p_k B_k A``:
  FedAvg of B alone is exact, and only B travels up (half the upload).
- ``exact`` (as FLoRA / FlexLoRA) forms the average of the products in factored form and
  re-factors it to rank r with a truncated SVD, never building a d_out x d_in matrix::

      U = [p_1 B_1, ..., p_K B_K]          (d_out x R),  R = sum_k r_k
      V = [A_1; ...; A_K]                  (R x d_in),   U V = sum_k p_k B_k A_k = M
      U = Q_u R_u,  V^T = Q_v R_v          (Q orthonormal; R from the Gram matrices)
      R_u R_v^T = W S Z^T                  (SVD of an R x R core)
      M = (Q_u W) S (Q_v Z)^T              -> B = (Q_u W)[:, :r] S[:r],  A = (Q_v Z)[:, :r]^T

  ``R_u`` comes from a Cholesky factorisation with complete pivoting of ``U^T U`` (which
  also finds U's numerical rank), ``R_v`` from ``V V^T``; ``Q_u`` and ``Q_v`` are never
  formed, only applied to the ``r`` kept columns of ``W`` and ``Z``. The Gram matrices are
  most of the cost, half the multiply-adds of a Householder QR; they square the condition
  number, so directions of U or V below about ``sqrt(R eps)`` of the largest are dropped
  (their part of M is under float32's resolution, the dtype the factors travel in), and
  A's rows are re-orthonormalised at the end (a QR of the r kept rows, folded into B).

  The new A has orthonormal rows, each signed so that its largest entry is positive (the
  factors then do not depend on the sign conventions of a LAPACK build, which matters
  because a site and the server re-factor the same adapter independently), and B carries
  the singular values. The truncation error is ``||M - B A||_F = sqrt(sum_{i > r} S_i^2)``,
  zero when ``r >= R``.

Heterogeneous ranks: a site of rank ``r_k <= r`` uses the scale ``alpha / r_k``; for its
model to hold ``s B A`` it gets the rank-``r_k`` truncation of the global product times
``r_k / r`` (:func:`to_rank`), and its reply counts ``r / r_k`` times its product in the
average (:func:`exact_average`), so that every product is in the global scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

AdapterState = dict[str, np.ndarray]

A_MARK = ".lora_A."
B_MARK = ".lora_B."
LORA_AGGREGATIONS = ("fedavg", "ffa", "exact")


def is_lora_a(key: str) -> bool:
    """Whether ``key`` names a LoRA ``A`` (down-projection) matrix in PEFT's naming."""
    return A_MARK in key


def lora_pairs(keys: Sequence[str] | Mapping[str, object]) -> list[tuple[str, str]]:
    """``(A key, B key)`` of every LoRA module among ``keys``, in sorted order.

    Raises
    ------
    ValueError
        An A matrix without its B (or the reverse).
    """
    names = set(keys)
    pairs = []
    for key in sorted(names):
        if A_MARK in key:
            partner = key.replace(A_MARK, B_MARK)
            if partner not in names:
                raise ValueError(f"LoRA matrix '{key}' has no '{partner}'")
            pairs.append((key, partner))
    paired_b = {b for _, b in pairs}
    lonely = sorted(k for k in names if B_MARK in k and k not in paired_b)
    if lonely:
        raise ValueError(f"LoRA matrix '{lonely[0]}' has no A partner")
    return pairs


def sent_keys(keys: Sequence[str] | Mapping[str, object], aggregation: str) -> list[str]:
    """The adapter keys a site sends up: all, or with ``ffa`` everything but the frozen A."""
    if aggregation not in LORA_AGGREGATIONS:
        raise ValueError(
            f"lora aggregation must be one of {LORA_AGGREGATIONS}, got {aggregation!r}"
        )
    if aggregation == "ffa":
        return [k for k in keys if not is_lora_a(k)]
    return list(keys)


def shared_keys(keys: Sequence[str] | Mapping[str, object], personalization: str) -> list[str]:
    """The keys among ``keys`` that travel under ``fed.personalization``: all of them, or
    the A matrices alone under ``local-b`` (each site keeps its B)."""
    if personalization == "local-b":
        return [k for k in keys if is_lora_a(k)]
    return list(keys)


@dataclass(frozen=True)
class Refactored:
    """A rank-r factorisation ``B A`` of a weighted sum of LoRA products."""

    b: np.ndarray
    """d_out x r, float64."""
    a: np.ndarray
    """r x d_in, float64, orthonormal rows (zero rows beyond the sum's rank)."""
    error: float
    """``||M - B A||_F``: Frobenius norm of the singular values cut."""
    norm: float
    """``||M||_F``."""


def refactor_product_sum(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], factors: Sequence[float], rank: int
) -> Refactored:
    """Rank-``rank`` truncated SVD of ``M = sum_k factors[k] B_k A_k`` (module docs).

    Sites may have different ranks ``r_k`` (``B_k``: d_out x r_k, ``A_k``: r_k x d_in).
    Costs ``O((d_out + d_in) R^2 + R^3)`` with ``R = sum_k r_k``: the two Gram matrices,
    ``(d_out + d_in) R^2`` multiply-adds, are most of it.
    """
    if not bs or len(bs) != len(as_) or len(bs) != len(factors):
        raise ValueError("need one B, one A and one factor per site, and at least one site")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    d_out, d_in = np.shape(bs[0])[0], np.shape(as_[0])[1]
    sizes = [np.shape(a)[0] for a in as_]
    for k, (b, a) in enumerate(zip(bs, as_, strict=True)):
        if np.shape(b) != (d_out, sizes[k]) or np.shape(a) != (sizes[k], d_in):
            raise ValueError(
                f"site {k}: B {np.shape(b)} and A {np.shape(a)} are not the factors of one "
                f"{d_out} x {d_in} product"
            )
    # U^T and V, one row per rank-one term, in float64: U V = M.
    u_rows = np.empty((sum(sizes), d_out))
    v = np.empty((sum(sizes), d_in))
    start = 0
    for b, a, factor, size in zip(bs, as_, factors, sizes, strict=True):
        np.multiply(np.asarray(b).T, factor, out=u_rows[start : start + size], dtype=np.float64)
        v[start : start + size] = a
        start += size
    left_basis = _RowBasis(u_rows)  # U^T = C_u^T Q_u^T
    right_basis = _RowBasis(v)  # V = C_v^T Q_v^T, so M = Q_u (C_u C_v^T) Q_v^T
    w, s, zt = np.linalg.svd(left_basis.coefficients @ right_basis.coefficients.T)
    kept = min(rank, s.size)
    rows = min(rank, right_basis.rank)
    # (Q_v Z)^T for the kept singular values and, when the rank asks for more rows than the
    # sum has nonzero singular values, further orthonormal rows of V's row space.
    right = right_basis.times_q(zt[:rows].T).T
    left = left_basis.times_q(w[:, :kept]) * s[:kept]
    # Re-orthonormalise A's rows (a Gram-based basis is orthonormal to about eps * cond^2)
    # and carry the change into B (whose columns beyond ``kept`` are zero): B A unchanged.
    q, r = np.linalg.qr(right.T)
    a = q.T
    b = left @ r[:, :kept].T
    # Singular vectors are defined up to a sign per pair, and LAPACK builds differ in the
    # sign they return. A site re-factors the global adapter and the server checks its
    # reply against its own re-factoring, so both must agree: the largest entry of each
    # row of A is made positive.
    peaks = a[np.arange(rows), np.argmax(np.abs(a), axis=1)]
    signs = np.where(peaks < 0, -1.0, 1.0)
    out_b = np.zeros((d_out, rank))
    out_a = np.zeros((rank, d_in))
    out_b[:, :rows] = b * signs
    out_a[:rows] = a * signs[:, None]
    error = math.sqrt(float(np.sum(np.square(s[kept:]))))
    return Refactored(out_b, out_a, error, math.sqrt(float(np.sum(np.square(s)))))


class _RowBasis:
    """An orthonormal basis of the row space of ``rows`` (n x d) from its Gram matrix:
    ``rows = C^T Q^T`` with ``Q^T`` (k x d, orthonormal rows, never formed) and
    ``C`` (k x n), k the numerical rank, by Cholesky with complete pivoting of
    ``rows rows^T`` (LAPACK ``pstrf``, its default tolerance ``n * eps * max diagonal``)."""

    def __init__(self, rows: np.ndarray) -> None:
        from scipy.linalg import lapack  # scipy comes with opacus and dp-accounting

        gram = rows @ rows.T
        factor, pivots, rank, info = lapack.dpstrf(gram, lower=1)
        if info < 0:
            raise np.linalg.LinAlgError(f"LAPACK dpstrf failed (info {info})")
        order = pivots[:rank] - 1
        lower = np.tril(factor[:, :rank])  # P^T G P = L L^T, L: n x k
        self.rank = int(rank)
        self._leading = rows[order]  # = L11 Q^T
        self._l11 = lower[:rank]
        self.coefficients = np.zeros((rank, rows.shape[0]))
        self.coefficients[:, pivots - 1] = lower.T

    def times_q(self, c: np.ndarray) -> np.ndarray:
        """``Q c`` (d x p) for ``c`` (k x p)."""
        from scipy.linalg import solve_triangular

        if self.rank == 0:
            return np.zeros((self._leading.shape[1], c.shape[1]))
        return self._leading.T @ solve_triangular(self._l11, c, lower=True, trans="T")


def rank_of(state: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of ``state`` (rows of its A matrices).

    Raises
    ------
    ValueError
        Its modules do not share one rank, or it holds no LoRA pair.
    """
    ranks = {int(state[a].shape[0]) for a, _ in lora_pairs(state)}
    if len(ranks) != 1:
        raise ValueError(f"LoRA matrices of different ranks {sorted(ranks)} in one adapter")
    return ranks.pop()


def to_rank(state: Mapping[str, np.ndarray], rank: int) -> AdapterState:
    """``state`` (rank ``r``, scale ``alpha / r``) as the closest adapter of rank ``rank``
    and scale ``alpha / rank``: each product times ``rank / r``, truncated by SVD when
    ``rank < r`` and padded with zeros (exact) when ``rank > r``.

    The state itself (no copy) when ``rank`` is its own rank.
    """
    own = rank_of(state)
    if rank == own:
        return dict(state)
    out: AdapterState = dict(state)
    for a_key, b_key in lora_pairs(state):
        if rank < own:
            refactored = refactor_product_sum([state[b_key]], [state[a_key]], [rank / own], rank)
            out[a_key] = refactored.a.astype(np.float32)
            out[b_key] = refactored.b.astype(np.float32)
            continue
        b = np.zeros((state[b_key].shape[0], rank), np.float32)
        a = np.zeros((rank, state[a_key].shape[1]), np.float32)
        b[:, :own] = state[b_key] * np.float32(rank / own)
        a[:own] = state[a_key]
        out[a_key], out[b_key] = a, b
    return out


@dataclass(frozen=True)
class ExactReport:
    """How far the re-factored global adapter is from the average of the products."""

    error: float
    """``sqrt(sum over modules of ||M - B A||_F^2)``."""
    relative_error: float
    """``error`` over ``sqrt(sum over modules of ||M||_F^2)`` (0 when M = 0)."""
    max_module_relative_error: float
    """Largest ``||M - B A||_F / ||M||_F`` of one module."""


def exact_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], rank: int
) -> tuple[AdapterState, ExactReport]:
    """The weighted average of the sites' LoRA products, re-factored to ``rank``.

    A site of rank ``r_k`` (read from its A matrices) counts ``rank / r_k`` times its
    product (the ratio of the LoRA scales ``alpha / r_k`` and ``alpha / rank``). Arrays
    that are not LoRA factors (none with PEFT's ``bias = "none"``) are averaged as FedAvg
    does. Weights are normalised as :func:`flower_llm.aggregation.weighted_average`
    normalises them, so huge weights cannot overflow.
    """
    from flower_llm.aggregation import weighted_average

    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} and {len(weights)}")
    largest = max(float(w) for w in weights)
    relative = [float(w) / largest for w in weights]
    total = math.fsum(relative)
    scales = [rank / rank_of(s) for s in states]
    factors = [r / total * scale for r, scale in zip(relative, scales, strict=True)]
    pairs = lora_pairs(states[0])
    in_pairs = {k for pair in pairs for k in pair}
    rest = [k for k in states[0] if k not in in_pairs]
    result: AdapterState = (
        weighted_average([{k: s[k] for k in rest} for s in states], weights) if rest else {}
    )
    error_sq = norm_sq = 0.0
    worst = 0.0
    for a_key, b_key in pairs:
        refactored = refactor_product_sum(
            [s[b_key] for s in states], [s[a_key] for s in states], factors, rank
        )
        result[a_key] = refactored.a.astype(np.float32)
        result[b_key] = refactored.b.astype(np.float32)
        error_sq += refactored.error**2
        norm_sq += refactored.norm**2
        if refactored.norm > 0:
            worst = max(worst, refactored.error / refactored.norm)
    error = math.sqrt(error_sq)
    relative_error = error / math.sqrt(norm_sq) if norm_sq > 0 else 0.0
    return result, ExactReport(error, relative_error, worst)


def product_gap(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    averaged: Mapping[str, np.ndarray],
) -> float:
    """``||avg(B A) - B_g A_g||_F / ||avg(B A)||_F`` over all modules: how far the global
    factors ``averaged`` are from the weighted average of the sites' products (each in the
    global adapter's LoRA scale: a site of rank ``r_k`` counts ``r_g / r_k`` times).

    Forms d_out x d_in products, so for tests and benchmarks on small adapters only.
    """
    total = float(sum(weights))
    global_rank = rank_of(averaged)
    num = den = 0.0
    for a_key, b_key in lora_pairs(averaged):
        target = sum(
            (w / total)
            * (global_rank / s[a_key].shape[0])
            * (s[b_key].astype(np.float64) @ s[a_key].astype(np.float64))
            for s, w in zip(states, weights, strict=True)
        )
        got = averaged[b_key].astype(np.float64) @ averaged[a_key].astype(np.float64)
        num += float(np.sum(np.square(target - got)))
        den += float(np.sum(np.square(target)))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
