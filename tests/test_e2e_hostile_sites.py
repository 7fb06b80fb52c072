"""`flwr run` with two misbehaving sites of five, and honest sites at LoRA ranks 4, 8, 16.

The app is a copy of this project whose ClientApp is ``tests.hostile_clientapp`` (one site
sends float64 values of 1e300, one claims 1e12 training examples); the ServerApp is the
project's own, with ``lora.aggregation = exact`` and ``lora.site-ranks`` giving the three
honest sites ranks 4, 8 and 16. The run must finish, name both hostile sites' problems in
every round of metrics.jsonl, lower the held-out loss with the three honest sites, and send
each honest site its downloads at its own rank once the server has seen it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.flwr_procs import BIN, app_with_clientapp, flwr_env, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_hostile_sites_are_dropped_and_sites_of_ranks_4_8_16_lower_the_loss(
    tmp_path: Path,
) -> None:
    # Prepare
    app = app_with_clientapp(tmp_path, "tests.hostile_clientapp:app")
    home, out = tmp_path / "flwr-home", tmp_path / "outputs"
    home.mkdir()
    run_config = (
        f'output.dir="{out}" output.run-name="hostile" fed.num-rounds=2 '
        "output.local-only-baseline=false train.local-steps=10 "
        'lora.aggregation="exact" lora.r=16 lora.site-ranks="16,16,4,8,16"'
    )

    # Execute
    try:
        proc = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "local",
                "--stream",
                "--federation-config",
                "num-supernodes=5 client-resources-num-cpus=1",
                "--run-config",
                run_config,
            ],
            cwd=app,
            env=flwr_env(home, tmp_path / "cache"),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        stop_pids(local_superlink_pids(home))

    # Assert
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    run_dir = out / "hostile"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2], log
    for row in rows:
        assert row["clients-sampled"] == 5 and row["clients-replied"] == 3
        reasons = sorted(row["dropped"].values())
        assert len(reasons) == 2, row
        assert any("beyond float32's range" in r for r in reasons), reasons
        assert any("above fed.max-weight" in r for r in reasons), reasons
        assert row["updated"]
        assert 0 <= row["lora-truncation-error"] < 1, row
    losses = json.loads((run_dir / "summary.json").read_text())["eval-loss-by-round"]
    assert losses[1] < losses[0], losses
    # Round 2's downloads (train and evaluate) are at each site's rank once the server
    # has seen it: ranks 4 and 8 get 1/4 and 1/2 of the bytes of rank 16 (the two dropped
    # sites, whose ranks the server never accepted, and the honest rank-16 site); round
    # 1's train instructions were the seeded-initial ones, a few hundred bytes each
    down = sorted(traffic[0] for traffic in rows[1]["bytes-by-site"].values())
    assert down[2] == down[3] == down[4], down
    assert 0.22 < down[0] / down[4] < 0.28 and 0.47 < down[1] / down[4] < 0.53, down
    assert rows[0]["bytes-down"] < 5 * 1024, rows[0]
