"""The project's packages depend one way: no import cycle, hidden in a function or not.

Reads every module of ``flower_llm``, ``strategies``, ``client_apps`` and ``server_apps``
with ``ast`` (no import runs), collects each import of a project module wherever it
stands (module level, inside a function, under ``TYPE_CHECKING``), and looks for a cycle
among modules and for a dependency against the layering
``server_apps -> strategies -> flower_llm`` and ``client_apps -> flower_llm``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flower_llm", "strategies", "client_apps", "server_apps")
ALLOWED = {
    "flower_llm": {"flower_llm"},
    "strategies": {"strategies", "flower_llm"},
    "client_apps": {"client_apps", "flower_llm"},
    "server_apps": {"server_apps", "strategies", "flower_llm"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" imports pkg.mod when that is a module
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_is_read_from_the_sources() -> None:
    graph = import_graph()
    # a few edges the code certainly has, so an empty graph cannot pass
    assert "strategies.fedavg" in graph["strategies.dp"]
    assert "client_apps.secagg" in graph["client_apps.qlora"]
    assert "strategies.rounds" in graph["server_apps.fedavg"]
    assert "flower_llm.client" in graph["client_apps.qlora"]  # imported inside a function


def test_find_cycle_finds_a_cycle_hidden_in_a_function() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_projects_packages() -> None:
    assert find_cycle(import_graph()) is None


def test_dependencies_point_one_way() -> None:
    wrong = sorted(
        f"{module} imports {dep}"
        for module, deps in import_graph().items()
        for dep in deps
        if dep.split(".")[0] not in ALLOWED[module.split(".")[0]]
    )
    assert wrong == []


def test_the_serverapp_and_strategies_load_without_the_training_stack() -> None:
    # The ServerApp checks its run-config before torch, transformers and peft load (seconds
    # on a small machine); in-process simulations' workers that unpickle a strategy's
    # helpers do not pay for them either.
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "bitsandbytes")
    code = (
        "import sys, server_apps.fedavg, strategies.dp, strategies.secagg, strategies.personal\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""
