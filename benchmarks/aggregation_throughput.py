"""Server aggregation throughput against the machine's stream bandwidth, per aggregation rule.

The server must read each reply at least once. The physical limit measured in the same run
is a float32 ``acc += reply`` over arrays of one reply's size (read the reply, read and
write the accumulator), repeated for every reply. Reported per rule: reply bytes per second
of ``WeightedFedAvg.aggregate_train`` on real reply ``Message``s (validation with the
per-value update bound on, aggregation, packing the result), and that throughput as a
fraction of the stream figure.

    python -m benchmarks.aggregation_throughput [--quick]
"""

from __future__ import annotations

import os

# Thin matrices (exact aggregation): multi-threaded OpenBLAS only spin-waits on them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time
from typing import Any

import numpy as np

from benchmarks.aggregation import adapter_shapes, make_replies, task_identity
from benchmarks.common import median, parser, run_and_finish, setup, table

RULES: dict[str, dict[str, Any]] = {
    "fedavg (robust none)": {},
    "lora ffa (B only)": {"lora_aggregation": "ffa"},
    "norm-bound": {"robust": "norm-bound"},
    "trimmed-mean": {"robust": "trimmed-mean"},
    "median": {"robust": "median"},
    "lora exact (rank 8)": {"lora_aggregation": "exact", "lora_rank": 8},
}


FLOOR = "(float64 floor: cast + dgemv, no checks)"
"""Not an option: the cost of the float64 sum alone, the least any option can cost here."""


def stream_seconds(shapes: dict[str, tuple[int, int]], replies: list[Any]) -> float:
    """Seconds of ``acc += reply`` (float32) over every array of every reply, read in
    place from the messages' bytes as the server reads them."""
    from flower_llm import wire

    views = [wire.array_views(r.content.array_records[wire.ARRAYS]) for r in replies]
    acc = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    began = time.perf_counter()
    for reply in views:
        for key, values in reply.items():
            np.add(acc[key], values, out=acc[key])
    return time.perf_counter() - began


def floor_seconds(shapes: dict[str, tuple[int, int]], replies: list[Any]) -> float:
    """Seconds of the least a float64-grade weighted sum does with NumPy: per array, cast
    every reply into a float64 stack (one copy each) and one float64 matrix-vector
    product; no reference, no checks, no message handling."""
    from flower_llm import wire

    views = [wire.array_views(r.content.array_records[wire.ARRAYS]) for r in replies]
    factors = np.full(len(replies), 1.0 / len(replies))
    stack = np.empty((len(replies), max(int(np.prod(s)) for s in shapes.values())))
    began = time.perf_counter()
    for key, shape in shapes.items():
        block = stack[:, : int(np.prod(shape))]
        for row, reply in zip(block, views, strict=True):
            np.copyto(row, reply[key].reshape(-1))
        factors @ block
    return time.perf_counter() - began


def aggregate_seconds(
    shapes: dict[str, tuple[int, int]], replies: list[Any], options: dict[str, Any]
) -> float:
    """Seconds of one ``aggregate_train`` over ``replies`` with ``options``."""
    from flower_llm import wire
    from strategies.fedavg import RoundReport, WeightedFedAvg

    strategy = WeightedFedAvg(
        min_train_clients=1,
        max_weight=1e6,
        update_bound=lambda _round, _peak: 1.0,
        **options,
    )
    strategy.start_round(1, wire.to_array_record({k: np.zeros(s) for k, s in shapes.items()}))
    strategy.report = RoundReport(sampled=list(range(1, len(replies) + 1)))
    began = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - began
    assert arrays is not None and strategy.report.accepted == strategy.report.sampled
    return seconds


def run(quick: bool, repeats: int = 3) -> dict[str, Any]:
    """Throughput of every rule and of the stream reference, best of ``repeats``."""
    task_identity()
    params, layers = (200_000, 2) if quick else (1_000_000, 4)
    num_clients = 10 if quick else 20
    shapes = adapter_shapes(params, layers)
    replies = make_replies(shapes, num_clients, distinct=True)
    reply_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    total = reply_bytes * num_clients
    stream = min(stream_seconds(shapes, replies) for _ in range(repeats))
    floor = min(floor_seconds(shapes, replies) for _ in range(repeats))
    rows: dict[str, dict[str, float]] = {
        FLOOR: {
            "seconds": floor,
            "median-seconds": floor,
            "reply-bytes-per-second": total / floor,
            "fraction-of-stream": stream / floor,
        }
    }
    # ffa: the sites send B alone, half the bytes; its stream reference is over those.
    b_shapes = {k: v for k, v in shapes.items() if ".lora_B." in k}
    b_replies = make_replies(b_shapes, num_clients, distinct=True)
    b_total = total // 2
    b_stream = min(stream_seconds(b_shapes, b_replies) for _ in range(repeats))
    for name, options in RULES.items():
        ffa = options.get("lora_aggregation") == "ffa"
        times = [
            aggregate_seconds(shapes, b_replies if ffa else replies, options)
            for _ in range(repeats)
        ]
        best = min(times)
        rows[name] = {
            "seconds": best,
            "median-seconds": median(times),
            "reply-bytes-per-second": (b_total if ffa else total) / best,
            "fraction-of-stream": (b_stream if ffa else stream) / best,
        }
    return {
        "adapter-parameters": sum(int(np.prod(s)) for s in shapes.values()),
        "clients": num_clients,
        "reply-bytes": total,
        "stream-seconds": stream,
        "stream-bytes-per-second": total / stream,
        "rules": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The table."""
    rows = [
        [
            name,
            f"{1e3 * r['seconds']:.1f} ms",
            f"{r['reply-bytes-per-second'] / 1e9:.2f} GB/s",
            f"{100 * r['fraction-of-stream']:.0f} %",
        ]
        for name, r in result["rules"].items()
    ]
    return (
        f"{result['clients']} float32 replies of {result['adapter-parameters']:,} parameters "
        f"({result['reply-bytes'] / 1e6:.0f} MB). Stream reference (float32 `acc += reply`): "
        f"{1e3 * result['stream-seconds']:.1f} ms, "
        f"{result['stream-bytes-per-second'] / 1e9:.2f} GB/s of replies.\n\n"
        + table(["rule", "aggregate_train", "replies read", "of stream"], rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Run, print and save."""
    args = parser(__doc__).parse_args(argv)
    setup(args.threads)
    run_and_finish("aggregation_throughput", args, lambda: run(args.quick), to_markdown)


if __name__ == "__main__":
    main()
