"""ServerApp: federated QLoRA fine-tuning, one round engine for every aggregation mode.

The Flower App's one ServerApp. It parses the run-config, picks the mode that gets one
round from the global adapter to the next (Message-API FedAvg or DP-FedAvg, or SecAgg+
with or without central DP: :mod:`strategies.rounds`, :mod:`strategies.secagg`), runs
:func:`strategies.rounds.federate`, and records every round in ONE place,
:class:`RunRecorder`: the adapter, the metrics row, the checkpoint, and at the end the
summary. Every mode resumes, honours ``fed.round-timeout`` and ``fed.evaluate-every``,
stops on the same privacy-budget rule and writes the same summary.json.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from flower_llm import metrics as columns
from flower_llm import wire
from flower_llm.checkpoint import arrays_to_record, resume_from_checkpoint, write_round_checkpoint
from flower_llm.config import RunConfig, parse_run_config
from flower_llm.logs import setup_logging, start_progress
from flower_llm.outputs import (
    FINAL_ADAPTER,
    RunDirectory,
    conclude,
    end_run,
    round_name,
    setup_failure,
    site_name,
    unique_site_names,
)
from flower_llm.personal import kept_part, shared_part
from flower_llm.preflight import (
    check_model_reachable,
    check_simulation_size,
    server_fails_loud,
)
from flower_llm.streams import RandomStreams
from flower_llm.tasks import task_summary
from flower_llm.updates import InitialRecipe
from strategies.dp import CentralDP, DifferentialPrivacyFedAvg, dpsgd_warnings, privacy_summary
from strategies.fedavg import WeightedFedAvg, aggregate_eval_replies
from strategies.personal import compare_sites
from strategies.rounds import MessageRounds, PollingGrid, RoundMode, RoundResult, federate
from strategies.secagg import SecAggRounds, secagg_summary

log = logging.getLogger("flower_llm.server")

app = ServerApp()


# --------------------------------------------------------------------------------------
# The mode of a run
# --------------------------------------------------------------------------------------


def build_strategy(
    cfg: RunConfig, streams: RandomStreams | None = None
) -> WeightedFedAvg | DifferentialPrivacyFedAvg:
    """The Message-API strategy the run-config asks for, drawing from ``streams``."""
    streams = streams or RandomStreams(cfg.seed, secret=cfg.privacy.client_level)
    strategy = WeightedFedAvg.from_config(cfg, train_rng=streams.train, eval_rng=streams.evaluate)
    if cfg.privacy.client_level:
        # Outermost wrapper: whatever observes the aggregate (outputs, checkpoints,
        # evaluation) sees the noised adapter only.
        return DifferentialPrivacyFedAvg.from_config(strategy, cfg, streams.noise)
    return strategy


def build_mode(
    cfg: RunConfig, context: Context, keys: list[str], streams: RandomStreams
) -> RoundMode:
    """How a round of this run gets from the global adapter to the next."""
    if cfg.fed.aggregation != "secagg+":
        return MessageRounds(build_strategy(cfg, streams), cfg.fed.round_timeout)
    # Evaluation samples as in every mode; DP lives in the SecAgg+ mode's CentralDP.
    evaluation = WeightedFedAvg(
        fraction_evaluate=cfg.fed.fraction_evaluate,
        min_evaluate_clients=cfg.fed.min_evaluate_clients,
        min_available_clients=cfg.fed.min_available_clients,
        eval_rng=streams.evaluate,
        wait_timeout=cfg.fed.round_timeout,
    )
    central = CentralDP.from_config(cfg, streams.noise) if cfg.privacy.client_level else None
    return SecAggRounds(
        cfg,
        context,
        sorted(keys),
        evaluation=evaluation,
        train_rng=streams.train,
        central=central,
    )


def evaluates(cfg: RunConfig, mode: RoundMode, server_round: int) -> bool:
    """Whether the sites evaluate round ``server_round``'s aggregate (after aggregation).

    Every ``fed.evaluate-every``-th round, the last one, and the one a DP run stops after
    because one more would exceed its privacy budget.
    """
    stops = mode.central is not None and mode.central.budget_exhausted()
    return cfg.fed.evaluates(server_round) or stops


# --------------------------------------------------------------------------------------
# Recording a round, and the run
# --------------------------------------------------------------------------------------


def round_row(result: RoundResult, aggregation: str = "fedavg") -> dict[str, Any]:
    """The metrics.jsonl line of a finished round (columns: :mod:`flower_llm.metrics`)."""
    report = result.report
    row: dict[str, Any] = {
        columns.ROUND: result.server_round,
        columns.SECONDS: round(result.seconds, 3),
        columns.AGGREGATION: aggregation,
        columns.CLIENTS_SAMPLED: len(report.sampled),
        columns.CLIENTS_REPLIED: len(report.accepted),
        columns.CLIENTS_DROPPED: len(report.dropped),
        columns.DROPPED: {str(k): v for k, v in report.dropped.items()},
        columns.BYTES_DOWN: report.bytes_down,
        columns.BYTES_UP: report.bytes_up,
        columns.UPDATED: report.updated,
        **report.aggregation_row(),  # refused / clamped replies, LoRA truncation error
    }
    site_columns = []
    for prefix, metrics in (("train", result.train_metrics), ("eval", result.eval_metrics)):
        for key, value in (metrics or {}).items():
            site_columns.append(columns.prefixed(prefix, key))
            row[site_columns[-1]] = value
    row.update(result.columns)
    # The server's own columns must be declared; a metric a site sent is kept as it came.
    columns.check_row(row, site_columns=set(site_columns) - set(columns.BY_NAME))
    return row


def run_summary(
    run_dir: RunDirectory, history: list[dict[str, Any]], adapter_parameters: int, started: float
) -> dict[str, Any]:
    """What every run's summary.json holds; ``started`` is its ``time.perf_counter()``."""
    return {
        "rounds": len(history),
        "seconds": round(time.perf_counter() - started, 2),
        "adapter-parameters": adapter_parameters,
        "final-adapter": str(run_dir.path / FINAL_ADAPTER),
        "eval-loss-by-round": [row.get(columns.EVAL_LOSS) for row in history],
        **columns.traffic_summary(history),
    }


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def log_round(result: RoundResult, row: dict[str, Any], num_rounds: int) -> None:
    """The server's one line per round."""
    report = result.report
    failed = row.get(columns.SECAGG_FAILED)
    log.info(
        "round %d/%d: eval loss %s, perplexity %s, train loss %s | %d/%d clients, %d dropped%s "
        "| %.2f MB up | %.1fs",
        result.server_round,
        num_rounds,
        _fmt(row.get(columns.EVAL_LOSS)),
        _fmt(row.get(columns.EVAL_PERPLEXITY)),
        # Flower's examples report train_loss; this project's ClientApp train-loss.
        _fmt(row.get(columns.TRAIN_LOSS, row.get("train_loss"))),
        len(report.accepted),
        len(report.sampled),
        len(report.dropped),
        ", FAILED" if failed else "",
        report.bytes_up / 1e6,
        result.seconds,
    )


class RunRecorder:
    """The one place a finished round is recorded, whatever the mode.

    After each round: the adapter (``round-NNN/``), the metrics row, the local-only
    adapters a last round may carry, then the checkpoint (last, so a restart continues
    from a round whose outputs are all on disk). Returns True to stop the run when one
    more round would exceed the privacy budget.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: RunDirectory,
        mode: RoundMode,
        streams: RandomStreams,
        lora_cfg: Any,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.mode = mode
        self.streams = streams
        self.lora_cfg = lora_cfg
        self.local_only: dict[int, ArrayRecord] = {}
        self.site_names: dict[int, str] = {}
        """node id -> the label its replies give it ("partition 2/4", a data file)."""
        self.unshared: dict[str, Any] = {}
        """Arrays the server never sends nor receives (each site's B under local-b), at
        their initial value, so that the saved adapters are whole PEFT adapters."""

    def whole(self, arrays: ArrayRecord) -> dict[str, Any]:
        """The global adapter of ``arrays`` as saved: with the arrays kept at the sites."""
        return {**self.unshared, **wire.from_array_record(arrays)}

    def __call__(self, result: RoundResult) -> bool:
        """Record ``result``; True stops the run."""
        cfg, run_dir, mode = self.cfg, self.run_dir, self.mode
        run_dir.save_adapter(
            self.whole(result.arrays), self.lora_cfg, round_name(result.server_round)
        )
        row = round_row(result, mode.aggregation)
        run_dir.append_metrics(row)
        log_round(result, row, cfg.fed.num_rounds)
        for reply in mode.last_valid():
            if wire.LOCAL_ONLY_ARRAYS in reply.content.array_records:
                self.local_only[reply.node_id] = reply.content.array_records[wire.LOCAL_ONLY_ARRAYS]
                self.site_names[reply.node_id] = site_name(reply.content, reply.node_id)
        stop = mode.central is not None and mode.central.budget_exhausted()
        write_round_checkpoint(
            run_dir.path,
            cfg,
            result.server_round,
            result.arrays,
            mode,
            run_dir.read_metrics(),
            stopped=stop,
            streams=self.streams,
        )
        if stop:
            assert mode.central is not None
            log.warning(
                "Privacy budget: stopping after round %d at epsilon %.4g; one more round "
                "would exceed privacy.target-epsilon = %g",
                result.server_round,
                mode.central.epsilon(),
                mode.central.target_epsilon,
            )
            return True
        if not result.report.updated and (reason := setup_failure(result.report.dropped)):
            log.error("Stopping: %s", reason)  # the next round would fail the same way
            return True
        return False

    def summary(
        self,
        grid: Grid,
        final: ArrayRecord,
        adapter_parameters: int,
        started: float,
        resumed_after: int | None,
        dp_warnings: list[str],
    ) -> dict[str, Any]:
        """summary.json: the same shape for every mode."""
        cfg = self.cfg
        history = self.run_dir.read_metrics()
        summary = run_summary(self.run_dir, history, adapter_parameters, started)
        initial = self.run_dir.read_initial_eval()
        summary["initial-eval-loss"] = initial.get(columns.EVAL_LOSS)
        if task_accuracy := task_summary(initial, history):
            summary["task-accuracy"] = task_accuracy
        summary["aggregation"] = self.mode.aggregation
        summary["rounds-failed"] = sum(1 for row in history if not row.get(columns.UPDATED))
        if self.mode.aggregation == "secagg+":
            summary["secagg"] = secagg_summary(history)
        if resumed_after is not None:
            summary["resumed-after-round"] = resumed_after
        if cfg.privacy.enabled:
            central = self.mode.central
            client_level = None
            if central is not None:
                client_level = {"mode": cfg.privacy.mode, **central.summary()}
                if self.mode.aggregation == "secagg+":
                    client_level["caveat"] = (
                        "clients clip under SecAgg+; the server cannot verify it"
                    )
            summary["privacy"] = privacy_summary(
                client_level,
                list(central.warnings) if central is not None else [],
                cfg,
                history,
                dp_warnings,
            )
        if self.local_only:
            summary.update(self._local_only_comparison(grid, final))
        if cfg.fed.personalization != "none":
            # Each site scores its local-only, global and personal adapters on its own
            # held-out split; only the scores come back.
            last_round = history[-1][columns.ROUND] if history else 0
            summary["personalization"] = cfg.fed.personalization
            summary["per-site"] = compare_sites(
                grid,
                final,
                last_round,
                cfg.fed.round_timeout,
                tasks=cfg.eval.tasks,
                packed=cfg.fed.wire_layout == "packed",
            )
        return summary

    def _local_only_comparison(self, grid: Grid, final: ArrayRecord) -> dict[str, Any]:
        """Held-out loss of the federated adapter vs each site's local-only one, on all sites."""
        timeout = self.cfg.fed.round_timeout
        nodes = sorted(grid.get_node_ids())
        out: dict[str, Any] = {}
        packed = self.cfg.fed.wire_layout == "packed"
        federated = evaluate_on_all_sites(grid, final, nodes, timeout, packed)
        out["union-eval-loss/federated"] = federated and federated[wire.EVAL_LOSS]
        per_site = {}
        labels = unique_site_names(
            {node: self.site_names.get(node, f"node {node}") for node in self.local_only}
        )
        for node, local_arrays in sorted(self.local_only.items()):
            metrics = evaluate_on_all_sites(grid, local_arrays, nodes, timeout, packed)
            per_site[labels[node]] = metrics and metrics[wire.EVAL_LOSS]
        out["union-eval-loss/local-only"] = per_site
        local_losses = [v for v in per_site.values() if v is not None]
        out["federated-beats-every-local-only"] = bool(
            out["union-eval-loss/federated"] is not None
            and local_losses
            and all(out["union-eval-loss/federated"] < v for v in local_losses)
        )
        log.info(
            "Held-out loss on all sites' data: federated %.4f; local-only %s",
            out["union-eval-loss/federated"],
            ", ".join(f"{v:.4f} ({name})" for name, v in sorted(per_site.items()) if v is not None),
        )
        return out


def evaluate_on_all_sites(
    grid: Grid, arrays: ArrayRecord, node_ids: list[int], timeout: float, packed: bool = False
) -> dict[str, Any] | None:
    """Pooled held-out metrics of ``arrays`` over every site's evaluation split
    (``packed``: in the packed wire layout)."""
    # Held-out loss only: the comparison is on loss, and tasks would cost each site a
    # scoring pass per adapter.
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({wire.EVAL_TASKS: False})})
    content = wire.pack(content) if packed else content
    messages = [
        Message(
            content=content,
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node in node_ids
    ]
    metrics = aggregate_eval_replies(grid.send_and_receive(messages, timeout=timeout))
    return dict(metrics) if metrics is not None else None


# --------------------------------------------------------------------------------------
# The ServerApp
# --------------------------------------------------------------------------------------


@app.main()
@server_fails_loud  # a user's mistake: one line, not a traceback
def main(grid: Grid, context: Context) -> None:
    """Run federated QLoRA fine-tuning and write the run directory."""
    setup_logging()
    start_progress()  # a status line after 12 s of silence: round, elapsed, ETA
    cfg = parse_run_config(context.run_config)
    grid = PollingGrid(grid)  # type: ignore[assignment]  # replies within 0.25 s, not 3 s
    check_simulation_size(grid, cfg.fed)  # a too-small simulation would wait forever
    check_model_reachable(cfg.model)  # before transformers retries an unreachable hub
    run(grid, context, cfg)


def run(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    mode: RoundMode | None = None,
    streams: RandomStreams | None = None,
) -> None:
    """One run of any mode into ``output.dir/output.run-name``.

    ``mode`` and the ``streams`` it draws from are for tests (seeded noise, a recording
    strategy); by default both follow the run-config.
    """
    run_dir = RunDirectory(
        cfg.output.dir,
        cfg.output.run_name,
        resume=cfg.output.resume,
        run_id=context.run_id,
        lock=True,
    )
    try:
        _run(grid, context, cfg, run_dir, mode, streams)
    finally:
        run_dir.unlock()


def _run(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    run_dir: RunDirectory,
    mode: RoundMode | None,
    streams: RandomStreams | None,
) -> None:
    # The torch stack loads here, after the run-config and the run directory were checked:
    # a mistake in either fails the run before seconds of imports.
    from flower_llm.adapters import init_adapter, num_parameters
    from flower_llm.models import resolve_model_path

    started = time.perf_counter()
    # The server needs the model's config only; adapter weights start as peft starts them.
    name_or_path = resolve_model_path(cfg.model)
    state, lora_cfg = init_adapter(cfg.model, cfg.lora, name_or_path, cfg.seed)
    log.info("Global adapter: %d parameters, %s", num_parameters(state), run_dir.path)
    # local-b: only the A matrices are global; the B the sites train never travel.
    shared = shared_part(state, cfg.fed.personalization)
    arrays = wire.to_array_record(shared, cfg.fed.wire_dtype)

    streams = streams or RandomStreams(cfg.seed, secret=cfg.privacy.client_level)
    mode = mode or build_mode(cfg, context, list(shared), streams)
    if cfg.fed.initial_from_seed:
        # Sites rebuild this adapter from the seed instead of downloading it.
        mode.use_initial(arrays, InitialRecipe.of(shared, cfg.seed))
    first_round, resumed_after = 1, None
    if cfg.output.resume:
        checkpoint = resume_from_checkpoint(run_dir.path, cfg, mode, streams)
        arrays = arrays_to_record(checkpoint.adapter)
        resumed_after = checkpoint.server_round
        # A run that had decided to stop (privacy budget) only writes its final outputs.
        first_round = cfg.fed.num_rounds + 1 if checkpoint.stopped else resumed_after + 1
        log.info("Resuming %s after round %d", run_dir.path, resumed_after)
    # After the resume checks: a refused resume leaves the run's config.json as it was.
    run_dir.save_config(cfg)
    dp_warnings = dpsgd_warnings(cfg)
    num_rounds = cfg.fed.num_rounds

    def train_config(server_round: int) -> ConfigRecord:
        last = server_round == num_rounds
        return ConfigRecord(
            {
                wire.SERVER_ROUND: server_round,
                wire.LEARNING_RATE: cfg.train.learning_rate_at(server_round, num_rounds),
                wire.SEND_LOCAL_ONLY: bool(last and cfg.output.local_only_baseline),
                wire.SITE_LABEL: True,  # labels the per-site byte counts
            }
        )

    recorder = RunRecorder(cfg, run_dir, mode, streams, lora_cfg)
    recorder.unshared = kept_part(state, cfg.fed.personalization)
    try:
        if first_round == 1:
            # Round 0: the held-out loss before any training, the reference every later
            # round is read against (evaluation samples from its own stream).
            initial = mode.evaluate_round(0, arrays, grid)
            run_dir.save_initial_eval(dict(initial) if initial is not None else None)
        final = federate(
            mode,
            grid,
            arrays,
            first_round=first_round,
            num_rounds=num_rounds,
            train_config=train_config,
            on_round_end=recorder,
            evaluate=lambda server_round: evaluates(cfg, mode, server_round),
        )
    finally:
        mode.close()
    summary = recorder.summary(
        grid, final, num_parameters(state), started, resumed_after, dp_warnings
    )
    # A run that updated the model in no round is failed and leaves no final/ adapter.
    if conclude(summary, run_dir.read_metrics(), num_rounds):
        run_dir.save_adapter(recorder.whole(final), lora_cfg, FINAL_ADAPTER)
    run_dir.write_summary(summary)
    end_run(run_dir, summary)
