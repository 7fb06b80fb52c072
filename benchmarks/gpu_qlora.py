"""GPU: QLoRA (NF4 base) vs bf16-base LoRA: tokens/s, peak VRAM against the plan, cache loads.

Runs only where CUDA is available; elsewhere it prints one skip line and writes nothing
(so a result taken on a GPU machine is never overwritten by a CPU run). The model is
built from a published config (``--arch``, default Qwen2.5-0.5B; Qwen2.5-1.5B, a 1.1B
Llama and Llama-3-8B are offered) with random weights, saved once with
``save_pretrained``, and loaded through ``flower_llm.models.load_base_model`` once per
configuration (``--configs``: ``nf4``, ``bf16``, each optionally ``+gc`` with gradient
checkpointing, ``nf4+bf16-stream`` for ``model.fp32-stream = false`` and ``+dpsgd`` for
DP-SGD through Opacus; all compute in bfloat16). 4-bit loads go through the pre-quantized base
cache: the first one quantizes the bf16 weights and writes the entry, the next one reads
it, and the load times of both are reported. Training is ``flower_llm.train.train_adapter``
(the project's loop) with the project's LoRA settings on fixed-length random token
batches, so every configuration sees identical shapes.

Reported per configuration: ``torch.cuda.max_memory_allocated`` after loading and over
training, next to ``flower-llm plan``'s estimate for the same settings
(:func:`flower_llm.plan.estimate_memory`, without its CUDA context), and tokens/s over the
timed steps (after warm-up steps, CUDA synchronised).

    python -m benchmarks.gpu_qlora [--arch qwen2.5-0.5b,llama-3-8b] [--configs nf4,bf16]
        [--batch-size 8] [--seq-len 512]
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import common
from benchmarks.wire_bytes import ARCHITECTURES

# Published config dimensions (config.json on the Hugging Face hub).
GPU_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    "qwen2.5-0.5b": {
        "family": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json
    "qwen2.5-1.5b": {
        "family": "qwen2",
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/blob/main/config.json
    "llama-1.1b": {
        "family": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    # The shape docs/cli.md plans for a 24 GiB card (wire_bytes has its source).
    "llama-3-8b": {k: v for k, v in ARCHITECTURES["Llama-3-8B"].items() if k != "params"},
    # Only for checking this script's code path on a CPU (--allow-cpu).
    "tiny": {
        "family": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "vocab_size": 1024,
        "tie_word_embeddings": False,
    },
}


def build_model(arch: str, out_dir: Path, device: str) -> Path:
    """Random-weight bf16 model of ``arch`` plus the embedded tokenizer, saved to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.wire_bytes import hf_config
    from flower_llm.embedded import build_tokenizer

    config = hf_config(GPU_ARCHITECTURES[arch])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    # Any tokenizer will do for random-token batches; load_base_model needs one on disk.
    build_tokenizer().save_pretrained(out_dir)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def random_batches(
    vocab: int, batch_size: int, seq_len: int, device: Any, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Fixed-shape batches of random tokens, every position a training target."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        yield {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.to(device),
        }


class Config(NamedTuple):
    """One ``--configs`` entry: the run-config values it sets."""

    quantization: str
    """``model.quantization``."""
    checkpointing: bool
    """``model.gradient-checkpointing``."""
    fp32_stream: bool
    """``model.fp32-stream`` (``+bf16-stream``: false)."""
    dpsgd: bool = False
    """``privacy.dpsgd``: Opacus per-example clipping and noise (fixed batches here)."""


CONFIGS: dict[str, Config] = {
    "nf4": Config("nf4", False, True),
    "nf4+gc": Config("nf4", True, True),
    "nf4+bf16-stream": Config("nf4", False, False),
    "nf4+gc+bf16-stream": Config("nf4", True, False),
    "nf4+dpsgd": Config("nf4", False, True, dpsgd=True),
    "nf4+bf16-stream+dpsgd": Config("nf4", False, False, dpsgd=True),
    "bf16": Config("none", False, True),
    "bf16+gc": Config("none", True, True),
}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    model_dir: Path,
    config: str,
    batch_size: int,
    seq_len: int,
    warmup: int,
    steps: int,
    device: Any,
    cache: Any,
) -> dict[str, Any]:
    """Load as ``config`` says, apply LoRA, time ``steps`` steps; the plan's estimate beside.

    The load goes through ``cache`` (a :class:`flower_llm.models.QuantizedBaseCache`): the
    first 4-bit load of a model quantizes its bf16 weights and writes the cache entry, a
    later one reads the entry. Which of the two happened is recorded with the load time.
    """
    import torch

    from flower_llm.adapters import apply_lora
    from flower_llm.config import LoraSettings, ModelConfig
    from flower_llm.models import CACHED_QUANTIZATIONS, base_tensor_bytes, load_base_model
    from flower_llm.plan import PlanSettings, estimate_memory, load_model_config
    from flower_llm.train import train_adapter

    quantization, checkpointing, fp32_stream, dpsgd = CONFIGS[config]
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = ModelConfig(
        name=str(model_dir),
        quantization=quantization,
        compute_dtype="bfloat16",
        gradient_checkpointing=checkpointing,
        fp32_stream=fp32_stream,
    )
    source = "bf16 weights"
    if quantization in CACHED_QUANTIZATIONS:
        cached = cache.entry_dir(cache.key_fields(cfg, str(model_dir))).exists()
        source = "cache entry" if cached else "bf16 weights, quantized, entry written"
    _sync(device)
    started = time.perf_counter()
    base = load_base_model(cfg, device, cache=cache)
    _sync(device)
    load_seconds = time.perf_counter() - started
    loaded = torch.cuda.max_memory_allocated() if cuda else None
    lora = LoraSettings()
    model = apply_lora(base.model, lora, base.name_or_path)
    batches = random_batches(base.model.config.vocab_size, batch_size, seq_len, device)
    if dpsgd:
        stats = _train_dpsgd(model, batches, batch_size, warmup, steps, device)
    else:
        train_adapter(model, batches, steps=warmup, learning_rate=1e-4)
        _sync(device)
        stats = train_adapter(model, batches, steps=steps, learning_rate=1e-4)
    _sync(device)
    plan = estimate_memory(
        load_model_config(str(model_dir)),
        PlanSettings(
            seq_len=seq_len,
            batch_size=batch_size,
            lora_r=lora.r,
            target_modules=lora.target_modules,
            quantization=quantization,
            compute_dtype="bfloat16",
            gradient_checkpointing=checkpointing,
            fp32_stream=fp32_stream,
        ),
    )
    # max_memory_allocated counts PyTorch's tensors; the plan adds a CUDA context on top.
    planned = plan.total_bytes - plan.cuda_context_bytes
    peak = torch.cuda.max_memory_allocated() if cuda else None
    result = {
        "config": config,
        "quantization": quantization,
        "gradient-checkpointing": checkpointing,
        "fp32-stream": fp32_stream,
        "dpsgd": dpsgd,
        "load-from": source,
        "load-seconds": load_seconds,
        "base-tensor-bytes": base_tensor_bytes(base.model),
        "vram-after-load": loaded,
        "vram-peak": peak,
        "vram-reserved-peak": torch.cuda.max_memory_reserved() if cuda else None,
        "plan-bytes": planned,
        "plan-weights-bytes": plan.weight_bytes,
        "plan-activation-bytes": plan.activation_bytes + plan.logits_bytes,
        "peak-over-plan": peak / planned if peak else None,
        "tokens": steps * batch_size * seq_len,
        "seconds": stats.seconds,
        "tokens-per-s": steps * batch_size * seq_len / stats.seconds,
        "loss": stats.loss,
    }
    del model, base, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _train_dpsgd(
    model: Any,
    batches: Iterator[dict[str, Any]],
    batch_size: int,
    warmup: int,
    steps: int,
    device: Any,
) -> Any:
    """DP-SGD through ``train_adapter_dpsgd`` on the same random batches, fixed batch size.

    Poisson sampling is off so that every step has ``batch_size`` examples, as the plain
    configurations do; noise 1.0 and clipping 1.0 (their values do not change the cost).
    """
    from flower_llm.privacy.dpsgd import train_adapter_dpsgd

    def examples(count: int) -> list[dict[str, list[int]]]:
        rows: list[dict[str, list[int]]] = []
        while len(rows) < count:
            batch = next(batches)
            for ids in batch["input_ids"].tolist():
                rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
        return rows[:count]

    common_args: dict[str, Any] = dict(
        batch_size=batch_size,
        learning_rate=1e-4,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        pad_id=0,
        seed=0,
        poisson_sampling=False,
    )
    train_adapter_dpsgd(model, examples(batch_size * warmup), steps=warmup, **common_args)
    _sync(device)
    return train_adapter_dpsgd(
        model, examples(batch_size * steps), steps=steps, **common_args
    ).stats


def run(
    arch: str,
    configs: Sequence[str],
    batch_size: int,
    seq_len: int,
    warmup: int,
    steps: int,
    device: Any,
) -> dict[str, Any]:
    """Build the model once, then measure each configuration in the order given."""
    from flower_llm.models import QuantizedBaseCache

    with tempfile.TemporaryDirectory(prefix="flower-llm-gpu-") as tmp:
        started = time.perf_counter()
        model_dir = build_model(arch, Path(tmp) / "model", device.type)
        build_seconds = time.perf_counter() - started
        cache = QuantizedBaseCache(Path(tmp) / "quantized-bases")
        rows = {
            c: measure(model_dir, c, batch_size, seq_len, warmup, steps, device, cache)
            for c in configs
        }
    heads = []
    if "nf4" in rows and "bf16" in rows:
        nf4, bf16 = rows["nf4"], rows["bf16"]
        speed = nf4["tokens-per-s"] / bf16["tokens-per-s"]
        heads.append(
            common.headline(
                f"GPU {arch}: QLoRA (NF4) / bf16 LoRA tokens/s",
                f"{nf4['tokens-per-s']:,.0f} / {bf16['tokens-per-s']:,.0f} = {speed:.2f}x",
            )
        )
        if nf4["vram-peak"]:
            heads.append(
                common.headline(
                    f"GPU {arch}: QLoRA (NF4) / bf16 LoRA peak VRAM",
                    f"{common.mib(nf4['vram-peak'])} / {common.mib(bf16['vram-peak'])} MiB "
                    f"= {nf4['vram-peak'] / bf16['vram-peak']:.2f}x",
                )
            )
    for name, row in rows.items():
        if row["peak-over-plan"]:
            heads.append(
                common.headline(
                    f"GPU {arch} {name}: measured peak / `flower-llm plan` estimate",
                    f"{common.mib(row['vram-peak'])} / {common.mib(row['plan-bytes'])} MiB "
                    f"= {row['peak-over-plan']:.2f}x",
                )
            )
    loads: dict[str, float] = {}
    for r in rows.values():
        if r["quantization"] == "nf4":
            loads.setdefault(r["load-from"], r["load-seconds"])
    first, again = "bf16 weights, quantized, entry written", "cache entry"
    if first in loads and again in loads:
        heads.append(
            common.headline(
                f"GPU {arch}: NF4 base load, cache entry / quantizing the bf16 weights",
                f"{loads[again]:.1f} s / {loads[first]:.1f} s = {loads[again] / loads[first]:.2f}x",
            )
        )
    return {
        "arch": arch,
        "dims": GPU_ARCHITECTURES[arch],
        "batch-size": batch_size,
        "seq-len": seq_len,
        "warmup-steps": warmup,
        "steps": steps,
        "build-seconds": build_seconds,
        "configs": rows,
        "headlines": heads,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """One row per configuration, per architecture."""
    text = ""
    for run_result in result["runs"]:
        text += (
            f"### {run_result['arch']}\n\nRandom weights, {run_result['steps']} timed steps "
            f"(after {run_result['warmup-steps']}) of batch {run_result['batch-size']} x "
            f"{run_result['seq-len']} tokens, project LoRA settings (r=16, all-linear), "
            "bfloat16 compute. `plan` is `flower-llm plan`'s estimate for the same settings "
            "without its 0.5 GiB CUDA context (peak counts PyTorch's allocations only). MiB.\n\n"
        )
        text += common.table(
            [
                "config",
                "load",
                "load s",
                "base tensor bytes",
                "after load",
                "peak",
                "plan",
                "peak / plan",
                "tokens/s",
                "loss",
            ],
            [
                [
                    name,
                    r["load-from"],
                    f"{r['load-seconds']:.1f}",
                    common.mib(r["base-tensor-bytes"]),
                    common.mib(r["vram-after-load"]) if r["vram-after-load"] else "n/a",
                    f"**{common.mib(r['vram-peak'])}**" if r["vram-peak"] else "n/a",
                    common.mib(r["plan-bytes"]),
                    f"{r['peak-over-plan']:.2f}" if r["peak-over-plan"] else "n/a",
                    f"**{r['tokens-per-s']:,.0f}**",
                    f"{r['loss']:.3f}",
                ]
                for name, r in run_result["configs"].items()
            ],
        )
        text += "\n"
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run on CUDA, print and save; print a skip line without CUDA."""
    import argparse

    import torch

    p = common.parser(__doc__)
    p.add_argument(
        "--arch",
        default="qwen2.5-0.5b",
        help=f"comma-separated, from: {', '.join(sorted(GPU_ARCHITECTURES))}",
    )
    p.add_argument(
        "--configs",
        default="nf4,bf16",
        help=f"comma-separated, in order, from: {', '.join(CONFIGS)} (+gc: gradient "
        "checkpointing); a second NF4 config of an arch loads from the cache entry the first wrote",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--name", default="gpu_qlora", help="result file name (without .json/.md)")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name, known in (("arch", GPU_ARCHITECTURES), ("configs", CONFIGS)):
        bad = [v for v in (archs if name == "arch" else configs) if v not in known]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_qlora: skipped, CUDA is not available on this machine")
        return None
    common.setup(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.warmup, args.steps = 1, 2
    if device.type == "cpu":  # checking the code path only: a tiny model, short batches
        archs, args.batch_size, args.seq_len = ["tiny"], 2, 32
    started = time.perf_counter()
    runs = [
        run(arch, configs, args.batch_size, args.seq_len, args.warmup, args.steps, device)
        for arch in archs
    ]
    result = {"runs": runs, "headlines": [h for r in runs for h in r["headlines"]]}
    name = args.name if device.type == "cuda" else f"{args.name}_cpu_check"
    return common.finish(
        name, result, to_markdown(result), Path(args.out), quick=args.quick, started=started
    )


if __name__ == "__main__":
    main()
