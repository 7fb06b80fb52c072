"""DP-FedAvg mechanism on adapter updates: clipping, noise, adaptive clip norm.

Flower's own DP helpers (``flwr.supercore.differential_privacy``) serve as the reference for
the norm, the noise standard deviation and the adaptive-clipping noise split.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from flwr.supercore import differential_privacy as flwr_dp
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flower_llm.privacy import (
    adaptive_clip_norm,
    adaptive_update_noise_multiplier,
    add_gaussian_noise,
    clip_update,
    dp_fedavg_noise_stddev,
    global_l2_norm,
    noisy_unclipped_fraction,
    small_cohort_probability,
)

SEED = 20240611


def lora_update(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A small LoRA-shaped update: A (r x in) and B (out x r) for two modules."""
    return {
        "q_proj.lora_A": (scale * rng.standard_normal((4, 32))).astype(np.float32),
        "q_proj.lora_B": (scale * rng.standard_normal((32, 4))).astype(np.float32),
        "v_proj.lora_A": (scale * rng.standard_normal((4, 32))).astype(np.float32),
        "v_proj.lora_B": (scale * rng.standard_normal((32, 4))).astype(np.float32),
    }


FLOAT_DTYPES = (np.float16, np.float32, np.float64)


# Any floating dtype, any shapes (0-d included), finite values of that dtype.
@st.composite
def updates(draw: st.DrawFn, dtypes: tuple[type, ...] = FLOAT_DTYPES) -> dict[str, np.ndarray]:
    dtype = draw(st.sampled_from(dtypes))
    # Magnitudes bounded so the test's own reference norm (sum of squares) cannot overflow.
    bound = {np.float16: 65504.0, np.float32: 2.0**100, np.float64: 2.0**500}[dtype]
    width = np.finfo(dtype).bits
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)
    names = draw(st.lists(st.text("abcdef._", min_size=1, max_size=8), max_size=4, unique=True))
    return {
        name: draw(
            hnp.arrays(
                dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), elements=elements
            )
        )
        for name in names
    }


# ---------------------------------------------------------------------------------------------
# Norm
# ---------------------------------------------------------------------------------------------


def test_global_norm_matches_flower_and_a_flat_vector() -> None:
    # Prepare
    update = lora_update(np.random.default_rng(SEED))
    flat = np.concatenate([v.astype(np.float64).ravel() for v in update.values()])

    # Execute
    norm = global_l2_norm(update)

    # Assert
    assert norm == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)
    assert norm == pytest.approx(flwr_dp.get_norm(list(update.values())), rel=1e-6)


def test_global_norm_edge_cases() -> None:
    assert global_l2_norm({}) == 0.0
    assert global_l2_norm({"a": np.zeros((3, 0), np.float32)}) == 0.0
    huge = {"a": np.full(4, 1e200), "b": np.array([-1e200])}
    assert global_l2_norm(huge) == pytest.approx(math.sqrt(5) * 1e200, rel=1e-12)
    assert global_l2_norm({"a": np.array([3.0, 4.0], np.float16)}) == 5.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_refused_not_passed_through(bad: float) -> None:
    # Flower's clip computes min(1, C / nan) == 1 and lets such an update through unclipped.
    update = {"ok": np.ones(3), "broken": np.array([1.0, bad])}
    with pytest.raises(ValueError, match="'broken'"):
        global_l2_norm(update)
    with pytest.raises(ValueError, match="'broken'"):
        clip_update(update, 1.0)


@pytest.mark.parametrize(
    "update",
    [{"ints": np.arange(3)}, {"list": [1.0, 2.0]}, [np.ones(2)]],
    ids=["int-dtype", "not-an-array", "not-a-mapping"],
)
def test_non_float_updates_are_rejected(update: Any) -> None:
    with pytest.raises(TypeError):
        global_l2_norm(update)


# ---------------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(update=updates(), clip_norm=st.floats(1e-6, 1e6))
def test_clipped_norm_never_exceeds_clip_norm(
    update: dict[str, np.ndarray], clip_norm: float
) -> None:
    # Execute
    clipped, scale, was_clipped = clip_update(update, clip_norm)

    # Assert
    norm_before = global_l2_norm(update)
    assert global_l2_norm(clipped) <= clip_norm * (1 + 1e-6)
    assert list(clipped) == list(update)
    assert all(clipped[k].dtype == update[k].dtype for k in update)
    assert all(clipped[k].shape == update[k].shape for k in update)
    assert was_clipped == (norm_before > clip_norm)
    assert 0.0 < scale <= 1.0


@settings(max_examples=100, deadline=None)
@given(update=updates(), clip_norm=st.floats(1e-6, 1e6))
def test_clipping_is_the_identity_within_the_ball(
    update: dict[str, np.ndarray], clip_norm: float
) -> None:
    # Prepare: shrink (exactly, by a power of two) until inside the ball
    norm = global_l2_norm(update)
    if norm > clip_norm:
        shift = math.ceil(math.log2(norm / clip_norm)) + 1
        update = {k: np.asarray(np.ldexp(v, -shift), dtype=v.dtype) for k, v in update.items()}
    assume(global_l2_norm(update) <= clip_norm)  # subnormal rounding can push it out

    # Execute
    clipped, scale, was_clipped = clip_update(update, clip_norm)

    # Assert
    assert scale == 1.0 and not was_clipped
    for key, value in update.items():
        np.testing.assert_array_equal(clipped[key], value)
        assert clipped[key] is not value


@settings(max_examples=50, deadline=None)
@given(update=updates(dtypes=(np.float32, np.float64)), clip_norm=st.floats(1e-3, 1e3))
def test_clipping_scales_onto_the_sphere_keeping_the_direction(
    update: dict[str, np.ndarray], clip_norm: float
) -> None:
    norm = global_l2_norm(update)
    assume(norm > 2 * clip_norm)  # the identity case is tested above

    # Execute
    clipped, scale, was_clipped = clip_update(update, clip_norm)

    # Assert: float32 rounding of every element bounds how far it can land from the sphere
    assert was_clipped
    assert scale == pytest.approx(clip_norm / norm, rel=1e-6)
    assert global_l2_norm(clipped) == pytest.approx(clip_norm, rel=1e-6)
    for key, value in update.items():
        expected = value.astype(np.float64) * (clip_norm / norm)
        tolerance = 1e-6 * np.abs(expected) + np.finfo(value.dtype).tiny
        assert np.all(np.abs(clipped[key].astype(np.float64) - expected) <= tolerance)


def test_clipping_a_float16_update_stays_inside_the_ball() -> None:
    # Prepare: float16 rounds the scaled values; without the correction the norm overshoots.
    rng = np.random.default_rng(SEED)
    overshoots = 0
    for _ in range(200):
        update = {"a": (10 * rng.standard_normal(257)).astype(np.float16)}
        naive = (update["a"].astype(np.float64) * (0.7 / global_l2_norm(update))).astype(np.float16)
        overshoots += global_l2_norm({"a": naive}) > 0.7

        # Execute
        clipped, _, _ = clip_update(update, 0.7)

        # Assert
        assert global_l2_norm(clipped) <= 0.7
    assert overshoots > 0  # the case this guards against does occur


def test_clip_does_not_touch_its_input() -> None:
    update = lora_update(np.random.default_rng(SEED), scale=10.0)
    before = {k: v.copy() for k, v in update.items()}
    clipped, _, _ = clip_update(update, 0.1)
    clipped["q_proj.lora_A"][...] = 0.0
    for key in update:
        np.testing.assert_array_equal(update[key], before[key])


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, math.inf, math.nan, True])
def test_clip_norm_must_be_positive_and_finite(clip_norm: float) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update({"a": np.ones(2)}, clip_norm)


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_noise_has_the_requested_standard_deviation(dtype: type) -> None:
    # Prepare: 200k samples; the sample std of a Gaussian has relative sd 1/sqrt(2n) = 0.16%
    stddev, n = 0.37, 200_000
    update = {"a": np.zeros((400, 250), dtype)}

    # Execute
    noised = add_gaussian_noise(update, stddev, np.random.default_rng(SEED))

    # Assert
    values = noised["a"].astype(np.float64)
    assert noised["a"].dtype == dtype and noised["a"].shape == (400, 250)
    assert values.std() == pytest.approx(stddev, rel=0.01)
    assert abs(values.mean()) < 5 * stddev / math.sqrt(n)


def test_noise_is_added_to_the_input_not_replacing_it() -> None:
    update = {"a": np.full(100_000, 3.0)}
    noised = add_gaussian_noise(update, 0.01, np.random.default_rng(SEED))
    assert noised["a"].mean() == pytest.approx(3.0, abs=1e-3)


def test_zero_noise_returns_the_input() -> None:
    update = lora_update(np.random.default_rng(SEED))
    noised = add_gaussian_noise(update, 0.0, np.random.default_rng(SEED))
    assert list(noised) == list(update)
    for key, value in update.items():
        np.testing.assert_array_equal(noised[key], value)
        assert noised[key] is not value


def test_noise_is_reproducible_and_independent_of_key_order() -> None:
    # Prepare
    update = lora_update(np.random.default_rng(SEED))
    reordered = dict(reversed(list(update.items())))

    # Execute
    first = add_gaussian_noise(update, 0.5, np.random.default_rng(7))
    second = add_gaussian_noise(reordered, 0.5, np.random.default_rng(7))
    other_seed = add_gaussian_noise(update, 0.5, np.random.default_rng(8))

    # Assert
    assert list(second) == list(reordered)
    for key in update:
        np.testing.assert_array_equal(first[key], second[key])
        assert not np.array_equal(first[key], other_seed[key])


@pytest.mark.parametrize("rng", [None, 42, np.random.RandomState(0)], ids=str)
def test_noise_needs_a_generator(rng: Any) -> None:
    with pytest.raises(TypeError, match="Generator"):
        add_gaussian_noise({"a": np.ones(2)}, 1.0, rng)


@pytest.mark.parametrize("stddev", [-0.1, math.inf, math.nan])
def test_noise_stddev_must_be_non_negative_and_finite(stddev: float) -> None:
    with pytest.raises(ValueError, match="stddev"):
        add_gaussian_noise({"a": np.ones(2)}, stddev, np.random.default_rng(0))


def test_dp_fedavg_stddev_is_sigma_c_over_m() -> None:
    assert dp_fedavg_noise_stddev(1.0, 0.1, 10) == pytest.approx(0.01)
    assert dp_fedavg_noise_stddev(0.0, 0.1, 10) == 0.0
    assert dp_fedavg_noise_stddev(1.3, 0.7, 12) == pytest.approx(flwr_dp.compute_stdv(1.3, 0.7, 12))
    with pytest.raises(ValueError, match="num_sampled_clients"):
        dp_fedavg_noise_stddev(1.0, 0.1, 0)
    with pytest.raises(ValueError, match="clip_norm"):
        dp_fedavg_noise_stddev(1.0, 0.0, 3)


def test_dp_fedavg_without_noise_and_with_a_huge_clip_norm_is_plain_averaging() -> None:
    # Prepare
    rng = np.random.default_rng(SEED)
    client_updates = [lora_update(rng) for _ in range(5)]
    plain = {k: np.mean([u[k] for u in client_updates], axis=0) for k in client_updates[0]}

    # Execute
    clipped = [clip_update(u, 1e9)[0] for u in client_updates]
    average = {k: np.mean([u[k] for u in clipped], axis=0) for k in clipped[0]}
    stddev = dp_fedavg_noise_stddev(0.0, 1e9, len(clipped))
    noised = add_gaussian_noise(average, stddev, rng)

    # Assert
    for key in plain:
        np.testing.assert_array_equal(noised[key], plain[key])


# ---------------------------------------------------------------------------------------------
# Adaptive clipping
# ---------------------------------------------------------------------------------------------


def test_adaptive_clip_norm_by_hand() -> None:
    assert adaptive_clip_norm(1.0, 0.7, 0.5, 0.2) == pytest.approx(math.exp(-0.04))
    assert adaptive_clip_norm(2.0, 0.2, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.06))
    assert adaptive_clip_norm(0.3, 0.5, 0.5, 0.2) == pytest.approx(0.3)
    assert adaptive_clip_norm(0.3, 1.0, 0.5, 0.0) == 0.3


@settings(max_examples=100, deadline=None)
@given(
    clip_norm=st.floats(1e-4, 1e4),
    fraction=st.floats(-0.5, 1.5),
    quantile=st.floats(0.0, 1.0),
    learning_rate=st.floats(0.01, 1.0),
)
def test_adaptive_clip_norm_moves_towards_the_quantile(
    clip_norm: float, fraction: float, quantile: float, learning_rate: float
) -> None:
    new = adaptive_clip_norm(clip_norm, fraction, quantile, learning_rate)
    assert new > 0
    if fraction > quantile + 1e-9:
        assert new < clip_norm  # too many unclipped: tighten
    elif fraction < quantile - 1e-9:
        assert new > clip_norm


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 0.5, 0.5, 0.2), "clip_norm"),
        ((1.0, math.nan, 0.5, 0.2), "unclipped_fraction_noisy"),
        ((1.0, 0.5, 1.5, 0.2), "target_quantile"),
        ((1.0, 0.5, 0.5, -0.2), "learning_rate"),
    ],
)
def test_adaptive_clip_norm_rejects_bad_input(args: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        adaptive_clip_norm(*args)


def test_noisy_unclipped_fraction_statistics() -> None:
    # Prepare
    rng = np.random.default_rng(SEED)
    count, m, stddev = 7, 20, 1.0  # stddev m / 20, as Andrew et al. suggest

    # Execute
    samples = np.array([noisy_unclipped_fraction(count, m, stddev, rng) for _ in range(20_000)])

    # Assert
    assert noisy_unclipped_fraction(count, m, 0.0, rng) == count / m
    assert samples.mean() == pytest.approx(count / m, abs=5 * stddev / m / math.sqrt(20_000))
    assert samples.std() == pytest.approx(stddev / m, rel=0.03)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 4, 1.0), "cannot exceed"),
        ((-1, 4, 1.0), "count"),
        ((1, 0, 1.0), "num_clients"),
        ((1, 4, -1.0), "stddev"),
        ((1.5, 4, 1.0), "count"),
    ],
)
def test_noisy_unclipped_fraction_rejects_bad_input(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        noisy_unclipped_fraction(*args, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("sigma", "count_stddev"), [(1.0, 5.0), (0.8, 0.5), (2.0, 1.01), (3.0, 100.0)]
)
def test_adaptive_update_noise_multiplier_matches_flower(sigma: float, count_stddev: float) -> None:
    # Prepare
    _, expected = flwr_dp.compute_adaptive_noise_params(sigma, 100, count_stddev)

    # Execute
    update_sigma = adaptive_update_noise_multiplier(sigma, count_stddev)

    # Assert: more noise on the update, and the two parts compose back to sigma
    assert update_sigma == pytest.approx(expected, rel=1e-12)
    assert update_sigma > sigma
    assert (update_sigma**-2 + (2 * count_stddev) ** -2) ** -0.5 == pytest.approx(sigma)


def test_adaptive_update_noise_multiplier_refuses_a_too_noisy_budget() -> None:
    assert adaptive_update_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        adaptive_update_noise_multiplier(1.0, 0.5)


# --------------------------------------------------------------------------------------
# Cohorts too small to sum (SecAgg+ under client-level DP)
# --------------------------------------------------------------------------------------


def regime_change_by_enumeration(others: int, q: float, k: int) -> float:
    """P(one site decides whether the sum is used), over every draw of ``others`` sites."""
    total = 0.0
    for drawn in range(others + 1):
        ways = math.comb(others, drawn)
        chance = ways * q**drawn * (1 - q) ** (others - drawn)
        used_with = drawn + 1 >= k  # the site sampled too
        used_without = drawn >= k
        total += chance * (used_with != used_without)
    return total


@pytest.mark.parametrize("population", [1, 2, 3, 4, 6, 20])
@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_small_cohort_chance_is_the_chance_that_one_site_flips_the_release(
    population: int, q: float
) -> None:
    # Execute
    chance = small_cohort_probability(population, q, 3)

    # Assert: the worse of the site being among the N connected or joining them
    expected = max(
        regime_change_by_enumeration(max(population - 1, 0), q, 3),
        regime_change_by_enumeration(population, q, 3),
    )
    assert chance == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_small_cohort_chance_edge_cases() -> None:
    assert small_cohort_probability(10, 0.5, 0) == 0.0  # every cohort's sum is released
    assert small_cohort_probability(10, 0.5, 1) == 0.0  # an empty sum is noise alone too
    assert small_cohort_probability(4, 1.0, 3) == 0.0  # q = 1 and 4+ sites: always 3+
    assert small_cohort_probability(3, 1.0, 3) == 1.0  # 3 sites: removing one stops the sum
    assert small_cohort_probability(20, 0.25, 3) == pytest.approx(
        math.comb(19, 2) * 0.25**2 * 0.75**17
    )
    with pytest.raises(ValueError, match="sampling_rate"):
        small_cohort_probability(5, 1.5, 3)
