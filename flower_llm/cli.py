"""``flower-llm``: reports, generation, merging, evaluation and memory plans for runs.

Sub-commands (``flower-llm COMMAND --help`` for every option)::

    flower-llm report RUN_DIR
    flower-llm generate --run RUN_DIR [--adapter final|round-003] --prompt TEXT
    flower-llm merge --run RUN_DIR --out DIR
    flower-llm evaluate --data FILE_OR_embedded (--run RUN_DIR | --model NAME_OR_PATH)
    flower-llm evaluate --task FILE (--adapter RUN_DIR/final | --run RUN_DIR | --model NAME)
    flower-llm evaluate --lm-eval TASKS (--adapter RUN_DIR/final | --run RUN_DIR | ...)
    flower-llm plan --model NAME_OR_CONFIG --gpu-mem 8GiB
    flower-llm check-config [--app DIR] [--run-config 'k=v ...'] [--federation-config ...]
    flower-llm export --run RUN_DIR [--adapter final] --out DIR

Exit codes: 0 success; 1 ``plan`` says the client does not fit; 2 bad arguments (a
one-line message on stderr, no traceback). Results go to stdout, progress to stderr.

Heavy libraries (torch, transformers, peft, matplotlib) are imported inside the commands
that use them, so a mistyped command fails at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_llm.config import (
    COMPUTE_DTYPES,
    EMBEDDED,
    QUANTIZATIONS,
    SECTIONS,
    ConfigError,
    ModelConfig,
    RunConfig,
    app_config,
    check_federation_size,
    check_run_config,
    parse_overrides,
)
from flower_llm.plan import MemoryPlan, PlanSettings, format_bytes, parse_memory
from flower_llm.tasks import exact_match, greedy_completion, prompt_ids

log = logging.getLogger("flower_llm.cli")

PROG = "flower-llm"
ADAPTER_CONFIG = "adapter_config.json"  # peft's file name, as flower_llm.adapters writes it


class UsageError(Exception):
    """Bad arguments: reported on one line, exit code 2."""


# --------------------------------------------------------------------------------------
# Where a model comes from: a run's adapter, or a base model by name
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A base model, an optional adapter, and the settings to load and prompt them."""

    base: str
    """Hub id or local directory of the base model."""
    adapter: Path | None
    cfg: RunConfig
    """The run's settings (quantization, prompt format), or defaults without a run."""


def load_run_config(run_dir: Path) -> RunConfig:
    """The :class:`RunConfig` a run recorded in ``config.json`` (defaults if it has none).

    Keys this version does not know (a newer run) are ignored; a value that is invalid
    now raises :class:`UsageError`.
    """
    file = run_dir / "config.json"
    if not file.is_file():
        log.warning("%s has no config.json: using default settings", run_dir)
        return RunConfig()
    try:
        recorded = json.loads(file.read_text())
        sections: dict[str, Any] = {}
        for name, section in SECTIONS:
            known = {f.name for f in dataclasses.fields(section)}
            values = recorded.get(name, {})
            sections[name] = section(**{k: v for k, v in values.items() if k in known})
        top = {k: recorded[k] for k in ("seed",) if k in recorded}
        return RunConfig(**sections, **top)
    except (json.JSONDecodeError, ConfigError, TypeError, AttributeError) as error:
        raise UsageError(f"cannot read the settings in {file}: {error}") from None


def adapter_dirs(run_dir: Path) -> list[str]:
    """Names of the adapters a run saved: ``round-001``, ..., ``final``."""
    return sorted(
        p.name for p in run_dir.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file()
    )


def find_adapter(run_dir: Path, name: str | None) -> Path:
    """The adapter directory ``name`` of a run; by default ``final``, else the last round.

    ``name`` may also be the path of any PEFT adapter directory.
    """
    available = adapter_dirs(run_dir)
    if name is None:
        if not available:
            raise UsageError(f"run directory {run_dir} has no adapter (no final/ or round-NNN/)")
        chosen = "final" if "final" in available else available[-1]
        if chosen != "final":
            log.info("No final adapter yet in %s: using %s", run_dir, chosen)
        return run_dir / chosen
    if name in available:
        return run_dir / name
    if (Path(name) / ADAPTER_CONFIG).is_file():
        return Path(name)
    listed = ", ".join(available) or "none"
    raise UsageError(f"no adapter {name!r} in {run_dir} (available: {listed})")


def _base_from_adapter(adapter: Path, cfg: RunConfig) -> str:
    """The base model an adapter was trained on, as its ``adapter_config.json`` names it."""
    try:
        recorded = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{adapter / ADAPTER_CONFIG} is not valid JSON: {error}") from None
    base = recorded.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{adapter / ADAPTER_CONFIG} names no base model: pass --base")
    if base == EMBEDDED:  # adapters name the embedded model portably (adapters.py)
        return EMBEDDED
    if not Path(base).exists() and base.startswith(("/", ".", "~")):
        if cfg.model.name == EMBEDDED:
            # The embedded model lives in a cache; rebuild it where this machine keeps it.
            return EMBEDDED
        raise UsageError(f"base model {base} (named in {adapter / ADAPTER_CONFIG}) not found")
    return str(base)


def resolve_source(args: argparse.Namespace) -> ModelSource:
    """Turn ``--run/--model/--adapter/--base/--quantization`` into a :class:`ModelSource`."""
    adapter: Path | None
    if args.run is None and args.model is None:
        # `evaluate --adapter RUN_DIR/final`: the run's settings when the adapter sits in
        # a run directory, and the base model its adapter_config.json names.
        if args.adapter is None:
            raise UsageError("name a model: --run RUN_DIR, --model NAME_OR_PATH or --adapter DIR")
        adapter = Path(args.adapter)
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise UsageError(f"{adapter} is not an adapter directory (no {ADAPTER_CONFIG})")
        in_run = (adapter.parent / "config.json").is_file()
        cfg = load_run_config(adapter.parent) if in_run else RunConfig()
        base = args.base or _base_from_adapter(adapter, cfg)
    elif args.run is not None:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise UsageError(f"run directory {run_dir} does not exist")
        cfg = load_run_config(run_dir)
        run_adapter = find_adapter(run_dir, args.adapter)
        base = args.base or _base_from_adapter(run_adapter, cfg)
        adapter = run_adapter
    else:
        cfg = RunConfig(model=ModelConfig(name=args.model))
        adapter = None
        if args.adapter is not None:
            adapter = Path(args.adapter)
            if not (adapter / ADAPTER_CONFIG).is_file():
                raise UsageError(f"{adapter} is not an adapter directory (no {ADAPTER_CONFIG})")
        base = args.base or args.model
    if base != EMBEDDED and base.startswith(("/", ".", "~")) and not Path(base).exists():
        raise UsageError(f"base model {base} not found")
    overrides: dict[str, Any] = {"name": base, "gradient_checkpointing": False}
    if getattr(args, "quantization", None):
        overrides["quantization"] = args.quantization
    model_cfg = dataclasses.replace(cfg.model, **overrides)
    return ModelSource(base, adapter, dataclasses.replace(cfg, model=model_cfg))


def _quiet_libraries() -> None:
    """Progress bars of transformers/datasets would drown ours on stderr."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _device(name: str | None) -> Any:
    import torch

    from flower_llm.models import default_device

    return torch.device(name) if name else default_device()


def load_for_inference(source: ModelSource, device: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the base as the run loaded it, with the adapter applied."""
    from peft import PeftModel

    from flower_llm.models import describe, load_base_model

    _quiet_libraries()
    try:
        base = load_base_model(source.cfg.model, device)
    except OSError as error:  # transformers' way of saying "no such model"
        raise UsageError(f"cannot load model {source.base!r}: {_first_line(error)}") from None
    log.info("Loaded %s", describe(base))
    model = base.model
    if source.adapter is not None:
        with warnings.catch_warnings():
            # peft 0.21 asks transformers 5 a deprecated question; the answer is still right.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            model = PeftModel.from_pretrained(model, source.adapter)
        log.info("Applied adapter %s", source.adapter)
    model.eval()
    return model, base.tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------
# Prompting and greedy generation
# --------------------------------------------------------------------------------------


# prompt_ids, greedy_completion and exact_match live in flower_llm.tasks (imported above),
# shared with task evaluation: one prompt encoding for training, generation and scoring.


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    """Print the per-round table and rewrite report.md, the plot and TensorBoard files."""
    from flower_llm.report import format_table, read_run, task_lines, write_report_files

    try:
        records = read_run(args.run_dir)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    print("\n".join([format_table(records.rows), *task_lines(records)]))
    summary_file = Path(args.run_dir) / "summary.json"
    if summary_file.is_file():
        from flower_llm.personal import format_table as per_site_lines

        per_site = json.loads(summary_file.read_text()).get("per-site")
        if isinstance(per_site, dict):
            print("\n".join(per_site_lines(per_site)))
    try:
        write_report_files(records, wandb_project=args.wandb_project)
    except ImportError as error:  # matplotlib and tensorboard are the `report` extra
        raise UsageError(
            f"{error.name or error} is not installed: pip install 'flower-llm[report]'"
        ) from None
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the greedy completion of one prompt."""
    source = resolve_source(args)
    model, tokenizer = load_for_inference(source, _device(args.device))
    ids = prompt_ids(args.prompt, tokenizer, source.cfg.data)
    print(greedy_completion(model, tokenizer, ids, args.max_new_tokens))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its full-precision base and save a plain HF model directory."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output directory {out} exists and is not empty")
    source = resolve_source(args)
    if source.adapter is None:
        raise UsageError("merge needs an adapter: --run RUN_DIR or --model NAME --adapter DIR")
    dtype = args.dtype or source.cfg.model.compute_dtype
    # Full precision on purpose: merging into 4-bit weights would re-quantize the sum.
    full = dataclasses.replace(source.cfg.model, quantization="none", compute_dtype=dtype)
    model, _ = load_for_inference(
        dataclasses.replace(source, cfg=dataclasses.replace(source.cfg, model=full)),
        _device(args.device),
    )
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # the training loader turned it off; users generate

    from transformers import AutoTokenizer

    from flower_llm.models import resolve_model_path

    # Written next to the target and renamed: a crash never leaves half a model at `out`.
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    # A fresh tokenizer: the loader may have given it a pad token the base never had.
    AutoTokenizer.from_pretrained(resolve_model_path(full)).save_pretrained(staging)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    log.info("Merged %s into %s (%s): %s", source.adapter, source.base, dtype, out)
    print(out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Held-out loss, perplexity, token accuracy and exact match on a dataset."""
    if args.task:
        return evaluate_tasks(args)
    if args.lm_eval:
        return evaluate_lm_eval(args)
    from flower_llm.data import load_records, make_dataloader, tokenize_dataset
    from flower_llm.train import evaluate

    source = resolve_source(args)
    columns = {
        k: v
        for k, v in (
            ("instruction_column", args.instruction_column),
            ("response_column", args.response_column),
        )
        if v
    }
    try:
        data_cfg = dataclasses.replace(source.cfg.data, source=args.data, **columns)
        _quiet_libraries()
        records = load_records(data_cfg)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    if args.limit is not None and args.limit < len(records):
        # A seeded sample: the first rows of a file are often all of one kind.
        records = records.shuffle(seed=args.seed).select(range(args.limit))

    model, tokenizer = load_for_inference(source, _device(args.device))
    examples = tokenize_dataset(records, tokenizer, data_cfg)
    dropped = examples.num_dropped
    if not examples:
        raise UsageError(f"no example of {args.data} keeps a response token after truncation")
    log.info("Evaluating on %d examples (%d dropped by truncation)", len(examples), dropped)
    loader = make_dataloader(examples, args.batch_size, shuffle=False, seed=0)
    stats = evaluate(model, loader)
    result: dict[str, Any] = {
        "examples": stats.examples,
        "dropped": dropped,
        "tokens": stats.tokens,
        "loss": stats.loss,
        "perplexity": stats.perplexity,
        "token-accuracy": stats.token_accuracy,
    }
    if args.exact_match:
        pairs = [
            (str(r[data_cfg.instruction_column]), str(r[data_cfg.response_column]).strip())
            for r in records
            if r[data_cfg.instruction_column] is not None
            and r[data_cfg.response_column] is not None
        ]
        matches = 0
        for index, (instruction, reference) in enumerate(pairs, 1):
            # Enough tokens to reproduce the reference and a little more: an answer that
            # runs on past it is no exact match anyway.
            budget = args.max_new_tokens or (
                len(tokenizer(reference, add_special_tokens=False)["input_ids"]) + 8
            )
            ids = prompt_ids(instruction, tokenizer, data_cfg)
            generated = greedy_completion(model, tokenizer, ids, budget)
            matches += exact_match(generated, reference, tokenizer)
            if index % 25 == 0 or index == len(pairs):
                log.info("Exact match: %d/%d generated, %d match", index, len(pairs), matches)
        result["exact-match"] = matches / len(pairs)
        result["exact-match-count"] = matches
        result["exact-match-total"] = len(pairs)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_format_evaluation(result))
    return 0


def _task_path(name: str) -> Path:
    """A task file, or the bundled task of an embedded domain (``medical``...)."""
    from flower_llm.embedded import DOMAINS
    from flower_llm.tasks import bundled_task_file

    if name in DOMAINS and not Path(name).exists():
        return bundled_task_file(name)
    return Path(name)


def evaluate_tasks(args: argparse.Namespace) -> int:
    """Accuracy of a model (and adapter) on task files, each next to its chance level."""
    from flower_llm.tasks import TaskFileError, load_task, score_task

    source = resolve_source(args)
    try:  # every file is checked before the model loads
        loaded = [load_task(_task_path(name)) for name in args.task]
    except TaskFileError as error:
        raise UsageError(str(error)) from None
    model, tokenizer = load_for_inference(source, _device(args.device))
    results = []
    for task in loaded:
        log.info("Task %s: %d questions (%s)", task.name, len(task.items), task.path)
        score = score_task(
            model,
            tokenizer,
            task,
            source.cfg.data,
            scoring=args.scoring,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        results.append({**score.as_dict(), "file": str(task.path), "scoring": args.scoring})
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        print("\n".join(_format_task_result(r) for r in results))
    return 0


def evaluate_lm_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness on the model (and adapter), loaded as every command loads it."""
    import tempfile

    from flower_llm.lm_eval_tasks import run_lm_eval, write_lm_eval_task
    from flower_llm.tasks import TaskFileError, load_task

    source = resolve_source(args)
    names = [n.strip() for n in args.lm_eval.split(",") if n.strip()]
    if not names:
        raise UsageError("--lm-eval names no task")
    with tempfile.TemporaryDirectory(prefix="flower-llm-lm-eval-") as generated:
        tasks, chance = [], {}
        try:  # a task file (or bundled domain) becomes a local lm-eval task
            for name in names:
                path = _task_path(name)
                if path.suffix == ".jsonl" or path.is_file():
                    tasks.append(write_lm_eval_task(path, generated, source.cfg.data))
                    chance[tasks[-1]] = load_task(path).chance
                else:
                    tasks.append(name)
        except TaskFileError as error:
            raise UsageError(str(error)) from None
        model, tokenizer = load_for_inference(source, _device(args.device))
        try:
            results = run_lm_eval(
                model,
                tokenizer,
                tasks,
                include_dirs=[generated, *(args.lm_eval_include or [])],
                batch_size=args.batch_size,
                limit=args.limit,
            )
        except ImportError as error:
            raise UsageError(str(error)) from None
    for task, values in results.items():
        if task in chance:
            values["chance"] = chance[task]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for task, values in results.items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(f"{task}: {shown}")
    return 0


def _format_task_result(result: dict[str, Any]) -> str:
    lines = [
        f"task          {result['task']} ({result['questions']} questions, {result['file']})",
        f"accuracy      {result['accuracy']:.3f} ({result['correct']}/{result['questions']}; "
        f"chance {result['chance']:.3f}; scoring {result['scoring']})",
    ]
    if "accuracy-norm" in result:
        lines.append(f"accuracy-norm {result['accuracy-norm']:.3f} (log-likelihood per character)")
    if "exact-match" in result:
        lines.append(
            f"exact match   {result['exact-match']:.3f} of {result['short-answers']} short answers"
        )
    return "\n".join(lines)


def _format_evaluation(result: dict[str, Any]) -> str:
    lines = [
        f"examples     {result['examples']} ({result['dropped']} dropped by truncation)",
        f"loss         {result['loss']:.4f}",
        f"perplexity   {result['perplexity']:.4g}",
        f"token acc    {result['token-accuracy']:.3f}",
    ]
    if "exact-match" in result:
        lines.append(
            f"exact match  {result['exact-match']:.3f} "
            f"({result['exact-match-count']}/{result['exact-match-total']})"
        )
    return "\n".join(lines)


PLAN_FLAG_KEYS = {
    "model": "model.name",
    "seq-len": "data.max-seq-length",
    "batch-size": "train.batch-size",
    "lora-r": "lora.r",
    "target-modules": "lora.target-modules",
    "quantization": "model.quantization",
    "double-quant": "model.double-quant",
    "compute-dtype": "model.compute-dtype",
    "gradient-checkpointing": "model.gradient-checkpointing",
    "fp32-stream": "model.fp32-stream",
}
"""The run-config key each of ``plan``'s flags stands for."""


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory breakdown; exit 1 when it does not fit ``--gpu-mem``."""
    from flower_llm.plan import estimate_memory, load_model_config, run_plan_settings

    flags = {flag: getattr(args, flag.replace("-", "_")) for flag in PLAN_FLAG_KEYS}
    try:
        if args.run_config is not None:
            given = [flag for flag, value in flags.items() if value is not None]
            if given:
                raise UsageError(
                    "--run-config plans the run's own settings; set "
                    + ", ".join(f"{PLAN_FLAG_KEYS[f]} (not --{f})" for f in given)
                    + " in it"
                )
            texts = [text for text in args.run_config if text.strip()]
            overrides = parse_overrides(texts) if texts else {}
            cfg = check_run_config(overrides, app_config(args.app))
            model = cfg.model.name
            settings = run_plan_settings(cfg)
        else:
            if flags["model"] is None:
                raise UsageError("name the model: --model NAME_OR_CONFIG, or use --run-config")
            model = flags.pop("model")
            settings = PlanSettings(
                **{flag.replace("-", "_"): v for flag, v in flags.items() if v is not None}
            )
        config = load_model_config(model)
        plan = estimate_memory(config, settings, gpu_bytes=args.gpu_mem, model=model)
    except (ValueError, ConfigError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    print(format_plan(plan, run_config=args.run_config is not None))
    return 1 if plan.fits is False else 0


EXPORT_README = """# {name}

A LoRA adapter trained with flower-llm, with the base model it was trained on.

- `base/`: the base model ({base}), full precision, with its tokenizer
- `adapter/`: the LoRA adapter (PEFT format)

Load it with peft alone, from this directory:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("base")
model = PeftModel.from_pretrained(base, "adapter")
tokenizer = AutoTokenizer.from_pretrained("base")
```

or with flower-llm: `flower-llm generate --model base --adapter adapter --prompt "..."`.
"""


def _base_model_dir(base: str) -> Path:
    """The local directory holding base model ``base`` (a hub id from the local cache)."""
    from flower_llm.models import resolve_model_path

    resolved = Path(resolve_model_path(ModelConfig(name=base)))
    if resolved.is_dir():
        return resolved
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception as error:  # not in the local hub cache, offline, unknown id
        raise UsageError(
            f"base model {base!r} is neither a directory nor in the local hub cache: {error}"
        ) from None


def cmd_export(args: argparse.Namespace) -> int:
    """Write a self-contained directory: the base model and the adapter, loadable anywhere."""
    source = resolve_source(args)
    if source.adapter is None:
        raise UsageError("export needs an adapter: --run RUN_DIR or --model NAME --adapter DIR")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty: choose a new directory")
    base_dir = _base_model_dir(source.base)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base_dir, staging / "base", ignore=shutil.ignore_patterns(".*"))
    shutil.copytree(source.adapter, staging / "adapter", ignore=shutil.ignore_patterns(".*"))
    (staging / "README.md").write_text(EXPORT_README.format(name=out.name, base=source.base))
    if out.exists():
        out.rmdir()
    staging.rename(out)
    log.info("Exported %s with base %s: %s", source.adapter, source.base, out)
    print(out)
    return 0


def cmd_export_personal(args: argparse.Namespace) -> int:
    """Write this site's personal adapter (kept in its site-state store) in PEFT format."""
    from flower_llm.personal import export_personal

    try:
        out = export_personal(args.site_state_dir, args.run, args.site, args.out)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise UsageError(str(error)) from None
    print(out)
    return 0


def _check_local_data(cfg: RunConfig, num_nodes: int | None) -> None:
    """A simulation's data.source, checked here as each simulated site will check it.

    Only the embedded data and local files: a hub dataset is the sites' business (and may
    need the network), and a deployment's sites name their own files.
    """
    source = cfg.data.source
    if source != EMBEDDED and not Path(source).expanduser().exists():
        from flower_llm.data import _looks_like_local_path

        if not _looks_like_local_path(source):
            return
    from flower_llm.data import check_site_data
    from flower_llm.logs import filter_known_warnings

    filter_known_warnings()  # no progress bar per simulated site
    sites = num_nodes or 1
    for site in range(sites):
        check_site_data(cfg.data, None, site, sites, cfg.seed)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate ``flwr run`` overrides before anything is submitted."""
    try:
        defaults = app_config(args.app)
        overrides = parse_overrides(args.run_config) if args.run_config else {}
        cfg = check_run_config(overrides, defaults)
        from flower_llm.preflight import check_model_reachable

        check_model_reachable(cfg.model)
        federation = parse_overrides(args.federation_config) if args.federation_config else {}
        num_nodes = federation.get("num-supernodes")
        if num_nodes is not None:
            if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
                raise ConfigError(
                    f"--federation-config num-supernodes = {num_nodes!r}: must be an integer >= 1"
                )
            check_federation_size(cfg.fed, num_nodes, "--federation-config num-supernodes")
        _check_local_data(cfg, num_nodes)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    log.info(
        "run-config OK: %d override(s) of %s", len(overrides), Path(args.app) / "pyproject.toml"
    )
    return 0


def _count(number: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= size:
            return f"{number / size:.2f} {unit}"
    return str(number)


def format_plan(plan: MemoryPlan, *, run_config: bool = False) -> str:
    """The breakdown ``plan`` prints (``run_config``: hints name run-config keys, not flags)."""
    s, shape = plan.settings, plan.shape
    quant = s.quantization + (" + double quant" if s.double_quant and "4" in s.quantization else "")
    other_dtype = "fp32" if s.other_weight_bytes == 4 else s.compute_dtype
    checkpointing = "on" if s.gradient_checkpointing else "off"
    layer_kib = plan.layer_activation_bytes / 1024
    rows = [
        (
            "quantized linear weights" if s.quantization != "none" else "linear weights",
            f"{_count(plan.quantized_parameters)} params",
            plan.quantized_weight_bytes,
            quant,
        ),
        (
            "other weights",
            f"{_count(plan.other_parameters)} params",
            plan.other_weight_bytes,
            f"embeddings, lm_head, norms in {other_dtype}",
        ),
        (
            "LoRA weights/grads/AdamW",
            f"{_count(plan.lora_parameters)} params",
            plan.lora_bytes,
            "16 B/param, fp32",
        ),
        (
            "activations",
            f"{s.tokens} tokens",
            plan.activation_bytes,
            f"{layer_kib:.0f} KiB/token/layer x {shape.num_layers} layers, "
            f"checkpointing {checkpointing}",
        ),
        (
            "attention scores",
            "",
            plan.attention_score_bytes,
            f"fp32 B x heads x T x T, {1 if s.gradient_checkpointing else shape.num_layers} "
            "layer(s): CUDA SDPA math kernel",
        )
        if plan.attention_score_bytes
        else None,
        ("logits and loss", "", plan.logits_bytes, f"vocab {shape.vocab_size}"),
        ("CUDA context", "", plan.cuda_context_bytes, ""),
    ]
    lines = [
        f"Memory plan for {plan.model} ({shape.model_type}, "
        f"{_count(plan.num_parameters)} parameters): batch {s.batch_size} x {s.seq_len} "
        f"tokens, LoRA r={s.lora_r} on {s.target_modules}, compute {s.compute_dtype}",
    ]
    lines += [
        f"  {name:<26}{count:>16}  {format_bytes(size):>11}  {note}".rstrip()
        for name, count, size, note in (row for row in rows if row is not None)
    ]
    lines.append(f"  {'total':<26}{'':>16}  {format_bytes(plan.total_bytes):>11}")
    if plan.gpu_bytes is not None:
        spare = plan.gpu_bytes - plan.total_bytes
        if plan.fits:
            verdict = f"fits in {format_bytes(plan.gpu_bytes)} ({format_bytes(spare)} to spare)"
        else:
            verdict = (
                f"does not fit in {format_bytes(plan.gpu_bytes)} (short by {format_bytes(-spare)})"
            )
            hints = [
                (f"{PLAN_FLAG_KEYS[key]} = {value}" if run_config else flag)
                for key, value, flag, applies in (
                    (
                        "gradient-checkpointing",
                        "true",
                        "--gradient-checkpointing",
                        not s.gradient_checkpointing,
                    ),
                    (
                        "fp32-stream",
                        "false",
                        "--no-fp32-stream",
                        s.quantization != "none" and s.fp32_stream,
                    ),
                )
                if applies
            ]
            if hints:
                verdict += f"; try {' and '.join(hints)}"
        lines.append(verdict)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


def _memory(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_source(
    parser: argparse.ArgumentParser, *, quantization: bool = True, adapter_alone: bool = False
) -> None:
    # adapter_alone: --adapter DIR may stand alone (its base from adapter_config.json).
    group = parser.add_mutually_exclusive_group(required=not adapter_alone)
    group.add_argument("--run", metavar="RUN_DIR", help="a run directory written by the server")
    group.add_argument(
        "--model", metavar="NAME_OR_PATH", help="a base model (hub id, directory or embedded)"
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME_OR_DIR",
        help="with --run: final (default; else the last round) or round-003; "
        "with --model: an adapter directory (default: none)"
        + ("; alone: a PEFT adapter directory such as RUN_DIR/final" if adapter_alone else ""),
    )
    parser.add_argument(
        "--base", metavar="NAME_OR_PATH", help="override the base model the adapter names"
    )
    if quantization:
        parser.add_argument(
            "--quantization",
            choices=QUANTIZATIONS,
            help="override how the base is loaded (default: as the run did, else nf4)",
        )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")


def cmd_site_worker(args: argparse.Namespace) -> int:
    """Serve this site's ClientApp jobs from a long-lived process (flower_llm.worker)."""
    import os
    import signal

    from flower_llm.logs import setup_logging
    from flower_llm.worker import SiteWorker, WorkerError, ping

    # The jobs log through the apps' handler (setup_logging); one handler, not two.
    project_logger = logging.getLogger("flower_llm")
    for handler in list(project_logger.handlers):
        if isinstance(handler, _StderrHandler):
            project_logger.removeHandler(handler)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)

    if args.status:
        try:
            print(json.dumps(ping(args.socket, connect_timeout=5.0)))
        except WorkerError as error:
            print(f"{PROG} site-worker: {error}", file=sys.stderr)
            return 1
        return 0
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.base_cache:
        from flower_llm.models import BASE_CACHE_ENV

        os.environ[BASE_CACHE_ENV] = args.base_cache
    try:
        worker = SiteWorker(
            args.socket,
            max_job_bytes=args.max_job_mib * 2**20,
            busy_timeout=args.busy_timeout,
            app=args.app,
        )
        worker.bind()
    except (ValueError, PermissionError, RuntimeError) as error:
        raise UsageError(str(error)) from error

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        worker.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        log.info("Site worker %d stopped", os.getpid())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``flower-llm`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Reports, inference and memory plans for flower-llm runs."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, parents=[common])

    report = command("report", "per-round table, plot and TensorBoard files")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument(
        "--wandb-project", help="also log to this W&B project (needs wandb installed)"
    )
    report.set_defaults(handler=cmd_report)

    generate = command("generate", "greedy completion of one prompt")
    _add_source(generate)
    generate.add_argument("--prompt", required=True, help="the instruction to answer")
    generate.add_argument("--max-new-tokens", type=_positive, default=64)
    generate.set_defaults(handler=cmd_generate)

    merge = command("merge", "merge an adapter into its full-precision base")
    _add_source(merge, quantization=False)
    merge.add_argument("--out", required=True, metavar="DIR", help="new model directory")
    merge.add_argument(
        "--dtype", choices=COMPUTE_DTYPES, help="dtype of the merged weights (default: the run's)"
    )
    merge.set_defaults(handler=cmd_merge)

    evaluate = command(
        "evaluate", "loss, perplexity, token accuracy and exact match; or task accuracy"
    )
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data", metavar="FILE", help=".json/.jsonl/.csv/.parquet, or embedded: loss and more"
    )
    what.add_argument(
        "--task",
        action="append",
        metavar="FILE",
        help="a JSONL task file (flower_llm.tasks), or medical|finance|smart-home for a bundled "
        "one: accuracy against chance; repeat for several",
    )
    what.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="comma-separated lm-evaluation-harness tasks (pip install 'flower-llm[eval]'): "
        "lm-eval's own names (they download their data), or task files / bundled domains, "
        "run as local lm-eval tasks",
    )
    _add_source(evaluate, adapter_alone=True)
    evaluate.add_argument(
        "--lm-eval-include",
        action="append",
        metavar="DIR",
        help="--lm-eval: a directory of your own lm-eval YAML tasks",
    )
    evaluate.add_argument(
        "--scoring",
        choices=("loglik", "generate"),
        default="loglik",
        help="--task: multiple choice by option log-likelihood (default) or greedy generation",
    )
    evaluate.add_argument("--limit", type=_positive, help="evaluate a seeded sample of N rows")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    evaluate.add_argument("--batch-size", type=_positive, default=8)
    evaluate.add_argument(
        "--max-new-tokens",
        type=_positive,
        help="generation budget for exact match (default: reference length + 8)",
    )
    evaluate.add_argument(
        "--exact-match",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate greedily and compare with the reference (slow on big models)",
    )
    evaluate.add_argument("--instruction-column", help="default: the run's, else instruction")
    evaluate.add_argument("--response-column", help="default: the run's, else response")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(handler=cmd_evaluate)

    plan = command("plan", "estimate the GPU memory of one QLoRA client")
    plan.add_argument("--model", metavar="NAME_OR_CONFIG", help="hub id, directory, config.json")
    plan.add_argument("--gpu-mem", type=_memory, metavar="SIZE", help="e.g. 8GiB, 24GB")
    plan.add_argument(
        "--run-config",
        action="append",
        metavar="OVERRIDES",
        help="plan the run's own settings: the app's run config with these overrides, as "
        "given to `flwr run` ('' for none); replaces --model and the settings below",
    )
    plan.add_argument(
        "--app",
        default=os.environ.get("FLOWER_LLM_CHECKOUT", "."),
        help="with --run-config: the Flower app directory (as check-config)",
    )
    defaults = PlanSettings()  # a 7-8B model's usual QLoRA
    for flag in (f for f in PLAN_FLAG_KEYS if f != "model"):
        option, default = f"--{flag}", getattr(defaults, flag.replace("-", "_"))
        if flag in ("double-quant", "fp32-stream"):
            plan.add_argument(
                option,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"default {default}"
                + (
                    "; model.fp32-stream: a quantized base's other weights and activations in fp32"
                    if flag == "fp32-stream"
                    else ""
                ),
            )
        elif flag == "gradient-checkpointing":
            plan.add_argument(option, action="store_true", default=None)
        elif flag in ("quantization", "compute-dtype"):
            choices = QUANTIZATIONS if flag == "quantization" else COMPUTE_DTYPES
            plan.add_argument(option, choices=choices, default=None, help=f"default {default}")
        elif flag == "target-modules":
            plan.add_argument(option, default=None, help=f"default {default}")
        else:
            plan.add_argument(option, type=_positive, default=None, help=f"default {default}")
    plan.set_defaults(handler=cmd_plan)

    export = command("export", "copy an adapter and its base model into one portable directory")
    _add_source(export, quantization=False)
    export.add_argument("--out", required=True, metavar="DIR", help="new directory")
    export.set_defaults(handler=cmd_export)

    personal = command(
        "export-personal",
        "at a site: write its personal adapter (fed.personalization) in PEFT format",
    )
    personal.add_argument(
        "--site-state-dir",
        metavar="DIR",
        help="the SuperNode's node-config site-state-dir (default: the project cache's site-state)",
    )
    personal.add_argument(
        "--run", required=True, metavar="NAME", help="the run's output.run-name (or run-<id>)"
    )
    personal.add_argument(
        "--site",
        metavar="KEY",
        help="the site's directory under the run (needed when the machine holds several)",
    )
    personal.add_argument("--out", required=True, metavar="DIR", help="new directory")
    personal.set_defaults(handler=cmd_export_personal)

    check = command("check-config", "validate `flwr run` overrides before submitting them")
    check.add_argument(
        "--app",
        default=os.environ.get("FLOWER_LLM_CHECKOUT", "."),
        help="the Flower app directory (default: the checkout scripts/flwr-env.sh is from, else .)",
    )
    check.add_argument(
        "--run-config", action="append", metavar="OVERRIDES", help="as given to `flwr run`"
    )
    check.add_argument(
        "--federation-config",
        action="append",
        metavar="OPTIONS",
        help="as given to `flwr run`; num-supernodes is checked against fed.min-*",
    )
    check.set_defaults(handler=cmd_check_config)
    worker = command("site-worker", "keep this site's model warm for its SuperNode's ClientApps")
    worker.add_argument(
        "--socket",
        required=True,
        metavar="PATH",
        help="Unix socket to listen on (its directory is made owner-only); the SuperNode's "
        "node-config worker-socket names the same path",
    )
    worker.add_argument(
        "--base-cache",
        metavar="DIR",
        help="pre-quantized base cache (or off); default as "
        "$FLOWER_LLM_BASE_CACHE, else $FLOWER_LLM_CACHE/quantized-bases",
    )
    worker.add_argument(
        "--status",
        action="store_true",
        help="do not serve: ask the worker at --socket for its status (JSON; exit 1 if none)",
    )
    worker.add_argument(
        "--threads",
        type=_positive,
        help="torch intra-op threads (default: torch's, one per core); give each of several "
        "workers on one machine its share of the cores",
    )
    worker.add_argument(
        "--max-job-mib", type=_positive, default=1024, help="largest job accepted (MiB)"
    )
    worker.add_argument(
        "--app",
        default="client_apps.qlora:app",
        metavar="MODULE:APP",
        help="the ClientApp the worker runs (default: this project's, client_apps.qlora:app)",
    )
    worker.add_argument(
        "--busy-timeout",
        type=float,
        default=30.0,
        help="seconds a job waits for the running one before it is refused as busy",
    )
    worker.set_defaults(handler=cmd_site_worker)
    return parser


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it per test)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _configure_logging(quiet: bool) -> None:
    # bitsandbytes (imported by peft) logs a failed optional-kernel lookup on CPU; its
    # fallback is correct, so keep it off the terminal, as flower_llm.models does.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logger = logging.getLogger("flower_llm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flower-llm``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    _configure_logging(args.quiet)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
