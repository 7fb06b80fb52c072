"""Peak memory of one client round: NF4-quantized base vs a bf16 base of the same model.

Each configuration runs in its own subprocess, so each peak is that configuration's alone:
the child builds a ``flower_llm.client.ClientSession`` (``load_base_model`` through
``AutoModelForCausalLM.from_pretrained``, LoRA, the embedded data), runs one round as the
ClientApp does (adapter in and out through ``flower_llm.wire``) and reports its resident
set high-water mark (``VmHWM`` from /proc/self/status) after imports, after loading and
after the round, with ``flower_llm.models.base_tensor_bytes`` of the loaded model. A child
that only imports the stack gives the floor that every client pays before any model.

The model is a ~77M-parameter Llama built locally from a config
(``benchmarks.common.MID_MODEL_DIMS``, random bf16 weights, saved with
``save_pretrained``); ``--quick`` uses the tiny embedded model instead.

    python -m benchmarks.client_memory [--quick] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

CONFIGS = {"nf4": "nf4", "bf16": "none"}
"""Label -> ``model.quantization``; both compute in bfloat16."""


# --------------------------------------------------------------------------------------
# The child: one configuration in a fresh process
# --------------------------------------------------------------------------------------


def child(quantization: str | None, model_dir: str, steps: int) -> dict[str, Any]:
    """Run one client round (or only the imports, when ``quantization`` is None)."""
    start = time.perf_counter()
    import flwr.app  # noqa: F401  # the ClientApp process imports Flower too

    from flower_llm import wire
    from flower_llm.adapters import adapter_state, num_parameters
    from flower_llm.client import ClientSession, SiteIdentity
    from flower_llm.config import parse_run_config
    from flower_llm.models import base_tensor_bytes

    out: dict[str, Any] = {"hwm-after-imports": common.vm_hwm_bytes()}
    if quantization is None:
        return out
    cfg = parse_run_config(
        {
            "model.name": model_dir,
            "model.quantization": quantization,
            "model.compute-dtype": "bfloat16",
            "train.local-steps": steps,
        }
    )
    session = ClientSession(cfg, SiteIdentity(None, 0, 1))
    out["hwm-after-load"] = common.vm_hwm_bytes()
    out["rss-after-load"] = common.vm_rss_bytes()
    out["base-tensor-bytes"] = base_tensor_bytes(session.base.model)
    out["model-params"] = common.logical_params(session.base.model)

    # One round as the ClientApp runs it: arrays in, train, arrays out.
    incoming = wire.to_array_record(adapter_state(session.model))
    state, stats = session.train(wire.from_array_record(incoming), 1, cfg.train.learning_rate)
    reply = wire.to_array_record(state)
    out["hwm-after-round"] = common.vm_hwm_bytes()
    out["rss-after-round"] = common.vm_rss_bytes()
    out["adapter-params"] = num_parameters(state)
    out["reply-bytes"] = wire.num_bytes(reply)
    out["steps"] = stats.steps
    out["train-loss"] = stats.loss
    out["seconds"] = time.perf_counter() - start
    return out


def run_child(
    label: str, quantization: str | None, model_dir: Path, steps: int, threads: int
) -> dict[str, Any]:
    """Run :func:`child` in a subprocess and return what it reported."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.client_memory",
        "--child",
        quantization or "imports-only",
        "--model-dir",
        str(model_dir),
        "--steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{label} child failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # ru_maxrss (KiB) is the largest child so far: a cross-check, valid when it grew.
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report["ru-maxrss-children"] = after * 1024 if after > before else None
    return report


# --------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------


def planner_estimate(model_dir: Path, quantization: str) -> dict[str, int]:
    """``flower_llm.plan.estimate_memory`` of one training step of this configuration.

    An upper bound on activations (every example at ``data.max-seq-length`` = 128, every
    token a response token); it explains where the two configurations differ.
    """
    from flower_llm.config import DataConfig, LoraSettings, TrainConfig
    from flower_llm.plan import PlanSettings, estimate_memory, load_model_config

    plan = estimate_memory(
        load_model_config(str(model_dir)),
        PlanSettings(
            seq_len=DataConfig().max_seq_length,
            batch_size=TrainConfig().batch_size,
            lora_r=LoraSettings().r,
            quantization=quantization,
            compute_dtype="bfloat16",
        ),
    )
    return {
        "weight-bytes": plan.weight_bytes,
        "activation-bytes": plan.activation_bytes,
        "logits-bytes": plan.logits_bytes,
        "lora-bytes": plan.lora_bytes,
    }


def run(quick: bool, steps: int, threads: int) -> dict[str, Any]:
    """Measure the floor, then each configuration, each in a fresh process."""
    from flower_llm.embedded import embedded_model_dir

    model_dir = embedded_model_dir() if quick else common.mid_model_dir()
    floor = run_child("imports", None, model_dir, steps, threads)
    configs = {
        label: run_child(label, quant, model_dir, steps, threads)
        for label, quant in CONFIGS.items()
    }
    for label, report in configs.items():
        report["hwm-over-floor"] = report["hwm-after-round"] - floor["hwm-after-imports"]
        report["planner"] = planner_estimate(model_dir, CONFIGS[label])
    nf4, bf16 = configs["nf4"], configs["bf16"]
    peak_ratio = nf4["hwm-after-round"] / bf16["hwm-after-round"]
    over_ratio = nf4["hwm-over-floor"] / bf16["hwm-over-floor"]
    tensor_ratio = nf4["base-tensor-bytes"] / bf16["base-tensor-bytes"]
    heads = [
        common.headline(
            f"client peak RSS, NF4 / bf16 base ({bf16['model-params'] / 1e6:.0f}M-param model)",
            f"{common.mib(nf4['hwm-after-round'])} / {common.mib(bf16['hwm-after-round'])} MiB "
            f"= {peak_ratio:.2f}x ({over_ratio:.2f}x above the "
            f"{common.mib(floor['hwm-after-imports'])} MiB import floor)",
        ),
        common.headline(
            "client base tensor bytes, NF4 / bf16",
            f"{common.mib(nf4['base-tensor-bytes'])} / {common.mib(bf16['base-tensor-bytes'])} "
            f"MiB = {tensor_ratio:.2f}x",
        ),
        common.headline(
            "client resident set after loading, NF4 / bf16",
            f"{common.mib(nf4['rss-after-load'])} / {common.mib(bf16['rss-after-load'])} MiB = "
            f"{nf4['rss-after-load'] / bf16['rss-after-load']:.2f}x",
        ),
    ]
    return {
        "model-dir": str(model_dir),
        "model": "embedded tiny Llama" if quick else f"Llama {common.MID_MODEL_DIMS}",
        "steps": steps,
        "floor": floor,
        "configs": configs,
        "ratio-peak-nf4-vs-bf16": peak_ratio,
        "ratio-peak-over-floor-nf4-vs-bf16": over_ratio,
        "ratio-tensor-bytes-nf4-vs-bf16": tensor_ratio,
        "headlines": heads,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """One row per configuration."""
    floor = result["floor"]["hwm-after-imports"]
    text = (
        f"One client round ({result['steps']} local steps, batch 8, the embedded data) of "
        f"{result['model']}, "
        f"{next(iter(result['configs'].values()))['model-params']:,} parameters; each row a "
        f"fresh process. Import floor (Python + torch + transformers + peft + bitsandbytes + "
        f"flwr, no model): {common.mib(floor)} MiB. MiB throughout.\n\n"
    )
    text += common.table(
        [
            "base",
            "base tensor bytes",
            "peak after load",
            "RSS after load",
            "peak after round",
            "peak above floor",
            "RSS after round",
        ],
        [
            [
                label,
                common.mib(c["base-tensor-bytes"]),
                common.mib(c["hwm-after-load"]),
                common.mib(c["rss-after-load"]),
                f"**{common.mib(c['hwm-after-round'])}**",
                common.mib(c["hwm-over-floor"]),
                common.mib(c["rss-after-round"]),
            ]
            for label, c in result["configs"].items()
        ],
    )
    text += (
        "\nFor comparison, what the project's (GPU) memory planner "
        "`flower_llm.plan.estimate_memory` expects of one training step (an upper bound: "
        "every example 128 tokens). The k-bit path keeps activations in fp32 "
        "(`prepare_model_for_kbit_training` upcasts norms and embeddings), the bf16 path in "
        "bf16:\n\n"
    )
    text += common.table(
        ["base", "weights", "activations", "logits", "LoRA + AdamW", "sum"],
        [
            [
                label,
                common.mib(c["planner"]["weight-bytes"]),
                common.mib(c["planner"]["activation-bytes"]),
                common.mib(c["planner"]["logits-bytes"]),
                common.mib(c["planner"]["lora-bytes"]),
                common.mib(sum(c["planner"].values())),
            ]
            for label, c in result["configs"].items()
        ],
    )
    configs = result["configs"]
    expected = sum(configs["nf4"]["planner"].values()) - sum(configs["bf16"]["planner"].values())
    measured = configs["nf4"]["hwm-after-round"] - configs["bf16"]["hwm-after-round"]
    text += (
        f"\nPlanner: NF4 minus bf16 = {common.mib(expected)} MiB; measured peak RSS: NF4 "
        f"minus bf16 = {common.mib(measured)} MiB. "
    )
    text += (
        f"\nNF4 / bf16: peak {result['ratio-peak-nf4-vs-bf16']:.2f}x, peak above the floor "
        f"{result['ratio-peak-over-floor-nf4-vs-bf16']:.2f}x, base tensor bytes "
        f"{result['ratio-tensor-bytes-nf4-vs-bf16']:.2f}x. On a CPU, resident memory also "
        "holds what the allocator keeps after loading (`from_pretrained` materialises each "
        "bf16 weight before bitsandbytes quantizes it) and bitsandbytes' CPU kernels' "
        "temporaries; GPU memory (VRAM) is measured by `gpu_qlora`.\n"
    )
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run, print and save (or, with ``--child``, measure one configuration)."""
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="Local steps of the round.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.setup(args.threads)
    steps = args.steps or (1 if args.quick else 2)
    if args.child:
        quant = None if args.child == "imports-only" else args.child
        print(json.dumps(child(quant, args.model_dir, steps)))
        return None
    return common.run_and_finish(
        "client_memory", args, lambda: run(args.quick, steps, args.threads), to_markdown
    )


if __name__ == "__main__":
    main()
