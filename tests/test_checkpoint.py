"""Full-state checkpoints: round trip, atomic replacement, damaged files, settings checks."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flower_llm import checkpoint as ckpt
from flower_llm.checkpoint import (
    Checkpoint,
    CheckpointError,
    arrays_to_record,
    capture_rng,
    checkpoint_path,
    config_mismatches,
    flat_config,
    load_checkpoint,
    record_to_arrays,
    restore_rng,
    resume_from_checkpoint,
    save_checkpoint,
    write_round_checkpoint,
)
from flower_llm.config import ConfigError, RunConfig, parse_run_config
from flower_llm.outputs import METRICS_FILE
from strategies.dp import DifferentialPrivacyFedAvg
from strategies.fedavg import WeightedFedAvg


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """A small adapter whose keys are NOT in sorted order, in two dtypes."""
    rng = np.random.default_rng(seed)
    return {
        "z.lora_B.weight": rng.normal(size=(8, 2)).astype(np.float32),
        "a.lora_A.weight": rng.normal(size=(2, 8)).astype(np.float32),
        "m.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float16),
    }


def sample_checkpoint(server_round: int = 2, seed: int = 0) -> Checkpoint:
    return Checkpoint(
        server_round=server_round,
        adapter=adapter(seed),
        config=flat_config(RunConfig()),
        strategy={"moments": [0.5, 0.25], "clip-norm": 0.1},
        extra={"accountant": {"rdp": [1.0, 2.0], "steps": 3}},
        rng=capture_rng(),
        metrics=[{"round": r, "eval-loss": 4.0 - r, "dropped": {}} for r in range(1, 3)],
        stopped=False,
    )


def resume_config(tmp_path: Path, **overrides: Any) -> RunConfig:
    run_config: dict[str, Any] = {
        "output.dir": str(tmp_path),
        "output.run-name": "run",
        "output.resume": True,
    }
    run_config.update(overrides)
    return parse_run_config(run_config)


# --------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------


def test_round_trip_keeps_every_part_with_key_order_and_dtypes(tmp_path: Path) -> None:
    # Prepare
    original = sample_checkpoint()
    path = tmp_path / "checkpoint.safetensors"

    # Execute
    save_checkpoint(path, original)
    loaded = load_checkpoint(path)

    # Assert
    assert list(loaded.adapter) == list(original.adapter)  # not sorted by safetensors
    for key, value in original.adapter.items():
        assert loaded.adapter[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded.adapter[key], value)
    assert loaded.server_round == 2 and loaded.stopped is False
    assert loaded.config == original.config
    assert loaded.strategy == original.strategy
    assert loaded.extra == original.extra
    assert loaded.metrics == original.metrics
    assert loaded.rng == json.loads(json.dumps(original.rng))


@settings(max_examples=25, deadline=None)
@given(
    arrays=st.dictionaries(
        st.text(alphabet="abcdefghij._", min_size=1, max_size=12),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float16, np.float64]),
            shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_any_adapter_survives_bit_for_bit(
    arrays: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("prop") / "c.safetensors"
    save_checkpoint(path, Checkpoint(server_round=1, adapter=arrays, config={}))
    loaded = load_checkpoint(path).adapter
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        # Bytes, not values: NaN payloads and signed zeros must survive too.
        assert loaded[key].dtype == value.dtype and loaded[key].tobytes() == value.tobytes()


def test_array_record_round_trip_keeps_dtype_and_order() -> None:
    state = adapter()
    back = record_to_arrays(arrays_to_record(state))
    assert list(back) == list(state)
    assert all(back[k].dtype == state[k].dtype for k in state)
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_restored_rng_repeats_the_same_draws() -> None:
    # Prepare: the state after some use, then what would have come next
    random.seed(7)
    np.random.seed(7)
    random.random(), np.random.rand()
    state = json.loads(json.dumps(capture_rng()))  # as it comes back from the file
    expected = ([random.random() for _ in range(3)], np.random.rand(3), random.sample(range(50), 5))

    # Execute: scramble, then restore
    random.seed(99)
    np.random.seed(99)
    restore_rng(state)

    # Assert
    assert [random.random() for _ in range(3)] == expected[0]
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.sample(range(50), 5) == expected[2]  # how Flower samples nodes


# --------------------------------------------------------------------------------------
# Atomicity
# --------------------------------------------------------------------------------------


def test_crash_before_the_rename_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, sample_checkpoint(server_round=1, seed=1))

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(ckpt.os, "replace", crash)

    # Execute
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, sample_checkpoint(server_round=2, seed=2))
    monkeypatch.undo()

    # Assert: round 1 is intact, and a later save still works over the leftover temp file
    loaded = load_checkpoint(path)
    assert loaded.server_round == 1
    np.testing.assert_array_equal(loaded.adapter["a.lora_A.weight"], adapter(1)["a.lora_A.weight"])
    save_checkpoint(path, sample_checkpoint(server_round=3, seed=3))
    assert load_checkpoint(path).server_round == 3


def test_crash_half_way_through_writing_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, sample_checkpoint(server_round=1, seed=1))
    real_fdopen = os.fdopen

    class HalfWriter:
        """A file object that dies after writing half of what it is given."""

        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.fh.close()

        def write(self, data: bytes) -> int:
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            raise OSError("disk full / process killed mid-write")

    def half_fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return HalfWriter(real_fdopen(fd, mode, *args, **kwargs))

    monkeypatch.setattr(ckpt.os, "fdopen", half_fdopen)

    # Execute
    with pytest.raises(OSError, match="mid-write"):
        save_checkpoint(path, sample_checkpoint(server_round=2, seed=2))
    monkeypatch.undo()

    # Assert
    assert load_checkpoint(path).server_round == 1
    # the half file went to a uniquely named temporary file, removed on the error
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --------------------------------------------------------------------------------------
# Damaged files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:5], id="shorter-than-header"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"not a checkpoint at all, just text", id="garbage"),
        # The last bytes are adapter values: a flipped bit there parses fine.
        pytest.param(lambda b: b[:-3] + bytes([b[-3] ^ 0x01]) + b[-2:], id="bit-flip-in-data"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path, damage: Any) -> None:
    # Prepare
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, sample_checkpoint())
    path.write_bytes(damage(path.read_bytes()))

    # Execute / Assert
    with pytest.raises(CheckpointError, match="corrupt or incomplete") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_safetensors_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=re.escape(str(path)) + ".*not a flower-llm/checkpoint"
    ):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------
# Settings a continuation must share
# --------------------------------------------------------------------------------------


def test_changes_to_the_maths_are_named_and_operational_ones_allowed() -> None:
    # Prepare
    saved = flat_config(RunConfig())
    now = parse_run_config(
        {
            "lora.r": 8,
            "seed": 7,
            "data.source": "/site/other.jsonl",
            "model.name": "/models/other",
            "output.dir": "/elsewhere",  # where outputs go: may change
            "output.run-name": "x",
            "fed.round-timeout": 30.0,  # how long to wait: may change
            "fed.min-train-clients": 1,
        }
    )

    # Execute
    problems = config_mismatches(saved, now)

    # Assert
    assert [p.split(":")[0] for p in problems] == ["data.source", "lora.r", "model.name", "seed"]
    assert "lora.r: checkpoint 16, now 8" in problems


def test_num_rounds_may_change_only_with_a_constant_learning_rate() -> None:
    cosine = flat_config(RunConfig())
    assert config_mismatches(cosine, parse_run_config({"fed.num-rounds": 9})) == [
        "fed.num-rounds: checkpoint 3, now 9"
    ]
    constant = flat_config(parse_run_config({"train.lr-schedule": "constant"}))
    more = parse_run_config({"train.lr-schedule": "constant", "fed.num-rounds": 9})
    assert config_mismatches(constant, more) == []


def test_a_key_newer_than_the_checkpoint_matches_at_its_default() -> None:
    saved = flat_config(RunConfig())
    del saved["secagg.num-shares"]
    assert config_mismatches(saved, RunConfig()) == []
    assert config_mismatches(saved, parse_run_config({"secagg.num-shares": 5})) == [
        "secagg.num-shares: checkpoint 0, now 5"
    ]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"output.run-name": ""}, "output.run-name"),
        ({"output.local-only-baseline": True}, "output.local-only-baseline"),
    ],
)
def test_resume_settings_that_cannot_work_fail_at_parse_time(
    overrides: dict[str, Any], key: str
) -> None:
    run_config: dict[str, Any] = {"output.resume": True, "output.run-name": "run"}
    run_config.update(overrides)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_run_config(run_config)


def test_a_dpsgd_run_can_be_resumed() -> None:
    # Each site keeps its DP-SGD accountant in its site-state store (tests/test_site_state.py).
    cfg = parse_run_config({"output.resume": True, "output.run-name": "run", "privacy.dpsgd": True})
    assert cfg.output.resume and cfg.privacy.dpsgd


# --------------------------------------------------------------------------------------
# What the ServerApp calls
# --------------------------------------------------------------------------------------


def test_resume_without_a_checkpoint_never_starts_over(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*checkpoint\.safetensors"):
        resume_from_checkpoint(tmp_path / "run", resume_config(tmp_path), WeightedFedAvg())


def test_resume_refuses_a_checkpoint_of_different_maths(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = resume_config(tmp_path)
    write_round_checkpoint(run_dir, cfg, 1, arrays_to_record(adapter()), WeightedFedAvg(), [])

    # Execute / Assert
    with pytest.raises(CheckpointError) as err:
        resume_from_checkpoint(
            run_dir, resume_config(tmp_path, **{"lora.alpha": 8, "seed": 1}), WeightedFedAvg()
        )
    assert str(checkpoint_path(run_dir)) in str(err.value)
    assert "lora.alpha: checkpoint 32, now 8" in str(err.value)
    assert "seed: checkpoint 42, now 1" in str(err.value)


def test_resume_restores_rng_and_rewrites_metrics_to_the_checkpointed_rounds(
    tmp_path: Path,
) -> None:
    # Prepare: round 2 was checkpointed; round 3's row was appended, then the server died
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = resume_config(tmp_path)
    rows = [{"round": 1, "eval-loss": 3.0}, {"round": 2, "eval-loss": 2.5}]
    random.seed(3)
    write_round_checkpoint(run_dir, cfg, 2, arrays_to_record(adapter()), WeightedFedAvg(), rows)
    expected_sample = random.sample(range(100), 4)
    (run_dir / METRICS_FILE).write_text(
        "".join(json.dumps(r) + "\n" for r in [*rows, {"round": 3, "eval-loss": 2.0}])
    )
    random.seed(12345)

    # Execute
    loaded = resume_from_checkpoint(run_dir, cfg, WeightedFedAvg())

    # Assert
    assert loaded.server_round == 2
    assert random.sample(range(100), 4) == expected_sample
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_dp_strategy_state_continues_exactly(tmp_path: Path) -> None:
    # Prepare: two rounds of accounting and noise draws, then a checkpoint
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = {
        "privacy.mode": "server-adaptive",
        "privacy.noise-multiplier": 1.0,
        "privacy.clipped-count-stddev": 1.0,
        "output.local-only-baseline": False,
    }
    cfg = resume_config(tmp_path, **overrides)

    def dp_strategy() -> DifferentialPrivacyFedAvg:
        return DifferentialPrivacyFedAvg.from_config(
            WeightedFedAvg(), cfg, np.random.default_rng(5)
        )

    first = dp_strategy()
    first.central.fix_population(10)
    first._fix_adaptive_noise()
    for _ in range(2):
        first.central.accountant.step()
        fraction = first._noisy_fraction(unclipped=3, counted=10)
        first.central.clip_norm *= math.exp(-0.2 * (fraction - 0.5))
    write_round_checkpoint(run_dir, cfg, 2, arrays_to_record(adapter()), first, [])
    expected_noise = first.central.rng.normal(size=4)

    # Execute
    second = dp_strategy()
    resume_from_checkpoint(run_dir, cfg, second)

    # Assert
    assert second.epsilon() == first.epsilon() and second.central.accountant.rounds == 2
    assert second.central.clip_norm == first.central.clip_norm != 0.1
    assert second.central.expected_clients == first.central.expected_clients
    assert second.central.update_noise_multiplier == first.central.update_noise_multiplier
    np.testing.assert_array_equal(second.central.rng.normal(size=4), expected_noise)


def test_random_streams_continue_and_stay_independent(tmp_path: Path) -> None:
    """Eval draws never move the train stream; a resumed run draws what the first would."""
    from flower_llm.streams import RandomStreams

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = resume_config(tmp_path)
    # Prepare: two runs with the same seed, one evaluating a lot more than the other
    busy, quiet = RandomStreams(cfg.seed), RandomStreams(cfg.seed)
    busy.evaluate.random(1000)
    quiet.evaluate.random(3)
    assert busy.train.random() == quiet.train.random()  # evaluation never moved training
    write_round_checkpoint(
        run_dir, cfg, 1, arrays_to_record(adapter()), WeightedFedAvg(), [], streams=busy
    )
    expected = {"train": busy.train.random(5), "evaluate": busy.evaluate.random(5)}

    # Execute
    resumed = RandomStreams(cfg.seed)
    resume_from_checkpoint(run_dir, cfg, WeightedFedAvg(), resumed)

    # Assert
    np.testing.assert_array_equal(resumed.train.random(5), expected["train"])
    np.testing.assert_array_equal(resumed.evaluate.random(5), expected["evaluate"])


def test_dp_checkpoint_refused_by_a_run_with_other_noise(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = {"privacy.mode": "server-fixed", "output.local-only-baseline": False}
    cfg = resume_config(tmp_path, **overrides)
    strategy = DifferentialPrivacyFedAvg.from_config(
        WeightedFedAvg(), cfg, np.random.default_rng(1)
    )
    write_round_checkpoint(run_dir, cfg, 1, arrays_to_record(adapter()), strategy, [])
    other = resume_config(tmp_path, **overrides, **{"privacy.noise-multiplier": 2.0})
    with pytest.raises(
        CheckpointError, match=re.escape("privacy.noise-multiplier: checkpoint 1.0, now 2.0")
    ):
        resume_from_checkpoint(run_dir, other, WeightedFedAvg())


def test_checkpoint_is_owner_only_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """With DP on it holds the noise generator's state: nobody else may read it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_round_checkpoint(
        run_dir, RunConfig(), 1, arrays_to_record(adapter()), WeightedFedAvg(), []
    )
    assert sorted(os.listdir(run_dir)) == ["checkpoint.safetensors"]
    assert (run_dir / "checkpoint.safetensors").stat().st_mode & 0o777 == 0o600


def test_a_resume_that_finds_no_run_leaves_no_empty_directory(tmp_path: Path) -> None:
    from flower_llm.outputs import RunDirectory

    run_dir = RunDirectory(tmp_path, "never-ran", resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resume_from_checkpoint(run_dir.path, resume_config(tmp_path), WeightedFedAvg())
    assert not (tmp_path / "never-ran").exists()
