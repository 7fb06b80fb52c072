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
