"""`flwr run .` with DP: server-fixed DP-FedAvg plus clients' DP-SGD, stopped by the budget.

One real run (2 simulated sites, 3 local steps): the privacy budget holds two rounds of the
three asked for, so the run must stop after round 2, record epsilon and delta every round,
and every site's DP-SGD accountant must survive from one round to the next (Flower's
per-node state).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flower_llm.privacy import epsilon_after
from tests.flwr_procs import flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SIGMA, DELTA = 0.5, 1e-5
# q = 1 (fed.fraction-train = 1.0): a budget between epsilon after 2 and after 3 rounds.
TARGET = (epsilon_after(2, SIGMA, 1.0, DELTA) + epsilon_after(3, SIGMA, 1.0, DELTA)) / 2


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run once through `flwr run`; stop its local SuperLink by PID."""
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    cache = tmp_path_factory.mktemp("cache")
    run_config = " ".join(
        [
            f'output.dir="{out}"',
            'output.run-name="dp"',
            "output.local-only-baseline=false",
            "fed.num-rounds=3",
            "train.local-steps=3",
            'privacy.mode="server-fixed"',
            f"privacy.noise-multiplier={SIGMA}",
            "privacy.clip-norm=0.5",
            f"privacy.delta={DELTA}",
            f"privacy.target-epsilon={TARGET}",
            "privacy.dpsgd=true",
            "privacy.dpsgd-noise-multiplier=1.0",
        ]
    )
    try:
        proc = flwr_run(home, run_config=run_config, num_supernodes=2, timeout=300, cache=cache)
    finally:
        stop_pids(local_superlink_pids(home))
    run_dir = out / "dp"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (run_dir / "summary.json").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return run_dir


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_epsilon_and_delta_are_recorded_every_round_and_grow(dp_run: Path) -> None:
    history = rows(dp_run)
    epsilons = [row["epsilon"] for row in history]
    assert all(row["delta"] == DELTA for row in history)
    for r, eps in enumerate(epsilons, start=1):
        assert eps == pytest.approx(epsilon_after(r, SIGMA, 1.0, DELTA), rel=1e-9)
    assert all(row["dp-expected-clients"] == 2 for row in history)
    assert all(row["dp-noise-stddev"] == pytest.approx(SIGMA * 0.5 / 2) for row in history)


def test_the_budget_stops_the_run_before_it_is_exceeded(dp_run: Path) -> None:
    history = rows(dp_run)
    assert [row["round"] for row in history] == [1, 2]  # 3 asked for, 2 fit the budget
    summary = json.loads((dp_run / "summary.json").read_text())
    client_level = summary["privacy"]["client-level"]
    assert client_level["epsilon"] <= TARGET
    assert client_level["budget-exhausted"] is True
    assert (dp_run / "final" / "adapter_model.safetensors").exists()


def test_every_sites_dpsgd_accountant_carries_over_rounds(dp_run: Path) -> None:
    history = rows(dp_run)
    dpsgd = [row["train/dpsgd-epsilon"] for row in history]
    assert 0 < dpsgd[0] < dpsgd[1], dpsgd  # a fresh accountant each round would repeat
    summary = json.loads((dp_run / "summary.json").read_text())
    assert summary["privacy"]["sample-level"]["epsilon-max-over-sites"] == pytest.approx(dpsgd[1])


# --------------------------------------------------------------------------------------
# A DP run continued from its checkpoint keeps one privacy budget
# --------------------------------------------------------------------------------------

RESUME_SIGMA = 1.0


@pytest.fixture(scope="module")
def dp_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server-fixed DP run with DP-SGD of one round, then the same run resumed for a second.

    The first run ends after round 1 as a crashed one would have after its checkpoint:
    the second `flwr run` starts a fresh ServerApp process that only has the checkpoint, and
    fresh ClientApps whose Flower node state is empty (the sites' DP-SGD accountants are in
    their site-state directories under the cache).
    """
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    cache = out / "cache"  # the sites' site-state directories are under it
    cache.mkdir()
    settings = [
        f'output.dir="{out}"',
        'output.run-name="dp-resumed"',
        "output.local-only-baseline=false",
        "train.local-steps=1",
        'train.lr-schedule="constant"',  # so that fed.num-rounds may grow on resume
        'privacy.mode="server-fixed"',
        f"privacy.noise-multiplier={RESUME_SIGMA}",
        "privacy.clip-norm=0.1",
        f"privacy.delta={DELTA}",
        "privacy.dpsgd=true",
        f"privacy.dpsgd-noise-multiplier={RESUME_SIGMA}",
    ]
    try:
        first = flwr_run(
            home,
            run_config=" ".join([*settings, "fed.num-rounds=1"]),
            num_supernodes=2,
            timeout=300,
            cache=cache,
        )
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        resumed = flwr_run(
            home,
            run_config=" ".join([*settings, "fed.num-rounds=2", "output.resume=true"]),
            num_supernodes=2,
            timeout=300,
            cache=cache,
        )
    finally:
        stop_pids(local_superlink_pids(home))
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert "Resuming" in output, output[-4000:]
    assert not list(out.glob("*.previous-*")), "the resumed run must not start over"
    return out / "dp-resumed"


@pytest.mark.long
def test_a_resumed_dp_run_continues_the_epsilon_of_one_uninterrupted_run(
    dp_resumed: Path,
) -> None:
    # A restarted accountant would report round 2 at the one-round epsilon.
    history = rows(dp_resumed)
    expected = [epsilon_after(r, RESUME_SIGMA, 1.0, DELTA) for r in (1, 2)]
    assert [row["round"] for row in history] == [1, 2]
    assert [row["epsilon"] for row in history] == pytest.approx(expected, rel=1e-9)
    assert expected[1] > expected[0]
    summary = json.loads((dp_resumed / "summary.json").read_text())
    assert summary["resumed-after-round"] == 1
    client_level = summary["privacy"]["client-level"]
    assert client_level["rounds-accounted"] == 2
    assert client_level["epsilon"] == pytest.approx(expected[1], rel=1e-9)
    assert client_level["delta"] == DELTA


@pytest.mark.long
def test_a_resumed_dpsgd_run_continues_every_sites_epsilon(dp_resumed: Path) -> None:
    # Prepare: each site's kept accountant (one local step per round, 2 rounds)
    from flower_llm.privacy import DualAccountant

    state_dir = dp_resumed.parent / "cache" / "site-state" / "dp-resumed"
    files = sorted(state_dir.glob("partition-*-of-2/dpsgd-accountant.json"))
    assert len(files) == 2, list(state_dir.rglob("*"))
    kept = [json.loads(f.read_text()) for f in files]
    accountants = [DualAccountant.from_checkpoint(k["data"]["accountant"], "pld") for k in kept]

    # Assert: two steps composed on every site (a restarted accountant would hold one), and
    # the recorded maximum over sites is the epsilon of exactly those two steps
    history = rows(dp_resumed)
    for accountant in accountants:
        ((sigma, q, steps),) = accountant.pld.events
        assert (sigma, steps) == (RESUME_SIGMA, 2)
        assert accountant.epsilon() == epsilon_after(2, RESUME_SIGMA, q, DELTA)
    assert {k["data"]["last-round"] for k in kept} == {2}
    dpsgd = [row["train/dpsgd-epsilon"] for row in history]
    assert dpsgd[1] == pytest.approx(max(a.epsilon() for a in accountants), rel=1e-12)
    assert dpsgd[1] > dpsgd[0]
    assert history[1]["train/dpsgd-rdp-epsilon"] > dpsgd[1]
    assert history[1]["rdp-epsilon"] > history[1]["epsilon"] == history[1]["pld-epsilon"]
