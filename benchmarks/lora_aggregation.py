"""LoRA aggregation rules and robust rules on the embedded non-IID federation.

Two tables, on the embedded tiny Llama with sites split by domain (by-field):

1. ``lora.aggregation`` = fedavg | ffa | exact: union held-out loss after each round,
   bytes each site sends up per round, server aggregation time, and how far the global
   product is from the weighted average of the sites' products (fedavg's cross terms,
   exact's truncation error).
2. Attacks: one of the sites replaces its reply (update x100, update x1e6, sign-flipped
   update, a claimed weight of 1e12); union held-out loss after the rounds for the
   server's defences (no bounds; the derived bounds that drop such replies; each
   ``fed.robust`` rule with the bounds off).

The sites run in one process through ``flower_llm.client.ClientSession``; the server
runs the functions ``strategies.fedavg.WeightedFedAvg`` calls (``bound_reply``,
``robust_aggregate``, ``exact_average``) with the bounds ``derive_max_weight`` and
``derive_update_bound`` give. Flower's transport is left out.

    python -m benchmarks.lora_aggregation [--quick] [--out DIR] [--threads 1] [--model mid]

``--model mid`` runs both tables on the ~77M benchmark model
(:func:`benchmarks.common.mid_model_dir`, random weights, the embedded tokenizer) at
reduced sizes, :data:`MID_SIZES` (14 minutes measured on a 2-core machine at a load of
about 4): the four rules of table 1 at 4 sites, and table 2 cut to :data:`MID_ATTACKS`
against :data:`MID_DEFENCES` with the held-out loss measured after the last round only.
Its result is ``lora_aggregation-mid``. Neither run is part of ``run_all`` (whose whole
run must stay under 15 minutes). ``--quick --model mid`` is 1 round of 1 step at 2 sites
on 4 held-out examples a site, rules only: 19-27 s, a check that the path runs (no smoke
test: over the 20 s one may take).
"""

from __future__ import annotations

import os

# The server's matrices are thin (d x sum of ranks): multi-threaded OpenBLAS only
# spin-waits on them, ~30x slower on a loaded 2-core machine. Before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import mid_model_dir, parser, run_and_finish, setup, table
from flower_llm.adapters import AdapterState, adapter_state
from flower_llm.aggregation import (
    ReplyBounds,
    bound_reply,
    derive_max_weight,
    derive_update_bound,
    robust_aggregate,
)
from flower_llm.client import ClientSession, SiteIdentity
from flower_llm.config import RunConfig, parse_run_config
from flower_llm.lora_aggregation import exact_average, product_gap, rank_of, sent_keys, to_rank

Attack = Callable[[AdapterState, AdapterState, float], tuple[AdapterState, float]]
"""(global, honest local state, honest weight) -> (state sent, weight claimed)."""


def scaled(factor: float) -> Attack:
    def attack(
        start: AdapterState, local: AdapterState, weight: float
    ) -> tuple[AdapterState, float]:
        return {k: start[k] + factor * (local[k] - start[k]) for k in start}, weight

    return attack


def huge_weight(
    start: AdapterState, local: AdapterState, weight: float
) -> tuple[AdapterState, float]:
    return local, 1e12


ATTACKS: dict[str, Attack | None] = {
    "none": None,
    "update x100": scaled(100.0),
    "update x1e6": scaled(1e6),
    "sign-flipped update": scaled(-1.0),
    "weight 1e12": huge_weight,
}
DEFENCES = {
    "no bounds, fedavg": {"fed.update-bound": "off", "fed.max-weight": 1e300},
    "derived bounds (drop), fedavg": {},
    "no bounds, norm-bound": {
        "fed.update-bound": "off",
        "fed.max-weight": 1e300,
        "fed.robust": "norm-bound",
    },
    "no bounds, trimmed-mean": {
        "fed.update-bound": "off",
        "fed.max-weight": 1e300,
        "fed.robust": "trimmed-mean",
    },
    "no bounds, median": {
        "fed.update-bound": "off",
        "fed.max-weight": 1e300,
        "fed.robust": "median",
    },
}


#: ``--model mid``: rounds and local steps of table 1 and of table 2 (which is measured
#: after its last round only); ``--quick`` is 1 round of 1 step, 2 sites, rules only.
MID_SIZES = {"rules": (3, 3), "attacks": (2, 2)}
MID_ATTACKS = ["none", "update x1e6", "weight 1e12"]
MID_DEFENCES = ["no bounds, fedavg", "derived bounds (drop), fedavg"]
#: ``--quick --model mid``: held-out examples kept at each site.
MID_QUICK_EVAL = 4


def union_loss(sessions: list[ClientSession], state: AdapterState) -> float:
    """Token-weighted held-out loss of ``state`` over every site's evaluation split."""
    stats = [s.evaluate(state) for s in sessions]
    loss = sum(e.loss * e.tokens for e in stats) / sum(e.tokens for e in stats)
    return loss if math.isfinite(loss) else float("inf")


def server_round(
    cfg: RunConfig, rnd: int, start: AdapterState, replies: list[tuple[AdapterState, float]]
) -> tuple[AdapterState | None, dict[str, Any]]:
    """What WeightedFedAvg does with ``replies``: bound each, then aggregate the rest."""
    peak = max(float(np.max(np.abs(v))) for v in start.values())
    bounds = ReplyBounds(
        max_weight=derive_max_weight(cfg),
        max_abs_update=derive_update_bound(cfg, rnd, peak),
        max_update_norm=cfg.fed.max_update_norm or None,
        clamp=cfg.fed.bound_action == "clamp",
    )
    expected = {k: start[k] for k in sent_keys(start, cfg.lora.aggregation)}
    kept, dropped = [], []
    for state, weight in replies:
        if cfg.lora.aggregation == "exact":  # a site of its own rank: its re-factoring
            expected = to_rank(start, rank_of(state))
        checked = bound_reply(state, expected, weight, bounds)
        if isinstance(checked, str):
            dropped.append(checked)
        else:
            kept.append((checked.state, checked.weight))
    info: dict[str, Any] = {"dropped": len(dropped)}
    if not kept:
        return None, info
    states, weights = [s for s, _ in kept], [w for _, w in kept]
    began = time.perf_counter()
    if cfg.lora.aggregation == "exact":
        new, report = exact_average(states, weights, cfg.lora.r)
        info["truncation-error"] = report.relative_error
    else:
        averaged = robust_aggregate(
            states, weights, expected, cfg.fed.robust, cfg.fed.trim_fraction
        )
        new = {k: averaged.get(k, start[k]) for k in start}
    info["aggregate-seconds"] = time.perf_counter() - began
    if cfg.lora.aggregation != "ffa":
        info["product-gap"] = product_gap(states, weights, new)
    return {k: np.asarray(v, np.float32) for k, v in new.items()}, info


def federate(
    overrides: dict[str, Any],
    num_sites: int,
    num_rounds: int,
    attack: Attack | None = None,
    *,
    every_round: bool = True,
    eval_cap: int | None = None,
) -> dict[str, Any]:
    """Run ``num_rounds`` in-process rounds; the last site runs ``attack`` when given.

    ``every_round = False`` measures the held-out loss after the last round only (the
    others are NaN); ``eval_cap`` keeps the first that many held-out examples a site.
    """
    cfg = parse_run_config({"fed.num-rounds": num_rounds, **overrides})
    sessions = [ClientSession(cfg, SiteIdentity(None, i, num_sites)) for i in range(num_sites)]
    if eval_cap is not None:
        for session in sessions:
            session.data = dataclasses.replace(session.data, eval=session.data.eval[:eval_cap])
    # The global adapter starts at the global rank (a site of lower rank would not do).
    state = adapter_state(next(s.model for s in sessions if s.lora.r == cfg.lora.r))
    losses = [union_loss(sessions, state) if every_round else math.nan]
    rounds = []
    for rnd in range(1, num_rounds + 1):
        began = time.perf_counter()
        lr = cfg.train.learning_rate_at(rnd, num_rounds)
        replies, up = [], 0
        for k, session in enumerate(sessions):
            local, _ = session.train(state, rnd, lr)
            sent = session.to_send(local)
            weight = float(session.data.num_train_examples)
            if attack is not None and k == num_sites - 1:
                honest_start = {key: state[key] for key in sent}
                sent, weight = attack(honest_start, sent, weight)
            up += sum(v.nbytes for v in sent.values())
            replies.append((sent, weight))
        new, info = server_round(cfg, rnd, state, replies)
        if new is not None:
            state = new
        last = rnd == num_rounds
        losses.append(union_loss(sessions, state) if every_round or last else math.nan)
        rounds.append({**info, "bytes-up": up, "seconds": time.perf_counter() - began})
        print(f"  round {rnd}: loss {losses[-1]:.4f}, {rounds[-1]['seconds']:.0f} s", flush=True)
    return {"loss-by-round": losses, "rounds": rounds}


def run(quick: bool, model: str = "tiny") -> dict[str, Any]:
    """Both tables (``model = "mid"``: the ~77M model at :data:`MID_SIZES`)."""
    mid = model == "mid"
    base: dict[str, Any] = {"model.name": str(mid_model_dir())} if mid else {}
    if mid:
        (num_rounds, num_steps), (attack_rounds, attack_steps) = (
            ((1, 1), (1, 1)) if quick else (MID_SIZES["rules"], MID_SIZES["attacks"])
        )
    else:
        num_rounds, num_steps = (2, 3) if quick else (3, 5)
        attack_rounds, attack_steps = num_rounds, num_steps
    sites, eval_cap = (2, MID_QUICK_EVAL) if mid and quick else (4, None)
    # Heterogeneous ranks: 4, 8, 16, 16 at 4 sites (2 sites: 8, 16).
    site_ranks = "4,8,16,16" if sites == 4 else "8,16"
    heterogeneous = f"exact, site ranks {site_ranks.replace(',', ', ')}"
    steps = {**base, "train.local-steps": num_steps}
    lora: dict[str, Any] = {}
    for rule in ("fedavg", "ffa", "exact"):
        print(f"--- {rule}", flush=True)
        lora[rule] = federate(
            {**steps, "lora.aggregation": rule}, sites, num_rounds, eval_cap=eval_cap
        )
    print(f"--- {heterogeneous}", flush=True)
    lora[heterogeneous] = federate(
        {**steps, "lora.aggregation": "exact", "lora.site-ranks": site_ranks},
        sites,
        num_rounds,
        eval_cap=eval_cap,
    )
    attacks: dict[str, dict[str, float]] = {}
    if mid:
        attack_names, defence_names = ([] if quick else MID_ATTACKS), MID_DEFENCES
    elif quick:
        attack_names, defence_names = ["none", "update x1e6", "weight 1e12"], list(DEFENCES)[:2]
    else:
        attack_names, defence_names = list(ATTACKS), list(DEFENCES)
    attack_settings = {**base, "train.local-steps": attack_steps}
    for attack_name in attack_names:
        attacks[attack_name] = {}
        for defence in defence_names:
            print(f"--- {attack_name} / {defence}", flush=True)
            result = federate(
                {**attack_settings, **DEFENCES[defence]},
                5,
                attack_rounds,
                ATTACKS[attack_name],
                every_round=not mid,
            )
            attacks[attack_name][defence] = result["loss-by-round"][-1]
    return {
        "model": model,
        "sites": sites,
        "local-steps": num_steps,
        "rounds": num_rounds,
        "attack-rounds": attack_rounds,
        "attack-local-steps": attack_steps,
        "eval-cap": eval_cap,
        "lora": lora,
        "attacks": attacks,
    }


def _fmt(value: float) -> str:
    return "inf / NaN" if not math.isfinite(value) else f"{value:.4f}"


def to_markdown(result: dict[str, Any]) -> str:
    """Both tables."""
    rows = []
    for rule, res in result["lora"].items():
        last = res["rounds"][-1]
        rows.append(
            [
                rule,
                " -> ".join(f"{v:.3f}" for v in res["loss-by-round"]),
                f"{last['bytes-up'] / 1e6:.2f} MB",
                f"{1e3 * last.get('aggregate-seconds', 0):.1f} ms",
                f"{last['product-gap']:.3g}" if "product-gap" in last else "0 (exact by design)",
            ]
        )
    lora_table = table(
        [
            "lora.aggregation",
            "union held-out loss by round",
            "bytes up / round",
            "aggregate",
            "product gap, last round",
        ],
        rows,
    )
    mid = result.get("model") == "mid"
    model = "the ~77M benchmark model (random weights)" if mid else "embedded tiny Llama"
    sites = result.get("sites", 4)
    cap = result.get("eval-cap")
    held_out = f", the first {cap} held-out examples a site" if cap else ""
    text = (
        f"{result['rounds']} rounds x {result['local-steps']} local steps, {sites} sites, "
        f"{model}, sites split by domain{held_out}.\n\n" + lora_table + "\n"
    )
    if not result["attacks"]:
        return text + "\nAttack table not run in this mode.\n"
    defences = list(next(iter(result["attacks"].values())))
    attack_rows = [
        [attack, *(_fmt(losses[d]) for d in defences)]
        for attack, losses in result["attacks"].items()
    ]
    attack_table = table(["1 of 5 sites sends", *defences], attack_rows)
    rounds = result.get("attack-rounds", result["rounds"])
    steps = result.get("attack-local-steps", result["local-steps"])
    return (
        text + f"\nUnion held-out loss after the last round with one hostile site ({rounds} rounds "
        f"x {steps} local steps, 5 sites):\n\n" + attack_table + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Run, print and save."""
    p = parser(__doc__)
    p.add_argument(
        "--model",
        choices=("tiny", "mid"),
        default="tiny",
        help="tiny (default, ~10 minutes) or mid (the ~77M model, ~14 minutes)",
    )
    args = p.parse_args(argv)
    setup(args.threads)
    name = "lora_aggregation" if args.model == "tiny" else "lora_aggregation-mid"
    run_and_finish(name, args, lambda: run(args.quick, args.model), to_markdown)


if __name__ == "__main__":
    main()
