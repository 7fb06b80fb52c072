"""Federated vs local-only training on the embedded default task.

Each simulated site holds mostly one domain (by-field partition). For the same number of
local optimizer steps, compare on the union of every site's held-out split:

- the FedAvg adapter (each round: every site trains from the global adapter, the
  server averages weighted by the examples each site holds, as ``fed.weighting``'s
  default does), and
- each site's local-only adapter (the same steps on the same batches, never averaged).

The sites run in one process through ``flower_llm.client.ClientSession`` and the
server maths is ``flower_llm.aggregation.weighted_average``, the code the Flower apps
run; Flower's transport is left out so the comparison takes seconds. The run summary
of ``flwr run`` (``output.local-only-baseline``) reports the same comparison through the
real apps.

    python -m benchmarks.federated_vs_local [--sites 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flower_llm.adapters import AdapterState, adapter_state
from flower_llm.aggregation import weighted_average
from flower_llm.client import ClientSession, SiteIdentity
from flower_llm.config import parse_run_config

RESULTS = Path(__file__).resolve().parent / "results"


def union_loss(sessions: list[ClientSession], state: AdapterState) -> float:
    """Token-weighted held-out loss of ``state`` over every site's evaluation split."""
    stats = [s.evaluate(state) for s in sessions]
    return sum(e.loss * e.tokens for e in stats) / sum(e.tokens for e in stats)


def run(num_sites: int, num_rounds: int) -> dict[str, object]:
    """Train both ways and return the losses."""
    cfg = parse_run_config({"fed.num-rounds": num_rounds})
    sessions = [ClientSession(cfg, SiteIdentity(None, i, num_sites)) for i in range(num_sites)]
    start_state = adapter_state(sessions[0].model)
    global_state = start_state
    local_states = [start_state for _ in sessions]
    initial = union_loss(sessions, start_state)
    federated_by_round = []
    started = time.perf_counter()
    for server_round in range(1, num_rounds + 1):
        lr = cfg.train.learning_rate_at(server_round, num_rounds)
        updates = [s.train(global_state, server_round, lr) for s in sessions]
        # fed.weighting = "examples" (the default): n_k is what each site holds
        held = [s.data.num_train_examples for s in sessions]
        global_state = weighted_average([u[0] for u in updates], held)
        local_states = [
            s.train(state, server_round, lr)[0]
            for s, state in zip(sessions, local_states, strict=True)
        ]
        federated_by_round.append(union_loss(sessions, global_state))
    local_only = [union_loss(sessions, state) for state in local_states]
    return {
        "sites": num_sites,
        "rounds": num_rounds,
        "local-steps-per-round": cfg.train.local_steps,
        "initial-union-loss": initial,
        "federated-union-loss-by-round": federated_by_round,
        "federated-union-loss": federated_by_round[-1],
        "local-only-union-loss": local_only,
        "federated-beats-every-local-only": all(federated_by_round[-1] < x for x in local_only),
        "seconds": round(time.perf_counter() - started, 1),
    }


def to_markdown(result: dict[str, object]) -> str:
    """A small table of the comparison."""
    lines = [
        f"Federated vs local-only, {result['sites']} sites, {result['rounds']} rounds x "
        f"{result['local-steps-per-round']} local steps (held-out loss on all sites' data):",
        "",
        "| adapter | union held-out loss |",
        "| --- | --- |",
        f"| initial (untrained LoRA) | {result['initial-union-loss']:.4f} |",
        f"| **federated (FedAvg)** | **{result['federated-union-loss']:.4f}** |",
    ]
    local_only: list[float] = result["local-only-union-loss"]  # type: ignore[assignment]
    for site, loss in enumerate(local_only):
        lines.append(f"| local-only, site {site} | {loss:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run, print and save the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.sites, args.rounds)
    table = to_markdown(result)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federated_vs_local.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "federated_vs_local.md").write_text(table)


if __name__ == "__main__":
    main()
