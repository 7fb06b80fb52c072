"""Loading the base causal LM, quantized, ready for k-bit LoRA training.

This is the only module that touches bitsandbytes. The path is the one real users take
with a hub id or a local directory: ``AutoModelForCausalLM.from_pretrained`` with a
``BitsAndBytesConfig``; the embedded default is just a local directory built offline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flower_llm.config import EMBEDDED, ModelConfig

# bitsandbytes' CPU backend logs a failed optional-kernel lookup on every import; the
# fallback it then uses is correct, so the message is noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer and where it came from."""

    model: Any  # transformers.PreTrainedModel; Any keeps mypy off transformers' stubs
    tokenizer: PreTrainedTokenizerBase
    name_or_path: str
    device: torch.device


def resolve_model_path(cfg: ModelConfig) -> str:
    """Hub id or directory to load; ``embedded`` builds (once) the tiny offline model."""
    if cfg.name == EMBEDDED:
        from flower_llm.embedded import embedded_model_dir

        return str(embedded_model_dir())
    return cfg.name


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_config(cfg: ModelConfig) -> Any | None:
    """The ``BitsAndBytesConfig`` for ``cfg.quantization``, or None for full precision."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
    )


def load_base_model(cfg: ModelConfig, device: torch.device | None = None) -> BaseModel:
    """Load tokenizer and (quantized) base model, prepared for k-bit training.

    Call once per client process and reuse across rounds: only adapter weights change
    between rounds.
    """
    device = device or default_device()
    path = resolve_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; EOS is the usual stand-in and the
        # collator masks pads out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token

    quant = quantization_config(cfg)
    model: Any = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=DTYPES[cfg.compute_dtype],
        device_map={"": str(device)} if quant is not None else None,
    )
    if quant is None:
        model.to(device)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    return BaseModel(model=model, tokenizer=tokenizer, name_or_path=path, device=device)


def quantized_linear_layers(model: torch.nn.Module) -> dict[str, str]:
    """Names and class names of the bitsandbytes layers in ``model``."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, kinds)
    }


def base_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized weights included)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def describe(base: BaseModel) -> str:
    """One line on what was loaded, for logs."""
    name = Path(base.name_or_path).name if Path(base.name_or_path).exists() else base.name_or_path
    quantized = len(quantized_linear_layers(base.model))
    return (
        f"{name} on {base.device}: {base_tensor_bytes(base.model) / 2**20:.1f} MiB of tensors, "
        f"{quantized} quantized linear layers"
    )
