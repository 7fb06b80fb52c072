"""`flwr run .` with SecAgg+: the real ClientApp and ServerApp, the embedded model, 3 sites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flwr_procs import flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two SecAgg+ rounds through `flwr run`; the local SuperLink is stopped by PID."""
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    cache = tmp_path_factory.mktemp("cache")
    try:
        proc = flwr_run(
            home,
            run_config=(
                f'fed.aggregation="secagg+" output.local-only-baseline=false fed.num-rounds=2 '
                # W bounds the training examples any site holds (900 embedded, 3 sites)
                f"fed.max-weight=1000.0 "
                f'train.local-steps=10 output.dir="{out}" output.run-name="secagg"'
            ),
            num_supernodes=3,
            timeout=600,
            cache=cache,
        )
    finally:
        stop_pids(local_superlink_pids(home))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = out / "secagg"
    assert (run_dir / "summary.json").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return run_dir


def rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_site_is_in_every_sum(secagg_run: Path) -> None:
    metrics = rows(secagg_run)
    assert [r["round"] for r in metrics] == [1, 2]
    for row in metrics:
        assert row["aggregation"] == "secagg+"
        assert row["secagg-failed"] is None and row["updated"] is True
        assert row["clients-sampled"] == 3 and row["clients-replied"] == 3
        assert (row["secagg-num-shares"], row["secagg-threshold"]) == (3, 2)
        assert row["secagg-error-bound"] < 1e-8
        # weighed by the examples each site holds (a third of the 900 embedded ones, less
        # the held-out split, each under W = 1000): none clamped, and their sum says so
        assert row["secagg-clamped"] == 0
        assert 0.3 < row["secagg-weight-total"] <= 0.9
    summary = json.loads((secagg_run / "summary.json").read_text())
    assert summary["secagg"] == {
        "sites-clamped": 0,
        "rounds-with-clamped-sites": [],
        "warnings": [],
    }


def test_heldout_loss_falls_and_train_loss_arrives_averaged(secagg_run: Path) -> None:
    metrics = rows(secagg_run)
    losses = [r["eval-loss"] for r in metrics]
    assert losses[1] < losses[0], losses
    # the train loss was averaged inside the masked vector: a plausible cross-entropy
    assert all(0.5 < float(r["train-loss"]) < 10 for r in metrics)  # type: ignore[arg-type]


def test_masked_upload_is_no_larger_than_a_float32_adapter(secagg_run: Path) -> None:
    summary = json.loads((secagg_run / "summary.json").read_text())
    adapter_bytes = 4 * summary["adapter-parameters"]
    for row in rows(secagg_run):
        # 3 clients x (uint32 masked values + a few hundred bytes of keys and shares)
        assert 3 * adapter_bytes <= row["bytes-up"] < 3 * adapter_bytes * 1.05  # type: ignore[operator]
