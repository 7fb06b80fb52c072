"""How much GPU memory one QLoRA client needs, estimated from the model's config alone.

:func:`estimate_memory` builds the model on the ``meta`` device (no weights are read or
allocated), counts every parameter exactly, wraps it with the same LoRA settings the
ClientApp uses, and adds up what a training step of *this* code base holds at its peak:

``total = quantized linear weights + other weights + LoRA state + activations
+ attention scores + logits + CUDA context``

Weights
    Every ``nn.Linear`` but the output embedding (``lm_head``) is quantized by
    bitsandbytes, as ``BitsAndBytesConfig(load_in_4bit=True)`` does. NF4/FP4 stores 4 bits
    a weight plus one absmax constant per block of 64 weights: fp32 (0.0625 B/weight), or
    with double quantization uint8 plus one fp32 per 256 blocks (0.0159 B/weight, the
    QLoRA paper's 0.127 bits), so NF4 + double quant is 0.5159 B/weight. int8 is 1 B/weight
    plus one fp32 scale per output row.
    The rest (embeddings, ``lm_head``, norms, biases) is *fp32* whenever the base is
    quantized: :func:`flower_llm.models.load_base_model` calls peft's
    ``prepare_model_for_kbit_training``, which upcasts every non-quantized bf16/fp16
    parameter to fp32. Without quantization, or with ``model.fp32-stream = false``
    (which skips that call), everything stays in the compute dtype.
LoRA
    16 bytes a LoRA parameter: fp32 weight (peft keeps adapters in fp32), fp32 gradient
    and AdamW's two fp32 moments.
Activations (see :func:`layer_activation_bytes`)
    Per decoder layer and token, for a Llama-style layer (pre-RMSNorm, GQA attention
    through SDPA, SwiGLU MLP), with ``a`` the bytes of the residual stream's dtype
    (4 when quantized with ``model.fp32-stream``, because the upcast fp32 embeddings
    make the whole stream fp32; else the compute dtype), ``h`` hidden size, ``kv`` = kv
    heads x head dim, ``i`` MLP width, ``n_h`` attention heads and ``r`` the LoRA rank::

        norms     2 (4h + 4)         each RMSNorm keeps its input in fp32 and 1/rms
        attention a (2h + 2kv) + 4n_h  SDPA keeps q, k, v, its output, a fp32 log-sum-exp
        mlp       3 a i              gate, silu(gate) and up, for the SwiGLU product
        LoRA      4 r per adapted linear (lora_A's output, for lora_B's gradient)
                  + lora_A's fp32 input. When a = 4 one tensor per distinct input: the
                  attention norm's output (4h, shared by q/k/v), the MLP norm's output
                  (4h, shared by gate/up), down_proj's input (4i); o_proj's input is
                  SDPA's output, kept already. When a < 4 peft casts the input to fp32
                  once per adapted linear, so each keeps its own 4 x in_features copy.

    With all seven linears adapted that is ``4(6h + 2kv + 4i + 7r + n_h + 2)`` bytes when
    quantized. Without checkpointing every layer keeps this; with gradient checkpointing a
    layer keeps only its input (``a h``) and one layer at a time is recomputed in backward:
    ``L a h + one layer``. The final norm adds ``4h + 4``.
    Assumptions: no T x T attention matrix in these per-token figures (see the next
    part for when SDPA keeps one); no LoRA
    dropout (dropout > 0 keeps a mask and a dropped copy per adapted linear); every layer
    shaped like the first. The coefficients were checked against the tensors autograd
    saves (``saved_tensors_hooks``) on transformers 5.24 / peft 0.21; other architectures
    get the Llama formula as an approximation.
Attention scores (CUDA)
    With grouped KV heads (``kv < h``) and an fp32 stream (``a = 4``, i.e. a quantized
    base), transformers calls SDPA with fp32 q, k, v and ``enable_gqa=True``. CUDA's
    flash kernel takes no fp32, and the call runs SDPA's math kernel, which keeps the
    ``B n_h T T`` fp32 attention probabilities of every layer for backward:
    ``4 n_h T`` bytes per token and layer (one layer with gradient checkpointing).
    Measured on an H200 (torch 2.11, ``benchmarks/results/gpu_qlora_*.md``): without this
    part the estimate fell 15-46 % short of the peak of NF4 training at 512 tokens, with it
    the peak is 0-6 % above the estimate; bf16 bases (flash kernel) needed no such part.
    CPU training keeps no such matrix (its SDPA kernel takes fp32), which the per-token
    formula above was checked on.
Logits
    ``B T V (a + 8)`` bytes: the model's logits, then in
    :func:`flower_llm.train.summed_token_loss` their shifted fp32 copy (``.float()`` of
    the slice, or the reshape of it when they are fp32 already) and its log-softmax, all
    alive together at the loss. That is three fp32 logits tensors when quantized.
CUDA context
    A fixed 0.5 GiB for the CUDA context and cuBLAS workspaces. The caching allocator's
    fragmentation is not counted: leave 5-10 % of headroom.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flower_llm.config import COMPUTE_DTYPES, EMBEDDED, QUANTIZATIONS, LoraSettings

log = logging.getLogger(__name__)

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB // 2
LORA_BYTES_PER_PARAM = 16
"""fp32 weight + fp32 gradient + AdamW exp_avg and exp_avg_sq, both fp32."""
LORA_DTYPE_BYTES = 4
"""peft keeps adapter weights in fp32 on a bf16/fp16 base (``autocast_adapter_dtype``)."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# bitsandbytes 4-bit layout: 64 weights a block; with double quantization the per-block
# absmax is itself quantized to uint8 in blocks of 256, with a 256-entry fp32 code book.
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
CODE_4BIT_BYTES = 16 * 4
CODE_8BIT_BYTES = 256 * 4

# Linears whose LoRA input is one tensor when it needs no dtype cast (Llama naming).
SHARED_LORA_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
# Linears whose input SDPA keeps anyway, so LoRA adds nothing when no cast is needed.
INPUT_ALREADY_KEPT = {"o_proj"}

_UNITS = {
    "": GIB,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": GIB,
    "gb": 10**9,
    "gib": GIB,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}


@dataclass(frozen=True)
class PlanSettings:
    """The training settings that decide a client's memory."""

    seq_len: int = 512
    """Tokens per example (``data.max-seq-length``)."""
    batch_size: int = 4
    """Examples per micro-batch (``train.batch-size``); gradient accumulation adds none."""
    lora_r: int = 16
    """LoRA rank (``lora.r``)."""
    target_modules: str = "all-linear"
    """``lora.target-modules``: comma-separated names or ``all-linear``."""
    quantization: str = "nf4"
    """``model.quantization``: nf4 | fp4 | int8 | none."""
    double_quant: bool = True
    """``model.double-quant``: quantize the 4-bit absmax constants too."""
    compute_dtype: str = "bfloat16"
    """``model.compute-dtype``; without quantization it is also the weights' dtype."""
    gradient_checkpointing: bool = False
    """``model.gradient-checkpointing``: keep layer inputs only, recompute in backward."""
    fp32_stream: bool = True
    """``model.fp32-stream``: a quantized base's other weights, so its stream, in fp32."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a positive integer")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization = {self.quantization!r}: must be one of {', '.join(QUANTIZATIONS)}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype = {self.compute_dtype!r}: must be one of "
                f"{', '.join(COMPUTE_DTYPES)}"
            )

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch."""
        return self.seq_len * self.batch_size

    @property
    def activation_bytes(self) -> int:
        """Bytes of one element of the residual stream (see the module docstring)."""
        return self.other_weight_bytes

    @property
    def other_weight_bytes(self) -> int:
        """Bytes per non-quantized weight: fp32 after ``prepare_model_for_kbit_training``."""
        upcast = self.quantization != "none" and self.fp32_stream
        return 4 if upcast else DTYPE_BYTES[self.compute_dtype]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only LM that activations depend on."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    kv_size: int
    """Key/value heads x head dim (smaller than ``hidden_size`` with GQA)."""
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read a transformers ``PretrainedConfig`` (attribute maps resolve GPT-2's names)."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        # GPT-2-style configs leave the MLP width unset and mean 4 x hidden.
        intermediate = getattr(config, "intermediate_size", None) or getattr(
            config, "n_inner", None
        )
        return cls(
            model_type=str(getattr(config, "model_type", "unknown")),
            num_layers=int(config.num_hidden_layers),
            hidden_size=hidden,
            intermediate_size=int(intermediate or 4 * hidden),
            num_heads=heads,
            kv_size=int(kv_heads) * int(head_dim),
            vocab_size=int(config.vocab_size),
        )


@dataclass(frozen=True)
class AdaptedLinear:
    """One linear layer that LoRA wraps."""

    name: str
    """Its last name component, e.g. ``q_proj``."""
    layer: int
    """Index of the decoder layer it belongs to (-1 outside the layer stack)."""
    in_features: int
    r: int


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak GPU memory of one client's training step, in bytes, by part."""

    model: str
    shape: ModelShape
    settings: PlanSettings
    num_parameters: int
    quantized_parameters: int
    quantized_weight_bytes: int
    other_parameters: int
    other_weight_bytes: int
    lora_parameters: int
    lora_bytes: int
    layer_activation_bytes: int
    """Per token, of the largest decoder layer without checkpointing."""
    activation_bytes: int
    logits_bytes: int
    cuda_context_bytes: int
    attention_score_bytes: int = 0
    """SDPA's fp32 attention probabilities on CUDA (:func:`attention_score_bytes`)."""
    gpu_bytes: int | None = None
    """Memory of the GPU to compare with, if one was named."""

    @property
    def weight_bytes(self) -> int:
        """All base-model weights as loaded for training."""
        return self.quantized_weight_bytes + self.other_weight_bytes

    @property
    def total_bytes(self) -> int:
        """The estimated peak."""
        return (
            self.weight_bytes
            + self.lora_bytes
            + self.activation_bytes
            + self.attention_score_bytes
            + self.logits_bytes
            + self.cuda_context_bytes
        )

    @property
    def fits(self) -> bool | None:
        """Whether :attr:`total_bytes` fits in :attr:`gpu_bytes` (None without a GPU size)."""
        return None if self.gpu_bytes is None else self.total_bytes <= self.gpu_bytes


# --------------------------------------------------------------------------------------
# Reading the model's config
# --------------------------------------------------------------------------------------


def load_model_config(name_or_path: str) -> Any:
    """A transformers config from a hub id, a model directory or a ``config.json`` file.

    ``embedded`` means the tiny offline model (built on first use). Raises ``ValueError``
    with one line naming ``name_or_path`` when nothing loads.
    """
    from transformers import AutoConfig

    if name_or_path == EMBEDDED:
        from flower_llm.embedded import embedded_model_dir

        name_or_path = str(embedded_model_dir())
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path.startswith(("/", ".", "~")):
        raise ValueError(
            f"cannot read a model config from {name_or_path!r}: no such file or directory"
        )
    try:
        if path.is_file():
            # AutoConfig reads a bare file too, but needs its model_type to pick the class.
            model_type = json.loads(path.read_text()).get("model_type")
            if not model_type:
                raise ValueError(f"{path} has no 'model_type' key")
            return AutoConfig.for_model(**json.loads(path.read_text()))
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"directory {path} has no config.json")
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(
            f"cannot read a model config from {name_or_path!r}: {first_line}"
        ) from None


# --------------------------------------------------------------------------------------
# Counting weights on the meta device
# --------------------------------------------------------------------------------------


def quantized_linear_bytes(in_features: int, out_features: int, settings: PlanSettings) -> int:
    """Bytes bitsandbytes holds for one quantized ``in x out`` linear weight."""
    n = in_features * out_features
    if settings.quantization == "int8":
        return n + 4 * out_features  # int8 weights + one fp32 scale per output row
    if settings.quantization == "none":
        return n * DTYPE_BYTES[settings.compute_dtype]
    blocks = -(-n // QUANT_BLOCK)
    data = -(-n // 2)
    if settings.double_quant:
        constants = blocks + 4 * -(-blocks // DOUBLE_QUANT_BLOCK) + CODE_8BIT_BYTES + 4
    else:
        constants = 4 * blocks
    return data + constants + CODE_4BIT_BYTES


def _layer_index(module_name: str) -> int:
    """The first all-digit component of a module path: the index in the layer stack."""
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    return -1


def _count(config: Any, settings: PlanSettings) -> dict[str, Any]:
    """Exact parameter counts of the base and LoRA, from a model built on ``meta``."""
    key = (config.to_json_string(use_diff=False), settings.lora_r, settings.target_modules)
    if key not in _STRUCTURES:
        _STRUCTURES[key] = _structure(config, settings.lora_r, settings.target_modules)
    structure = _STRUCTURES[key]
    total, linears, buffer_bytes, adapted, lora_parameters = structure
    quantized = sum(i * o for i, o in linears)
    quantized_bytes = sum(quantized_linear_bytes(i, o, settings) for i, o in linears)
    if settings.quantization == "none":
        # Nothing is quantized: every weight is a plain compute-dtype tensor.
        quantized, quantized_bytes = 0, 0
    other = total - quantized
    return {
        "total": total,
        "quantized": quantized,
        "quantized_bytes": quantized_bytes,
        "other": other,
        "other_bytes": other * settings.other_weight_bytes + buffer_bytes,
        "lora": lora_parameters,
        "adapted": list(adapted),
    }


_Structure = tuple[int, tuple[tuple[int, int], ...], int, tuple["AdaptedLinear", ...], int]
_STRUCTURES: dict[tuple[str, int, str], _Structure] = {}
""":func:`_structure` per (config as JSON, LoRA rank, target modules), for this process."""


def _structure(config: Any, lora_r: int, target_modules: str) -> _Structure:
    """What a plan counts in a model built on ``meta`` from ``config`` (seconds for a 7B
    architecture; the same for every batch size, sequence length and quantization): its
    parameters, the ``(in, out)`` of every linear bitsandbytes quantizes (each shared
    weight once), its buffers' bytes, the linears LoRA wraps and the LoRA parameters."""
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from flower_llm.adapters import lora_config

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)

    # What bitsandbytes quantizes: every Linear but the output embedding (which
    # transformers keeps in full precision, tied or not).
    output_embedding = model.get_output_embeddings()
    linears: dict[int, tuple[int, int]] = {}
    for module in model.modules():
        is_quantized = isinstance(module, torch.nn.Linear) and module is not output_embedding
        if is_quantized and id(module.weight) not in linears:
            linears[id(module.weight)] = (int(module.in_features), int(module.out_features))
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates ties
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())

    lora = LoraSettings(r=lora_r, target_modules=target_modules)
    with init_empty_weights(), warnings.catch_warnings():
        # peft 0.21 asks transformers 5 a deprecated question; the answer is still right.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        peft_model = get_peft_model(model, lora_config(lora))
    adapted = tuple(
        AdaptedLinear(
            name=name.rsplit(".", 1)[-1],
            layer=_layer_index(name),
            in_features=int(module.in_features),
            r=int(module.r["default"]),
        )
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})
    )
    lora_parameters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return total, tuple(linears.values()), buffer_bytes, adapted, lora_parameters


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------


def lora_activation_bytes(adapted: list[AdaptedLinear], activation_bytes: int) -> int:
    """Bytes per token that LoRA keeps for the adapted linears of one layer.

    ``lora_A``'s output (``r`` fp32 values) for ``lora_B``'s gradient, and ``lora_A``'s
    fp32 input for its own. When the residual stream is fp32 already, that input is a
    tensor the layer keeps anyway or shares with its siblings; otherwise peft casts it,
    once per adapted linear.
    """
    f = LORA_DTYPE_BYTES
    total = sum(f * m.r for m in adapted)
    if activation_bytes != f:
        return total + sum(f * m.in_features for m in adapted)
    names = {m.name for m in adapted}
    counted: set[str] = set()
    for m in adapted:
        if m.name in counted or m.name in INPUT_ALREADY_KEPT:
            continue
        group = next((g for g in SHARED_LORA_INPUTS if m.name in g), {m.name})
        counted |= group & names
        total += f * m.in_features
    return total


def layer_activation_bytes(
    shape: ModelShape, activation_bytes: int, adapted: list[AdaptedLinear]
) -> int:
    """Bytes per token that one decoder layer keeps for backward (module docstring)."""
    a, h, kv, i = activation_bytes, shape.hidden_size, shape.kv_size, shape.intermediate_size
    norms = 2 * (4 * h + 4)  # two RMSNorms: fp32 input and 1/rms
    attention = a * (2 * h + 2 * kv) + 4 * shape.num_heads  # q, k, v, output; fp32 LSE
    mlp = 3 * a * i  # gate, silu(gate), up
    return norms + attention + mlp + lora_activation_bytes(adapted, a)


def attention_score_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """Bytes per token and layer of the attention probabilities SDPA keeps on CUDA.

    ``4 n_h T`` when q, k, v are fp32 (``a = 4``) and the model groups its KV heads
    (``kv < h``): SDPA then runs its math kernel (module docstring); 0 otherwise.
    """
    grouped = shape.kv_size < shape.hidden_size
    if settings.activation_bytes != 4 or not grouped:
        return 0
    return 4 * shape.num_heads * settings.seq_len


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------


def estimate_memory(
    config: Any, settings: PlanSettings, *, gpu_bytes: int | None = None, model: str = ""
) -> MemoryPlan:
    """Estimate the peak GPU memory of one QLoRA training step.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The base model's config (see :func:`load_model_config`); only its shapes are used.
    settings : PlanSettings
        Sequence length, batch size, LoRA rank and targets, quantization, checkpointing.
    gpu_bytes : int, optional
        Memory of the GPU to compare with; sets :attr:`MemoryPlan.fits`.
    model : str
        Name shown in the plan.

    Returns
    -------
    MemoryPlan
        Bytes by part; the formulas are in this module's docstring.
    """
    shape = ModelShape.from_config(config)
    counts = _count(config, settings)
    a = settings.activation_bytes
    tokens = settings.tokens

    by_layer: dict[int, list[AdaptedLinear]] = {n: [] for n in range(shape.num_layers)}
    outside = []
    for adapted in counts["adapted"]:
        if adapted.layer in by_layer:
            by_layer[adapted.layer].append(adapted)
        else:
            outside.append(adapted)
    per_layer = [layer_activation_bytes(shape, a, mods) for mods in by_layer.values()]
    final_norm = 4 * shape.hidden_size + 4
    extra = lora_activation_bytes(outside, a) + final_norm
    if settings.gradient_checkpointing:
        # Each checkpointed layer keeps its input; backward recomputes one layer at a time.
        per_token = shape.num_layers * a * shape.hidden_size + max(per_layer, default=0) + extra
    else:
        per_token = sum(per_layer) + extra

    logits_per_value = a + 8
    layers_kept = 1 if settings.gradient_checkpointing else shape.num_layers
    return MemoryPlan(
        model=model or str(getattr(config, "_name_or_path", "") or shape.model_type),
        shape=shape,
        settings=settings,
        num_parameters=counts["total"],
        quantized_parameters=counts["quantized"],
        quantized_weight_bytes=counts["quantized_bytes"],
        other_parameters=counts["other"],
        other_weight_bytes=counts["other_bytes"],
        lora_parameters=counts["lora"],
        lora_bytes=counts["lora"] * LORA_BYTES_PER_PARAM,
        layer_activation_bytes=max(per_layer, default=0),
        activation_bytes=per_token * tokens,
        logits_bytes=tokens * shape.vocab_size * logits_per_value,
        cuda_context_bytes=CUDA_CONTEXT_BYTES,
        attention_score_bytes=layers_kept * tokens * attention_score_bytes(shape, settings),
        gpu_bytes=gpu_bytes,
    )


def parse_memory(text: str) -> int:
    """Bytes in a size such as ``8GiB``, ``24 GB``, ``512MiB`` or ``16`` (GiB).

    ``KiB/MiB/GiB/TiB`` (and bare ``K/M/G/T``) are powers of 1024, ``KB/MB/GB/TB`` powers
    of 1000. Raises ``ValueError`` naming the text otherwise.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read memory size {text!r}: use a number and a unit, e.g. 8GiB, 24GB, 512MiB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value)


def format_bytes(num_bytes: float) -> str:
    """``1.50 GiB``-style text."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{int(num_bytes)} B"


# --------------------------------------------------------------------------------------
# A site's own settings, and what to change when they do not fit
# --------------------------------------------------------------------------------------


class OutOfGpuMemory(RuntimeError):
    """A site's training or evaluation ran out of GPU memory; the message says what the
    plan estimates for its settings and which settings lower it."""


def run_plan_settings(cfg: Any, lora_r: int | None = None) -> PlanSettings:
    """The :class:`PlanSettings` of a run config (``flower_llm.config.RunConfig``), at the
    site's LoRA rank ``lora_r`` (default ``lora.r``)."""
    return PlanSettings(
        seq_len=cfg.data.max_seq_length,
        batch_size=cfg.train.batch_size,
        lora_r=lora_r or cfg.lora.r,
        target_modules=cfg.lora.target_modules,
        quantization=cfg.model.quantization,
        double_quant=cfg.model.double_quant,
        compute_dtype=cfg.model.compute_dtype,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        fp32_stream=cfg.model.fp32_stream,
    )


def memory_advice(config: Any, plan: MemoryPlan) -> str:
    """What ``plan`` (of ``config``, the model's config) says against its GPU, and the
    estimate after each run-config change that lowers it, in the order worth trying:
    checkpointing, then the compute-dtype stream, then half the batch."""
    settings, gpu_bytes = plan.settings, plan.gpu_bytes
    text = (
        f"flower-llm plan estimates {format_bytes(plan.total_bytes)} for batch "
        f"{settings.batch_size} x {settings.seq_len} tokens"
    )
    if gpu_bytes is not None:
        text += f" on this GPU of {format_bytes(gpu_bytes)}"
    changes: list[tuple[str, PlanSettings]] = []
    current = settings
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        changes.append(("model.gradient-checkpointing = true", current))
    if current.quantization != "none" and current.fp32_stream:
        current = replace(current, fp32_stream=False)
        changes.append(("model.fp32-stream = false", current))
    if current.batch_size > 1:
        current = replace(current, batch_size=current.batch_size // 2)
        changes.append(
            (
                f"train.batch-size = {current.batch_size} (train.grad-accum x 2 keeps the "
                "examples per step)",
                current,
            )
        )
    if not changes:
        return text + "; lower data.max-seq-length or use a larger GPU"
    steps = [
        f"{'then ' if i else ''}{change}: {format_bytes(estimate_memory(config, s).total_bytes)}"
        for i, (change, s) in enumerate(changes)
    ]
    return text + "; set " + ", ".join(steps)
