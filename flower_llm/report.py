"""Reports of a run directory: a per-round table, a plot, TensorBoard events, W&B.

Everything is derived from the files the server writes (see :mod:`flower_llm.outputs`),
so a report can be made at any time: after the run, or of the rounds finished so far
while it is still going. :func:`write_report` writes, inside the run directory::

    report.md          the per-round table (markdown), the run's settings and summary
    metrics.png        loss, perplexity and (with DP) epsilon over rounds
    tensorboard/       event files: ``tensorboard --logdir <run>/tensorboard``

Weights & Biases gets the same scalars only when it is asked for (``wandb_project`` or
``$FLOWER_LLM_WANDB_PROJECT``) *and* ``wandb`` is installed; it is never required.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flower_llm import metrics as schema
from flower_llm.outputs import (
    CONFIG_FILE,
    FINAL_ADAPTER,
    METRICS_FILE,
    RUN_ID_FILE,
    STATUS_OK,
    SUMMARY_FILE,
)
from flower_llm.plan import format_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
PLOT_FILE = "metrics.png"
TENSORBOARD_DIR = "tensorboard"
WANDB_ENV = "FLOWER_LLM_WANDB_PROJECT"

EPSILON_KEYS = (schema.EPSILON,)
"""Where a run records its client-level privacy budget spent so far."""

Row = dict[str, Any]


# --------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecords:
    """What a run directory holds so far."""

    path: Path
    rows: list[Row]
    """One dict per finished round, sorted by round (the last record of a round wins)."""
    summary: dict[str, Any] | None
    """``summary.json``; None while the run is going (or if it was interrupted)."""
    config: dict[str, Any] | None
    """``config.json``: the run's settings, by section."""

    @property
    def finished(self) -> bool:
        """Whether the server wrote its summary."""
        return self.summary is not None


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        log.warning("Ignoring %s: not valid JSON (%s)", path, error)
        return None
    return payload if isinstance(payload, dict) else None


def read_run(run_dir: str | Path) -> RunRecords:
    """Read ``metrics.jsonl`` (required), ``summary.json`` and ``config.json``.

    A half-written last line (a round being recorded right now) is skipped.

    Raises
    ------
    FileNotFoundError
        ``run_dir`` or its ``metrics.jsonl`` does not exist.
    ValueError
        ``metrics.jsonl`` holds no round, or a line that is not a round's JSON object.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} not found: {path} is not a run directory, or no round has finished yet"
        )
    lines = [
        (n, line) for n, line in enumerate(metrics.read_text().splitlines(), 1) if line.strip()
    ]
    by_round: dict[int, Row] = {}
    for position, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                log.warning("Skipping the unfinished last line of %s", metrics)
                continue
            raise ValueError(f"{metrics}:{number}: not valid JSON ({error})") from None
        server_round = row.get(schema.ROUND) if isinstance(row, dict) else None
        if not isinstance(server_round, int) or isinstance(server_round, bool):
            raise ValueError(f"{metrics}:{number}: expected a JSON object with an integer 'round'")
        by_round[server_round] = row  # a resumed run may record a round again
    if not by_round:
        raise ValueError(f"{metrics} holds no finished round yet")
    return RunRecords(
        path=path,
        rows=[by_round[r] for r in sorted(by_round)],
        summary=_read_optional_json(path / SUMMARY_FILE),
        config=_read_optional_json(path / CONFIG_FILE),
    )


def metric(row: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    """The first numeric value among ``keys`` in ``row`` (booleans and text are not)."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


# --------------------------------------------------------------------------------------
# The per-round table
# --------------------------------------------------------------------------------------


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


@dataclass(frozen=True)
class Column:
    """One column of the per-round table."""

    header: str
    keys: tuple[str, ...]
    """metrics.jsonl keys it reads; the first present wins."""
    render: Callable[[float], str]
    optional: bool = False
    """Shown only when some round has a value (epsilon exists only with DP)."""


COLUMNS = (
    Column("round", (schema.ROUND,), lambda v: str(int(v))),
    Column("train loss", (schema.TRAIN_LOSS,), _fixed(4)),
    Column("eval loss", (schema.EVAL_LOSS,), _fixed(4)),
    Column("perplexity", (schema.EVAL_PERPLEXITY,), lambda v: f"{v:.4g}"),
    Column("token acc", (schema.EVAL_TOKEN_ACCURACY,), _fixed(3)),
    Column("epsilon", EPSILON_KEYS, _fixed(3), optional=True),
    # The delta that epsilon holds at, small-cohort term included (SecAgg+ with DP).
    Column("delta", (schema.DP_DELTA_TOTAL,), lambda v: f"{v:.3g}", optional=True),
    Column("sampled", (schema.CLIENTS_SAMPLED,), lambda v: str(int(v))),
    Column("replied", (schema.CLIENTS_REPLIED,), lambda v: str(int(v))),
    Column("dropped", (schema.CLIENTS_DROPPED,), lambda v: str(int(v))),
    Column("bytes up", (schema.BYTES_UP,), format_bytes),
    Column("bytes down", (schema.BYTES_DOWN,), format_bytes),
    Column("seconds", (schema.SECONDS,), _fixed(1)),
)

MISSING = "-"


def table_columns(rows: Sequence[Row]) -> list[Column]:
    """The columns a table of ``rows`` shows."""
    return [
        c for c in COLUMNS if not c.optional or any(metric(row, c.keys) is not None for row in rows)
    ]


def table_cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and rendered cells; a missing or non-numeric value shows as ``-``."""
    columns = table_columns(rows)
    cells = []
    for row in rows:
        rendered = []
        for column in columns:
            value = metric(row, column.keys)
            rendered.append(MISSING if value is None else column.render(value))
        cells.append(rendered)
    return [c.header for c in columns], cells


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table, right-aligned, for a terminal."""
    headers, cells = table_cells(rows)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    dropped = dropped_replies(rows)
    if dropped:
        lines += ["", "Dropped replies:", *(f"  {d}" for d in dropped)]
    return "\n".join(lines)


def format_markdown_table(rows: Sequence[Row]) -> str:
    """GitHub-flavoured markdown table."""
    headers, cells = table_cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    dropped = dropped_replies(rows)
    if dropped:
        lines += ["", "Dropped replies:", "", *(f"- {d}" for d in dropped)]
    return "\n".join(lines)


def dropped_replies(rows: Sequence[Row]) -> list[str]:
    """Why replies were dropped: ``round R, node N: reason``, one per node and round."""
    lines = []
    for row in rows:
        dropped = row.get(schema.DROPPED)
        if isinstance(dropped, Mapping):
            lines += [f"round {row['round']}, node {n}: {why}" for n, why in dropped.items()]
    return lines


# --------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------

PLOT_SERIES = (
    ("loss", (("train loss", (schema.TRAIN_LOSS,)), ("eval loss", (schema.EVAL_LOSS,)))),
    ("perplexity", (("eval perplexity", (schema.EVAL_PERPLEXITY,)),)),
    ("epsilon", (("epsilon", EPSILON_KEYS),)),
)


def _series(rows: Sequence[Row], keys: Sequence[str]) -> tuple[list[int], list[float]]:
    points = [(row["round"], metric(row, keys)) for row in rows]
    kept = [(r, v) for r, v in points if v is not None and math.isfinite(v)]
    return [r for r, _ in kept], [v for _, v in kept]


def plot_rounds(rows: Sequence[Row], title: str = "") -> Figure:
    """Loss, perplexity and (when recorded) epsilon over rounds, one panel each.

    Built on the Agg canvas without pyplot, so it needs no display, keeps no global
    figure and is safe to call from a server thread. Each line's label is its series
    name (``train loss``, ``eval loss``, ``eval perplexity``, ``epsilon``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [
        (name, [(label, *_series(rows, keys)) for label, keys in series])
        for name, series in PLOT_SERIES
    ]
    # The epsilon panel exists only for DP runs; loss and perplexity always show.
    panels = [(n, s) for n, s in panels if n != "epsilon" or any(xs for _, xs, _ in s)]
    figure = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (name, series) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        for label, xs, ys in series:
            if xs:
                axes.plot(xs, ys, marker="o", label=label)
        if not any(xs for _, xs, _ in series):
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes)
        values = [v for _, _, ys in series for v in ys]
        if name == "perplexity" and values and min(values) > 0 and max(values) / min(values) > 50:
            axes.set_yscale("log")  # early rounds would flatten the rest
        axes.set_title(name)
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len([s for s in series if s[1]]) > 1:
            axes.legend()
    if title:
        figure.suptitle(title)
    return figure


def _save_atomic(path: Path, write: Callable[[Path], object]) -> None:
    # A unique temporary name: two reports of one run never write the same file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# TensorBoard and Weights & Biases
# --------------------------------------------------------------------------------------

SCALAR_TAGS = {c.name: c.tensorboard for c in schema.COLUMNS if c.tensorboard is not None}
"""Grouped TensorBoard tags of the schema's columns (``loss/train``...)."""


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric value of a round, under its TensorBoard tag.

    Known keys get grouped tags (``loss/train``); any other numeric key (a metric added
    later) is logged under its own name, so nothing recorded is left out.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out.setdefault(SCALAR_TAGS.get(key, key), float(value))
    return out


def _start_time(records: RunRecords) -> float:
    """Wall time of the run's start: config.json is written before round 1."""
    config = records.path / CONFIG_FILE
    if config.is_file():
        return config.stat().st_mtime
    spent = sum(metric(row, ("seconds",)) or 0.0 for row in records.rows)
    return (records.path / METRICS_FILE).stat().st_mtime - spent


def write_tensorboard(records: RunRecords, out_dir: str | Path) -> Path:
    """Write the run's scalars (step = round) and settings as TensorBoard events.

    Earlier event files in ``out_dir`` are replaced, so regenerating never shows a
    round twice. Wall times follow the rounds' durations from the run's start, so
    TensorBoard's "relative" axis is training time.
    """
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("events.out.tfevents.*"):
        stale.unlink()
    writer = SummaryWriter(log_dir=str(out))
    try:
        walltime = _start_time(records)
        for row in records.rows:
            walltime += metric(row, ("seconds",)) or 0.0
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, global_step=row["round"], walltime=walltime)
        if records.config is not None:
            config_text = json.dumps(records.config, indent=2, sort_keys=True)
            writer.add_text("run/config", f"```\n{config_text}\n```", global_step=0)
        writer.add_text("run/rounds", format_markdown_table(records.rows), global_step=0)
    finally:
        writer.close()
    return out


def log_to_wandb(records: RunRecords, project: str) -> bool:
    """Log the run's scalars to Weights & Biases, if ``wandb`` is installed.

    Returns whether anything was logged. A missing ``wandb`` is a warning, not an error:
    the report's own files do not depend on it.
    """
    try:
        import wandb
    except ImportError:
        log.warning("W&B logging to project %r asked for, but wandb is not installed", project)
        return False
    run = wandb.init(
        project=project,
        name=records.path.name,
        config=records.config or {},
        dir=str(records.path),
    )
    try:
        for row in records.rows:
            run.log(scalars(row), step=row["round"])
        if records.summary:
            run.summary.update(
                {k: v for k, v in records.summary.items() if isinstance(v, int | float | str)}
            )
    finally:
        run.finish()
    log.info("Logged %d rounds to W&B project %r", len(records.rows), project)
    return True


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def _settings_line(records: RunRecords) -> str:
    done = len(records.rows)
    state = "finished" if records.finished else "in progress or interrupted"
    if records.config is None:
        return f"{done} rounds, {state} (no {CONFIG_FILE})"
    cfg = records.config
    model, lora = cfg.get("model", {}), cfg.get("lora", {})
    planned = cfg.get("fed", {}).get("num_rounds")
    parts = [
        f"model `{model.get('name', '?')}` ({model.get('quantization', '?')})",
        f"LoRA r={lora.get('r', '?')} on {lora.get('target_modules', '?')}",
        f"data `{cfg.get('data', {}).get('source', '?')}`",
        f"{done} of {planned} rounds" if planned else f"{done} rounds",
        state,
    ]
    return ", ".join(parts)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_shown(v)}" for k, v in value.items())
    return str(value)


def _summary_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = ["| key | value |", "| --- | --- |"]
    for key, value in sorted(summary.items()):
        if isinstance(value, list):
            continue  # per-round lists are the table above
        lines.append(f"| {key} | {_shown(value)} |")
    return lines


def format_report(records: RunRecords) -> str:
    """The markdown of ``report.md``."""
    lines = [
        f"# Run report: {records.path.name}",
        "",
        _settings_line(records),
        "",
        format_markdown_table(records.rows),
        "",
        *(f"    {line}" for line in task_lines(records)),
        "",
        f"![loss, perplexity and epsilon over rounds]({PLOT_FILE})",
        "",
        f"TensorBoard: `tensorboard --logdir {records.path.resolve() / TENSORBOARD_DIR}`",
    ]
    if records.summary:
        lines += ["", "## Summary", "", *_summary_lines(records.summary)]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, *, wandb_project: str | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.png`` and ``tensorboard/`` into ``run_dir``.

    Works on a finished run and on the rounds finished so far; keys missing from some
    rounds show as ``-`` and are left out of the plot. Re-running replaces the files.

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by the ServerApp (see :mod:`flower_llm.outputs`).
    wandb_project : str, optional
        Also log to this W&B project (default: ``$FLOWER_LLM_WANDB_PROJECT``); skipped
        with a warning when ``wandb`` is not installed.

    Returns
    -------
    dict
        ``{"table": report.md, "plot": metrics.png, "tensorboard": directory}``.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_run`: no ``metrics.jsonl``, or nothing readable in it.
    """
    return write_report_files(read_run(run_dir), wandb_project=wandb_project)


def write_report_files(records: RunRecords, *, wandb_project: str | None = None) -> dict[str, Path]:
    """:func:`write_report` for a run already read with :func:`read_run`."""
    started = time.perf_counter()
    log.info("Report of %s: %d rounds", records.path, len(records.rows))

    table = records.path / REPORT_FILE
    report = format_report(records)
    _save_atomic(table, lambda tmp: tmp.write_text(report))

    plot = records.path / PLOT_FILE
    title = f"{records.path.name}: {len(records.rows)} rounds"
    figure = plot_rounds(records.rows, title=title)
    _save_atomic(plot, lambda tmp: figure.savefig(tmp, format="png", dpi=100))

    tensorboard = write_tensorboard(records, records.path / TENSORBOARD_DIR)
    project = wandb_project or os.environ.get(WANDB_ENV)
    if project:
        log_to_wandb(records, project)
    log.info(
        "Wrote %s, %s and %s in %.1fs", table, plot, tensorboard, time.perf_counter() - started
    )
    return {"table": table, "plot": plot, "tensorboard": tensorboard}


READ_COLUMNS = frozenset(
    {schema.ROUND, schema.DROPPED, schema.SECONDS}
    | {key for column in COLUMNS for key in column.keys}
    | {key for _, series in PLOT_SERIES for _, keys in series for key in keys}
    | set(SCALAR_TAGS)
)
"""Every metrics.jsonl column this module reads by name."""


# --------------------------------------------------------------------------------------
# What run-default.sh prints when the log stream ends
# --------------------------------------------------------------------------------------


def flower_run_status(run_id: str) -> str | None:
    """``flwr ls --run-id`` status (``finished:failed: <details>``...), None if unknown."""
    import subprocess

    try:
        out = subprocess.run(
            ["flwr", "ls", "local", "--run-id", run_id, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        runs = json.loads(out).get("runs", [])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    for run in runs:
        if str(run.get("run-id")) == str(run_id):
            details = run.get("status-details")
            return f"{run.get('status')}: {details}" if details else str(run.get("status"))
    return None


def task_lines(records: RunRecords) -> list[str]:
    """Task accuracy by round against chance (flower_llm.tasks), from round 0 on.

    From summary.json once the run has finished, else from the rounds so far.
    """
    from flower_llm.outputs import INITIAL_EVAL_FILE
    from flower_llm.tasks import format_task_lines, task_summary

    summary = records.summary or {}
    if "task-accuracy" not in summary:
        initial = _read_optional_json(records.path / INITIAL_EVAL_FILE) or {}
        summary = {"task-accuracy": task_summary(initial, records.rows)}
    return format_task_lines(summary)


def format_outcome(run_dir: Path, summary: Mapping[str, Any]) -> str:
    """The end-of-run text: per-round table, local-only comparison, status, where files are."""
    lines = [f"--- {run_dir}"]
    try:
        records = read_run(run_dir)
    except (FileNotFoundError, ValueError):
        records = None
    initial = summary.get("initial-eval-loss")
    if isinstance(initial, int | float):
        lines.append(f"held-out loss before training (round 0): {initial:.4f}")
    if records is not None and records.rows:
        lines.append(format_table(records.rows))
        lines += task_lines(records)
    federated = summary.get("union-eval-loss/federated")
    local_only = summary.get("union-eval-loss/local-only") or {}
    if isinstance(federated, int | float) and local_only:
        lines.append("held-out loss on all sites' data (lower is better):")
        lines.append(f"  {'federated (global adapter)':<32} {federated:.4f}")
        for site, loss in local_only.items():
            shown = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
            lines.append(f"  {'local-only, ' + str(site):<32} {shown}")
    if isinstance(summary.get("per-site"), Mapping):
        from flower_llm.personal import format_table as per_site_lines

        lines.extend(per_site_lines(summary["per-site"]))
    if isinstance(summary.get("mb-total"), int | float):
        lines.append(
            f"communication: {summary['mb-up']:.3f} MB up, {summary['mb-down']:.3f} MB down, "
            f"{summary['mb-total']:.3f} MB in all (down: train and evaluation)"
        )
        labels = summary.get("site-labels") or {}
        for node, traffic in (summary.get("bytes-by-site") or {}).items():
            # The site's own label (as the per-site table names it), its node id after
            name = f"{labels[node]} [node {node}]" if node in labels else f"node {node}"
            lines.append(
                f"  {name:<36} {traffic['bytes-down'] / 1e6:.3f} MB down, "
                f"{traffic['bytes-up'] / 1e6:.3f} MB up"
            )
    status = summary.get("status", "unknown")
    reason = summary.get("reason")
    lines.append(f"status: {status}" + (f" ({reason})" if reason else ""))
    if records is not None and records.rows:
        try:
            files = write_report_files(records)
            lines.append(f"plot: {files['plot']}  report: {files['table']}")
        except ImportError:
            lines.append("plot: pip install 'flower-llm[report]', then flower-llm report RUN_DIR")
    if (run_dir / FINAL_ADAPTER).is_dir():
        lines.append(f"final adapter: {run_dir / FINAL_ADAPTER}")
    return "\n".join(lines)


def report_finished(run_dir: Path, run_id: str) -> int:
    """Print a finished run's outcome; 0 if it updated the model, else 1."""
    status = flower_run_status(run_id)
    owner = (run_dir / RUN_ID_FILE).read_text().strip() if (run_dir / RUN_ID_FILE).is_file() else ""
    summary_file = run_dir / SUMMARY_FILE
    if owner != str(run_id) or not summary_file.is_file():
        print(
            f"--- run {run_id} ended ({status or 'status unknown'}) without writing "
            f"{summary_file}: it failed before its first round or its ServerApp was killed; "
            f"see the log above, and `flwr ls local --run-id {run_id}`",
            file=sys.stderr,
        )
        return 1
    summary = json.loads(summary_file.read_text())
    print(format_outcome(run_dir, summary))
    if summary.get("status") != STATUS_OK:
        print(f"--- run {run_id} FAILED: {summary.get('reason', 'see the log')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "finished":
        raise SystemExit("usage: python -m flower_llm.report finished RUN_DIR RUN_ID")
    raise SystemExit(report_finished(Path(sys.argv[2]), sys.argv[3]))
