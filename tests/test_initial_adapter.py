"""``initial`` instructions: sites rebuild the run's seeded initial adapter instead of
downloading it (``fed.initial-from-seed``), through the real ClientApp and strategies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from benchmarks.sites import site_contexts
from flower_llm import compression, updates, wire
from flower_llm.compression import WIRE_FORMAT, Header, WireFormatError
from flower_llm.config import parse_run_config
from strategies.fedavg import WeightedFedAvg


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Nodes:
    """A grid that only lists its nodes (messages are handed to the ClientApp here)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def server_side(run_config: dict[str, Any]) -> tuple[Any, WeightedFedAvg, Any]:
    """The strategy of ``run_config`` and its initial global adapter, built as the
    ServerApp builds them; returns (strategy, its inner WeightedFedAvg, arrays)."""
    from flower_llm.adapters import init_adapter
    from flower_llm.models import resolve_model_path
    from flower_llm.personal import shared_part
    from server_apps.fedavg import build_strategy

    cfg = parse_run_config(run_config)
    state, _ = init_adapter(cfg.model, cfg.lora, resolve_model_path(cfg.model), cfg.seed)
    shared = shared_part(state, cfg.fed.personalization)
    arrays = wire.to_array_record(shared, cfg.fed.wire_dtype)
    strategy = build_strategy(cfg)
    inner = getattr(strategy, "strategy", strategy)
    inner.use_initial(arrays, updates.InitialRecipe.of(shared, cfg.seed))
    return strategy, inner, arrays


def job(tiny_model_dir: Path, tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return {
        "model.name": str(tiny_model_dir),
        "fed.min-available-clients": 1,
        "fed.min-train-clients": 1,
        "train.local-steps": 1,
        "train.batch-size": 4,
        "output.local-only-baseline": False,
        "output.dir": str(tmp_path / "out"),
        **settings,
    }


def site(run_config: dict[str, Any], tmp_path: Path, sites: int = 2) -> Any:
    """Node 1's Context (partition 0 of ``sites``)."""
    return site_contexts(1, run_config, tmp_path / "sites", sites)[0]


@pytest.mark.parametrize(
    ("wire_dtype", "settings"),
    [
        ("float32", {}),
        ("float16", {"fed.wire-layout": "arrays"}),
        ("nf4", {"lora.aggregation": "ffa"}),
        ("float32", {"fed.personalization": "local-b"}),
        # exact aggregation, node 1 at rank 2 under lora.r = 4: it rebuilds the rank-4
        # global adapter from its rank-2 model
        ("float32", {"lora.r": 4, "lora.aggregation": "exact", "lora.site-ranks": "2,4"}),
    ],
)
def test_an_initial_instruction_carries_no_arrays_and_the_site_rebuilds_the_adapter_bit_for_bit(
    tiny_model_dir: Path, tmp_path: Path, wire_dtype: str, settings: dict[str, Any]
) -> None:
    from client_apps.qlora import app, session_for

    # Prepare: the server's strategy and initial adapter; one site of the real ClientApp
    run_config = job(tiny_model_dir, tmp_path, **{"fed.wire-dtype": wire_dtype, **settings})
    strategy, inner, arrays = server_side(run_config)
    context = site(run_config, tmp_path)

    # Execute: round 0's evaluation message, answered by the ClientApp
    (message,) = strategy.configure_evaluate(0, arrays, ConfigRecord(), Nodes([1]))
    reply = app(message, context)

    # Assert: no adapter arrays travel, only a header and the recipe (counted as sent)
    content, packed = wire.unpack(message.content)
    assert packed == (settings.get("fed.wire-layout", "packed") == "packed")
    assert len(content.array_records[wire.ARRAYS]) == 0
    header = Header.from_record(content.config_records[WIRE_FORMAT])
    assert header.content == "initial" and header.codec == wire_dtype
    sent = wire.payload_bytes(message.content)
    assert inner.report.bytes_down_eval == sent and 0 < sent < 1000
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # ... the site's adapter is the server's, bit for bit (float16-rounded in float16)
    session = session_for(context)
    rebuilt, _ = updates.receive(RecordDict(), content, None, session.initial_global)
    expected = wire.from_array_record(arrays)
    assert rebuilt.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(rebuilt[key], value, err_msg=key)
    # ... and the ClientApp evaluated exactly that adapter: the same loss as when the
    # arrays themselves are sent (a plain message)
    plain = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 0})})
    direct = app(Message(plain, dst_node_id=1, message_type=MessageType.EVALUATE), context)
    loss = reply.content.metric_records[wire.METRICS][wire.EVAL_LOSS]
    assert loss == direct.content.metric_records[wire.METRICS][wire.EVAL_LOSS]
    # ... a copy of the initial adapter is recognised as it, a changed one is not
    assert inner.is_initial(wire.to_array_record(expected, "float32"))
    moved = {k: v + np.float32(1e-3) for k, v in expected.items()}
    if inner.downlink is None:
        assert not inner.is_initial(wire.to_array_record(moved))
    else:
        # Compressed: the site now holds version 0 and says so; round 1 sends it nothing
        assert WIRE_FORMAT in reply.content.config_records
        strategy.aggregate_evaluate(0, [reply])
        (train,) = strategy.configure_train(1, arrays, ConfigRecord(), Nodes([1]))
        head = wire.unpack(train.content)[0].config_records[WIRE_FORMAT]
        assert head["content"] == "same"


def test_a_site_that_rebuilds_another_adapter_names_the_difference_and_gets_the_arrays(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from client_apps.qlora import app

    # Prepare: a compressed run whose site was given another seed than the server
    server_config = job(tiny_model_dir, tmp_path, **{"fed.wire-dtype": "nf4", "seed": 42})
    strategy, inner, arrays = server_side(server_config)
    context = site({**server_config, "seed": 7}, tmp_path)

    # Execute: round 0's evaluation, then round 1's training
    (message,) = strategy.configure_evaluate(0, arrays, ConfigRecord(), Nodes([1]))
    refused = app(message, context)
    strategy.aggregate_evaluate(0, [refused])
    (train,) = strategy.configure_train(1, arrays, ConfigRecord(), Nodes([1]))
    trained = app(train, context)
    new_arrays, _ = strategy.aggregate_train(1, [trained])

    # Assert: a clear error reply naming the seeds; then the whole adapter, no round lost
    assert refused.has_error()
    reason = refused.error.reason
    assert "InitialAdapterMismatch" in reason and "seed 7 at this site, 42 at the server" in reason
    assert inner.refuses_initial == {1}
    head = wire.unpack(train.content)[0].config_records[WIRE_FORMAT]
    assert head["content"] == "adapter" and head["codec"] == "float32"
    assert not trained.has_error()
    assert new_arrays is not None and inner.report.accepted == [1] and not inner.report.dropped


def test_a_float32_site_that_cannot_rebuild_gets_the_arrays_on_its_next_contact() -> None:
    # Prepare: a whole-adapter run; the site answers the initial instruction with an error
    state = {"m.lora_A.weight": np.ones((2, 3), np.float32), "m.lora_B.weight": np.zeros((3, 2))}
    arrays = wire.to_array_record(state)
    strategy = WeightedFedAvg(min_available_clients=2, min_train_clients=1)
    strategy.use_initial(arrays, updates.InitialRecipe.of(state, 1))
    messages = list(strategy.configure_evaluate(0, arrays, ConfigRecord(), Nodes([1, 2])))  # type: ignore[arg-type]
    error = Error(0, "InitialAdapterMismatch: torch 2.5 at this site")
    replies = [Message(error, reply_to=messages[0])]

    # Execute
    strategy.aggregate_evaluate(0, replies)
    again = strategy.messages_for([1, 2], arrays, ConfigRecord(), MessageType.TRAIN)

    # Assert: node 1 gets the arrays, node 2 (no error) the instruction again
    kinds = {
        m.metadata.dst_node_id: len(wire.unpack(m.content)[0].array_records[wire.ARRAYS])
        for m in again
    }
    assert kinds == {1: 2, 2: 0}
    assert strategy.refuses_initial == {1}


def test_an_initial_instruction_is_checked_before_it_is_trusted() -> None:
    # Prepare: an instruction for the adapter ``state``, and a site that rebuilds it
    state = {"m.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    recipe = updates.InitialRecipe.of(state, 5)
    held = updates.Held(0, compression.digest(state))
    content = updates.initial_message("int8", 64, held, recipe)
    node_state = RecordDict()

    # Execute / Assert: the right rebuild is held as version 0 (with its digest)
    rebuilt, header = updates.receive(node_state, content, None, lambda: (dict(state), recipe))
    assert header is not None and header.content == "initial"
    np.testing.assert_array_equal(rebuilt["m.lora_A.weight"], state["m.lora_A.weight"])
    assert node_state.config_records[updates.HELD_GLOBAL_META]["digest"] == held.digest
    # ... a rebuild of other values names what differs, or says the values differ
    other = {"m.lora_A.weight": state["m.lora_A.weight"] + 1}
    with pytest.raises(updates.InitialAdapterMismatch, match="other values"):
        updates.receive(RecordDict(), content, None, lambda: (other, recipe))
    bigger = updates.InitialRecipe(5, 1, 7, recipe.torch)
    with pytest.raises(
        updates.InitialAdapterMismatch, match="adapter parameters 7 at this site, 6"
    ):
        updates.receive(RecordDict(), content, None, lambda: (other, bigger))
    # ... a site with no way to rebuild, and a message without its recipe, are refused
    with pytest.raises(updates.InitialAdapterMismatch, match="cannot rebuild"):
        updates.receive(RecordDict(), content, None)
    del content[wire.INITIAL]
    with pytest.raises(WireFormatError, match="without its 'initial-adapter' record"):
        updates.receive(RecordDict(), content, None, lambda: (dict(state), recipe))
    # ... and an initial header that carries arrays is refused by decode
    bad = Header("int8", 64, "initial", (), 0, held.digest)
    with pytest.raises(WireFormatError, match="carries arrays"):
        compression.decode(wire.to_array_record(state), bad)


@pytest.mark.parametrize("wire_dtype", ["float32", "int8"])
def test_dp_fedavg_rounds_send_the_initial_instruction_with_the_clip_norm(
    tiny_model_dir: Path, tmp_path: Path, wire_dtype: str
) -> None:
    from client_apps.qlora import app

    # Prepare: client-fixed DP-FedAvg, every site sampled
    clip = 0.05
    run_config = job(
        tiny_model_dir,
        tmp_path,
        **{
            "fed.wire-dtype": wire_dtype,
            "fed.fraction-train": 1.0,
            "fed.min-available-clients": 2,
            "privacy.mode": "client-fixed",
            "privacy.clip-norm": clip,
            "privacy.noise-multiplier": 0.5,
        },
    )
    strategy, inner, arrays = server_side(run_config)
    context = site(run_config, tmp_path)

    # Execute: the DP wrapper's own round-1 sampling and messages
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Nodes([1, 2])))
    reply = app(next(m for m in messages if m.metadata.dst_node_id == 1), context)

    # Assert: every site is told to rebuild (no arrays), with the clip norm to apply
    for message in messages:
        content, _ = wire.unpack(message.content)
        assert len(content.array_records[wire.ARRAYS]) == 0
        assert content.config_records[WIRE_FORMAT]["content"] == "initial"
        assert content.config_records[wire.CONFIG][wire.CLIP_NORM] == clip
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # ... and the site's update from the rebuilt adapter is within the clip norm
    replied, _ = wire.unpack(reply.content)
    if wire_dtype == "float32":
        sent = wire.from_array_record(replied.array_records[wire.ARRAYS])
        start = wire.from_array_record(arrays)
        update = {k: sent[k] - start[k] for k in sent}
    else:
        header = Header.from_record(replied.config_records[WIRE_FORMAT])
        assert header.global_version == 0 and header.global_digest == inner.initial.held.digest  # type: ignore[union-attr]
        update = compression.decode(replied.array_records[wire.ARRAYS], header)
    norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in update.values())))
    assert 0 < norm <= clip * (1 + 1e-5)
