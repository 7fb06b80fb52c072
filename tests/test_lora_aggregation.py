"""lora.aggregation: fedavg (inexact), ffa (exact, B only) and exact (product average, SVD)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_llm import wire
from flower_llm.aggregation import weighted_average
from flower_llm.lora_aggregation import (
    exact_average,
    lora_pairs,
    product_gap,
    rank_of,
    refactor_product_sum,
    sent_keys,
    to_rank,
)
from strategies.fedavg import WeightedFedAvg


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


D_OUT, D_IN, RANK = 24, 20, 4
MODULES = ("layers.0.q_proj", "layers.0.v_proj")


def site_state(seed: int, rank: int = RANK, a: dict[str, np.ndarray] | None = None) -> dict:
    """One site's LoRA factors (a shared ``a`` when given, as under ffa)."""
    rng = np.random.default_rng(seed)
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = (
            a[f"{m}.lora_A.weight"] if a is not None else rng.normal(0, 0.3, (rank, D_IN))
        ).astype(np.float32)
        state[f"{m}.lora_B.weight"] = rng.normal(0, 0.1, (D_OUT, rank)).astype(np.float32)
    return state


def product(state: dict, module: str) -> np.ndarray:
    return state[f"{module}.lora_B.weight"].astype(np.float64) @ state[
        f"{module}.lora_A.weight"
    ].astype(np.float64)


def averaged_product(
    states: list[dict], weights: list[float], module: str, rank: int | None = None
) -> np.ndarray:
    """``sum_k p_k (r / r_k) B_k A_k``: the products in the scale of a rank-``rank`` adapter."""
    total = sum(weights)
    return sum(
        w
        / total
        * (rank or s[f"{module}.lora_A.weight"].shape[0])
        / s[f"{module}.lora_A.weight"].shape[0]
        * product(s, module)
        for s, w in zip(states, weights, strict=True)
    )


def test_pairs_and_sent_keys() -> None:
    state = site_state(0)
    assert lora_pairs(state) == [
        (f"{m}.lora_A.weight", f"{m}.lora_B.weight") for m in sorted(MODULES)
    ]
    assert sent_keys(state, "ffa") == [k for k in state if ".lora_B." in k]
    assert sent_keys(state, "exact") == list(state)
    with pytest.raises(ValueError, match="has no"):
        lora_pairs({"x.lora_A.weight": 0})


def test_fedavg_of_factors_is_not_the_average_of_products() -> None:
    # Prepare
    states = [site_state(s) for s in (1, 2, 3)]
    weights = [1.0, 2.0, 3.0]

    # Execute
    averaged = weighted_average(states, weights)

    # Assert: the cross terms B_j A_k make a large relative gap
    assert product_gap(states, weights, averaged) > 0.3


def test_ffa_fedavg_of_b_with_a_shared_is_exact() -> None:
    # Prepare: every site holds the same (frozen) A
    shared = site_state(0)
    states = [site_state(s, a=shared) for s in (1, 2, 3)]
    weights = [5.0, 1.0, 10.0]

    # Execute
    averaged = weighted_average(states, weights)

    # Assert
    assert product_gap(states, weights, averaged) < 1e-6


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_exact_is_exact_when_rank_covers_the_sum_of_site_ranks(ranks: tuple[int, ...]) -> None:
    # Prepare: sites of possibly different ranks; the global rank is their sum
    states = [site_state(s, rank=r) for s, r in zip((1, 2, 3), ranks, strict=True)]
    weights = [1.0, 2.0, 3.0]
    pairs_a = [[s[f"{m}.lora_A.weight"] for s in states] for m in MODULES]
    pairs_b = [[s[f"{m}.lora_B.weight"] for s in states] for m in MODULES]

    # Execute
    factors = [w / sum(weights) for w in weights]
    out = [
        refactor_product_sum(bs, as_, factors, sum(ranks))
        for bs, as_ in zip(pairs_b, pairs_a, strict=True)
    ]

    # Assert: the global product is the weighted average of the products
    for module, refactored in zip(MODULES, out, strict=True):
        target = averaged_product(states, weights, module)
        np.testing.assert_allclose(refactored.b @ refactored.a, target, atol=1e-10)
        assert refactored.error < 1e-10
        np.testing.assert_allclose(refactored.a @ refactored.a.T, np.eye(sum(ranks)), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 11))
def test_exact_truncation_error_is_the_reported_one(seed: int, rank: int) -> None:
    # Prepare: three rank-4 sites re-factored to a smaller rank than 12
    states = [site_state(seed + k) for k in range(3)]
    weights = [1.0, 3.0, 6.0]

    # Execute
    state, report = exact_average(states, weights, rank)

    # Assert: ||M - B A||_F equals the reported error, and the truncated SVD is optimal:
    # no better than the best rank-r approximation, computed here from the dense M
    errors, norms = [], []
    for module in MODULES:
        target = averaged_product(states, weights, module, rank)
        got = product(state, module)
        errors.append(np.linalg.norm(target - got))
        s = np.linalg.svd(target, compute_uv=False)
        best = np.sqrt(np.sum(s[rank:] ** 2))
        assert errors[-1] == pytest.approx(best, rel=1e-4, abs=1e-6)
        norms.append(np.linalg.norm(target))
    total = float(np.sqrt(np.sum(np.square(errors))) / np.sqrt(np.sum(np.square(norms))))
    assert report.relative_error == pytest.approx(total, rel=1e-4, abs=1e-6)
    assert state[f"{MODULES[0]}.lora_B.weight"].shape == (D_OUT, rank)


def train_reply(node: int, state: dict, examples: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: examples}),
        }
    )
    return Message(content, reply_to=instruction)


def strategy_at(global_state: dict, **kwargs: object) -> WeightedFedAvg:
    strategy = WeightedFedAvg(min_train_clients=1, **kwargs)  # type: ignore[arg-type]
    strategy.start_round(1, wire.to_array_record(global_state))
    strategy.report.sampled = [1, 2, 3]
    return strategy


def test_strategy_exact_aggregation_reports_its_truncation_error() -> None:
    # Prepare
    start = site_state(0)
    states = [site_state(s) for s in (1, 2, 3)]
    examples = [10, 20, 70]
    replies = [train_reply(n, s, e) for n, s, e in zip((1, 2, 3), states, examples, strict=True)]
    full = strategy_at(start, lora_aggregation="exact", lora_rank=3 * RANK)
    truncated = strategy_at(start, lora_aggregation="exact", lora_rank=RANK)

    # Execute
    exact_arrays, _ = full.aggregate_train(1, replies)
    cut_arrays, _ = truncated.aggregate_train(1, replies)

    # Assert
    assert exact_arrays is not None and cut_arrays is not None
    exact = wire.from_array_record(exact_arrays)
    cut = wire.from_array_record(cut_arrays)
    weights = [float(e) for e in examples]
    assert product_gap(states, weights, exact) < 1e-5
    assert full.report.lora_error is not None and full.report.lora_error < 1e-6
    assert truncated.report.lora_error is not None
    assert product_gap(states, weights, cut) == pytest.approx(truncated.report.lora_error, rel=1e-3)
    assert truncated.report.aggregation_row()["lora-truncation-error"] > 0.1


def test_strategy_ffa_takes_b_only_and_keeps_the_frozen_a() -> None:
    # Prepare: replies carry B only (half the upload); one that sends A too is refused
    start = site_state(0)
    states = [site_state(s, a=start) for s in (1, 2)]
    b_only = [{k: v for k, v in s.items() if ".lora_B." in k} for s in states]
    replies = [
        train_reply(1, b_only[0], 10),
        train_reply(2, b_only[1], 30),
        train_reply(3, states[0], 10),
    ]
    strategy = strategy_at(start, lora_aggregation="ffa")

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert arrays is not None
    out = wire.from_array_record(arrays)
    assert strategy.report.accepted == [1, 2]
    assert "unexpected arrays" in strategy.report.dropped[3]
    for key, value in start.items():
        if ".lora_A." in key:
            np.testing.assert_array_equal(out[key], value)
    assert product_gap(states, [10.0, 30.0], out) < 1e-6
    sent = sum(v.nbytes for v in b_only[0].values())
    assert sent == sum(v.nbytes for v in states[0].values()) * D_OUT / (D_OUT + D_IN)


# --------------------------------------------------------------------------------------
# Heterogeneous ranks
# --------------------------------------------------------------------------------------


def test_to_rank_truncates_down_and_pads_up_in_the_site_scale() -> None:
    # Prepare: a rank-8 global adapter
    state = site_state(1, rank=8)

    # Execute
    down = to_rank(state, 3)
    up = to_rank(state, 12)
    back = to_rank(up, 8)

    # Assert: rank 3 holds the best rank-3 approximation of the product, times 3 / 8 (its
    # scale alpha / 3 against alpha / 8); padding up is exact, and so is the way back
    for module in MODULES:
        target = product(state, module)
        s = np.linalg.svd(target, compute_uv=False)
        err = np.linalg.norm(target - (8 / 3) * product(down, module))
        assert err == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)), rel=1e-4)
        np.testing.assert_allclose((8 / 12) * product(up, module), target, atol=1e-6)
        np.testing.assert_allclose(product(back, module), target, atol=1e-5)
    assert rank_of(down) == 3 and rank_of(up) == 12
    assert to_rank(state, 8) == state


def test_exact_average_of_ranks_2_4_8_is_exact_at_rank_14_in_every_scale() -> None:
    # Prepare: sites of ranks 2, 4, 8 with scale alpha / r_k; the global rank is 14
    ranks = (2, 4, 8)
    states = [site_state(s, rank=r) for s, r in zip((1, 2, 3), ranks, strict=True)]
    weights = [3.0, 1.0, 2.0]

    # Execute
    out, report = exact_average(states, weights, 14)

    # Assert: (alpha / 14) B A = sum_k p_k (alpha / r_k) B_k A_k
    for module in MODULES:
        expected = sum(
            w / sum(weights) / r * product(s, module)
            for s, w, r in zip(states, weights, ranks, strict=True)
        )
        np.testing.assert_allclose(product(out, module) / 14, expected, atol=1e-7)
    assert report.relative_error < 1e-6


def test_strategy_checks_a_lower_rank_reply_against_the_global_adapter_at_its_rank() -> None:
    # Prepare: global rank 8; one site replies at rank 4 (moved a little from the global
    # adapter at rank 4), one at rank 8, one at rank 16 (above lora.r)
    start = site_state(0, rank=8)
    low = {k: v + np.float32(0.001) for k, v in to_rank(start, 4).items()}
    full = {k: v - np.float32(0.001) for k, v in start.items()}
    replies = [
        train_reply(1, low, 10),
        train_reply(2, full, 10),
        train_reply(3, site_state(3, rank=16), 10),
    ]
    strategy = strategy_at(
        start, lora_aggregation="exact", lora_rank=8, update_bound=lambda _r, _p: 0.01
    )

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert strategy.report.accepted == [1, 2]
    assert "outside [1, lora.r = 8]" in strategy.report.dropped[3]
    assert arrays is not None
    out = wire.from_array_record(arrays)
    expected, _ = exact_average([low, full], [10.0, 10.0], 8)
    for module in MODULES:
        np.testing.assert_allclose(product(out, module), product(expected, module), atol=1e-6)


def test_dp_fedavg_with_ffa_noises_b_and_keeps_the_frozen_a() -> None:
    # Prepare: DP-FedAvg (server-fixed, noise 0, huge C, q = 1) over sites sending B only
    from flwr.app import ConfigRecord

    from strategies.dp import CentralDP, DifferentialPrivacyFedAvg

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    start = site_state(0)
    states = {n: site_state(n, a=start) for n in (1, 2)}
    inner = WeightedFedAvg(min_train_clients=1, min_available_clients=1, lora_aggregation="ffa")
    central = CentralDP(
        noise_multiplier=0.0,
        clip_norm=1e6,
        sampling_rate=1.0,
        delta=1e-5,
        rng=np.random.default_rng(0),
    )
    strategy = DifferentialPrivacyFedAvg(inner, central, mode="server-fixed")
    messages = list(
        strategy.configure_train(1, wire.to_array_record(start), ConfigRecord(), Grid())
    )  # type: ignore[arg-type]

    # Execute
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        b_only = {k: v for k, v in states[node].items() if ".lora_B." in k}
        content = RecordDict(
            {
                wire.ARRAYS: wire.to_array_record(b_only),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10 * node}),
            }
        )
        replies.append(Message(content, reply_to=m))
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: uniform FedAvg of B (DP weighs every site the same), A exactly as sent
    assert arrays is not None and inner.report.accepted == [1, 2]
    out = wire.from_array_record(arrays)
    for key, value in start.items():
        if ".lora_A." in key:
            np.testing.assert_array_equal(out[key], value)
        else:
            np.testing.assert_allclose(out[key], (states[1][key] + states[2][key]) / 2, atol=1e-6)


def test_refactored_factors_do_not_depend_on_singular_vector_signs() -> None:
    # Prepare: the same product from factors of opposite signs (B A = (-B)(-A))
    state = site_state(4, rank=8)
    bs = [state[f"{MODULES[0]}.lora_B.weight"]]
    as_ = [state[f"{MODULES[0]}.lora_A.weight"]]

    # Execute
    plus = refactor_product_sum(bs, as_, [1.0], 5)
    minus = refactor_product_sum([-b for b in bs], [-a for a in as_], [1.0], 5)

    # Assert: identical factors; every row of A has a positive largest entry
    np.testing.assert_allclose(plus.a, minus.a, atol=1e-10)
    np.testing.assert_allclose(plus.b, minus.b, atol=1e-10)
    rows = np.arange(5)
    assert (plus.a[rows, np.argmax(np.abs(plus.a), axis=1)] > 0).all()


def test_exact_sends_a_lower_rank_site_the_global_adapter_at_its_rank() -> None:
    # Prepare: global rank 8; node 1 replied at rank 4 last round, node 2 at rank 8, node 3
    # has not replied yet
    from flwr.app import ConfigRecord, MessageType

    start = site_state(0, rank=8)
    low = {k: v + np.float32(0.001) for k, v in to_rank(start, 4).items()}
    strategy = strategy_at(
        start, lora_aggregation="exact", lora_rank=8, update_bound=lambda _r, _p: 0.01
    )
    strategy.aggregate_train(1, [train_reply(1, low, 10), train_reply(2, start, 10)])
    global_arrays = wire.to_array_record(site_state(5, rank=8))

    # Execute: the next round's instructions
    messages = strategy.messages_for([1, 2, 3], global_arrays, ConfigRecord({}), MessageType.TRAIN)

    # Assert: node 1 gets a rank-4 adapter, the bytes of one, equal to the truncated-SVD
    # re-factoring a rank-4 site would make itself; nodes 2 and 3 the global adapter as is
    sent = [m.content.array_records[wire.ARRAYS] for m in messages]
    at_four = to_rank(wire.from_array_record(global_arrays), 4)
    assert wire.num_bytes(sent[0]) == wire.num_bytes(wire.to_array_record(at_four))
    assert wire.num_bytes(sent[0]) < 0.6 * wire.num_bytes(global_arrays)
    assert sent[1] is global_arrays and sent[2] is global_arrays
    got = wire.from_array_record(sent[0])
    assert set(got) == set(at_four)
    for key, value in at_four.items():
        assert got[key].shape[0 if ".lora_A." in key else 1] == 4
        np.testing.assert_array_equal(got[key], value)
    assert rank_of(got) == 4
    assert strategy.report.bytes_down == sum(wire.num_bytes(r) for r in sent)


@pytest.mark.parametrize("case", ["near-identical sites", "scales 1 to 1e-9", "equal B"])
def test_exact_refactoring_of_ill_conditioned_stacks_stays_within_float32_resolution(
    case: str,
) -> None:
    # Prepare: ten sites whose stacked factors are nearly rank-deficient, as sites that
    # start from one adapter and move it little make them (the Gram route squares the
    # condition number of these stacks)
    rng = np.random.default_rng(7)
    b0, a0 = rng.normal(0, 0.01, (D_OUT, RANK)), rng.normal(0, 0.3, (RANK, D_IN))
    bs, as_ = [], []
    for k in range(10):
        if case == "near-identical sites":
            b, a = b0 + rng.normal(0, 1e-5, b0.shape), a0 + rng.normal(0, 3e-4, a0.shape)
        elif case == "scales 1 to 1e-9":
            b, a = rng.normal(0, 10.0**-k, b0.shape), rng.normal(0, 1, a0.shape)
        else:
            b, a = b0, a0 + rng.normal(0, 3e-4, a0.shape)
        bs.append(b.astype(np.float32))
        as_.append(a.astype(np.float32))
    factors = list(rng.uniform(1, 5, 10) / 30)
    target = sum(
        f * (b.astype(np.float64) @ a.astype(np.float64))
        for f, b, a in zip(factors, bs, as_, strict=True)
    )
    singular = np.linalg.svd(target, compute_uv=False)

    for rank in (RANK, 10 * RANK):
        # Execute
        out = refactor_product_sum(bs, as_, factors, rank)

        # Assert: the product is the best rank-r one to within float32's resolution of M,
        # the reported error is the true one, and A's nonzero rows are orthonormal
        best = float(np.sqrt(np.sum(singular[rank:] ** 2)))
        got = float(np.linalg.norm(target - out.b @ out.a))
        scale = float(np.linalg.norm(target))
        assert got <= best + 1e-7 * scale
        assert out.error == pytest.approx(best, abs=1e-7 * scale)
        rows = out.a[np.abs(out.a).sum(axis=1) > 0]
        np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-12)
