"""What every benchmark shares: the machine record, result files, timing and memory helpers.

Each benchmark module has ``run(quick) -> dict``, ``to_markdown(result) -> str`` and
``main(argv)``; :func:`finish` stamps the result with the machine it ran on and writes
``<name>.json`` and ``<name>.md`` under ``benchmarks/results/`` (or ``--out``).

The machines this project runs on are shared and noisy (2 cores, other jobs running), so
no figure is an absolute time on its own: each one is a ratio against a reference measured
in the same process, in interleaved repeats (A B A B ...), so that a burst of load hits
both sides alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

Headline = dict[str, Any]
"""One row of the combined table: ``figure``, ``value``, ``target``, ``met``."""


# --------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------


def _proc_field(path: str, name: str) -> str | None:
    """First ``name: value`` line of a /proc file, or None off Linux."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        return None
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, date and load: what a figure depends on."""
    import numpy
    import peft
    import torch
    import transformers

    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu-model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu-flags-bf16": "avx512_bf16" in (_proc_field("/proc/cpuinfo", "flags") or ""),
        "cores": os.cpu_count(),
        "cores-usable": affinity,
        "ram-gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "torch-threads": torch.get_num_threads(),
        "load-average-1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": _dist_version("flwr"),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": _dist_version("bitsandbytes"),
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_line(machine: dict[str, Any]) -> str:
    """The machine in one markdown line."""
    return (
        f"{machine['date']} | {machine['cpu-model']} | {machine['cores']} cores "
        f"({machine['torch-threads']} torch thread(s)) | {machine['ram-gib']} GiB RAM | "
        f"load {machine['load-average-1min']} | torch {machine['torch']}, "
        f"flwr {machine['flwr']}, transformers {machine['transformers']}, "
        f"peft {machine['peft']}, bitsandbytes {machine['bitsandbytes']}"
        + (f" | GPU {machine['cuda']}" if machine.get("cuda") else "")
    )


# --------------------------------------------------------------------------------------
# Command line and result files
# --------------------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--out`` and ``--threads``."""
    first_line = (doc or "").strip().splitlines()[0] if doc else ""
    p = argparse.ArgumentParser(
        description=first_line, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="Tiny sizes, a few seconds: for the smoke test."
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="Directory for the JSON and table (default benchmarks/results, or "
        "benchmarks/results/quick with --quick).",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, OpenMP "
        "threads spin-waiting on a busy core made tiny-model steps ~40x slower).",
    )
    return p


def resolve_out(out: Path, quick: bool) -> Path:
    """Where results go: ``--quick`` runs never overwrite the full results in RESULTS."""
    if quick and Path(out).resolve() == RESULTS.resolve():
        return RESULTS / "quick"
    return Path(out)


def setup(threads: int) -> None:
    """Offline hub, quiet logs, fixed thread count: the same for every benchmark."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)


def finish(
    name: str,
    result: dict[str, Any],
    markdown: str,
    out_dir: Path,
    *,
    quick: bool,
    started: float,
) -> dict[str, Any]:
    """Stamp ``result`` with the machine and runtime; write ``<name>.json`` and ``.md``."""
    machine = machine_info()
    full: dict[str, Any] = {
        "benchmark": name,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine,
        **result,
    }
    title = f"## {name}{' (quick mode)' if quick else ''}\n\n"
    header = f"Machine: {machine_line(machine)}. Ran {full['seconds']} s.\n\n"
    text = title + header + markdown.rstrip() + "\n"
    out_dir = resolve_out(out_dir, quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(full, indent=2, default=_json_default))
    (out_dir / f"{name}.md").write_text(text)
    print(text)
    return full


def run_and_finish(
    name: str,
    args: argparse.Namespace,
    run: Callable[[], dict[str, Any]],
    to_markdown: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Time ``run()``, then stamp and write its result as :func:`finish` does."""
    started = time.perf_counter()
    result = run()
    return finish(
        name, result, to_markdown(result), Path(args.out), quick=args.quick, started=started
    )


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def headline(
    figure: str, value: str, target: str | None = None, met: bool | None = None
) -> Headline:
    """A row for the combined table; ``met`` is None where the issue sets no target."""
    return {"figure": figure, "value": value, "target": target, "met": met}


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each function over ``repeats`` rounds of A, B, ... in turn.

    Interleaving puts each side under the same background load, which on a shared
    machine matters more than the number of repeats.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    """The median (a single value is its own median)."""
    return float(statistics.median(values))


def vm_hwm_bytes() -> int | None:
    """This process's resident-set high-water mark (``VmHWM``), or None off Linux."""
    value = _proc_field("/proc/self/status", "VmHWM")
    return int(value.split()[0]) * 1024 if value else None


def vm_rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set of a process now (``VmRSS``), or None if it is gone."""
    value = _proc_field(f"/proc/{pid}/status", "VmRSS")
    return int(value.split()[0]) * 1024 if value else None


def mib(num_bytes: float | None) -> str:
    """Bytes as MiB with one decimal, or n/a."""
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def human_bytes(num_bytes: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:,.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


# --------------------------------------------------------------------------------------
# A mid-sized model, built locally
# --------------------------------------------------------------------------------------

MID_MODEL_DIMS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
}
"""A Llama of ~77M parameters (every Linear a multiple of 64, as 4-bit blocks need) that
uses the embedded tokenizer, so it trains on the real data path. Big enough that weights,
not Python overhead, dominate memory and time; small enough for 2 cores."""


def mid_model_dir(cache_root: Path | None = None) -> Path:
    """Directory of the ~77M-parameter Llama (bf16 weights + embedded tokenizer), built once.

    Weights are random (seed 0): memory and speed do not depend on their values. Built
    into a staging directory and renamed, so concurrent benchmarks never see half a model.
    """
    import shutil
    import tempfile

    import torch
    from transformers import LlamaForCausalLM

    from flower_llm.embedded import build_tokenizer, default_cache_root, llama_config

    root = cache_root or default_cache_root()
    tag = "-".join(str(MID_MODEL_DIMS[k]) for k in sorted(MID_MODEL_DIMS))
    target = root / f"benchmark-llama-mid-{tag}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        tokenizer = build_tokenizer()
        config = llama_config(tokenizer, MID_MODEL_DIMS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model: Any = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def logical_params(model: Any) -> int:
    """Parameters of ``model`` as the architecture counts them.

    bitsandbytes packs two 4-bit weights per byte, so ``numel()`` of an NF4 weight is
    half its logical size; its ``quant_state.shape`` is the real one. LoRA weights (peft
    adds them to the base model in place) are left out: this is the base's size.
    """
    total = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(param, "quant_state", None)
        total += int(state.shape.numel()) if state is not None else param.numel()
    return total
