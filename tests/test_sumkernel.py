"""The compiled weighted sum of the server's sweep: its result, its checks, and what
happens when it cannot be built or its cached library is damaged."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flower_llm import sumkernel


@pytest.fixture
def kernel_required(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(sumkernel.ENV, "require")
    sumkernel.reset()
    yield
    sumkernel.reset()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 4, 7])
@pytest.mark.parametrize("size", [1, 2047, 2049, 5000])
def test_weighted_sum_equals_numpy_in_float64(
    dtype: type, count: int, size: int, kernel_required: None
) -> None:
    # Prepare: replies around a reference, block edges (2048 values) and the groups of
    # four replies, with a partial group
    rng = np.random.default_rng(size + count)
    reference = rng.normal(0, 1, size).astype(np.float32)
    values: list[np.ndarray] = [
        (reference + rng.normal(0, 0.1, size)).astype(dtype) for _ in range(count)
    ]
    factors = rng.random(count)
    differences = np.stack([v.astype(np.float64) - reference for v in values])
    bound = float(np.quantile(np.abs(differences), 0.9))

    # Execute: the sum with and without the reference, float64 and float32
    wide = sumkernel.weighted_sum(values, reference, factors, bound, wide=True)
    alone = sumkernel.weighted_sum(values, reference, factors, None, add_reference=False, wide=True)
    rounded = sumkernel.weighted_sum(values, reference, factors, bound)

    # Assert: float64 results to float64 precision, the float32 one rounded once, and the
    # per-reply squares and counts above the bound
    assert wide is not None and alone is not None and rounded is not None
    exact = reference + factors @ differences
    np.testing.assert_allclose(wide[0], exact, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(alone[0], factors @ differences, rtol=1e-12, atol=1e-13)
    assert rounded[0].dtype == np.float32 and wide[0].dtype == np.float64
    spacing = np.spacing(np.abs(exact).astype(np.float32))
    assert np.all(np.abs(rounded[0] - exact) <= spacing / 2 * (1 + 1e-6))
    np.testing.assert_allclose(wide[1], (differences**2).sum(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(wide[2], (np.abs(differences) > bound).sum(axis=1))
    np.testing.assert_array_equal(alone[2], np.zeros(count))


def test_many_arrays_in_one_call_sum_each_and_add_the_squares(kernel_required: None) -> None:
    # Prepare: three arrays of different sizes, a value beyond the bound in the second
    rng = np.random.default_rng(3)
    reference = {
        k: rng.normal(0, 1, n).astype(np.float32) for k, n in (("a", 5), ("b", 3000), ("c", 1))
    }
    values = {
        k: [(r + rng.normal(0, 0.1, r.size)).astype(np.float32) for _ in range(6)]
        for k, r in reference.items()
    }
    values["b"][4][17] = reference["b"][17] + 2.0
    factors = rng.random(6)

    # Execute
    sums = sumkernel.weighted_sums(values, reference, factors, 1.0, wide=True)

    # Assert: each array's own sum, squares over all arrays, counts per array
    assert sums is not None
    squares = np.zeros(6)
    for key, ref in reference.items():
        differences = np.stack([v.astype(np.float64) - ref for v in values[key]])
        np.testing.assert_allclose(sums.out[key], ref + factors @ differences, rtol=1e-13)
        squares += (differences**2).sum(axis=1)
    np.testing.assert_allclose(sums.squares, squares, rtol=1e-12)
    assert [list(sums.over[k]) for k in "abc"] == [[0] * 6, [0, 0, 0, 0, 1, 0], [0] * 6]


def test_nan_and_inf_show_in_the_squares_and_beyond_the_bound(kernel_required: None) -> None:
    reference = np.zeros(3000, np.float32)
    values = [reference + np.float32(0.01) for _ in range(5)]
    values[1][2999] = np.nan
    values[3][0] = -np.inf

    sums = sumkernel.weighted_sum(values, reference, np.full(5, 0.2), 1.0)

    assert sums is not None
    _, squares, over = sums
    assert [np.isfinite(s) for s in squares] == [True, False, True, False, True]
    assert list(over) == [0, 0, 0, 1, 0]  # NaN compares false; the squares catch it


def test_arrays_it_cannot_take_are_left_to_numpy(kernel_required: None) -> None:
    reference = np.zeros(10, np.float32)
    same = [np.ones(10, np.float32), np.ones(10, np.float32)]

    def takes(values: list[np.ndarray], ref: np.ndarray = reference) -> bool:
        return sumkernel.weighted_sum(values, ref, np.ones(len(values)), None) is not None

    assert takes(same)
    assert not takes([same[0], np.ones(10, np.float16)])  # mixed dtypes
    assert not takes([np.ones(20, np.float32)[::2]] * 2)  # strided
    assert not takes([np.ones(11, np.float32)] * 2)  # another size
    assert not takes(same, reference.astype(np.float64))
    assert not takes([np.ones(10, np.int32)] * 2)
    # ... and one array it cannot take leaves all of them to NumPy
    mixed: dict[str, list[np.ndarray]] = {"a": same, "b": [same[0], same[1].astype(np.float16)]}
    refs = {"a": reference, "b": reference}
    assert sumkernel.weighted_sums(mixed, refs, np.ones(2), None) is None
    # ... and nothing to sum is nothing for the kernel
    assert sumkernel.weighted_sums({}, {}, np.ones(2), None) is None
    assert sumkernel.central_sums({}, {}, "median", 0, None) is None


def test_off_by_setting_leaves_the_sweep_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sumkernel.ENV, "off")
    sumkernel.reset()
    try:
        reference = np.zeros(4, np.float32)
        assert sumkernel.weighted_sum([reference], reference, np.ones(1), None) is None
        assert sumkernel.status() == f"off: {sumkernel.ENV}=off"
    finally:
        sumkernel.reset()


def test_a_broken_compiler_turns_it_off_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: a "compiler" that fails, and a fresh cache (no library built before)
    monkeypatch.setenv("FLOWER_LLM_CACHE", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo broken-cc 1.0 && exit 0\n'
        "echo 'sum.c:1: error: no compiler here' >&2; exit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.delenv(sumkernel.ENV, raising=False)
    sumkernel.reset()
    try:
        # Execute + Assert: off, with the compiler's message; the sweep falls back
        reference = np.zeros(4, np.float32)
        assert sumkernel.weighted_sum([reference], reference, np.ones(1), None) is None
        assert "no compiler here" in sumkernel.status()
        # ... and with ENV=require it is an error that names the setting
        monkeypatch.setenv(sumkernel.ENV, "require")
        sumkernel.reset()
        with pytest.raises(RuntimeError, match=f"{sumkernel.ENV}=require.*no compiler here"):
            sumkernel.weighted_sum([reference], reference, np.ones(1), None)
    finally:
        sumkernel.reset()


def test_a_damaged_cached_library_is_built_again(tmp_path: Path) -> None:
    # Prepare: a process builds the kernel into a fresh cache, then its file is damaged
    # (a new process each time: a library already loaded in this one is not read again)
    env = {**os.environ, "FLOWER_LLM_CACHE": str(tmp_path), sumkernel.ENV: "require"}
    probe = "from flower_llm import sumkernel as s; print(s.status())"
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    (library,) = (tmp_path / "kernels").glob("sum-*.so")
    library.write_bytes(b"not a shared library")

    # Execute
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)

    # Assert: loaded again from a rebuilt file of the same name, after a warning
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "building it again" in second.stderr
    assert library.read_bytes()[:4] == b"\x7fELF"


def test_the_cache_name_follows_the_cpu_and_native_code_needs_its_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: record the compile commands instead of running them
    monkeypatch.setenv("FLOWER_LLM_CACHE", str(tmp_path))
    commands: list[list[str]] = []
    real_run = subprocess.run

    def recording(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if "--version" in command:
            return real_run(command, **kwargs)  # type: ignore[call-overload,no-any-return]
        commands.append(command)
        Path(command[command.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sumkernel.subprocess, "run", recording)
    monkeypatch.setattr(sumkernel.ctypes, "CDLL", lambda path: None)
    monkeypatch.setattr(sumkernel, "_Kernel", lambda library, path: path)
    built = {}
    for cpu in ("avx2 fma sse2", "sse2", None):
        monkeypatch.setattr(sumkernel, "_cpu_features", lambda cpu=cpu: cpu)
        built[cpu] = sumkernel._build_and_load()

    # Assert: one file per CPU; -march=native only where the CPU's flags are in the name
    assert len(set(built.values())) == 3
    assert ["-march=native" in c for c in commands] == [True, True, False]


def test_a_float64_base_is_added_before_the_one_rounding(kernel_required: None) -> None:
    # Prepare: a float64 base that float32 cannot hold exactly (the first pass of a sum)
    rng = np.random.default_rng(5)
    reference = rng.normal(0, 1, 3000).astype(np.float32)
    base = reference.astype(np.float64) + rng.normal(0, 1e-9, 3000)
    values = [(reference + rng.normal(0, 0.1, 3000)).astype(np.float32) for _ in range(3)]
    factors = np.array([0.2, -0.1, 0.05])

    # Execute
    sums = sumkernel.weighted_sums({"a": values}, {"a": reference}, factors, None, base={"a": base})

    # Assert: base + sum_k p_k (x_k - ref), rounded once to float32
    assert sums is not None
    exact = base + factors @ np.stack([v.astype(np.float64) - reference for v in values])
    spacing = np.spacing(np.abs(exact).astype(np.float32))
    assert sums.out["a"].dtype == np.float32
    assert np.all(np.abs(sums.out["a"] - exact) <= spacing / 2 * (1 + 1e-6))
    with pytest.raises(ValueError, match="flat float64"):
        sumkernel.weighted_sums(
            {"a": values}, {"a": reference}, factors, None, base={"a": base.astype(np.float32)}
        )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 2, 3, 6, 20, 33])
@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_order_statistics_equal_numpy_sorted_columns_bit_for_bit(
    dtype: type, count: int, rule: str, kernel_required: None
) -> None:
    # Prepare: two arrays, one crossing the 128-column blocks, ties included
    rng = np.random.default_rng(count)
    reference = {"a": rng.normal(0, 1, 700).astype(np.float32), "b": np.zeros(3, np.float32)}
    values: dict[str, list[np.ndarray]] = {
        k: [(r + rng.normal(0, 0.1, r.size)).astype(dtype) for _ in range(count)]
        for k, r in reference.items()
    }
    values["a"][0][:10] = values["a"][-1][:10]  # equal values in some columns
    cut = min(count // 4, (count - 1) // 2)

    # Execute
    sums = sumkernel.central_sums(values, reference, rule, cut, 0.25)

    # Assert: NumPy's column sort and the middle / kept values' mean, rounded once
    assert sums is not None
    squares = np.zeros(count)
    for key, ref in reference.items():
        differences = np.sort(np.stack([v.astype(np.float64) - ref for v in values[key]]), axis=0)
        if rule == "median":
            middle = count // 2
            central = (
                differences[middle]
                if count % 2
                else (differences[middle - 1] + differences[middle]) / 2
            )
        else:
            central = differences[cut : count - cut].mean(axis=0)
        expected = (ref + central).astype(np.float32)
        np.testing.assert_array_equal(sums.out[key].view(np.uint32), expected.view(np.uint32))
        unsorted = np.stack([v.astype(np.float64) - ref for v in values[key]])
        squares += (unsorted**2).sum(axis=1)
        np.testing.assert_array_equal(sums.over[key], (np.abs(unsorted) > 0.25).sum(axis=1))
    np.testing.assert_allclose(sums.squares, squares, rtol=1e-12)


def test_the_sorting_network_sorts_every_zero_one_input() -> None:
    # The 0-1 principle: a comparator network that sorts every sequence of 0s and 1s
    # sorts every sequence.
    for count in range(1, 15):
        pairs = sumkernel._sorting_network(count).reshape(-1, 2)
        inputs = (np.arange(2**count)[:, None] >> np.arange(count)) & 1
        for i, j in pairs:
            low, high = (
                np.minimum(inputs[:, i], inputs[:, j]),
                np.maximum(inputs[:, i], inputs[:, j]),
            )
            inputs[:, i], inputs[:, j] = low, high
        assert (np.diff(inputs, axis=1) >= 0).all(), count


def _apply(network: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = rows.copy()
    for i, j in network.reshape(-1, 2):
        out[i], out[j] = np.minimum(out[i], out[j]), np.maximum(out[i], out[j])
    return out


def test_the_pruned_network_leaves_the_read_rows_as_the_whole_network_does() -> None:
    rng = np.random.default_rng(0)
    for count in range(1, 18):
        full = sumkernel._sorting_network(count)
        for lo in range(count):
            for hi in range(lo + 1, count + 1):
                pruned = sumkernel._network_for_rows(count, lo, hi)
                rows = rng.integers(0, 5, size=(count, 64))  # ties included
                expected = _apply(full, rows)[lo:hi]
                np.testing.assert_array_equal(_apply(pruned, rows)[lo:hi], expected)
    # The median of 20 needs fewer comparators than the whole sort
    assert len(sumkernel._network_for_rows(20, 9, 11)) < len(sumkernel._sorting_network(20))
