"""`flwr run` with SecAgg+, sample-level DP-SGD at every site, and a site that goes silent.

Four sites; the one with partition-id 3 (``tests.silent_clientapp``) answers SecAgg+'s
masked-vectors stage of round 1 45 s late; each SecAgg+ stage waits 15 s. One run checks
that the shared engine's timeout holds under SecAgg+ through `flwr run` (round 1 ends
without the silent site and still updates the model; round 2 has all four), and that
DP-SGD runs inside the
SecAgg+ client: every site's accountant is kept in its state store, and the epsilon, which
would reveal the site's data size, is not sent to the server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.flwr_procs import app_with_clientapp, flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]

ROUND_TIMEOUT = 60.0
STAGE_TIMEOUT = 15.0  # the silent site answers after 45 s (tests.silent_clientapp)
DPSGD_SIGMA = 1.0


@pytest.fixture(scope="module")
def silent_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two SecAgg+ rounds with DP-SGD; partition 3 silent in every masked-vectors stage."""
    tmp = tmp_path_factory.mktemp("secagg-dpsgd")
    app = app_with_clientapp(tmp, "tests.silent_clientapp:app")
    home, out, cache = tmp / "flwr-home", tmp / "outputs", tmp / "cache"
    run_config = " ".join(
        [
            f'output.dir="{out}"',
            'output.run-name="secagg-dpsgd"',
            "output.local-only-baseline=false",
            'fed.aggregation="secagg+"',
            "fed.max-weight=1000.0",  # bounds the training examples any site holds
            "fed.num-rounds=2",
            "fed.min-available-clients=4",
            f"fed.round-timeout={ROUND_TIMEOUT}",
            f"secagg.timeout={STAGE_TIMEOUT}",
            "train.local-steps=3",
            "privacy.dpsgd=true",
            f"privacy.dpsgd-noise-multiplier={DPSGD_SIGMA}",
        ]
    )
    try:
        proc = flwr_run(
            home, run_config=run_config, num_supernodes=4, timeout=600, cache=cache, app=app
        )
    finally:
        stop_pids(local_superlink_pids(home))
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = out / "secagg-dpsgd"
    assert proc.returncode == 0, log
    assert (run_dir / "summary.json").exists(), log
    return {"run_dir": run_dir, "state": cache / "site-state" / "secagg-dpsgd", "log": log}


def test_a_secagg_round_ends_at_the_timeout_without_the_silent_site(
    silent_run: dict[str, Any],
) -> None:
    run_dir: Path = silent_run["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2], silent_run["log"]
    for row in rows:
        assert row["aggregation"] == "secagg+" and row["updated"] is True, row
        assert row["secagg-failed"] is None and row["clients-sampled"] == 4, row
    # the silent site answers after 45 s: had the server waited, it would be in the sum
    assert rows[0]["clients-replied"] == 3, rows[0]
    assert list(rows[0]["dropped"].values()) == [
        "dropped out in SecAgg+ stage 'collect-masked-vectors'"
    ], rows[0]
    # round 2: the others in the sum again (the silent site's late round-1 reply may land in
    # the middle of round 2 and cost it that round too; it is no longer silent)
    assert rows[1]["clients-replied"] >= 3, rows[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = summary["eval-loss-by-round"]
    assert losses[-1] < losses[0], losses


def test_dpsgd_runs_in_the_secagg_client_and_its_epsilon_stays_at_the_site(
    silent_run: dict[str, Any],
) -> None:
    from flower_llm.privacy import DualAccountant

    # every site kept its accountant; the three that were never silent composed one DP-SGD
    # step per local step in each of the two rounds
    files = sorted(Path(silent_run["state"]).glob("partition-*-of-4/dpsgd-accountant.json"))
    kept = {f.parent.name: json.loads(f.read_text()) for f in files}
    assert {f"partition-{i}-of-4" for i in range(3)} <= set(kept), kept
    for name in (f"partition-{i}-of-4" for i in range(3)):
        entry = kept[name]["data"]
        accountant = DualAccountant.from_checkpoint(entry["accountant"], "pld")
        assert entry["last-round"] == 2
        assert accountant.rounds == 2 * 3
        assert accountant.noise_multiplier == DPSGD_SIGMA and accountant.epsilon() > 0
    # the server has no per-site epsilon to report under SecAgg+, and says where it is
    run_dir: Path = silent_run["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("train/dpsgd-epsilon" not in row for row in rows)
    sample_level = json.loads((run_dir / "summary.json").read_text())["privacy"]["sample-level"]
    assert sample_level["epsilon-max-over-sites"] is None
    assert "at each site" in sample_level["where"]
