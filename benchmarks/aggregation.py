"""Server aggregation time per round: our WeightedFedAvg vs Flower's FedAvg, same replies.

Both strategies get the same reply ``Message``s (adapter ``ArrayRecord`` + a
``num-examples`` metric) at 10, 100 and 1000 clients with a 1M-parameter adapter, and 10,
50 and 100 clients with a 10M one (1000 x 10M float32 replies would be 40 GB of messages:
too much for a 24 GiB machine). Timings
are interleaved (ours, Flower's, ours, ...). Reported: the ratio ours / Flower's (target
<= 1.0x), the per-client slope of a least-squares line through the times (target: linear
in clients), and where our time goes, phase by phase and by profile.

The adapter layout mimics a real one: ``layers x 7 linears x (lora_A (8, h), lora_B (h, 8))``.

Ours reads each reply's arrays in place (``flower_llm.wire.array_views``: no ``.npy``
header parse, no copy), accumulates in float64 without per-client temporaries
(``flower_llm.aggregation.weighted_average``) and checks NaN/Inf once, on the aggregate
(``strategies.fedavg.WeightedFedAvg.aggregate_train``). Both results are compared.

    python -m benchmarks.aggregation [--quick]
"""

from __future__ import annotations

import cProfile
import gc
import logging
import pstats
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

LORA_RANK = 8
MODULES_PER_LAYER = 7  # q, k, v, o, gate, up, down: all-linear on a Llama block

# (adapter parameters, layers, client counts). 10M stops at 100 clients: memory (see above).
FULL_SIZES: list[tuple[int, int, list[int]]] = [
    (1_000_000, 16, [10, 100, 1000]),
    (10_000_000, 32, [10, 50, 100]),
]
QUICK_SIZES: list[tuple[int, int, list[int]]] = [(20_000, 2, [4, 8, 16])]
PROFILE_AT = {"full": (1_000_000, 100), "quick": (20_000, 8)}
"""(parameters, clients) of the configuration broken down into phases and profiled."""


# --------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------


def adapter_shapes(num_params: int, layers: int) -> dict[str, tuple[int, int]]:
    """A Llama-like LoRA layout of about ``num_params`` values."""
    width = max(1, round(num_params / (layers * MODULES_PER_LAYER * 2 * LORA_RANK)))
    shapes = {}
    for layer in range(layers):
        for module in range(MODULES_PER_LAYER):
            prefix = f"base_model.model.model.layers.{layer}.m{module}"
            shapes[f"{prefix}.lora_A.weight"] = (LORA_RANK, width)
            shapes[f"{prefix}.lora_B.weight"] = (width, LORA_RANK)
    return shapes


def task_identity() -> None:
    """Messages are stamped with a run and node: set them as a ServerApp process would."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def make_replies(
    shapes: Mapping[str, tuple[int, ...]],
    num_clients: int,
    *,
    distinct: bool = False,
    packed: bool = False,
) -> list[Any]:
    """Train replies of ``num_clients`` nodes: float32 adapters with unequal example counts.

    ``packed``: in the packed wire layout (the same values). Values differ per client by a
    constant offset (cheap to make; a weighted sum's cost
    does not depend on the values), or with ``distinct`` by independent noise as well, so
    that the replies' order differs from value to value as real updates' does (what a
    per-value median or trimmed mean costs depends on it: presorted columns sort fast).
    """
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from flower_llm import wire

    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}
    replies = []
    for node in range(1, num_clients + 1):
        offset = np.float32(node * 1e-4)
        arrays = ArrayRecord(
            {
                k: Array(
                    v + offset + rng.standard_normal(v.shape, dtype=np.float32) * 1e-3
                    if distinct
                    else v + offset
                )
                for k, v in base.items()
            }
        )
        metrics = MetricRecord(
            {wire.NUM_EXAMPLES: 100 + 10 * (node % 7), wire.TRAIN_LOSS: 1.0 + node % 3}
        )
        instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics})
        if packed:  # fed.wire-layout = packed, the run's default
            content = wire.pack(content)
        replies.append(Message(content, reply_to=instruction))
    return replies


# --------------------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------------------


def ours_factory(shapes: Mapping[str, tuple[int, ...]], num_clients: int) -> Any:
    """Our strategy as ``configure_train`` leaves it: reference adapter and sampled nodes."""
    from strategies.fedavg import RoundReport, WeightedFedAvg

    strategy = WeightedFedAvg(min_train_clients=1)
    strategy.reference = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

    def aggregate(replies: list[Any]) -> Any:
        strategy.report = RoundReport(sampled=list(range(1, num_clients + 1)))
        arrays, _ = strategy.aggregate_train(1, replies)
        strategy.last_valid = []  # as the next round would: free the decoded replies
        return arrays

    return aggregate


def flower_factory() -> Any:
    """Flower's built-in FedAvg, weighting by ``num-examples``."""
    from flwr.serverapp.strategy import FedAvg

    strategy = FedAvg()

    def aggregate(replies: list[Any]) -> Any:
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays

    return aggregate


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two ``ArrayRecord``s of the same keys."""
    return max(float(np.max(np.abs(a[k].numpy() - b[k].numpy()))) for k in a)


def phases_of_ours(replies: list[Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Seconds of each step ``WeightedFedAvg.aggregate_train`` takes, run one by one."""
    from flower_llm import wire
    from flower_llm.aggregation import non_finite_key, update_problem, weighted_average

    reference = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    out: dict[str, float] = {}
    start = time.perf_counter()
    states = [wire.array_views(r.content[wire.ARRAYS]) for r in replies]
    weights = [float(r.content[wire.METRICS][wire.NUM_EXAMPLES]) for r in replies]
    out["read every reply in place (wire.array_views)"] = time.perf_counter() - start
    start = time.perf_counter()
    for state, weight in zip(states, weights, strict=True):
        update_problem(state, reference, weight, check_finite=False)
    out["validate keys, shapes, dtypes, weight (update_problem)"] = time.perf_counter() - start
    start = time.perf_counter()
    average = weighted_average(states, weights)
    out["weighted_average (float64, one scratch buffer)"] = time.perf_counter() - start
    start = time.perf_counter()
    non_finite_key(average)
    out["NaN/Inf check of the aggregate"] = time.perf_counter() - start
    start = time.perf_counter()
    wire.to_array_record(average)
    out["pack result (to_array_record)"] = time.perf_counter() - start
    return out


def profile_ours(replies: list[Any], shapes: Mapping[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """The functions our ``aggregate_train`` spends most time in (cProfile, tottime)."""
    aggregate = ours_factory(shapes, len(replies))
    profiler = cProfile.Profile()
    profiler.enable()
    aggregate(replies)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "calls": ncalls,
                "tottime": round(tottime, 4),
                "cumtime": round(cumtime, 4),
            }
        )
    return sorted(rows, key=lambda r: -r["tottime"])[:12]


def slope(clients: Sequence[int], seconds: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``seconds = a + b * clients``: (a, b, r^2)."""
    x, y = np.asarray(clients, float), np.asarray(seconds, float)
    b, a = np.polyfit(x, y, 1)
    fit = a + b * x
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - fit) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return float(a), float(b), r2


LINEAR_TOLERANCE = 1.5
"""Time per client may grow this much from the middle to the largest client count and
still count as linear: on a shared machine, load alone moves a timing by tens of percent.
The smallest count is left out, where fixed costs (packing the result) dominate."""


def per_client_growth(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``(t(n_max) / n_max) / (t(n_mid) / n_mid)`` per adapter size and contender."""
    growth: dict[str, dict[str, float]] = {}
    for params in sorted({r["params"] for r in rows}):
        subset = sorted((r for r in rows if r["params"] == params), key=lambda r: r["clients"])
        mid, top = subset[-2], subset[-1]
        growth[str(params)] = {
            name: (top["seconds"][name] / top["clients"]) / (mid["seconds"][name] / mid["clients"])
            for name in top["seconds"]
        }
    return growth


def run(quick: bool) -> dict[str, Any]:
    """Time every (size, clients) configuration; break down and profile one of them."""
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)  # FedAvg logs every round at INFO
    task_identity()
    sizes = QUICK_SIZES if quick else FULL_SIZES
    profile_at = PROFILE_AT["quick" if quick else "full"]
    rows: list[dict[str, Any]] = []
    phases: dict[str, float] = {}
    profile: list[dict[str, Any]] = []
    for num_params, layers, client_counts in sizes:
        shapes = adapter_shapes(num_params, layers)
        actual = sum(int(np.prod(s)) for s in shapes.values())
        for num_clients in client_counts:
            replies = make_replies(shapes, num_clients)
            contenders = {
                "ours": ours_factory(shapes, num_clients),
                "flower": flower_factory(),
            }
            values = actual * num_clients
            # Big configurations take tens of seconds a call on a loaded 2-core machine:
            # two interleaved passes, no warm-up (their first-call costs are amortised).
            small = values <= 2e8
            repeats = 5 if values <= 2e7 else 3 if small else 2
            results = {name: fn(replies) for name, fn in contenders.items()} if small else {}
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(repeats):
                for name, fn in contenders.items():
                    start = time.perf_counter()
                    output = fn(replies)
                    times[name].append(time.perf_counter() - start)
                    results.setdefault(name, output)
            if (num_params, num_clients) == profile_at:
                phases = phases_of_ours(replies, shapes)
                profile = profile_ours(replies, shapes)
            # The best of the repeats: one burst of load on this shared machine can double
            # a single call, and with 2-3 repeats a median would still carry it.
            med = {name: min(t) for name, t in times.items()}
            rows.append(
                {
                    "params": actual,
                    "arrays": len(shapes),
                    "clients": num_clients,
                    "repeats": repeats,
                    "seconds": med,
                    "all-seconds": times,
                    "ratio-ours-vs-flower": med["ours"] / med["flower"],
                    "max-abs-diff-vs-flower": max_abs_diff(results["ours"], results["flower"]),
                }
            )
            print(
                f"{actual:>11,} params x {num_clients:>4} clients: "
                + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()),
                flush=True,
            )
            del replies, results, contenders
            gc.collect()

    fits: dict[str, dict[str, Any]] = {}
    for num_params, layers, _ in sizes:
        actual = sum(int(np.prod(s)) for s in adapter_shapes(num_params, layers).values())
        subset = [r for r in rows if r["params"] == actual]
        fits[str(actual)] = {}
        for name in ("ours", "flower"):
            a, b, r2 = slope([r["clients"] for r in subset], [r["seconds"][name] for r in subset])
            fits[str(actual)][name] = {
                "intercept-s": a,
                "seconds-per-client": b,
                "ns-per-value": b / actual * 1e9,
                "r2": r2,
            }
    worst = max(r["ratio-ours-vs-flower"] for r in rows)
    best = min(r["ratio-ours-vs-flower"] for r in rows)
    growth = per_client_growth(rows)
    linear = all(g <= LINEAR_TOLERANCE for by_name in growth.values() for g in by_name.values())
    heads = [
        common.headline(
            "aggregation: ours / Flower FedAvg (best..worst over configurations)",
            f"{best:.2f}x .. {worst:.2f}x",
            "<= 1.0x",
            worst <= 1.0,
        ),
        common.headline(
            "aggregation: linear in clients (time per client, largest / middle client count)",
            ", ".join(
                f"{int(p) / 1e6:.0f}M: ours {g['ours']:.2f}, Flower {g['flower']:.2f}"
                for p, g in growth.items()
            ),
            f"linear (<= {LINEAR_TOLERANCE}x)",
            linear,
        ),
        common.headline(
            "aggregation: per-client slope, ours / Flower",
            ", ".join(
                f"{int(p) / 1e6:.0f}M: {f['ours']['seconds-per-client'] * 1e3:.1f} / "
                f"{f['flower']['seconds-per-client'] * 1e3:.1f} ms"
                for p, f in fits.items()
            ),
        ),
    ]
    return {
        "rows": rows,
        "fits": fits,
        "per-client-growth": growth,
        "profiled-at": {"params": profile_at[0], "clients": profile_at[1]},
        "phases-of-ours": phases,
        "profile-of-ours": profile,
        "memory-note": (
            "10M-parameter adapters stop at 100 clients: 1000 float32 replies would be 40 GB "
            "of messages (our strategy reads them in place and adds no copy of its own)."
        ),
        "headlines": heads,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """Timing table, fits, phases and profile."""
    text = (
        "Best (minimum) seconds of `aggregate_train` over interleaved repeats on the same "
        "replies (all repeats are in the JSON). " + result["memory-note"] + "\n\n"
    )
    text += common.table(
        [
            "adapter params",
            "arrays",
            "clients",
            "ours (WeightedFedAvg)",
            "Flower FedAvg",
            "ours / Flower",
            "max abs diff vs Flower",
        ],
        [
            [
                f"{r['params']:,}",
                r["arrays"],
                r["clients"],
                f"{r['seconds']['ours']:.3f}",
                f"{r['seconds']['flower']:.3f}",
                f"**{r['ratio-ours-vs-flower']:.2f}x**",
                f"{r['max-abs-diff-vs-flower']:.1e}",
            ]
            for r in result["rows"]
        ],
    )
    text += "\nLeast-squares fit `seconds = a + b * clients` per adapter size:\n\n"
    text += common.table(
        ["adapter params", "contender", "b: ms per client", "ns per value", "a: s", "r^2"],
        [
            [
                f"{int(p):,}",
                name,
                f"{f['seconds-per-client'] * 1e3:.2f}",
                f"{f['ns-per-value']:.2f}",
                f"{f['intercept-s']:.3f}",
                f"{f['r2']:.4f}",
            ]
            for p, fits in result["fits"].items()
            for name, f in fits.items()
        ],
    )
    text += (
        "\nTime per client at the largest client count / at the middle one (1.0 = exactly "
        f"linear; counted linear up to {LINEAR_TOLERANCE}x): "
        + "; ".join(
            f"{int(p):,} params: " + ", ".join(f"{name} {g:.2f}" for name, g in by_name.items())
            for p, by_name in result["per-client-growth"].items()
        )
        + ".\n"
    )
    at = result["profiled-at"]
    total = sum(result["phases-of-ours"].values())
    text += (
        f"\nWhere our time goes at {at['params']:,} params x {at['clients']} clients "
        "(each phase of `WeightedFedAvg.aggregate_train` run on its own):\n\n"
    )
    text += common.table(
        ["phase", "seconds", "share"],
        [[k, f"{v:.3f}", f"{v / total:.0%}"] for k, v in result["phases-of-ours"].items()],
    )
    text += "\nTop functions by own time (cProfile):\n\n"
    text += common.table(
        ["function", "calls", "tottime s", "cumtime s"],
        [
            [p["function"], p["calls"], p["tottime"], p["cumtime"]]
            for p in result["profile-of-ours"]
        ],
    )
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, print and save."""
    args = common.parser(__doc__).parse_args(argv)
    common.setup(args.threads)
    return common.run_and_finish("aggregation", args, lambda: run(args.quick), to_markdown)


if __name__ == "__main__":
    main()
