"""DP-FedAvg wrapper: equals uniform FedAvg without noise, clips to C, noise of the right size,
one accountant step per round with the right (q, sigma), budget stop, guards, resume."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from flower_llm import wire
from flower_llm.aggregation import weighted_average
from flower_llm.client import clip_adapter_update
from flower_llm.config import ConfigError, parse_run_config
from flower_llm.privacy import epsilon_after, global_l2_norm, max_rounds_within
from flower_llm.streams import RandomStreams
from server_apps.fedavg import evaluates
from strategies import dp as dp_module
from strategies.dp import CLIENT_CLIP_TOLERANCE, CentralDP, DifferentialPrivacyFedAvg, PrivacyError
from strategies.fedavg import ValidReply, WeightedFedAvg
from strategies.rounds import MessageRounds, RoundResult, federate


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    """Messages are stamped with the run and node of the process that makes them."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


SHAPES = {"layer.lora_A.weight": (4, 16), "layer.lora_B.weight": (16, 4)}

State = dict[str, np.ndarray]


class InProcessGrid:
    """Just enough of a Flower ``Grid``: node ids, and replies computed by a function."""

    def __init__(self, num_nodes: int, train: Callable[[Message], Message] | None = None):
        self.nodes = list(range(1, num_nodes + 1))
        self.train = train
        self.train_messages: list[list[Message]] = []
        self.evaluated_rounds: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_messages.append(messages)
            assert self.train is not None
            return [self.train(m) for m in messages]
        if messages:  # evaluation: which rounds asked for it, no replies
            self.evaluated_rounds.append(int(messages[0].content[wire.CONFIG][wire.SERVER_ROUND]))  # type: ignore[index]
        return []


def random_state(rng: np.random.Generator, scale: float = 1.0) -> State:
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def reply_with(instruction: Message, state: State, num_examples: int = 10) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: to_record(state),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples, wire.TRAIN_LOSS: 1.0}),
        }
    )
    return Message(content, reply_to=instruction)


WRAPPER_SETTINGS = ("mode", "target_quantile", "clip_learning_rate", "clipped_count_stddev")


def dp_strategy(seed: int = 0, **kwargs: Any) -> DifferentialPrivacyFedAvg:
    """The wrapper with its CentralDP; train sampling and noise from ``seed``'s streams."""
    settings_: dict[str, Any] = dict(
        mode="server-fixed", noise_multiplier=1.0, clip_norm=1.0, sampling_rate=1.0, delta=1e-5
    )
    settings_.update(kwargs)
    wrapper = {k: settings_.pop(k) for k in WRAPPER_SETTINGS if k in settings_}
    streams = RandomStreams(seed)
    inner = WeightedFedAvg(min_train_clients=1, min_available_clients=1, train_rng=streams.train)
    central = CentralDP(**settings_, rng=streams.noise)
    return DifferentialPrivacyFedAvg(inner, central, **wrapper)


def one_round(
    strategy: DifferentialPrivacyFedAvg,
    grid: InProcessGrid,
    reference: State,
    client_state: Callable[[int, Message], State],
    server_round: int = 1,
) -> tuple[State, list[Message]]:
    """configure_train, answer every instruction, aggregate_train."""
    messages = list(
        strategy.configure_train(server_round, to_record(reference), ConfigRecord(), grid)
    )  # type: ignore[arg-type]
    replies = [reply_with(m, client_state(m.metadata.dst_node_id, m)) for m in messages]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return wire.from_array_record(arrays), messages


# --------------------------------------------------------------------------------------
# Reference: noise 0, huge C, q = 1 is FedAvg with uniform weights
# --------------------------------------------------------------------------------------


def test_noise_free_unclipped_dp_fedavg_equals_uniform_fedavg() -> None:
    # Prepare: three clients with very different example counts
    rng = np.random.default_rng(0)
    reference = random_state(rng)
    clients = {node: random_state(rng) for node in (1, 2, 3)}
    counts = {1: 5, 2: 50, 3: 500}
    strategy = dp_strategy(noise_multiplier=0.0, clip_norm=1e6, sampling_rate=1.0)
    grid = InProcessGrid(3)

    # Execute
    messages = list(strategy.configure_train(1, to_record(reference), ConfigRecord(), grid))  # type: ignore[arg-type]
    replies = [
        reply_with(m, clients[m.metadata.dst_node_id], counts[m.metadata.dst_node_id])
        for m in messages
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    uniform_replies = [reply_with(m, clients[m.metadata.dst_node_id], 1) for m in messages]
    flower_arrays, _ = FedAvg().aggregate_train(1, uniform_replies)

    # Assert: every client sampled; equal to Flower's FedAvg with equal weights, not the
    # example-weighted average
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert arrays is not None and flower_arrays is not None
    ours = wire.from_array_record(arrays)
    uniform = weighted_average([clients[n] for n in (1, 2, 3)], [1, 1, 1])
    weighted = weighted_average([clients[n] for n in (1, 2, 3)], [5, 50, 500])
    for key in SHAPES:
        np.testing.assert_allclose(ours[key], flower_arrays[key].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[key], uniform[key], rtol=1e-5, atol=1e-6)
        assert not np.allclose(ours[key], weighted[key], atol=1e-3)


# --------------------------------------------------------------------------------------
# Clipping and noise
# --------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    clip_norm=st.floats(0.01, 10.0),
    scales=st.lists(st.floats(0.0, 50.0), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_every_clipped_update_has_norm_at_most_clip_norm(
    clip_norm: float, scales: list[float], seed: int
) -> None:
    # Prepare: record what the strategy's clipping returns for each update
    rng = np.random.default_rng(seed)
    reference = random_state(rng)
    updates = {n + 1: random_state(rng, scale) for n, scale in enumerate(scales)}
    seen: list[tuple[float, float]] = []
    real_clip = dp_module.clip_update

    def spy(update: State, limit: float) -> tuple[State, float, bool]:
        clipped, scale, was_clipped = real_clip(update, limit)
        seen.append((global_l2_norm(update), global_l2_norm(clipped)))
        return clipped, scale, was_clipped

    strategy = dp_strategy(noise_multiplier=0.0, clip_norm=clip_norm)
    grid = InProcessGrid(len(scales))

    # Execute
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dp_module, "clip_update", spy)
        new, _ = one_round(
            strategy,
            grid,
            reference,
            lambda n, _: {k: reference[k] + updates[n][k] for k in SHAPES},
        )

    # Assert: each clipped update within C, unclipped ones untouched; so is their average
    assert len(seen) == len(scales)
    for before, after in seen:
        assert after <= clip_norm
        if before <= clip_norm:
            assert after == pytest.approx(before, rel=1e-12)
    mean_update = {k: new[k].astype(np.float64) - reference[k] for k in SHAPES}
    assert global_l2_norm(mean_update) <= clip_norm * (1 + 1e-5)


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive", "client-fixed"])
def test_noise_has_the_standard_deviation_of_dp_fedavg(mode: str) -> None:
    # Prepare: clients send the global adapter back, so the new one minus the old is noise
    shapes = {"a.lora_A.weight": (200, 100), "a.lora_B.weight": (100, 100)}
    reference = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    sigma, clip_norm, num_clients = 2.0, 0.5, 40
    strategy = dp_strategy(
        mode=mode, noise_multiplier=sigma, clip_norm=clip_norm, clipped_count_stddev=4.0
    )
    grid = InProcessGrid(num_clients)
    messages = list(strategy.configure_train(1, to_record(reference), ConfigRecord(), grid))  # type: ignore[arg-type]

    # Execute
    arrays, _ = strategy.aggregate_train(1, [reply_with(m, reference) for m in messages])

    # Assert: N(0, (sigma_u C / m)^2) per coordinate; adaptive pays for the count with
    # sigma_u = (sigma^-2 - (2 sigma_b)^-2)^-1/2 > sigma
    assert arrays is not None
    noise = np.concatenate([a.numpy().ravel() for a in arrays.values()]).astype(np.float64)
    sigma_u = (sigma**-2 - (2 * 4.0) ** -2) ** -0.5 if mode == "server-adaptive" else sigma
    expected = sigma_u * clip_norm / num_clients
    n = noise.size
    # The sample std has std ~ expected / sqrt(2n) (~0.4% here): 1.5% is > 3 of those.
    assert noise.std() == pytest.approx(expected, rel=0.015)
    assert abs(noise.mean()) < 5 * expected / np.sqrt(n)
    assert stats.kstest(noise / expected, "norm").pvalue > 1e-3
    assert strategy.last_round is not None
    assert strategy.last_round.noise_stddev == pytest.approx(expected)


def test_clients_weigh_the_same_whatever_their_example_counts() -> None:
    # Prepare
    rng = np.random.default_rng(4)
    reference = random_state(rng)
    clients = {n: random_state(rng, 0.01) for n in (1, 2)}

    def run(counts: dict[int, int]) -> State:
        strategy = dp_strategy(noise_multiplier=0.0, clip_norm=1e3)
        messages = list(
            strategy.configure_train(1, to_record(reference), ConfigRecord(), InProcessGrid(2))
        )  # type: ignore[arg-type]
        replies = [
            reply_with(m, clients[m.metadata.dst_node_id], counts[m.metadata.dst_node_id])
            for m in messages
        ]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return wire.from_array_record(arrays)

    # Execute / Assert
    a, b = run({1: 1, 2: 1000}), run({1: 1000, 2: 1})
    for key in SHAPES:
        np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------------------------
# Poisson sampling and the fixed denominator
# --------------------------------------------------------------------------------------


def test_clients_are_poisson_sampled_with_probability_q() -> None:
    # Prepare
    q, population, rounds = 0.3, 100, 60
    strategy = dp_strategy(sampling_rate=q, noise_multiplier=0.0)
    grid = InProcessGrid(population)
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    # Execute
    sizes, hits = [], np.zeros(population)
    for r in range(1, rounds + 1):
        messages = list(strategy.configure_train(r, to_record(reference), ConfigRecord(), grid))  # type: ignore[arg-type]
        strategy.aggregate_train(r, [])
        sizes.append(len(messages))
        for m in messages:
            hits[m.metadata.dst_node_id - 1] += 1

    # Assert: Binomial(N, q) cohort sizes (they vary), each node in ~q of the rounds,
    # and the denominator is the expected cohort q N, not the realised one
    assert np.mean(sizes) == pytest.approx(q * population, rel=0.05)
    assert np.std(sizes) == pytest.approx(np.sqrt(population * q * (1 - q)), rel=0.35)
    assert hits.mean() / rounds == pytest.approx(q, rel=0.05)
    assert strategy.expected_clients == 30


def test_update_is_divided_by_the_expected_cohort_not_the_realised_one() -> None:
    # Prepare: q = 0.5 of 4 clients -> m = 2; every sampled client sends +1 everywhere
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy = dp_strategy(sampling_rate=0.5, noise_multiplier=0.0, clip_norm=1e6)
    grid = InProcessGrid(4)

    # Execute
    new, messages = one_round(
        strategy,
        grid,
        reference,
        lambda n, _: {k: np.ones(s, np.float32) for k, s in SHAPES.items()},
    )

    # Assert: sum of k ones / m = k / 2, whatever k the sampling drew
    k = len(messages)
    for key in SHAPES:
        np.testing.assert_allclose(new[key], k / 2)


# --------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------


def dp_accounting_epsilon(
    sigma: float, q: float, rounds: int, delta: float, kind: str = "pld"
) -> float:
    accountant = (
        dp_accounting.pld.PLDAccountant() if kind == "pld" else dp_accounting.rdp.RdpAccountant()
    )
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive", "client-fixed"])
def test_accountant_steps_once_per_round_with_q_and_sigma(mode: str) -> None:
    # Prepare
    sigma, q, delta = 1.3, 0.4, 1e-5
    strategy = dp_strategy(
        mode=mode, noise_multiplier=sigma, sampling_rate=q, delta=delta, clipped_count_stddev=5.0
    )
    grid = InProcessGrid(50)
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    # Execute / Assert: epsilon after r rounds is dp-accounting's for r compositions of
    # the Poisson-sampled Gaussian with the CONFIGURED sigma (also in adaptive mode)
    epsilons = []
    for r in range(1, 5):
        one_round(strategy, grid, reference, lambda _n, _m: reference, server_round=r)
        assert strategy.accountant.rounds == r
        epsilons.append(strategy.epsilon())
        assert epsilons[-1] == pytest.approx(dp_accounting_epsilon(sigma, q, r, delta), rel=1e-9)
        assert strategy.last_round is not None
        assert strategy.last_round.epsilon == epsilons[-1]
        row = strategy.last_round.as_row()
        assert row["pld-epsilon"] == epsilons[-1]
        assert row["rdp-epsilon"] == pytest.approx(
            dp_accounting_epsilon(sigma, q, r, delta, "rdp"), rel=0.01
        )
        assert row["rdp-epsilon"] > row["pld-epsilon"]
    assert all(b > a for a, b in itertools.pairwise(epsilons))


def train_by_echo(update_scale: float = 0.01) -> Callable[[Message], Message]:
    """A client that returns the received adapter plus a small random update."""
    rng = np.random.default_rng(7)

    def train(msg: Message) -> Message:
        state = wire.from_array_record(msg.content[wire.ARRAYS])  # type: ignore[arg-type]
        return reply_with(
            msg,
            {
                k: v + update_scale * rng.standard_normal(v.shape).astype(np.float32)
                for k, v in state.items()
            },
        )

    return train


SIGMA, Q, DELTA = 1.0, 0.5, 1e-5
THREE_ROUND_BUDGET = (epsilon_after(3, SIGMA, Q, DELTA) + epsilon_after(4, SIGMA, Q, DELTA)) / 2
"""A target epsilon that holds exactly 3 rounds at SIGMA, Q, DELTA."""


def run_to_the_budget(
    evaluate_every: int | None = None,
) -> tuple[DifferentialPrivacyFedAvg, InProcessGrid, list[int]]:
    """A 10-round DP run on THREE_ROUND_BUDGET, stopped as the ServerApp stops it.

    ``evaluate_every`` decides evaluation as the ServerApp does (None: every round, the
    round loop's default). Returns the strategy, the grid and the rounds that finished.
    """
    strategy = dp_strategy(
        noise_multiplier=SIGMA, sampling_rate=Q, delta=DELTA, target_epsilon=THREE_ROUND_BUDGET
    )
    grid = InProcessGrid(20, train=train_by_echo())
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    finished: list[int] = []

    def on_round_end(result: RoundResult) -> bool:
        finished.append(result.server_round)
        return strategy.budget_exhausted()  # as the ServerApp does

    mode = MessageRounds(strategy, timeout=10)
    options: dict[str, Any] = {}
    if evaluate_every is not None:
        cfg = parse_run_config({"fed.num-rounds": 10, "fed.evaluate-every": evaluate_every})
        options["evaluate"] = lambda r: evaluates(cfg, mode, r)
    federate(
        mode,
        grid,  # type: ignore[arg-type]
        to_record(reference),
        first_round=1,
        num_rounds=10,
        train_config=lambda r: ConfigRecord({wire.SERVER_ROUND: r}),
        on_round_end=on_round_end,
        **options,
    )
    return strategy, grid, finished


def test_run_stops_before_the_target_epsilon_is_exceeded() -> None:
    assert max_rounds_within(THREE_ROUND_BUDGET, SIGMA, Q, DELTA) == 3

    strategy, grid, finished = run_to_the_budget()

    # Assert: three rounds ran, epsilon within the budget, a fourth would exceed it and
    # the strategy itself refuses to start one
    assert finished == [1, 2, 3]
    assert grid.evaluated_rounds == [1, 2, 3]  # every round by default
    assert strategy.epsilon() <= THREE_ROUND_BUDGET < strategy.accountant.projected_epsilon(1)
    reference = to_record({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    with pytest.raises(PrivacyError, match="target-epsilon"):
        strategy.configure_train(4, reference, ConfigRecord(), grid)  # type: ignore[arg-type]


def test_a_budget_below_one_round_is_refused_at_start() -> None:
    with pytest.raises(PrivacyError, match="single round"):
        dp_strategy(noise_multiplier=0.5, target_epsilon=0.1)


# --------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------


def test_client_fixed_sends_the_clip_norm_and_accepts_client_clipped_updates() -> None:
    # Prepare: a realistically sized adapter (1M weights ~ N(0, 0.05)) and a small C: the
    # float32 rounding of global + clipped update must stay inside the tolerance
    rng = np.random.default_rng(5)
    shapes = {"a.lora_A.weight": (1000, 500), "a.lora_B.weight": (500, 1000)}
    reference = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    clip_norm = 0.01
    strategy = dp_strategy(mode="client-fixed", noise_multiplier=0.0, clip_norm=clip_norm)

    def client(_node: int, msg: Message) -> State:
        config = msg.content[wire.CONFIG]
        trained = {
            k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in reference.items()
        }
        return clip_adapter_update(trained, reference, float(config[wire.CLIP_NORM]))  # type: ignore[arg-type]

    # Execute
    new, messages = one_round(strategy, InProcessGrid(3), reference, client)

    # Assert
    assert all(m.content[wire.CONFIG][wire.CLIP_NORM] == clip_norm for m in messages)  # type: ignore[index]
    assert strategy.report.accepted == [1, 2, 3] and not strategy.report.dropped
    mean_update = {k: new[k].astype(np.float64) - reference[k] for k in shapes}
    assert global_l2_norm(mean_update) <= clip_norm * (1 + CLIENT_CLIP_TOLERANCE)


def test_client_fixed_without_client_clipping_is_refused() -> None:
    # Prepare: a ClientApp without clipping (Flower's silent no-mod case) sends raw updates
    rng = np.random.default_rng(6)
    reference = random_state(rng)
    strategy = dp_strategy(mode="client-fixed", clip_norm=0.1)

    # Execute / Assert
    with pytest.raises(PrivacyError, match="client clipping is not active"):
        one_round(strategy, InProcessGrid(3), reference, lambda _n, _m: random_state(rng))


def test_client_fixed_drops_the_one_client_that_does_not_clip() -> None:
    # Prepare
    rng = np.random.default_rng(8)
    reference = random_state(rng)
    strategy = dp_strategy(mode="client-fixed", clip_norm=0.1, noise_multiplier=0.0)

    def client(node: int, _msg: Message) -> State:
        trained = {k: v + random_state(rng)[k] for k, v in reference.items()}
        return trained if node == 2 else clip_adapter_update(trained, reference, 0.1)

    # Execute
    one_round(strategy, InProcessGrid(3), reference, client)

    # Assert
    assert strategy.report.accepted == [1, 3]
    assert "client clipping is not active" in strategy.report.dropped[2]


def test_too_few_expected_clients_are_refused_at_start() -> None:
    strategy = dp_strategy(sampling_rate=0.5, min_sampled_clients=10)
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(PrivacyError, match=r"privacy\.min-sampled-clients = 10"):
        strategy.configure_train(1, to_record(reference), ConfigRecord(), InProcessGrid(8))  # type: ignore[arg-type]


def test_adaptive_noise_too_large_for_the_count_noise_is_refused() -> None:
    strategy = dp_strategy(mode="server-adaptive", noise_multiplier=2.0)  # sigma_b = m/20
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(PrivacyError, match=r"privacy\.clipped-count-stddev"):
        strategy.configure_train(1, to_record(reference), ConfigRecord(), InProcessGrid(10))  # type: ignore[arg-type]


def test_zero_noise_is_a_loud_warning_recorded_in_the_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        strategy = dp_strategy(noise_multiplier=0.0)
    assert "NO differential privacy" in caplog.text
    assert any("NO differential privacy" in w for w in strategy.privacy_summary()["warnings"])
    assert strategy.privacy_summary()["epsilon"] == 0.0  # before any round
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    one_round(strategy, InProcessGrid(2), reference, lambda _n, _m: reference)
    assert strategy.epsilon() == float("inf")


def small_cohort_dp(**kwargs: Any) -> CentralDP:
    """The central-DP component as SecAgg+ uses it: cohorts under 3 release noise alone."""
    central = CentralDP(
        noise_multiplier=1.0,
        clip_norm=0.1,
        sampling_rate=0.5,
        delta=1e-5,
        rng=np.random.default_rng(0),
        **kwargs,
    )
    central.rng_for_sampling = np.random.default_rng(1)
    central.release_only_cohorts_of(3)
    return central


def test_a_plan_whose_small_cohorts_exceed_delta_is_refused_by_default() -> None:
    # Prepare: 6 sites at q = 0.5: a site decides whether a round sums with chance 0.3125
    central = small_cohort_dp(planned_rounds=3)

    # Execute / Assert: refused before anything is sampled or released
    with pytest.raises(PrivacyError, match=r"privacy\.small-cohorts") as info:
        central.start_round(1, list(range(6)))
    assert "0.312" in str(info.value) and "0.938" in str(info.value)
    assert central.accountant.rounds == 0 and central.small_cohort_delta == 0.0


def test_accounted_small_cohorts_add_their_chance_to_delta_every_released_round() -> None:
    # Prepare
    central = small_cohort_dp(planned_rounds=3, small_cohorts="account")
    zeros = {"a": np.zeros(4, np.float32)}
    chance = math.comb(5, 2) * 0.5**5

    # Execute: three rounds released, as SecAgg+ releases them (a small cohort included)
    rows = []
    for server_round in (1, 2, 3):
        central.start_round(server_round, list(range(6)))
        central.release(zeros, zeros)
        assert central.last_round is not None
        rows.append(central.last_round.as_row())

    # Assert: delta-total grows by the chance per round; epsilon stays the accountant's
    assert [r["dp-delta-total"] for r in rows] == pytest.approx(
        [1e-5 + chance * r for r in (1, 2, 3)], rel=1e-12
    )
    assert all(r["delta"] == 1e-5 for r in rows)
    summary = central.summary()
    assert summary["delta-total"] == pytest.approx(1e-5 + 3 * chance)
    assert any("dp-delta-total" in w for w in summary["warnings"])
    # ... and a resumed component continues the same term (state in the checkpoint)
    again = small_cohort_dp(planned_rounds=3, small_cohorts="account")
    again.load_state_dict(json.loads(json.dumps(central.state_dict())))
    assert again.delta_total == central.delta_total


def test_without_a_minimum_cohort_delta_total_is_delta() -> None:
    # Prepare: DP-FedAvg releases every cohort's sum, even an empty one
    strategy = dp_strategy(sampling_rate=0.5)
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    # Execute
    one_round(strategy, InProcessGrid(6), reference, lambda _n, _m: reference)

    # Assert
    assert strategy.last_round is not None
    assert strategy.last_round.as_row()["dp-delta-total"] == strategy.last_round.delta


# --------------------------------------------------------------------------------------
# Adaptive clipping
# --------------------------------------------------------------------------------------


def test_adaptive_clip_norm_moves_towards_the_target_quantile() -> None:
    # Prepare: 40 clients whose updates all have norm ~1; C starts at 0.05
    rng = np.random.default_rng(9)
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy = dp_strategy(
        mode="server-adaptive", noise_multiplier=0.0, clip_norm=0.05, target_quantile=0.5
    )
    grid = InProcessGrid(40)

    def client(_n: int, _m: Message) -> State:
        update = random_state(rng)
        norm = global_l2_norm(update)
        return {k: (v / norm).astype(np.float32) for k, v in update.items()}

    # Execute
    norms = []
    for r in range(1, 31):
        one_round(strategy, grid, reference, client, server_round=r)
        norms.append(strategy.clip_norm)

    # Assert: grows geometrically (by exp(0.2 * 0.5) a round while everything is clipped),
    # then settles near the median update norm of 1
    assert norms[0] == pytest.approx(0.05 * np.exp(0.1), rel=0.05)
    assert 0.7 < norms[-1] < 1.4


# --------------------------------------------------------------------------------------
# Checkpoint: the accountant, the clip norm and the noise continue exactly
# --------------------------------------------------------------------------------------


def test_state_dict_resumes_the_same_epsilon_and_noise() -> None:
    # Prepare: two rounds, then a JSON round trip of the state into a fresh strategy
    rng = np.random.default_rng(10)
    reference = random_state(rng)
    settings_: dict[str, Any] = dict(
        mode="server-adaptive", noise_multiplier=0.8, sampling_rate=0.5, clipped_count_stddev=2.0
    )
    original = dp_strategy(seed=11, **settings_)
    grid = InProcessGrid(20)
    updates = {n: random_state(rng, 0.05) for n in grid.nodes}

    def client(n: int, _m: Message) -> State:
        return {k: reference[k] + updates[n][k] for k in SHAPES}

    for r in (1, 2):
        one_round(original, grid, reference, client, server_round=r)
    saved = json.loads(json.dumps(original.state_dict()))
    resumed = dp_strategy(seed=999, **settings_)  # a different seed: the state must win

    # Execute: the server checkpoints the sampling stream next to the strategy's state
    resumed.load_state_dict(saved)
    resumed.strategy.train_rng.bit_generator.state = original.strategy.train_rng.bit_generator.state
    a, sampled_a = one_round(original, grid, reference, client, server_round=3)
    b, sampled_b = one_round(resumed, grid, reference, client, server_round=3)

    # Assert
    assert resumed.accountant.rounds == 3
    assert resumed.epsilon() == pytest.approx(original.epsilon(), rel=1e-12)
    assert resumed.epsilon() == pytest.approx(epsilon_after(3, 0.8, 0.5, 1e-5), rel=1e-9)
    assert [m.metadata.dst_node_id for m in sampled_a] == [
        m.metadata.dst_node_id for m in sampled_b
    ]
    assert resumed.clip_norm == original.clip_norm
    for key in SHAPES:
        np.testing.assert_array_equal(a[key], b[key])


def test_state_from_other_dp_settings_is_refused() -> None:
    saved = dp_strategy(noise_multiplier=1.0).state_dict()
    with pytest.raises(ValueError, match=r"privacy\.noise-multiplier"):
        dp_strategy(noise_multiplier=2.0).load_state_dict(saved)


# --------------------------------------------------------------------------------------
# Metrics and configuration
# --------------------------------------------------------------------------------------


def test_epsilon_metrics_aggregate_as_the_maximum_not_the_mean() -> None:
    # Prepare
    def valid(node: int, weight: float, epsilon: float) -> ValidReply:
        metrics = MetricRecord(
            {wire.NUM_EXAMPLES: int(weight), wire.DPSGD_EPSILON: epsilon, wire.TRAIN_LOSS: 1.0}
        )
        return ValidReply(node, {}, weight, metrics, RecordDict())

    # Execute
    out = WeightedFedAvg().aggregate_train_metrics(
        [valid(1, 100, 1.0), valid(2, 1, 7.5), valid(3, 50, 2.0)]
    )

    # Assert
    assert out[wire.DPSGD_EPSILON] == 7.5
    assert out[wire.TRAIN_LOSS] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"privacy.mode": "on"}, "privacy.mode"),
        ({"privacy.noise-multiplier": -1.0}, "privacy.noise-multiplier"),
        ({"privacy.clip-norm": 0.0}, "privacy.clip-norm"),
        ({"privacy.delta": 1.0}, "privacy.delta"),
        ({"privacy.target-quantile": 1.5}, "privacy.target-quantile"),
        ({"privacy.min-sampled-clients": 0}, "privacy.min-sampled-clients"),
        ({"privacy.dpsgd-max-grad-norm": 0.0}, "privacy.dpsgd-max-grad-norm"),
        (
            {"privacy.mode": "server-fixed", "output.local-only-baseline": True},
            "output.local-only-baseline",
        ),
        ({"privacy.dpsgd": True, "output.local-only-baseline": True}, "output.local-only-baseline"),
        ({"privacy.mode": "server-fixed", "fed.aggregation": "secagg+"}, "fed.aggregation"),
        ({"privacy.mode": "client-fixed", "fed.wire-dtype": "float16"}, "fed.wire-dtype"),
        ({"privacy.dpsgd": True, "train.grad-accum": 2}, "train.grad-accum"),
    ],
)
def test_bad_privacy_settings_name_the_key(run_config: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=f"'{named}'"):
        parse_run_config(run_config)  # type: ignore[arg-type]


def test_server_builds_the_dp_wrapper_only_when_asked() -> None:
    from server_apps.fedavg import build_strategy

    plain = build_strategy(parse_run_config({}))
    wrapped = build_strategy(
        parse_run_config({"privacy.mode": "server-adaptive", "fed.fraction-train": 0.5})
    )
    assert isinstance(plain, WeightedFedAvg)
    assert isinstance(wrapped, DifferentialPrivacyFedAvg)
    assert wrapped.mode == "server-adaptive" and wrapped.sampling_rate == 0.5


def test_summary_reports_the_worst_site_dpsgd_epsilon_and_warns_on_zero_noise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    cfg = parse_run_config({"privacy.dpsgd": True, "privacy.dpsgd-noise-multiplier": 0.0})
    history = [{"round": 1, "train/dpsgd-epsilon": 2.5}, {"round": 2, "train/dpsgd-epsilon": 4.0}]

    # Execute
    with caplog.at_level(logging.WARNING):
        warnings = dp_module.dpsgd_warnings(cfg)
    summary = dp_module.privacy_summary(None, [], cfg, history, warnings)

    # Assert
    assert "NO sample-level privacy" in caplog.text
    assert summary["sample-level"]["epsilon-max-over-sites"] == 4.0
    assert summary["warnings"] == warnings and "client-level" not in summary


def test_a_run_resumed_from_its_checkpoint_continues_the_same_epsilon_and_noise(
    tmp_path: Any,
) -> None:
    checkpoint = pytest.importorskip("flower_llm.checkpoint")

    # Prepare: two real rounds, then the ServerApp's checkpoint of round 2
    cfg = parse_run_config(
        {
            "privacy.mode": "server-fixed",
            "privacy.noise-multiplier": 0.9,
            "fed.fraction-train": 0.5,
            "output.local-only-baseline": False,
        }
    )
    rng = np.random.default_rng(12)
    reference = random_state(rng)
    grid = InProcessGrid(12)
    updates = {n: random_state(rng, 0.05) for n in grid.nodes}

    def client(n: int, _m: Message) -> State:
        return {k: reference[k] + updates[n][k] for k in SHAPES}

    def strategy() -> tuple[MessageRounds, RandomStreams]:
        # As the ServerApp: secret streams (OS entropy) for train sampling and noise
        streams = RandomStreams(cfg.seed, secret=True)
        inner = WeightedFedAvg(
            min_train_clients=1, min_available_clients=1, train_rng=streams.train
        )
        wrapper = DifferentialPrivacyFedAvg.from_config(inner, cfg, streams.noise)
        return MessageRounds(wrapper, timeout=10), streams

    (original_mode, original_streams) = strategy()
    original = original_mode.strategy
    assert isinstance(original, DifferentialPrivacyFedAvg)
    for r in (1, 2):
        one_round(original, grid, reference, client, server_round=r)
    checkpoint.write_round_checkpoint(
        tmp_path, cfg, 2, to_record(reference), original_mode, [], streams=original_streams
    )

    # Execute: a restarted server builds a fresh strategy and resumes into it
    resumed_mode, resumed_streams = strategy()
    checkpoint.resume_from_checkpoint(tmp_path, cfg, resumed_mode, resumed_streams)
    resumed = resumed_mode.strategy
    assert isinstance(resumed, DifferentialPrivacyFedAvg)
    a, _ = one_round(original, grid, reference, client, server_round=3)
    b, _ = one_round(resumed, grid, reference, client, server_round=3)

    # Assert
    assert resumed.accountant.rounds == 3
    assert (
        resumed.epsilon()
        == original.epsilon()
        == pytest.approx(epsilon_after(3, 0.9, 0.5, 1e-5), rel=1e-9)
    )
    for key in SHAPES:
        np.testing.assert_array_equal(a[key], b[key])


def test_a_run_evaluating_every_second_round_still_evaluates_the_round_it_stops_after() -> None:
    _, grid, finished = run_to_the_budget(evaluate_every=2)

    # Assert: round 2 as configured, and round 3, the last the budget allows
    assert finished == [1, 2, 3]
    assert grid.evaluated_rounds == [2, 3]
