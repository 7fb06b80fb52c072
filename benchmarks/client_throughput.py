"""Tokens/s of one federated client round vs a plain PEFT training loop, and vs matmul peak.

*Ours* is one round as the ClientApp runs it: the global adapter arrives as an
``ArrayRecord``, ``flower_llm.wire.from_array_record`` -> ``ClientSession.train`` (which
calls ``load_adapter_state``, builds the round's shuffled loader, trains, and returns
``adapter_state``) -> ``wire.to_array_record``. *Plain* is the textbook PEFT loop on the
same PEFT model, the same loader (same batches) and the same number of steps:
``model(**batch, labels=...)``, ``loss.backward()``, clip, ``AdamW.step()``; no
serialisation, no bookkeeping. Target: ours / plain <= 1.10x.

Both are also put against this machine's matmul peak, measured in the same run (best of
``torch.matmul`` on square bf16 and fp32 matrices, ``2*M*N*K`` FLOPs). Training FLOPs of
LoRA on a frozen base, per batch of ``B`` sequences of ``T`` tokens::

    (4 * P_matmul + 6 * P_lora) * B * T  +  12 * L * d * B * T^2

``P_matmul``: base weights used in matmuls (every ``nn.Linear``, ``lm_head`` included;
the embedding is a lookup). A frozen weight costs 2 FLOPs per token forward and 2 in
backward for the activation gradient, none for a weight gradient (hence 4, not the 6 of
full fine-tuning); a LoRA weight costs 2 + 2 + 2. The last term is attention scores and
values (``QK^T`` and ``AV``, 4*T*d per token per layer forward, x3 with backward), counted
unmasked. 4-bit dequantisation, norms and softmax are not counted: overhead, not useful
work. Tokens are padded ``B*T`` (what is computed); response tokens (what the loss
trains on) are reported beside them.

    python -m benchmarks.client_throughput [--quick]
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from benchmarks import common

SERVER_ROUND = 1


# --------------------------------------------------------------------------------------
# Peak
# --------------------------------------------------------------------------------------


def matmul_peak(dtype_name: str, sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Best FLOP/s of ``torch.matmul`` on square matrices of ``dtype_name``."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            rate = 2 * n**3 / (time.perf_counter() - start)
            if rate > best:
                best, best_n = rate, n
    return {"flops-per-s": best, "size": best_n}


# --------------------------------------------------------------------------------------
# FLOPs of a LoRA training step
# --------------------------------------------------------------------------------------


def model_dims(peft_model: Any) -> dict[str, int]:
    """``P_matmul``, ``P_lora``, layers and attention width of a PEFT-wrapped causal LM."""
    import torch

    matmul = 0
    for name, module in peft_model.named_modules():
        if "lora_" in name:
            continue
        weight = getattr(module, "weight", None)
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        )
        if is_linear and weight is not None and not hasattr(module, "base_layer"):
            # bitsandbytes packs 4-bit weights two per byte: count logical elements.
            matmul += module.in_features * module.out_features
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    config = peft_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "p-matmul": matmul,
        "p-lora": lora,
        "layers": config.num_hidden_layers,
        "attention-width": config.num_attention_heads * head_dim,
    }


def step_flops(dims: dict[str, int], batch_size: int, seq_len: int) -> float:
    """Training FLOPs of one batch (formula in the module docstring)."""
    tokens = batch_size * seq_len
    linear = (4 * dims["p-matmul"] + 6 * dims["p-lora"]) * tokens
    attention = 12 * dims["layers"] * dims["attention-width"] * batch_size * seq_len**2
    return float(linear + attention)


# --------------------------------------------------------------------------------------
# The two rounds
# --------------------------------------------------------------------------------------


def plain_round(model: Any, batches: Iterator[Any], steps: int, lr: float) -> None:
    """The textbook PEFT loop: HF loss from ``labels``, backward, clip, AdamW."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        batch = next(batches)
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def fixed_costs(
    session: Any, incoming: Any, wire_dtype: str, repeats: int = 20
) -> dict[str, float]:
    """Median seconds of each per-round step ours does and the plain loop does not."""
    from flower_llm import wire
    from flower_llm.adapters import adapter_state, load_adapter_state

    state = wire.from_array_record(incoming)
    steps = {
        "wire.from_array_record": lambda: wire.from_array_record(incoming),
        "load_adapter_state": lambda: load_adapter_state(session.model, state),
        "adapter_state": lambda: adapter_state(session.model),
        "wire.to_array_record": lambda: wire.to_array_record(state, wire_dtype),
    }
    times = common.interleaved(steps, repeats)
    return {k: common.median(v) for k, v in times.items()}


def measure(model_name: str, steps: int, repeats: int, peak: dict[str, Any]) -> dict[str, Any]:
    """Interleaved rounds of ours and plain on one model; tokens/s and peak fractions."""
    from flower_llm import wire
    from flower_llm.adapters import adapter_state
    from flower_llm.client import ClientSession, SiteIdentity
    from flower_llm.config import parse_run_config

    cfg = parse_run_config({"model.name": model_name, "train.local-steps": steps})
    session = ClientSession(cfg, SiteIdentity(None, 0, 1))
    start_state = adapter_state(session.model)
    incoming = wire.to_array_record(start_state, cfg.fed.wire_dtype)
    lr = cfg.train.learning_rate

    def ours() -> None:
        state, _ = session.train(wire.from_array_record(incoming), SERVER_ROUND, lr)
        wire.to_array_record(state, cfg.fed.wire_dtype)

    def plain() -> None:
        plain_round(session.model, session.batches_for_round(SERVER_ROUND), steps, lr)

    # The round's batches, once more, to count what both computed.
    batches = session.batches_for_round(SERVER_ROUND)
    dims = model_dims(session.model)
    padded = response = 0
    flops = 0.0
    for _ in range(steps):
        batch = next(batches)
        b, t = batch["input_ids"].shape
        padded += b * t
        response += int((batch["labels"][:, 1:] != -100).sum())
        flops += step_flops(dims, b, t)

    ours()  # warm-up: first-call allocations and lazy inits out of the timings
    plain()
    times = common.interleaved({"ours": ours, "plain": plain}, repeats)
    med = {k: common.median(v) for k, v in times.items()}
    fixed = fixed_costs(session, incoming, cfg.fed.wire_dtype)
    return {
        "model": model_name,
        "params": common.logical_params(session.base.model),
        "quantization": cfg.model.quantization,
        "compute-dtype": cfg.model.compute_dtype,
        "steps": steps,
        "batch-size": cfg.train.batch_size,
        "repeats": repeats,
        "dims": dims,
        "padded-tokens": padded,
        "response-tokens": response,
        "flops-per-round": flops,
        "seconds": med,
        "all-seconds": times,
        "ratio-ours-vs-plain": med["ours"] / med["plain"],
        "fixed-costs-seconds": fixed,
        "fixed-costs-share-of-round": sum(fixed.values()) / med["ours"],
        "tokens-per-s": {k: padded / v for k, v in med.items()},
        "response-tokens-per-s": {k: response / v for k, v in med.items()},
        "fraction-of-peak": {
            k: {d: flops / v / p["flops-per-s"] for d, p in peak.items()} for k, v in med.items()
        },
    }


def run(quick: bool) -> dict[str, Any]:
    """Peak, then the embedded default model and (full mode) the ~77M model."""
    sizes = (256, 512) if quick else (512, 1024, 2048)
    peak = {d: matmul_peak(d, sizes, 3 if quick else 5) for d in ("bfloat16", "float32")}
    models = [("embedded", 2 if quick else 20, 2 if quick else 5)]
    if not quick:
        models.append((str(common.mid_model_dir()), 2, 2))
    rows = [measure(name, steps, repeats, peak) for name, steps, repeats in models]
    worst = max(r["ratio-ours-vs-plain"] for r in rows)
    heads = [
        common.headline(
            "client round (wire + ClientSession.train) / plain PEFT loop, same batches",
            ", ".join(f"{_label(r)}: {r['ratio-ours-vs-plain']:.2f}x" for r in rows),
            "<= 1.10x",
            worst <= 1.10,
        ),
        common.headline(
            "client tokens/s (padded) and fraction of bf16 matmul peak",
            ", ".join(
                f"{_label(r)}: {r['tokens-per-s']['ours']:,.0f} tok/s, "
                f"{r['fraction-of-peak']['ours']['bfloat16']:.1%}"
                for r in rows
            ),
        ),
    ]
    return {"peak": peak, "rows": rows, "headlines": heads}


def _label(row: dict[str, Any]) -> str:
    return f"{row['params'] / 1e6:.1f}M {row['quantization']}"


def to_markdown(result: dict[str, Any]) -> str:
    """Peak line and one row per (model, contender)."""
    peak = result["peak"]
    text = (
        f"Matmul peak this run: bf16 {peak['bfloat16']['flops-per-s'] / 1e9:.1f} GFLOP/s "
        f"(n={peak['bfloat16']['size']}), fp32 {peak['float32']['flops-per-s'] / 1e9:.1f} "
        f"GFLOP/s (n={peak['float32']['size']}). FLOPs = (4 P_matmul + 6 P_lora) B T + "
        "12 L d B T^2 (see the module docstring).\n\n"
    )
    rows = []
    for r in result["rows"]:
        for k in ("ours", "plain"):
            rows.append(
                [
                    f"{r['params']:,} ({r['quantization']}, {r['compute-dtype']})",
                    f"{r['steps']} x {r['batch-size']}",
                    k,
                    f"{r['seconds'][k]:.3f}",
                    f"{r['tokens-per-s'][k]:,.0f}",
                    f"{r['response-tokens-per-s'][k]:,.0f}",
                    f"{r['fraction-of-peak'][k]['bfloat16']:.2%}",
                    f"{r['fraction-of-peak'][k]['float32']:.2%}",
                    f"**{r['ratio-ours-vs-plain']:.3f}x**" if k == "ours" else "1 (reference)",
                ]
            )
    text += common.table(
        [
            "model params",
            "steps x batch",
            "round",
            "median s",
            "tokens/s (padded)",
            "response tokens/s",
            "of bf16 peak",
            "of fp32 peak",
            "time / plain",
        ],
        rows,
    )
    text += (
        "\nPer-round steps that ours does and plain does not (median seconds) and their "
        "share of our round; the rest of any gap is the loop itself (ours sums the "
        "response-token losses of a step and divides by their count, across micro-batches; "
        "HF's loss averages per batch):\n\n"
    )
    first = next(iter(result["rows"]))
    text += common.table(
        ["model params", *first["fixed-costs-seconds"], "share of our round"],
        [
            [
                f"{r['params']:,}",
                *(f"{v * 1e3:.2f} ms" for v in r["fixed-costs-seconds"].values()),
                f"{r['fixed-costs-share-of-round']:.1%}",
            ]
            for r in result["rows"]
        ],
    )
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, print and save."""
    args = common.parser(__doc__).parse_args(argv)
    common.setup(args.threads)
    return common.run_and_finish("client_throughput", args, lambda: run(args.quick), to_markdown)


if __name__ == "__main__":
    main()
