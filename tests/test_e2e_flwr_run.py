"""`flwr run .` for real: the README's default job, on the embedded model, 4 sites, 3 rounds."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from tests.flwr_procs import flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the default job once through `flwr run`; stop its local SuperLink by PID."""
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    cache = tmp_path_factory.mktemp("cache")
    try:
        proc = flwr_run(
            home,
            run_config=f'output.dir="{out}" output.run-name="e2e" output.local-only-baseline=true',
            num_supernodes=4,
            timeout=600,
            cache=cache,
        )
    finally:
        pids = local_superlink_pids(home)
        stop_pids(pids)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert pids, "flwr run should have started a local SuperLink"
    assert not local_superlink_pids(home), "the local SuperLink should be stopped"
    run_dir = out / "e2e"
    assert (run_dir / "summary.json").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return run_dir


def test_heldout_loss_falls_round_over_round(default_run: Path) -> None:
    summary = json.loads((default_run / "summary.json").read_text())
    losses = summary["eval-loss-by-round"]
    assert len(losses) == 3
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_every_site_took_part_in_every_round(default_run: Path) -> None:
    rows = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["clients-sampled"] == 4
        assert row["clients-replied"] == 4
        assert row["bytes-up"] > 0 and row["bytes-down"] > 0


def test_adapters_travel_in_the_packed_wire_layout(default_run: Path) -> None:
    # fed.wire-layout = packed by default: each train instruction is the adapter as one
    # array plus its layout header, and the bytes counted are exactly that. Round 1's
    # global adapter is the seeded initial one, which the sites rebuild themselves
    # (fed.initial-from-seed): its instructions carry a few hundred bytes, no arrays.
    from flwr.app import ConfigRecord, RecordDict

    from flower_llm import wire
    from flower_llm.adapters import init_adapter
    from flower_llm.config import app_config, parse_run_config
    from flower_llm.embedded import embedded_model_dir

    cfg = parse_run_config(app_config(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    state, _ = init_adapter(cfg.model, cfg.lora, str(embedded_model_dir()), seed=0)
    config = ConfigRecord({wire.SERVER_ROUND: 1})
    plain = RecordDict({wire.ARRAYS: wire.to_array_record(state), wire.CONFIG: config})
    packed = wire.pack(plain)
    rows = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[0]["bytes-down"] < 4 * 1024 < wire.payload_bytes(packed), rows[0]
    for row in rows[1:]:
        assert row["bytes-down"] == 4 * wire.payload_bytes(packed), row
        assert row["bytes-down"] != 4 * wire.payload_bytes(plain)
    assert len(packed.array_records[wire.ARRAYS]) == 1 and len(state) > 10


def test_federated_adapter_beats_every_local_only_adapter(default_run: Path) -> None:
    summary = json.loads((default_run / "summary.json").read_text())
    federated = summary["union-eval-loss/federated"]
    local_only = summary["union-eval-loss/local-only"]
    assert len(local_only) == 4
    assert all(federated < loss for loss in local_only.values()), (federated, local_only)


def test_final_adapter_loads_with_peft(default_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flower_llm.adapters import adapter_state
    from flower_llm.config import ModelConfig
    from flower_llm.models import resolve_model_path

    # The adapter names its base portably ("embedded", which flower-llm builds anywhere)
    config = json.loads((default_run / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "embedded"
    path = resolve_model_path(ModelConfig(name=config["base_model_name_or_path"]))
    base = AutoModelForCausalLM.from_pretrained(path)
    model = PeftModel.from_pretrained(base, default_run / "final")
    state = adapter_state(model)
    assert state, "the adapter should hold LoRA weights"
    # B matrices start at zero: after training they must not be.
    assert any(np.abs(v).max() > 0 for k, v in state.items() if "lora_B" in k)


def test_bad_run_config_value_stops_the_run_naming_the_key(tmp_path: Path) -> None:
    # Prepare
    home, out = tmp_path / "flwr-home", tmp_path / "out"

    # Execute
    try:
        proc = flwr_run(
            home,
            run_config=f'lora.r=-1 output.dir="{out}" output.run-name="bad"',
            num_supernodes=2,
            timeout=300,
        )
    finally:
        stop_pids(local_superlink_pids(home))

    # Assert: the ServerApp refuses before any model loads or any round starts
    output = proc.stdout + proc.stderr
    assert "run-config 'lora.r' = -1: must be a positive integer" in output
    assert not (out / "bad" / "metrics.jsonl").exists()
