"""WeightedFedAvg: same maths as Flower's FedAvg, but bad replies are dropped, not fatal."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_llm import wire
from flower_llm.aggregation import weighted_average
from strategies.fedavg import WeightedFedAvg
from strategies.rounds import PollingGrid


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    """Messages are stamped with the run and node of the process that makes them."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


SHAPES = {"layer.lora_A.weight": (4, 16), "layer.lora_B.weight": (16, 4)}


def make_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def reply(node_id: int, state: dict[str, np.ndarray] | None, **metrics: float) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict({wire.METRICS: MetricRecord(dict(metrics))})
    if state is not None:
        content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in state.items()})
    return Message(content, reply_to=instruction)


def strategy_with_reference(**kwargs: object) -> WeightedFedAvg:
    strategy = WeightedFedAvg(**kwargs)  # type: ignore[arg-type]
    strategy.reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy.report.sampled = [1, 2, 3, 4]
    return strategy


def test_weighted_average_equals_flower_fedavg() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    states = [make_state(rng) for _ in range(3)]
    counts = [10, 30, 60]
    replies = [
        reply(i + 1, s, **{wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: 1.0 + i})
        for i, (s, n) in enumerate(zip(states, counts, strict=True))
    ]
    ours = strategy_with_reference()

    # Execute
    flower_arrays, flower_metrics = FedAvg().aggregate_train(1, replies)
    our_arrays, our_metrics = ours.aggregate_train(1, replies)

    # Assert
    assert flower_arrays is not None and our_arrays is not None
    for key in SHAPES:
        np.testing.assert_allclose(
            our_arrays[key].numpy(), flower_arrays[key].numpy(), rtol=1e-6, atol=1e-7
        )
    assert flower_metrics is not None and our_metrics is not None
    assert our_metrics[wire.TRAIN_LOSS] == pytest.approx(flower_metrics[wire.TRAIN_LOSS])
    assert our_metrics[wire.NUM_EXAMPLES] == sum(counts)


def test_hand_computed_average() -> None:
    # Prepare: w = (1*a + 3*b) / 4
    a = {"w": np.full((2, 2), 1.0, np.float32)}
    b = {"w": np.full((2, 2), 5.0, np.float32)}

    # Execute
    avg = weighted_average([a, b], [1, 3])

    # Assert
    np.testing.assert_array_equal(avg["w"], np.full((2, 2), 4.0, np.float32))


@settings(max_examples=50, deadline=None)
@given(
    weights=st.lists(st.floats(0.1, 1e4), min_size=1, max_size=6),
    value=st.floats(-100, 100),
)
def test_average_of_identical_states_is_that_state(weights: list[float], value: float) -> None:
    state = {"w": np.full((3,), value, np.float32)}
    avg = weighted_average([state] * len(weights), weights)
    np.testing.assert_allclose(avg["w"], state["w"], rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    scale=st.floats(0.01, 1000),
    seed=st.integers(0, 2**16),
)
def test_average_is_invariant_to_weight_scale(scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    states = [make_state(rng) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    base = weighted_average(states, weights)
    scaled = weighted_average(states, [w * scale for w in weights])
    for key in base:
        np.testing.assert_allclose(base[key], scaled[key], rtol=1e-5, atol=1e-6)


def test_weighting_by_tokens_uses_num_tokens() -> None:
    # Prepare
    a = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    b = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    replies = [
        reply(1, a, **{wire.NUM_EXAMPLES: 100, wire.NUM_TOKENS: 1}),
        reply(2, b, **{wire.NUM_EXAMPLES: 1, wire.NUM_TOKENS: 3}),
    ]

    # Execute
    arrays, _ = strategy_with_reference(weighting="tokens").aggregate_train(1, replies)

    # Assert: token weights 1:3 give 0.75, example weights would give ~0.01
    assert arrays is not None
    np.testing.assert_allclose(arrays["layer.lora_A.weight"].numpy(), 0.75)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("nan", "NaN"),
        ("shape", "shape"),
        ("missing-key", "missing"),
        ("zero-weight", "not positive"),
        ("negative-weight", "not positive"),
        ("no-weight", "missing"),
        ("int-dtype", "dtype"),
        ("no-arrays", "no ArrayRecord"),
        ("error", "client error"),
    ],
)
def test_malformed_reply_is_dropped_and_round_goes_on(bad: str, reason: str) -> None:
    # Prepare
    rng = np.random.default_rng(1)
    good = [reply(i, make_state(rng), **{wire.NUM_EXAMPLES: 10}) for i in (1, 2, 3)]
    state = make_state(rng)
    weight: dict[str, float] = {wire.NUM_EXAMPLES: 10}
    if bad == "nan":
        state["layer.lora_A.weight"][0, 0] = np.nan
    elif bad == "shape":
        state["layer.lora_A.weight"] = np.zeros((5, 16), np.float32)
    elif bad == "missing-key":
        del state["layer.lora_B.weight"]
    elif bad == "zero-weight":
        weight = {wire.NUM_EXAMPLES: 0}
    elif bad == "negative-weight":
        weight = {wire.NUM_EXAMPLES: -5}
    elif bad == "no-weight":
        weight = {wire.TRAIN_LOSS: 1.0}
    elif bad == "int-dtype":
        state["layer.lora_A.weight"] = np.ones((4, 16), np.int32)
    if bad == "no-arrays":
        broken = reply(4, None, **weight)
    elif bad == "error":
        instruction = Message(RecordDict(), dst_node_id=4, message_type=MessageType.TRAIN)
        broken = Message(Error(code=1, reason="CUDA out of memory"), reply_to=instruction)
    else:
        broken = reply(4, state, **weight)
    strategy = strategy_with_reference()

    # Execute
    arrays, _ = strategy.aggregate_train(1, [*good, broken])

    # Assert: aggregate of the three good replies only
    expected = weighted_average(
        [wire.from_array_record(m.content[wire.ARRAYS]) for m in good], [10, 10, 10]
    )
    assert arrays is not None
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6)
    assert 4 in strategy.report.dropped
    assert reason in strategy.report.dropped[4]
    assert strategy.report.accepted == [1, 2, 3]


def test_too_few_valid_replies_keeps_previous_adapter() -> None:
    # Prepare
    rng = np.random.default_rng(2)
    nan_state = make_state(rng)
    nan_state["layer.lora_B.weight"][:] = np.inf
    replies = [
        reply(1, make_state(rng), **{wire.NUM_EXAMPLES: 5}),
        reply(2, nan_state, **{wire.NUM_EXAMPLES: 5}),
    ]
    strategy = strategy_with_reference(min_train_clients=2)

    # Execute
    arrays, metrics = strategy.aggregate_train(3, replies)

    # Assert
    assert arrays is None and metrics is None
    assert not strategy.report.updated
    assert set(strategy.report.dropped) == {2, 3, 4}  # 3 and 4 never replied


def test_invalid_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match="weighting"):
        WeightedFedAvg(weighting="bytes")


def test_every_non_finite_reply_is_named_and_the_rest_averaged() -> None:
    # The aggregate is checked once; a non-finite one sends the strategy back to find
    # each offender, which must all be dropped, whatever their position or dtype.
    rng = np.random.default_rng(5)
    good = {n: make_state(rng) for n in (1, 3)}
    nan16 = {k: v.astype(np.float16) for k, v in make_state(rng).items()}
    nan16["layer.lora_B.weight"][2, 1] = np.nan
    inf32 = make_state(rng)
    inf32["layer.lora_A.weight"][0, 3] = -np.inf
    replies = [
        reply(4, inf32, **{wire.NUM_EXAMPLES: 7}),
        reply(3, good[3], **{wire.NUM_EXAMPLES: 2}),
        reply(2, nan16, **{wire.NUM_EXAMPLES: 9}),
        reply(1, good[1], **{wire.NUM_EXAMPLES: 6}),
    ]
    strategy = strategy_with_reference()

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    assert strategy.report.accepted == [1, 3]
    assert [n for n, r in strategy.report.dropped.items() if "NaN or Inf" in r] == [2, 4]
    assert "'layer.lora_B.weight'" in strategy.report.dropped[2]
    assert [r.node_id for r in strategy.last_valid] == [1, 3]
    assert metrics[wire.NUM_EXAMPLES] == 8
    for key in SHAPES:
        expected = (6 * good[1][key].astype(np.float64) + 2 * good[3][key]) / 8
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)


def test_mixed_wire_dtypes_average_as_their_float32_decodings() -> None:
    rng = np.random.default_rng(6)
    states = [make_state(rng) for _ in range(3)]
    sent = [states[0], {k: v.astype(np.float16) for k, v in states[1].items()}, states[2]]
    replies = [reply(n, s, **{wire.NUM_EXAMPLES: n}) for n, s in zip((1, 2, 3), sent, strict=True)]
    strategy = strategy_with_reference()

    arrays, _ = strategy.aggregate_train(1, replies)

    decoded = [wire.from_array_record(m.content[wire.ARRAYS]) for m in replies]
    expected = weighted_average(decoded, [1, 2, 3])
    assert arrays is not None
    for key in SHAPES:
        np.testing.assert_array_equal(arrays[key].numpy(), expected[key])


# --------------------------------------------------------------------------------------
# PollingGrid: replies within a fraction of a second, lost nodes after the timeout
# --------------------------------------------------------------------------------------


class SuperLinkGrid:
    """Replies become pullable ``delays[node]`` pulls after the push; None never replies."""

    def __init__(self, delays: dict[int, int | None]) -> None:
        self.delays = delays
        self.pulls = 0
        self.sent: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
        return list(self.sent)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        ready = []
        for mid in message_ids:
            delay = self.delays[self.sent[mid].metadata.dst_node_id]
            if delay is not None and self.pulls >= delay:
                ready.append(Message(RecordDict(), reply_to=self.sent[mid]))
        return ready


def instructions(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def test_polling_grid_returns_every_reply_once_as_it_arrives() -> None:
    grid = SuperLinkGrid({11: 1, 22: 3, 33: 2})

    replies = PollingGrid(grid, poll_seconds=0.01).send_and_receive(
        instructions([11, 22, 33]), timeout=60
    )

    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m2", "m1"]
    assert grid.pulls == 3  # stopped pulling once every reply was in
    assert PollingGrid(grid).get_node_ids() == [11, 22, 33]  # the rest is the grid's


def test_polling_grid_gives_up_on_a_silent_node_at_the_timeout() -> None:
    grid = SuperLinkGrid({11: 1, 22: None})

    replies = PollingGrid(grid, poll_seconds=0.01).send_and_receive(
        instructions([11, 22]), timeout=0.2
    )

    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.pulls > 2  # it kept asking for node 22 until the timeout
