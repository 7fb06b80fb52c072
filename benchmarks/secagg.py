"""What SecAgg+ costs: round time and bytes per client, against the plain FedAvg path.

Synthetic clients (no model, no training) return ``global + a random update`` of a given
size, so what is timed is the aggregation protocol alone: the project's plain Message-API
path (``WeightedFedAvg``) against its SecAgg+ path (``strategies.secagg.SecAggRounds``
with Flower's ``SecAggPlusWorkflow`` and the legacy ``client_apps.secagg`` app), both over
Flower's in-process simulation runtime (Ray, one CPU per client actor). It also reports how
far the SecAgg+ aggregate is from exact weighted FedAvg of the same updates, next to the
documented bound.

    python -m benchmarks.secagg [--clients 3 10 20] [--sizes 100000 1000000 10000000]

Bytes are payloads (array data, byte strings, scalars) per client per round, both
directions; framing is left out, the same way for both paths.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client_apps.secagg import make_app
from flower_llm import secagg, wire
from flower_llm.config import RunConfig, parse_run_config
from flower_llm.streams import RandomStreams
from flower_llm.train import TrainStats
from strategies.fedavg import WeightedFedAvg
from strategies.rounds import RoundResult, federate
from strategies.secagg import CountingGrid, SecAggRounds

RESULTS = Path(__file__).resolve().parent / "results"
NUM_ARRAYS = 8
"""Updates are split into this many arrays (LoRA adapters hold a few hundred; it is the
number of values that costs)."""
DELTA = 0.02
"""Updates are uniform in [-DELTA, DELTA], inside the automatic clipping range (~0.08)."""


def shapes_for(num_values: int) -> dict[str, tuple[int, int]]:
    """``NUM_ARRAYS`` arrays of 64 columns holding about ``num_values`` values."""
    rows = max(1, num_values // (NUM_ARRAYS * 64))
    return {f"w{i}": (rows, 64) for i in range(NUM_ARRAYS)}


def update_for(
    global_state: dict[str, np.ndarray], partition: int, server_round: int
) -> dict[str, np.ndarray]:
    """The local adapter of ``partition``: float32 ``global + U(-DELTA, DELTA)``."""
    rng = np.random.default_rng([partition, server_round, global_state["w0"].shape[0]])
    return {
        k: (v + rng.uniform(-DELTA, DELTA, v.shape).astype(np.float32)).astype(np.float32)
        for k, v in global_state.items()
    }


def weight_of(partition: int) -> int:
    """Unequal example counts held (and trained on), at most 160, the run's max weight."""
    return 160 - 7 * (partition % 20)


class SyntheticSession:
    """Stands in for ``ClientSession``: ``train`` returns the synthetic local adapter."""

    def __init__(self, cfg: RunConfig, partition: int) -> None:
        self.cfg = cfg
        self.partition = partition

    def train(
        self, global_state: dict[str, np.ndarray], server_round: int, learning_rate: float
    ) -> tuple[dict[str, np.ndarray], TrainStats]:
        local = update_for(global_state, self.partition, server_round)
        return local, TrainStats(1.0, 1, weight_of(self.partition), 1, 0.0)

    def train_reply_metrics(self, stats: TrainStats) -> dict[str, int]:
        """The site holds what it trained on (the plain path weighs the same)."""
        return {wire.NUM_EXAMPLES: stats.examples, wire.NUM_EXAMPLES_SEEN: stats.examples}


def client_app(cfg: RunConfig) -> ClientApp:
    """One ClientApp for both paths, dispatching like ``client_apps.qlora``."""

    def trainer_for(context: Context) -> tuple[SyntheticSession, list[str]]:
        partition = int(context.node_config["partition-id"])
        return SyntheticSession(cfg, partition), [f"w{i}" for i in range(NUM_ARRAYS)]

    legacy = make_app(trainer_for)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if "secaggplus_configs" in msg.content.config_records:
            return legacy(msg, context)
        session, _ = trainer_for(context)
        config = msg.content[wire.CONFIG]
        global_state = wire.from_array_record(msg.content.array_records[wire.ARRAYS])
        local, stats = session.train(global_state, int(config[wire.SERVER_ROUND]), 0.0)  # type: ignore[arg-type]
        metrics = MetricRecord({wire.NUM_EXAMPLES: stats.examples})
        return Message(
            RecordDict({wire.ARRAYS: wire.to_array_record(local), wire.METRICS: metrics}),
            reply_to=msg,
        )

    return app


def exact_update(
    global_state: dict[str, np.ndarray], partitions: list[int], server_round: int
) -> dict[str, np.ndarray]:
    """Weighted FedAvg of the updates the clients sent (float64), one client at a time."""
    total = sum(weight_of(p) for p in partitions)
    acc = {k: np.zeros(v.shape) for k, v in global_state.items()}
    for p in partitions:
        local = update_for(global_state, p, server_round)
        for k in acc:
            acc[k] += (local[k].astype(np.float64) - global_state[k]) * (weight_of(p) / total)
    return acc


# --------------------------------------------------------------------------------------
# The two paths, inside one ServerApp
# --------------------------------------------------------------------------------------


def plain_rounds(
    grid: Grid, cfg: RunConfig, state: dict[str, np.ndarray], rounds: int
) -> list[dict[str, Any]]:
    """Rounds of the plain path: WeightedFedAvg over the Message API."""
    counting = CountingGrid(grid)
    num_clients = cfg.fed.min_available_clients
    strategy = WeightedFedAvg(min_train_clients=num_clients, min_available_clients=num_clients)
    arrays = wire.to_array_record(state)
    out = []
    for server_round in range(1, rounds + 1):
        counting.reset()
        start = time.perf_counter()
        config = ConfigRecord({wire.SERVER_ROUND: server_round, wire.LEARNING_RATE: 0.0})
        messages = strategy.configure_train(server_round, arrays, config, counting)  # type: ignore[arg-type]
        replies = counting.send_and_receive(messages, timeout=600)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        assert new_arrays is not None, strategy.report.dropped
        arrays = new_arrays
        seconds = time.perf_counter() - start
        n = len(strategy.report.accepted)
        out.append(
            {
                "round": server_round,
                "seconds": seconds,
                "clients": n,
                "bytes-down-per-client": sum(counting.bytes_down.values()) / n,
                "bytes-up-per-client": sum(counting.bytes_up.values()) / n,
            }
        )
    return out


def secagg_rounds(
    grid: Grid, context: Context, cfg: RunConfig, state: dict[str, np.ndarray], rounds: int
) -> list[dict[str, Any]]:
    """Rounds of the SecAgg+ path, with the distance to exact FedAvg of the same updates."""
    out: list[dict[str, Any]] = []
    current = {"state": state}
    keys = secagg.ordered_keys(state)
    streams = RandomStreams(cfg.seed)
    mode = SecAggRounds(
        cfg,
        context,
        keys,
        evaluation=WeightedFedAvg(eval_rng=streams.evaluate),
        train_rng=streams.train,
    )
    strategy = mode.strategy

    def on_round_end(result: RoundResult) -> None:
        report, params = mode.last_report, mode.last_params
        assert report is not None and params is not None
        before = current["state"]
        current["state"] = wire.from_array_record(result.arrays)
        partitions = list(range(len(report.sampled)))
        exact = exact_update(before, partitions, result.server_round)
        # the unmasked float64 mean update, before it is added to the float32 adapter
        assert strategy.aggregate is not None, "a finished round has an aggregate"
        got, _ = secagg.decode_aggregate(strategy.aggregate, keys, params.clipping_range)
        n = len(report.sampled)
        out.append(
            {
                "round": result.server_round,
                "seconds": result.seconds,
                "clients": len(report.active),
                "num-shares": report.num_shares,
                "threshold": report.threshold,
                "quantization-range": params.quantization_range,
                "clipping-range": params.clipping_range,
                "bytes-down-per-client": report.bytes_down / n,
                "bytes-up-per-client": report.bytes_up / n,
                "stage-seconds": {k: round(v, 3) for k, v in report.stage_seconds.items()},
                "max-error-vs-fedavg": max(float(np.abs(got[k] - exact[k]).max()) for k in exact),
                "error-bound": params.error_bound(
                    [weight_of(p) / params.max_weight for p in partitions]
                ),
            }
        )

    try:
        federate(
            mode,
            grid,
            wire.to_array_record(state),
            first_round=1,
            num_rounds=rounds,
            train_config=lambda r: ConfigRecord({wire.SERVER_ROUND: r, wire.LEARNING_RATE: 0.0}),
            on_round_end=on_round_end,
            evaluate=lambda _r: False,
        )
    finally:
        mode.close()
    return out


def run_for_clients(
    num_clients: int,
    sizes: list[int],
    rounds_by_size: dict[int, int],
    sparse: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One simulation with ``num_clients`` nodes; both paths for every size.

    ``sparse = (size, num_shares)`` adds a SecAgg+ run with that many shares at that size.
    """
    from flwr.simulation import run_simulation

    results: list[dict[str, Any]] = []

    def main(grid: Grid, context: Context) -> None:
        for size in sizes:
            rounds = rounds_by_size[size]
            settings: dict[str, Any] = {
                "fed.num-rounds": rounds,
                "fed.min-available-clients": num_clients,
                # W = the largest example count a site holds (weight_of): SecAgg+ needs it
                "fed.max-weight": float(weight_of(0)),
            }
            cfg = parse_run_config(settings)
            rng = np.random.default_rng(0)
            state = {
                k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes_for(size).items()
            }
            values = sum(v.size for v in state.values())
            runs = [
                ("plain", plain_rounds(grid, cfg, state, rounds)),
                ("secagg+", secagg_rounds(grid, context, cfg, state, rounds)),
            ]
            if sparse is not None and sparse[0] == size:
                sparse_cfg = parse_run_config({**settings, "secagg.num-shares": sparse[1]})
                rows = secagg_rounds(grid, context, sparse_cfg, state, rounds)
                runs.append((f"secagg+ {sparse[1]} shares", rows))
            for mode, rows in runs:
                for row in rows:
                    results.append({"mode": mode, "clients": num_clients, "values": values, **row})
                    print(json.dumps(results[-1]), flush=True)

    server = ServerApp()
    server.main()(main)
    run_simulation(
        server_app=server,
        client_app=client_app(RunConfig()),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
    return results


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (clients, size, SecAgg+ variant): its last round next to the plain path's."""
    table = []
    for clients, values in sorted({(r["clients"], r["values"]) for r in rows}):
        here = [r for r in rows if (r["clients"], r["values"]) == (clients, values)]
        plain = [r for r in here if r["mode"] == "plain"][-1]
        plain_bytes = plain["bytes-down-per-client"] + plain["bytes-up-per-client"]
        for mode in dict.fromkeys(r["mode"] for r in here if r["mode"] != "plain"):
            sa = [r for r in here if r["mode"] == mode][-1]
            sa_bytes = sa["bytes-down-per-client"] + sa["bytes-up-per-client"]
            table.append(
                {
                    "mode": mode,
                    "clients": clients,
                    "values": values,
                    "plain-seconds": plain["seconds"],
                    "secagg-seconds": sa["seconds"],
                    "time-ratio": sa["seconds"] / plain["seconds"],
                    "plain-bytes-per-client": plain_bytes,
                    "secagg-bytes-per-client": sa_bytes,
                    "bytes-ratio": sa_bytes / plain_bytes,
                    "num-shares": sa["num-shares"],
                    "stage-seconds": sa["stage-seconds"],
                    "max-error-vs-fedavg": sa["max-error-vs-fedavg"],
                    "error-bound": sa["error-bound"],
                }
            )
    return table


def markdown(table: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as a markdown table with the setup above it."""
    lines = [
        f"SecAgg+ vs plain FedAvg, one aggregation round (the last of {meta['rounds']}), synthetic "
        f"clients without training, Flower {meta['flwr']} simulation runtime, "
        f"{meta['cpus']} CPU cores; {meta['date']}. Reproduce: `python -m benchmarks.secagg`.",
        "",
        "| clients | values | path | plain s | SecAgg+ s | time x | plain MB/client "
        "| SecAgg+ MB/client | bytes x | shares | max error vs FedAvg | bound |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        lines.append(
            f"| {r['clients']} | {r['values']:,} | {r['mode']} | {r['plain-seconds']:.2f} | "
            f"{r['secagg-seconds']:.2f} | {r['time-ratio']:.1f} | "
            f"{r['plain-bytes-per-client'] / 1e6:.2f} | {r['secagg-bytes-per-client'] / 1e6:.2f} | "
            f"{r['bytes-ratio']:.2f} | {r['num-shares']} | {r['max-error-vs-fedavg']:.1e} | "
            f"{r['error-bound']:.1e} |"
        )
    lines += [
        "",
        "Where the SecAgg+ round goes (seconds per stage, client work included):",
        "",
        "| clients | values | path | setup | share keys | masked vectors | unmask |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        st = r["stage-seconds"]
        lines.append(
            f"| {r['clients']} | {r['values']:,} | {r['mode']} | {st.get('setup', 0):.2f} | "
            f"{st.get('share-keys', 0):.2f} | {st.get('collect-masked-vectors', 0):.2f} | "
            f"{st.get('unmask', 0):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per path and size")
    parser.add_argument("--rounds-largest", type=int, default=1, help="rounds at the largest size")
    parser.add_argument(
        "--sparse",
        type=int,
        nargs=3,
        default=[10, 1_000_000, 5],
        metavar=("CLIENTS", "SIZE", "SHARES"),
        help="also run SecAgg+ with SHARES shares at CLIENTS clients and SIZE values",
    )
    args = parser.parse_args()
    rounds_by_size = {s: args.rounds for s in args.sizes}
    rounds_by_size[max(args.sizes)] = args.rounds_largest
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for num_clients in args.clients:
        sparse = (args.sparse[1], args.sparse[2]) if args.sparse[0] == num_clients else None
        rows += run_for_clients(num_clients, sorted(args.sizes), rounds_by_size, sparse)
    table = summarize(rows)
    import flwr

    meta = {
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "1.42",
        "cpus": __import__("os").cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": f"{args.rounds} ({args.rounds_largest} at the largest size)",
        "total-seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secagg.json").write_text(
        json.dumps({"meta": meta, "summary": table, "rounds": rows}, indent=2)
    )
    (RESULTS / "secagg.md").write_text(markdown(table, meta))
    print(markdown(table, meta))
    print(f"total {meta['total-seconds']} s")


if __name__ == "__main__":
    main()
