"""SecAgg+ run: the server only ever sees the sum of the clients' adapter updates.

Entered from ``server_apps.fedavg:app`` (the Flower App's one ServerApp) when
``fed.aggregation = "secagg+"``. Each round: derive the SecAgg+ parameters from the run and the
sampled cohort, run Flower's legacy ``SecAggPlusWorkflow`` (strategies.secagg), add the mean
update to the global adapter (with Gaussian noise under client-fixed DP), evaluate on the
Message API like the plain path, and write the same run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.common import Scalar
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.serverapp import Grid

from flower_llm import secagg, wire
from flower_llm.adapters import AdapterState, init_adapter, num_parameters
from flower_llm.config import ConfigError, RunConfig
from flower_llm.models import resolve_model_path
from flower_llm.outputs import FINAL_ADAPTER, RunDirectory, conclude, end_run, round_name
from server_apps.fedavg import build_strategy, log_round, round_row, run_summary
from strategies.fedavg import RoundReport
from strategies.rounds import RoundResult
from strategies.secagg import (
    CountingGrid,
    SecAggCentralNoise,
    SecAggFedAvg,
    SecAggRoundReport,
    secagg_round,
)

log = logging.getLogger("flower_llm.server")


def build_secagg_strategy(cfg: RunConfig) -> SecAggFedAvg:
    """The legacy strategy SecAggPlusWorkflow drives, from the run-config."""
    fed = cfg.fed
    return SecAggFedAvg(
        fraction_train=fed.fraction_train,
        # Under DP a round releases whenever SecAgg+ succeeds: skipping rounds with few
        # clients would reveal participation, which the noise does not cover (strategies.dp).
        min_train_clients=1 if cfg.privacy.client_level else fed.min_train_clients,
        min_available_clients=max(fed.min_available_clients, secagg.MIN_SAMPLED_CLIENTS),
    )


def secagg_row(
    result: RoundResult, report: SecAggRoundReport, params: secagg.SecAggParams
) -> dict[str, Any]:
    """The metrics.jsonl line of a SecAgg+ round: the plain columns plus the protocol's."""
    row = round_row(result)
    row.update(
        {
            "aggregation": "secagg+",
            "secagg-failed": report.failed,
            "secagg-num-shares": report.num_shares,
            "secagg-threshold": report.threshold,
            "secagg-clipping-range": params.clipping_range,
            "secagg-quantization-range": params.quantization_range,
            "secagg-max-weight": params.max_weight,
            "secagg-error-bound": params.error_bound(),
            **report.privacy,
        }
    )
    return row


def federate_secagg(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    state: AdapterState,
    *,
    on_round_end: Callable[[RoundResult, SecAggRoundReport, secagg.SecAggParams], bool | None],
    strategy: SecAggFedAvg | None = None,
    evaluate: bool = True,
    noise_rng: np.random.Generator | None = None,
) -> AdapterState:
    """Run ``fed.num-rounds`` SecAgg+ rounds from ``state``; return the final global adapter.

    ``on_round_end`` sees every finished round, failed ones too (their global adapter is
    unchanged); returning True stops the run. ``noise_rng`` draws the DP noise (from the
    operating system when None: the run-config seed is public, and known noise protects
    nothing).
    """
    keys = secagg.ordered_keys(state)
    counting = CountingGrid(grid)
    strategy = strategy or build_secagg_strategy(cfg)
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=cfg.fed.num_rounds),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    thread, stop, registered = start_update_client_manager_thread(counting, legacy.client_manager)  # type: ignore[arg-type]
    registered.wait()
    eval_strategy = build_strategy(cfg)
    central_dp = SecAggCentralNoise(cfg.privacy, noise_rng) if cfg.privacy.client_level else None
    num_rounds = cfg.fed.num_rounds
    try:
        for server_round in range(1, num_rounds + 1):
            start = time.perf_counter()
            log.info("[ROUND %d/%d] SecAgg+", server_round, num_rounds)

            # ---- parameters of this round, from the cohort the strategy will sample ----
            # Flower's node-list thread refreshes every 5 s, or on the wrapped num_available():
            # call it first so that a round does not wait for the next refresh.
            legacy.client_manager.num_available()
            legacy.client_manager.wait_for(strategy.min_available_clients, timeout=86400)
            num_available = legacy.client_manager.num_available()
            strategy.sample_size = num_sampled = strategy.num_to_sample(num_available)
            sampling_rate = min(1.0, num_sampled / num_available)
            if central_dp is not None and num_sampled < cfg.privacy.min_sampled_clients:
                raise ConfigError(
                    f"run-config 'privacy.min-sampled-clients' = {cfg.privacy.min_sampled_clients}"
                    f": only {num_sampled} clients sampled per round; DP noise would swamp them"
                )
            if central_dp is not None and central_dp.would_exceed_budget(sampling_rate):
                log.warning(
                    "Stopping before round %d: epsilon would exceed privacy.target-epsilon = %g",
                    server_round,
                    cfg.privacy.target_epsilon,
                )
                break
            params = secagg.derive_params(
                cfg,
                num_sampled=num_sampled,
                server_round=server_round,
                global_max_abs=secagg.max_abs(state),
            )
            fit_config: dict[str, Scalar] = {
                wire.SERVER_ROUND: server_round,
                wire.LEARNING_RATE: cfg.train.learning_rate_at(server_round, num_rounds),
                secagg.CLIPPING_RANGE: params.clipping_range,
                secagg.MAX_WEIGHT: params.max_weight,
            }
            strategy.fit_config = lambda _round, c=fit_config: c  # type: ignore[misc]

            # ---- the protocol: the strategy receives the sum only ----
            download = [np.asarray(a, dtype=wire.WIRE_DTYPES[cfg.fed.wire_dtype]) for a in
                        secagg.state_to_arrays(state)]  # fmt: skip
            aggregate, report = secagg_round(counting, legacy, server_round, download, params)
            train_metrics: MetricRecord | None = None
            if aggregate is None:
                log.error(
                    "Round %d failed, global adapter unchanged: %s", server_round, report.failed
                )
            else:
                delta, means = secagg.decode_aggregate(aggregate, keys, params.clipping_range)
                train_metrics = MetricRecord({"clients-in-sum": len(report.active)})
                if central_dp is not None:
                    # Noise before anything (saving, evaluation, logs) observes the update.
                    delta, report.privacy = central_dp.noise(
                        delta,
                        num_in_sum=len(report.active),
                        num_sampled=len(report.sampled),
                        params=params,
                        sampling_rate=sampling_rate,
                    )
                else:
                    train_metrics[wire.TRAIN_LOSS] = means[wire.TRAIN_LOSS]
                state = secagg.apply_update(state, delta)

            # ---- evaluation on the Message API, as in the plain path ----
            arrays = wire.to_array_record(state, cfg.fed.wire_dtype)
            eval_metrics = None
            # With DP, the next round's budget check may stop the run after this one: a
            # run evaluates the round it ends with (if the sites sampled stay as many).
            last = central_dp is not None and central_dp.would_exceed_budget(sampling_rate)
            if evaluate and (cfg.fed.evaluates(server_round) or last):
                eval_config = ConfigRecord({wire.SERVER_ROUND: server_round})
                messages = eval_strategy.configure_evaluate(server_round, arrays, eval_config, grid)
                replies = grid.send_and_receive(messages, timeout=cfg.fed.round_timeout)
                eval_metrics = eval_strategy.aggregate_evaluate(server_round, replies)

            dropped = dict(report.dropped)
            if report.failed is not None:
                dropped.update({n: report.failed for n in report.active if n not in dropped})
            result = RoundResult(
                server_round=server_round,
                arrays=arrays,
                train_metrics=train_metrics,
                eval_metrics=eval_metrics,
                report=RoundReport(
                    sampled=report.sampled,
                    accepted=report.active if aggregate is not None else [],
                    dropped=dropped,
                    bytes_down=report.bytes_down,
                    bytes_up=report.bytes_up,
                    updated=aggregate is not None,
                ),
                seconds=time.perf_counter() - start,
            )
            if on_round_end(result, report, params):
                log.info("Stopping after round %d", server_round)
                break
    finally:
        stop.set()
        thread.join()
    return state


def run(grid: Grid, context: Context, cfg: RunConfig) -> None:
    """The ServerApp's main for ``fed.aggregation = "secagg+"``."""
    run_dir = RunDirectory(cfg.output.dir, cfg.output.run_name, run_id=context.run_id)
    run_dir.save_config(cfg)
    started = time.perf_counter()
    name_or_path = resolve_model_path(cfg.model)
    state, lora_cfg = init_adapter(cfg.model, cfg.lora, name_or_path, cfg.seed)
    log.info(
        "Global adapter: %d parameters, %s; SecAgg+ (the server sees only the sum)",
        num_parameters(state),
        run_dir.path,
    )
    num_rounds = cfg.fed.num_rounds

    def on_round_end(
        result: RoundResult, report: SecAggRoundReport, params: secagg.SecAggParams
    ) -> bool:
        run_dir.save_adapter(
            wire.from_array_record(result.arrays), lora_cfg, round_name(result.server_round)
        )
        row = secagg_row(result, report, params)
        run_dir.append_metrics(row)
        log_round(
            result,
            row,
            num_rounds,
            f"{len(result.report.accepted)}/{len(result.report.sampled)} clients in the sum, "
            f"{len(report.dropped)} dropped, {'FAILED' if report.failed else 'updated'}",
        )
        return False

    final = federate_secagg(grid, context, cfg, state, on_round_end=on_round_end)
    history = run_dir.read_metrics()
    summary: dict[str, Any] = {}
    if cfg.privacy.client_level:
        released = [row for row in history if "epsilon" in row]
        summary["privacy"] = {
            "mode": cfg.privacy.mode,
            "epsilon": released[-1]["epsilon"] if released else 0.0,
            "delta": cfg.privacy.delta,
            "noise-multiplier": cfg.privacy.noise_multiplier,
            "clip-norm": cfg.privacy.clip_norm,
            "rounds-released": len(released),
            "caveat": "clients clip under SecAgg+; the server cannot verify it",
        }
    summary.update(
        {
            "aggregation": "secagg+",
            **run_summary(run_dir, history, num_parameters(state), started),
        }
    )
    if conclude(summary, history, num_rounds):  # a run that learned nothing has no final/
        run_dir.save_adapter(final, lora_cfg, FINAL_ADAPTER)
    run_dir.write_summary(summary)
    end_run(run_dir, summary)
