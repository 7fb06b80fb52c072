"""Our ClientApp under a stock Flower FedAvg ServerApp that sends no train config."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]


def test_stock_fedavg_without_train_config_trains_our_client_app() -> None:
    # Prepare: a ServerApp written as a Flower user would, with Flower's own FedAvg
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from client_apps.qlora import app as client_app
    from flower_llm import wire
    from flower_llm.adapters import init_adapter
    from flower_llm.config import parse_run_config
    from flower_llm.models import resolve_model_path

    cfg = parse_run_config({})  # run_simulation hands the apps an empty run-config
    start, _ = init_adapter(cfg.model, cfg.lora, resolve_model_path(cfg.model), cfg.seed)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
        outcome["result"] = strategy.start(
            grid=grid, initial_arrays=wire.to_array_record(start), num_rounds=1, timeout=300
        )

    # Execute
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )

    # Assert: both sites trained (no KeyError for the missing learning rate) and evaluated
    result = outcome["result"]
    trained = wire.from_array_record(result.arrays)
    assert trained.keys() == start.keys()
    assert any(not np.array_equal(trained[k], start[k]) for k in start)
    train_metrics = result.train_metrics_clientapp[1]
    assert np.isfinite(train_metrics["train-loss"]) and train_metrics["num-tokens"] > 0
    assert np.isfinite(result.evaluate_metrics_clientapp[1]["eval-loss"])
