"""`flwr run .` for real with nf4 updates and error feedback: 3 sites, half sampled, 3 rounds."""

from __future__ import annotations

import json

import pytest

from tests.flwr_procs import flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.long]


def test_an_nf4_run_trains_sends_updates_and_counts_its_bytes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Prepare
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    cache = tmp_path_factory.mktemp("cache")

    # Execute: 2 of 3 sites a round, so a site misses rounds and needs the whole adapter
    try:
        proc = flwr_run(
            home,
            run_config=(
                f'output.dir="{out}" output.run-name="nf4" output.local-only-baseline=false '
                'fed.wire-dtype="nf4" fed.num-rounds=3 fed.fraction-train=0.67 '
                "fed.min-train-clients=2 fed.min-available-clients=3 train.local-steps=5"
            ),
            num_supernodes=3,
            timeout=600,
            cache=cache,
        )
    finally:
        stop_pids(local_superlink_pids(home))

    # Assert: every round updated with no reply dropped; loss fell; bytes counted per site
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = out / "nf4"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["updated"] and not r["dropped"] for r in rows), rows
    assert summary["eval-loss-by-round"][-1] < summary["initial-eval-loss"]
    assert summary["mb-total"] > 0 and len(summary["bytes-by-site"]) == 3
    assert sum(s["bytes-up"] for s in summary["bytes-by-site"].values()) == summary["bytes-up"]
    # ... each site named by the label its replies gave (through real Flower messages)
    assert set(summary["site-labels"]) == set(summary["bytes-by-site"])
    assert sorted(summary["site-labels"].values()) == [f"partition {p}/3" for p in range(3)]
    # nf4 updates: what a site sends is about 1/7 of its float32 adapter
    adapter_bytes = 4 * summary["adapter-parameters"]
    per_reply = summary["bytes-up"] / sum(r["clients-replied"] for r in rows)
    assert per_reply < adapter_bytes / 5
    # ... and nobody downloaded the initial adapter: round 0's evaluation and round 1's
    # training sent `initial` instructions and `same`, round 1's evaluation the nf4
    # update (3 whole adapters and more without fed.initial-from-seed)
    assert rows[0]["bytes-down"] + rows[0]["bytes-down-eval"] < adapter_bytes
