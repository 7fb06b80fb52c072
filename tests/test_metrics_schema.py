"""The metrics row has one definition: what is read or documented is written, and declared.

The rows are built by the ServerApp's own writer (``server_apps.fedavg.round_row``) from
what each mode's round produces: the strategies' aggregation of real replies, the central
DP component's round, the SecAgg+ columns.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flower_llm import metrics as schema
from flower_llm import report, secagg, wire
from flower_llm.config import parse_run_config
from server_apps.fedavg import round_row
from strategies.dp import CentralDP
from strategies.fedavg import RoundReport, WeightedFedAvg, aggregate_eval_replies
from strategies.rounds import RoundResult
from strategies.secagg import SecAggRoundReport, secagg_columns

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHAPES = {"a": (2, 3)}


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def reply(instruction: Message, metrics: dict[str, float]) -> Message:
    """A site's reply; it names itself, as this project's ClientApp does when asked."""
    arrays = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    label = f"partition {instruction.metadata.dst_node_id - 1}/2"
    content[wire.SITE] = ConfigRecord({"label": label})
    return Message(content, reply_to=instruction)


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def fedavg_row() -> dict[str, object]:
    """A DP-SGD FedAvg round, trained and evaluated, as the ServerApp writes it."""
    strategy = WeightedFedAvg(min_train_clients=1, min_available_clients=1)
    arrays = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    train = {
        wire.NUM_EXAMPLES: 4,
        wire.NUM_TOKENS: 40,
        wire.NUM_EXAMPLES_SEEN: 8,
        wire.NUM_TOKENS_SEEN: 80,
        wire.TRAIN_LOSS: 1.5,
        wire.TRAIN_SECONDS: 2.0,
        wire.DPSGD_EPSILON: 0.7,
        wire.DPSGD_PLD_EPSILON: 0.7,
        wire.DPSGD_RDP_EPSILON: 0.8,
    }
    _, train_metrics = strategy.aggregate_train(1, [reply(m, train) for m in messages])
    evaluation = {
        wire.NUM_EXAMPLES: 2,
        wire.EVAL_LOSS: 1.2,
        wire.EVAL_PERPLEXITY: 3.3,
        wire.EVAL_TOKEN_ACCURACY: 0.4,
        wire.EVAL_TOKENS: 20,
    }
    eval_metrics = aggregate_eval_replies([reply(m, evaluation) for m in messages])
    result = RoundResult(1, arrays, train_metrics, eval_metrics, strategy.report, 1.0)
    return round_row(result)


def secagg_dp_row() -> dict[str, object]:
    """A SecAgg+ round with server-adaptive-style DP columns (every DP column)."""
    central = CentralDP(
        noise_multiplier=1.0,
        clip_norm=1.0,
        sampling_rate=1.0,
        delta=1e-5,
        rng=np.random.default_rng(0),
    )
    central.fix_population(4)
    state = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    central.release(state, state, noisy_unclipped_fraction=0.5)
    assert central.last_round is not None
    cfg = parse_run_config({"fed.aggregation": "secagg+", "fed.max-weight": 1000.0})
    params = secagg.derive_params(cfg, num_sampled=4)
    counts = secagg.SecureCounts(clamped=1, weight_total=2.5)  # what the unmasked sum says
    report = SecAggRoundReport(active=[1, 2, 3, 4])
    columns = {**secagg_columns(report, params, counts), **central.last_round.as_row()}
    metrics = MetricRecord({"clients-in-sum": 4})
    result = RoundResult(1, ArrayRecord(), metrics, None, RoundReport(), 1.0, columns)
    return round_row(result, "secagg+")


def bounded_row() -> dict[str, object]:
    """A round whose report refused, clamped and re-factored (lora.aggregation = exact)."""
    report = RoundReport(
        refused=["node 9: not sampled this round"], clamped={1: ["m.lora_A.weight"]}
    )
    report.lora_error = 0.01
    report.bytes_down_eval = 4096  # the adapters sent for evaluation
    return round_row(RoundResult(1, ArrayRecord(), None, None, report, 1.0))


def written() -> set[str]:
    return set(fedavg_row()) | set(secagg_dp_row()) | set(bounded_row())


def test_a_metric_a_site_chose_to_send_is_kept_not_refused() -> None:
    # Prepare: a client written outside the project reports its own metric
    metrics = MetricRecord({"train_loss": 0.5})

    # Execute
    row = round_row(RoundResult(1, ArrayRecord(), metrics, None, RoundReport(), 1.0))

    # Assert
    assert row["train_loss"] == 0.5


def test_an_undeclared_server_column_is_refused() -> None:
    result = RoundResult(1, ArrayRecord(), None, None, RoundReport(), 1.0, {"epsilom": 1.0})
    with pytest.raises(ValueError, match="epsilom"):
        round_row(result)


def test_every_declared_column_is_written_by_the_writer() -> None:
    assert sorted(set(schema.BY_NAME) - written()) == []


def test_the_writer_refuses_an_undeclared_column() -> None:
    result = RoundResult(1, ArrayRecord(), None, None, RoundReport(), 1.0, {"dp-epsilon": 1.0})
    with pytest.raises(ValueError, match="dp-epsilon"):
        round_row(result)


def test_every_column_the_report_reads_is_declared_and_written() -> None:
    assert sorted(report.READ_COLUMNS - set(schema.BY_NAME)) == []
    assert sorted(report.READ_COLUMNS - written()) == []


# Backticked names in the docs that can only be metrics.jsonl columns.
COLUMN_LIKE = re.compile(
    r"`((?:train|eval)[/-][a-z0-9/-]+|dp-[a-z-]+|secagg-[a-z-]+|epsilon|clients-[a-z-]+|bytes-(?:up|down))`"
)


def test_every_column_the_docs_name_is_written() -> None:
    named = {(path.name, match) for path in DOCS for match in COLUMN_LIKE.findall(path.read_text())}
    # TensorBoard tags (docs/cli.md) are the report's names for columns
    tags = {c.tensorboard for c in schema.COLUMNS if c.tensorboard is not None}
    missing = sorted(
        (doc, name) for doc, name in named if name not in schema.BY_NAME and name not in tags
    )
    assert missing == []
    assert len(named) > 5  # the docs do name columns


def test_the_docs_table_is_the_schema() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    start, end = "<!-- metrics-schema:start -->", "<!-- metrics-schema:end -->"
    assert start in text and end in text
    table = text.split(start)[1].split(end)[0].strip()
    assert table == schema.markdown_table()
