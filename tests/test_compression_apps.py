"""The compressed formats through the real ClientApp and ServerApp engine (tiny model)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from benchmarks.sites import AppGrid
from flower_llm import wire
from flower_llm.config import parse_run_config

SITES = 2


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_app(
    tiny_model_dir: Path, tmp_path: Path, name: str, **settings: Any
) -> tuple[dict[str, Any], AppGrid]:
    from server_apps.fedavg import run

    cfg = {
        "model.name": str(tiny_model_dir),
        "fed.num-rounds": 2,
        "fed.min-available-clients": SITES,
        "train.local-steps": 2,
        "train.batch-size": 4,
        "output.local-only-baseline": False,
        "output.dir": str(tmp_path / "out"),
        "output.run-name": name,
        **settings,
    }
    grid = AppGrid(cfg, tmp_path / "sites" / name, SITES, keep_replies=True)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    run(grid, context, parse_run_config(cfg))  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
    return summary, grid


@pytest.mark.long
def test_compressed_runs_train_and_send_fewer_bytes_in_every_combination(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Execute: float32, int8, nf4 + ffa and int8 + client-fixed DP-FedAvg, two rounds each
    plain, _ = run_app(tiny_model_dir, tmp_path, "float32")
    int8, _ = run_app(tiny_model_dir, tmp_path, "int8", **{"fed.wire-dtype": "int8"})
    ffa, ffa_grid = run_app(
        tiny_model_dir, tmp_path, "nf4-ffa", **{"fed.wire-dtype": "nf4", "lora.aggregation": "ffa"}
    )
    clip = 0.05
    dp, dp_grid = run_app(
        tiny_model_dir,
        tmp_path,
        "int8-dp",
        **{
            "fed.wire-dtype": "int8",
            "privacy.mode": "client-fixed",
            "privacy.clip-norm": clip,
            "privacy.noise-multiplier": 1.0,
            "fed.fraction-train": 1.0,
        },
    )

    # Assert: every round updated, nothing dropped, loss went down as with float32
    for summary in (plain, int8, ffa, dp):
        assert summary["rounds-failed"] == 0, summary
    losses = {n: s["eval-loss-by-round"][-1] for n, s in (("f", plain), ("i", int8), ("n", ffa))}
    assert losses["i"] == pytest.approx(losses["f"], rel=0.02)
    assert losses["i"] < plain["initial-eval-loss"] and losses["n"] < plain["initial-eval-loss"]
    # Up: int8 codes are about a quarter of float32; nf4 of B alone far less
    assert int8["bytes-up"] < plain["bytes-up"] / 3
    assert ffa["bytes-up"] < plain["bytes-up"] / 10
    # ffa: only B travels up, and only B in the updates down
    for reply in ffa_grid.train_replies:
        keys = reply.content.config_records["wire-format"]["keys"]
        assert keys and all("lora_B" in k for k in keys)  # type: ignore[union-attr]
    # client-fixed: each decoded update is within the clip norm
    from flower_llm.compression import Header, decode

    for reply in dp_grid.train_replies:
        content, packed = wire.unpack(reply.content)
        assert packed  # fed.wire-layout's default: codes and scales in one array
        header = Header.from_record(content.config_records["wire-format"])
        update = decode(content.array_records[wire.ARRAYS], header)
        norm = math.sqrt(
            sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values())
        )
        assert 0 < norm <= clip
    assert set(int8["bytes-by-site"]) == {"1", "2"}
    # The sites' own labels name them (the per-site table's names)
    assert int8["site-labels"] == {"1": "partition 0/2", "2": "partition 1/2"}


@pytest.mark.long
def test_exact_aggregation_of_mixed_site_ranks_works_compressed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Execute: lora.aggregation = exact with sites at ranks 2 and 4 (lora.r = 4), in
    # float32 and with int8 and nf4 updates both ways
    from flower_llm.compression import Header, decode
    from flower_llm.lora_aggregation import rank_of

    mixed = {"lora.r": 4, "lora.aggregation": "exact", "lora.site-ranks": "2,4"}
    runs = {
        codec: run_app(
            tiny_model_dir, tmp_path, f"exact-{codec}", **mixed, **{"fed.wire-dtype": codec}
        )
        for codec in ("float32", "int8", "nf4")
    }

    # Assert: nothing dropped; each site sent an update at its own rank; the loss follows
    # float32's (int8 closely) at a fraction of its bytes up
    for codec, (summary, grid) in runs.items():
        assert summary["rounds-failed"] == 0, (codec, summary)
        rows = (tmp_path / "out" / f"exact-{codec}" / "metrics.jsonl").read_text().splitlines()
        assert all(not json.loads(row)["dropped"] for row in rows)
        assert summary["eval-loss-by-round"][-1] < summary["initial-eval-loss"]
        if codec == "float32":
            continue
        for reply in grid.train_replies:
            content, packed = wire.unpack(reply.content)  # fed.wire-layout, packed by default
            assert packed
            header = Header.from_record(content.config_records["wire-format"])
            update = decode(content.array_records[wire.ARRAYS], header)
            expected_rank = {1: 2, 2: 4}[reply.metadata.src_node_id]
            assert rank_of(update) == expected_rank
    base = runs["float32"][0]
    for codec, tolerance, saving in (("int8", 0.01, 3), ("nf4", 0.03, 5)):
        summary = runs[codec][0]
        assert summary["eval-loss-by-round"][-1] == pytest.approx(
            base["eval-loss-by-round"][-1], rel=tolerance
        )
        assert summary["bytes-up"] < base["bytes-up"] / saving
