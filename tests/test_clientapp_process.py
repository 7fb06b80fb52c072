"""The faster ``flwr-clientapp`` start (flower_llm/clientapp_process.py) and what it pins.

It stands in for Flower's console script by importing Flower's own module under a bare
package; these tests fail if Flower's layout moves, before a deployment would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from flower_llm import clientapp_process

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "scripts" / "deploy" / "bin" / "flwr-clientapp"


def test_flower_still_names_the_function_the_shim_runs() -> None:
    # Prepare
    scripts = metadata.entry_points(group="console_scripts", name="flwr-clientapp")

    # Execute
    values = [entry.value for entry in scripts]

    # Assert
    assert values == [clientapp_process.ENTRY_POINT]


def test_the_shim_runs_flowers_function_without_the_supernode_server() -> None:
    # Prepare: a fresh process, as the SuperExec starts one per message
    code = (
        "import json, sys\n"
        "from flower_llm.clientapp_process import load_flwr_clientapp\n"
        "f = load_flwr_clientapp()\n"
        "print(json.dumps({'module': f.__module__, 'name': f.__qualname__,\n"
        "  'server': 'flwr.supernode.cli.flower_supernode' in sys.modules,\n"
        "  'uvicorn': 'uvicorn' in sys.modules}))\n"
    )

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "module": clientapp_process.MODULE,
        "name": "flwr_clientapp",
        "server": False,
        "uvicorn": False,
    }


def test_the_function_is_flowers_own() -> None:
    # Prepare: the full import, as Flower's console script does it
    from flwr.supernode.cli import flwr_clientapp

    # Execute
    loaded = clientapp_process.load_flwr_clientapp()

    # Assert
    assert loaded is flwr_clientapp


def test_the_script_answers_as_flwr_clientapp() -> None:
    # Prepare: the script is found through PATH, as the SuperExec finds it
    env = {**os.environ, "PATH": f"{SHIM.parent}{os.pathsep}{Path(sys.executable).parent}"}

    # Execute
    proc = subprocess.run(
        ["flwr-clientapp", "--help"], env=env, capture_output=True, text=True, check=False
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: flwr-clientapp" in proc.stdout
    assert "--runtime-api-address" in proc.stdout


def test_a_changed_layout_falls_back_to_flowers_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the bare-package import fails, as it would if Flower moved the module
    def moved() -> None:
        raise ImportError("moved")

    monkeypatch.setattr(clientapp_process, "load_flwr_clientapp", moved)
    monkeypatch.setattr(sys, "argv", ["flwr-clientapp", "--help"])

    # Execute
    code = clientapp_process.run()

    # Assert: Flower's own flwr_clientapp parsed the arguments (argparse exits 0 on --help)
    assert code == 0


@pytest.mark.parametrize(
    ("code", "status", "stderr"),
    [(None, 0, ""), (0, 0, ""), (3, 3, ""), ("stopped: bad input", 1, "stopped: bad input\n")],
)
def test_the_fast_end_exits_as_sys_exit_would(code: object, status: int, stderr: str) -> None:
    # Prepare: output still buffered when the process ends (stdout is a pipe: block-buffered)
    script = (
        "import sys\n"
        "from flower_llm.clientapp_process import end\n"
        "print('reply pushed')\n"
        f"end({code!r})\n"
        "print('never')\n"
    )

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )

    # Assert: the status sys.exit gives, and nothing buffered lost
    assert proc.returncode == status
    assert proc.stdout == "reply pushed\n"
    assert proc.stderr == stderr


def test_the_script_exits_with_flowers_status_on_bad_arguments() -> None:
    # Prepare
    env = {**os.environ, "PATH": f"{SHIM.parent}{os.pathsep}{Path(sys.executable).parent}"}

    # Execute: no token, so Flower's argparse refuses the arguments and exits 2
    proc = subprocess.run(
        ["flwr-clientapp", "--insecure"], env=env, capture_output=True, text=True, check=False
    )

    # Assert: its status and its whole message, through the fast end
    assert proc.returncode == 2
    assert "flwr-clientapp: error: one of the arguments --token --token-file is required" in (
        proc.stderr
    )
