"""ServerApp: weighted FedAvg of LoRA adapters, with outputs written every round."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from flower_llm import wire
from flower_llm.adapters import init_adapter, num_parameters
from flower_llm.checkpoint import arrays_to_record, resume_from_checkpoint, write_round_checkpoint
from flower_llm.config import RunConfig, parse_run_config
from flower_llm.logs import setup_logging, start_progress
from flower_llm.models import resolve_model_path
from flower_llm.outputs import (
    FINAL_ADAPTER,
    RunDirectory,
    conclude,
    end_run,
    round_name,
    setup_failure,
    site_name,
)
from flower_llm.preflight import (
    check_model_reachable,
    check_simulation_size,
    server_fails_loud,
)
from strategies.dp import DifferentialPrivacyFedAvg, dpsgd_warnings, privacy_summary
from strategies.fedavg import WeightedFedAvg, aggregate_eval_replies
from strategies.rounds import PollingGrid, RoundResult, federate

log = logging.getLogger("flower_llm.server")

app = ServerApp()


def build_strategy(cfg: RunConfig) -> WeightedFedAvg | DifferentialPrivacyFedAvg:
    """The strategy the run-config asks for."""
    fed = cfg.fed
    strategy = WeightedFedAvg(
        weighting=fed.weighting,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_clients=fed.min_train_clients,
        min_evaluate_clients=fed.min_evaluate_clients,
        min_available_clients=fed.min_available_clients,
    )
    if cfg.privacy.client_level:
        # Outermost wrapper: whatever observes the aggregate (outputs, checkpoints,
        # evaluation) sees the noised adapter only.
        return DifferentialPrivacyFedAvg.from_config(strategy, cfg)
    return strategy


def round_row(result: RoundResult) -> dict[str, Any]:
    """The metrics.jsonl line of a finished round."""
    report = result.report
    row: dict[str, Any] = {
        "round": result.server_round,
        "seconds": round(result.seconds, 3),
        "clients-sampled": len(report.sampled),
        "clients-replied": len(report.accepted),
        "clients-dropped": len(report.dropped),
        "dropped": {str(k): v for k, v in report.dropped.items()},
        "bytes-down": report.bytes_down,
        "bytes-up": report.bytes_up,
        "updated": report.updated,
    }
    for prefix, metrics in (("train", result.train_metrics), ("eval", result.eval_metrics)):
        for key, value in (metrics or {}).items():
            name = key if key.startswith(prefix) else f"{prefix}/{key}"
            row[name] = value
    return row


def evaluates(cfg: RunConfig, strategy: object, server_round: int) -> bool:
    """Whether the sites evaluate round ``server_round``'s aggregate (after aggregation).

    Every ``fed.evaluate-every``-th round, the last one, and the one a DP run stops after
    because one more would exceed its privacy budget.
    """
    stops = isinstance(strategy, DifferentialPrivacyFedAvg) and strategy.budget_exhausted()
    return cfg.fed.evaluates(server_round) or stops


def run_summary(
    run_dir: RunDirectory, history: list[dict[str, Any]], adapter_parameters: int, started: float
) -> dict[str, Any]:
    """What every run's summary.json holds; ``started`` is its ``time.perf_counter()``."""
    return {
        "rounds": len(history),
        "seconds": round(time.perf_counter() - started, 2),
        "adapter-parameters": adapter_parameters,
        "final-adapter": str(run_dir.path / FINAL_ADAPTER),
        "eval-loss-by-round": [row.get("eval-loss") for row in history],
        "bytes-up": sum(row["bytes-up"] for row in history),
        "bytes-down": sum(row["bytes-down"] for row in history),
    }


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def log_round(result: RoundResult, row: dict[str, Any], num_rounds: int, clients: str) -> None:
    """The server's one line per round; ``clients`` says who took part and how."""
    log.info(
        "round %d/%d: eval loss %s, perplexity %s, train loss %s | %s | %.2f MB up | %.1fs",
        result.server_round,
        num_rounds,
        _fmt(row.get("eval-loss")),
        _fmt(row.get("eval-perplexity")),
        _fmt(row.get("train-loss", row.get("train_loss"))),  # Flower examples: train_loss
        clients,
        result.report.bytes_up / 1e6,
        result.seconds,
    )


def evaluate_on_all_sites(
    grid: Grid, arrays: ArrayRecord, node_ids: list[int], timeout: float
) -> dict[str, Any] | None:
    """Pooled held-out metrics of ``arrays`` over every site's evaluation split."""
    messages = [
        Message(
            content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord()}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node in node_ids
    ]
    metrics = aggregate_eval_replies(grid.send_and_receive(messages, timeout=timeout))
    return dict(metrics) if metrics is not None else None


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
    if cfg.fed.aggregation == "secagg+":
        # SecAgg+ runs on Flower's legacy workflow; imported here as it imports this module.
        from server_apps.secagg import run as run_secagg

        run_secagg(grid, context, cfg)
        return
    run_dir = RunDirectory(
        cfg.output.dir, cfg.output.run_name, resume=cfg.output.resume, run_id=context.run_id
    )
    started = time.perf_counter()

    # The server needs the model's config only; adapter weights start as peft starts them.
    name_or_path = resolve_model_path(cfg.model)
    state, lora_cfg = init_adapter(cfg.model, cfg.lora, name_or_path, cfg.seed)
    log.info("Global adapter: %d parameters, %s", num_parameters(state), run_dir.path)
    arrays = wire.to_array_record(state, cfg.fed.wire_dtype)

    strategy = build_strategy(cfg)
    # Flower samples nodes with the global `random`: the seed makes sampling repeatable
    # (a resumed run restores the state its checkpoint saved instead).
    random.seed(cfg.seed)
    first_round, resumed_after = 1, None
    if cfg.output.resume:
        checkpoint = resume_from_checkpoint(run_dir.path, cfg, strategy)
        arrays = arrays_to_record(checkpoint.adapter)
        resumed_after = checkpoint.server_round
        # A run that had decided to stop (privacy budget) only writes its final outputs.
        first_round = cfg.fed.num_rounds + 1 if checkpoint.stopped else resumed_after + 1
        log.info("Resuming %s after round %d", run_dir.path, resumed_after)
    # After the resume checks: a refused resume leaves the run's config.json as it was.
    run_dir.save_config(cfg)
    strategy.summary()
    privacy_warnings = dpsgd_warnings(cfg)
    num_rounds = cfg.fed.num_rounds
    local_only: dict[int, ArrayRecord] = {}
    site_names: dict[int, str] = {}  # node id -> "partition 2/4" (the report's label)

    def train_config(server_round: int) -> ConfigRecord:
        last = server_round == num_rounds
        return ConfigRecord(
            {
                wire.SERVER_ROUND: server_round,
                wire.LEARNING_RATE: cfg.train.learning_rate_at(server_round, num_rounds),
                wire.SEND_LOCAL_ONLY: bool(last and cfg.output.local_only_baseline),
            }
        )

    def on_round_end(result: RoundResult) -> bool:
        run_dir.save_adapter(
            wire.from_array_record(result.arrays), lora_cfg, round_name(result.server_round)
        )
        row = round_row(result)
        if isinstance(strategy, DifferentialPrivacyFedAvg) and strategy.last_round is not None:
            row.update(strategy.last_round.as_row())  # epsilon, delta, clip norm, noise
        run_dir.append_metrics(row)
        report = result.report
        log_round(
            result,
            row,
            num_rounds,
            f"{len(report.accepted)}/{len(report.sampled)} clients, {len(report.dropped)} dropped",
        )
        for reply in strategy.last_valid:
            if wire.LOCAL_ONLY_ARRAYS in reply.content.array_records:
                local_only[reply.node_id] = reply.content.array_records[wire.LOCAL_ONLY_ARRAYS]
                site_names[reply.node_id] = site_name(reply.content, reply.node_id)
        # Last, once the round's outputs are on disk: a restart continues from here.
        write_round_checkpoint(
            run_dir.path,
            cfg,
            result.server_round,
            result.arrays,
            strategy,
            run_dir.read_metrics(),
            stopped=isinstance(strategy, DifferentialPrivacyFedAvg) and strategy.budget_exhausted(),
        )
        if isinstance(strategy, DifferentialPrivacyFedAvg) and strategy.budget_exhausted():
            log.warning(
                "Privacy budget: stopping after round %d at epsilon %.4g; one more round "
                "would exceed privacy.target-epsilon = %g",
                result.server_round,
                strategy.epsilon(),
                strategy.target_epsilon,
            )
            return True
        if not report.updated and (reason := setup_failure(report.dropped)):
            log.error("Stopping: %s", reason)  # the next round would fail the same way
            return True
        return False

    final = federate(
        strategy,
        grid,
        arrays,
        first_round=first_round,
        num_rounds=num_rounds,
        timeout=cfg.fed.round_timeout,
        train_config=train_config,
        on_round_end=on_round_end,
        evaluate=lambda server_round: evaluates(cfg, strategy, server_round),
    )
    # ----------------------------------------------------------------------------------
    # Summary, with the local-only comparison when asked for
    # ----------------------------------------------------------------------------------
    history = run_dir.read_metrics()
    summary = run_summary(run_dir, history, num_parameters(state), started)
    if conclude(summary, history, num_rounds):  # a run that learned nothing has no final/
        run_dir.save_adapter(wire.from_array_record(final), lora_cfg, FINAL_ADAPTER)
    if resumed_after is not None:
        summary["resumed-after-round"] = resumed_after
    if cfg.privacy.enabled:
        summary["privacy"] = privacy_summary(strategy, cfg, history, privacy_warnings)
    if local_only:
        nodes = sorted(grid.get_node_ids())
        federated = evaluate_on_all_sites(grid, final, nodes, cfg.fed.round_timeout)
        summary["union-eval-loss/federated"] = federated and federated[wire.EVAL_LOSS]
        per_site = {}
        for node, local_arrays in sorted(local_only.items()):
            metrics = evaluate_on_all_sites(grid, local_arrays, nodes, cfg.fed.round_timeout)
            per_site[site_names[node]] = metrics and metrics[wire.EVAL_LOSS]
        summary["union-eval-loss/local-only"] = per_site
        local_losses = [v for v in per_site.values() if v is not None]
        summary["federated-beats-every-local-only"] = bool(
            summary["union-eval-loss/federated"] is not None
            and local_losses
            and all(summary["union-eval-loss/federated"] < v for v in local_losses)
        )
        log.info(
            "Held-out loss on all sites' data: federated %.4f; local-only %s",
            summary["union-eval-loss/federated"],
            ", ".join(f"{v:.4f}" for v in per_site.values() if v is not None),
        )
    run_dir.write_summary(summary)
    end_run(run_dir, summary)
