"""Weighting by data size, bounded replies and robust rules, with hostile replies in-process.

Every hostile case must be dropped (or clamped, when asked) with a reason, and the
aggregate over the remaining replies must equal FedAvg of exactly those replies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from flower_llm import wire
from flower_llm.aggregation import (
    ReplyBounds,
    bound_reply,
    derive_max_weight,
    derive_update_bound,
    robust_aggregate,
    weighted_average,
)
from flower_llm.config import ConfigError, parse_run_config
from strategies.fedavg import WeightedFedAvg


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    """Messages are stamped with the run and node of the process that makes them."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


SHAPES = {"layer.lora_A.weight": (4, 16), "layer.lora_B.weight": (16, 4)}
BOUND = 0.05
"""Per-value update bound of these tests' rounds."""


def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {k: rng.normal(0, 0.1, size=s).astype(np.float32) for k, s in SHAPES.items()}


def honest_state(seed: int) -> dict[str, np.ndarray]:
    """The global adapter moved by at most 0.02 per value, as local training would."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.uniform(-0.02, 0.02, size=v.shape)).astype(np.float32)
        for k, v in global_state().items()
    }


def reply(node_id: int, state: dict[str, np.ndarray], **metrics: float) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    counts = {wire.NUM_EXAMPLES: 100, wire.NUM_EXAMPLES_SEEN: 160, wire.NUM_TOKENS: 1000}
    content = RecordDict(
        {
            wire.METRICS: MetricRecord({**counts, **metrics}),
            wire.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
        }
    )
    return Message(content, reply_to=instruction)


def strategy_for_round(sampled: list[int], **kwargs: object) -> WeightedFedAvg:
    """A strategy in round 1 whose sites start from :func:`global_state`."""
    options: dict[str, object] = {
        "max_weight": 10_000.0,
        "update_bound": lambda _round, _peak: BOUND,
        "min_train_clients": 1,
    }
    strategy = WeightedFedAvg(**{**options, **kwargs})  # type: ignore[arg-type]
    strategy.start_round(1, wire.to_array_record(global_state()))
    strategy.report.sampled = sampled
    return strategy


def decoded(arrays: ArrayRecord | None) -> dict[str, np.ndarray]:
    assert arrays is not None
    return wire.from_array_record(arrays)


# --------------------------------------------------------------------------------------
# Weighting: n_k is the data a site holds
# --------------------------------------------------------------------------------------


def test_sites_of_very_different_sizes_weigh_by_the_examples_they_hold() -> None:
    # Prepare: three sites holding 10, 10,000 and 100 examples, each trained on 160 this
    # round (the same local steps everywhere, as the ClientApp reports)
    states = [honest_state(s) for s in (1, 2, 3)]
    held = [10, 10_000, 100]
    replies = [
        reply(i + 1, s, **{wire.NUM_EXAMPLES: n, wire.NUM_EXAMPLES_SEEN: 160})
        for i, (s, n) in enumerate(zip(states, held, strict=True))
    ]

    # Execute
    by_examples = decoded(strategy_for_round([1, 2, 3]).aggregate_train(1, replies)[0])
    by_seen = decoded(
        strategy_for_round([1, 2, 3], weighting="seen").aggregate_train(1, replies)[0]
    )
    uniform = decoded(
        strategy_for_round([1, 2, 3], weighting="uniform").aggregate_train(1, replies)[0]
    )

    # Assert: the data-size-weighted average, far from the uniform one; "seen" and
    # "uniform" agree here because every site trained on 160 examples
    expected = weighted_average(states, held)
    plain_mean = weighted_average(states, [1, 1, 1])
    for key in SHAPES:
        np.testing.assert_array_equal(by_examples[key], expected[key])
        np.testing.assert_array_equal(uniform[key], plain_mean[key])
        np.testing.assert_allclose(by_seen[key], plain_mean[key], rtol=1e-6, atol=1e-7)
        assert np.abs(by_examples[key] - uniform[key]).max() > 1e-3
        # the big site (99 % of the data) dominates
        big = states[1][key]
        assert np.abs(by_examples[key] - big).max() < 0.1 * np.abs(uniform[key] - big).max()


def test_weighting_by_tokens_held_uses_num_tokens() -> None:
    # Prepare
    states = [honest_state(s) for s in (1, 2)]
    replies = [
        reply(1, states[0], **{wire.NUM_TOKENS: 300, wire.NUM_EXAMPLES: 1}),
        reply(2, states[1], **{wire.NUM_TOKENS: 100, wire.NUM_EXAMPLES: 1}),
    ]

    # Execute
    arrays, metrics = strategy_for_round([1, 2], weighting="tokens").aggregate_train(1, replies)

    # Assert
    expected = weighted_average(states, [300, 100])
    for key in SHAPES:
        np.testing.assert_array_equal(decoded(arrays)[key], expected[key])
    assert metrics is not None and metrics[wire.NUM_TOKENS] == 400


def test_uniform_weighting_needs_no_weight_metric() -> None:
    # Prepare: replies with only a loss; a missing count must not drop them under uniform
    states = [honest_state(s) for s in (1, 2)]
    replies = [
        Message(
            RecordDict(
                {
                    wire.METRICS: MetricRecord({wire.TRAIN_LOSS: 1.0}),
                    wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in s.items()}),
                }
            ),
            reply_to=Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN),
        )
        for n, s in zip((1, 2), states, strict=True)
    ]

    # Execute
    strategy = strategy_for_round([1, 2], weighting="uniform")
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert strategy.report.accepted == [1, 2]
    np.testing.assert_array_equal(
        decoded(arrays)["layer.lora_B.weight"],
        weighted_average(states, [1, 1])["layer.lora_B.weight"],
    )


# --------------------------------------------------------------------------------------
# Hostile replies
# --------------------------------------------------------------------------------------


def hostile_float64(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float64) for k, s in SHAPES.items()}


HOSTILE = {
    "finite 1e30 values": (
        lambda: {k: np.full(s, 1e30, np.float32) for k, s in SHAPES.items()},
        {},
        "beyond the per-value update bound",
    ),
    "a claimed weight of 1e12": (
        lambda: honest_state(9),
        {wire.NUM_EXAMPLES: 1e12},
        "above fed.max-weight",
    ),
    "float64 1e300, overflowing a float32 cast": (
        lambda: hostile_float64(1e300),
        {},
        "beyond float32's range",
    ),
    "NaN": (
        lambda: {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()},
        {},
        "NaN or Inf",
    ),
    "an update just beyond the AdamW bound": (
        lambda: {k: v + np.float32(2 * BOUND) for k, v in global_state().items()},
        {},
        "beyond the per-value update bound",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_reply_is_dropped_with_its_reason_and_the_rest_averaged(case: str) -> None:
    # Prepare: three honest sites and one hostile one
    make, metrics, reason = HOSTILE[case]
    honest = {n: honest_state(n) for n in (1, 2, 4)}
    held = {1: 50, 2: 200, 4: 750}
    replies = [reply(n, s, **{wire.NUM_EXAMPLES: held[n]}) for n, s in honest.items()]
    replies.insert(2, reply(3, make(), **metrics))
    strategy = strategy_for_round([1, 2, 3, 4])

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: dropped with the reason; the aggregate is FedAvg of the other three, exactly
    assert strategy.report.accepted == [1, 2, 4]
    assert reason in strategy.report.dropped[3]
    expected = weighted_average([honest[n] for n in (1, 2, 4)], [50, 200, 750])
    for key in SHAPES:
        np.testing.assert_array_equal(decoded(arrays)[key], expected[key])


def test_float64_1e300_is_caught_even_with_every_bound_off() -> None:
    # Prepare: no weight bound, no update bound; the reply is finite in float64
    honest = honest_state(1)
    strategy = strategy_for_round([1, 2], max_weight=math.inf, update_bound=None)

    # Execute
    arrays, _ = strategy.aggregate_train(1, [reply(1, honest), reply(2, hostile_float64(1e300))])

    # Assert: not an Inf aggregate, the honest reply alone
    assert "beyond float32's range" in strategy.report.dropped[2]
    for key in SHAPES:
        assert np.isfinite(decoded(arrays)[key]).all()
        np.testing.assert_array_equal(decoded(arrays)[key], honest[key])


def test_two_weights_of_1e308_do_not_overflow_the_weight_sum() -> None:
    # Prepare: with the weight bound off, two replies claiming 1e308 each (their sum is Inf)
    states = [honest_state(1), honest_state(2)]
    replies = [
        reply(n, s, **{wire.NUM_EXAMPLES: 1e308, wire.TRAIN_LOSS: 1.0 + n})
        for n, s in zip((1, 2), states, strict=True)
    ]
    unbounded = strategy_for_round([1, 2], max_weight=math.inf)
    bounded = strategy_for_round([1, 2])

    # Execute
    arrays, metrics = unbounded.aggregate_train(1, replies)
    refused, _ = bounded.aggregate_train(1, replies)

    # Assert: the equal-weight average (not zeros, not NaN); with the default bound both
    # replies are dropped and the round keeps the previous adapter
    mean = weighted_average(states, [1, 1])
    for key in SHAPES:
        np.testing.assert_allclose(decoded(arrays)[key], mean[key], rtol=1e-6)
        assert np.abs(decoded(arrays)[key]).max() > 0
    assert metrics is not None and metrics[wire.TRAIN_LOSS] == pytest.approx(2.5)
    assert refused is None
    assert all("above fed.max-weight" in r for r in bounded.report.dropped.values())


def test_unsampled_node_and_second_reply_are_refused() -> None:
    # Prepare: node 9 was not sampled; node 2 replies twice (the second one hostile)
    honest = {n: honest_state(n) for n in (1, 2)}
    replies = [
        reply(1, honest[1]),
        reply(2, honest[2]),
        reply(2, {k: np.full(s, 1e30, np.float32) for k, s in SHAPES.items()}),
        reply(9, honest_state(9)),
    ]
    strategy = strategy_for_round([1, 2])

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert strategy.report.accepted == [1, 2]
    assert strategy.report.dropped == {}
    assert strategy.report.refused == [
        "second reply from node 2 this round",
        "node 9 was not sampled this round",
    ]
    assert strategy.report.aggregation_row()["refused"] == strategy.report.refused
    expected = weighted_average([honest[1], honest[2]], [100, 100])
    for key in SHAPES:
        np.testing.assert_array_equal(decoded(arrays)[key], expected[key])


def test_clamping_bounds_the_reply_and_averages_the_clamped_update() -> None:
    # Prepare: one site moves every value by +1 and claims 1e12 examples
    ref = global_state()
    attacker = {k: v + np.float32(1.0) for k, v in ref.items()}
    honest = honest_state(1)
    strategy = strategy_for_round([1, 2], clamp=True, max_weight=1000.0)

    # Execute
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, honest), reply(2, attacker, **{wire.NUM_EXAMPLES: 1e12})]
    )

    # Assert: kept, moved by exactly the bound, weighing the max weight
    assert strategy.report.accepted == [1, 2]
    assert any("clamped to fed.max-weight" in c for c in strategy.report.clamped[2])
    clamped = {k: v.astype(np.float64) + BOUND for k, v in ref.items()}
    expected = weighted_average([honest, clamped], [100, 1000])
    for key in SHAPES:
        np.testing.assert_array_equal(decoded(arrays)[key], expected[key])


def test_update_norm_bound_drops_or_scales_a_large_update() -> None:
    # Prepare: an update of L2 norm 2 against a bound of 1 (values within the per-value bound)
    ref = global_state()
    direction = {k: np.full(s, 1.0) for k, s in SHAPES.items()}
    norm = math.sqrt(sum(v.size for v in direction.values()))
    state = {k: ref[k] + 2.0 * direction[k] / norm for k in ref}
    bounds = ReplyBounds(max_update_norm=1.0)

    # Execute
    dropped = bound_reply(state, ref, 1.0, bounds)
    scaled = bound_reply(state, ref, 1.0, ReplyBounds(max_update_norm=1.0, clamp=True))

    # Assert
    assert isinstance(dropped, str) and "above fed.max-update-norm = 1" in dropped
    assert not isinstance(scaled, str)
    assert scaled.update_norm == pytest.approx(2.0)
    new_norm = math.sqrt(sum(float(np.sum((scaled.state[k] - ref[k]) ** 2)) for k in ref))
    assert new_norm == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------------------
# Robust rules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["norm-bound", "trimmed-mean", "median"])
def test_robust_rules_resist_one_scaled_update_that_plain_fedavg_follows(rule: str) -> None:
    # Prepare: four honest updates and one x1e4 scaled update (no value bound, a minority)
    ref = global_state()
    honest = [honest_state(n) for n in (1, 2, 3, 4)]
    scaled = {k: ref[k] + 1e4 * (honest[0][k] - ref[k]) for k in ref}
    states = [*honest, scaled]
    weights = [1.0] * 5

    # Execute
    plain = robust_aggregate(states, weights, ref, "none")
    robust = robust_aggregate(states, weights, ref, rule, trim_fraction=0.2)

    # Assert: FedAvg moves by ~4 per value; the robust rule stays within the honest range
    for key in ref:
        assert np.abs(plain[key] - ref[key]).max() > 1.0
        assert np.abs(robust[key] - ref[key]).max() <= 0.02 + 1e-6


def test_trimmed_mean_without_outliers_is_the_mean_of_the_central_values() -> None:
    # Prepare: per value, updates 0, 1, 2, 3, 100 -> cut one at each end -> mean(1, 2, 3)
    ref = {"w": np.zeros((2,), np.float32)}
    states = [{"w": np.full((2,), v, np.float32)} for v in (3.0, 0.0, 100.0, 1.0, 2.0)]

    # Execute
    out = robust_aggregate(states, [1.0] * 5, ref, "trimmed-mean", trim_fraction=0.2)
    med = robust_aggregate(states, [1.0] * 5, ref, "median")

    # Assert
    np.testing.assert_array_equal(out["w"], [2.0, 2.0])
    np.testing.assert_array_equal(med["w"], [2.0, 2.0])


def test_strategy_applies_the_robust_rule_to_accepted_replies() -> None:
    # Prepare: bounds off so the scaled update is accepted; the median must still hold
    ref = global_state()
    honest = [honest_state(n) for n in (1, 2, 3)]
    scaled = {k: ref[k] + 1e3 * (honest[0][k] - ref[k]) for k in ref}
    replies = [reply(n, s) for n, s in zip((1, 2, 3, 4), [*honest, scaled], strict=True)]
    strategy = strategy_for_round([1, 2, 3, 4], update_bound=None, robust="median")

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    expected = robust_aggregate([*honest, scaled], [100.0] * 4, ref, "median")
    for key in SHAPES:
        np.testing.assert_array_equal(decoded(arrays)[key], expected[key])
        assert np.abs(decoded(arrays)[key] - ref[key]).max() <= 0.02 + 1e-6


# --------------------------------------------------------------------------------------
# Derived bounds and settings
# --------------------------------------------------------------------------------------


def test_derived_bounds_follow_the_settings() -> None:
    # Prepare
    seen = parse_run_config(
        {"fed.weighting": "seen", "train.local-steps": 5, "train.batch-size": 4}
    )
    held = parse_run_config({})
    dp = parse_run_config({"privacy.mode": "server-fixed", "fed.fraction-train": 0.5})
    off = parse_run_config({"fed.update-bound": "off"})

    # Execute / Assert: the exact bound of what a round trains on; a generous one for
    # data held; no bound under DP (weights unused); the AdamW bound grows with lr
    assert derive_max_weight(seen) == 20
    assert derive_max_weight(held) == 2.0**24
    assert derive_max_weight(parse_run_config({"fed.max-weight": 5000.0})) == 5000
    assert math.isinf(derive_max_weight(dp))
    assert derive_update_bound(off, 1, 0.1) is None
    bound = derive_update_bound(held, 1, 0.1)
    assert bound is not None
    lr, steps = held.train.learning_rate, held.train.local_steps
    assert lr * steps < bound < 2 * lr * steps  # Adam moves a weight by at most ~lr a step


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"fed.weighting": "rows"}, "fed.weighting"),
        ({"fed.max-weight": -1.0}, "fed.max-weight"),
        ({"fed.robust": "krum"}, "fed.robust"),
        ({"fed.trim-fraction": 0.5}, "fed.trim-fraction"),
        ({"fed.bound-action": "ignore"}, "fed.bound-action"),
        ({"fed.robust": "median", "fed.aggregation": "secagg+"}, "fed.robust"),
        ({"fed.robust": "median", "privacy.mode": "server-fixed"}, "fed.robust"),
        ({"fed.robust": "median", "lora.aggregation": "exact"}, "fed.robust"),
        ({"lora.aggregation": "ffa", "fed.aggregation": "secagg+"}, "lora.aggregation"),
        ({"lora.aggregation": "svd"}, "lora.aggregation"),
        ({"lora.aggregation": "exact", "privacy.mode": "server-fixed"}, "lora.aggregation"),
    ],
)
def test_bad_aggregation_settings_name_the_key(run_config: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_run_config(run_config)  # type: ignore[arg-type]


def test_ffa_is_allowed_with_client_level_dp() -> None:
    cfg = parse_run_config({"lora.aggregation": "ffa", "privacy.mode": "server-fixed"})
    assert cfg.lora.aggregation == "ffa" and cfg.privacy.client_level


# --------------------------------------------------------------------------------------
# The wire dtype holds in both directions, every round
# --------------------------------------------------------------------------------------


class TrainingGrid:
    """Just enough of a Flower ``Grid``: every node moves the adapter a little and replies
    in ``wire_dtype``; the train messages of every round are kept."""

    def __init__(self, num_nodes: int, wire_dtype: str) -> None:
        self.nodes = list(range(1, num_nodes + 1))
        self.wire_dtype = wire_dtype
        self.sent: list[list[Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: object, timeout: float | None = None) -> list[Message]:
        batch = list(messages)  # type: ignore[call-overload]
        if not batch or batch[0].metadata.message_type != MessageType.TRAIN:
            return []
        self.sent.append(batch)
        replies = []
        for message in batch:
            node = message.metadata.dst_node_id
            state = wire.from_array_record(message.content.array_records[wire.ARRAYS])
            rng = np.random.default_rng(node + 10 * len(self.sent))
            moved = {k: v + rng.uniform(-0.01, 0.01, v.shape) for k, v in state.items()}
            content = RecordDict(
                {
                    wire.ARRAYS: wire.to_array_record(moved, self.wire_dtype),
                    wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10 * node}),
                }
            )
            replies.append(Message(content, reply_to=message))
        return replies


def bytes_down_per_round(wire_dtype: str) -> tuple[list[int], list[int]]:
    """(bytes of the train messages' adapters, what the round reports) for 3 rounds."""
    from flwr.app import ConfigRecord

    from strategies.rounds import MessageRounds, RoundResult, federate

    big = {"m.lora_A.weight": (32, 256), "m.lora_B.weight": (256, 32)}
    start = {k: np.random.default_rng(0).normal(0, 0.1, s) for k, s in big.items()}
    strategy = WeightedFedAvg(wire_dtype=wire_dtype, min_train_clients=2)
    grid = TrainingGrid(3, wire_dtype)
    reported: list[int] = []

    def on_round_end(result: RoundResult) -> bool:
        reported.append(result.report.bytes_down)
        assert result.report.updated
        return False

    federate(
        MessageRounds(strategy, timeout=10),
        grid,  # type: ignore[arg-type]
        wire.to_array_record(start, wire_dtype),
        first_round=1,
        num_rounds=3,
        train_config=lambda r: ConfigRecord({wire.SERVER_ROUND: r}),
        on_round_end=on_round_end,
        evaluate=lambda _r: False,
    )
    sent = [
        sum(wire.num_bytes(m.content.array_records[wire.ARRAYS]) for m in batch)
        for batch in grid.sent
    ]
    return sent, reported


def test_float16_halves_the_bytes_down_in_every_round() -> None:
    # Execute
    sent16, reported16 = bytes_down_per_round("float16")
    sent32, reported32 = bytes_down_per_round("float32")

    # Assert: rounds 2 and 3 carry the aggregate, which is float16 too
    assert sent16 == reported16 and sent32 == reported32
    assert len(sent16) == 3
    for b16, b32 in zip(sent16, sent32, strict=True):
        assert 0.5 <= b16 / b32 < 0.51  # values halve; small .npy headers do not


def test_norm_bound_in_the_strategy_uses_the_norms_the_checks_computed() -> None:
    # Prepare: three honest updates and one x50 (bounds off so it is accepted)
    ref = global_state()
    honest = [honest_state(n) for n in (1, 2, 3)]
    boosted = {k: ref[k] + 50 * (honest[0][k] - ref[k]) for k in ref}
    states = [*honest, boosted]
    replies = [reply(n, s) for n, s in zip((1, 2, 3, 4), states, strict=True)]
    strategy = strategy_for_round([1, 2, 3, 4], update_bound=None, robust="norm-bound")

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the same as norms computed from scratch, to float32 rounding
    expected = robust_aggregate(states, [100.0] * 4, ref, "norm-bound")
    for key in SHAPES:
        np.testing.assert_allclose(decoded(arrays)[key], expected[key], rtol=1e-6, atol=1e-7)
    assert all(r.update_norm is not None for r in strategy.last_valid)


def test_a_reply_to_the_instruction_of_another_node_is_refused() -> None:
    # Prepare: instructions with ids, as the Grid leaves them; node 2 answers node 1's
    from flwr.app import ConfigRecord

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    strategy = WeightedFedAvg(min_train_clients=1)
    messages = list(
        strategy.configure_train(1, wire.to_array_record(global_state()), ConfigRecord(), Grid())  # type: ignore[arg-type]
    )
    for m in messages:
        m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"
    by_node = {m.metadata.dst_node_id: m for m in messages}

    def answer(node: int, to: int) -> Message:
        state = honest_state(node)
        content = RecordDict(
            {
                wire.ARRAYS: wire.to_array_record(state),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10}),
            }
        )
        message = Message(content, reply_to=by_node[to])
        message.metadata.__dict__["_src_node_id"] = node
        return message

    # Execute
    strategy.aggregate_train(1, [answer(1, 1), answer(2, 1)])

    # Assert
    assert strategy.report.accepted == [1]
    assert strategy.report.refused == ["node 2 replied to the instruction sent to node 1"]
    assert strategy.report.dropped == {2: "no reply before the round timeout"}


@pytest.mark.parametrize("robust", ["none", "norm-bound", "trimmed-mean", "median"])
def test_nan_is_dropped_under_every_rule_with_the_bounds_off(robust: str) -> None:
    # Prepare: five sites, one sends NaN; no weight or value bound
    honest = {n: honest_state(n) for n in (1, 2, 3, 4)}
    nan = {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    replies = [reply(n, s) for n, s in honest.items()] + [reply(5, nan)]
    strategy = strategy_for_round(
        [1, 2, 3, 4, 5], update_bound=None, max_weight=math.inf, robust=robust
    )

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert strategy.report.accepted == [1, 2, 3, 4]
    assert "NaN or Inf" in strategy.report.dropped[5]
    expected = robust_aggregate(list(honest.values()), [100.0] * 4, global_state(), robust)
    for key in SHAPES:
        np.testing.assert_allclose(decoded(arrays)[key], expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("metrics", "named"),
    [
        ({wire.TRAIN_LOSS: math.nan}, "metric 'train-loss' = nan"),
        ({"site-chosen-score": 1e300}, "metric 'site-chosen-score' = 1e+300"),
        ({wire.TRAIN_SECONDS: -math.inf}, "metric 'train-seconds' = -inf"),
        ({wire.DPSGD_EPSILON: -1.0}, "metric 'dpsgd-epsilon' = -1.0 is not an epsilon"),
        ({wire.DPSGD_EPSILON: math.nan}, "metric 'dpsgd-epsilon' = nan is not an epsilon"),
    ],
)
def test_a_reply_with_an_impossible_metric_is_refused_and_the_row_stays_finite(
    metrics: dict[str, float], named: str
) -> None:
    # Prepare: three honest sites that send the same metrics with sane values
    sane = {k: 1.0 for k in metrics}
    replies = [reply(n, honest_state(n), **sane) for n in (1, 2, 3)]
    replies.append(reply(4, honest_state(4), **metrics))
    strategy = strategy_for_round([1, 2, 3, 4])

    # Execute
    _, train_metrics = strategy.aggregate_train(1, replies)

    # Assert: the hostile reply is dropped with its reason; every averaged metric is finite
    assert strategy.report.accepted == [1, 2, 3]
    assert strategy.report.dropped[4].startswith(named), strategy.report.dropped
    assert all(math.isfinite(float(v)) for v in train_metrics.values())  # type: ignore[arg-type]
    for key in metrics:
        assert train_metrics[key] == 1.0


def test_a_site_without_noise_may_report_an_infinite_epsilon() -> None:
    replies = [reply(n, honest_state(n), **{wire.DPSGD_EPSILON: 2.0}) for n in (1, 2)]
    replies.append(reply(3, honest_state(3), **{wire.DPSGD_EPSILON: math.inf}))
    strategy = strategy_for_round([1, 2, 3])

    _, train_metrics = strategy.aggregate_train(1, replies)

    assert strategy.report.accepted == [1, 2, 3]
    assert train_metrics[wire.DPSGD_EPSILON] == math.inf  # the weakest site is the guarantee


def eval_reply(node_id: int, loss: float, tokens: float, accuracy: float = 0.5) -> Message:
    metrics = MetricRecord(
        {
            wire.EVAL_LOSS: loss,
            wire.EVAL_TOKENS: tokens,
            wire.EVAL_TOKEN_ACCURACY: accuracy,
            wire.NUM_EXAMPLES: 10,
            wire.EVAL_PERPLEXITY: math.exp(min(loss, 50.0)),
        }
    )
    message = Message(RecordDict({wire.METRICS: metrics}), dst_node_id=0, message_type="evaluate")
    message.metadata.__dict__["_src_node_id"] = node_id
    return message


@pytest.mark.parametrize(
    ("loss", "tokens", "accuracy"),
    [
        (1e300, 2**62, 0.5),  # loss x tokens overflows float64
        (2.0, 2**62, 0.5),  # more tokens than any count
        (2.0, 100, 1e6),  # an accuracy above 1
        (-5.0, 100, 0.5),  # a negative mean cross-entropy
    ],
)
def test_an_impossible_evaluation_reply_is_left_out_of_the_pooled_loss(
    loss: float, tokens: int, accuracy: float
) -> None:
    from strategies.fedavg import aggregate_eval_replies

    honest = [eval_reply(1, 2.0, 100), eval_reply(2, 4.0, 300)]

    pooled = aggregate_eval_replies([*honest, eval_reply(3, loss, tokens, accuracy)])

    assert pooled is not None
    assert pooled["clients"] == 2 and pooled[wire.EVAL_TOKENS] == 400
    assert pooled[wire.EVAL_LOSS] == pytest.approx((2.0 * 100 + 4.0 * 300) / 400)
    assert pooled[wire.EVAL_TOKEN_ACCURACY] == pytest.approx(0.5)


def test_a_negative_or_nan_count_is_refused_whatever_the_weight_bound() -> None:
    replies = [reply(n, honest_state(n)) for n in (1, 2)]
    replies.append(reply(3, honest_state(3), **{wire.NUM_TOKENS: -5.0}))
    strategy = strategy_for_round([1, 2, 3], max_weight=math.inf)

    strategy.aggregate_train(1, replies)

    assert strategy.report.accepted == [1, 2]
    assert strategy.report.dropped[3] == "metric 'num-tokens' = -5.0 is not a count (finite, >= 0)"


# --------------------------------------------------------------------------------------
# The one-sweep path: as accurate as float64, as strict as bound_reply
# --------------------------------------------------------------------------------------


def half_ulps_from(got: np.ndarray, exact: np.ndarray) -> float:
    """Largest ``|got - exact|`` in units of half a float32 ulp of the exact value."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - exact) / (spacing / 2)))


@pytest.fixture(params=["compiled", "numpy"])
def sum_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The sweep's weighted sum through the compiled kernel (required: a failure to build
    it fails the test) or through NumPy; counts the kernel's calls in ``calls``."""
    from flower_llm import sumkernel

    monkeypatch.setenv(sumkernel.ENV, "require" if request.param == "compiled" else "off")
    sumkernel.reset()
    calls.clear()
    for name in ("weighted_sums", "central_sums"):
        real = getattr(sumkernel, name)

        def counted(*args: Any, real: Any = real, **kwargs: Any) -> sumkernel.Sums | None:
            sums = real(*args, **kwargs)
            if sums is not None:
                calls.append(1)
            return sums  # type: ignore[no-any-return]

        monkeypatch.setattr(sumkernel, name, counted)
    yield request.param
    sumkernel.reset()


calls: list[int] = []
"""Calls of the compiled kernel in the current test (see ``sum_backend``)."""


@pytest.mark.parametrize("rule", ["none", "norm-bound", "trimmed-mean", "median"])
@pytest.mark.parametrize("count", [3, 70])
@pytest.mark.parametrize("dtypes", ["mixed", "float32", "float16"])
def test_sweep_equals_a_float64_reference_rounded_once(
    rule: str, count: int, dtypes: str, sum_backend: str
) -> None:
    # Prepare: a reference far from zero and one at zero (round 1 of B), updates of every
    # size, float32 and float16 replies (mixed, or all of one), weights from 1 to 1e9
    # (70 > one block of 64)
    from flower_llm.aggregation import checked_aggregate

    rng = np.random.default_rng(count)
    shapes = {"m.lora_A.weight": (8, 300), "m.lora_B.weight": (300, 8)}
    reference = {
        "m.lora_A.weight": rng.normal(0, 1, (8, 300)).astype(np.float32),
        "m.lora_B.weight": np.zeros((300, 8), np.float32),
    }
    states = []
    for k in range(count):
        dtype = {
            "mixed": np.float16 if k % 5 == 4 else np.float32,
            "float32": np.float32,
            "float16": np.float16,
        }[dtypes]
        scale = 10.0 ** rng.integers(-6, 0)
        states.append(
            {
                key: (reference[key] + rng.normal(0, scale, s)).astype(dtype)
                for key, s in shapes.items()
            }
        )
    weights = [float(w) for w in 10.0 ** rng.uniform(0, 9, count)]

    # Execute
    checked = checked_aggregate(states, weights, reference, ReplyBounds(), rule)

    # Assert: every value is the float64 result rounded once to float32 (within half an
    # ulp, and 1e-6 of one for the float64 sum's own rounding)
    assert checked.dropped == {} and checked.kept == list(range(count))
    assert checked.state is not None
    p = np.array(weights) / math.fsum(weights)
    for key in shapes:
        ref64 = reference[key].astype(np.float64)
        updates = np.stack([s[key].astype(np.float64) - ref64 for s in states])
        if rule == "none":
            exact = ref64 + np.tensordot(p, updates, axes=1)
        elif rule == "norm-bound":
            norms = np.sqrt(
                [
                    sum(np.sum((s[k].astype(np.float64) - reference[k]) ** 2) for k in shapes)
                    for s in states
                ]
            )
            scale = np.minimum(1.0, np.median(norms) / norms)
            exact = ref64 + np.tensordot(p * scale, updates, axes=1)
        elif rule == "median":
            exact = ref64 + np.median(updates, axis=0)
        else:
            cut = math.floor(0.2 * count)
            exact = ref64 + np.sort(updates, axis=0)[cut : count - cut].mean(axis=0)
        assert half_ulps_from(checked.state[key], exact) <= 1 + 1e-6, key
    # ... and the compiled kernel did the weighted sums it can take (one dtype)
    one_dtype = len({v.dtype for state in states for v in state.values()}) == 1
    kernel_sums = sum_backend == "compiled" and one_dtype
    assert bool(calls) == kernel_sums


def test_sweep_drops_what_bound_reply_drops_and_aggregates_the_rest(sum_backend: str) -> None:
    # Prepare: honest sites, and hostile ones whose fault lies in the LAST array only, so
    # the sweep has summed them into the first before it finds them
    from flower_llm.aggregation import checked_aggregate

    reference = global_state()
    last = list(SHAPES)[-1]
    honest = [honest_state(s) for s in (1, 2, 3)]
    nan = {**honest_state(4), last: np.full(SHAPES[last], np.nan, np.float32)}
    far = {**honest_state(5), last: honest_state(5)[last] + np.float32(1.0)}
    huge64 = {**honest_state(6), last: np.full(SHAPES[last], 1e300)}
    inf = {**honest_state(7), last: honest_state(7)[last]}
    inf[last][-1, -1] = np.inf
    states = [honest[0], nan, honest[1], far, huge64, honest[2], inf]
    weights = [100.0, 100.0, 300.0, 100.0, 100.0, 50.0, 100.0]
    bounds = ReplyBounds(max_weight=1000.0, max_abs_update=BOUND)

    # Execute
    checked = checked_aggregate(states, weights, reference, bounds)

    # Assert: the same drops and reasons as bound_reply, and FedAvg of the three honest
    for index, state in enumerate(states):
        verdict = bound_reply(state, reference, weights[index], bounds)
        if isinstance(verdict, str):
            assert checked.dropped[index] == verdict
        else:
            assert index in checked.kept
    assert sorted(checked.dropped) == [1, 3, 4, 6]
    expected = weighted_average(honest, [100.0, 300.0, 50.0])
    assert checked.state is not None
    for key in SHAPES:
        np.testing.assert_allclose(checked.state[key], expected[key], rtol=0, atol=1e-7)
    # (the float64 reply is refused before the sweep, so the rest are all float32)
    assert bool(calls) == (sum_backend == "compiled")


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
@pytest.mark.parametrize("count", [5, 6, 20])
def test_sweep_order_statistics_equal_robust_aggregate_bit_for_bit(
    rule: str, count: int, sum_backend: str
) -> None:
    # Prepare: unordered replies (each column in a different order), odd and even counts
    from flower_llm.aggregation import checked_aggregate

    rng = np.random.default_rng(count)
    reference = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
    states = [
        {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in reference.items()}
        for _ in range(count)
    ]
    weights = [float(w) for w in rng.uniform(1, 100, count)]

    # Execute: the sweep (column sort) and the per-reply path (np.median, np.sort)
    swept = checked_aggregate(states, weights, reference, ReplyBounds(), rule)
    direct = robust_aggregate(states, weights, reference, rule)

    # Assert: the same float32 values, bit for bit (and the kernel did it where it is on)
    assert bool(calls) == (sum_backend == "compiled")
    assert swept.state is not None
    for key in SHAPES:
        np.testing.assert_array_equal(
            swept.state[key].view(np.uint32), direct[key].view(np.uint32), err_msg=key
        )


# --------------------------------------------------------------------------------------
# Flat replies: a packed reply read as one array
# --------------------------------------------------------------------------------------


def flat(state: dict[str, np.ndarray]) -> wire.FlatState:
    """``state`` as the server holds a packed reply: one buffer, views into it."""
    return wire.flat_copy(state, next(iter(state.values())).dtype.type)


@pytest.mark.parametrize("rule", ["none", "norm-bound", "trimmed-mean", "median"])
def test_flat_replies_aggregate_bit_for_bit_as_per_array_ones(rule: str) -> None:
    # Prepare: the same replies as dicts of arrays and as flat states (one array each)
    from flower_llm import sumkernel
    from flower_llm.aggregation import checked_aggregate

    rng = np.random.default_rng(7)
    reference = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
    states = [
        {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in reference.items()}
        for _ in range(9)
    ]
    weights = [float(w) for w in rng.uniform(1, 100, 9)]
    bounds = ReplyBounds(max_abs_update=BOUND)
    sumkernel.reset()

    # Execute
    per_array = checked_aggregate(states, weights, reference, bounds, rule, want_norm=True)
    as_flat = checked_aggregate(
        [flat(s) for s in states], weights, flat(reference), bounds, rule, want_norm=True
    )

    # Assert: the same values bit for bit, the same norms (and the flat replies were
    # read as one array each)
    from flower_llm.aggregation import _flat_inputs

    assert _flat_inputs([flat(s) for s in states], flat(reference), None) is not None
    assert sumkernel.status().startswith("compiled"), sumkernel.status()
    assert per_array.state is not None and as_flat.state is not None
    for key in SHAPES:
        np.testing.assert_array_equal(
            as_flat.state[key].view(np.uint32), per_array.state[key].view(np.uint32), key
        )
    assert as_flat.norms == pytest.approx(per_array.norms, rel=1e-12)


def test_a_flat_reply_beyond_a_bound_is_named_by_its_first_failing_array() -> None:
    # Prepare: faults in the last array (summed before found) and in the first
    from flower_llm.aggregation import checked_aggregate

    reference = global_state()
    first, last = list(SHAPES)
    honest = [honest_state(s) for s in (1, 2, 3)]
    nan = {**honest_state(4), last: np.full(SHAPES[last], np.nan, np.float32)}
    far = {**honest_state(5), first: honest_state(5)[first] + np.float32(1.0)}
    states = [honest[0], nan, honest[1], far, honest[2]]
    weights = [100.0, 100.0, 300.0, 100.0, 50.0]
    bounds = ReplyBounds(max_weight=1000.0, max_abs_update=BOUND)

    # Execute
    checked = checked_aggregate([flat(s) for s in states], weights, flat(reference), bounds)

    # Assert: bound_reply's reasons, and FedAvg of the honest three
    assert checked.dropped == {
        1: bound_reply(nan, reference, 100.0, bounds),
        3: bound_reply(far, reference, 100.0, bounds),
    }
    assert f"'{last}' holds NaN" in checked.dropped[1] and f"'{first}'" in checked.dropped[3]
    expected = weighted_average(honest, [100.0, 300.0, 50.0])
    assert checked.state is not None
    for key in SHAPES:
        np.testing.assert_allclose(checked.state[key], expected[key], rtol=0, atol=1e-7)


def test_a_packed_reply_is_read_as_one_flat_array_unless_padded() -> None:
    # Prepare: float32 arrays back to back, and one of an odd count (4 bytes of padding)
    dense = {"a": np.arange(8, dtype=np.float32).reshape(2, 4), "b": np.ones(6, np.float32)}
    padded = {"a": np.arange(3, dtype=np.float32), "b": np.ones(6, np.float32)}

    def views(state: dict[str, np.ndarray]) -> Any:
        content = RecordDict({wire.ARRAYS: wire.to_array_record(state)})
        return wire.unpack_views(wire.pack(content))[1]

    # Execute
    got_dense, got_padded = views(dense), views(padded)

    # Assert: the dense one is a FlatState over the payload's values, in key order; the
    # padded one is plain views (its padding bytes are not values); both read the same
    assert isinstance(got_dense, wire.FlatState)
    assert got_dense.flat.tolist() == [*range(8), *[1.0] * 6]
    assert not isinstance(got_padded, wire.FlatState)
    for sent, got in ((dense, got_dense), (padded, got_padded)):
        assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in sent.items()}


def test_a_flat_state_keeps_its_keys_and_pickles_as_a_dict() -> None:
    import pickle

    state = wire.flat_copy({"a": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)})
    for change in (
        lambda: state.__setitem__("c", np.zeros(1)),
        lambda: state.pop("a"),
        lambda: state.update(a=np.zeros(1)),
    ):
        with pytest.raises(TypeError, match="keys are fixed"):
            change()
    state["a"][0, 0] = 5.0  # values stay writable, in the one buffer
    assert state.flat[0] == 5.0
    copy = pickle.loads(pickle.dumps(state))
    assert type(copy) is dict and copy.keys() == state.keys()


def test_the_structural_check_of_a_flat_reply_compares_layouts_and_names_a_nan() -> None:
    from flower_llm.aggregation import update_problem

    reference = flat(global_state())
    first, last = list(SHAPES)
    sick = {**honest_state(1), last: np.full(SHAPES[last], np.nan, np.float32)}
    transposed = {first: honest_state(1)[first].T.copy(), last: honest_state(1)[last]}

    assert update_problem(flat(honest_state(1)), reference, 1.0) is None
    assert update_problem(flat(sick), reference, 1.0) == f"'{last}' holds NaN or Inf"
    assert update_problem(flat(sick), reference, 1.0, check_finite=False) is None
    # Same sizes, another shape: not the reference's layout, checked key by key
    assert "has shape" in str(update_problem(flat(transposed), reference, 1.0))
