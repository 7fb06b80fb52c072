"""A compiled one-pass weighted sum with checks, for the server's FedAvg sweep.

:func:`weighted_sum` computes, for one array of every reply,

    out[c] = ref[c] + sum_k p_k (x_k[c] - ref[c])        (float64, rounded once)

together with, per reply, the sum of its squared differences (the update's squared L2
norm; NaN or Inf exactly when one of its values is) and how many of its values differ
from the reference by more than a bound. Each reply is read from memory once; every
difference ``x_k[c] - ref[c]`` is formed in float64 (exact for float16 and float32 values
whose binary exponents are at most 29 apart; else rounded once at float64's precision),
and the sum is accumulated in float64, so the result is the float64-grade
sum of :func:`flower_llm.aggregation.weighted_average` (not bit for bit: the order of the
additions differs).

NumPy cannot do this in one pass: the cast to float64, the subtraction, the checks and the
product are separate passes over the data, and even blocked to stay in cache they cost
several times a read of the replies (docs/aggregation.md, "Aggregation throughput"). The
kernel is about 150 lines of C (and the sorting networks it unrolls for the median and
the trimmed mean, generated here), compiled on first use with the machine's C compiler for
the CPU it runs on (``-march=native``) and kept in ``$FLOWER_LLM_CACHE/kernels`` under a
name that hashes the source, the compiler, its flags and the CPU's feature flags, so a
cache shared between machines never hands one machine another's instructions. Before the
library is used its result is compared with NumPy's float64 sum on a small random case;
any failure (no compiler, a compile error, a wrong result) leaves the kernel off and the
caller uses the NumPy sweep, with the reason in :func:`status`.

``FLOWER_LLM_SUM_KERNEL=off`` turns it off; ``FLOWER_LLM_SUM_KERNEL=require`` makes a
failure to build it an error instead (for benchmarks and tests that measure it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENV = "FLOWER_LLM_SUM_KERNEL"
"""``off``: never build or use the kernel; ``require``: fail loudly if it cannot be used."""

# One function per element type of the replies. Replies are taken in groups of four: one
# load of the accumulator per group, and four independent chains for the squares and the
# counts so that the additions of one chain do not wait on each other. The reductions
# (squares, counts) are reassociated by the compiler to vectorize them
# (-fassociative-math); the differences and the weighted sum per column are not
# reductions and keep the order written here.
_SOURCE = r"""
#include <stddef.h>
#include <math.h>
#define W 2048

#define DEFINE_SUM(NAME, T)                                                            \
static void NAME(int K, const T *const *xs, const float *ref, size_t n, const double *p,      \
          double lim, int add_ref, const double *base, float *out32, double *out64,    \
          double *sq,                                                                  \
          double *over)                                                                \
{                                                                                      \
    double acc[W], r[W];                                                               \
    for (size_t s = 0; s < n; s += W) {                                                \
        size_t m = n - s < W ? n - s : W;                                              \
        for (size_t c = 0; c < m; c++) { acc[c] = 0.0; r[c] = ref[s + c]; }            \
        int k = 0;                                                                     \
        for (; k + 4 <= K; k += 4) {                                                   \
            const T *restrict x0 = xs[k] + s, *restrict x1 = xs[k + 1] + s;            \
            const T *restrict x2 = xs[k + 2] + s, *restrict x3 = xs[k + 3] + s;        \
            double p0 = p[k], p1 = p[k + 1], p2 = p[k + 2], p3 = p[k + 3];             \
            double q0 = 0, q1 = 0, q2 = 0, q3 = 0, v0 = 0, v1 = 0, v2 = 0, v3 = 0;     \
            for (size_t c = 0; c < m; c++) {                                           \
                double rc = r[c];                                                      \
                double d0 = (double)x0[c] - rc, d1 = (double)x1[c] - rc;               \
                double d2 = (double)x2[c] - rc, d3 = (double)x3[c] - rc;               \
                v0 += fabs(d0) > lim ? 1.0 : 0.0;                                      \
                v1 += fabs(d1) > lim ? 1.0 : 0.0;                                      \
                v2 += fabs(d2) > lim ? 1.0 : 0.0;                                      \
                v3 += fabs(d3) > lim ? 1.0 : 0.0;                                      \
                q0 += d0 * d0; q1 += d1 * d1; q2 += d2 * d2; q3 += d3 * d3;            \
                acc[c] += (p0 * d0 + p1 * d1) + (p2 * d2 + p3 * d3);                   \
            }                                                                          \
            sq[k] += q0; sq[k + 1] += q1; sq[k + 2] += q2; sq[k + 3] += q3;            \
            over[k] += v0; over[k + 1] += v1; over[k + 2] += v2; over[k + 3] += v3;    \
        }                                                                              \
        for (; k < K; k++) {                                                           \
            const T *restrict x = xs[k] + s;                                           \
            double pk = p[k], q = 0, v = 0;                                            \
            for (size_t c = 0; c < m; c++) {                                           \
                double d = (double)x[c] - r[c];                                        \
                v += fabs(d) > lim ? 1.0 : 0.0;                                        \
                q += d * d;                                                            \
                acc[c] += pk * d;                                                      \
            }                                                                          \
            sq[k] += q; over[k] += v;                                                  \
        }                                                                              \
        if (base)                                                                      \
            for (size_t c = 0; c < m; c++) r[c] = base[s + c];                         \
        else if (!add_ref)                                                             \
            for (size_t c = 0; c < m; c++) r[c] = 0.0;                                 \
        if (out32)                                                                     \
            for (size_t c = 0; c < m; c++) out32[s + c] = (float)(r[c] + acc[c]);      \
        else                                                                           \
            for (size_t c = 0; c < m; c++) out64[s + c] = r[c] + acc[c];               \
    }                                                                                  \
}

/* Every array of the replies in one call: array j of reply k is xs[j * K + k]. */
#define DEFINE_SUMS(NAME, T)                                                           \
DEFINE_SUM(NAME##_one, T)                                                              \
void NAME(int K, int arrays, const T *const *xs, const float *const *refs,             \
          const size_t *sizes, const double *p, double lim, int add_ref,               \
          const double *const *bases, float *const *out32, double *const *out64,       \
          double *sq, double *over)                                                    \
{                                                                                      \
    for (int j = 0; j < arrays; j++)                                                   \
        NAME##_one(K, xs + (size_t)j * K, refs[j], sizes[j], p, lim, add_ref,          \
                   bases ? bases[j] : 0, out32 ? out32[j] : 0, out64 ? out64[j] : 0, sq, \
                   over + (size_t)j * K);                                              \
}

/* The order statistics: per column, the mean of rows [lo, hi) of the K differences
   sorted by a sorting network (pairs: npairs comparators i < j), added to the
   reference: the median is [K/2, K/2 + 1) or [K/2 - 1, K/2 + 1), the trimmed mean
   [cut, K - cut). The rows of a block are compared column-wise, so each comparator is
   a vectorised min and max over CW columns.

   What is sorted is the values x themselves, in S (float for float16 and float32
   replies, double for float64 ones): d = x - ref is a non-decreasing function of x, so
   the sorted x give the sorted d, and float holds twice the lanes of double per
   instruction. The kept rows' d are then formed in double from the sorted x, exactly as
   before sorting, and added from the smallest up. buf holds K * CW values of S.

   A block reads CW values (512 bytes for float32) from each of K replies in turn: too
   short a run per stream for the hardware prefetcher, so the next block of each reply
   is prefetched by hand (the checking pass over 20 replies of 1M values: 17 ms, not 22). */
#define CW 128 /* 20 rows of 128 values: 10-20 KiB, in L1 */

/* The network on one block: every comparator, each on the block's m columns. Finite
   maths lets the compiler use the min and max instructions (NaN would need a blend); a
   NaN makes the reply's squares NaN, and the reply is dropped whatever this sorted. One
   call a block, with the comparator inlined (a function with its own optimize
   attribute is not inlined into one without it). */
#if defined(__GNUC__) && !defined(__clang__)
#define FINITE __attribute__((optimize("finite-math-only")))
#else
#define FINITE
#endif
#define DEFINE_NETWORK(NAME, S)                                                        \
FINITE static void NAME(S *buf, int npairs, const int *pairs, size_t m)                \
{                                                                                      \
    for (int t = 0; t < npairs; t++) {                                                 \
        S *restrict a = buf + (size_t)pairs[2 * t] * CW;                               \
        S *restrict b = buf + (size_t)pairs[2 * t + 1] * CW;                           \
        for (size_t c = 0; c < m; c++) {                                               \
            S u = a[c], w = b[c];                                                      \
            a[c] = w < u ? w : u;                                                      \
            b[c] = w < u ? u : w;                                                      \
        }                                                                              \
    }                                                                                  \
}
DEFINE_NETWORK(network_f, float)
DEFINE_NETWORK(network_d, double)

/* Unrolled networks (generated, below the C written here: see _unrolled_source), for a
   full block of float rows on CPUs with AVX: 8 columns at a time, every row of the
   network held in a register (or spilled by the compiler), so a comparator is one min
   and one max instead of two loads and two stores in L1. kind 1: the median's network
   for K rows, kind 2: the whole sorting network; others, partial blocks and double rows
   take the loop above. */
typedef void (*unrolled_fn)(float *);
static unrolled_fn unrolled_network(int K, int kind);

static void network_fast_f(float *buf, int npairs, const int *pairs, size_t m, int K,
                           int kind)
{
    unrolled_fn f = m == CW ? unrolled_network(K, kind) : 0;
    if (f)
        f(buf);
    else
        network_f(buf, npairs, pairs, m);
}

static void network_fast_d(double *buf, int npairs, const int *pairs, size_t m, int K,
                           int kind)
{
    (void)K; (void)kind;
    network_d(buf, npairs, pairs, m);
}

#define DEFINE_CENTRAL(NAME, T, S, NETWORK)                                            \
void NAME(int K, int arrays, const T *const *xs, const float *const *refs,             \
          const size_t *sizes, int npairs, const int *pairs, int kind, int lo, int hi, \
          double lim, S *buf, float *const *out32, double *sq, double *over)           \
{                                                                                      \
    for (int j = 0; j < arrays; j++) {                                                 \
        const T *const *xj = xs + (size_t)j * K;                                       \
        const float *ref = refs[j];                                                    \
        size_t n = sizes[j];                                                           \
        double *ov = over + (size_t)j * K;                                             \
        for (size_t s = 0; s < n; s += CW) {                                           \
            size_t m = n - s < CW ? n - s : CW;                                        \
            for (int k = 0; k < K; k++) {                                              \
                const T *restrict x = xj[k] + s;                                       \
                S *restrict row = buf + (size_t)k * CW;                                \
                if (s + 2 * CW <= n)                                                   \
                    for (size_t c = 0; c < CW; c += 64 / sizeof(T))                    \
                        __builtin_prefetch(x + CW + c);                                \
                double q = 0, v = 0;                                                   \
                for (size_t c = 0; c < m; c++) {                                       \
                    double d = (double)x[c] - (double)ref[s + c];                      \
                    v += fabs(d) > lim ? 1.0 : 0.0;                                    \
                    q += d * d;                                                        \
                    row[c] = (S)x[c];                                                  \
                }                                                                      \
                sq[k] += q; ov[k] += v;                                                \
            }                                                                          \
            NETWORK(buf, npairs, pairs, m, K, kind);                                   \
            for (size_t c = 0; c < m; c++) {                                           \
                double r = (double)ref[s + c];                                         \
                double total = (double)buf[(size_t)lo * CW + c] - r;                   \
                for (int i = lo + 1; i < hi; i++)                                      \
                    total += (double)buf[(size_t)i * CW + c] - r;                      \
                out32[j][s + c] = (float)(r + total / (hi - lo));                      \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
}

DEFINE_SUMS(flower_llm_sum_f16, _Float16)
DEFINE_SUMS(flower_llm_sum_f32, float)
DEFINE_SUMS(flower_llm_sum_f64, double)
DEFINE_CENTRAL(flower_llm_central_f16, _Float16, float, network_fast_f)
DEFINE_CENTRAL(flower_llm_central_f32, float, float, network_fast_f)
DEFINE_CENTRAL(flower_llm_central_f64, double, double, network_fast_d)
"""

_FLAGS_BASE = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_FUNCTIONS: dict[np.dtype[Any], str] = {
    np.dtype(np.float16): "flower_llm_sum_f16",
    np.dtype(np.float32): "flower_llm_sum_f32",
    np.dtype(np.float64): "flower_llm_sum_f64",
}


@dataclass(frozen=True)
class Sums:
    """What :func:`weighted_sums` returns for the arrays of every reply."""

    out: dict[str, np.ndarray]
    """Per array: ``ref + sum_k p_k (x_k - ref)`` (or without ``ref``), flat: float32
    rounded once, or float64."""
    squares: np.ndarray
    """float64 ``[K]``: ``sum (x_k - ref)^2`` over every array; NaN or Inf iff reply k
    holds one."""
    over: dict[str, np.ndarray]
    """Per array, float64 ``[K]``: how many of reply k's values differ from ``ref`` by
    more than the bound."""


class _Kernel:
    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.functions: dict[np.dtype[Any], Any] = {}
        self.central: dict[np.dtype[Any], Any] = {}
        for dtype, name in _FUNCTIONS.items():
            function = getattr(library, name)
            function.restype = None
            # K, arrays; xs, refs, sizes, p; lim, add_ref; bases, out32, out64, sq, over
            function.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 4]
            function.argtypes += [ctypes.c_double, ctypes.c_int, *[ctypes.c_void_p] * 5]
            self.functions[dtype] = function
            central = getattr(library, name.replace("_sum_", "_central_"))
            central.restype = None
            # K, arrays; xs, refs, sizes; npairs, pairs, kind, lo, hi; lim; buf, out32, sq,
            # over
            central.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 3]
            central.argtypes += [ctypes.c_int, ctypes.c_void_p, *[ctypes.c_int] * 3]
            central.argtypes += [ctypes.c_double, *[ctypes.c_void_p] * 4]
            self.central[dtype] = central


def weighted_sums(
    values: Mapping[str, Sequence[np.ndarray]],
    reference: Mapping[str, np.ndarray],
    factors: np.ndarray,
    bound: float | None,
    *,
    add_reference: bool = True,
    wide: bool = False,
    base: Mapping[str, np.ndarray] | None = None,
) -> Sums | None:
    """The sums of every array over every reply in one call (see the module's
    docstring), or None when the kernel is off or cannot take these arrays (then use the
    NumPy sweep): it takes flat, contiguous arrays of one dtype (float16, float32 or
    float64) for every reply and key, each of its float32 reference's size.

    Parameters
    ----------
    values : Mapping[str, Sequence[np.ndarray]]
        Per key of ``reference``, one flat array per reply, in the same reply order;
        float64 values must already be known to lie within float32's range (as
        :func:`flower_llm.aggregation.checked_aggregate` checks).
    reference : Mapping[str, np.ndarray]
        Flat float32 arrays (the global adapter's values).
    factors : np.ndarray
        ``p_k``, float64 ``[K]``.
    bound : float | None
        Count values with ``|x - ref| > bound`` (None: no bound).
    add_reference : bool
        Add the reference to the sum (False: the sum of the weighted differences alone).
    wide : bool
        Return float64 (for a sum that is added to later); else float32, rounded once.
    base : Mapping[str, np.ndarray] | None
        Flat float64 arrays to add the sum to instead of the reference (a float64 sum of
        an earlier call: the two are added before the one rounding).
    """
    kernel = _kernel()
    if kernel is None or not values:
        return None
    return _call(kernel, values, reference, factors, bound, add_reference, wide, base)


def weighted_sum(
    values: Sequence[np.ndarray],
    reference: np.ndarray,
    factors: np.ndarray,
    bound: float | None,
    *,
    add_reference: bool = True,
    wide: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`weighted_sums` of one array: ``(out, squares, over)``, or None."""
    sums = weighted_sums(
        {"": values}, {"": reference}, factors, bound, add_reference=add_reference, wide=wide
    )
    return None if sums is None else (sums.out[""], sums.squares, sums.over[""])


def _call(
    kernel: _Kernel,
    values: Mapping[str, Sequence[np.ndarray]],
    reference: Mapping[str, np.ndarray],
    factors: np.ndarray,
    bound: float | None,
    add_reference: bool,
    wide: bool,
    base: Mapping[str, np.ndarray] | None = None,
) -> Sums | None:
    prepared = _prepare(kernel.functions, values, reference, factors, base)
    if prepared is None:
        return None
    function, keys, sizes, pointers, refs = prepared
    count = len(values[keys[0]])
    weights = np.ascontiguousarray(factors, dtype=np.float64)
    if base is not None:
        bases = np.fromiter((base[k].ctypes.data for k in keys), np.uintp, len(keys))
    outputs = _Outputs.make(keys, sizes, count, np.float64 if wide else np.float32)
    function(
        count,
        len(keys),
        pointers.ctypes.data,
        refs.ctypes.data,
        sizes.ctypes.data,
        weights.ctypes.data,
        float("inf") if bound is None else float(bound),
        int(add_reference),
        None if base is None else bases.ctypes.data,
        None if wide else outputs.pointers.ctypes.data,
        outputs.pointers.ctypes.data if wide else None,
        outputs.squares.ctypes.data,
        outputs.over.ctypes.data,
    )
    return outputs.sums()


@dataclass(frozen=True)
class _Outputs:
    """What one kernel call writes: every array's result in one flat buffer, the
    per-reply squares and the per-array, per-reply counts."""

    keys: list[str]
    sizes: np.ndarray
    flat: np.ndarray
    starts: np.ndarray
    pointers: np.ndarray
    """Where each array's result starts in ``flat`` (addresses, for the C side)."""
    squares: np.ndarray
    over: np.ndarray

    @classmethod
    def make(cls, keys: list[str], sizes: np.ndarray, count: int, dtype: type) -> _Outputs:
        flat: np.ndarray = np.empty(int(sizes.sum()), dtype)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uintp)
        pointers = flat.ctypes.data + starts * np.uintp(flat.itemsize)
        return cls(
            keys, sizes, flat, starts, pointers, np.zeros(count), np.zeros((len(keys), count))
        )

    def sums(self) -> Sums:
        """The results, one flat view of ``flat`` per array."""
        out = {
            k: self.flat[int(a) : int(a + n)]
            for k, a, n in zip(self.keys, self.starts, self.sizes, strict=True)
        }
        return Sums(out, self.squares, dict(zip(self.keys, self.over, strict=True)))


def _prepare(
    functions: Mapping[np.dtype[Any], Any],
    values: Mapping[str, Sequence[np.ndarray]],
    reference: Mapping[str, np.ndarray],
    factors: np.ndarray,
    base: Mapping[str, np.ndarray] | None,
) -> tuple[Any, list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """``(function, keys, sizes, value pointers, reference pointers)`` for a call, or
    None if the kernel cannot take the arrays (mixed or unknown dtypes, strided or
    multi-dimensional arrays, a reference that is not float32 of the same size)."""
    keys = list(reference)
    if set(values) != set(keys):
        raise ValueError("values and reference hold different keys")
    if not keys:
        return None
    count = len(values[keys[0]])
    if np.shape(factors) != (count,):
        raise ValueError(f"{np.shape(factors)} factors for {count} replies")
    dtype = values[keys[0]][0].dtype if count else None
    function = functions.get(dtype) if dtype is not None else None
    if function is None:
        return None
    for key in keys:
        ref, arrays = reference[key], values[key]
        if (
            ref.dtype != np.float32
            or ref.ndim != 1
            or not ref.flags.c_contiguous
            or len(arrays) != count
            or not all(
                v.dtype == dtype and v.ndim == 1 and v.size == ref.size and v.flags.c_contiguous
                for v in arrays
            )
        ):
            return None
    if base is not None:
        for key in keys:
            b = base[key]
            if b.dtype != np.float64 or b.ndim != 1 or b.size != reference[key].size:
                raise ValueError(f"base '{key}' is not a flat float64 array of its size")
            if not b.flags.c_contiguous:
                raise ValueError(f"base '{key}' is not contiguous")
    sizes = np.fromiter((reference[k].size for k in keys), np.uintp, len(keys))
    pointers = np.fromiter(
        (v.ctypes.data for k in keys for v in values[k]), np.uintp, len(keys) * count
    )
    refs = np.fromiter((reference[k].ctypes.data for k in keys), np.uintp, len(keys))
    return function, keys, sizes, pointers, refs


def central_sums(
    values: Mapping[str, Sequence[np.ndarray]],
    reference: Mapping[str, np.ndarray],
    rule: str,
    cut: int,
    bound: float | None,
) -> Sums | None:
    """Per value, the median (``rule = "median"``) or the mean after cutting ``cut``
    values at each end (``"trimmed-mean"``) of the differences ``x_k - ref``, added to the
    reference and rounded once to float32, with the same per-reply squares and counts as
    :func:`weighted_sums`; or None when the kernel is off or cannot take the arrays.

    The same float64 numbers as sorting each column with NumPy and taking the middle
    value, the mean of the two middle values, or the mean of the kept ones (added in
    order): the differences are sorted by Batcher's odd-even merge network, less the
    comparators the kept rows do not depend on, and the kept ones added from the
    smallest up, as NumPy's reduction along the sorted column adds them.
    """
    kernel = _kernel()
    if kernel is None or not values or not reference:
        return None
    return _central(kernel, values, reference, rule, cut, bound)


def _central(
    kernel: _Kernel,
    values: Mapping[str, Sequence[np.ndarray]],
    reference: Mapping[str, np.ndarray],
    rule: str,
    cut: int,
    bound: float | None,
) -> Sums | None:
    count = len(values[next(iter(reference))])
    if rule == "median":
        (lo, hi), kind = _median_rows(count), _MEDIAN
    elif rule == "trimmed-mean":
        (lo, hi), kind = (cut, count - cut), _WHOLE
    else:
        raise ValueError(f"unknown order statistic {rule!r}")
    if not 0 <= lo < hi <= count:
        raise ValueError(f"{rule} of {count} values keeps rows [{lo}, {hi})")
    prepared = _prepare(kernel.central, values, reference, np.ones(count), None)
    if prepared is None:
        return None
    function, keys, sizes, pointers, refs = prepared
    pairs = _network_for_rows(count, lo, hi)  # only what rows [lo, hi) depend on
    outputs = _Outputs.make(keys, sizes, count, np.float32)
    buffer = np.empty(count * 128)  # K rows of CW columns (float or double values)
    function(
        count,
        len(keys),
        pointers.ctypes.data,
        refs.ctypes.data,
        sizes.ctypes.data,
        len(pairs) // 2,
        pairs.ctypes.data,
        kind,
        lo,
        hi,
        float("inf") if bound is None else float(bound),
        buffer.ctypes.data,
        outputs.pointers.ctypes.data,
        outputs.squares.ctypes.data,
        outputs.over.ctypes.data,
    )
    return outputs.sums()


@functools.lru_cache(maxsize=16)
def _sorting_network(count: int) -> np.ndarray:
    """Batcher's odd-even merge sorting network for ``count`` inputs, as int32 pairs
    ``(i, j)``, ``i < j``: after every comparator the smaller value is at ``i``.

    The iterative form for any ``count`` (not only powers of two): merges of sorted runs
    of length ``p`` = 1, 2, 4, ..., each by comparators ``k`` apart, ``k`` = p, p/2, ...,
    1, between positions in the same merged run of length ``2p``.
    """
    pairs: list[int] = []
    p = 1
    while p < count:
        k = p
        while k >= 1:
            for j in range(k % p, count - k, 2 * k):
                for i in range(min(k, count - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs += (i + j, i + j + k)
            k //= 2
        p *= 2
    return np.asarray(pairs, dtype=np.int32)


_MEDIAN, _WHOLE = 1, 2
"""The unrolled networks' kinds: the median's (pruned), the whole sorting network."""
_UNROLLED_MAX = 24
"""Reply counts 3..24 get unrolled networks; more take the loop. Each count adds to the
one-off compile (3..24: about 1.5 s more on a 2-core EPYC; 3..32: 3.3 s)."""


def _median_rows(count: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``count`` sorted values whose mean is the median."""
    return (count // 2, count // 2 + 1) if count % 2 else (count // 2 - 1, count // 2 + 1)


def _unrolled_source() -> str:
    """C for the unrolled networks (see the C's comment at ``unrolled_network``): one
    function per reply count and kind, and the lookup the kernel calls."""
    lines = ["#if defined(__AVX__)", "#include <immintrin.h>"]
    table = []
    for kind, name in ((_MEDIAN, "median"), (_WHOLE, "whole")):
        for count in range(3, _UNROLLED_MAX + 1):
            rows = _median_rows(count) if kind == _MEDIAN else (0, count)
            pairs = _network_for_rows(count, *rows).reshape(-1, 2).tolist()
            used = sorted({r for pair in pairs for r in pair} | set(range(*rows)))
            body = [f"static void unrolled_{name}_{count}(float *buf)", "{"]
            body.append("    for (size_t c = 0; c < CW; c += 8) {")
            body += [f"        __m256 r{r} = _mm256_loadu_ps(buf + {r} * CW + c);" for r in used]
            # min(w, u) is w < u ? w : u, and max(u, w) is u > w ? u : w: the loop's
            # comparator exactly, ties and signed zeros included
            body += [
                f"        {{ __m256 u = r{i}, w = r{j}; r{i} = _mm256_min_ps(w, u);"
                f" r{j} = _mm256_max_ps(u, w); }}"
                for i, j in pairs
            ]
            body += [f"        _mm256_storeu_ps(buf + {r} * CW + c, r{r});" for r in range(*rows)]
            body += ["    }", "}"]
            lines += body
            table.append(f"    if (kind == {kind} && K == {count}) return unrolled_{name}_{count};")
    lines += ["static unrolled_fn unrolled_network(int K, int kind)", "{", *table, "    return 0;"]
    lines += ["}", "#else", "static unrolled_fn unrolled_network(int K, int kind)"]
    lines += ["{", "    (void)K; (void)kind;", "    return 0;", "}", "#endif", ""]
    return "\n".join(lines)


@functools.lru_cache(maxsize=64)
def _network_for_rows(count: int, lo: int, hi: int) -> np.ndarray:
    """The comparators of :func:`_sorting_network` that rows ``[lo, hi)`` depend on.

    Walking the network backwards from those rows, a comparator is kept when one of its
    two rows is still needed, and then both are; the others only order rows nobody reads,
    so rows ``[lo, hi)`` end exactly as after the whole network (for the median of 20
    values, 84 of its 103 comparators).
    """
    pairs = _sorting_network(count).reshape(-1, 2)
    needed = set(range(lo, hi))
    kept = []
    for i, j in pairs[::-1].tolist():
        if i in needed or j in needed:
            kept.append((i, j))
            needed.update((i, j))
    return np.asarray(kept[::-1], dtype=np.int32).reshape(-1)


def status() -> str:
    """One line: where the kernel was loaded from, or why it is off."""
    kernel = _kernel()
    return f"compiled ({kernel.path.name})" if kernel is not None else f"off: {_why_off()}"


def reset() -> None:
    """Forget the loaded kernel (or why it was off); the next call reads ``ENV`` again."""
    _kernel.cache_clear()
    _state.clear()


def _why_off() -> str:
    return _state.get("why", "not tried")


_state: dict[str, str] = {}


@functools.cache
def _kernel() -> _Kernel | None:
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("off", "0", "no", "false", "numpy"):
        _state["why"] = f"{ENV}={setting}"
        return None
    try:
        kernel = _build_and_load()
        _self_test(kernel)
    except Exception as exc:  # any failure leaves the NumPy sweep in charge
        _state["why"] = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        if setting == "require":
            raise RuntimeError(
                f"{ENV}=require, but the sum kernel is off: {_state['why']}"
            ) from exc
        log.info("Compiled sum kernel off (%s); using the NumPy sweep", _state["why"])
        return None
    log.debug("Compiled sum kernel loaded from %s", kernel.path)
    return kernel


def _compiler() -> str:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def _cpu_features() -> str | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        return None
    return None


def _build_and_load() -> _Kernel:
    from flower_llm.embedded import default_cache_root

    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    features = _cpu_features()
    # Native code only where the CPU's flags are part of the key: a cache shared between
    # machines must never give one CPU another's instructions.
    flags = [*_FLAGS_BASE, "-march=native"] if features is not None else list(_FLAGS_BASE)
    text = _SOURCE + _unrolled_source()
    key = hashlib.sha256(
        "\0".join(
            [text, compiler, version, " ".join(flags), features or "", platform.machine()]
        ).encode()
    ).hexdigest()[:16]
    directory = default_cache_root() / "kernels"
    path = directory / f"sum-{key}.so"
    if path.exists():
        try:
            return _Kernel(ctypes.CDLL(str(path)), path)
        except OSError as exc:  # truncated or corrupt: built again below
            log.warning("Cached sum kernel %s cannot be loaded (%s); building it again", path, exc)
            path.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source = Path(scratch) / "sum.c"
        source.write_text(text, encoding="utf-8")
        built = Path(scratch) / "sum.so"
        done = subprocess.run(
            [compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(source)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            first_error = next((line for line in lines if "error" in line), lines[-1])
            raise RuntimeError(f"compiling the sum kernel failed: {first_error}")
        os.replace(built, path)  # atomic: a concurrent build loads one or the other
    return _Kernel(ctypes.CDLL(str(path)), path)


def _self_test(kernel: _Kernel) -> None:
    """Compare the kernel with NumPy's float64 sum on a small case, every dtype."""
    rng = np.random.default_rng(12)
    size = 2048 + 517  # one full block and a partial one
    reference = rng.standard_normal(size).astype(np.float32)
    factors = rng.random(7)
    factors /= factors.sum()
    for dtype in kernel.functions:
        values = [(reference + rng.standard_normal(size)).astype(dtype) for _ in factors]
        values[2][5] = reference[5] + 4.0  # beyond the bound below, exactly in every dtype
        differences = np.stack([v.astype(np.float64) - reference for v in values])
        expected = (reference + factors @ differences).astype(np.float32)
        sums = _call(kernel, {"x": values}, {"x": reference}, factors, 3.9, True, False)
        counted = (np.abs(differences) > 3.9).sum(axis=1)
        if (
            sums is None
            or not np.array_equal(sums.over["x"], counted)
            or not np.allclose(sums.squares, (differences**2).sum(axis=1), rtol=1e-12)
            or np.any(np.abs(sums.out["x"] - expected) > np.spacing(np.abs(expected)))
        ):
            raise RuntimeError(f"the compiled sum kernel gave a wrong result for {dtype}")
        for rule, cut in (("median", 0), ("trimmed-mean", 2)):
            got = _central(kernel, {"x": values}, {"x": reference}, rule, cut, None)
            ordered = np.sort(differences, axis=0)
            middle = len(values) // 2  # 7 values: odd
            central = ordered[middle] if rule == "median" else ordered[cut:-cut].mean(axis=0)
            want = (reference + central).astype(np.float32)
            if got is None or not np.array_equal(got.out["x"], want):
                raise RuntimeError(f"the compiled {rule} gave a wrong result for {dtype}")
