"""The house's shape: layers that import one way, no cycles, no hidden imports, small modules.

Layers (docs/architecture.md): the core (``fedpriv`` minus the apps and launchers) imports nothing
above it; ``strategies`` and ``clients`` import only the core (and themselves); the two Flower apps
and the launchers (TOP below) may import anything. Read from the source with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedpriv", "strategies", "clients")
TOP = ("fedpriv.server_app", "fedpriv.client_app", "fedpriv.federation", "fedpriv.launch", "fedpriv.simulation",
       "fedpriv.preflight", "fedpriv.deploy", "fedpriv.compare", "fedpriv.flwr_app", "fedpriv.flwr_run",
       "fedpriv.worker_pool")
# Own modules that may be imported inside a function, and why (an optional heavy dependency).
LAZY_OK: dict[str, str] = {
    "fedpriv.client_app": "fedpriv.worker_pool's warm-up imports it on a worker's own thread, after Ray counts "
                          "the worker alive (an import in the worker's __init__ would delay that by seconds)",
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    if module.split(".")[0] in ("strategies", "clients"):
        return module.split(".")[0]
    if any(module == t or module.startswith(t + ".") for t in TOP):
        return "top"
    return "core"


def sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = (path, ast.parse(path.read_text()))
    return out


SOURCES = sources()


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Own modules an import statement names (``from a import b`` names ``a.b`` if it is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]
    else:
        return []
    return [n for n in names if n.split(".")[0] in PACKAGES]


def imports(top_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, (path, tree) in SOURCES.items():
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        is_package = path.name == "__init__.py"
        graph[module] = {t for n in nodes for t in imported(n, module, is_package) if t != module}
    return graph


def test_layers_import_one_way():
    allowed = {"core": {"core"}, "strategies": {"core", "strategies"}, "clients": {"core", "clients"},
               "top": {"core", "strategies", "clients", "top"}}
    wrong = sorted(f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in imports(False).items()
                   for t in targets if layer(t) not in allowed[layer(m)])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = imports(top_level_only=True)
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_hidden_imports_of_own_modules():
    """Every import of the project's own modules sits at the top of its module (none in functions)."""
    hidden = []
    for module, (path, tree) in SOURCES.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    for target in imported(node, module, path.name == "__init__.py"):
                        if target not in LAZY_OK:
                            hidden.append(f"{module}.{fn.name} imports {target}")
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("folder", ["fedpriv", "strategies", "clients", "scripts"])
def test_modules_stay_small(folder):
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_the_layering_check_can_fail():
    """The checker sees a core module importing a strategy (a synthetic source, never written)."""
    tree = ast.parse("from strategies.central_dp import CentralDPAggregator\n")
    targets = [t for n in tree.body for t in imported(n, "fedpriv.updates", False)]
    assert targets == ["strategies.central_dp"] and layer("fedpriv.updates") == "core"
    assert layer(targets[0]) == "strategies"
