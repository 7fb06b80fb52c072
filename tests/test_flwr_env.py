"""scripts/flwr-env.sh's flwr_config_args, which both run scripts use to find overrides."""

from __future__ import annotations

import os
import shutil
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


def activation_hook() -> str:
    """The block of scripts/setup.sh that adds this checkout's environment to activate."""
    lines = (ROOT / "scripts" / "setup.sh").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("hook="))
    ends = [i for i, line in enumerate(lines) if line == "fi" and i > start]
    return "\n".join(lines[start : ends[1] + 1]) + "\n"  # the heredoc holds the first fi


def activate_and_print(checkout: Path, *, then_source: Path | None = None) -> dict[str, str]:
    """The Flower variables of a fresh bash that activated ``checkout``'s venv."""
    names = (
        "FLOWER_LLM_CHECKOUT",
        "FLWR_HOME",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT",
    )
    script = f'. "{checkout}/.venv/bin/activate"; '
    if then_source is not None:
        script += f'. "{then_source}/scripts/flwr-env.sh"; '
    script += "; ".join(f'echo "{n}=${{{n}:-}}"' for n in names)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def fake_checkout(root: Path) -> Path:
    """A checkout's scripts and Flower profiles, and a venv with only an activate script."""
    shutil.copytree(ROOT / "scripts", root / "scripts")
    shutil.copy(ROOT / "pyproject-flwr.toml", root / "pyproject-flwr.toml")
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "activate").write_text('VIRTUAL_ENV="x"\nexport VIRTUAL_ENV\n')
    return root


def test_setup_makes_activation_source_this_checkouts_flower_environment(tmp_path: Path) -> None:
    # Prepare: two checkouts whose venvs got setup.sh's hook (twice for the first)
    first, second = fake_checkout(tmp_path / "a"), fake_checkout(tmp_path / "b")
    for checkout in (first, first, second):
        subprocess.run(["bash", "-c", activation_hook()], cwd=checkout, check=True)

    # Execute
    activated = activate_and_print(first)
    switched = activate_and_print(first, then_source=second)

    # Assert: activation alone sets what `flwr run .` needs; the hook is added once;
    # sourcing another checkout's environment moves the shell to its home and ports
    assert (first / ".venv" / "bin" / "activate").read_text().count("flower-llm:") == 2
    assert activated["FLOWER_LLM_CHECKOUT"] == str(first)
    assert activated["FLWR_HOME"] == str(first / ".flwr-home")
    assert activated["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert switched["FLOWER_LLM_CHECKOUT"] == str(second)
    assert switched["FLWR_HOME"] == str(second / ".flwr-home")
    assert (
        switched["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
        != activated["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    )
