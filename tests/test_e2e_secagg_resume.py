"""`flwr run .` with SecAgg+: a run stopped after round 1 and resumed ends where an
uninterrupted one ends.

Three runs through one local SuperLink (3 simulated sites, 2 local steps, constant learning
rate so that ``fed.num-rounds`` may grow on resume): 2 rounds uninterrupted; 1 round; the
same run resumed with ``output.resume`` for round 2, in a fresh ServerApp process that has
only the checkpoint. Every site is sampled (``fed.fraction-train = 1``): a simulation gives
its nodes new ids each run, so only full cohorts are the same cohorts across runs (the
resume of Poisson cohorts at q < 1 is checked in-process in tests/test_secagg.py and
tests/test_engine.py, where node ids stay put).

Two more runs add client-level DP (q = 1): one round, then resumed for round 2. Their noise
comes from the operating system, so adapters cannot be compared with another run; the
epsilon can: it must be the epsilon of two rounds, accounted once each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.flwr_procs import flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]

JOB = [
    'fed.aggregation="secagg+"',
    "fed.max-weight=1000.0",  # bounds the training examples any site holds
    "output.local-only-baseline=false",
    "train.local-steps=2",
    'train.lr-schedule="constant"',
]
DP_SIGMA, DP_DELTA = 0.8, 1e-3
DP_JOB = [
    *JOB,
    'privacy.mode="client-fixed"',
    "privacy.clip-norm=0.05",
    f"privacy.noise-multiplier={DP_SIGMA}",
    f"privacy.delta={DP_DELTA}",
    "privacy.min-sampled-clients=3",
    # 3 sites: without any one of them SecAgg+ cannot sum, so each site decides whether a
    # round's sum is released (chance 1): refused by default, accounted here
    'privacy.small-cohorts="account"',
]


@pytest.fixture(scope="module")
def secagg_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    cache = tmp_path_factory.mktemp("cache")
    runs = {
        "full": [
            *JOB,
            f'output.dir="{out}"',
            'output.run-name="full"',
            "fed.num-rounds=2",
        ],
        "first": [
            *JOB,
            f'output.dir="{out}"',
            'output.run-name="resumed"',
            "fed.num-rounds=1",
        ],
        "resumed": [
            *JOB,
            f'output.dir="{out}"',
            'output.run-name="resumed"',
            "fed.num-rounds=2",
            "output.resume=true",
            "fed.evaluate-every=1",  # evaluation settings may change on resume
        ],
        "dp-first": [*DP_JOB, f'output.dir="{out}"', 'output.run-name="dp"', "fed.num-rounds=1"],
        "dp-resumed": [
            *DP_JOB,
            f'output.dir="{out}"',
            'output.run-name="dp"',
            "fed.num-rounds=2",
            "output.resume=true",
        ],
    }
    procs = {}
    try:
        for name, settings in runs.items():
            procs[name] = flwr_run(
                home, run_config=" ".join(settings), num_supernodes=3, timeout=600, cache=cache
            )
            output = procs[name].stdout + procs[name].stderr
            assert procs[name].returncode == 0, output[-4000:]
    finally:
        stop_pids(local_superlink_pids(home))
    return {"out": out, "resumed-output": procs["resumed"].stdout + procs["resumed"].stderr}


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def test_a_resumed_secagg_run_ends_with_the_uninterrupted_adapter(
    secagg_runs: dict[str, Any],
) -> None:
    out: Path = secagg_runs["out"]
    full, resumed = rows(out / "full"), rows(out / "resumed")
    assert "Resuming" in secagg_runs["resumed-output"]
    assert [r["round"] for r in resumed] == [r["round"] for r in full] == [1, 2]
    for row in (*full, *resumed):
        assert row["aggregation"] == "secagg+" and row["secagg-failed"] is None
        assert row["clients-replied"] == 3
    # The sites train on the same batches from the same round-1 adapter up to SecAgg+'s
    # stochastic rounding (at most the recorded bound per value, ~1e-11). Round 2 trains in
    # bfloat16 from there with AdamW, which normalises every step: a weight whose gradient
    # is near zero can step up to the learning rate either way on a one-ulp difference. So
    # a few values may differ by up to local-steps x lr; the adapter as a whole must not.
    a, b = final_adapter(out / "full"), final_adapter(out / "resumed")
    assert a.keys() == b.keys()
    diff = np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in a])
    moved = np.concatenate([a[k].astype(np.float64).ravel() for k in a if "lora_B" in k])
    assert np.linalg.norm(moved) > 1e-2  # a trained adapter (lora_B starts at 0)
    assert np.linalg.norm(diff) <= 1e-2 * np.linalg.norm(moved), np.linalg.norm(diff)
    assert np.count_nonzero(np.abs(diff) > 1e-4) <= 0.005 * diff.size
    assert np.abs(diff).max() <= 2 * 2 * 3e-3  # local-steps x lr (train.learning-rate), x2


def test_a_resumed_secagg_run_writes_the_same_summary(secagg_runs: dict[str, Any]) -> None:
    out: Path = secagg_runs["out"]
    full = json.loads((out / "full" / "summary.json").read_text())
    resumed = json.loads((out / "resumed" / "summary.json").read_text())
    assert resumed["resumed-after-round"] == 1
    assert set(resumed) - {"resumed-after-round"} == set(full)
    assert resumed["aggregation"] == full["aggregation"] == "secagg+"
    assert resumed["rounds"] == full["rounds"] == 2
    # round 2 evaluated in both (every second round, then every round after the resume)
    assert rows(out / "resumed")[1]["eval-loss"] == pytest.approx(
        rows(out / "full")[1]["eval-loss"], rel=1e-3
    )


def test_a_resumed_secagg_dp_run_accounts_each_round_once(secagg_runs: dict[str, Any]) -> None:
    from flower_llm.privacy import epsilon_after

    run_dir = secagg_runs["out"] / "dp"
    history = rows(run_dir)
    assert [r["round"] for r in history] == [1, 2]
    for row in history:
        assert row["aggregation"] == "secagg+" and row["secagg-failed"] is None
        assert row["clients-replied"] == 3
    # every site is sampled (q = 1): the epsilon after round r is that of r rounds
    for row in history:
        expected = epsilon_after(row["round"], DP_SIGMA, 1.0, DP_DELTA)
        assert row["epsilon"] == pytest.approx(expected, rel=1e-9), row
    # ... and the delta of the guarantee says what 3 sites cost: 1 per round
    assert [r["dp-delta-total"] for r in history] == pytest.approx([DP_DELTA + 1, DP_DELTA + 2])
    client_level = json.loads((run_dir / "summary.json").read_text())["privacy"]["client-level"]
    assert client_level["rounds-accounted"] == 2
    assert client_level["delta-total"] == pytest.approx(DP_DELTA + 2)
    assert client_level["epsilon"] == pytest.approx(
        epsilon_after(2, DP_SIGMA, 1.0, DP_DELTA), rel=1e-9
    )
