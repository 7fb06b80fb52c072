"""Benchmarks: the cheap ones run in --quick mode and write sane JSON; counts are exact.

No timing is asserted anywhere: the figures are ratios measured on whatever machine runs
the test, and the smoke test only checks that each benchmark runs and reports what it
promises.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import aggregation, run_all, wire_bytes


@pytest.fixture(autouse=True)
def restore_process_settings() -> Iterator[None]:
    """Benchmarks pin torch threads and quiet loggers for their own process: undo it here."""
    import logging

    import torch
    import transformers

    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    flwr_level = logging.getLogger("flwr").level
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)
    transformers.logging.enable_progress_bar()
    logging.getLogger("flwr").setLevel(flwr_level)


def analytic_lora_params(dims: dict[str, int], r: int) -> int:
    """``sum over layers of r * (in + out)`` over every Linear of a Llama block.

    peft's ``all-linear`` adapts q, k, v, o, gate, up and down (never ``lm_head``).
    """
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    head_dim = hidden // dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * head_dim
    linears = [
        (hidden, hidden),  # q_proj
        (hidden, kv),  # k_proj
        (hidden, kv),  # v_proj
        (hidden, hidden),  # o_proj
        (hidden, inter),  # gate_proj
        (hidden, inter),  # up_proj
        (inter, hidden),  # down_proj
    ]
    return dims["num_hidden_layers"] * sum(r * (fan_in + fan_out) for fan_in, fan_out in linears)


def test_llama3_8b_lora_r8_count_equals_the_analytic_count() -> None:
    # Prepare
    dims = wire_bytes.ARCHITECTURES["Llama-3-8B"]

    # Execute
    (row,) = wire_bytes.real_architectures(["Llama-3-8B"])

    # Assert: 32 layers x 8 x (2*8192 + 2*5120 + 3*18432) = 20,971,520
    assert row["lora"]["8"]["params"] == analytic_lora_params(dims, 8) == 20_971_520
    assert row["lora"]["8"]["arrays"] == 32 * 7 * 2
    assert row["params"] == row["published-params"] == 8_030_261_248
    lora_bytes = row["lora"]["8"]["bytes"]
    assert lora_bytes["float16"] < lora_bytes["float32"] < row["full-bytes"]["float16"]
    # float32 on the wire: 4 bytes a value plus one small .npy header per array.
    assert 0 < lora_bytes["float32"] - 4 * 20_971_520 <= 256 * 448


def test_tied_embeddings_count_once() -> None:
    (row,) = wire_bytes.real_architectures(["Qwen2.5-0.5B"])
    assert row["params"] == row["published-params"] == 494_032_768


def test_npy_header_formula_matches_numpy(tmp_path: Path) -> None:
    import numpy as np

    for shape, dtype in [((3, 5), np.float32), ((4096, 8), np.float16), ((7,), np.float32)]:
        path = tmp_path / "a.npy"
        np.save(path, np.zeros(shape, dtype))
        assert wire_bytes.npy_bytes(shape, dtype) == path.stat().st_size


@pytest.mark.slow
@pytest.mark.long
def test_wire_bytes_quick_writes_sane_results(tmp_path: Path) -> None:
    # Execute
    wire_bytes.main(["--quick", "--out", str(tmp_path)])

    # Assert
    result = json.loads((tmp_path / "wire_bytes.json").read_text())
    assert {"machine", "architectures", "tiny-model", "float16", "headlines"} <= set(result)
    assert {"cpu-model", "cores", "ram-gib", "torch", "flwr", "date"} <= set(result["machine"])
    for arch in result["architectures"]:
        for lora in arch["lora"].values():
            assert lora["bytes"]["float32"] < arch["full-bytes"]["float32"]
    tiny = result["tiny-model"]
    assert tiny["adapter-bytes"]["float32"] < tiny["full-bytes"]["float32"]
    assert tiny["adapter-bytes"]["float16"] < tiny["adapter-bytes"]["float32"]
    assert tiny["header-formula-matches-measured"] is True
    fp16 = result["float16"]
    (first,) = fp16["by-round"]
    # Rounding to float16 moves the held-out loss a little, not a lot.
    assert first["loss-float32"] < fp16["initial-loss"]
    assert fp16["max-abs-loss-diff-same-training"] < 0.05
    assert "| Llama-3-8B |" in (tmp_path / "wire_bytes.md").read_text()


def test_aggregation_quick_writes_sane_results(tmp_path: Path) -> None:
    # Execute
    aggregation.main(["--quick", "--out", str(tmp_path)])

    # Assert
    result = json.loads((tmp_path / "aggregation.json").read_text())
    assert {"rows", "fits", "phases-of-ours", "profile-of-ours", "headlines"} <= set(result)
    assert [r["clients"] for r in result["rows"]] == [4, 8, 16]
    for row in result["rows"]:
        assert set(row["seconds"]) == {"ours", "flower"}
        assert all(s > 0 for s in row["seconds"].values())
        assert row["ratio-ours-vs-flower"] > 0
        # Same weighted average as Flower's FedAvg.
        assert row["max-abs-diff-vs-flower"] < 1e-6
    assert set(result["fits"][str(result["rows"][0]["params"])]) == {"ours", "flower"}
    assert result["phases-of-ours"] and result["profile-of-ours"]

    # The combined README picks the headline rows up.
    readme = run_all.combine(tmp_path, ["aggregation", "wire_bytes"])
    assert "ours / Flower FedAvg" in readme and "<= 1.0x" in readme
    assert (tmp_path / "README.md").read_text() == readme


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the skip path without CUDA"
)
def test_gpu_benchmark_skips_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu_qlora

    assert gpu_qlora.main(["--out", str(tmp_path)]) is None
    assert "skipped" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_aggregation_throughput_quick_measures_every_rule(tmp_path: Path) -> None:
    from benchmarks import aggregation_throughput

    aggregation_throughput.main(["--quick", "--out", str(tmp_path)])

    result = json.loads((tmp_path / "aggregation_throughput.json").read_text())
    assert set(result["rules"]) == {
        *aggregation_throughput.RULES,
        aggregation_throughput.FLOOR,
        aggregation_throughput.EXACT_FLOOR,
    }
    for row in result["rules"].values():
        assert row["reply-bytes-per-second"] > 0
        assert row["fraction-of-stream"] == pytest.approx(row["stream-seconds"] / row["seconds"])
    assert result["stream-bytes-per-second"] > 0
    assert result["load-average-1min-before"] >= 0 and result["load-average-1min-after"] >= 0
    assert "Load average" in (tmp_path / "aggregation_throughput.md").read_text()


@pytest.mark.long
def test_compression_quick_writes_sane_results(tmp_path: Path) -> None:
    from benchmarks import compression

    # Execute: every format through the real engine, 2 rounds x 2 steps
    compression.common.run_and_finish(
        "compression",
        argparse.Namespace(out=tmp_path, quick=True),
        lambda: compression.run_all(quick=True),
        compression.to_markdown,
    )

    # Assert: every run trained, compressed runs sent fewer bytes, codec time was measured
    result = json.loads((tmp_path / "compression.json").read_text())
    runs = result["runs"]
    assert set(runs) == set(compression.RUNS)
    for name, run in runs.items():
        assert run["final-loss"] < run["initial-loss"], name
    assert runs["int8"]["bytes-up"] < runs["float32"]["bytes-up"] / 3.5
    assert runs["nf4"]["bytes-up"] < runs["int8"]["bytes-up"] / 1.8
    assert runs["nf4"]["codec-seconds"] > 0 and runs["float32"]["codec-seconds"] == 0
    assert len(result["headlines"]) == 6
