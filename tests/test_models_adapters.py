"""Real 4-bit loads of the tiny model, LoRA state round trips, PEFT-format saving, the wire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flower_llm import wire
from flower_llm.adapters import (
    adapter_state,
    apply_lora,
    init_adapter,
    load_adapter_state,
    save_adapter,
)
from flower_llm.config import parse_run_config
from flower_llm.models import load_base_model, quantized_linear_layers
from flower_llm.train import train_adapter

CPU = torch.device("cpu")


def loaded(model_dir: Path, **overrides: object):  # type: ignore[no-untyped-def]
    cfg = parse_run_config({"model.name": str(model_dir), **overrides})  # type: ignore[dict-item]
    base = load_base_model(cfg.model, CPU)
    return cfg, base, apply_lora(base.model, cfg.lora, base.name_or_path)


def random_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 24), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_base_model_is_really_4bit(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    # Execute
    _, base, _ = loaded(tiny_model_dir)

    # Assert: every linear layer of the decoder is a bitsandbytes Linear4bit (lm_head stays)
    decoder_linears = [
        name
        for name, module in base.model.named_modules()
        if isinstance(module, torch.nn.Linear | bnb.nn.Linear4bit)
        and ".layers." in name
        and "lora" not in name
    ]
    quantized = quantized_linear_layers(base.model)
    assert decoder_linears and set(decoder_linears) <= set(quantized)
    assert set(quantized.values()) == {"Linear4bit"}
    layer = base.model.get_submodule(decoder_linears[0])
    assert layer.weight.quant_state.quant_type == "nf4"


def test_no_quantization_loads_plain_linears(tiny_model_dir: Path) -> None:
    _, base, _ = loaded(tiny_model_dir, **{"model.quantization": "none"})
    assert quantized_linear_layers(base.model) == {}


def test_server_side_init_matches_peft_layout_and_loads_with_peft(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Prepare
    cfg, _, model = loaded(tiny_model_dir)
    client_state = adapter_state(model)

    # Execute: the server builds the adapter on the meta device, without base weights
    state, lora_cfg = init_adapter(cfg.model, cfg.lora, str(tiny_model_dir), seed=3)
    save_adapter(state, lora_cfg, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter"
    )

    # Assert
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in client_state.items()}
    assert all(not v.any() for k, v in state.items() if "lora_B" in k)
    assert all(v.std() > 0 for k, v in state.items() if "lora_A" in k)
    for key, value in adapter_state(reloaded).items():
        np.testing.assert_array_equal(value, state[key])


def test_load_adapter_state_rejects_a_wrong_shape(tiny_model_dir: Path) -> None:
    _, _, model = loaded(tiny_model_dir)
    state = adapter_state(model)
    key = next(iter(state))
    state[key] = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, state)


@pytest.mark.parametrize("fp32_stream", [True, False])
def test_fp32_stream_sets_the_dtype_of_the_frozen_weights_and_activations(
    tiny_model_dir: Path, fp32_stream: bool
) -> None:
    # Prepare
    _, base, model = loaded(tiny_model_dir, **{"model.fp32-stream": fp32_stream})
    stream = torch.float32 if fp32_stream else torch.bfloat16
    seen: list[torch.dtype] = []
    attention = model.base_model.model.model.layers[0].self_attn.q_proj
    attention.register_forward_hook(lambda _m, args, _out: seen.append(args[0].dtype))
    batch = random_batch(100)

    def batches():  # type: ignore[no-untyped-def]
        while True:
            yield batch

    # Execute
    stats = train_adapter(model, batches(), steps=2, learning_rate=1e-2)

    # Assert: embeddings and norms in the stream's dtype, still 4-bit, LoRA in fp32, trains
    inner = model.base_model.model.model
    assert inner.embed_tokens.weight.dtype == stream
    assert inner.norm.weight.dtype == stream
    assert set(quantized_linear_layers(base.model).values()) == {"Linear4bit"}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert seen and set(seen) == {stream}
    assert np.isfinite(stats.loss) and stats.steps == 2


def test_training_changes_lora_weights_only(tiny_model_dir: Path) -> None:
    # Prepare
    _, base, model = loaded(tiny_model_dir)
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    lora_before = adapter_state(model)
    batch = random_batch(
        base.tokenizer.vocab_size if hasattr(base.tokenizer, "vocab_size") else 100
    )

    def batches():  # type: ignore[no-untyped-def]
        while True:
            yield batch

    # Execute
    stats = train_adapter(model, batches(), steps=3, learning_rate=1e-2)

    # Assert
    assert stats.steps == 3 and stats.tokens > 0
    lora_after = adapter_state(model)
    assert any(not np.array_equal(lora_before[k], lora_after[k]) for k in lora_before)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param.detach(), frozen_before[name]), name


def test_adapter_state_round_trip_through_model(tiny_model_dir: Path) -> None:
    _, _, model = loaded(tiny_model_dir)
    rng = np.random.default_rng(0)
    state = {
        k: rng.normal(size=v.shape).astype(np.float32) for k, v in adapter_state(model).items()
    }
    load_adapter_state(model, state)
    back = adapter_state(model)
    for key in state:
        # LoRA weights live in the compute dtype (bf16): compare at its precision.
        np.testing.assert_allclose(back[key], state[key], rtol=1e-2, atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(
    values=arrays(
        np.float32,
        st.tuples(st.integers(1, 8), st.integers(1, 8)),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    wire_dtype=st.sampled_from(["float32", "float16"]),
)
def test_wire_round_trip(values: np.ndarray, wire_dtype: str) -> None:
    record = wire.to_array_record({"a.lora_A.weight": values}, wire_dtype)
    back = wire.from_array_record(record)["a.lora_A.weight"]
    assert back.dtype == np.float32 and back.shape == values.shape
    if wire_dtype == "float32":
        np.testing.assert_array_equal(back, values)
    else:
        np.testing.assert_allclose(back, values, rtol=1e-3, atol=1e-3)
    # Serialized arrays carry a small header next to the raw values.
    payload = values.size * (4 if wire_dtype == "float32" else 2)
    assert payload <= wire.num_bytes(record) <= payload + 256


def test_wire_refuses_integer_arrays() -> None:
    record = wire.to_array_record({"x": np.ones(3, np.float32)})
    from flwr.app import Array

    record["x"] = Array(np.ones(3, np.int64))
    with pytest.raises(ValueError, match="dtype"):
        wire.from_array_record(record)


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=np.float16).reshape(4, 3),
        np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        np.arange(6, dtype=">f4").reshape(2, 3),
        np.zeros((0, 5), np.float32),
        np.array(2.5, dtype=np.float32),
    ],
    ids=["float32", "float16", "fortran-order", "big-endian", "empty", "scalar"],
)
def test_array_view_reads_exactly_what_numpy_would(values: np.ndarray) -> None:
    from flwr.app import Array

    array = Array(values)
    view = wire.array_view(array)
    expected = array.numpy()
    assert view.shape == expected.shape and view.dtype == expected.dtype
    np.testing.assert_array_equal(view, expected)
    if values.dtype == np.float32 and values.flags.c_contiguous and values.size:
        # The common case is a view of the message's own bytes: nothing is copied, and
        # the server cannot write into a client's reply.
        assert not view.flags.writeable and not view.flags.owndata


@pytest.mark.parametrize("claimed", [(400, 400), (2, 2)])
def test_array_view_of_lying_metadata_stays_inside_the_bytes(claimed: tuple[int, int]) -> None:
    # A reply whose metadata lies about its shape can garble only its own values (the
    # strategy then checks the shape it really decoded), never read beyond its bytes.
    from flwr.app import Array

    real = Array(np.arange(16, dtype=np.float32).reshape(4, 4))
    forged = Array(dtype="float32", shape=claimed, stype=real.stype, data=real.data)
    view = wire.array_view(forged)
    assert view.nbytes <= len(real.data)
    assert set(view.ravel().tolist()) <= set(range(16))


def test_from_array_record_gives_writable_float32_copies() -> None:
    record = wire.to_array_record({"x": np.ones(3, np.float32)}, "float16")
    values = wire.from_array_record(record)["x"]
    values += 1  # a client trains on what it receives
    assert values.dtype == np.float32
    np.testing.assert_array_equal(wire.from_array_record(record)["x"], 1.0)
