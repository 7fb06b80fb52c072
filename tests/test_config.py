"""Run-config parsing: defaults, types, bad values named by key, and the app's declared keys."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flower_llm.config import (
    ConfigError,
    RunConfig,
    config_reference_markdown,
    known_keys,
    parse_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def declared_app_config() -> dict[str, object]:
    """[tool.flwr.app.config] of pyproject.toml, flattened the way Flower flattens it."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flatten(prefix: str, value: object) -> dict[str, object]:
        if isinstance(value, dict):
            out: dict[str, object] = {}
            for k, v in value.items():
                out.update(flatten(f"{prefix}.{k}" if prefix else k, v))
            return out
        return {prefix: value}

    return flatten("", table)


def test_empty_run_config_gives_the_embedded_defaults() -> None:
    cfg = parse_run_config({})
    assert cfg == RunConfig()
    assert cfg.model.name == "embedded"
    assert cfg.model.quantization == "nf4"


def test_values_are_parsed_into_sections() -> None:
    cfg = parse_run_config({"lora.r": 16, "train.learning-rate": 1, "fed.weighting": "tokens"})
    assert cfg.lora.r == 16
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.fed.weighting == "tokens"


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"lora.r": -4}, "lora.r"),
        ({"lora.r": 0}, "lora.r"),
        ({"model.quantization": "int3"}, "model.quantization"),
        ({"fed.fraction-train": 0.0}, "fed.fraction-train"),
        ({"fed.fraction-train": 1.5}, "fed.fraction-train"),
        ({"lora.dropout": 1.0}, "lora.dropout"),
        ({"data.eval-fraction": 1.0}, "data.eval-fraction"),
        ({"train.batch-size": "8"}, "train.batch-size"),
        ({"train.local-steps": True}, "train.local-steps"),
        ({"data.prompt-template": "no placeholder"}, "data.prompt-template"),
        ({"train.lr-min": 1.0}, "train.lr-min"),
        ({"fed.round-timeout": -1}, "fed.round-timeout"),
        ({"fed.evaluate-every": 0}, "fed.evaluate-every"),
    ],
)
def test_bad_value_names_the_key(run_config: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=f"'{named}'"):
        parse_run_config(run_config)  # type: ignore[arg-type]


def test_unknown_key_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown run-config key 'lora\.rank'.*'lora\.r'"):
        parse_run_config({"lora.rank": 8})


def test_learning_rate_schedule_across_rounds() -> None:
    train = parse_run_config(
        {"train.learning-rate": 1.0, "train.lr-min": 0.1, "train.lr-schedule": "linear"}
    ).train
    assert train.learning_rate_at(1, 5) == pytest.approx(1.0)
    assert train.learning_rate_at(3, 5) == pytest.approx(0.55)
    assert train.learning_rate_at(5, 5) == pytest.approx(0.1)
    cosine = parse_run_config({"train.learning-rate": 1.0, "train.lr-min": 0.0}).train
    assert cosine.learning_rate_at(2, 3) == pytest.approx(0.5)


def test_app_declares_every_key_and_parses_cleanly() -> None:
    # Prepare
    declared = declared_app_config()

    # Execute
    cfg = parse_run_config(declared)  # type: ignore[arg-type]

    # Assert: --run-config can only override declared keys, so all must be declared
    assert set(declared) == set(known_keys())
    assert cfg.fed.num_rounds >= 3


def test_readme_documents_every_key() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in known_keys() if f"`{key}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"
    assert config_reference_markdown() in readme


def test_evaluation_every_n_rounds_always_includes_the_last() -> None:
    fed = parse_run_config({"fed.num-rounds": 7, "fed.evaluate-every": 3}).fed
    assert [r for r in range(1, 8) if fed.evaluates(r)] == [3, 6, 7]
    every = parse_run_config({"fed.num-rounds": 3}).fed  # the default: every round
    assert [r for r in range(1, 4) if every.evaluates(r)] == [1, 2, 3]
