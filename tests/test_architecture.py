"""One direction of dependencies: read every covidx module's imports with ``ast`` (top level and inside
functions) and check the layering tasks/weights/layers/evaluation -> data -> models -> runs -> training ->
explain -> systems/reports -> serving -> command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "covidx"

# Lowest first; a module may import its own layer or lower ones.
LAYERS = [
    ("covidx", "covidx.tasks", "covidx.weights", "covidx.layers", "covidx.evaluation"),
    ("covidx.data",),
    ("covidx.models",),
    ("covidx.runs", "covidx.model_card"),
    ("covidx.training",),
    ("covidx.explain",),
    ("covidx.systems", "covidx.reports"),
    ("covidx.serving",),
    ("covidx.train", "covidx.evaluate", "covidx.predict", "covidx.export", "covidx.cascade",
     "covidx.data.__main__", "covidx.explain.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer"
    return rank


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """(imported covidx module, line, inside a function) for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            if not t.startswith("covidx"):
                continue
            while t not in MODULES and "." in t:
                t = t.rpartition(".")[0]
            if t != module:
                out.append((t, node.lineno, id(node) not in top))
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_import_from_a_lower_layer_into_a_higher_one():
    wrong = [f"{m}:{line} imports {t} ({'in a function' if inside else 'top level'})"
             for m, edges in GRAPH.items() for t, line, inside in edges
             if layer_of(t) > layer_of(m) and t != "covidx"]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    # Package __init__ re-exports point down into their own package; a cycle through them is still a cycle.
    edges = {m: sorted({t for t, _, _ in e if t != "covidx"}) for m, e in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m)


def test_imports_inside_functions_say_why():
    """An import inside a function hides the direction of a dependency: allowed only with a stated reason."""
    hidden = []
    for m, edges in GRAPH.items():
        lines = MODULES[m].read_text().splitlines()
        for t, line, inside in edges:
            if inside and "#" not in lines[line - 1]:
                hidden.append(f"{m}:{line} imports {t} inside a function without a reason")
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("package", ["covidx.models"])
def test_importing_models_loads_nothing_above_them(package):
    code = (f"import sys, {package}; above = ('covidx.serving', 'covidx.explain', 'covidx.systems', 'covidx.runs', "
            "'covidx.training', 'covidx.reports'); "
            "print([m for m in sys.modules if m.startswith(above)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip().splitlines()[-1]
    assert out == "[]", out
