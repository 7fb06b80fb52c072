"""Fail early, fail loud: checks before anything heavy, failed runs marked failed.

In-process tests with real Flower records; none of them loads a model (a data or
config error must be reported before one is loaded, and the tests assert that).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from flower_llm import wire
from flower_llm.cli import main as cli_main
from flower_llm.config import (
    ConfigError,
    FederationConfig,
    RunConfig,
    app_config,
    check_federation_size,
    check_run_config,
    config_reference_markdown,
    known_keys,
    parse_overrides,
    round_settings,
)
from flower_llm.data import DataError, check_site_data
from flower_llm.outputs import (
    FINAL_ADAPTER,
    STATUS_FAILED,
    STATUS_OK,
    RunDirectory,
    RunDirectoryTaken,
    RunFailed,
    conclude,
    end_run,
    run_outcome,
    setup_failure,
)
from flower_llm.preflight import check_simulation_size

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Run-config, checked on the user's side before `flwr run` submits it
# --------------------------------------------------------------------------------------


def test_readme_config_table_is_generated_from_the_app_config() -> None:
    # Prepare
    table = config_reference_markdown(app_config(ROOT))

    # Assert: scripts/regen-readme-config.py was run after the last change
    assert table in (ROOT / "README.md").read_text()


def test_app_config_declares_exactly_the_keys_the_apps_know() -> None:
    assert set(app_config(ROOT)) == set(known_keys())


def test_local_only_baseline_is_off_by_default_and_on_in_the_default_script() -> None:
    assert app_config(ROOT)["output.local-only-baseline"] is False
    assert "output.local-only-baseline=true" in (ROOT / "scripts/run-default.sh").read_text()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "fed.num-round=2",
            "unknown run-config key 'fed.num-round'; did you mean 'fed.num-rounds'",
        ),
        ('fed.num-rounds="two"', "'fed.num-rounds' = 'two': expected int"),
        ("fed.num-rounds=0", "'fed.num-rounds' = 0: must be a positive integer"),
        ("data.source=3", r"'data.source' = 3: expected str.*quote strings"),
        ('train.lr-schedule="cosin"', "'train.lr-schedule' = 'cosin': must be one of"),
    ],
)
def test_a_bad_override_is_named_before_submitting(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_run_config(parse_overrides([override]), app_config(ROOT))


def test_an_int_override_of_a_float_key_is_accepted() -> None:
    cfg = check_run_config(parse_overrides(["train.learning-rate=1"]), app_config(ROOT))
    assert cfg.train.learning_rate == 1.0


def test_federation_smaller_than_the_minimum_names_both_numbers() -> None:
    with pytest.raises(ConfigError, match=r"has 1 node.*'fed.min-available-clients' = 2"):
        check_federation_size(FederationConfig(), 1, "num-supernodes")
    check_federation_size(FederationConfig(), 2, "num-supernodes")  # enough: no error


def test_check_config_command_prints_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    code = cli_main(["check-config", "--app", str(ROOT), "--run-config", "fed.num-round=2"])

    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "did you mean 'fed.num-rounds'" in err


def test_check_config_command_checks_num_supernodes(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["check-config", "--app", str(ROOT), "--federation-config", "num-supernodes=1"]
    assert cli_main(args) == 2
    assert "fed.min-available-clients' = 2" in capsys.readouterr().err
    assert cli_main([*args[:-1], "num-supernodes=4 client-resources-num-cpus=1"]) == 0


def test_a_model_that_cannot_load_here_is_named_before_submitting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["check-config", "--app", str(ROOT), "--run-config"]
    assert cli_main([*args, 'model.name="gpt2-not-cached-here"']) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    assert cli_main([*args, 'model.name="/no/such/model"']) == 2
    assert "'model.name' = '/no/such/model': no such directory" in capsys.readouterr().err


def test_check_config_checks_a_local_data_source_for_the_simulated_sites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = b'{"instruction": "a", "response": "b"}\n'
    source = _write(tmp_path / "three.jsonl", row * 3)
    args = ["check-config", "--app", str(ROOT), "--run-config"]
    overrides = f'data.source="{source}" data.partitioner="iid"'
    assert cli_main([*args, overrides, "--federation-config", "num-supernodes=4"]) == 2
    assert "has 3 records for 4 simulated sites" in capsys.readouterr().err
    assert cli_main([*args, 'data.source="/no/such.jsonl"']) == 2
    assert "no such data file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# A simulation too small for fed.min-* fails at once
# --------------------------------------------------------------------------------------


class InMemoryGrid:
    """Stands in for Flower's simulation grid, which the check recognises by name."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_a_too_small_simulation_fails_within_seconds_with_the_numbers() -> None:
    import time

    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"has 1 node\(s\) \(num-supernodes"):
        check_simulation_size(InMemoryGrid(1), FederationConfig())
    assert time.monotonic() - started < 5
    check_simulation_size(InMemoryGrid(2), FederationConfig())


# --------------------------------------------------------------------------------------
# Data, checked before a model loads
# --------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("header.csv", b"instruction,response\n", "header but no rows"),
        ("latin.csv", b"instruction,response\ncaf\xe9,ok\n", "line 2 is not UTF-8 .byte 0xe9"),
        (
            "latin.jsonl",
            b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9"}\n',
            "line 2 is not UTF-8",
        ),
        ("broken.jsonl", b'{"instruction": "a", "response": "b"}\n{"instr\n', "line 2 is not JSON"),
        ("cols.jsonl", b'{"q": "a", "a": "b"}\n', "has no column 'instruction'"),
    ],
)
def test_a_bad_data_file_is_named_with_the_problem(
    tmp_path: Path, name: str, data: bytes, match: str
) -> None:
    source = _write(tmp_path / name, data)
    with pytest.raises(DataError, match=match) as error:
        check_site_data(RunConfig().data.__class__(source=source))
    assert source in str(error.value)


def test_too_few_rows_for_the_sites_names_source_rows_and_sites(tmp_path: Path) -> None:
    row = b'{"instruction": "a", "response": "b", "domain": "x"}\n'
    source = _write(tmp_path / "three.jsonl", row * 3)
    for partitioner in ("iid", "by-field"):
        data = RunConfig().data.__class__(source=source, partitioner=partitioner)
        for site in range(4):
            with pytest.raises(DataError, match=r"has 3 records for 4 simulated sites.*8 records"):
                check_site_data(data, partition_id=site, num_partitions=4)


def test_the_embedded_data_passes_for_the_default_sites() -> None:
    assert check_site_data(RunConfig().data, partition_id=3, num_partitions=4) > 8


def _train_message(config: ConfigRecord) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are stamped with the run and node of the process that makes them.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(
        content=RecordDict({wire.ARRAYS: ArrayRecord(), wire.CONFIG: config}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )


def test_client_app_reports_a_data_error_before_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: any model load fails the test
    import client_apps.qlora as qlora
    import flower_llm.client as client

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(client, "load_base_model", no_load)
    qlora.sessions.cache_clear()
    source = _write(tmp_path / "empty.jsonl", b"\n")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={"data.source": source},
    )

    # Execute
    reply = qlora.train(_train_message(ConfigRecord({"server-round": 1})), context)

    # Assert: one error reply naming the file, which the server records and stops on
    assert reply.has_error()
    assert reply.error.reason.startswith("DataError: run-config 'data.source'")
    assert f"{source}': the file is empty" in reply.error.reason
    assert setup_failure({1: f"client error: {reply.error.reason}"})


# --------------------------------------------------------------------------------------
# Stock Flower strategies send no learning rate
# --------------------------------------------------------------------------------------


def test_missing_learning_rate_follows_the_run_config_schedule() -> None:
    cfg = RunConfig()
    num_rounds = cfg.fed.num_rounds

    # A stock FedAvg sends only the round
    assert round_settings(ConfigRecord({"server-round": 2}), cfg) == (
        2,
        cfg.train.learning_rate_at(2, num_rounds),
    )
    # ... or nothing at all
    assert round_settings(ConfigRecord(), cfg) == (1, cfg.train.learning_rate)
    # This project's server sends both
    assert round_settings(ConfigRecord({"server-round": 3, "learning-rate": 0.5}), cfg) == (3, 0.5)


# --------------------------------------------------------------------------------------
# A run that learned nothing is failed; a run directory belongs to one run
# --------------------------------------------------------------------------------------


def _row(server_round: int, updated: bool, dropped: dict[str, str] | None = None) -> dict:
    return {
        "round": server_round,
        "updated": updated,
        "clients-sampled": 2,
        "clients-replied": 2 - len(dropped or {}),
        "dropped": dropped or {},
    }


def test_a_run_that_updated_nothing_is_failed_with_the_drop_reasons(tmp_path: Path) -> None:
    # Prepare
    history = [_row(1, False, {"11": "client error: DataError: empty"}), _row(2, False)]
    run_dir = RunDirectory(tmp_path, "r", run_id=7)
    summary: dict = {"final-adapter": str(run_dir.path / FINAL_ADAPTER)}

    # Execute
    ok = conclude(summary, history, planned=3)
    run_dir.write_summary(summary)

    # Assert
    assert not ok
    written = json.loads((run_dir.path / "summary.json").read_text())
    assert written["status"] == STATUS_FAILED
    assert written["final-adapter"] is None
    assert "no round updated the model (2 of 3 ran)" in written["reason"]
    assert "DataError: empty" in written["reason"]
    assert written["failed-rounds"]["1"]["dropped"] == {"11": "client error: DataError: empty"}
    with pytest.raises(RunFailed, match="no round updated"):
        end_run(run_dir, written)


def test_a_run_with_some_failed_rounds_says_how_many() -> None:
    outcome = run_outcome([_row(1, True), _row(2, False, {"5": "no reply"}), _row(3, True)], 3)
    assert outcome["status"] == STATUS_OK
    assert outcome["rounds-failed"] == 1
    assert "1 of 3 rounds did not update the model (rounds 2)" in outcome["reason"]


def test_setup_errors_on_every_site_stop_the_run_but_a_timeout_does_not() -> None:
    assert setup_failure({1: "client error: DataError: x", 2: "client error: ConfigError: y"})
    assert setup_failure({1: "client error: DataError: x", 2: "no reply"}) is None


def test_an_older_run_never_writes_into_a_newer_runs_directory(tmp_path: Path) -> None:
    # Prepare: run 1 writes, then run 2 takes the same run name
    old = RunDirectory(tmp_path, "default", run_id=1)
    old.append_metrics({"round": 1})
    new = RunDirectory(tmp_path, "default", run_id=2)

    # Execute / Assert
    with pytest.raises(RunDirectoryTaken, match="belongs to run"):
        old.append_metrics({"round": 2})
    new.append_metrics({"round": 1})
    assert [r["round"] for r in new.read_metrics()] == [1]
    assert (new.path / "run-id").read_text().strip() == "2"


# --------------------------------------------------------------------------------------
# One local SuperLink per checkout
# --------------------------------------------------------------------------------------


def _ports(checkout: Path, flwr_home: Path) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/local-ports.py"), str(checkout), str(flwr_home)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_each_checkout_gets_its_own_stable_local_superlink_ports(tmp_path: Path) -> None:
    a = _ports(tmp_path / "checkout-a", tmp_path / "home-a")
    b = _ports(tmp_path / "checkout-b", tmp_path / "home-b")
    assert a == _ports(tmp_path / "checkout-a", tmp_path / "home-a")  # stable
    assert a != b
    assert a[1] == a[0] + 1 and all(39999 < p < 60000 for p in (*a, *b))


# --------------------------------------------------------------------------------------
# Progress and known warnings
# --------------------------------------------------------------------------------------


def test_progress_ticker_gives_the_round_and_an_estimate_from_earlier_rounds() -> None:
    import logging

    from flower_llm.logs import ProgressTicker

    ticker = ProgressTicker(every=12.0)

    def line(message: str, at: float) -> None:
        record = logging.LogRecord("strategies", logging.INFO, "", 0, message, None, None)
        ticker.emit(record)
        ticker.round_started = at if "ROUND" in message else ticker.round_started

    assert ticker.status(0.0).startswith("starting")
    line("[ROUND 1/3]", 0.0)
    assert "first round also loads" in ticker.status(20.0)
    ticker.round_started = 0.0
    line("[ROUND 2/3]", 40.0)
    ticker.round_seconds = [40.0]
    # 10 s into round 2 of 3 after a 40-s round: 30 s left, run ends in ~70 s
    assert ticker.status(50.0) == (
        "round 2/3: running for 10 s, about 30 s left (rounds took ~40 s); run ends in ~70 s"
    )


def test_progress_ticker_speaks_after_a_silence(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import time

    from flower_llm.logs import ProgressTicker

    ticker = ProgressTicker(every=1.0, logger_name="flower_llm.progress-test")
    with caplog.at_level(logging.INFO, logger="flower_llm.progress-test"):
        ticker.start()
        time.sleep(2.5)
        ticker.stop()
    assert any("starting" in r.getMessage() for r in caplog.records)


def test_known_warnings_are_filtered_one_by_one_and_others_still_show() -> None:
    import warnings

    from flower_llm.logs import filter_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        warnings.warn_explicit(
            "`torch.jit.script_method` is deprecated. Please switch to `torch.compile`",
            DeprecationWarning,
            "x.py",
            1,
            module="torch.jit._script",
        )
        warnings.warn_explicit("something new", DeprecationWarning, "x.py", 1, module="torch.jit")
    assert [str(w.message) for w in caught] == ["something new"]


# --------------------------------------------------------------------------------------
# Adapters name their base model portably; export writes a self-contained directory
# --------------------------------------------------------------------------------------


def test_an_exported_adapter_loads_in_another_tree_with_peft_and_flower_llm(
    tmp_path: Path,
) -> None:
    # Prepare: a run's final adapter on the embedded model, with non-zero LoRA B
    import shutil

    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flower_llm.adapters import adapter_state, init_adapter
    from flower_llm.cli import resolve_source
    from flower_llm.config import LoraSettings, ModelConfig
    from flower_llm.embedded import embedded_model_dir

    state, lora_cfg = init_adapter(ModelConfig(), LoraSettings(r=4), str(embedded_model_dir()), 0)
    state = {k: v + 0.01 for k, v in state.items()}
    run = RunDirectory(tmp_path / "outputs", "r")
    run.save_config(RunConfig())
    final = run.save_adapter(state, lora_cfg, FINAL_ADAPTER)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "embedded"
    )

    # Execute: export, then move the export somewhere else
    assert cli_main(["export", "--run", str(run.path), "--out", str(tmp_path / "exp")]) == 0
    moved = Path(shutil.move(tmp_path / "exp", tmp_path / "elsewhere" / "model"))
    shutil.rmtree(tmp_path / "outputs")

    # Assert: peft given the base directory loads the same adapter weights
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(moved / "base"), moved / "adapter"
    )
    loaded = adapter_state(model)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_allclose(loaded[key], value, rtol=1e-6)
    # ... and flower-llm resolves the adapter's base name without the run directory
    import argparse

    source = resolve_source(
        argparse.Namespace(run=None, model="embedded", adapter=str(moved / "adapter"), base=None)
    )
    assert source.adapter == moved / "adapter"
