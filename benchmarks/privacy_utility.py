"""Privacy vs utility on the embedded default task: DP-FedAvg at epsilon = inf, 8, 3, 1.

Many sites (default 50) hold a by-field share of the embedded Q&A data. For each target
epsilon (delta = 1e-5) the noise multiplier is calibrated with
:func:`flower_llm.privacy.calibrate_noise_multiplier` for the planned rounds and the
Poisson sampling rate ``q``, and the same federation runs through the real server code:
:class:`strategies.dp.DifferentialPrivacyFedAvg` (server-fixed clipping) around
``WeightedFedAvg`` driven by ``strategies.rounds.federate``, with an in-process grid whose
"clients" are :class:`flower_llm.client.ClientSession` training steps. Flower's transport
and Ray are left out so the sweep fits in minutes on 2 CPU cores. Rows:

- ``FedAvg (no DP)``: example-weighted FedAvg of every site, no clipping, no noise;
- ``epsilon = inf``: DP-FedAvg's sampling, clipping and uniform weights, zero noise: the
  cost of the DP machinery without noise;
- ``epsilon = 8, 3, 1``: with calibrated noise.

The clip norm is the median update norm of a pilot round (what adaptive clipping aims at
with target-quantile 0.5). The script also times one DP-SGD (Opacus) step against a plain
step on the same site's data.

    python -m benchmarks.privacy_utility [--sites 50] [--rate 0.5] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flower_llm import wire
from flower_llm.adapters import AdapterState, adapter_state, load_adapter_state
from flower_llm.client import ClientSession, SiteIdentity
from flower_llm.config import RunConfig, parse_run_config
from flower_llm.data import ClientData, prepare_client_data
from flower_llm.privacy import calibrate_noise_multiplier, global_l2_norm
from flower_llm.streams import RandomStreams
from flower_llm.train import train_adapter
from strategies.dp import CentralDP, DifferentialPrivacyFedAvg
from strategies.fedavg import WeightedFedAvg
from strategies.rounds import MessageRounds, RoundResult, federate

RESULTS = Path(__file__).resolve().parent / "results"
DELTA = 1e-5
EPSILONS = (8.0, 3.0, 1.0)


# --------------------------------------------------------------------------------------
# Many sites, one model
# --------------------------------------------------------------------------------------


class Sites:
    """Every site's data around ONE loaded model: sites train in turn, as a simulation
    actor would, instead of holding N copies of the base model."""

    def __init__(self, cfg: RunConfig, num_sites: int) -> None:
        self.session = ClientSession(cfg, SiteIdentity(None, 0, num_sites))
        self.data: list[ClientData] = [
            prepare_client_data(
                cfg.data,
                self.session.base.tokenizer,
                partition_id=i,
                num_partitions=num_sites,
                seed=cfg.seed,
            )
            for i in range(num_sites)
        ]
        self.identities = [SiteIdentity(None, i, num_sites) for i in range(num_sites)]

    def _as_site(self, site: int) -> ClientSession:
        self.session.data = self.data[site]
        self.session.site = self.identities[site]
        return self.session

    def train(self, site: int, state: AdapterState, server_round: int, lr: float) -> Any:
        """One site's local round (its batches, its seed)."""
        return self._as_site(site).train(state, server_round, lr)

    def union_loss(self, state: AdapterState) -> float:
        """Token-weighted held-out loss over every site's evaluation split."""
        stats = [self._as_site(i).evaluate(state) for i in range(len(self.data))]
        return sum(e.loss * e.tokens for e in stats) / sum(e.tokens for e in stats)


class InProcessGrid:
    """The part of Flower's ``Grid`` the strategies use; node ``i + 1`` is site ``i``."""

    def __init__(self, sites: Sites) -> None:
        self.sites = sites
        self.update_norms: list[float] = []

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.sites.data) + 1))

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            if msg.metadata.message_type != "train":
                continue  # the benchmark evaluates the global adapter itself
            config = msg.content[wire.CONFIG]
            start = wire.from_array_record(msg.content[wire.ARRAYS])  # type: ignore[arg-type]
            state, stats = self.sites.train(
                msg.metadata.dst_node_id - 1,
                start,
                int(config[wire.SERVER_ROUND]),  # type: ignore[arg-type]
                float(config[wire.LEARNING_RATE]),  # type: ignore[arg-type]
            )
            self.update_norms.append(global_l2_norm({k: state[k] - start[k] for k in start}))
            metrics = MetricRecord({wire.NUM_EXAMPLES: stats.examples, wire.TRAIN_LOSS: stats.loss})
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
            replies.append(
                Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics}), reply_to=msg)
            )
        return replies


# --------------------------------------------------------------------------------------
# One federation per privacy level
# --------------------------------------------------------------------------------------


def federation(
    sites: Sites,
    cfg: RunConfig,
    *,
    rounds: int,
    rate: float,
    noise_multiplier: float | None,
    clip_norm: float,
    seed: int,
) -> dict[str, Any]:
    """Run ``rounds`` rounds; ``noise_multiplier=None`` is plain FedAvg of every site."""
    grid = InProcessGrid(sites)
    streams = RandomStreams(seed)  # seeded: a benchmark, not a deployment
    inner = WeightedFedAvg(min_train_clients=1, min_available_clients=1, train_rng=streams.train)
    strategy: WeightedFedAvg | DifferentialPrivacyFedAvg = inner
    if noise_multiplier is not None:
        central = CentralDP(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            sampling_rate=rate,
            delta=DELTA,
            min_sampled_clients=1,
            rng=streams.noise,
        )
        strategy = DifferentialPrivacyFedAvg(inner, central, mode="server-fixed")
    start = adapter_state(sites.session.model)
    losses: list[float] = []
    epsilons: list[float] = []

    def on_round_end(result: RoundResult) -> bool:
        losses.append(sites.union_loss(wire.from_array_record(result.arrays)))
        if isinstance(strategy, DifferentialPrivacyFedAvg):
            epsilons.append(strategy.epsilon())
        return False

    started = time.perf_counter()
    federate(
        MessageRounds(strategy, timeout=600),
        grid,  # type: ignore[arg-type]
        wire.to_array_record(start),
        first_round=1,
        num_rounds=rounds,
        train_config=lambda r: ConfigRecord(
            {
                wire.SERVER_ROUND: r,
                wire.LEARNING_RATE: cfg.train.learning_rate_at(r, rounds),
            }
        ),
        on_round_end=on_round_end,
    )
    return {
        "noise-multiplier": noise_multiplier,
        "epsilon": epsilons[-1] if epsilons else None,
        "union-loss-by-round": losses,
        "union-loss": losses[-1],
        "median-update-norm": statistics.median(grid.update_norms),
        "seconds": round(time.perf_counter() - started, 1),
    }


def pilot_clip_norm(sites: Sites, cfg: RunConfig, rounds: int) -> float:
    """Median update norm of every site's first round from the initial adapter."""
    start = adapter_state(sites.session.model)
    lr = cfg.train.learning_rate_at(1, rounds)
    norms = []
    for site in range(len(sites.data)):
        state, _ = sites.train(site, start, 1, lr)
        norms.append(global_l2_norm({k: state[k] - start[k] for k in start}))
    load_adapter_state(sites.session.model, start)
    return float(statistics.median(norms))


# --------------------------------------------------------------------------------------
# DP-SGD cost per step
# --------------------------------------------------------------------------------------


def dpsgd_step_time(sites: Sites, cfg: RunConfig, steps: int = 30) -> dict[str, Any]:
    """Seconds per optimizer step, plain vs DP-SGD, on site 0's data (after a warm-up)."""
    from flower_llm.privacy.dpsgd import train_adapter_dpsgd

    session = sites._as_site(0)
    start = adapter_state(session.model)
    examples = session.data.train
    batch_size = cfg.train.batch_size

    def plain(n: int) -> Any:
        load_adapter_state(session.model, start)
        return train_adapter(
            session.model,
            session.batches_for_round(1),
            steps=n,
            learning_rate=1e-3,
            max_grad_norm=cfg.train.max_grad_norm,
        )

    def private(n: int) -> Any:
        load_adapter_state(session.model, start)
        return train_adapter_dpsgd(
            session.model,
            examples,
            steps=n,
            batch_size=batch_size,
            learning_rate=1e-3,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            delta=DELTA,
            pad_id=session.pad_id,
        ).stats

    plain(3), private(3)  # warm-up: kernels, allocator, bitsandbytes repacking
    p, d = plain(steps), private(steps)
    load_adapter_state(session.model, start)
    return {
        "steps": steps,
        "batch-size": batch_size,
        "plain-seconds-per-step": p.seconds / p.steps,
        "dpsgd-seconds-per-step": d.seconds / d.steps,
        "plain-seconds-per-example": p.seconds / max(p.examples, 1),
        "dpsgd-seconds-per-example": d.seconds / max(d.examples, 1),
        "dpsgd-mean-batch": d.examples / d.steps,
        "slowdown-per-step": (d.seconds / d.steps) / (p.seconds / p.steps),
        "slowdown-per-example": (d.seconds / max(d.examples, 1)) / (p.seconds / max(p.examples, 1)),
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(result: dict[str, Any]) -> str:
    """Table of held-out loss per privacy level and the DP-SGD cost."""
    s = result["setup"]
    lines = [
        f"DP-FedAvg (server-fixed) on the embedded task: {s['sites']} sites, Poisson q = "
        f"{s['rate']} (m = {s['expected-clients']} expected clients), {s['rounds']} rounds x "
        f"{s['local-steps']} local steps, clip norm {s['clip-norm']:.4g} (median pilot update "
        f"norm), delta = {DELTA:g}, {s['adapter-parameters']} adapter weights. Held-out loss "
        f"on the union of every site's evaluation split (initial {s['initial-union-loss']:.4f})"
        f"{'; run-config ' + str(s['run-config-overrides']) if s['run-config-overrides'] else ''}.",
        "",
        "| run | target epsilon | noise multiplier | epsilon spent | noise std / coordinate "
        "| noise norm / C | held-out loss | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["runs"]:
        sigma, eps = row["noise-multiplier"], row["epsilon"]
        cells = [row["name"], row["target"], _fmt(sigma, ".3f"), _fmt(eps, ".3f")]
        if sigma is None:
            cells += ["-", "-"]
        else:
            # Noise on the average update: per coordinate, and its expected norm relative
            # to the largest a single clipped update can be (sigma sqrt(d) / m).
            cells.append(f"{sigma * s['clip-norm'] / s['expected-clients']:.2e}")
            cells.append(f"{sigma * s['adapter-parameters'] ** 0.5 / s['expected-clients']:.2f}")
        cells += [f"{row['union-loss']:.4f}", str(row["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    t = result["dpsgd-step-time"]
    lines += [
        "",
        f"DP-SGD (Opacus, hooks mode, NF4 base) vs plain local training on one site, "
        f"{t['steps']} steps, batch size {t['batch-size']} (DP-SGD: Poisson, mean "
        f"{t['dpsgd-mean-batch']:.1f}):",
        "",
        "| | seconds / step | seconds / example |",
        "| --- | --- | --- |",
        f"| plain | {t['plain-seconds-per-step']:.4f} | {t['plain-seconds-per-example']:.5f} |",
        f"| DP-SGD | {t['dpsgd-seconds-per-step']:.4f} | {t['dpsgd-seconds-per-example']:.5f} |",
        f"| slowdown | {t['slowdown-per-step']:.2f}x | {t['slowdown-per-example']:.2f}x |",
    ]
    return "\n".join(lines) + "\n"


def run(
    num_sites: int,
    rate: float,
    rounds: int,
    local_steps: int,
    seed: int,
    threads: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole sweep."""
    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps each Message with the run and node of the process that builds it; a
    # ServerApp gets these from the SuperLink, this in-process run sets them itself.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    # One intra-op thread by default: on a shared 2-core machine OpenMP's spinning threads
    # turned a 0.25 s local round into 20-40 s once other jobs competed for the cores.
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = parse_run_config(
        {
            "fed.num-rounds": rounds,
            "train.local-steps": local_steps,
            "fed.fraction-train": rate,
            **(overrides or {}),
        }
    )
    sites = Sites(cfg, num_sites)
    start = adapter_state(sites.session.model)
    print(f"{num_sites} sites ready in {time.perf_counter() - t0:.1f} s", flush=True)
    clip_norm = pilot_clip_norm(sites, cfg, rounds)
    print(f"pilot clip norm {clip_norm:.4g} ({time.perf_counter() - t0:.1f} s)", flush=True)
    expected = max(1, round(rate * num_sites))
    setup = {
        "run-config-overrides": overrides or {},
        "torch-threads": threads,
        "sites": num_sites,
        "rate": rate,
        "expected-clients": expected,
        "rounds": rounds,
        "local-steps": local_steps,
        "clip-norm": clip_norm,
        "adapter-parameters": int(sum(v.size for v in start.values())),
        "initial-union-loss": sites.union_loss(start),
        "train-examples-per-site": statistics.median(d.num_train_examples for d in sites.data),
    }
    plan: list[tuple[str, str, float | None]] = [
        ("FedAvg (no DP)", "-", None),
        ("DP-FedAvg", "inf", 0.0),
    ]
    for eps in EPSILONS:
        plan.append(("DP-FedAvg", f"{eps:g}", calibrate_noise_multiplier(eps, DELTA, rounds, rate)))
    runs = []
    for name, target, sigma in plan:
        load_adapter_state(sites.session.model, start)
        row = federation(
            sites,
            cfg,
            rounds=rounds,
            rate=rate,
            noise_multiplier=sigma,
            clip_norm=clip_norm,
            seed=seed,
        )
        row.update(name=name, target=target)
        print(
            f"{name:16s} eps {target:>4s}: loss {row['union-loss']:.4f} ({row['seconds']} s)",
            flush=True,
        )
        runs.append(row)
    return {"setup": setup, "runs": runs, "dpsgd-step-time": dpsgd_step_time(sites, cfg)}


def main() -> None:
    """Run, print and save the sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson sampling rate q")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="noise seed (benchmark only)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = the task default)")
    parser.add_argument("--lora-target-modules", default="", help="e.g. q_proj (default: task's)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    started = time.perf_counter()
    overrides: dict[str, Any] = {}
    if args.lora_r:
        overrides["lora.r"] = args.lora_r
        overrides["lora.alpha"] = 2 * args.lora_r  # keep the task's alpha / r = 2
    if args.lora_target_modules:
        overrides["lora.target-modules"] = args.lora_target_modules
    result = run(
        args.sites, args.rate, args.rounds, args.local_steps, args.seed, args.threads, overrides
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    table = to_markdown(result)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"privacy_utility{'-' + args.tag if args.tag else ''}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(table)


if __name__ == "__main__":
    main()
