"""LoRA adapters: apply, read, write, initialise and save them in PEFT format.

An *adapter state* is a ``dict[str, np.ndarray]`` keyed by PEFT's own state-dict names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), float32 in memory.
It is what travels, what the server averages and what it saves; keeping the PEFT names
means a saved adapter loads with ``PeftModel.from_pretrained`` unchanged.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import save_file

from flower_llm.config import LoraSettings, ModelConfig

AdapterState = dict[str, np.ndarray]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(settings: LoraSettings, base_model_name_or_path: str | None = None) -> LoraConfig:
    """The peft ``LoraConfig`` for a causal LM with our settings."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.modules,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def apply_lora(model: Any, settings: LoraSettings, name_or_path: str | None = None) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights require grad."""
    return get_peft_model(model, lora_config(settings, name_or_path))


def adapter_state(model: PeftModel) -> AdapterState:
    """The adapter weights of ``model`` as float32 numpy arrays (copies)."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}


def check_compatible(state: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first key or shape where ``state`` differs."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise ValueError(
            f"adapter keys differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            raise ValueError(
                f"adapter '{key}' has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )


def load_adapter_state(model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the adapter weights of ``model`` with ``state`` (checked, in place)."""
    # Compare with the model's own tensors (shapes only): no float32 copy of the adapter.
    check_compatible(state, get_peft_model_state_dict(model))
    dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    tensors = {
        k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(dtype) for k, v in state.items()
    }
    result: Any = set_peft_model_state_dict(model, tensors)
    if result.unexpected_keys:
        raise ValueError(f"peft did not accept adapter keys {result.unexpected_keys[:3]}")


# --------------------------------------------------------------------------------------
# Server side: initialise and save without the base weights
# --------------------------------------------------------------------------------------


def init_adapter(
    model_cfg: ModelConfig, settings: LoraSettings, name_or_path: str, seed: int
) -> tuple[AdapterState, LoraConfig]:
    """Fresh adapter weights and the resolved ``LoraConfig``, from the model config only.

    The base model is built on the ``meta`` device, so the server never allocates or
    downloads base weights (only ``config.json``); just the LoRA matrices are
    materialised and initialised as peft does (A Kaiming-uniform, B zero).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(name_or_path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config)
        peft_model = get_peft_model(skeleton, lora_config(settings, name_or_path))

    shapes = [(k, tuple(v.shape)) for k, v in get_peft_model_state_dict(peft_model).items()]
    state = seeded_initial(shapes, seed)
    resolved = peft_model.peft_config["default"]
    assert isinstance(resolved, LoraConfig)
    return state, resolved


def seeded_initial(shapes: Sequence[tuple[str, tuple[int, ...]]], seed: int) -> AdapterState:
    """The run's initial adapter: every A drawn from ``seed``, every other array zero.

    ``shapes`` are (PEFT state-dict key, shape) in the PEFT model's own order: the values
    are drawn from one ``torch.Generator`` in that order, so the server (from a meta-device
    skeleton, :func:`init_adapter`) and a site (from the model it trains,
    :meth:`flower_llm.client.ClientSession.initial_global`) get the same bits from the same
    torch version; :mod:`flower_llm.updates` checks that with a digest.
    """
    generator = torch.Generator().manual_seed(seed)
    state: AdapterState = {}
    for key, shape in shapes:
        if ".lora_A." in key:
            # kaiming_uniform_(a=sqrt(5)) on a (r, fan_in) matrix is U(-1/sqrt(fan_in), +).
            bound = 1.0 / math.sqrt(shape[1])
            values = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            state[key] = values.numpy().astype(np.float32)
        else:
            state[key] = np.zeros(shape, dtype=np.float32)
    return state


def save_adapter(state: Mapping[str, np.ndarray], config: LoraConfig, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out_dir``.

    The result loads with ``PeftModel.from_pretrained(base, out_dir)``. Files are written
    to temporary names and renamed, so a crash never leaves a half-written adapter.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Unique temporary names: two writers (a merge and a server, say) never share one.
    unique = f"{os.getpid()}.{time.monotonic_ns()}"
    tmp_weights = out / f".{ADAPTER_WEIGHTS}.{unique}.tmp"
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, tmp_weights)
    tmp_config = out / f".{ADAPTER_CONFIG}.{unique}.tmp"
    config_dict = config.to_dict()
    config_dict["base_model_name_or_path"] = portable_base_name(config.base_model_name_or_path)
    tmp_config.write_text(json.dumps(_jsonable(config_dict), indent=2, sort_keys=True))
    tmp_weights.replace(out / ADAPTER_WEIGHTS)
    tmp_config.replace(out / ADAPTER_CONFIG)
    return out


def portable_base_name(name_or_path: str | None) -> str | None:
    """The base model name an adapter records: one that resolves on another machine.

    The embedded model is loaded from this machine's cache directory; the adapter names
    it ``embedded``, which ``flower-llm`` (and ``model.name``) rebuilds anywhere. Hub ids
    and user directories are kept as given.
    """
    if not name_or_path:
        return name_or_path
    from flower_llm.config import EMBEDDED
    from flower_llm.embedded import EMBEDDED_VERSION, default_cache_root

    path = Path(name_or_path)
    embedded_dir = default_cache_root() / f"embedded-tiny-llama-{EMBEDDED_VERSION}"
    if path.name == embedded_dir.name and path.resolve() == embedded_dir.resolve():
        return EMBEDDED
    return name_or_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | tuple | list):
        items = [_jsonable(v) for v in value]
        return sorted(items) if isinstance(value, set) else items
    if hasattr(value, "value") and not isinstance(value, int | float | str | bool):
        return value.value  # enums such as TaskType
    return value


def num_parameters(state: Mapping[str, np.ndarray]) -> int:
    """Number of scalar weights in an adapter state."""
    return int(sum(v.size for v in state.values()))
