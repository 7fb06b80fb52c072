"""The metrics row: every column of metrics.jsonl, once, with its unit and meaning.

The server writes one row per finished round (``server_apps.fedavg``); ``flower-llm
report``, its plot and its TensorBoard export read them (:mod:`flower_llm.report`); the
docs' metrics table is :func:`markdown_table`. All three use the constants here, and
``tests/test_metrics_schema.py`` fails when a column is read or documented but never
written, or written but not declared.

Train and evaluation metrics come from the sites' replies: a reply key that already starts
with ``train``/``eval`` keeps its name (``train-loss``), any other gets the prefix and a
slash (``num-examples`` -> ``train/num-examples``), see :func:`prefixed`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flower_llm import tasks, wire


@dataclass(frozen=True)
class Column:
    """One metrics.jsonl column."""

    name: str
    unit: str
    meaning: str
    when: str = "every round"
    """Which rounds or runs write it."""
    tensorboard: str | None = None
    """The TensorBoard tag the report exports it under (None: ``<name>`` itself)."""


def prefixed(prefix: str, key: str) -> str:
    """The column of a reply metric ``key`` under ``train`` or ``eval``."""
    return key if key.startswith(prefix) else f"{prefix}/{key}"


# Round bookkeeping
ROUND = "round"
SECONDS = "seconds"
AGGREGATION = "aggregation"
CLIENTS_SAMPLED = "clients-sampled"
CLIENTS_REPLIED = "clients-replied"
CLIENTS_DROPPED = "clients-dropped"
DROPPED = "dropped"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
UPDATED = "updated"
REFUSED = "refused"
CLAMPED = "clamped"
LORA_TRUNCATION_ERROR = "lora-truncation-error"
BYTES_BY_SITE = "bytes-by-site"
BYTES_DOWN_EVAL = "bytes-down-eval"
SITE_LABELS = "site-labels"
# Training, pooled over the sites' replies
TRAIN_LOSS = prefixed("train", wire.TRAIN_LOSS)
TRAIN_SECONDS = prefixed("train", wire.TRAIN_SECONDS)
TRAIN_EXAMPLES = prefixed("train", wire.NUM_EXAMPLES)
TRAIN_TOKENS = prefixed("train", wire.NUM_TOKENS)
TRAIN_EXAMPLES_SEEN = prefixed("train", wire.NUM_EXAMPLES_SEEN)
TRAIN_TOKENS_SEEN = prefixed("train", wire.NUM_TOKENS_SEEN)
DPSGD_EPSILON_COLUMN = prefixed("train", wire.DPSGD_EPSILON)
DPSGD_PLD_EPSILON_COLUMN = prefixed("train", wire.DPSGD_PLD_EPSILON)
DPSGD_RDP_EPSILON_COLUMN = prefixed("train", wire.DPSGD_RDP_EPSILON)
CLIENTS_IN_SUM = "train/clients-in-sum"
# Evaluation, pooled over the sites' held-out tokens
EVAL_LOSS = prefixed("eval", wire.EVAL_LOSS)
EVAL_PERPLEXITY = prefixed("eval", wire.EVAL_PERPLEXITY)
EVAL_TOKEN_ACCURACY = prefixed("eval", wire.EVAL_TOKEN_ACCURACY)
EVAL_TOKENS = prefixed("eval", wire.EVAL_TOKENS)
EVAL_EXAMPLES = prefixed("eval", wire.NUM_EXAMPLES)
EVAL_CLIENTS = "eval/clients"
# Client-level DP (DP-FedAvg and SecAgg+ with DP)
EPSILON = "epsilon"
PLD_EPSILON = "pld-epsilon"
RDP_EPSILON = "rdp-epsilon"
DELTA = "delta"
DP_CLIP_NORM = "dp-clip-norm"
DP_NOISE_STDDEV = "dp-noise-stddev"
DP_EXPECTED_CLIENTS = "dp-expected-clients"
DP_DELTA_TOTAL = "dp-delta-total"
DP_NOISY_UNCLIPPED_FRACTION = "dp-noisy-unclipped-fraction"
# SecAgg+
SECAGG_FAILED = "secagg-failed"
SECAGG_NUM_SHARES = "secagg-num-shares"
SECAGG_THRESHOLD = "secagg-threshold"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
SECAGG_QUANTIZATION_RANGE = "secagg-quantization-range"
SECAGG_MAX_WEIGHT = "secagg-max-weight"
SECAGG_ERROR_BOUND = "secagg-error-bound"
SECAGG_CLAMPED = "secagg-clamped"
SECAGG_WEIGHT_TOTAL = "secagg-weight-total"

_EVAL = "rounds that are evaluated (fed.evaluate-every, the last, a DP budget stop)"
_DP = "client-level DP (privacy.mode != off)"
_SECAGG = "fed.aggregation = secagg+"

COLUMNS: tuple[Column, ...] = (
    Column(ROUND, "-", "The round this row describes (1-based)."),
    Column(
        SECONDS,
        "s",
        "Wall time of the round, evaluation included.",
        tensorboard="time/round-seconds",
    ),
    Column(AGGREGATION, "-", "fedavg or secagg+."),
    Column(
        CLIENTS_SAMPLED, "sites", "Sites sent a train instruction.", tensorboard="clients/sampled"
    ),
    Column(
        CLIENTS_REPLIED,
        "sites",
        "Sites whose update is in the aggregate.",
        tensorboard="clients/replied",
    ),
    Column(
        CLIENTS_DROPPED,
        "sites",
        "Sampled sites whose update is not.",
        tensorboard="clients/dropped",
    ),
    Column(DROPPED, "-", "node id -> why its update is not in the aggregate."),
    Column(
        BYTES_DOWN,
        "bytes",
        "Payload sent to the sites in the round's train exchange(s).",
        tensorboard="traffic/bytes-down",
    ),
    Column(BYTES_UP, "bytes", "Payload received from them.", tensorboard="traffic/bytes-up"),
    Column(
        BYTES_DOWN_EVAL,
        "bytes",
        "Payload sent to the sites for evaluation (round 1 includes round 0's).",
        "rounds that evaluate",
    ),
    Column(
        BYTES_BY_SITE,
        "bytes",
        "node id -> [bytes sent to it, bytes received from it] in the round's train and "
        "evaluation exchanges (summed per site in summary.json).",
    ),
    Column(
        SITE_LABELS,
        "-",
        "node id -> the label the site's replies gave it this round (its data file or "
        "partition, as the per-site table names it).",
        "rounds with replies of this project's ClientApp",
    ),
    Column(UPDATED, "-", "Whether the global adapter changed this round."),
    Column(
        REFUSED,
        "-",
        "Replies refused before validation: from a node not sampled this round, a second "
        "reply from one node, a reply to another node's instruction.",
        "rounds with such a reply",
    ),
    Column(
        CLAMPED,
        "-",
        "node id -> what was clamped (fed.bound-action = clamp).",
        "rounds with a clamped reply",
    ),
    Column(
        LORA_TRUNCATION_ERROR,
        "fraction",
        "Relative Frobenius error of re-factoring the averaged LoRA products to rank r.",
        "lora.aggregation = exact",
    ),
    Column(
        TRAIN_LOSS,
        "nats/token",
        "Weighted mean of the sites' training loss (not under client-level DP with SecAgg+).",
        "rounds with an update",
        tensorboard="loss/train",
    ),
    Column(
        TRAIN_SECONDS,
        "s",
        "Weighted mean of the sites' local training time.",
        "fedavg rounds with an update",
    ),
    Column(
        TRAIN_EXAMPLES,
        "examples",
        "Training examples the replying sites hold (n_k), summed.",
        "fedavg rounds with an update",
    ),
    Column(
        TRAIN_TOKENS,
        "tokens",
        "Response tokens in the replying sites' training data, summed.",
        "fedavg rounds with an update",
    ),
    Column(
        TRAIN_EXAMPLES_SEEN,
        "examples",
        "Examples trained on this round (repeats counted), summed over the sites.",
        "fedavg rounds with an update",
    ),
    Column(
        TRAIN_TOKENS_SEEN,
        "tokens",
        "Response tokens trained on this round, summed over the sites.",
        "fedavg rounds with an update",
    ),
    Column(
        DPSGD_EPSILON_COLUMN,
        "epsilon",
        "Largest sample-level DP-SGD epsilon any replying site reports (privacy.accountant).",
        "privacy.dpsgd = true",
    ),
    Column(
        DPSGD_PLD_EPSILON_COLUMN,
        "epsilon",
        "The same under the PLD accountant.",
        "privacy.dpsgd = true",
    ),
    Column(
        DPSGD_RDP_EPSILON_COLUMN,
        "epsilon",
        "The same under the exact RDP accountant.",
        "privacy.dpsgd = true",
    ),
    Column(CLIENTS_IN_SUM, "sites", "Sites whose masked update is in the SecAgg+ sum.", _SECAGG),
    Column(
        EVAL_LOSS,
        "nats/token",
        "Held-out loss, pooled over every evaluated token.",
        _EVAL,
        tensorboard="loss/eval",
    ),
    Column(EVAL_PERPLEXITY, "-", "exp(eval-loss).", _EVAL, tensorboard="eval/perplexity"),
    Column(
        EVAL_TOKEN_ACCURACY,
        "fraction",
        "Next-token accuracy on held-out response tokens.",
        _EVAL,
        tensorboard="eval/token-accuracy",
    ),
    Column(EVAL_TOKENS, "tokens", "Held-out response tokens evaluated.", _EVAL),
    Column(EVAL_EXAMPLES, "examples", "Held-out examples evaluated.", _EVAL),
    Column(EVAL_CLIENTS, "sites", "Sites whose evaluation reply was used.", _EVAL),
    Column(
        EPSILON,
        "epsilon",
        "Client-level epsilon spent after this round, at delta, under privacy.accountant.",
        _DP,
        tensorboard="privacy/epsilon",
    ),
    Column(PLD_EPSILON, "epsilon", "Client-level epsilon under the PLD accountant.", _DP),
    Column(RDP_EPSILON, "epsilon", "Client-level epsilon under the exact RDP accountant.", _DP),
    Column(DELTA, "-", "The delta epsilon is reported at (privacy.delta).", _DP),
    Column(DP_CLIP_NORM, "L2", "Clip norm C the round used.", _DP),
    Column(
        DP_NOISE_STDDEV,
        "-",
        "Std of the Gaussian noise on each coordinate of the mean update.",
        _DP,
        tensorboard="privacy/noise-stddev",
    ),
    Column(DP_EXPECTED_CLIENTS, "sites", "m = round(q N), the fixed denominator.", _DP),
    Column(
        DP_DELTA_TOTAL,
        "-",
        "delta of the run's guarantee so far: delta plus, under SecAgg+, the chance of a "
        "cohort too small to sum (privacy.small-cohorts).",
        _DP,
    ),
    Column(
        DP_NOISY_UNCLIPPED_FRACTION,
        "fraction",
        "Noised fraction of unclipped updates that moved C.",
        "privacy.mode = server-adaptive",
    ),
    Column(
        SECAGG_FAILED, "-", "Why the SecAgg+ round produced no aggregate (null if it did).", _SECAGG
    ),
    Column(SECAGG_NUM_SHARES, "sites", "Neighbours each site secret-shares with.", _SECAGG),
    Column(SECAGG_THRESHOLD, "shares", "Shares needed to reconstruct a secret.", _SECAGG),
    Column(SECAGG_CLIPPING_RANGE, "-", "Elementwise bound c on every value sent.", _SECAGG),
    Column(SECAGG_QUANTIZATION_RANGE, "levels", "Integer levels Q over [-c, c].", _SECAGG),
    Column(SECAGG_MAX_WEIGHT, "-", "W, the largest weight a site may report.", _SECAGG),
    Column(
        SECAGG_ERROR_BOUND,
        "-",
        "Worst-case per-value difference to exact FedAvg: 3 c m / (Q x secagg-weight-total) "
        "for the m sites in the sum (at full weight, 3c/Q, in a failed round).",
        _SECAGG,
    ),
    Column(
        SECAGG_CLAMPED,
        "sites",
        "Sites whose weight n_k exceeded W and was clamped to it; summed inside the masked "
        "vector, so which sites stays hidden.",
        "SecAgg+ rounds with an aggregate",
    ),
    Column(
        SECAGG_WEIGHT_TOTAL,
        "-",
        "Sum over the sites in the sum of their weights as sent, round(min(n_k, W)/W x Q)/Q "
        "(what Flower's workflow divides by).",
        "SecAgg+ rounds with an aggregate",
    ),
)

BY_NAME = {c.name: c for c in COLUMNS}

# Task questions (flower_llm.tasks): one column of each family per task, the task being
# the task file's name (``eval/task-accuracy/medical``).
TASK = "<task>"
EVAL_TASK_QUESTIONS = prefixed("eval", f"{tasks.QUESTIONS_KEY}/{TASK}")
EVAL_TASK_CORRECT = prefixed("eval", f"{tasks.CORRECT_KEY}/{TASK}")
EVAL_TASK_ACCURACY = prefixed("eval", f"{tasks.ACCURACY_KEY}/{TASK}")
EVAL_TASK_CHANCE = prefixed("eval", f"{tasks.CHANCE_KEY}/{TASK}")
EVAL_TASK_EXACT_MATCH = prefixed("eval", f"{tasks.EXACT_MATCH_KEY}/{TASK}")
_TASKS = "evaluated rounds with eval.tasks = true, per task a site evaluates"

TASK_COLUMNS: tuple[Column, ...] = (
    Column(
        EVAL_TASK_QUESTIONS,
        "questions",
        "Task questions answered, summed over the evaluating sites.",
        _TASKS,
    ),
    Column(EVAL_TASK_CORRECT, "questions", "Of those, answered right, summed.", _TASKS),
    Column(
        EVAL_TASK_ACCURACY,
        "fraction",
        "Pooled accuracy: correct / questions (multiple choice: the option of highest "
        "log-likelihood; short answers: normalized match of the greedy answer).",
        _TASKS,
    ),
    Column(
        EVAL_TASK_CHANCE,
        "fraction",
        "Accuracy of uniform guessing on the same questions: mean of 1/(options).",
        _TASKS,
    ),
    Column(
        EVAL_TASK_EXACT_MATCH,
        "fraction",
        "Short answers only: exact matches / short-answer questions.",
        "as above, tasks with short answers",
    ),
)
"""Column families: ``<task>`` stands for each task's name."""


def task_column(family: str, task: str) -> str:
    """The column of ``task`` in a family of :data:`TASK_COLUMNS` (``eval/task-accuracy/x``)."""
    return family.replace(TASK, task)


def task_family(name: str) -> Column | None:
    """The family of :data:`TASK_COLUMNS` that column ``name`` belongs to, if any."""
    for column in TASK_COLUMNS:
        head = column.name[: -len(TASK)]
        rest = name[len(head) :]
        if name.startswith(head) and rest and "/" not in rest:
            return column
    return None


def check_row(row: dict[str, object], site_columns: Iterable[str] = ()) -> None:
    """Refuse a row with a column this module does not declare (a name that drifted).

    ``site_columns`` are columns made of metrics the sites chose to send (a client written
    outside this project may send its own): kept in the row, not refused.
    """
    unknown = sorted(
        name for name in set(row) - set(BY_NAME) - set(site_columns) if task_family(name) is None
    )
    if unknown:
        raise ValueError(
            f"metrics row has undeclared columns {unknown}; declare them in flower_llm.metrics"
        )


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of column ``name`` (undeclared names keep their own)."""
    column = BY_NAME.get(name)
    return column.tensorboard if column is not None and column.tensorboard else name


def markdown_table() -> str:
    """The metrics.jsonl table the docs show (docs/deployment.md)."""
    lines = ["| column | unit | written | meaning |", "|---|---|---|---|"]
    lines += [f"| `{c.name}` | {c.unit} | {c.when} | {c.meaning} |" for c in COLUMNS]
    lines += [f"| `{c.name}` | {c.unit} | {c.when} | {c.meaning} |" for c in TASK_COLUMNS]
    return "\n".join(lines)


def traffic_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's communication, as a budget counts it: bytes up and down in the train
    exchanges, bytes down for evaluation, MB (10^6 bytes) up, down (train + evaluation)
    and in all, and per site (node id) where rounds recorded it, with the label each
    site's replies last gave it (``site-labels``)."""
    up = sum(int(row.get(BYTES_UP, 0)) for row in rows)
    train_down = sum(int(row.get(BYTES_DOWN, 0)) for row in rows)
    eval_down = sum(int(row.get(BYTES_DOWN_EVAL, 0)) for row in rows)
    down = train_down + eval_down
    by_site: dict[str, dict[str, int]] = {}
    labels: dict[str, str] = {}
    for row in rows:
        labels.update({str(k): str(v) for k, v in (row.get(SITE_LABELS) or {}).items()})
        for node, (sent, received) in (row.get(BYTES_BY_SITE) or {}).items():
            site = by_site.setdefault(str(node), {"bytes-down": 0, "bytes-up": 0})
            site["bytes-down"] += int(sent)
            site["bytes-up"] += int(received)
    summary: dict[str, Any] = {
        "bytes-up": up,
        "bytes-down": train_down,
        "bytes-down-eval": eval_down,
        "mb-up": round(up / 1e6, 6),
        "mb-down": round(down / 1e6, 6),
        "mb-total": round((up + down) / 1e6, 6),
    }
    if by_site:
        summary["bytes-by-site"] = dict(sorted(by_site.items(), key=lambda kv: int(kv[0])))
    if labels:
        summary[SITE_LABELS] = dict(sorted(labels.items(), key=lambda kv: int(kv[0])))
    return summary
