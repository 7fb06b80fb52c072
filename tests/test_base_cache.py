"""The pre-quantized base cache: served without quantizing, same outputs, rebuilt if corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from flower_llm.config import ModelConfig
from flower_llm.models import (
    MANIFEST,
    QuantizedBaseCache,
    load_base_model,
    quantized_linear_layers,
)

CPU = torch.device("cpu")


@pytest.fixture
def quantize_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts bitsandbytes 4-bit quantizations (every Linear4bit weight goes through it)."""
    calls: list[int] = []
    original = bnb_functional.quantize_4bit

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(bnb_functional, "quantize_4bit", counting)
    return calls


def logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        return model(tokens).logits.float()


def test_second_load_is_served_from_cache_without_quantizing(
    tiny_model_dir: Path, tmp_path: Path, quantize_calls: list[int]
) -> None:
    # Prepare
    cfg = ModelConfig(name=str(tiny_model_dir))
    cache = QuantizedBaseCache(tmp_path / "bases")
    reference = load_base_model(cfg, CPU, cache=False)
    uncached_quantizations = len(quantize_calls)

    # Execute
    first = load_base_model(cfg, CPU, cache=cache)
    first_quantizations = len(quantize_calls) - uncached_quantizations
    second = load_base_model(cfg, CPU, cache=cache)

    # Assert
    assert uncached_quantizations > 0
    assert first_quantizations == uncached_quantizations  # the first load builds the entry
    assert len(quantize_calls) - uncached_quantizations == first_quantizations  # none more
    entries = [d for d in (tmp_path / "bases").iterdir() if not d.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / MANIFEST).is_file()
    assert quantized_linear_layers(second.model) == quantized_linear_layers(reference.model)
    assert second.model.name_or_path == str(tiny_model_dir)  # peft records it as the base
    assert torch.equal(logits(second.model), logits(reference.model))
    assert torch.equal(logits(first.model), logits(reference.model))


def test_corrupt_or_stale_entry_is_rebuilt(
    tiny_model_dir: Path, tmp_path: Path, quantize_calls: list[int]
) -> None:
    # Prepare
    cfg = ModelConfig(name=str(tiny_model_dir))
    cache = QuantizedBaseCache(tmp_path / "bases")
    reference = load_base_model(cfg, CPU, cache=cache)
    per_load = len(quantize_calls)
    entry = cache.entry_dir(cache.key_fields(cfg, str(tiny_model_dir)))
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the tensor data
    weights.write_bytes(bytes(data))

    # Execute
    rebuilt = load_base_model(cfg, CPU, cache=cache)

    # Assert
    assert len(quantize_calls) == 2 * per_load  # quantized again, not read from the bad file
    QuantizedBaseCache.verify(entry, cache.key_fields(cfg, str(tiny_model_dir)))
    assert torch.equal(logits(rebuilt.model), logits(reference.model))

    # A manifest that names other settings is stale: rebuilt too.
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["key"]["quantization"] = "fp4"
    (entry / MANIFEST).write_text(json.dumps(manifest))
    load_base_model(cfg, CPU, cache=cache)
    assert len(quantize_calls) == 3 * per_load


def test_key_changes_with_settings_and_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = QuantizedBaseCache(tmp_path)
    path = str(tiny_model_dir)
    nf4 = cache.entry_dir(cache.key_fields(ModelConfig(name=path), path))
    fp4 = cache.entry_dir(cache.key_fields(ModelConfig(name=path, quantization="fp4"), path))
    single = cache.entry_dir(cache.key_fields(ModelConfig(name=path, double_quant=False), path))
    assert len({nf4, fp4, single}) == 3


def test_cache_location_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWER_LLM_BASE_CACHE", str(tmp_path / "x"))
    assert QuantizedBaseCache.from_env() == QuantizedBaseCache(tmp_path / "x")
    monkeypatch.setenv("FLOWER_LLM_BASE_CACHE", "off")
    assert QuantizedBaseCache.from_env() is None
    monkeypatch.delenv("FLOWER_LLM_BASE_CACHE")
    monkeypatch.setenv("FLOWER_LLM_CACHE", str(tmp_path))
    assert QuantizedBaseCache.from_env() == QuantizedBaseCache(tmp_path / "quantized-bases")
