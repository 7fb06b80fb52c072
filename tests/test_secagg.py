"""SecAgg+: derived parameters, the error bound, the encoding, and the real Flower workflow.

The workflow tests run Flower's own ``SecAggPlusWorkflow`` and ``secaggplus_mod`` in-process
(``run_simulation``) with the project's server loop and legacy ClientApp; only training is
replaced by a fake session whose updates the test can recompute, so the SecAgg+ aggregate can
be held against exact weighted FedAvg.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitRes, Status, ndarray_to_bytes, ndarrays_to_parameters
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp
from hypothesis import given, settings
from hypothesis import strategies as st

from client_apps.secagg import (
    SecAggClient,
    claimed_weight,
    client_weight,
    hide_weight_mod,
    make_app,
    secure_counts_mod,
)
from flower_llm import secagg, wire
from flower_llm.config import ConfigError, RunConfig, parse_run_config
from flower_llm.streams import RandomStreams
from flower_llm.train import TrainStats
from strategies.dp import CentralDP
from strategies.fedavg import WeightedFedAvg
from strategies.rounds import RoundResult, federate
from strategies.sampling import wait_for_nodes
from strategies.secagg import SecAggFedAvg, SecAggRounds
from tests.conftest import stamped_task_identity

# --------------------------------------------------------------------------------------
# Derived parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_sampled", "shares", "threshold", "quantization"),
    [
        (3, 3, 2, 2**30),
        (4, 4, 3, 2**29),
        (10, 10, 6, 2**28),
        (20, 20, 11, 2**27),
        (100, 29, 15, 2**25),
    ],
)
def test_auto_parameters(num_sampled: int, shares: int, threshold: int, quantization: int) -> None:
    params = secagg.derive_params(
        parse_run_config({"fed.weighting": "seen"}), num_sampled=num_sampled
    )
    assert params.num_shares == shares
    assert params.reconstruction_threshold == threshold
    assert params.quantization_range == quantization
    # the masked sum of every client's largest value must not wrap the modulus
    assert num_sampled * params.quantization_range < secagg.MODULUS_RANGE
    assert params.max_weight == 20 * 1 * 8  # local-steps x grad-accum x batch-size
    assert params.timeout == RunConfig().fed.round_timeout / 4  # four stages share a round


def test_max_weight_follows_weighting_and_dp() -> None:
    tokens = parse_run_config({"fed.weighting": "tokens", "fed.max-weight": 5e6})
    seen = parse_run_config({"fed.weighting": "seen", "data.max-seq-length": 64})
    dp = parse_run_config({"privacy.mode": "client-fixed", "output.local-only-baseline": False})
    assert secagg.auto_max_weight(tokens) == 5e6  # stated by the user: data held
    assert secagg.auto_max_weight(seen) == 20 * 1 * 8  # exact: what a round can train on
    assert secagg.auto_max_weight(dp) == 1.0
    # data held with no W stated: refused before any round, whatever fed.aggregation says
    for weighting in ("examples", "tokens"):
        with pytest.raises(ConfigError, match=r"'fed\.max-weight'.*'fed\.weighting' = 'seen'"):
            secagg.auto_max_weight(parse_run_config({"fed.weighting": weighting}))


def test_explicit_settings_win() -> None:
    cfg = parse_run_config(
        {
            "secagg.num-shares": 5,
            "secagg.reconstruction-threshold": 4,
            "secagg.clipping-range": 0.5,
            "secagg.quantization-range": 2**20,
            "secagg.max-weight": 7.0,
            "secagg.timeout": 30.0,
        }
    )
    params = secagg.derive_params(cfg, num_sampled=8)
    assert (params.num_shares, params.reconstruction_threshold) == (5, 4)
    assert (params.clipping_range, params.quantization_range) == (0.5, 2**20)
    assert (params.max_weight, params.timeout) == (7.0, 30.0)


@pytest.mark.parametrize(
    ("run_config", "num_sampled", "named"),
    [
        ({}, 2, "fed.aggregation"),
        ({"secagg.num-shares": 7}, 5, "secagg.num-shares"),
        ({"secagg.reconstruction-threshold": 5}, 5, "secagg.reconstruction-threshold"),
        ({"secagg.reconstruction-threshold": 6}, 5, "secagg.reconstruction-threshold"),
        ({"secagg.quantization-range": 2**30}, 4, "secagg.quantization-range"),
    ],
)
def test_round_settings_that_cannot_work_name_the_key(
    run_config: dict[str, Any], num_sampled: int, named: str
) -> None:
    with pytest.raises(ConfigError, match=f"'{named}'"):
        secagg.derive_params(parse_run_config(run_config), num_sampled=num_sampled)


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"secagg.num-shares": 2}, "secagg.num-shares"),
        ({"secagg.reconstruction-threshold": 1}, "secagg.reconstruction-threshold"),
        (
            {"secagg.num-shares": 5, "secagg.reconstruction-threshold": 5},
            "secagg.reconstruction-threshold",
        ),
        ({"secagg.quantization-range": 1000}, "secagg.quantization-range"),
        ({"secagg.quantization-range": 2**31}, "secagg.quantization-range"),
        ({"secagg.clipping-range": -1.0}, "secagg.clipping-range"),
        ({"secagg.max-weight": float("nan")}, "secagg.max-weight"),
        (
            {"fed.aggregation": "secagg+", "output.local-only-baseline": True},
            "output.local-only-baseline",
        ),
        (
            {
                "fed.aggregation": "secagg+",
                "output.local-only-baseline": False,
                "privacy.mode": "server-fixed",
            },
            "fed.aggregation",
        ),
        ({"fed.aggregation": "secagg+"}, "fed.max-weight"),
        ({"fed.aggregation": "secagg+", "fed.weighting": "tokens"}, "fed.max-weight"),
        (
            {
                "fed.aggregation": "secagg+",
                "privacy.dpsgd": True,
                "output.local-only-baseline": False,
            },
            "fed.max-weight",
        ),
    ],
)
def test_bad_secagg_config_names_the_key(run_config: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=f"'{named}'"):
        parse_run_config(run_config)


def test_secagg_weighting_by_data_held_without_a_max_weight_names_both_ways_out() -> None:
    # Execute
    with pytest.raises(ConfigError) as refused:
        parse_run_config({"fed.aggregation": "secagg+", "fed.weighting": "examples"})

    # Assert: the key to set, what to set it to, and the weightings that need none
    message = str(refused.value)
    assert "'fed.max-weight'" in message and "'secagg.max-weight'" in message
    assert "largest number of training examples any site holds" in message
    assert "'fed.weighting' = 'seen'" in message and "'uniform'" in message


@pytest.mark.parametrize(
    "settings",
    [
        {"fed.max-weight": 5000.0},
        {"secagg.max-weight": 5000.0},
        {"fed.weighting": "tokens", "fed.max-weight": 1e6},
        {"fed.weighting": "seen"},
        {"fed.weighting": "uniform"},
        # client-level DP weighs every site 1: no max weight to state
        {"privacy.mode": "client-fixed"},
    ],
)
def test_secagg_weightings_that_need_no_more_are_accepted(settings: dict[str, Any]) -> None:
    cfg = parse_run_config(
        {"fed.aggregation": "secagg+", "output.local-only-baseline": False, **settings}
    )
    params = secagg.derive_params(cfg, num_sampled=4)
    expected = {"seen": 160.0, "uniform": 1.0}.get(cfg.fed.weighting, 1.0)
    if secagg.weighs_by_held(cfg):
        expected = cfg.secagg.max_weight or cfg.fed.max_weight
    assert params.max_weight == expected


def test_secagg_with_dpsgd_is_accepted_and_keeps_unequal_weights() -> None:
    cfg = parse_run_config(
        {
            "fed.aggregation": "secagg+",
            "output.local-only-baseline": False,
            "privacy.dpsgd": True,
            "fed.weighting": "seen",
        }
    )
    # sample-level DP alone does not need the equal weights of client-level DP
    assert secagg.derive_params(cfg, num_sampled=4).max_weight > 1.0


def test_secagg_with_client_side_dp_is_accepted() -> None:
    cfg = parse_run_config(
        {
            "fed.aggregation": "secagg+",
            "output.local-only-baseline": False,
            "privacy.mode": "client-fixed",
            "privacy.clip-norm": 0.05,
        }
    )
    params = secagg.derive_params(cfg, num_sampled=5)
    assert params.clipping_range <= 0.05  # an L2-clipped update has no larger value
    assert params.max_weight == 1.0


# --------------------------------------------------------------------------------------
# The automatic clipping range bounds what local AdamW can do
# --------------------------------------------------------------------------------------


def test_adam_step_bound_values() -> None:
    assert secagg.adam_step_bound(1) == pytest.approx(1.0)
    assert secagg.adam_step_bound(20) == pytest.approx(1.156, abs=1e-3)
    # the limit for t -> inf is (1-b1)/sqrt(1-b2) / sqrt(1 - b1^2/b2)
    assert secagg.adam_step_bound(10**6) == pytest.approx(
        0.1 / math.sqrt(0.001 * (1 - 0.81 / 0.999))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_never_moves_a_weight_further_than_the_bound(dtype: torch.dtype) -> None:
    # Prepare: adversarial gradients, sparse bursts and sign flips across six orders of size
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.rand(64, 64, generator=gen) * 2 - 1).to(dtype) * 0.2)
    start = weight.detach().clone().float()
    lr, steps = 0.01, 30
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0)

    # Execute
    for t in range(steps):
        scale = 10.0 ** torch.randint(-4, 3, (64, 64), generator=gen)
        burst = (torch.rand(64, 64, generator=gen) < 0.1) | (t % 7 == 0)
        sign = torch.where(torch.rand(64, 64, generator=gen) < 0.5, -1.0, 1.0)
        weight.grad = (scale * burst * sign).to(dtype)
        optimizer.step()

    # Assert
    moved = float((weight.detach().float() - start).abs().max())
    bound = secagg.local_update_bound(
        learning_rate=lr,
        steps=steps,
        start_max_abs=float(start.abs().max()),
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
    )
    assert moved <= bound
    assert moved > 0.3 * bound  # not vacuous: some weights get within reach of it


# --------------------------------------------------------------------------------------
# The error bound, against Flower's own quantization arithmetic
# --------------------------------------------------------------------------------------


def emulate_secagg_mean(
    values: list[np.ndarray], weights: list[int], c: float, q_range: int, max_weight: float
) -> np.ndarray:
    """What secaggplus_mod + SecAggPlusWorkflow compute, masks left out (they cancel mod M)."""
    total_q, total = 0, np.zeros_like(values[0], dtype=np.int64)
    for value, weight in zip(values, weights, strict=True):
        q = round(weight / max_weight * q_range)  # secaggplus_mod: weight as a factor
        total_q += q
        total += quantize([value * (q / q_range)], c, q_range)[0]
    assert total.max() < secagg.MODULUS_RANGE
    mean = dequantize([total], c, q_range)[0] - (len(values) - 1) * c  # workflow's offset
    return mean * (q_range / total_q)


@settings(max_examples=40, deadline=None)
@given(
    num_clients=st.integers(3, 20),
    weights=st.lists(st.integers(1, 160), min_size=20, max_size=20),
    bits=st.integers(16, 30),
    seed=st.integers(0, 2**16),
)
def test_error_bound_holds_for_flowers_arithmetic(
    num_clients: int, weights: list[int], bits: int, seed: int
) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    c, max_weight = 0.08, 160.0
    q_range = min(2**bits, secagg.auto_quantization_range(num_clients))
    values = [rng.uniform(-c, c, 500) for _ in range(num_clients)]  # float64, as clients send
    weights = weights[:num_clients]

    # Execute
    got = emulate_secagg_mean(values, weights, c, q_range, max_weight)
    exact = np.average(np.stack(values).astype(np.float64), axis=0, weights=weights)

    # Assert
    bound = secagg.aggregate_error_bound(c, q_range, [w / max_weight for w in weights])
    assert np.abs(got - exact).max() <= bound


def test_error_bound_is_about_three_levels_at_full_weight() -> None:
    assert secagg.aggregate_error_bound(1.0, 2**20, [1.0] * 10) == pytest.approx(
        3 / 2**20, rel=1e-5
    )


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.dictionaries(
        st.text("abcdefgh.", min_size=1, max_size=12),
        st.tuples(st.integers(1, 5), st.integers(1, 5)),
        min_size=1,
        max_size=6,
    )
)
def test_arrays_round_trip_in_sorted_key_order(shapes: dict[str, tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    arrays = secagg.state_to_arrays(state)
    assert [a.shape for a in arrays] == [state[k].shape for k in sorted(state)]
    back = secagg.arrays_to_state(arrays, secagg.ordered_keys(state))
    assert list(back) == sorted(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])


def test_encode_sends_the_clipped_delta_and_scaled_metrics() -> None:
    # Prepare
    global_state = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    local = {"a": global_state["a"] + 0.01, "b": np.array([0.5, -0.02, 0.0], np.float32)}

    # Execute
    encoded = secagg.encode_update(
        local, global_state, clipping_range=0.1, metrics={"train-loss": 2.0}
    )
    delta, means = secagg.decode_aggregate(encoded.arrays, ["a", "b"], 0.1)

    # Assert
    np.testing.assert_allclose(delta["a"], 0.01, atol=1e-7)
    np.testing.assert_allclose(delta["b"], [0.1, -0.02, 0.0], atol=1e-7)  # 0.5 clipped to c
    assert encoded.clipped_values == 1
    # float32 cannot resolve 2^25+ quantization levels inside secaggplus_mod
    assert all(a.dtype == np.float64 for a in encoded.arrays)
    assert means["train-loss"] == pytest.approx(2.0)
    assert float(np.abs(encoded.arrays[-1]).max()) <= 0.1  # metrics stay inside [-c, c]


def test_l2_clipping_before_the_elementwise_clip() -> None:
    global_state = {"a": np.zeros(4, np.float32)}
    local = {"a": np.array([3.0, 4.0, 0.0, 0.0], np.float32)}  # norm 5
    encoded = secagg.encode_update(local, global_state, clipping_range=10.0, l2_clip_norm=1.0)
    np.testing.assert_allclose(encoded.arrays[0], [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    assert encoded.norm_before_clip == pytest.approx(5.0)


# --------------------------------------------------------------------------------------
# Client pieces without Flower's runtime
# --------------------------------------------------------------------------------------


class FakeSession:
    """Trains nothing: ``local = global + a delta drawn from (partition, round)``."""

    def __init__(
        self,
        cfg: RunConfig,
        partition: int,
        examples: int = 160,
        dropouts: dict[int, set[int]] | None = None,
        hangs: dict[int, set[int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.partition = partition
        self.examples = examples
        self.dropouts = dropouts or {}
        """server round -> partitions whose fit raises (stage 'collect masked vectors')."""
        self.hangs = hangs or {}
        """server round -> partitions whose fit does not answer for HANG_SECONDS."""

    def train(
        self, global_state: dict[str, np.ndarray], server_round: int, learning_rate: float
    ) -> tuple[dict[str, np.ndarray], TrainStats]:
        if self.partition in self.dropouts.get(server_round, ()):
            raise RuntimeError(f"partition {self.partition} drops out in round {server_round}")
        if self.partition in self.hangs.get(server_round, ()):
            time.sleep(HANG_SECONDS)
        delta = fake_delta(
            {k: v.shape for k, v in global_state.items()}, self.partition, server_round
        )
        local = {k: global_state[k] + delta[k] for k in global_state}
        stats = TrainStats(
            loss=1.0 + self.partition, steps=1, examples=self.examples, tokens=10, seconds=0.0
        )
        return local, stats

    def train_reply_metrics(self, stats: TrainStats) -> dict[str, int]:
        """Holds ``examples``, trained on them all, each with 10 response tokens."""
        return {
            wire.NUM_EXAMPLES: self.examples,
            wire.NUM_TOKENS: 10 * self.examples,
            wire.NUM_EXAMPLES_SEEN: stats.examples,
        }


HANG_SECONDS = 16.0


def fake_delta(
    shapes: dict[str, tuple[int, ...]], partition: int, server_round: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([partition, server_round])
    return {k: rng.uniform(-0.02, 0.02, shapes[k]).astype(np.float32) for k in sorted(shapes)}


def sent_update(
    global_state: dict[str, np.ndarray], delta: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The update a FakeSession client sends: float32 ``global + delta``, minus the global."""
    return {k: (global_state[k] + delta[k]).astype(np.float64) - global_state[k] for k in delta}


def test_client_sends_update_weight_and_no_plaintext_metrics() -> None:
    # Prepare
    cfg = RunConfig()
    client = SecAggClient(FakeSession(cfg, partition=1, examples=120), keys=["a", "b"])
    parameters = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
    config = {
        wire.SERVER_ROUND: 1,
        wire.LEARNING_RATE: 0.01,
        secagg.CLIPPING_RANGE: 0.05,
        secagg.MAX_WEIGHT: 160.0,
    }

    # Execute
    arrays, weight, metrics = client.fit(parameters, config)

    # Assert
    expected = fake_delta({"a": (2, 3), "b": (4,)}, 1, 1)
    np.testing.assert_allclose(arrays[0], expected["a"], atol=1e-7)
    np.testing.assert_allclose(arrays[1], expected["b"], atol=1e-6)
    assert arrays[2][0] * secagg.LOSS_BOUND / 0.05 == pytest.approx(2.0)  # loss, masked later
    np.testing.assert_array_equal(arrays[2][1:], [0.0, 0.0])  # count slots, filled after masking
    assert weight == 120
    assert metrics == {}


@pytest.mark.parametrize(("max_weight", "clamped"), [(100.0, 1), (120.0, 0), (1000.0, 0)])
def test_client_leaves_whether_it_was_clamped_in_its_context(
    max_weight: float, clamped: int
) -> None:
    # Prepare: a site holding 120 examples
    cfg = parse_run_config({"fed.aggregation": "secagg+", "fed.max-weight": max_weight})
    context = Context(1, 3, {}, RecordDict(), {})
    client = SecAggClient(FakeSession(cfg, partition=1, examples=120), ["a"], context)
    config = {
        wire.SERVER_ROUND: 1,
        wire.LEARNING_RATE: 0.01,
        secagg.CLIPPING_RANGE: 0.05,
        secagg.MAX_WEIGHT: max_weight,
    }

    # Execute
    _, weight, metrics = client.fit([np.zeros(3, np.float32)], config)

    # Assert: the weight sent is min(n_k, W); the flag stays in the context, not the reply
    assert weight == min(120, int(max_weight))
    assert context.state.config_records[secagg.COUNTS_RECORD]["clamped"] == clamped
    assert metrics == {}


def test_client_weight_follows_fed_weighting_is_clamped_and_uniform_under_dp() -> None:
    # Prepare: a site holding 10,000 examples (2e6 response tokens) that trained on 200
    # examples (5000 tokens) this round
    counts = {wire.NUM_EXAMPLES: 10_000, wire.NUM_TOKENS: 2_000_000, wire.NUM_EXAMPLES_SEEN: 200}
    stats = TrainStats(loss=1.0, steps=1, examples=200, tokens=5000, seconds=0.0)
    dp = parse_run_config({"privacy.mode": "client-fixed", "output.local-only-baseline": False})

    def run(**settings: object) -> RunConfig:
        return parse_run_config({"fed.aggregation": "secagg+", **settings})

    held = run(**{"fed.max-weight": 50_000.0})
    held_tokens = run(**{"fed.weighting": "tokens", "secagg.max-weight": 1e7})

    # Execute / Assert: examples / tokens held, as the plain path weighs
    assert secagg.weighs_by_held(held) and secagg.auto_max_weight(held) == 50_000.0
    assert client_weight(held, counts, stats, secagg.auto_max_weight(held)) == 10_000
    assert secagg.weighs_by_held(held_tokens)
    assert client_weight(held_tokens, counts, stats, 1e7) == 2_000_000
    # fed.max-weight bounds a claim inside SecAgg+ too: the client clamps to W
    small = run(**{"fed.max-weight": 5000.0})
    assert claimed_weight(small, counts, stats) == 10_000
    assert client_weight(small, counts, stats, secagg.auto_max_weight(small)) == 5000
    # seen: what the site trained on this round (its bound is exact); uniform and DP: 1
    seen = run(**{"fed.weighting": "seen"})
    assert not secagg.weighs_by_held(seen)
    assert client_weight(seen, counts, stats, 1e9) == 200
    assert client_weight(run(**{"fed.weighting": "uniform"}), counts, stats, 1e9) == 1
    assert not secagg.weighs_by_held(dp) and client_weight(dp, counts, stats, 1.0) == 1


def test_hide_weight_mod_replaces_the_plaintext_weight_and_packs_uint32() -> None:
    # Prepare
    masked = [np.array([5], np.int64), np.array([[2**32 - 1, 0], [7, 9]], np.int64)]
    reply_content = RecordDict()
    reply_content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": 137})
    from flwr.app import ConfigRecord

    reply_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked]}
    )

    def call_next(msg: Message, ctx: Context) -> Message:
        return Message(reply_content, reply_to=msg)

    from flwr.app import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)

    # Execute
    reply = hide_weight_mod(msg, Context(1, 3, {}, RecordDict(), {}), call_next)

    # Assert
    from flwr.common import bytes_to_ndarray

    assert reply.content.metric_records["fitres.num_examples"]["num_examples"] == 1
    sent = [
        bytes_to_ndarray(b)
        for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    ]
    assert all(a.dtype == np.uint32 for a in sent)
    for got, want in zip(sent, masked, strict=True):
        np.testing.assert_array_equal(got.astype(np.int64), want)


def test_strategy_refuses_per_client_updates() -> None:
    strategy = SecAggFedAvg()
    one = ndarrays_to_parameters([np.ones(3)])
    other = ndarrays_to_parameters([np.zeros(3)])
    results = [(None, FitRes(Status(0, ""), p, 1, {})) for p in (one, other)]
    with pytest.raises(RuntimeError, match="per-client updates"):
        strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]


def test_dp_sensitivity_adds_what_rounding_can_add_to_the_norm() -> None:
    sensitivity = secagg.dp_sensitivity(0.1, 0.1, 2**29, 10_000)
    assert sensitivity == pytest.approx(0.1 + 2 * 0.1 / 2**29 * 100)


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5000), min_size=3, max_size=12),
    max_weight=st.sampled_from([100.0, 1000.0, 4096.0]),
    seed=st.integers(0, 2**16),
)
def test_counts_enter_the_masked_sum_unweighted(
    weights: list[int], max_weight: float, seed: int
) -> None:
    # Prepare: what secaggplus_mod masks (weight factor, then the weighted values), for
    # sites whose weights may exceed W, each with a random private mask
    rng = np.random.default_rng(seed)
    c, m = 0.05, len(weights)
    q_range = secagg.auto_quantization_range(m)
    sent = [min(w, int(max_weight)) for w in weights]
    masked, masks, total = [], [], 0
    for weight, claim in zip(sent, weights, strict=True):
        q = round(weight / max_weight * q_range)
        total += q
        metrics = secagg.encode_metrics({"train-loss": 2.0}, c)
        values = [rng.uniform(-c, c, 7), metrics]
        quantized = [np.array([q]), *quantize([v * (q / q_range) for v in values], c, q_range)]
        mask = [rng.integers(0, secagg.MODULUS_RANGE, a.shape) for a in quantized]
        plain = [
            (a.astype(np.int64) + b) % secagg.MODULUS_RANGE
            for a, b in zip(quantized, mask, strict=True)
        ]
        masks.append(mask)

        # Execute: the client adds its counts to the masked vector
        masked.append(secagg.add_counts(plain, {"clamped": int(claim > max_weight)}))

    # the workflow: sum, unmask, take the weight factor out, dequantize, offset, divide
    summed = [sum(arrays) % secagg.MODULUS_RANGE for arrays in zip(*masked, strict=True)]
    for mask in masks:
        summed = [(a - b) % secagg.MODULUS_RANGE for a, b in zip(summed, mask, strict=True)]
    assert int(summed[0][0]) == total
    aggregate = [(v - (m - 1) * c) * (q_range / total) for v in dequantize(summed[1:], c, q_range)]
    counts = secagg.decode_counts(aggregate, c, q_range, m)
    _, means = secagg.decode_aggregate(aggregate, ["update"], c)

    # Assert: how many sites were clamped, the weight total, and the metrics unchanged
    assert counts.clamped == sum(w > max_weight for w in weights)
    assert counts.weight_total == pytest.approx(total / q_range, rel=1e-9)
    assert means["train-loss"] == pytest.approx(2.0, abs=1e-4)


def test_decode_counts_refuses_a_sum_without_them() -> None:
    aggregate = [np.zeros(3), secagg.encode_metrics({"train-loss": 1.0}, 0.1)]
    with pytest.raises(ValueError, match="counting mod"):
        secagg.decode_counts(aggregate, 0.1, 2**20, 3)


@pytest.mark.parametrize(
    ("clamped_slot", "ones_slot"),
    [(1e9, 1.0), (-5.0, 1.0), (float("nan"), 1.0), (0.0, 1e-12)],
    ids=["count above m", "negative count", "nan", "weight total too large"],
)
def test_decode_counts_refuses_slots_a_site_wrote_into(
    clamped_slot: float, ones_slot: float
) -> None:
    aggregate = [np.zeros(3), np.array([0.0, clamped_slot, ones_slot])]
    with pytest.raises(ValueError, match="a site wrote into them"):
        secagg.decode_counts(aggregate, 0.1, 2**20, 3)


def test_error_bound_for_the_total_matches_the_one_for_the_weights() -> None:
    ratios = [0.1, 0.5, 1.0, 0.25]
    total = sum(round(r * 2**20) for r in ratios) / 2**20
    per_weights = secagg.aggregate_error_bound(0.1, 2**20, ratios)
    for_total = secagg.error_bound_for_total(0.1, 2**20, 4, total)
    assert for_total == pytest.approx(per_weights, rel=1e-5)
    assert for_total <= per_weights  # the smallest total rounding can give is used there


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages made in this process are stamped with a run and node, as in a ClientApp."""
    with stamped_task_identity():
        yield


@pytest.mark.usefixtures("task_identity")
def test_secure_counts_mod_adds_the_fits_counts_and_leaves_no_trace() -> None:
    # Prepare: a reply of secaggplus_mod's third stage, and the counts fit left behind
    masked = [np.array([5], np.int64), np.array([2**32 - 3, 10, 20, 30], np.int64)]
    context = Context(1, 3, {}, RecordDict(), {})

    def call_next(msg: Message, ctx: Context) -> Message:
        ctx.state.config_records[secagg.COUNTS_RECORD] = ConfigRecord({"clamped": 1})
        content = RecordDict(
            {
                RECORD_KEY_CONFIGS: ConfigRecord(
                    {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked]}
                )
            }
        )
        return Message(content, reply_to=msg)

    from flwr.app import MessageType
    from flwr.common import bytes_to_ndarray

    msg = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)

    # Execute
    reply = secure_counts_mod(msg, context, call_next)

    # Assert: COUNT_STEP added to both count slots mod 2^32, nothing else touched
    sent = [
        bytes_to_ndarray(b)
        for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    ]
    step = secagg.COUNT_STEP
    np.testing.assert_array_equal(sent[0], masked[0])
    np.testing.assert_array_equal(sent[1], [2**32 - 3, 10, 20 + step, 30 + step])
    assert secagg.COUNTS_RECORD not in context.state.config_records
    assert set(reply.content.config_records) == {RECORD_KEY_CONFIGS}
    assert not reply.content.metric_records


# --------------------------------------------------------------------------------------
# The real workflow, in-process
# --------------------------------------------------------------------------------------

SYNTHETIC_SHAPES = {
    "layer.0.lora_A": (8, 512),
    "layer.0.lora_B": (512, 8),
    "layer.1.lora_A": (8, 640),
}
EXAMPLES = [160, 120, 80, 40, 150, 90, 110, 130]
"""Weights of partitions 0..4: unequal, so the test sees weighted, not plain, averaging."""
W_EXAMPLES = 1600.0
"""``fed.max-weight`` for them: 10x the largest a site holds."""


class RecordingStrategy(SecAggFedAvg):
    """Records, per round, every payload ``aggregate_fit`` receives."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.received: dict[int, list[tuple[int, int, list[np.ndarray]]]] = {}

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        from flwr.common import parameters_to_ndarrays

        self.received[server_round] = [
            (proxy.node_id, id(res.parameters), parameters_to_ndarrays(res.parameters))
            for proxy, res in results
        ]
        return super().aggregate_fit(server_round, results, failures)


def simulation_client_app(
    cfg: RunConfig,
    shapes: dict[str, tuple[int, ...]] | None,
    dropouts: dict[int, set[int]] | None = None,
    hangs: dict[int, set[int]] | None = None,
) -> ClientApp:
    """Message-API ClientApp that delegates train to the legacy SecAgg+ app, like qlora's.

    Ray pickles this app into its workers: everything the fakes need travels in closures.
    """

    def trainer_for(context: Context) -> tuple[FakeSession, list[str]]:
        partition = int(context.node_config["partition-id"])
        keys = sorted(shapes) if shapes is not None else real_adapter_keys(cfg)
        return FakeSession(cfg, partition, EXAMPLES[partition], dropouts, hangs), keys

    legacy = make_app(trainer_for)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return legacy(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord(
            {
                wire.NUM_EXAMPLES: 10,
                wire.EVAL_LOSS: 1.0,
                wire.EVAL_PERPLEXITY: math.e,
                wire.EVAL_TOKEN_ACCURACY: 0.5,
                wire.EVAL_TOKENS: 100,
            }
        )
        return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)

    return app


def real_adapter_keys(cfg: RunConfig) -> list[str]:
    from flower_llm.adapters import init_adapter
    from flower_llm.models import resolve_model_path

    state, _ = init_adapter(cfg.model, cfg.lora, resolve_model_path(cfg.model), cfg.seed)
    return secagg.ordered_keys(state)


def simulate(server_main: Any, client_app: ClientApp, num_supernodes: int) -> None:
    from flwr.simulation import run_simulation

    server = ServerApp()
    server.main()(server_main)
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )


def secagg_mode(
    cfg: RunConfig,
    context: Context,
    *,
    strategy: SecAggFedAvg | None = None,
    central: CentralDP | None = None,
    seed: int = 0,
) -> SecAggRounds:
    """The ServerApp's SecAgg+ mode over SYNTHETIC_SHAPES, with seeded streams."""
    streams = RandomStreams(seed)
    evaluation = WeightedFedAvg(min_available_clients=1, eval_rng=streams.evaluate)
    return SecAggRounds(
        cfg,
        context,
        sorted(SYNTHETIC_SHAPES),
        evaluation=evaluation,
        train_rng=streams.train,
        central=central,
        strategy=strategy,
    )


def federate_synthetic(
    mode: SecAggRounds,
    grid: Grid,
    start: dict[str, np.ndarray],
    num_rounds: int,
    on_round_end: Any,
) -> dict[str, np.ndarray]:
    """The one round loop over a synthetic adapter, no evaluation."""
    try:
        final = federate(
            mode,
            grid,
            wire.to_array_record(start),
            first_round=1,
            num_rounds=num_rounds,
            train_config=lambda r: ConfigRecord({wire.SERVER_ROUND: r, wire.LEARNING_RATE: 1e-3}),
            on_round_end=on_round_end,
            evaluate=lambda _r: False,
        )
    finally:
        mode.close()
    return wire.from_array_record(final)


@pytest.fixture(scope="module")
def weighted_run() -> dict[str, Any]:
    """Two SecAgg+ rounds of 4 clients with unequal weights and a recording strategy."""
    cfg = parse_run_config(
        {"fed.num-rounds": 2, "fed.min-available-clients": 4, "fed.max-weight": W_EXAMPLES}
    )
    rng = np.random.default_rng(7)
    start = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SYNTHETIC_SHAPES.items()}
    out: dict[str, Any] = {"start": start, "params": {}, "states": {}}
    strategy = RecordingStrategy(min_train_clients=3)

    def main(grid: Grid, context: Context) -> None:
        mode = secagg_mode(cfg, context, strategy=strategy)

        def on_round_end(result: RoundResult) -> None:
            out["params"][result.server_round] = mode.last_params
            out["states"][result.server_round] = wire.from_array_record(result.arrays)
            out.setdefault("reports", {})[result.server_round] = mode.last_report

        out["final"] = federate_synthetic(mode, grid, start, 2, on_round_end)

    simulate(main, simulation_client_app(cfg, SYNTHETIC_SHAPES), num_supernodes=4)
    out["strategy"] = strategy
    return out


@pytest.mark.slow
def test_secagg_aggregate_equals_weighted_fedavg_within_the_bound(
    weighted_run: dict[str, Any],
) -> None:
    strategy: RecordingStrategy = weighted_run["strategy"]
    global_state = weighted_run["start"]
    keys = sorted(SYNTHETIC_SHAPES)
    for server_round in (1, 2):
        # Prepare: the exact weighted FedAvg of the same client updates
        params: secagg.SecAggParams = weighted_run["params"][server_round]
        # what each client sent: its float32 local adapter minus the global, in float64
        deltas = [
            sent_update(global_state, fake_delta(SYNTHETIC_SHAPES, p, server_round))
            for p in range(4)
        ]
        weights = EXAMPLES[:4]
        exact = {
            k: np.average(
                np.stack([d[k] for d in deltas]).astype(np.float64), axis=0, weights=weights
            )
            for k in keys
        }

        # Execute: what the workflow unmasked
        (_, _, aggregate), *_ = strategy.received[server_round]
        got, _ = secagg.decode_aggregate(aggregate, keys, params.clipping_range)

        # Assert
        bound = params.error_bound([w / params.max_weight for w in weights])
        assert bound < 1e-6 * params.clipping_range
        worst = max(float(np.abs(got[k] - exact[k]).max()) for k in keys)
        assert worst <= bound, (worst, bound)
        # ... and the new global adapter is global + that mean update
        state = weighted_run["states"][server_round]
        for k in keys:
            np.testing.assert_allclose(state[k], global_state[k] + exact[k], rtol=0, atol=1e-6)
        global_state = state


@pytest.mark.slow
def test_the_strategy_only_ever_receives_one_summed_update(weighted_run: dict[str, Any]) -> None:
    strategy: RecordingStrategy = weighted_run["strategy"]
    assert set(strategy.received) == {1, 2}
    for server_round, received in strategy.received.items():
        # Flower attaches the one aggregate to every surviving client's FitRes: one payload
        assert len(received) == 4
        assert len({payload_id for _, payload_id, _ in received}) == 1
        aggregate = received[0][2]
        assert all(
            all(np.array_equal(a, b) for a, b in zip(aggregate, r[2], strict=True))
            for r in received
        )
        # ... and it is no single client's update
        for partition in range(4):
            own = fake_delta(SYNTHETIC_SHAPES, partition, server_round)
            distance = max(
                float(np.abs(aggregate[i] - own[k]).max()) for i, k in enumerate(sorted(own))
            )
            assert distance > 1e-3


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real server main with 5 fake clients: a dropout, a failed round, a recovery.

    Evaluated every second round (and the last).
    """
    from server_apps.fedavg import run

    out_dir = tmp_path_factory.mktemp("secagg-runs")
    cfg = parse_run_config(
        {
            "fed.num-rounds": 3,
            "fed.min-available-clients": 5,
            "fed.min-train-clients": 3,
            "output.dir": str(out_dir),
            "output.run-name": "dropout",
            "output.local-only-baseline": False,
            "fed.aggregation": "secagg+",
            "fed.max-weight": W_EXAMPLES,
            "fed.evaluate-every": 2,
        }
    )
    # round 1: one client raises after the shares went round; round 2: three of five do
    dropouts = {1: {0}, 2: {0, 1, 2}}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    logging.getLogger("strategies.secagg").addHandler(handler)
    try:
        client_app = simulation_client_app(cfg, None, dropouts)
        simulate(lambda grid, context: run(grid, context, cfg), client_app, 5)
    finally:
        logging.getLogger("strategies.secagg").removeHandler(handler)
    return {"dir": out_dir / "dropout", "cfg": cfg, "errors": [r.getMessage() for r in records]}


def load_adapter(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_dropout_above_threshold_still_gives_the_right_aggregate(
    dropout_run: dict[str, Any],
) -> None:
    # Prepare
    from flower_llm.adapters import init_adapter
    from flower_llm.models import resolve_model_path

    cfg: RunConfig = dropout_run["cfg"]
    start, _ = init_adapter(cfg.model, cfg.lora, resolve_model_path(cfg.model), cfg.seed)
    rows = [
        json.loads(line) for line in (dropout_run["dir"] / "metrics.jsonl").read_text().splitlines()
    ]

    # Execute
    after = load_adapter(dropout_run["dir"] / "round-001")

    # Assert: partition 0 dropped in the masked-input stage; 1..4 are in the sum
    row = rows[0]
    assert row["secagg-failed"] is None and row["updated"] is True
    assert row["clients-sampled"] == 5 and row["clients-replied"] == 4
    assert list(row["dropped"].values()) == [
        "dropped out in SecAgg+ stage 'collect-masked-vectors'"
    ]
    shapes = {k: v.shape for k, v in start.items()}
    deltas = [sent_update(start, fake_delta(shapes, p, 1)) for p in range(1, 5)]
    weights = EXAMPLES[1:5]
    # the bound for the weights these four sent (W = 10x the largest), and it is that one
    bound = row["secagg-error-bound"]
    assert bound == pytest.approx(
        secagg.aggregate_error_bound(
            row["secagg-clipping-range"],
            row["secagg-quantization-range"],
            [w / W_EXAMPLES for w in weights],
        ),
        rel=1e-3,
    )
    assert row["secagg-clamped"] == 0
    assert row["secagg-weight-total"] == pytest.approx(sum(weights) / W_EXAMPLES, rel=1e-6)
    for key in start:
        exact = np.average(np.stack([d[key] for d in deltas]), axis=0, weights=weights)
        np.testing.assert_allclose(after[key], start[key] + exact, rtol=0, atol=bound + 1e-6)


@pytest.mark.slow
def test_below_threshold_the_round_fails_cleanly_and_says_so(dropout_run: dict[str, Any]) -> None:
    rows = [
        json.loads(line) for line in (dropout_run["dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [1, 2, 3]
    failed = rows[1]
    assert failed["updated"] is False
    assert "halted in stage 'collect-masked-vectors'" in failed["secagg-failed"]
    assert "2 of 5 sampled clients left" in failed["secagg-failed"]
    before, after = (load_adapter(dropout_run["dir"] / f"round-00{r}") for r in (1, 2))
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    assert any("Round 2 failed" in message for message in dropout_run["errors"])
    # the run goes on: all five are back in round 3
    assert rows[2]["updated"] is True and rows[2]["clients-replied"] == 5
    summary = json.loads((dropout_run["dir"] / "summary.json").read_text())
    assert summary["rounds-failed"] == 1
    # fed.evaluate-every = 2: round 2, and round 3 as the last
    assert summary["eval-loss-by-round"] == [None, 1.0, 1.0]


@pytest.fixture(scope="module")
def dp_run() -> dict[str, Any]:
    """One SecAgg+ round with client-fixed DP: clients clip to C, the server adds noise."""
    cfg = parse_run_config(
        {
            "fed.num-rounds": 1,
            "fed.min-available-clients": 4,
            "privacy.mode": "client-fixed",
            "privacy.clip-norm": 0.5,
            "privacy.noise-multiplier": 0.8,
        }
    )
    rng = np.random.default_rng(3)
    start = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SYNTHETIC_SHAPES.items()}
    out: dict[str, Any] = {"cfg": cfg, "start": start}
    strategy = SecAggFedAvg(min_train_clients=3)

    def main(grid: Grid, context: Context) -> None:
        central = CentralDP.from_config(cfg, np.random.default_rng(4))
        mode = secagg_mode(cfg, context, strategy=strategy, central=central)

        def on_round_end(result: RoundResult) -> None:
            out.update(result=result, params=mode.last_params, aggregate=strategy.aggregate)

        out["final"] = federate_synthetic(mode, grid, start, 1, on_round_end)

    simulate(main, simulation_client_app(cfg, SYNTHETIC_SHAPES), num_supernodes=4)
    return out


@pytest.mark.slow
@pytest.mark.long
def test_secagg_with_dp_averages_clipped_updates_and_adds_the_noise(dp_run: dict[str, Any]) -> None:
    # Prepare: every client's update clipped to C = 0.5 (their norms are ~5), equal weights
    from flower_llm.privacy.accounting import PldAccountant, RdpAccountant

    cfg: RunConfig = dp_run["cfg"]
    keys = sorted(SYNTHETIC_SHAPES)
    params: secagg.SecAggParams = dp_run["params"]
    start = dp_run["start"]
    clipped = []
    for p in range(4):
        sent = sent_update(start, fake_delta(SYNTHETIC_SHAPES, p, 1))
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in sent.values()))
        assert norm > 1.0  # clipping binds
        clipped.append({k: v * (0.5 / norm) for k, v in sent.items()})
    exact = {k: np.mean([c[k] for c in clipped], axis=0) for k in keys}

    # Execute: the unmasked mean (no noise yet) and the saved adapter (noise added)
    unmasked, _ = secagg.decode_aggregate(dp_run["aggregate"], keys, params.clipping_range)
    final = dp_run["final"]
    noise = np.concatenate(
        [(final[k].astype(np.float64) - start[k] - exact[k]).ravel() for k in keys]
    )

    # Assert: SecAgg+ averaged exactly the clipped updates, uniformly weighted
    assert params.max_weight == 1.0
    for k in keys:
        np.testing.assert_allclose(unmasked[k], exact[k], rtol=0, atol=params.error_bound())
    # ... the server added N(0, std^2) with std = sigma (C + rounding) / m
    privacy = dp_run["result"].columns
    std = privacy["dp-noise-stddev"]
    assert std == pytest.approx(0.8 * 0.5 / 4, rel=1e-3)
    assert np.std(noise) == pytest.approx(std, rel=0.03)
    assert abs(np.mean(noise)) < 5 * std / math.sqrt(noise.size)
    # ... and epsilon is the accountants' after one round with every client sampled: PLD
    # (privacy.accountant's default) the headline, the exact RDP one next to it
    pld = PldAccountant(0.8, 1.0, cfg.privacy.delta)
    pld.step()
    rdp = RdpAccountant(0.8, 1.0, cfg.privacy.delta)
    rdp.step()
    assert privacy["epsilon"] == privacy["pld-epsilon"] == pytest.approx(pld.epsilon())
    assert privacy["rdp-epsilon"] == pytest.approx(rdp.epsilon())
    assert privacy["dp-expected-clients"] == 4
    assert "train-loss" not in dp_run["result"].train_metrics  # would leak without noise


# A SuperNode starts one ClientApp process per message; a SecAgg+ round sends a client four.
KEY_EXCHANGE_STAGE = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client_apps.qlora import app

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
setup = ConfigRecord({
    Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
    Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 2**20, Key.MOD_RANGE: 2**32,
    Key.MAX_WEIGHT: 1000.0,
})
msg = Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=7, message_type="train")
msg.metadata.__dict__["_message_id"] = "setup"
context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                  run_config={"fed.aggregation": "secagg+", "fed.max-weight": 1000.0})
reply = app(msg, context)
heavy = ("torch", "transformers", "peft", "datasets", "bitsandbytes", "opacus", "scipy")
print(json.dumps({
    "reply": sorted(reply.content.config_records[RECORD_KEY_CONFIGS]),
    "imported": [name for name in heavy if name in sys.modules],
}))
"""


def test_a_key_exchange_stage_runs_without_importing_the_training_stack() -> None:
    # Execute: the setup stage, in a fresh process as a SuperNode would run it
    proc = subprocess.run(
        [sys.executable, "-c", KEY_EXCHANGE_STAGE],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert: it answered with its two public keys, and torch & co. never loaded
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reply"] == [Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2]
    assert result["imported"] == []


# --------------------------------------------------------------------------------------
# One engine: the sampling that runs is the one accounted; round timeout; resume
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timeout_run() -> dict[str, Any]:
    """One SecAgg+ round with fed.round-timeout = 12 s in which one of 4 sites is silent.

    An evaluation exchange with a long timeout first starts the simulation's workers
    (seconds of imports on a loaded machine), so the round's time is the protocol's.
    """
    cfg = parse_run_config(
        {
            "fed.num-rounds": 1,
            "fed.min-available-clients": 4,
            "fed.round-timeout": 12.0,
            "fed.weighting": "seen",
        }
    )
    start = {k: np.zeros(s, np.float32) for k, s in SYNTHETIC_SHAPES.items()}
    out: dict[str, Any] = {}

    def main(grid: Grid, context: Context) -> None:
        warm = [
            Message(RecordDict(), message_type="evaluate", dst_node_id=node)
            for node in wait_for_nodes(grid, 4, 120)
        ]
        assert len(list(grid.send_and_receive(warm, timeout=300))) == 4
        mode = secagg_mode(cfg, context)

        def on_round_end(result: RoundResult) -> None:
            out["result"] = result

        out["final"] = federate_synthetic(mode, grid, start, 1, on_round_end)

    app = simulation_client_app(cfg, SYNTHETIC_SHAPES, hangs={1: {3}})
    simulate(main, app, num_supernodes=4)
    return out


@pytest.mark.slow
@pytest.mark.long
def test_secagg_round_ends_at_the_round_timeout_without_the_silent_site(
    timeout_run: dict[str, Any],
) -> None:
    result: RoundResult = timeout_run["result"]
    # the stage the site went silent in waited a quarter of fed.round-timeout for it, and
    # the round ended within the timeout, not the HANG_SECONDS the site stayed silent
    assert 3.0 <= result.seconds < 12.0 < HANG_SECONDS
    assert result.report.updated and len(result.report.accepted) == 3
    assert list(result.report.dropped.values()) == [
        "dropped out in SecAgg+ stage 'collect-masked-vectors'"
    ]


@pytest.fixture(scope="module")
def dp_resume_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SecAgg+ with DP at q = 0.5 over 6 sites, through the ServerApp's ``run``: 3 rounds
    uninterrupted; and 1 round, then resumed for the other 2 with other evaluation settings.

    One simulation serves the three runs, so node ids stay put (as in a deployment); the
    streams are seeded (tests only) so that both runs can draw the same cohorts and noise,
    which a resume must continue from the checkpoint.
    """
    from server_apps.fedavg import run

    out = tmp_path_factory.mktemp("secagg-resume")
    job = {
        "fed.aggregation": "secagg+",
        "fed.fraction-train": 0.5,
        "fed.min-available-clients": 6,
        "privacy.mode": "client-fixed",
        "privacy.clip-norm": 0.05,
        "privacy.noise-multiplier": 0.7,
        "privacy.min-sampled-clients": 3,
        # 6 sites at q = 0.5: a site decides whether a round sums with chance 0.3125
        "privacy.small-cohorts": "account",
        "train.lr-schedule": "constant",  # so that fed.num-rounds may grow on resume
        "output.local-only-baseline": False,
        "output.dir": str(out),
    }
    full = parse_run_config({**job, "fed.num-rounds": 3, "output.run-name": "full"})
    first = parse_run_config({**job, "fed.num-rounds": 1, "output.run-name": "resumed"})
    again = parse_run_config(
        {
            **job,
            "fed.num-rounds": 3,
            "output.run-name": "resumed",
            "output.resume": True,
            "fed.fraction-evaluate": 0.5,
            "fed.evaluate-every": 2,
        }
    )

    def main(grid: Grid, context: Context) -> None:
        for cfg in (full, first, again):
            streams = RandomStreams(cfg.seed)
            mode = SecAggRounds(
                cfg,
                context,
                real_adapter_keys(cfg),
                evaluation=WeightedFedAvg(
                    fraction_evaluate=cfg.fed.fraction_evaluate,
                    min_available_clients=6,
                    eval_rng=streams.evaluate,
                ),
                train_rng=streams.train,
                central=CentralDP.from_config(cfg, streams.noise),
            )
            run(grid, context, cfg, mode, streams)

    simulate(main, simulation_client_app(full, None), num_supernodes=6)
    return {"full": out / "full", "resumed": out / "resumed"}


@pytest.mark.slow
@pytest.mark.long
def test_a_resumed_secagg_dp_run_ends_where_the_uninterrupted_one_ends(
    dp_resume_runs: dict[str, Any],
) -> None:
    full, resumed = dp_resume_runs["full"], dp_resume_runs["resumed"]
    rows_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_resumed = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    # Assert: the same Poisson cohorts and the same epsilon after each round ...
    assert [r["round"] for r in rows_resumed] == [1, 2, 3]
    assert [r["clients-sampled"] for r in rows_resumed] == [r["clients-sampled"] for r in rows_full]
    assert [r["epsilon"] for r in rows_resumed] == [r["epsilon"] for r in rows_full]
    assert rows_resumed[2]["epsilon"] > rows_resumed[1]["epsilon"] > rows_resumed[0]["epsilon"]
    # ... although evaluation changed on resume (every second round, and the last)
    assert [r.get("eval-loss") is not None for r in rows_resumed] == [True, True, True]
    # ... and the same adapter, up to SecAgg+'s stochastic rounding (its bound per round)
    bound = sum(r.get("secagg-error-bound", 0.0) for r in rows_full) + 1e-7
    a, b = load_adapter(full / "final"), load_adapter(resumed / "final")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=bound)
    # ... and one summary shape, privacy section included
    s_full = json.loads((full / "summary.json").read_text())
    s_resumed = json.loads((resumed / "summary.json").read_text())
    assert s_resumed["resumed-after-round"] == 1
    assert set(s_resumed) - {"resumed-after-round"} == set(s_full)
    client_level = s_resumed["privacy"]["client-level"]
    assert client_level["rounds-accounted"] == 3 and client_level["sampling"] == "poisson"
    assert s_resumed["privacy"]["warnings"] == s_full["privacy"]["warnings"]
    assert [w for w in s_full["privacy"]["warnings"] if "dp-delta-total" in w]
    # ... the small-cohort term continues across the resume: delta + 3 x P(Bin(5, .5) = 2)
    assert [r["dp-delta-total"] for r in rows_resumed] == [r["dp-delta-total"] for r in rows_full]
    assert rows_full[-1]["dp-delta-total"] == pytest.approx(1e-5 + 3 * 10 / 32, rel=1e-9)
    assert "clients clip under SecAgg+" in client_level["caveat"]
    assert client_level["epsilon"] == rows_full[-1]["epsilon"]


@pytest.mark.slow
@pytest.mark.long
def test_secagg_dp_at_q_below_one_records_dp_accountings_epsilon(
    dp_resume_runs: dict[str, Any],
) -> None:
    # Prepare: dp-accounting's PLD and RDP accountants composing the event that ran
    import dp_accounting

    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(0.7))
    expected, expected_rdp = [], []
    for rounds in (1, 2, 3):
        pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        pld.compose(event, rounds)
        expected.append(pld.get_epsilon(1e-5))
        rdp = dp_accounting.rdp.RdpAccountant()
        rdp.compose(event, rounds)
        expected_rdp.append(rdp.get_epsilon(1e-5))

    # Execute
    full = dp_resume_runs["full"]
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]

    # Assert: every round released and was accounted as Poisson(q = 0.5), whatever its
    # cohort size, with the fixed denominator m = round(q N) = 3
    assert [row["epsilon"] for row in rows] == pytest.approx(expected, rel=1e-3)
    assert [row["rdp-epsilon"] for row in rows] == pytest.approx(expected_rdp, rel=1e-3)
    assert all(row["dp-expected-clients"] == 3 for row in rows)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["privacy"]["client-level"]["sampling-rate"] == 0.5


# --------------------------------------------------------------------------------------
# A site above the max weight: clamped, and only counted
# --------------------------------------------------------------------------------------


class InProcessGrid:
    """Sites answered in this process by ``app``, each with its own Context (no Ray)."""

    def __init__(self, app: ClientApp, run_config: dict[str, Any], sites: int) -> None:
        self.app = app
        self.contexts = {
            100 + p: Context(
                run_id=1,
                node_id=100 + p,
                node_config={"partition-id": p, "num-partitions": sites},
                state=RecordDict(),
                run_config=run_config,
            )
            for p in range(sites)
        }
        self.replies: list[Message] = []
        self.run = SimpleNamespace(run_id=1)  # what Flower's legacy SecAgg+ asks of a Grid

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        # A copy per site, as the transport gives: secaggplus_mod edits what it receives.
        out = [
            self.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            for msg in messages
        ]
        self.replies.extend(out)
        return out


@pytest.mark.usefixtures("task_identity")
def test_a_site_above_the_max_weight_is_clamped_counted_and_not_named(tmp_path: Path) -> None:
    # Prepare: four sites holding 160, 120, 80 and 40 examples; W = 150 bounds all but one
    from flower_llm.adapters import init_adapter
    from flower_llm.models import resolve_model_path
    from server_apps.fedavg import run

    max_weight = 150.0
    run_config = {
        "fed.aggregation": "secagg+",
        "fed.max-weight": max_weight,
        "fed.num-rounds": 1,
        "fed.min-available-clients": 4,
        "output.local-only-baseline": False,
        "output.dir": str(tmp_path),
        "output.run-name": "clamped",
    }
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(simulation_client_app(cfg, None), run_config, sites=4)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    # Execute: the ServerApp's own run, one SecAgg+ round
    run(grid, server, cfg)  # type: ignore[arg-type]

    # Assert: the server learned that one site was clamped, and the weights' total
    run_dir = tmp_path / "clamped"
    (row,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["updated"] is True and row["clients-replied"] == 4
    sent = [min(n, max_weight) for n in EXAMPLES[:4]]
    assert row["secagg-clamped"] == 1
    assert row["secagg-weight-total"] == pytest.approx(sum(sent) / max_weight, rel=1e-6)
    # ... the new adapter is FedAvg with the clamped site at W, within the round's bound
    start, _ = init_adapter(cfg.model, cfg.lora, resolve_model_path(cfg.model), cfg.seed)
    after = load_adapter(run_dir / "round-001")
    bound = row["secagg-error-bound"]
    assert bound < 1e-6 * row["secagg-clipping-range"]
    shapes = {k: v.shape for k, v in start.items()}
    deltas = [sent_update(start, fake_delta(shapes, p, 1)) for p in range(4)]
    moved = 0.0
    for key in start:
        stacked = np.stack([d[key] for d in deltas])
        clamped = np.average(stacked, axis=0, weights=sent)
        np.testing.assert_allclose(after[key], start[key] + clamped, rtol=0, atol=bound + 1e-6)
        held = np.average(stacked, axis=0, weights=EXAMPLES[:4])
        moved = max(moved, float(np.abs(held - clamped).max()))
    assert moved > 100 * bound  # the clamp changed the aggregate, visibly
    # ... no reply says which site: every plaintext weight is 1, no counts in the clear
    masked_stage = [
        r
        for r in grid.replies
        if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked_stage) == 4
    for reply in masked_stage:
        assert reply.content.metric_records["fitres.num_examples"]["num_examples"] == 1
        assert set(reply.content.metric_records) == {"fitres.num_examples"}
        assert not reply.content.config_records["fitres.metrics"]  # fit's metrics: none
        assert set(reply.content.config_records) == {
            RECORD_KEY_CONFIGS,
            "fitres.metrics",
            "fitres.status",
        }
    assert all(secagg.COUNTS_RECORD not in c.state.config_records for c in grid.contexts.values())
    # ... and summary.json warns
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secagg"]["sites-clamped"] == 1
    assert summary["secagg"]["rounds-with-clamped-sites"] == [1]
    (warning,) = summary["secagg"]["warnings"]
    assert "clamped to W" in warning and "fed.max-weight" in warning


def test_the_summary_says_nothing_was_clamped_when_nothing_was() -> None:
    from strategies.secagg import secagg_summary

    rows = [{"round": 1, "secagg-clamped": 0, "secagg-max-weight": 10.0}, {"round": 2}]
    assert secagg_summary(rows) == {
        "sites-clamped": 0,
        "rounds-with-clamped-sites": [],
        "warnings": [],
    }
