"""Compressed updates: held-out loss and bytes of float32, float16, int8 and nf4 runs.

The embedded non-IID federation (by-field partition: each site holds mostly one domain),
3 sites, 5 rounds, the tiny model, run through the project's own ServerApp engine
(``server_apps.fedavg.run``) and ClientApp (``client_apps.qlora.app``) in one process: the
messages are real Flower records, only the transport is left out. For every format, with
and without error feedback, and with ``lora.aggregation = ffa``:

- the pooled held-out loss after every round (round 0: the untrained adapter);
- the bytes the server sent and received over the run (train and evaluation exchanges);
- the time spent encoding and decoding, as a fraction of the sites' training time.

Targets (issue 13): int8 within 0.5 % and nf4 within 1 % of float32's final held-out loss;
at least 4x (int8) and 7x (nf4) fewer bytes than float32, 16x with nf4 + ffa; codec time
under 2 % of training time.

    python -m benchmarks.compression [--quick] [--out DIR] [--threads 1] [--model mid]

``--model mid`` runs float32, int8, nf4 and nf4 + ffa on the ~77M benchmark model
(:func:`benchmarks.common.mid_model_dir`, random weights, the embedded tokenizer) instead,
about 6 minutes a run, 24 in all on a quiet 2-core machine (29 measured
under load); its result is ``compression-mid``. It is not part
of ``run_all`` (whose whole run must stay under 15 minutes).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.sites import AppGrid

SITES = 3

RUNS: dict[str, dict[str, Any]] = {
    "float32": {"fed.wire-dtype": "float32"},
    "float16": {"fed.wire-dtype": "float16"},
    "bfloat16": {"fed.wire-dtype": "bfloat16"},
    "int8": {"fed.wire-dtype": "int8"},
    "int8, no EF": {"fed.wire-dtype": "int8", "fed.error-feedback": False},
    "nf4": {"fed.wire-dtype": "nf4"},
    "nf4, no EF": {"fed.wire-dtype": "nf4", "fed.error-feedback": False},
    "float32 + ffa": {"fed.wire-dtype": "float32", "lora.aggregation": "ffa"},
    "nf4 + ffa": {"fed.wire-dtype": "nf4", "lora.aggregation": "ffa"},
}


MID_RUNS: dict[str, dict[str, Any]] = {
    name: RUNS[name] for name in ("float32", "int8", "nf4", "nf4 + ffa")
}
#: ``--model mid``: rounds and local steps (``--quick``: 1 and 1).
MID_ROUNDS, MID_STEPS = 5, 6


class Timer:
    """Total seconds spent in the wrapped functions."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def instrument() -> tuple[Timer, Timer]:
    """Time every encode and decode of a compressed message, and every local training."""
    import strategies.fedavg
    from flower_llm import client, compression, updates

    codec, train = Timer(), Timer()
    encode, decode = codec.wrap(compression.encode), codec.wrap(compression.decode)
    for module in (compression, updates, strategies.fedavg):
        if hasattr(module, "encode"):
            module.encode = encode  # type: ignore[attr-defined]
        if hasattr(module, "decode"):
            module.decode = decode  # type: ignore[attr-defined]
    client.ClientSession.train = train.wrap(client.ClientSession.train)  # type: ignore[method-assign]
    return codec, train


def one_run(
    name: str,
    settings: dict[str, Any],
    rounds: int,
    steps: int,
    root: Path,
    codec: Timer,
    train: Timer,
    model: str = "embedded",
) -> dict[str, Any]:
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from flower_llm.config import parse_run_config
    from server_apps.fedavg import run

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # type: ignore[misc]
    slug = name.replace(" ", "").replace(",", "-").replace("+", "-")
    cfg = {
        "model.name": model,
        "fed.num-rounds": rounds,
        "fed.min-available-clients": SITES,
        "train.local-steps": steps,
        "output.local-only-baseline": False,
        "output.dir": str(root / "runs"),
        "output.run-name": slug,
        **settings,
    }
    codec.seconds = train.seconds = 0.0
    started = time.perf_counter()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    grid = AppGrid(cfg, root / "sites" / slug, SITES)
    run(grid, context, parse_run_config(cfg))  # type: ignore[arg-type]
    summary = json.loads((root / "runs" / slug / "summary.json").read_text())
    return {
        "settings": settings,
        "initial-loss": summary["initial-eval-loss"],
        "loss-by-round": summary["eval-loss-by-round"],
        "final-loss": summary["eval-loss-by-round"][-1],
        "bytes-up": summary["bytes-up"],
        "bytes-down": summary["bytes-down"] + summary["bytes-down-eval"],
        "bytes-total": summary["bytes-up"] + summary["bytes-down"] + summary["bytes-down-eval"],
        "codec-seconds": codec.seconds,
        "train-seconds": train.seconds,
        "seconds": time.perf_counter() - started,
    }


def run_all(quick: bool, model: str = "tiny") -> dict[str, Any]:
    """Every configuration of :data:`RUNS` (``model = "mid"``: :data:`MID_RUNS` on the
    ~77M model); ratios against float32."""
    if model == "mid":
        configurations, model_name = MID_RUNS, str(common.mid_model_dir())
        rounds, steps = (1, 1) if quick else (MID_ROUNDS, MID_STEPS)
    else:
        configurations, model_name = RUNS, "embedded"
        rounds, steps = (2, 2) if quick else (5, 5)
    codec, train = instrument()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in configurations.items():
            print(f"--- {name}", flush=True)
            runs[name] = one_run(name, settings, rounds, steps, Path(tmp), codec, train, model_name)
    base = runs["float32"]
    for result in runs.values():
        result["loss-vs-float32"] = result["final-loss"] / base["final-loss"] - 1
        result["bytes-reduction"] = base["bytes-total"] / result["bytes-total"]
        result["up-reduction"] = base["bytes-up"] / result["bytes-up"]
        result["codec-fraction"] = result["codec-seconds"] / max(result["train-seconds"], 1e-9)
    int8, nf4, ffa = runs["int8"], runs["nf4"], runs["nf4 + ffa"]
    codec_worst = max(runs[n]["codec-fraction"] for n in runs if "int8" in n or "nf4" in n)
    return {
        "model": model,
        "sites": SITES,
        "rounds": rounds,
        "local-steps": steps,
        "runs": runs,
        "headlines": [
            common.headline(
                "int8 final held-out loss vs float32",
                f"{int8['loss-vs-float32']:+.2%}",
                "within 0.5 %",
                abs(int8["loss-vs-float32"]) <= 0.005,
            ),
            common.headline(
                "nf4 final held-out loss vs float32",
                f"{nf4['loss-vs-float32']:+.2%}",
                "within 1 %",
                abs(nf4["loss-vs-float32"]) <= 0.01,
            ),
            common.headline(
                "int8 bytes reduction (run total)",
                f"{int8['bytes-reduction']:.2f}x",
                ">= 4x",
                int8["bytes-reduction"] >= 4,
            ),
            common.headline(
                "nf4 bytes reduction (run total)",
                f"{nf4['bytes-reduction']:.2f}x",
                ">= 7x",
                nf4["bytes-reduction"] >= 7,
            ),
            common.headline(
                "nf4 + ffa bytes reduction (run total)",
                f"{ffa['bytes-reduction']:.2f}x",
                ">= 16x",
                ffa["bytes-reduction"] >= 16,
            ),
            common.headline(
                "encode + decode time / training time (worst int8/nf4 run)",
                f"{codec_worst:.2%}",
                "< 2 %",
                codec_worst < 0.02,
            ),
        ],
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The per-run table and the loss curves."""
    runs = result["runs"]
    rows = []
    for name, r in runs.items():
        rows.append(
            [
                name,
                f"{r['final-loss']:.4f}",
                f"{r['loss-vs-float32']:+.2%}",
                common.human_bytes(r["bytes-up"]),
                common.human_bytes(r["bytes-down"]),
                f"{r['bytes-reduction']:.2f}x",
                f"{r['up-reduction']:.2f}x",
                f"{r['codec-fraction']:.2%}",
            ]
        )
    header = [
        "format",
        "final loss",
        "vs float32",
        "bytes up",
        "bytes down (train + eval)",
        "total reduction",
        "up reduction",
        "codec / train time",
    ]
    curves = [
        [name, f"{r['initial-loss']:.3f}", *(f"{x:.3f}" for x in r["loss-by-round"])]
        for name, r in runs.items()
    ]
    rounds = len(next(iter(runs.values()))["loss-by-round"])
    model = "the ~77M model" if result.get("model") == "mid" else "tiny model"
    return (
        f"{result['sites']} sites of the embedded non-IID federation, {result['rounds']} "
        f"rounds x {result['local-steps']} local steps, {model}, in-process through the "
        "project's ServerApp engine and ClientApp.\n\n"
        + common.table(header, rows)
        + "\n\nHeld-out loss by round (round 0: untrained adapter):\n\n"
        + common.table(["format", "0", *(str(i + 1) for i in range(rounds))], curves)
    )


def main() -> None:
    """Run, print and save."""
    parser = common.parser(__doc__)
    parser.add_argument(
        "--model",
        choices=("tiny", "mid"),
        default="tiny",
        help="tiny (default; part of run_all) or mid (the ~77M model, about 25 minutes)",
    )
    args: argparse.Namespace = parser.parse_args()
    common.setup(args.threads)
    name = "compression" if args.model == "tiny" else "compression-mid"
    common.run_and_finish(name, args, lambda: run_all(args.quick, args.model), to_markdown)


if __name__ == "__main__":
    main()
