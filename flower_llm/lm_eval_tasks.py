"""lm-evaluation-harness on a run's adapter: the optional ``eval`` extra.

``pip install 'flower-llm[eval]'`` adds ``lm_eval`` (lm-evaluation-harness). Two uses:

- any task lm-eval knows (``mmlu``, ``pubmedqa``...; they download their datasets), or
  YAML tasks of your own in a directory (``include_dir``);
- a flower-llm task file (:mod:`flower_llm.tasks`), turned into an lm-eval task by
  :func:`write_lm_eval_task`: a YAML with ``dataset_path: json`` and the file as local
  ``data_files``, so nothing is downloaded. Its prompt is the run's
  ``data.prompt-template``; the options are scored as continuations (``output_type:
  multiple_choice``, ``target_delimiter: ""``), so its ``acc`` is the accuracy
  :func:`flower_llm.tasks.score_task` reports for the same file and model.

One difference in what is scored, which does not change ``acc``: lm-eval moves the
whitespace that ends a prompt (the template's final newline) to the front of every
option, so each option's log-likelihood gains the same ``log p(newline | prompt)`` term,
and the best option stays the best. ``acc_norm`` divides by the option's length and can
therefore differ from :mod:`flower_llm.tasks`' ``accuracy-norm``.

The model is handed to lm-eval already loaded (``HFLM(pretrained=model)``): the same
4-bit base and PEFT adapter as every other ``flower-llm`` command.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flower_llm.tasks import TaskFileError, load_task, parse_item

TASK_PREFIX = "flower_llm_"
"""lm-eval names of flower-llm task files: ``flower_llm_<task name>``."""


def lm_eval_name(task_name: str) -> str:
    """The lm-eval task (and Python module) name of a flower-llm task."""
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", task_name)


def process_docs_with(dataset: Any, prompt_template: str, source: str) -> Any:
    """Each record as lm-eval's task reads it: ``prompt``, ``choices`` and ``gold``.

    Records are parsed by :func:`flower_llm.tasks.parse_item`, so both evaluators agree on
    what each question, option and answer is.
    """

    def normalize(doc: dict[str, Any], index: int) -> dict[str, Any]:
        record = {k: v for k, v in doc.items() if v is not None}  # absent keys load as None
        item = parse_item(record, f"{source}: record {index + 1}", index + 1)
        if not item.is_multiple_choice:
            raise TaskFileError(
                f"{source}: record {index + 1} has no options; lm-eval runs multiple-choice "
                "questions here (use flower-llm evaluate --task for short answers)"
            )
        return {
            "prompt": prompt_template.format(instruction=item.instruction),
            "choices": list(item.options),
            "gold": item.answer_index,
        }

    return dataset.map(normalize, with_indices=True, remove_columns=dataset.column_names)


_YAML = """\
# Written by flower_llm.lm_eval_tasks from {source}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
process_docs: !function {name}.process_docs
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_MODULE = """\
# Written by flower_llm.lm_eval_tasks: the records of {source} as lm-eval reads them.
from flower_llm.lm_eval_tasks import process_docs_with

PROMPT_TEMPLATE = {template!r}


def process_docs(dataset):
    return process_docs_with(dataset, PROMPT_TEMPLATE, {source!r})
"""


def write_lm_eval_task(task_file: str | Path, out_dir: str | Path, data_cfg: Any) -> str:
    """Write an lm-eval task for a flower-llm task file into ``out_dir``; return its name.

    Writes ``<name>.yaml`` and ``<name>.py`` (its ``process_docs``). The task file is
    checked first (:func:`flower_llm.tasks.load_task`), so a malformed one fails here,
    naming file and line, not inside lm-eval.

    Raises
    ------
    TaskFileError
        The file is malformed, or ``data_cfg`` asks for the chat template (lm-eval's own
        chat templating would differ from training's).
    """
    if data_cfg.use_chat_template:
        raise TaskFileError(
            "--lm-eval on a flower-llm task file uses data.prompt-template; this run uses "
            "the chat template (data.use-chat-template), which is not wired to lm-eval"
        )
    task = load_task(task_file)
    name = lm_eval_name(task.name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = str(task.path.resolve())
    # JSON strings are valid YAML scalars: any path is quoted safely.
    (out / f"{name}.yaml").write_text(
        _YAML.format(source=source, name=name, data_file=json.dumps(source))
    )
    (out / f"{name}.py").write_text(
        _MODULE.format(source=source, template=data_cfg.prompt_template)
    )
    return name


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_dirs: Sequence[str | Path] = (),
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval's ``simple_evaluate`` on an already loaded model.

    Parameters
    ----------
    model, tokenizer
        The base with its adapter applied (``PeftModel``), as loaded for inference.
    tasks : sequence of str
        lm-eval task names.
    include_dirs : sequence of paths
        Directories of YAML tasks to register (those of :func:`write_lm_eval_task`).
    batch_size : int
        lm-eval's batch size.
    limit : int, optional
        Questions per task (lm-eval's ``limit``); default all.

    Returns
    -------
    dict
        Task name -> numeric results as lm-eval reports them (``acc,none``,
        ``acc_stderr,none``...).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install 'flower-llm[eval]'",
            name="lm_eval",
        ) from error

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=[str(d) for d in include_dirs] or None)
    output = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    if output is None:  # lm-eval returns None on non-zero ranks; there is one rank here
        raise RuntimeError("lm-eval returned no results")
    return {
        name: {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        for name, values in output["results"].items()
    }
