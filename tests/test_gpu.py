"""The CUDA path: a real 4-bit QLoRA round on a GPU. Skipped where there is no CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flower_llm.adapters import adapter_state
from flower_llm.client import ClientSession, SiteIdentity
from flower_llm.config import parse_run_config
from flower_llm.models import quantized_linear_layers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_qlora_round_on_cuda(tiny_model_dir: Path) -> None:
    # Prepare
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.local-steps": 5})
    session = ClientSession(cfg, SiteIdentity(None, 0, 1))
    start = adapter_state(session.model)

    # Execute
    torch.cuda.reset_peak_memory_stats()
    state, stats = session.train(start, server_round=1, learning_rate=1e-2)

    # Assert: quantized on the GPU, trained, and the adapter came back to the host
    assert session.base.device.type == "cuda"
    assert set(quantized_linear_layers(session.model).values()) == {"Linear4bit"}
    assert next(session.model.parameters()).is_cuda
    assert stats.tokens > 0 and torch.cuda.max_memory_allocated() > 0
    assert any((state[k] != start[k]).any() for k in state)


def test_dpsgd_step_on_cuda(tiny_model_dir: Path) -> None:
    # Prepare: Opacus' per-sample gradients on a 4-bit base on the GPU
    from flower_llm.adapters import apply_lora
    from flower_llm.models import load_base_model
    from flower_llm.privacy.dpsgd import train_adapter_dpsgd
    from tests.test_dpsgd import same_length_examples

    cfg = parse_run_config({"model.name": str(tiny_model_dir)})
    base = load_base_model(cfg.model, torch.device("cuda"))
    model = apply_lora(base.model, cfg.lora, base.name_or_path)
    examples = same_length_examples(model.config.vocab_size, 16)
    before = adapter_state(model)

    # Execute
    result = train_adapter_dpsgd(
        model,
        examples,
        steps=2,
        batch_size=8,
        learning_rate=1e-2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        pad_id=0,
        seed=0,
    )

    # Assert: LoRA trained on the GPU under a finite epsilon; the base stayed 4-bit
    after = adapter_state(model)
    assert next(p for p in model.parameters() if p.requires_grad).is_cuda
    assert set(quantized_linear_layers(model).values()) == {"Linear4bit"}
    assert any((after[k] != before[k]).any() for k in after)
    assert result.stats.steps == 2
    assert 0 < result.epsilon < float("inf")


def test_out_of_gpu_memory_on_cuda_names_the_settings(tiny_model_dir: Path) -> None:
    # Prepare: a large batch on a GPU capped (for this process) at what the loaded model
    # holds plus 16 MiB
    from flower_llm.plan import OutOfGpuMemory

    cfg = parse_run_config(
        {
            "model.name": str(tiny_model_dir),
            "train.local-steps": 1,
            "train.batch-size": 64,
            "data.max-seq-length": 512,
        }
    )
    session = ClientSession(cfg, SiteIdentity(None, 0, 1))
    start = adapter_state(session.model)
    held = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((held + 16 * 2**20) / total)
    try:
        # Execute
        with pytest.raises(OutOfGpuMemory) as error:
            session.train(start, server_round=1, learning_rate=1e-2)
        left = torch.cuda.memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)

    # Assert: the plan and the first setting to try; the step's memory is given back
    assert str(error.value).startswith("out of GPU memory while training (")
    assert "flower-llm plan estimates" in str(error.value)
    assert "model.gradient-checkpointing = true" in str(error.value)
    assert left <= held + 2**20
