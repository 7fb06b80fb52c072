"""Personalized adapters (``fed.personalization``): what travels, what a site keeps.

In-process, with real Flower messages: the ServerApp's own ``run`` talks to the real
ClientApp (``client_apps.qlora.app``) of each site through a grid that hands every message
to the site's app with that site's Context, and records every reply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from flower_llm import wire
from flower_llm.config import ConfigError, parse_run_config
from flower_llm.lora_aggregation import is_lora_a
from flower_llm.personal import (
    PERSONAL_ADAPTER,
    PERSONAL_B,
    SITE_COMPARISON,
    format_table,
    read_entry,
)
from flower_llm.site_state import SITE_STATE_DIR_KEY, SiteStateStore

SITES = 2


@pytest.fixture(scope="module", autouse=True)
def server_task_identity() -> Iterator[None]:
    """Instructions are stamped with the run and node of the process that makes them."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_node_id", "_task_id")
    saved = [getattr(TaskIdentity, name) for name in names]
    for name, value in zip(names, (1, 0, 1), strict=True):
        setattr(TaskIdentity, name, value)
    yield
    for name, value in zip(names, saved, strict=True):
        setattr(TaskIdentity, name, value)


class ClientAppGrid:
    """Sites with stable node ids, each answered by the real ClientApp with its Context."""

    def __init__(self, run_id: int, run_config: dict[str, Any], state_dir: Path) -> None:
        self.contexts = {
            node + 1: Context(
                run_id=run_id,
                node_id=node + 1,
                node_config={
                    "partition-id": node,
                    "num-partitions": SITES,
                    SITE_STATE_DIR_KEY: str(state_dir),
                },
                state=RecordDict(),  # a new Flower run: empty node state
                run_config=run_config,
            )
            for node in range(SITES)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        from client_apps.qlora import app

        out = []
        for msg in messages:
            self.sent.append(msg)
            reply = app(msg, self.contexts[msg.metadata.dst_node_id])
            assert not reply.has_error(), reply.error
            out.append(reply)
        self.replies.extend(out)
        return out


def job(model_dir: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model.name": str(model_dir),
        "train.local-steps": 3,
        "train.batch-size": 4,
        "train.lr-schedule": "constant",
        "train.learning-rate": 0.01,
        "fed.num-rounds": 2,
        "output.dir": str(out),
        "output.run-name": "personal",
        **extra,
    }


def run_server(grid: ClientAppGrid, run_config: dict[str, Any]) -> dict[str, Any]:
    from server_apps.fedavg import run

    server = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    cfg = parse_run_config(run_config)
    run(grid, server, cfg)  # type: ignore[arg-type]
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    return dict(json.loads((run_dir / "summary.json").read_text()))


def array_keys(messages: Iterable[Message]) -> set[str]:
    return {
        key
        for msg in messages
        if msg.has_content()
        for record in msg.content.array_records.values()
        for key in record
    }


def stored_b(state_dir: Path, run_name: str = "personal") -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for node in range(SITES):
        site = f"partition-{node}-of-{SITES}"
        entry = read_entry(SiteStateStore(state_dir, run_name, site), PERSONAL_B)
        assert entry is not None, site
        out[site] = entry[0]
    return out


# --------------------------------------------------------------------------------------
# local-b: the server never sees a B
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_b_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("local-b")
    config = job(
        tiny_model_dir,
        tmp / "out",
        **{"fed.personalization": "local-b", "output.local-only-baseline": True},
    )
    grid = ClientAppGrid(7, config, tmp / "state")
    summary = run_server(grid, config)
    return {"grid": grid, "summary": summary, "tmp": tmp, "config": config}


def test_local_b_sends_and_receives_a_only(local_b_run: dict[str, Any]) -> None:
    grid: ClientAppGrid = local_b_run["grid"]
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 2 * SITES
    # Every train reply holds the A matrices and nothing else
    for reply in train_replies:
        keys = set(reply.content.array_records[wire.ARRAYS])
        assert keys and all(is_lora_a(k) for k in keys), sorted(keys)[:3]
    # Nothing the server sent or received, in any record, holds a B; except the
    # local-only adapters the benchmark-only baseline sends (output.local-only-baseline)
    received = array_keys(
        [r for r in grid.replies if wire.LOCAL_ONLY_ARRAYS not in r.content.array_records]
    )
    assert received and all(is_lora_a(k) for k in received)
    sent = [m for m in grid.sent if SITE_COMPARISON in m.content.config_records.get(wire.CONFIG, {})]
    assert len(sent) == SITES
    train_sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(is_lora_a(k) for k in array_keys(train_sent))
    # The per-site comparison replies carry scores only
    comparison = [r for r in grid.replies if SITE_COMPARISON in r.content.metric_records]
    assert len(comparison) == SITES
    assert all(not r.content.array_records for r in comparison)


def test_local_b_sites_keep_distinct_trained_b(local_b_run: dict[str, Any]) -> None:
    state_dir = local_b_run["tmp"] / "state"
    kept = stored_b(state_dir)
    first, second = kept.values()
    assert all(not is_lora_a(k) for k in first)
    # Trained (not PEFT's zeros) and different at the two sites
    assert any(np.abs(v).max() > 0 for v in first.values())
    assert any(not np.array_equal(first[k], second[k]) for k in first)
    # The saved global adapter is a whole PEFT adapter whose B is the initial zero
    from safetensors.numpy import load_file

    final = load_file(str(local_b_run["tmp"] / "out" / "personal" / "final" / "adapter_model.safetensors"))
    assert set(final) == set(first) | {k.replace(".lora_B.", ".lora_A.") for k in first}
    assert all(not final[k].any() for k in first)


def test_the_summary_holds_the_per_site_table(local_b_run: dict[str, Any]) -> None:
    summary = local_b_run["summary"]
    assert summary["personalization"] == "local-b"
    table = summary["per-site"]
    assert sorted(table["sites"]) == [f"partition {p}/{SITES}" for p in range(SITES)]
    for row in table["sites"].values():
        assert all(isinstance(row[name], float) for name in ("local-only", "global", "personal"))
        assert row["eval-tokens"] > 0
        # global under local-b is the shared A with B = 0: the base model, so training
        # a personal B must lower the loss
        assert row["personal"] < row["global"]
    assert table["personal-beats-global-everywhere"] is True
    lines = format_table(table)
    assert lines[1].split() == ["site", "local-only", "global", "personal"]
    assert len(lines) == 2 + SITES + 1


def test_the_report_prints_the_per_site_table(local_b_run: dict[str, Any]) -> None:
    from flower_llm.report import format_outcome

    run_dir = local_b_run["tmp"] / "out" / "personal"
    text = format_outcome(run_dir, local_b_run["summary"])
    assert "held-out loss on each site's own data" in text
    assert "partition 0/2" in text and "partition 1/2" in text


def test_export_personal_writes_a_peft_adapter(
    local_b_run: dict[str, Any], tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flower_llm.cli import main

    state_dir = local_b_run["tmp"] / "state"
    out = local_b_run["tmp"] / "exported"
    code = main(
        [
            "export-personal",
            "--site-state-dir",
            str(state_dir),
            "--run",
            "personal",
            "--site",
            "partition-1-of-2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    entry = read_entry(SiteStateStore(state_dir, "personal", "partition-1-of-2"), PERSONAL_ADAPTER)
    assert entry is not None
    kept, _ = entry
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out)
    from flower_llm.adapters import adapter_state

    loaded = adapter_state(model)
    assert loaded.keys() == kept.keys()
    for key in kept:
        np.testing.assert_array_equal(loaded[key], kept[key])
    # Its B is the site's own, as kept after the last round
    own_b = stored_b(state_dir)["partition-1-of-2"]
    for key, value in own_b.items():
        np.testing.assert_array_equal(loaded[key], value)


# --------------------------------------------------------------------------------------
# A resumed run keeps every site's B
# --------------------------------------------------------------------------------------


def test_a_resumed_local_b_run_continues_every_sites_b(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare / Execute: 2 rounds straight; 1 round, then a new Flower run (new run id,
    # empty node state: what a restarted site has) resuming it with round 2
    settings = {"fed.personalization": "local-b"}
    straight = job(tiny_model_dir, tmp_path / "out-a", **settings)
    run_server(ClientAppGrid(1, straight, tmp_path / "state-a"), straight)
    first = job(tiny_model_dir, tmp_path / "out-b", **settings, **{"fed.num-rounds": 1})
    run_server(ClientAppGrid(2, first, tmp_path / "state-b"), first)
    after_one = stored_b(tmp_path / "state-b")
    resumed = job(tiny_model_dir, tmp_path / "out-b", **settings, **{"output.resume": True})
    summary = run_server(ClientAppGrid(3, resumed, tmp_path / "state-b"), resumed)

    # Assert: the resumed sites continued their own B, so they end where the
    # uninterrupted run's sites end, bit for bit
    assert summary["resumed-after-round"] == 1
    want, got = stored_b(tmp_path / "state-a"), stored_b(tmp_path / "state-b")
    for site in want:
        assert any(not np.array_equal(after_one[site][k], got[site][k]) for k in got[site])
        for key in want[site]:
            np.testing.assert_array_equal(got[site][key], want[site][key])
    assert summary["per-site"]["sites"] and summary["per-site"]["personal-beats-global-everywhere"]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"fed.personalization": "local-b", "lora.aggregation": "ffa"}, "lora.aggregation"),
        ({"fed.personalization": "local-b", "lora.aggregation": "exact"}, "lora.aggregation"),
        ({"fed.personalization": "local"}, "fed.personalization"),
        ({"personal.local-steps": 0}, "personal.local-steps"),
    ],
)
def test_bad_personalization_settings_are_refused(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config(settings)
