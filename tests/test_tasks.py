"""Task evaluation: task files, scoring, the sites' counts and how the server pools them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from flower_llm import metrics as schema
from flower_llm import tasks, wire
from flower_llm.config import ConfigError, DataConfig, parse_run_config
from flower_llm.embedded import DOMAINS, generate_domain_task, generate_instruction_dataset
from flower_llm.tasks import TaskFileError, load_task
from server_apps.fedavg import round_row
from strategies.fedavg import RoundReport, aggregate_eval_replies
from strategies.rounds import RoundResult


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def one_torch_thread() -> Any:
    """Tiny tensors: one intra-op thread is faster on a busy machine (see test_embedded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------


def test_a_task_file_reads_multiple_choice_yes_no_maybe_and_short_answers(tmp_path: Path) -> None:
    # Prepare: MMLU-style (list, letter), lettered object, PubMedQA-style (answer text)
    path = write_lines(
        tmp_path / "clinic-qa.v2.jsonl",
        [
            json.dumps({"question": "q1", "options": ["a", "b", "c", "d"], "answer": "C"}),
            "",
            json.dumps({"question": "q2", "options": {"B": "x", "A": "y"}, "answer": "(b)"}),
            json.dumps(
                {
                    "question": "Does it help?",
                    "context": "An abstract.",
                    "options": ["yes", "no", "maybe"],
                    "answer": "maybe",
                    "pubid": 17,
                }
            ),
            json.dumps({"question": "q4", "answer": ["Paris", "paris, France"]}),
        ],
    )

    # Execute
    task = load_task(path)

    # Assert
    assert task.name == "clinic-qa"
    first, second, third, fourth = task.items
    assert first.answer_index == 2 and first.line == 1
    assert second.options == ("y", "x") and second.answers == ("B",) and second.line == 3
    assert third.answer_index == 2 and third.instruction == "An abstract.\n\nDoes it help?"
    assert not fourth.is_multiple_choice and fourth.answers == ("Paris", "paris, France")
    assert math.isclose(task.chance, (1 / 4 + 1 / 2 + 1 / 3 + 0) / 4)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"options": ["a", "b"], "answer": "A"}', "missing 'question'"),
        ('{"question": "q", "options": ["a", "b"]}', "missing 'answer'"),
        ('{"question": "", "answer": "x"}', "'question' must be a non-empty string"),
        ('{"question": "q", "options": ["a"], "answer": "A"}', "needs 2 to 26 entries"),
        ('{"question": "q", "options": ["a", "b"], "answer": "C"}', "neither one of the letters"),
        ('{"question": "q", "options": {"A": "a", "C": "c"}, "answer": "A"}', "keys must be"),
        ('{"question": "q", "options": ["a", "a"], "answer": "A"}', "same text"),
        ('{"question": "q", "options": "a,b", "answer": "A"}', "must be a list"),
        ('{"question": "q", "answer": []}', "lists no accepted answer"),
        ('{"question": "q", "answer": 3}', "'answer' must be a non-empty string"),
        ('{"question": "q", "context": 5, "answer": "x"}', "'context' must be a string"),
    ],
)
def test_a_malformed_line_is_refused_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    good = json.dumps({"question": "q", "options": ["a", "b"], "answer": "A"})
    path = write_lines(tmp_path / "t.jsonl", [good, good, line])
    with pytest.raises(TaskFileError, match=message) as error:
        load_task(path)
    assert f"{path}:3:" in str(error.value)


def test_an_empty_missing_or_non_utf8_task_file_is_refused(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TaskFileError, match="holds no question"):
        load_task(empty)
    with pytest.raises(TaskFileError, match="not found"):
        load_task(tmp_path / "nowhere.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "q", "answer": "x"}\n{"question": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(TaskFileError, match=f"{latin}:2: not UTF-8"):
        load_task(latin)


def test_answer_normalization_is_squad_style() -> None:
    assert tasks.normalize_answer("  The Paracetamol, 500 mg! ") == "paracetamol 500 mg"
    assert tasks.normalized_match("an apple.", ["Apple"])
    assert not tasks.normalized_match("apples", ["apple"])


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def test_continuation_log_likelihood_equals_a_direct_computation(tiny_model: Any) -> None:
    # Prepare: contexts and continuations of different lengths, so the batch is padded
    requests = [([2, 10, 11, 12], [40, 41]), ([2, 7], [50, 51, 52, 53]), ([2, 9, 9], [60])]

    # Execute
    batched = tasks.continuation_logprobs(tiny_model, requests, batch_size=3)
    one_by_one = tasks.continuation_logprobs(tiny_model, requests, batch_size=1)

    # Assert: the sum of log-softmax at the positions that predict each continuation token
    for (context, continuation), value, single in zip(requests, batched, one_by_one, strict=True):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(input_ids=ids).logits[0].float(), dim=-1)
        expected = sum(
            float(logprobs[len(context) - 1 + i, token]) for i, token in enumerate(continuation)
        )
        assert value == pytest.approx(expected, abs=1e-4)
        assert single == pytest.approx(expected, abs=1e-4)


class PrefersOneToken(torch.nn.Module):
    """A 'model' whose every next-token distribution puts most mass on one token."""

    def __init__(self, vocab_size: int, token: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.token = vocab_size, token

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        logits = torch.zeros((*input_ids.shape, self.vocab_size))
        logits[..., self.token] = 8.0
        return SimpleNamespace(logits=logits)


def test_multiple_choice_picks_the_option_the_model_finds_most_likely(
    tmp_path: Path, tokenizer: Any
) -> None:
    # Prepare: a model that always says "Yes"; 3 of 5 questions have "Yes" for answer
    (yes,) = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    model = PrefersOneToken(len(tokenizer), yes)
    answers = ["Yes", "No", "Yes", "Maybe", "Yes"]
    path = write_lines(
        tmp_path / "pubmedqa-like.jsonl",
        [
            json.dumps({"question": f"q{i}", "options": ["Yes", "No", "Maybe"], "answer": a})
            for i, a in enumerate(answers)
        ],
    )

    # Execute
    score = tasks.score_task(model, tokenizer, load_task(path), DataConfig())

    # Assert
    assert (score.questions, score.correct, score.correct_norm) == (5, 3, 3)
    assert score.accuracy == pytest.approx(0.6) and score.chance == pytest.approx(1 / 3)
    assert score.as_dict()["chance"] == pytest.approx(1 / 3)


@pytest.mark.usefixtures("one_torch_thread")
def test_loglik_scoring_is_the_argmax_of_the_option_log_likelihoods(
    tiny_model: Any, tokenizer: Any, tmp_path: Path
) -> None:
    # Prepare: questions of the bundled medical task, answered by the untrained tiny model
    bundled = load_task(tasks.bundled_task_file("medical"))
    task = tasks.Task(bundled.name, bundled.path, bundled.items[:9])
    cfg = DataConfig()

    # Execute
    score = tasks.score_task(tiny_model, tokenizer, task, cfg, batch_size=7)

    # Assert: recount by hand, one request per option, prompts encoded as training does
    correct = correct_norm = 0
    for item in task.items:
        context = tasks.prompt_ids(item.instruction, tokenizer, cfg)
        values = tasks.continuation_logprobs(
            tiny_model,
            [(context, tokenizer(o, add_special_tokens=False)["input_ids"]) for o in item.options],
        )
        correct += int(np.argmax(values)) == item.answer_index
        normed = [v / len(o) for v, o in zip(values, item.options, strict=True)]
        correct_norm += int(np.argmax(normed)) == item.answer_index
    assert (score.correct, score.correct_norm) == (correct, correct_norm)
    assert score.questions == 9 and score.chance == pytest.approx(0.25)


def test_short_answers_are_scored_by_generation(tokenizer: Any, tmp_path: Path) -> None:
    # Prepare: a model that only ever writes "Yes"
    (yes,) = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    model = GreedyYes(len(tokenizer), yes)
    path = write_lines(
        tmp_path / "short.jsonl",
        [
            json.dumps({"question": "q1", "answer": "Yes"}),
            json.dumps({"question": "q2", "answer": ["no", "yes."]}),
            json.dumps({"question": "q3", "answer": "no"}),
            json.dumps({"question": "q4", "options": ["no", "yes"], "answer": "B"}),
        ],
    )

    # Execute
    score = tasks.score_task(
        model, tokenizer, load_task(path), DataConfig(), scoring="generate", max_new_tokens=1
    )

    # Assert: q1 exact, q2 normalized only, q3 wrong; the multiple-choice q4 right
    assert (score.correct, score.exact, score.short_answers) == (3, 1, 3)
    assert score.chance == pytest.approx(0.5 / 4)
    assert score.as_dict()["exact-match"] == pytest.approx(1 / 3)


class GreedyYes(PrefersOneToken):
    """Generates ``token`` and nothing else."""

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        extra = torch.full((input_ids.shape[0], max_new_tokens), self.token)
        return torch.cat([input_ids, extra], dim=1)


# --------------------------------------------------------------------------------------
# The bundled tasks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_bundled_tasks_are_the_generator_output_and_never_a_training_question(
    domain: str,
) -> None:
    path = tasks.bundled_task_file(domain)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == generate_domain_task(domain)
    trained = {row["instruction"] for row in generate_instruction_dataset()}
    task = load_task(path)
    assert task.name == domain and len(task.items) == 30 and task.chance == 0.25
    assert not {item.question for item in task.items} & trained
    # The right option is one of the embedded data's answers to that very question
    # whenever the training data asks it with the same slots: spot-check the templates.
    assert {item.answers[0] for item in task.items} == set("ABCD")


def test_an_embedded_site_evaluates_the_task_of_the_domain_it_holds() -> None:
    from flower_llm.client import SiteIdentity

    cfg = parse_run_config({})
    names = [tasks.site_task_files(cfg, SiteIdentity(None, p, 4), {})[0].stem for p in range(4)]
    # by-field deals the sorted domains round-robin: finance, medical, smart-home, finance
    assert names == ["finance", "medical", "smart-home", "finance"]
    own = tasks.site_task_files(cfg, SiteIdentity(None, 0, 4), {"task-file": "/a.jsonl, b.jsonl"})
    assert [p.name for p in own] == ["a.jsonl", "b.jsonl"]
    run_wide = parse_run_config({"eval.task-file": "x.jsonl"})
    assert [p.name for p in tasks.site_task_files(run_wide, SiteIdentity(None, 0, 4), {})] == [
        "x.jsonl"
    ]
    own_data = SiteIdentity("/site/data.jsonl", 0, 1)
    assert tasks.site_task_files(cfg, own_data, {}) == []
    with pytest.raises(ConfigError, match="node-config 'task-file' must be a string"):
        tasks.site_task_files(cfg, own_data, {"task-file": 3})


def test_eval_settings_are_validated() -> None:
    assert parse_run_config({}).eval.tasks is True
    assert parse_run_config({"eval.task-file": "a.jsonl, b.jsonl"}).eval.task_files == [
        "a.jsonl",
        "b.jsonl",
    ]
    with pytest.raises(ConfigError, match=r"eval\.task-file"):
        parse_run_config({"eval.task-file": "a.jsonl,,b.jsonl"})
    with pytest.raises(ConfigError, match=r"eval\.tasks"):
        parse_run_config({"eval.tasks": "yes"})


# --------------------------------------------------------------------------------------
# Federated: only counts travel, and the server pools them exactly
# --------------------------------------------------------------------------------------


def site_metrics(correct: dict[str, tuple[int, int]]) -> dict[str, int | float]:
    """A site's evaluate reply: held-out metrics and (correct, questions) per task."""
    scores = [
        tasks.TaskScore(name, questions, right, questions / 4)
        for name, (right, questions) in correct.items()
    ]
    return {
        wire.NUM_EXAMPLES: 3,
        wire.EVAL_LOSS: 1.0,
        wire.EVAL_PERPLEXITY: math.e,
        wire.EVAL_TOKEN_ACCURACY: 0.5,
        wire.EVAL_TOKENS: 10,
        **tasks.reply_metrics(scores),
    }


def reply_with(metrics: dict[str, int | float], node: int) -> Message:
    instruction = Message(
        RecordDict({wire.CONFIG: ConfigRecord()}), dst_node_id=node, message_type="evaluate"
    )
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=instruction)  # type: ignore[arg-type]


def test_the_server_pools_task_counts_as_correct_over_questions() -> None:
    # Prepare: three sites, two tasks; site 3 claims more correct answers than questions
    replies = [
        reply_with(site_metrics({"medical": (7, 30), "finance": (20, 30)}), 1),
        reply_with(site_metrics({"medical": (12, 20)}), 2),
        reply_with(site_metrics({"medical": (50, 30), "finance": (1, 10)}), 3),
    ]

    # Execute
    pooled = aggregate_eval_replies(replies)

    # Assert
    assert pooled is not None
    assert pooled["task-questions/medical"] == 50 and pooled["task-correct/medical"] == 19
    assert pooled["task-accuracy/medical"] == pytest.approx(19 / 50)
    assert pooled["task-accuracy/finance"] == pytest.approx(21 / 40)
    assert pooled["task-chance/finance"] == pytest.approx(0.25)
    row = round_row(RoundResult(1, ArrayRecord(), None, pooled, RoundReport(), 1.0))
    assert row[schema.task_column(schema.EVAL_TASK_ACCURACY, "medical")] == pytest.approx(0.38)
    written = {schema.task_family(name) for name in row} - {None}
    assert {c.name for c in written if c} == {
        schema.EVAL_TASK_QUESTIONS,
        schema.EVAL_TASK_CORRECT,
        schema.EVAL_TASK_ACCURACY,
        schema.EVAL_TASK_CHANCE,
    }


def test_short_answer_exact_match_pools_over_short_answers_only() -> None:
    site = tasks.reply_metrics([tasks.TaskScore("qa", 10, 6, 1.0, exact=2, short_answers=5)])
    other = tasks.reply_metrics([tasks.TaskScore("qa", 4, 1, 0.0, exact=3, short_answers=4)])
    pooled = tasks.pool_task_metrics([site, other, {"task-questions/qa": float("nan")}])
    assert pooled["task-accuracy/qa"] == pytest.approx(7 / 14)
    assert pooled["task-exact-match/qa"] == pytest.approx(5 / 9)
    assert pooled["task-chance/qa"] == pytest.approx(1 / 14)


def test_the_summary_reads_task_accuracy_from_round_0_on() -> None:
    initial = {"task-accuracy/medical": 0.1, "task-chance/medical": 0.25}
    rows = [
        {"round": 1, "eval/task-accuracy/medical": 0.3, "eval/task-chance/medical": 0.25},
        {"round": 2},
        {"round": 3, "eval/task-accuracy/medical": 0.5, "eval/task-chance/medical": 0.25},
    ]
    summary = tasks.task_summary(initial, rows)
    assert summary == {
        "medical": {"chance": 0.25, "accuracy-by-round": [0.1, 0.3, None, 0.5], "rises": True}
    }
    lines = tasks.format_task_lines({"task-accuracy": summary})
    expected = "medical 0.100 -> 0.300 -> - -> 0.500 (chance 0.250)"
    assert lines[1].split() == expected.split()


def evaluate_message(record: ArrayRecord, node: int, config: dict[str, Any]) -> Message:
    return Message(
        RecordDict({wire.ARRAYS: record, wire.CONFIG: ConfigRecord(config)}),
        dst_node_id=node,
        message_type=MessageType.EVALUATE,
    )


@pytest.mark.usefixtures("one_torch_thread")
def test_a_site_answers_its_task_and_sends_only_counts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from client_apps.qlora import app, session_for
    from flower_llm.adapters import adapter_state

    # Prepare: site 1 of 4 holds the medical data; a second site has its own task file
    run_config = {"model.name": str(tiny_model_dir)}

    def context(node_config: dict[str, Any], cfg: dict[str, Any] = run_config) -> Context:
        base = {"partition-id": 1, "num-partitions": 4}
        return Context(1, 2, {**base, **node_config}, RecordDict(), cfg)

    record = wire.to_array_record(adapter_state(session_for(context({})).model))
    own = write_lines(
        tmp_path / "ward-7.jsonl",
        [json.dumps({"question": "q", "options": ["a", "b"], "answer": "A"})] * 3,
    )
    bad = write_lines(tmp_path / "bad.jsonl", ['{"question": "q", "answer": "x"}', "{oops"])

    # Execute
    asks = {wire.SERVER_ROUND: 1, wire.EVAL_TASKS: True}  # what this project's server sends
    medical = app(evaluate_message(record, 2, asks), context({}))
    ward = app(evaluate_message(record, 2, asks), context({"task-file": str(own)}))
    loss_only = app(evaluate_message(record, 2, {wire.EVAL_TASKS: False}), context({}))
    stock_server = app(evaluate_message(record, 2, {}), context({}))  # asks for nothing
    switched_off = app(
        evaluate_message(record, 2, asks), context({}, {**run_config, "eval.tasks": False})
    )
    broken = app(evaluate_message(record, 2, asks), context({"task-file": str(bad)}))

    # Assert: counts only, per task name; no question, option or answer text leaves
    metrics = dict(medical.content[wire.METRICS])
    task_keys = {k for k in metrics if k.startswith("task-")}
    assert task_keys == {
        "task-questions/medical",
        "task-correct/medical",
        "task-chance-sum/medical",
    }
    assert metrics["task-questions/medical"] == 30
    assert metrics["task-chance-sum/medical"] == pytest.approx(7.5)
    assert 0 <= metrics["task-correct/medical"] <= 30  # type: ignore[operator]
    assert dict(ward.content[wire.METRICS])["task-questions/ward-7"] == 3
    # a server that does not ask (a stock Flower strategy, which needs the same metric keys
    # from every site) gets the loss metrics alone
    for reply in (loss_only, stock_server, switched_off):
        assert not any(k.startswith("task-") for k in reply.content[wire.METRICS])
        assert wire.EVAL_LOSS in reply.content[wire.METRICS]
    assert broken.has_error() and f"{bad}:2: not JSON" in broken.error.reason


def test_pooled_metrics_of_sites_answering_different_tasks_keep_them_apart() -> None:
    replies = [
        reply_with(site_metrics({"finance": (10, 30)}), 1),
        reply_with(site_metrics({"medical": (3, 30)}), 2),
        reply_with(site_metrics({"finance": (14, 30)}), 4),
    ]
    pooled = aggregate_eval_replies(replies)
    assert pooled is not None
    assert pooled["task-accuracy/finance"] == pytest.approx(24 / 60)
    assert pooled["task-accuracy/medical"] == pytest.approx(3 / 30)
    assert tasks.task_names(dict(pooled)) == ["finance", "medical"]


def test_the_report_shows_task_accuracy_while_running_and_after(tmp_path: Path) -> None:
    from flower_llm.outputs import INITIAL_EVAL_FILE, METRICS_FILE, SUMMARY_FILE
    from flower_llm.report import format_report, read_run, task_lines

    # Prepare: round 0 and two evaluated rounds, no summary yet
    (tmp_path / INITIAL_EVAL_FILE).write_text(
        json.dumps({"task-accuracy/finance": 0.1, "task-chance/finance": 0.25})
    )
    rows = [
        {"round": r, "eval/task-accuracy/finance": a, "eval/task-chance/finance": 0.25}
        for r, a in ((1, 0.2), (2, 0.6))
    ]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # Execute
    running = task_lines(read_run(tmp_path))
    (tmp_path / SUMMARY_FILE).write_text(
        json.dumps(
            {
                "task-accuracy": tasks.task_summary(
                    json.loads((tmp_path / INITIAL_EVAL_FILE).read_text()), rows
                )
            }
        )
    )
    finished = task_lines(read_run(tmp_path))

    # Assert
    assert running == finished
    expected = "finance 0.100 -> 0.200 -> 0.600 (chance 0.250)"
    assert running[1].split() == expected.split()
    assert running[1] in format_report(read_run(tmp_path))
