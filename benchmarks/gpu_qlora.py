"""GPU: QLoRA (NF4 base) vs bf16-base LoRA, tokens/s and peak VRAM, same model and batches.

Runs only where CUDA is available; elsewhere it prints one skip line and writes nothing
(so a result taken on a GPU machine is never overwritten by a CPU run). The model is
built from a published config (``--arch``, default Qwen2.5-0.5B; Qwen2.5-1.5B and a
1.1B Llama are offered) with random weights, saved once with ``save_pretrained``, and
loaded through ``flower_llm.models.load_base_model`` twice: ``model.quantization = nf4``
and ``none`` (both compute in bfloat16). Training is ``flower_llm.train.train_adapter``
(the project's loop) with the project's LoRA settings on fixed-length random token
batches, so both configurations see identical shapes.

Reported per configuration: ``torch.cuda.max_memory_allocated`` after loading and over
training, and tokens/s over the timed steps (after warm-up steps, CUDA synchronised).

    python -m benchmarks.gpu_qlora [--arch qwen2.5-0.5b] [--batch-size 8] [--seq-len 512]
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

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


def measure(
    model_dir: Path,
    quantization: str,
    batch_size: int,
    seq_len: int,
    warmup: int,
    steps: int,
    device: Any,
) -> dict[str, Any]:
    """Load with ``quantization``, apply LoRA, time ``steps`` training steps."""
    import torch

    from flower_llm.adapters import apply_lora
    from flower_llm.config import LoraSettings, ModelConfig
    from flower_llm.models import base_tensor_bytes, load_base_model
    from flower_llm.train import train_adapter

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = ModelConfig(name=str(model_dir), quantization=quantization, compute_dtype="bfloat16")
    base = load_base_model(cfg, device)
    loaded = torch.cuda.max_memory_allocated() if cuda else None
    model = apply_lora(base.model, LoraSettings(), base.name_or_path)
    batches = random_batches(base.model.config.vocab_size, batch_size, seq_len, device)
    train_adapter(model, batches, steps=warmup, learning_rate=1e-4)
    if cuda:
        torch.cuda.synchronize()
    stats = train_adapter(model, batches, steps=steps, learning_rate=1e-4)
    if cuda:
        torch.cuda.synchronize()
    seconds = stats.seconds
    result = {
        "quantization": quantization,
        "base-tensor-bytes": base_tensor_bytes(base.model),
        "vram-after-load": loaded,
        "vram-peak": torch.cuda.max_memory_allocated() if cuda else None,
        "tokens": steps * batch_size * seq_len,
        "seconds": seconds,
        "tokens-per-s": steps * batch_size * seq_len / seconds,
        "loss": stats.loss,
    }
    del model, base
    gc.collect()
    return result


def run(
    arch: str, batch_size: int, seq_len: int, warmup: int, steps: int, device: Any
) -> dict[str, Any]:
    """Build the model once, then measure NF4 and bf16."""
    with tempfile.TemporaryDirectory(prefix="flower-llm-gpu-") as tmp:
        model_dir = build_model(arch, Path(tmp), device.type)
        rows = {
            q: measure(model_dir, q, batch_size, seq_len, warmup, steps, device)
            for q in ("nf4", "none")
        }
    nf4, bf16 = rows["nf4"], rows["none"]
    speed = nf4["tokens-per-s"] / bf16["tokens-per-s"]
    vram = nf4["vram-peak"] / bf16["vram-peak"] if nf4["vram-peak"] else None
    heads = [
        common.headline(
            f"GPU {arch}: QLoRA (NF4) / bf16 LoRA tokens/s",
            f"{nf4['tokens-per-s']:,.0f} / {bf16['tokens-per-s']:,.0f} = {speed:.2f}x",
        ),
        common.headline(
            f"GPU {arch}: QLoRA (NF4) / bf16 LoRA peak VRAM",
            "n/a (CPU check run)"
            if vram is None
            else f"{common.mib(nf4['vram-peak'])} / {common.mib(bf16['vram-peak'])} MiB "
            f"= {vram:.2f}x",
        ),
    ]
    return {
        "arch": arch,
        "dims": GPU_ARCHITECTURES[arch],
        "batch-size": batch_size,
        "seq-len": seq_len,
        "warmup-steps": warmup,
        "steps": steps,
        "configs": rows,
        "ratio-tokens-per-s-nf4-vs-bf16": speed,
        "ratio-vram-nf4-vs-bf16": vram,
        "headlines": heads,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """One row per configuration."""
    text = (
        f"{result['arch']} with random weights, {result['steps']} timed steps (after "
        f"{result['warmup-steps']}) of batch {result['batch-size']} x {result['seq-len']} "
        "tokens, project LoRA settings, bfloat16 compute. MiB.\n\n"
    )
    text += common.table(
        ["base", "base tensor bytes", "VRAM after load", "peak VRAM", "tokens/s", "loss"],
        [
            [
                "NF4 (QLoRA)" if q == "nf4" else "bf16",
                common.mib(r["base-tensor-bytes"]),
                common.mib(r["vram-after-load"]),
                f"**{common.mib(r['vram-peak'])}**",
                f"**{r['tokens-per-s']:,.0f}**",
                f"{r['loss']:.3f}",
            ]
            for q, r in result["configs"].items()
        ],
    )
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run on CUDA, print and save; print a skip line without CUDA."""
    import argparse

    import torch

    p = common.parser(__doc__)
    p.add_argument("--arch", choices=sorted(GPU_ARCHITECTURES), default="qwen2.5-0.5b")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_qlora: skipped, CUDA is not available on this machine")
        return None
    common.setup(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.warmup, args.steps = 1, 2
    if device.type == "cpu":  # checking the code path only: a tiny model, short batches
        args.arch, args.batch_size, args.seq_len = "tiny", 2, 32
    started = time.perf_counter()
    result = run(args.arch, args.batch_size, args.seq_len, args.warmup, args.steps, device)
    return common.finish(
        "gpu_qlora" if device.type == "cuda" else "gpu_qlora_cpu_check",
        result,
        to_markdown(result),
        Path(args.out),
        quick=args.quick,
        started=started,
    )


if __name__ == "__main__":
    main()
