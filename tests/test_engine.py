"""The one round engine: sampling as accounted, random streams, resume, one writer.

In-process, with real Flower messages and the ServerApp's own ``run`` on a grid whose
sites answer from a function (stable node ids, as in a deployment).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from flower_llm import updates, wire
from flower_llm.config import parse_run_config
from flower_llm.outputs import RunDirectory, RunDirectoryBusy
from flower_llm.streams import RandomStreams
from server_apps.fedavg import build_mode, build_strategy, run
from strategies.dp import CentralDP, DifferentialPrivacyFedAvg, PrivacyError
from strategies.sampling import FixedSizeSampler, NotEnoughNodes, PoissonSampler, wait_for_nodes
from strategies.secagg import SecAggRounds
from tests.rebuild import rebuilt_initial

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def context(run_config: dict[str, Any] | None = None) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config or {}
    )


# --------------------------------------------------------------------------------------
# The sampling performed is the sampling accounted
# --------------------------------------------------------------------------------------

DP_RUNS = [
    {"privacy.mode": "server-fixed"},
    {"privacy.mode": "server-adaptive"},
    {"privacy.mode": "client-fixed"},
    {"privacy.mode": "client-fixed", "fed.aggregation": "secagg+"},
]


def cohort_sizes(sampler: Any, rng: np.random.Generator, nodes: int, draws: int) -> np.ndarray:
    return np.array([len(sampler.sample(range(nodes), rng)) for _ in range(draws)])


@pytest.mark.parametrize("settings", DP_RUNS, ids=lambda s: "+".join(s.values()))
def test_every_dp_mode_draws_its_cohorts_by_the_event_its_accountant_composes(
    settings: dict[str, Any],
) -> None:
    # Prepare
    cfg = parse_run_config(
        {"fed.fraction-train": 0.3, "output.local-only-baseline": False, **settings}
    )
    streams = RandomStreams(cfg.seed, secret=True)
    mode = build_mode(cfg, context(), ["a"], streams)
    central = mode.central
    assert central is not None
    sampler = mode.sampler if isinstance(mode, SecAggRounds) else central.sampler

    # Execute: the cohorts this mode's sampler draws from 20 nodes, 4000 times
    sizes = cohort_sizes(sampler, np.random.default_rng(0), 20, 4000)

    # Assert: the accountant composes Poisson(q) and the sampler IS Poisson(q): mean q N,
    # variance q (1 - q) N (fixed-size sampling would have variance 0)
    assert sampler is central.sampler
    assert (central.accountant.sampling_rate, sampler.rate) == (0.3, 0.3)
    assert sizes.mean() == pytest.approx(0.3 * 20, rel=0.03)
    assert sizes.var() == pytest.approx(0.3 * 0.7 * 20, rel=0.1)


def test_central_dp_refuses_a_sampler_it_does_not_account() -> None:
    central = CentralDP(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.5, delta=1e-5)
    with pytest.raises(PrivacyError, match="not Poisson sampling"):
        central.check_sampler(FixedSizeSampler(0.5, 1))
    with pytest.raises(PrivacyError, match=r"q = 0\.5"):
        central.check_sampler(PoissonSampler(0.25))
    central.check_sampler(PoissonSampler(0.5))


def test_fixed_size_sampling_without_dp_draws_exactly_the_fraction() -> None:
    sizes = cohort_sizes(FixedSizeSampler(0.5, 2), np.random.default_rng(0), 9, 200)
    assert set(sizes) == {4}


class NoNodes:
    def get_node_ids(self) -> list[int]:
        return [1]


def test_waiting_for_sites_ends_at_the_timeout_with_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(NotEnoughNodes, match=r"1 sites connected .* fewer than the 3"):
        wait_for_nodes(NoNodes(), 3, timeout=0.3)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0


# --------------------------------------------------------------------------------------
# Resume: same cohorts, same adapter, whatever evaluation does
# --------------------------------------------------------------------------------------


class SitesGrid:
    """Six sites with stable node ids; train replies ``global + delta(node, round)``."""

    def __init__(self) -> None:
        self.nodes = [11, 22, 33, 44, 55, 66]
        self.cohorts: dict[int, list[int]] = {}
        self.evaluated: dict[int, list[int]] = {}
        self.initial = rebuilt_initial()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            # A site answers in the wire layout it received (fed.wire-layout).
            instruction, packed = wire.unpack(msg.content)
            config = instruction.config_records.get(wire.CONFIG)
            server_round = int(config[wire.SERVER_ROUND]) if config else 0  # type: ignore[arg-type]
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "train":
                self.cohorts.setdefault(server_round, []).append(node)
                # The arrays, or the run's initial adapter rebuilt here (an `initial`
                # instruction, round 1).
                state, _ = updates.receive(RecordDict(), instruction, None, self.initial)
                rng = np.random.default_rng([node, server_round])
                local = {
                    k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in state.items()
                }
                metrics = {wire.NUM_EXAMPLES: node, wire.NUM_TOKENS: 10, wire.TRAIN_LOSS: 1.0}
                content = RecordDict(
                    {wire.ARRAYS: wire.to_array_record(local), wire.METRICS: MetricRecord(metrics)}
                )
            else:
                self.evaluated.setdefault(server_round, []).append(node)
                metrics = {
                    wire.NUM_EXAMPLES: 2,
                    wire.EVAL_LOSS: 1.0,
                    wire.EVAL_PERPLEXITY: 2.7,
                    wire.EVAL_TOKEN_ACCURACY: 0.5,
                    wire.EVAL_TOKENS: 10,
                }
                content = RecordDict({wire.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
            replies.append(Message(wire.pack(content) if packed else content, reply_to=msg))
        return replies


def load_final(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


JOB = {
    "fed.fraction-train": 0.5,
    "fed.min-available-clients": 6,
    "train.lr-schedule": "constant",  # so that fed.num-rounds may grow on resume
    "output.local-only-baseline": False,
}


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 3-round run, and one stopped after round 1 and resumed with
    other evaluation settings (fraction-evaluate 0.5, evaluate-every 2)."""
    out = tmp_path_factory.mktemp("engine-runs")
    job = {**JOB, "output.dir": str(out)}
    full = SitesGrid()
    run(full, context(), parse_run_config({**job, "fed.num-rounds": 3, "output.run-name": "full"}))  # type: ignore[arg-type]
    resumed = SitesGrid()
    first = {**job, "output.run-name": "resumed", "fed.num-rounds": 1}
    run(resumed, context(), parse_run_config(first))  # type: ignore[arg-type]
    again = {
        **first,
        "fed.num-rounds": 3,
        "output.resume": True,
        "fed.fraction-evaluate": 0.5,
        "fed.evaluate-every": 2,
    }
    run(resumed, context(), parse_run_config(again))  # type: ignore[arg-type]
    return {"out": out, "full": full, "resumed": resumed}


def test_a_resume_with_other_evaluation_settings_trains_the_same_cohorts(
    resumed_runs: dict[str, Any],
) -> None:
    full, resumed = resumed_runs["full"], resumed_runs["resumed"]
    # Assert: half the sites train each round, the same ones in both runs ...
    assert all(len(c) == 3 for c in full.cohorts.values())
    assert len({tuple(c) for c in full.cohorts.values()}) > 1  # cohorts do change
    assert resumed.cohorts == full.cohorts
    # ... although evaluation differed after the resume
    assert [len(full.evaluated[r]) for r in (0, 1, 2, 3)] == [6, 6, 6, 6]
    # (round 0, the untrained adapter, is evaluated once, by the run that starts)
    assert sorted(resumed.evaluated) == [0, 1, 2, 3] and len(resumed.evaluated[2]) == 3


def test_a_resumed_run_ends_with_the_uninterrupted_adapter(resumed_runs: dict[str, Any]) -> None:
    out: Path = resumed_runs["out"]
    a, b = load_final(out / "full"), load_final(out / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    summary = json.loads((out / "resumed" / "summary.json").read_text())
    assert summary["resumed-after-round"] == 1 and summary["rounds"] == 3
    assert summary["aggregation"] == "fedavg" and summary["rounds-failed"] == 0


# --------------------------------------------------------------------------------------
# One run directory, one writer
# --------------------------------------------------------------------------------------

HOLD_THE_LOCK = """
import sys, time
from flower_llm.config import parse_run_config
from flower_llm.outputs import RunDirectory
run_dir = RunDirectory(sys.argv[1], "busy", lock=True)
run_dir.save_config(parse_run_config({}))  # the first write claims the directory
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_server_on_a_running_run_directory_is_refused(tmp_path: Path) -> None:
    # Prepare: another process writes run "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        (tmp_path / "busy" / "metrics.jsonl").write_text("{}\n")

        # Execute / Assert: a fresh run and a resume are both refused, naming the holder
        for resume in (False, True):
            with pytest.raises(RunDirectoryBusy, match=f"another ServerApp \\(pid {holder.pid}\\)"):
                RunDirectory(tmp_path, "busy", resume=resume, lock=True)
        # ... and the running run's directory was neither renamed nor touched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
        assert (tmp_path / "busy" / "metrics.jsonl").read_text() == "{}\n"
        assert (tmp_path / "busy" / ".lock").read_text() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()

    # Once it is gone, the lock is free again (a crashed server leaves none behind)
    run_dir = RunDirectory(tmp_path, "busy", resume=True, lock=True)
    run_dir.unlock()


def test_the_server_builds_one_dp_component_per_run() -> None:
    cfg = parse_run_config({"privacy.mode": "server-fixed", "output.local-only-baseline": False})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, DifferentialPrivacyFedAvg)
    assert strategy.central.sampler.rate == cfg.fed.fraction_train


def test_the_untrained_adapter_is_evaluated_once_and_summarised(
    resumed_runs: dict[str, Any],
) -> None:
    from flower_llm.report import format_outcome

    out: Path = resumed_runs["out"]
    for name in ("full", "resumed"):
        summary = json.loads((out / name / "summary.json").read_text())
        # Round 0 of the resumed run was evaluated by its first part, kept across the resume
        assert summary["initial-eval-loss"] == 1.0
        assert "held-out loss before training (round 0): 1.0000" in format_outcome(
            out / name, summary
        )
