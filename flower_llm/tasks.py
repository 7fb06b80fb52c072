"""Task evaluation: multiple-choice and short-answer questions from JSONL task files.

Loss and perplexity say how well a model predicts held-out text; a site deciding whether to
use the model asks "does it answer our questions?". A *task file* holds such questions, one
JSON object per line:

- **multiple choice** (MMLU, MedMCQA; PubMedQA-style yes/no/maybe)::

      {"question": "...", "options": ["...", "...", "..."], "answer": "B"}

  ``options`` is a list (lettered A, B, C, ... in order) or an object ``{"A": ..., "B":
  ...}`` with consecutive letters from A; ``answer`` is the correct letter (or the correct
  option's exact text, convenient for ``yes``/``no``/``maybe``).
- **short answer**: no ``options``; ``answer`` is the reference string, or a list of
  accepted strings.

Optional on both: ``context`` (a passage shown before the question, as PubMedQA's
abstract) and ``id``. Other keys are ignored, so converted benchmark files keep theirs.

Scoring
-------
The question (with its context) is formatted exactly as training formats an instruction
(``data.prompt-template`` or the chat template, BOS handling included; see
:func:`prompt_ids`). Then:

- multiple choice, ``loglik`` (default): every option's text is scored as the response,
  ``sum_t log p(option token t | prompt, earlier option tokens)``, and the option with the
  highest sum is the model's answer (``accuracy``); ``accuracy-norm`` divides each sum by
  the option's length in characters first. This is the standard way to ask a *base* model
  a multiple-choice question (lm-evaluation-harness's ``acc`` / ``acc_norm``): nothing is
  generated, so a model that never learnt an answer format is still scored on what it
  knows.
- multiple choice, ``generate``: greedy generation; correct when the normalized answer
  equals the correct option's normalized text or its letter.
- short answer: greedy generation; ``exact`` when the stripped answer equals a reference
  (after the reference's round trip through the tokenizer), ``correct`` when they are
  equal after :func:`normalize_answer` (lower case, no punctuation, no articles a/an/the,
  single spaces: SQuAD's normalization).

Chance level: uniform guessing among ``k`` options is right with probability ``1/k``, so a
task's chance accuracy is the mean of ``1/k`` over its questions (0 for short answers).
Every accuracy is reported with it.

Federated evaluation sends only counts (questions, correct, the chance sum), so the server
pools sites exactly: pooled accuracy = sum of correct / sum of questions
(:func:`pool_task_metrics`). This module imports torch only inside the scoring functions:
the server pools with it and never loads a model.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
SCORINGS = ("loglik", "generate")
"""How multiple-choice questions are answered: option log-likelihood, or generation."""

TASK_DATA_DIR = Path(__file__).parent / "task_data"
"""The bundled tasks, one per embedded domain (``<domain>.jsonl``)."""

_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TaskFileError(ValueError):
    """A task file cannot be used; the message names the file and line."""


# --------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskItem:
    """One question of a task file."""

    question: str
    options: tuple[str, ...]
    """Multiple-choice options in letter order (empty for a short answer)."""
    answers: tuple[str, ...]
    """The correct option's letter (multiple choice), or the accepted short answers."""
    context: str = ""
    line: int = 0
    """Line of the task file it came from (1-based)."""

    @property
    def is_multiple_choice(self) -> bool:
        """Whether the question has options."""
        return bool(self.options)

    @property
    def answer_index(self) -> int:
        """Index of the correct option (multiple choice only)."""
        return LETTERS.index(self.answers[0])

    @property
    def instruction(self) -> str:
        """The text that goes where training puts an instruction."""
        return f"{self.context}\n\n{self.question}" if self.context else self.question


@dataclass(frozen=True)
class Task:
    """The questions of one task file."""

    name: str
    """Metric name of the task: the file name without its suffix (``medical``)."""
    path: Path
    items: tuple[TaskItem, ...]

    @property
    def chance(self) -> float:
        """Accuracy of uniform guessing: the mean of 1/k over the questions."""
        return chance_sum(self.items) / len(self.items)


def chance_sum(items: Iterable[TaskItem]) -> float:
    """Expected number of correct answers under uniform guessing (0 per short answer)."""
    return math.fsum(1.0 / len(item.options) for item in items if item.options)


def task_name(path: str | Path) -> str:
    """The task name of a file: its name without the suffix, safe as a metric key."""
    stem = Path(path).name.split(".")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")
    if not _TASK_NAME.fullmatch(name):
        raise TaskFileError(f"{path}: cannot derive a task name from the file name")
    return name


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TaskFileError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _options(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, Mapping):
        letters = [str(k).strip().upper() for k in value]
        expected = list(LETTERS[: len(letters)])
        if sorted(letters) != expected:
            raise TaskFileError(
                f"{where}: 'options' keys must be the letters {', '.join(expected)}, "
                f"got {', '.join(map(str, value))}"
            )
        by_letter = {str(k).strip().upper(): v for k, v in value.items()}
        value = [by_letter[letter] for letter in expected]
    if not isinstance(value, list):
        raise TaskFileError(
            f"{where}: 'options' must be a list of strings or an object of letters, "
            f"got {type(value).__name__}"
        )
    if not 2 <= len(value) <= len(LETTERS):
        raise TaskFileError(f"{where}: 'options' needs 2 to 26 entries, got {len(value)}")
    options = tuple(_text(v, where, f"options[{i}]") for i, v in enumerate(value))
    if len(set(options)) != len(options):
        raise TaskFileError(f"{where}: two options have the same text")
    return options


def _mc_answer(value: Any, options: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str):
        raise TaskFileError(f"{where}: 'answer' must be an option letter, got {value!r}")
    letter = value.strip().strip("()").upper()
    if len(letter) == 1 and letter in LETTERS[: len(options)]:
        return letter
    if value in options:  # the option's text, as PubMedQA's yes/no/maybe
        return LETTERS[options.index(value)]
    raise TaskFileError(
        f"{where}: 'answer' = {value!r} is neither one of the letters "
        f"{', '.join(LETTERS[: len(options)])} nor an option's text"
    )


def parse_item(record: Any, where: str, line: int) -> TaskItem:
    """One task-file record as a :class:`TaskItem`; ``where`` names it in errors."""
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if key not in record:
            raise TaskFileError(f"{where}: missing '{key}'")
    question = _text(record["question"], where, "question")
    context = record.get("context") or ""
    if not isinstance(context, str):
        raise TaskFileError(f"{where}: 'context' must be a string, got {context!r}")
    if "options" in record:
        options = _options(record["options"], where)
        answers: tuple[str, ...] = (_mc_answer(record["answer"], options, where),)
    else:
        options = ()
        raw = record["answer"]
        raw_answers = raw if isinstance(raw, list) else [raw]
        if not raw_answers:
            raise TaskFileError(f"{where}: 'answer' lists no accepted answer")
        answers = tuple(_text(a, where, "answer") for a in raw_answers)
    return TaskItem(question, options, answers, context, line)


def load_task(path: str | Path) -> Task:
    """Read and check a JSONL task file.

    Raises
    ------
    TaskFileError
        No such file, not UTF-8, a line that is not a JSON object, a missing or malformed
        field, or no question at all; the message names ``file:line``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise TaskFileError(f"task file {file} not found")
    raw = file.read_bytes()
    items = []
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        where = f"{file}:{number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TaskFileError(f"{where}: not UTF-8 (byte at column {err.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskFileError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        items.append(parse_item(record, where, number))
    if not items:
        raise TaskFileError(f"{file}: holds no question")
    return Task(task_name(file), file, tuple(items))


def bundled_task_file(domain: str) -> Path:
    """The bundled task of an embedded domain (``medical``, ``finance``, ``smart-home``)."""
    path = TASK_DATA_DIR / f"{domain}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in TASK_DATA_DIR.glob("*.jsonl"))
        raise TaskFileError(f"no bundled task for domain {domain!r} (bundled: {known})")
    return path


# --------------------------------------------------------------------------------------
# Prompts, answers and their normalization
# --------------------------------------------------------------------------------------


def prompt_ids(instruction: str, tokenizer: Any, cfg: Any) -> list[int]:
    """Token ids of the prompt for ``instruction``, exactly as training encodes prompts.

    The template (or chat template) of :func:`flower_llm.data.format_prompt`, and the
    prompt part of :func:`flower_llm.data.encode_example` (BOS handling included), so
    scoring and generation start where training's responses started.
    """
    from flower_llm.data import IGNORE_INDEX, encode_example, format_prompt

    prompt, _ = format_prompt(
        {cfg.instruction_column: instruction, cfg.response_column: ""}, cfg, tokenizer
    )
    # encode_example tokenizes prompt and response separately, so the masked prefix of a
    # placeholder response's encoding is the prompt's ids, whatever the response is.
    encoded = encode_example(prompt, "x", tokenizer, max_len=2**31)
    if encoded is None:
        raise ValueError("the tokenizer gives no token for a response")
    return [
        t
        for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True)
        if label == IGNORE_INDEX
    ]


def greedy_completion(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of ``ids``, decoded without special tokens and stripped.

    One prompt at a time: no padding, so the answer cannot depend on what else is in a
    batch (exact match compares these strings).
    """
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,  # the training loader turns the cache off
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)).strip()


def round_trip(text: str, tokenizer: Any) -> str:
    """``text`` encoded and decoded by ``tokenizer``, stripped (what generation can write)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


def exact_match(generated: str, reference: str, tokenizer: Any) -> bool:
    """Whether ``generated`` (decoded) equals ``reference`` after stripping.

    The reference goes through the tokenizer and back first, as the generation did: a
    tokenizer whose decoding is lossy (a word-level one may write ``400`` as ``4 0 0``,
    an unknown word as nothing) would otherwise make every answer wrong. Where decoding
    is lossless this changes nothing.
    """
    return generated.strip() == round_trip(reference, tokenizer)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed.

    SQuAD's answer normalization: "The paracetamol." and "paracetamol" match.
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalized_match(generated: str, references: Iterable[str]) -> bool:
    """Whether ``generated`` equals any reference after :func:`normalize_answer`."""
    mine = normalize_answer(generated)
    return any(mine == normalize_answer(r) for r in references)


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskScore:
    """A model's results on one task: counts, so sites pool exactly."""

    name: str
    questions: int
    correct: int
    """Multiple choice: the right option chosen; short answer: a normalized match."""
    chance_sum: float
    """Expected correct answers of uniform guessing (sum of 1/k)."""
    correct_norm: int | None = None
    """``loglik`` only: correct when option log-likelihoods are divided by their length."""
    exact: int | None = None
    """Short answers that match a reference exactly (after stripping)."""
    short_answers: int = 0
    """Questions without options."""

    @property
    def accuracy(self) -> float:
        """correct / questions."""
        return self.correct / self.questions

    @property
    def chance(self) -> float:
        """Accuracy of uniform guessing among each question's options."""
        return self.chance_sum / self.questions

    def as_dict(self) -> dict[str, Any]:
        """JSON-able result, accuracy and chance level side by side."""
        out: dict[str, Any] = {
            "task": self.name,
            "questions": self.questions,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "chance": self.chance,
        }
        if self.correct_norm is not None:
            out["accuracy-norm"] = self.correct_norm / self.questions
        if self.exact is not None:
            out["exact-match"] = self.exact / self.short_answers
            out["short-answers"] = self.short_answers
        return out


def continuation_logprobs(
    model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16
) -> list[float]:
    """``sum_t log p(continuation_t | context, continuation_<t)`` for each request.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM (with or without a PEFT adapter).
    requests : sequence of (context ids, continuation ids)
        The context must hold at least one token (BOS); continuations at least one.
    batch_size : int
        Sequences per forward pass; right padding, so the values do not depend on it
        beyond float rounding.

    Returns
    -------
    list[float]
        One log-likelihood (nats, float32 log-softmax summed in float64) per request.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            sequences = [list(ctx) + list(cont) for ctx, cont in chunk]
            width = max(len(s) for s in sequences)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, sequence in enumerate(sequences):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            # Position t predicts token t+1: (B, T-1, V) log-probabilities.
            logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1).cpu()
            for row, (ctx, cont) in enumerate(chunk):
                targets = torch.tensor(list(cont))
                positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
                picked = logprobs[row, positions, targets]
                out.append(math.fsum(float(v) for v in picked))
    finally:
        model.train(was_training)
    return out


def _fit(context: list[int], continuation: list[int], max_len: int | None) -> list[int]:
    """The context, cut from the left so context + continuation fit ``max_len`` tokens."""
    if max_len is None or len(context) + len(continuation) <= max_len:
        return context
    keep = max(1, max_len - len(continuation))
    return context[-keep:]


def score_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    data_cfg: Any,
    *,
    scoring: str = "loglik",
    batch_size: int = 16,
    max_len: int | None = None,
    max_new_tokens: int | None = None,
) -> TaskScore:
    """Answer every question of ``task`` with ``model`` and count what is right.

    Parameters
    ----------
    model, tokenizer
        The model as it will be used (the adapter applied) and its tokenizer.
    task : Task
        From :func:`load_task`.
    data_cfg : DataConfig
        The prompt format (``data.prompt-template`` or the chat template).
    scoring : str
        Multiple choice by ``loglik`` (default) or ``generate``; short answers always
        generate.
    batch_size : int
        Sequences per forward pass of ``loglik``.
    max_len : int, optional
        Longest sequence scored; a longer prompt loses its first tokens (the option is
        never cut). Default: no limit.
    max_new_tokens : int, optional
        Generation budget; default the longest reference (or option) in tokens + 8.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    mc = [item for item in task.items if item.is_multiple_choice]
    short = [item for item in task.items if not item.is_multiple_choice]
    correct = 0
    correct_norm: int | None = None
    if mc and scoring == "loglik":
        correct, correct_norm = _score_loglik(model, tokenizer, mc, data_cfg, batch_size, max_len)
    elif mc:
        for item in mc:
            generated = _generate(model, tokenizer, item, data_cfg, item.options, max_new_tokens)
            letter = item.answers[0]
            correct += normalized_match(generated, [item.options[item.answer_index], letter])
    exact = 0
    for item in short:
        generated = _generate(model, tokenizer, item, data_cfg, item.answers, max_new_tokens)
        correct += normalized_match(generated, item.answers)
        exact += any(exact_match(generated, a, tokenizer) for a in item.answers)
    return TaskScore(
        name=task.name,
        questions=len(task.items),
        correct=correct,
        chance_sum=chance_sum(task.items),
        correct_norm=correct_norm,
        exact=exact if short else None,
        short_answers=len(short),
    )


def _score_loglik(
    model: Any,
    tokenizer: Any,
    items: Sequence[TaskItem],
    data_cfg: Any,
    batch_size: int,
    max_len: int | None,
) -> tuple[int, int]:
    """Correct answers by summed and by length-normalized option log-likelihood."""
    requests: list[tuple[list[int], list[int]]] = []
    for item in items:
        context = prompt_ids(item.instruction, tokenizer, data_cfg)
        for option in item.options:
            continuation = list(tokenizer(option, add_special_tokens=False)["input_ids"])
            if not continuation:
                raise TaskFileError(f"option {option!r} encodes to no token (line {item.line})")
            requests.append((_fit(context, continuation, max_len), continuation))
    scores = continuation_logprobs(model, requests, batch_size)
    correct = correct_norm = 0
    position = 0
    for item in items:
        mine = scores[position : position + len(item.options)]
        position += len(item.options)
        normed = [s / len(o) for s, o in zip(mine, item.options, strict=True)]
        correct += _argmax(mine) == item.answer_index
        correct_norm += _argmax(normed) == item.answer_index
    return correct, correct_norm


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on a tie (as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _generate(
    model: Any,
    tokenizer: Any,
    item: TaskItem,
    data_cfg: Any,
    references: Sequence[str],
    max_new_tokens: int | None,
) -> str:
    budget = max_new_tokens or (
        max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 8
    )
    return greedy_completion(
        model, tokenizer, prompt_ids(item.instruction, tokenizer, data_cfg), budget
    )


# --------------------------------------------------------------------------------------
# Federated: what a site sends, how the server pools it
# --------------------------------------------------------------------------------------

QUESTIONS_KEY = "task-questions"
CORRECT_KEY = "task-correct"
CHANCE_SUM_KEY = "task-chance-sum"
EXACT_KEY = "task-exact"
SHORT_ANSWERS_KEY = "task-short-answers"
ACCURACY_KEY = "task-accuracy"
CHANCE_KEY = "task-chance"
EXACT_MATCH_KEY = "task-exact-match"
COUNT_KEYS = (QUESTIONS_KEY, CORRECT_KEY, CHANCE_SUM_KEY, EXACT_KEY, SHORT_ANSWERS_KEY)
"""What a site's evaluate reply carries per task, as ``<key>/<task>``: counts only."""


def reply_metrics(scores: Iterable[TaskScore]) -> dict[str, int | float]:
    """The evaluate-reply metrics of a site's task scores: ``task-correct/<task>``..."""
    out: dict[str, int | float] = {}
    for score in scores:
        out[f"{QUESTIONS_KEY}/{score.name}"] = score.questions
        out[f"{CORRECT_KEY}/{score.name}"] = score.correct
        out[f"{CHANCE_SUM_KEY}/{score.name}"] = score.chance_sum
        if score.exact is not None:
            out[f"{EXACT_KEY}/{score.name}"] = score.exact
            out[f"{SHORT_ANSWERS_KEY}/{score.name}"] = score.short_answers
    return out


def _count(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= 2**53 else None


def pool_task_metrics(replies: Iterable[Mapping[str, Any]]) -> dict[str, int | float]:
    """Pool the sites' task counts as if every question had been asked at one site.

    Per task: the summed counts, ``task-accuracy/<task>`` = sum of correct / sum of
    questions, ``task-chance/<task>`` = sum of chance sums / sum of questions and, with
    short answers, ``task-exact-match/<task>`` = sum of exact / sum of short answers. A
    site's counts that are not counts (negative, non-finite, more correct than asked)
    are left out, with the site's other tasks kept.
    """
    sums: dict[str, dict[str, float]] = {}
    for metrics in replies:
        for key in metrics:
            prefix, _, name = key.partition("/")
            if prefix != QUESTIONS_KEY or not name:
                continue
            counts = {k: _count(metrics.get(f"{k}/{name}")) for k in COUNT_KEYS}
            questions, correct = counts[QUESTIONS_KEY], counts[CORRECT_KEY]
            chance = counts[CHANCE_SUM_KEY]
            if (
                questions is None
                or correct is None
                or chance is None
                or questions == 0
                or correct > questions
                or chance > questions
            ):
                log.warning("Task %r: a site's counts are not counts; left out: %s", name, counts)
                continue
            pooled = sums.setdefault(name, dict.fromkeys(COUNT_KEYS, 0.0))
            exact, short = counts[EXACT_KEY], counts[SHORT_ANSWERS_KEY]
            for k, v in (
                (QUESTIONS_KEY, questions),
                (CORRECT_KEY, correct),
                (CHANCE_SUM_KEY, chance),
            ):
                pooled[k] += v
            if exact is not None and short is not None and exact <= short:
                pooled[EXACT_KEY] += exact
                pooled[SHORT_ANSWERS_KEY] += short
    out: dict[str, int | float] = {}
    for name, pooled in sorted(sums.items()):
        questions = pooled[QUESTIONS_KEY]
        out[f"{QUESTIONS_KEY}/{name}"] = int(questions)
        out[f"{CORRECT_KEY}/{name}"] = int(pooled[CORRECT_KEY])
        out[f"{ACCURACY_KEY}/{name}"] = pooled[CORRECT_KEY] / questions
        out[f"{CHANCE_KEY}/{name}"] = pooled[CHANCE_SUM_KEY] / questions
        if pooled[SHORT_ANSWERS_KEY] > 0:
            out[f"{EXACT_MATCH_KEY}/{name}"] = pooled[EXACT_KEY] / pooled[SHORT_ANSWERS_KEY]
    return out


def task_names(row: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Tasks with a pooled accuracy in ``row`` (a metrics row, or round 0's metrics)."""
    head = f"{prefix}{ACCURACY_KEY}/"
    return sorted(k[len(head) :] for k in row if k.startswith(head))


def task_summary(
    initial: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], prefix: str = "eval/"
) -> dict[str, Any]:
    """summary.json's ``task-accuracy``: per task, its accuracy by round and chance level.

    ``initial`` is round 0's pooled metrics (unprefixed keys), ``rows`` the metrics rows
    (keys under ``prefix``). ``accuracy-by-round`` starts at round 0; a round that was not
    evaluated is null. ``rises`` says whether the last evaluated accuracy is above round
    0's (or, without round 0, the first evaluated round's).
    """
    names = sorted(set(task_names(initial)).union(*(task_names(r, prefix) for r in rows)))
    out: dict[str, Any] = {}
    for name in names:
        by_round: list[float | None] = [initial.get(f"{ACCURACY_KEY}/{name}")]
        by_round += [r.get(f"{prefix}{ACCURACY_KEY}/{name}") for r in rows]
        chance = next(
            (
                c
                for c in (
                    initial.get(f"{CHANCE_KEY}/{name}"),
                    *(r.get(f"{prefix}{CHANCE_KEY}/{name}") for r in rows),
                )
                if c is not None
            ),
            None,
        )
        measured = [v for v in by_round if v is not None]
        out[name] = {
            "chance": chance,
            "accuracy-by-round": by_round,
            "rises": len(measured) >= 2 and measured[-1] > measured[0],
        }
    return out


def format_task_lines(summary: Mapping[str, Any]) -> list[str]:
    """The report's lines for summary.json's ``task-accuracy`` (empty without tasks)."""
    tasks = summary.get("task-accuracy")
    if not isinstance(tasks, Mapping) or not tasks:
        return []
    lines = ["task accuracy by round, from round 0 (chance level in brackets):"]
    for name, entry in tasks.items():
        values = entry.get("accuracy-by-round", [])
        shown = " -> ".join(f"{v:.3f}" if isinstance(v, int | float) else "-" for v in values)
        chance = entry.get("chance")
        chance_text = f"{chance:.3f}" if isinstance(chance, int | float) else "?"
        lines.append(f"  {name:<12} {shown}  (chance {chance_text})")
    return lines


# --------------------------------------------------------------------------------------
# A site's tasks
# --------------------------------------------------------------------------------------

TASK_FILE_NODE_KEY = "task-file"
"""node-config key naming a site's own task file(s), comma-separated."""


def site_task_files(cfg: Any, site: Any, node_config: Mapping[str, Any]) -> list[Path]:
    """The task files a site evaluates: node-config ``task-file``, else ``eval.task-file``,
    else, on the embedded data, the bundled task of the domain its partition holds most.

    ``cfg`` is a :class:`~flower_llm.config.RunConfig`, ``site`` a
    :class:`~flower_llm.client.SiteIdentity`. Empty when the site has no task.
    """
    from flower_llm.config import EMBEDDED, ConfigError

    own = node_config.get(TASK_FILE_NODE_KEY)
    if own is not None:
        if not isinstance(own, str):
            raise ConfigError(f"node-config '{TASK_FILE_NODE_KEY}' must be a string, got {own!r}")
        return [Path(f.strip()).expanduser() for f in own.split(",") if f.strip()]
    if cfg.eval.task_files:
        return [Path(f).expanduser() for f in cfg.eval.task_files]
    if site.data_path is None and cfg.data.source == EMBEDDED:
        domain = _partition_domain(cfg.data, site.partition_id, site.num_partitions, cfg.seed)
        return [bundled_task_file(domain)]
    return []


@functools.cache
def _partition_domain(data_cfg: Any, partition_id: int, num_partitions: int, seed: int) -> str:
    """The most frequent ``domain`` of a simulated site's share of the embedded data."""
    from collections import Counter

    from flower_llm.data import load_records, partition

    records = partition(load_records(data_cfg), data_cfg, partition_id, num_partitions, seed)
    # Ties go to the first domain in sorted order: every process picks the same.
    counts = Counter(records["domain"])
    return min(counts, key=lambda domain: (-counts[domain], domain))


@functools.cache
def _cached_task(path: Path, mtime_ns: int) -> Task:
    return load_task(path)


def cached_task(path: str | Path) -> Task:
    """:func:`load_task`, parsed once per process while the file is unchanged."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TaskFileError(f"task file {file} not found")
    return _cached_task(file.resolve(), file.stat().st_mtime_ns)


def site_tasks(
    cfg: Any, site: Any, node_config: Mapping[str, Any], instruction: Mapping[str, Any]
) -> list[Task]:
    """The tasks an evaluate instruction asks this site to answer, read and checked.

    None unless ``eval.tasks`` is on and the instruction asks (``eval-tasks = true``, which
    this project's server sends; a stock Flower strategy, whose evaluation needs the same
    metric keys from every site, asks nothing); then :func:`site_task_files`, parsed once
    per process. Two files of the same
    name are refused: their counts would pool as one task.
    """
    if not wants_tasks(cfg, instruction):
        return []
    loaded = [cached_task(f) for f in site_task_files(cfg, site, node_config)]
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):
        raise TaskFileError(f"two task files share a name (the file name): {names}")
    return loaded


def site_task_scores(
    model: Any, tokenizer: Any, cfg: Any, site_tasks: Sequence[Task], batch_size: int = 64
) -> list[TaskScore]:
    """Score ``model`` (its adapter loaded) on a site's tasks: multiple choice by option
    log-likelihood, sequences cut to ``data.max-seq-length``."""
    return [
        score_task(
            model,
            tokenizer,
            task,
            cfg.data,
            batch_size=batch_size,
            max_len=cfg.data.max_seq_length,
        )
        for task in site_tasks
    ]


def wants_tasks(cfg: Any, instruction: Mapping[str, Any]) -> bool:
    """Whether an evaluate instruction asks for task questions (eval.tasks, the config)."""
    from flower_llm import wire

    return bool(cfg.eval.tasks) and bool(instruction.get(wire.EVAL_TASKS, False))
