"""Per-round cost of reloading the base model every round vs keeping it loaded.

Flower's FlowerTune LLM template builds the (quantized) model inside the ``@app.train``
handler, so every round loads it again; ``flower_llm.client.SessionCache`` keeps one
``ClientSession`` per process. Round variants, each ending with the same training
(``ClientSession.train``, adapter in and out through ``flower_llm.wire``):

- **cached**: ``SessionCache.get`` hits; the round is training alone (the reference).
- **reload model**: ``load_base_model`` + ``apply_lora`` first, data kept.
- **new session** (full mode, tiny model): a new ``ClientSession``: model, LoRA and the
  site's data pipeline (FlowerTune re-formats its data every round too).
- **new process** (full mode, tiny model): what a deployed SuperNode does, one ClientApp
  process per message: Python starts, imports the stack, loads, trains.

Rounds are interleaved (cached, reload, new session, cached, ...). Reported: each
variant's median round time / the cached round's.

    python -m benchmarks.reload_overhead [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

SERVER_ROUND = 1


def _round(session: Any, incoming: Any) -> None:
    """One round on ``session``, as the ClientApp runs it."""
    from flower_llm import wire

    cfg = session.cfg
    state, _ = session.train(
        wire.from_array_record(incoming), SERVER_ROUND, cfg.train.learning_rate
    )
    wire.to_array_record(state, cfg.fed.wire_dtype)


def child(model_name: str, steps: int) -> dict[str, Any]:
    """A whole ClientApp process for one round (``--child``): imports, load, train."""
    from flower_llm import wire
    from flower_llm.adapters import adapter_state
    from flower_llm.client import SessionCache, SiteIdentity
    from flower_llm.config import parse_run_config

    cfg = parse_run_config({"model.name": model_name, "train.local-steps": steps})
    session = SessionCache().get(cfg, SiteIdentity(None, 0, 1))
    _round(session, wire.to_array_record(adapter_state(session.model)))
    return {"ok": True}


def new_process_round(model_name: str, steps: int, threads: int) -> float:
    """Wall seconds of a fresh Python process running one round."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.reload_overhead",
        "--child",
        model_name,
        "--steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not json.loads(proc.stdout.strip().splitlines()[-1])["ok"]:
        raise RuntimeError(f"child round failed:\n{proc.stderr[-3000:]}")
    return seconds


def measure(
    model_name: str, steps: int, repeats: int, all_variants: bool, threads: int
) -> dict[str, Any]:
    """Interleaved rounds of every variant on one model."""
    from flower_llm import wire
    from flower_llm.adapters import adapter_state, apply_lora
    from flower_llm.client import ClientSession, SessionCache, SiteIdentity
    from flower_llm.config import parse_run_config
    from flower_llm.models import load_base_model

    cfg = parse_run_config({"model.name": model_name, "train.local-steps": steps})
    site = SiteIdentity(None, 0, 1)
    cache = SessionCache()
    cached = cache.get(cfg, site)
    incoming = wire.to_array_record(adapter_state(cached.model))
    reloading = ClientSession(cfg, site)

    def cached_round() -> None:
        _round(cache.get(cfg, site), incoming)

    def reload_model_round() -> None:
        # As FlowerTune's train handler: a freshly loaded base under the same session
        # (its data stays), so the training code is exactly the cached variant's.
        reloading.base = load_base_model(cfg.model)
        reloading.model = apply_lora(reloading.base.model, cfg.lora, reloading.base.name_or_path)
        _round(reloading, incoming)

    def new_session_round() -> None:
        _round(ClientSession(cfg, site), incoming)

    variants: dict[str, Callable[[], object]] = {
        "cached": cached_round,
        "reload model": reload_model_round,
    }
    if all_variants:
        variants["new session"] = new_session_round
        variants["new process"] = lambda: new_process_round(model_name, steps, threads)
    cached_round()  # warm-up
    times = common.interleaved(variants, repeats)
    med = {k: common.median(v) for k, v in times.items()}
    return {
        "model": model_name,
        "params": common.logical_params(cached.base.model),
        "quantization": cfg.model.quantization,
        "steps": steps,
        "repeats": repeats,
        "seconds": med,
        "all-seconds": times,
        "ratio-vs-cached": {k: v / med["cached"] for k, v in med.items()},
        "reload-seconds-per-round": med["reload model"] - med["cached"],
    }


def run(quick: bool, threads: int) -> dict[str, Any]:
    """The embedded default model and (full mode) the ~77M model."""
    if quick:
        models = [("embedded", 2, 1, False)]
    else:
        # The ~77M model runs the reference and the reload only: a new session adds the
        # data pipeline and a new process the imports, both measured on the tiny model,
        # and each more 77M load costs a minute of run_all's 15-minute budget.
        models = [("embedded", 20, 3, True), (str(common.mid_model_dir()), 2, 2, False)]
    rows = [measure(name, steps, reps, proc, threads) for name, steps, reps, proc in models]
    heads = [
        common.headline(
            "round time, reloading the base every round (FlowerTune) / cached (SessionCache)",
            ", ".join(
                f"{r['params'] / 1e6:.1f}M x {r['steps']} steps: "
                f"{r['ratio-vs-cached']['reload model']:.2f}x"
                + (
                    f" (new process {r['ratio-vs-cached']['new process']:.2f}x)"
                    if "new process" in r["ratio-vs-cached"]
                    else ""
                )
                for r in rows
            ),
        )
    ]
    return {"rows": rows, "headlines": heads}


def to_markdown(result: dict[str, Any]) -> str:
    """One row per (model, variant)."""
    rows = []
    for r in result["rows"]:
        for variant, seconds in r["seconds"].items():
            ratio = r["ratio-vs-cached"][variant]
            rows.append(
                [
                    f"{r['params']:,} ({r['quantization']})",
                    r["steps"],
                    variant,
                    f"{seconds:.2f}",
                    "1 (reference)" if variant == "cached" else f"**{ratio:.2f}x**",
                ]
            )
    text = "Median seconds per client round (interleaved repeats):\n\n"
    text += common.table(["model params", "local steps", "round", "median s", "/ cached"], rows)
    text += (
        "\nThe reload costs a fixed time per round, so its share falls with more local "
        "steps and grows with the model: at 7B, loading and quantizing takes minutes.\n"
    )
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run, print and save (or, with ``--child MODEL``, run one round in this process)."""
    import argparse

    p = common.parser(__doc__)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.setup(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return None
    return common.run_and_finish(
        "reload_overhead", args, lambda: run(args.quick, args.threads), to_markdown
    )


if __name__ == "__main__":
    main()
