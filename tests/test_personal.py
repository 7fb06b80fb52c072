"""Personalized adapters (``fed.personalization``): what travels, what a site keeps.

In-process, with real Flower messages: the ServerApp's own ``run`` talks to the real
ClientApp (``client_apps.qlora.app``) of each site through a grid that hands every message
to the site's app with that site's Context, and records every reply.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from benchmarks.sites import site_contexts
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
from tests.conftest import stamped_task_identity

SITES = 2


@pytest.fixture(scope="module", autouse=True)
def server_task_identity() -> Iterator[None]:
    """Instructions are stamped with the run and node of the process that makes them."""
    with stamped_task_identity():
        yield


class ClientAppGrid:
    """Sites with stable node ids, each answered by the real ClientApp with its Context."""

    def __init__(
        self, run_id: int, run_config: dict[str, Any], state_dir: Path, sites: int = SITES
    ) -> None:
        # A new Flower run: empty node state
        contexts = site_contexts(run_id, run_config, state_dir, sites)
        self.contexts = {c.node_id: c for c in contexts}
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.run = SimpleNamespace(run_id=run_id)  # what Flower's legacy SecAgg+ asks of a Grid

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        from client_apps.qlora import app

        out = []
        for msg in messages:
            self.sent.append(msg)
            # A copy, as the transport's serialisation gives each site its own: Flower's
            # SecAgg+ mod edits the records it receives, which one server-side object
            # sent to several sites would share in process.
            reply = app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            assert not reply.has_error(), reply.error
            out.append(reply)
        self.replies.extend(out)
        return out


def job(model_dir: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model.name": str(model_dir),
        "train.local-steps": 3,
        "train.batch-size": 4,
        "data.eval-fraction": 0.05,  # 30 and 15 held-out examples: evaluation stays cheap
        "data.max-seq-length": 64,
        "train.lr-schedule": "constant",
        "train.learning-rate": 0.01,
        "fed.num-rounds": 2,
        "output.dir": str(out),
        "output.run-name": "personal",
        **extra,
    }


def run_server(grid: ClientAppGrid, run_config: dict[str, Any]) -> dict[str, Any]:
    from server_apps.fedavg import run

    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    cfg = parse_run_config(run_config)
    run(grid, server, cfg)  # type: ignore[arg-type]
    run_dir = Path(cfg.output.dir) / cfg.output.run_name
    return dict(json.loads((run_dir / "summary.json").read_text()))


def array_keys(messages: Iterable[Message]) -> set[str]:
    """Adapter keys in any ArrayRecord of ``messages``, in either wire layout."""
    return {
        key
        for msg in messages
        if msg.has_content()
        for record in wire.unpack(msg.content)[0].array_records.values()
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


@pytest.mark.long
def test_local_b_sends_and_receives_a_only(local_b_run: dict[str, Any]) -> None:
    grid: ClientAppGrid = local_b_run["grid"]
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 2 * SITES
    # Every train reply holds the A matrices and nothing else
    for reply in train_replies:
        assert wire.is_packed(reply.content)  # fed.wire-layout's default, both ways
        keys = set(wire.unpack(reply.content)[0].array_records[wire.ARRAYS])
        assert keys and all(is_lora_a(k) for k in keys), sorted(keys)[:3]
    # Nothing the server sent or received, in any record, holds a B; except the
    # local-only adapters the benchmark-only baseline sends (output.local-only-baseline)
    received = array_keys(
        [r for r in grid.replies if wire.LOCAL_ONLY_ARRAYS not in r.content.array_records]
    )
    assert received and all(is_lora_a(k) for k in received)
    sent = [
        m for m in grid.sent if SITE_COMPARISON in m.content.config_records.get(wire.CONFIG, {})
    ]
    assert len(sent) == SITES
    train_sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(is_lora_a(k) for k in array_keys(train_sent))
    # The per-site comparison replies carry scores only
    comparison = [r for r in grid.replies if SITE_COMPARISON in r.content.metric_records]
    assert len(comparison) == SITES
    assert all(not r.content.array_records for r in comparison)


@pytest.mark.long
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

    final = load_file(
        str(local_b_run["tmp"] / "out" / "personal" / "final" / "adapter_model.safetensors")
    )
    assert set(final) == set(first) | {k.replace(".lora_B.", ".lora_A.") for k in first}
    assert all(not final[k].any() for k in first)


@pytest.mark.long
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
    # every site answered its bundled task file with all three adapters, against chance
    for row in table["sites"].values():
        (chance,) = [k for k in row if k.startswith("task-chance/")]
        task = chance.split("/", 1)[1]
        assert 0 < row[chance] < 1
        for name in ("local-only", "global", "personal"):
            assert 0 <= row[f"task-accuracy/{name}/{task}"] <= 1
    lines = format_table(table)
    assert lines[1].split() == ["site", "local-only", "global", "personal"]
    assert lines[3 + SITES].split() == [
        "site",
        "task",
        "local-only",
        "global",
        "personal",
        "chance",
    ]
    assert len(lines) == 2 + SITES + 2 + SITES + 1


@pytest.mark.long
def test_the_report_prints_the_per_site_table(
    local_b_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from flower_llm.report import format_outcome

    run_dir = local_b_run["tmp"] / "out" / "personal"
    text = format_outcome(run_dir, local_b_run["summary"])
    assert "held-out loss on each site's own data" in text
    assert "partition 0/2" in text and "partition 1/2" in text
    # ... and each site's bytes under the same label, its node id after it
    assert "partition 0/2 [node 1]" in text and "partition 1/2 [node 2]" in text
    # flower-llm report RUN_DIR prints it too
    from flower_llm.cli import main

    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "held-out loss on each site's own data" in out
    assert "personal beats global at every site: yes" in out


@pytest.mark.long
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


@pytest.mark.long
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
# One site, in process: fast
# --------------------------------------------------------------------------------------


def site_context(run_id: int, run_config: dict[str, Any], state_dir: Path) -> Context:
    return Context(
        run_id=run_id,
        node_id=1,
        node_config={
            "partition-id": 0,
            "num-partitions": SITES,
            SITE_STATE_DIR_KEY: str(state_dir),
        },
        state=RecordDict(),
        run_config=run_config,
    )


def train_message(shared: dict[str, np.ndarray], server_round: int) -> Message:
    from flwr.app import ConfigRecord, MessageType

    content = RecordDict(
        {
            wire.ARRAYS: wire.to_array_record(shared),
            wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round, wire.LEARNING_RATE: 1e-2}),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_a_local_b_site_replies_with_a_and_a_restarted_site_continues_its_b(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the global A a server sends under local-b
    from client_apps.qlora import app, local_b_site, session_for
    from flower_llm.adapters import adapter_state

    config = job(
        tiny_model_dir, tmp_path, **{"fed.personalization": "local-b", "train.local-steps": 2}
    )
    first = site_context(5, config, tmp_path / "state")
    session = session_for(first)
    shared = {k: v for k, v in adapter_state(session.model).items() if is_lora_a(k)}

    # Execute: round 1 at the site
    reply = app(train_message(shared, 1), first)

    # Assert: the reply holds A alone (trained), and nothing else in any record
    assert not reply.has_error(), reply.error
    assert set(array_keys([reply])) == set(shared)
    sent = wire.from_array_record(reply.content.array_records[wire.ARRAYS])
    assert any(not np.array_equal(sent[k], shared[k]) for k in shared)
    # ... its own B moved from PEFT's zeros and is kept in node state and in the store
    in_node_state = wire.from_array_record(first.state.array_records[PERSONAL_B])
    entry = read_entry(
        SiteStateStore(tmp_path / "state", "personal", "partition-0-of-2"), PERSONAL_B
    )
    assert entry is not None and entry[1] == {"run-id": 5, "last-round": 1}
    assert in_node_state.keys() == entry[0].keys() and all(not is_lora_a(k) for k in entry[0])
    assert any(np.abs(v).max() > 0 for v in entry[0].values())
    # A restarted site (empty node state) of a resumed run continues that B ...
    resumed = site_context(6, {**config, "output.resume": True}, tmp_path / "state")
    site = local_b_site(resumed, session_for(resumed))
    assert site is not None
    for key, value in site.own_b().items():
        np.testing.assert_array_equal(value, entry[0][key])
    # A round the site trained before an interruption the server never checkpointed is
    # trained again from the B it started from, not on top of itself
    after_one = entry[0]
    assert not app(train_message(shared, 2), first).has_error()
    after_two = wire.from_array_record(first.state.array_records[PERSONAL_B])
    resumed_b = {}
    for server_round in (2, 3):
        again = site_context(8, {**config, "output.resume": True}, tmp_path / "state")
        site = local_b_site(again, session_for(again))
        assert site is not None
        resumed_b[server_round] = site.own_b(server_round)
    for key in after_one:
        np.testing.assert_array_equal(resumed_b[2][key], after_one[key])
        np.testing.assert_array_equal(resumed_b[3][key], after_two[key])
    # ... a fresh run of the same name starts from zeros
    fresh = site_context(7, config, tmp_path / "state")
    site = local_b_site(fresh, session_for(fresh))
    assert site is not None and all(not v.any() for v in site.own_b().values())


def test_under_secagg_only_a_enters_the_secure_sum(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    from client_apps.qlora import session_and_keys
    from client_apps.secagg import SecAggClient
    from flower_llm import secagg

    config = job(
        tiny_model_dir,
        tmp_path,
        **{
            "fed.personalization": "local-b",
            "fed.aggregation": "secagg+",
            "fed.max-weight": 1000.0,  # bounds any partition of the 900 embedded examples
            "output.local-only-baseline": False,
            "train.local-steps": 1,
        },
    )
    context = site_context(3, config, tmp_path / "state")
    trainer, keys = session_and_keys(context)
    assert keys and all(is_lora_a(k) for k in keys) and keys == sorted(keys)
    session = trainer.site.session  # type: ignore[attr-defined]
    from flower_llm.adapters import adapter_state

    shared = {k: adapter_state(session.model)[k] for k in keys}
    fit_config: dict[str, bool | bytes | float | int | str] = {
        wire.SERVER_ROUND: 1,
        wire.LEARNING_RATE: 1e-2,
        secagg.CLIPPING_RANGE: 8.0,
        secagg.MAX_WEIGHT: 1000.0,
    }

    # Execute: the client's third-stage fit
    arrays, weight, _ = SecAggClient(trainer, keys).fit(secagg.state_to_arrays(shared), fit_config)

    # Assert: one array per A (plus the one of masked metrics), B kept at the site
    assert len(arrays) == len(keys) + 1
    assert [a.shape for a in arrays[: len(keys)]] == [shared[k].shape for k in keys]
    assert weight >= 1
    kept = wire.from_array_record(context.state.array_records[PERSONAL_B])
    assert kept and all(not is_lora_a(k) for k in kept)


def test_the_per_site_table_compares_every_site() -> None:
    from flower_llm.personal import per_site_table

    scores = {
        "b.jsonl": {
            "eval-loss/local-only": 2.0,
            "eval-loss/global": 1.5,
            "eval-loss/personal": 1.2,
        },
        "a.jsonl": {"eval-loss/global": 1.0, "eval-loss/personal": 0.9, "eval-tokens": 7},
    }
    table = per_site_table(scores)
    assert list(table["sites"]) == ["a.jsonl", "b.jsonl"]
    assert table["sites"]["a.jsonl"]["local-only"] is None
    assert table["sites"]["a.jsonl"]["eval-tokens"] == 7
    assert table["personal-beats-global-everywhere"] is True
    # a.jsonl has no local-only loss: "beats local-only everywhere" cannot be claimed
    assert table["personal-beats-local-only-everywhere"] is False
    lines = format_table(table)
    assert lines[2].split() == ["a.jsonl", "n/a", "1.0000", "0.9000"]
    scores["a.jsonl"]["eval-loss/personal"] = 1.1
    assert per_site_table(scores)["personal-beats-global-everywhere"] is False


# --------------------------------------------------------------------------------------
# finetune, and local-b under central DP
# --------------------------------------------------------------------------------------


@pytest.mark.long
def test_finetune_personalizes_after_the_rounds_and_only_scores_travel(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = job(
        tiny_model_dir,
        tmp_path / "out",
        **{
            "fed.personalization": "finetune",
            "personal.local-steps": 10,
            "personal.learning-rate": 0.003,  # 0.01 overshoots on the tiny model
            "output.local-only-baseline": True,
        },
    )
    grid = ClientAppGrid(1, config, tmp_path / "state")
    summary = run_server(grid, config)

    # The rounds are FedAvg of whole adapters
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert any(not is_lora_a(k) for k in array_keys(train))
    # The comparison replies hold scores only; each site kept its fine-tuned adapter
    comparison = [r for r in grid.replies if SITE_COMPARISON in r.content.metric_records]
    assert len(comparison) == SITES and all(not r.content.array_records for r in comparison)
    table = summary["per-site"]
    assert len(table["sites"]) == SITES
    for row in table["sites"].values():
        assert row["personal"] < row["global"]
    from safetensors.numpy import load_file

    final = load_file(str(tmp_path / "out" / "personal" / "final" / "adapter_model.safetensors"))
    for site in range(SITES):
        store = SiteStateStore(tmp_path / "state", "personal", f"partition-{site}-of-{SITES}")
        entry = read_entry(store, PERSONAL_ADAPTER)
        assert entry is not None and entry[1]["last-round"] == 2
        assert any(not np.allclose(entry[0][k], final[k]) for k in final)


@pytest.mark.long
def test_local_b_under_central_dp_noises_a_and_sends_a_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = job(
        tiny_model_dir,
        tmp_path / "out",
        **{
            "fed.personalization": "local-b",
            "privacy.mode": "server-fixed",
            "privacy.noise-multiplier": 0.5,
            "privacy.clip-norm": 1.0,
            "output.local-only-baseline": False,
        },
    )
    grid = ClientAppGrid(1, config, tmp_path / "state")
    summary = run_server(grid, config)
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert train and all(is_lora_a(k) for k in array_keys(train))
    assert summary["privacy"]["client-level"]["epsilon"] > 0
    assert summary["per-site"]["sites"] and summary["rounds-failed"] == 0


@pytest.mark.long
def test_local_b_under_secagg_runs_and_the_server_sees_a_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = job(
        tiny_model_dir,
        tmp_path / "out",
        **{
            "fed.personalization": "local-b",
            "fed.aggregation": "secagg+",
            "fed.max-weight": 1000.0,  # bounds any partition of the 900 embedded examples
            "fed.min-available-clients": 3,
            "output.local-only-baseline": False,
        },
    )
    grid = ClientAppGrid(1, config, tmp_path / "state", sites=3)
    summary = run_server(grid, config)
    assert summary["rounds-failed"] == 0 and summary["aggregation"] == "secagg+"
    # The global adapter that went down and was aggregated holds A only
    down = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert down and all(is_lora_a(k) for k in array_keys(down))
    assert len(summary["per-site"]["sites"]) == 3
    assert summary["per-site"]["personal-beats-global-everywhere"] is True
    for site in range(3):
        store = SiteStateStore(tmp_path / "state", "personal", f"partition-{site}-of-3")
        entry = read_entry(store, PERSONAL_B)
        assert entry is not None and entry[1]["last-round"] == 2


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
        ({"personal.learning-rate": -1.0}, "personal.learning-rate"),
    ],
)
def test_bad_personalization_settings_are_refused(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config(settings)


# --------------------------------------------------------------------------------------
# Site labels: unique and stable
# --------------------------------------------------------------------------------------


def test_sites_whose_files_share_a_base_name_get_distinct_stable_labels(tmp_path: Path) -> None:
    from client_apps.qlora import site_label
    from flower_llm.client import SiteIdentity
    from flower_llm.outputs import unique_site_names

    # Arrange: two sites whose data files are both called train.jsonl
    first = SiteIdentity(str(tmp_path / "hospital-a" / "train.jsonl"))
    second = SiteIdentity(str(tmp_path / "hospital-b" / "train.jsonl"))

    # Act / Assert: different labels that start with the file name, the same every time
    assert site_label(first) != site_label(second)
    assert site_label(first).startswith("train.jsonl #")
    assert site_label(first) == site_label(SiteIdentity(str(tmp_path / "hospital-a/train.jsonl")))
    assert site_label(SiteIdentity(None, 2, 4)) == "partition 2/4"
    # Two machines may still hold the same absolute path: the server adds the node.
    assert unique_site_names({7: "train.jsonl #abc123", 9: "train.jsonl #abc123", 3: "x"}) == {
        7: "train.jsonl #abc123 (node 7)",
        9: "train.jsonl #abc123 (node 9)",
        3: "x",
    }


def test_the_server_keeps_one_row_per_site_when_two_sites_give_one_label() -> None:
    from strategies.personal import compare_sites

    # Arrange: two sites that reply with the same label and different scores
    def reply(node: int, loss: float) -> SimpleNamespace:
        from flwr.app import ConfigRecord, MetricRecord

        content = RecordDict(
            {
                SITE_COMPARISON: MetricRecord(
                    {"eval-loss/global": 2.0, "eval-loss/personal": loss, "eval-tokens": 10}
                ),
                wire.SITE: ConfigRecord({"label": "train.jsonl #abc123"}),
            }
        )
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False, content=content
        )

    grid = SimpleNamespace(
        get_node_ids=lambda: [4, 5],
        send_and_receive=lambda messages, timeout: [reply(4, 1.0), reply(5, 1.5)],
    )
    from flwr.app import ArrayRecord

    # Act
    table = compare_sites(grid, ArrayRecord(), 2, 10.0)  # type: ignore[arg-type]

    # Assert: two rows, each with its own site's score
    assert table["sites"]["train.jsonl #abc123 (node 4)"]["personal"] == 1.0
    assert table["sites"]["train.jsonl #abc123 (node 5)"]["personal"] == 1.5


# --------------------------------------------------------------------------------------
# Resume: which personal.* changes are safe
# --------------------------------------------------------------------------------------


def test_resume_allows_the_finetune_settings_and_refuses_another_personalization() -> None:
    from flower_llm.checkpoint import config_mismatches, flat_config

    saved = flat_config(parse_run_config({"fed.personalization": "finetune"}))

    # Act / Assert: the end-of-run fine-tune's steps and rate may change (no round reads them)
    changed: dict[str, Any] = {
        "fed.personalization": "finetune",
        "personal.local-steps": 5,
        "personal.learning-rate": 1e-3,
    }
    assert config_mismatches(saved, parse_run_config(changed)) == []
    # ... the mode may not, with the reason
    problems = config_mismatches(saved, parse_run_config({"fed.personalization": "local-b"}))
    assert len(problems) == 1
    assert problems[0].startswith("fed.personalization: checkpoint 'finetune', now 'local-b' (")
    assert "what the server averages" in problems[0]


# --------------------------------------------------------------------------------------
# Task accuracy in the per-site comparison
# --------------------------------------------------------------------------------------


def comparison_scores(**overrides: Any) -> dict[str, Any]:
    scores: dict[str, Any] = {
        "eval-loss/global": 2.0,
        "eval-loss/personal": 1.5,
        "eval-tokens": 10,
        "task-questions/med": 8,
        "task-chance-sum/med": 2.0,
        "task-correct/global/med": 3,
        "task-correct/personal/med": 5,
    }
    return {**scores, **overrides}


def test_the_per_site_table_gives_task_accuracy_per_adapter_against_chance() -> None:
    from flower_llm.personal import per_site_table

    table = per_site_table({"site-a": comparison_scores()})
    row = table["sites"]["site-a"]

    assert row["task-accuracy/global/med"] == 3 / 8
    assert row["task-accuracy/personal/med"] == 5 / 8
    assert row["task-chance/med"] == 2.0 / 8
    assert "task-accuracy/local-only/med" not in row
    lines = format_table(table)
    assert lines[4].split() == ["site", "task", "local-only", "global", "personal", "chance"]
    assert lines[5].split() == ["site-a", "med", "n/a", "0.375", "0.625", "0.250"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"task-correct/personal/med": 9}, "outside [0, 8]"),
        ({"task-correct/personal/med": -1}, "outside [0, 8]"),
        ({"task-correct/personal/med": 2.5}, "not a whole count"),
        ({"task-chance-sum/med": 8.5}, "outside [0, 8]"),
        ({"task-questions/med": 0}, "not a whole number >= 1"),
        ({"task-questions/med": 7.5}, "not a whole number >= 1"),
        ({"task-correct/personal/med": float("nan")}, "not a finite number"),
    ],
)
def test_impossible_task_counts_list_the_site_as_missing(
    overrides: dict[str, Any], reason: str
) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    from strategies.personal import compare_sites

    def reply(node: int, scores: dict[str, Any]) -> SimpleNamespace:
        content = RecordDict(
            {
                SITE_COMPARISON: MetricRecord(scores),
                wire.SITE: ConfigRecord({"label": f"site {node}"}),
            }
        )
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False, content=content
        )

    sent: list[Message] = []

    def send_and_receive(messages: list[Message], timeout: float) -> list[SimpleNamespace]:
        sent.extend(messages)
        return [reply(1, comparison_scores()), reply(2, comparison_scores(**overrides))]

    grid = SimpleNamespace(get_node_ids=lambda: [1, 2], send_and_receive=send_and_receive)

    table = compare_sites(grid, ArrayRecord(), 3, 10.0, tasks=True)  # type: ignore[arg-type]

    # the instruction asks for the task files; the bad site is left out with the reason
    assert all(m.content.config_records[wire.CONFIG][wire.EVAL_TASKS] is True for m in sent)
    assert list(table["sites"]) == ["site 1"]
    assert reason in table["missing"]["node 2"]
