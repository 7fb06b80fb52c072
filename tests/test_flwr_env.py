"""scripts/flwr-env.sh's flwr_config_args, which both run scripts use to find overrides."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config_args(*args: str) -> list[str]:
    """FLWR_CONFIG_ARGS after `flwr_config_args ARGS`, one element a line."""
    script = (
        f'set -euo pipefail; . "{ROOT}/scripts/flwr-env.sh"; flwr_config_args "$@"; '
        'for a in ${FLWR_CONFIG_ARGS[@]+"${FLWR_CONFIG_ARGS[@]}"}; do printf "%s\\n" "$a"; done'
    )
    proc = subprocess.run(
        ["bash", "-c", script, "bash", *args], capture_output=True, text=True, check=True
    )
    return proc.stdout.splitlines()


def test_every_spelling_of_the_overrides_is_picked_in_order() -> None:
    # Execute
    picked = config_args(
        "local",
        "--stream",
        "-c",
        'a=1 b="x y"',
        "--federation-config=num-supernodes=4",
        "--format",
        "json",
        "--run-config=c=2",
        "--federation-config",
        "client-resources-num-cpus=1",
    )

    # Assert
    assert picked == [
        "--run-config",
        'a=1 b="x y"',
        "--federation-config",
        "num-supernodes=4",
        "--run-config",
        "c=2",
        "--federation-config",
        "client-resources-num-cpus=1",
    ]


def test_no_overrides_give_an_empty_list_and_a_last_option_without_value_an_empty_one() -> None:
    assert config_args("local", "--stream") == []
    assert config_args("--run-config") == ["--run-config", ""]
