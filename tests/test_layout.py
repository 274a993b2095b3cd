"""The house rules, read from the code itself: each module imports only its own stage or earlier ones,
no import cycle, no private name taken from another module, and every name a module lists in
``__all__`` is defined there (no re-export)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

#: The stages in order (docs/reference/layout.md); a module may import from its own or an earlier one.
STAGES = ["io", "runtime", "registration", "data", "models", "inference", "training", "evaluation", "experiment",
          "retrieval"]
PACKAGE = ROOT / "pipeline"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str:
    """The module an import of ``name`` loads (``pipeline.a.b.X`` -> ``pipeline.a.b``)."""
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from pipeline... import name`` and ``import pipeline...`` in a file,
    at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "pipeline"]
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for imported, name in _imports(path):
            full = f"{imported}.{name}" if name and f"{imported}.{name}" in MODULES else imported
            target = _target(full)
            if target != module and target != "pipeline.lazy":
                graph[module].add(target)
    return graph


def test_the_stages_in_the_tree_are_the_stages_listed():
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == sorted(STAGES)


def test_no_module_imports_a_later_stage():
    wrong = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
             if _stage(a) and _stage(b) and STAGES.index(_stage(b)) > STAGES.index(_stage(a))]
    assert wrong == []


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _defined(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_imports_name_the_module_that_defines_the_name_and_no_private_one():
    wrong = []
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    for path in files:
        for imported, name in _imports(path):
            if not name or f"{imported}.{name}" in MODULES or imported not in MODULES:
                continue
            if name.startswith("_"):
                wrong.append(f"{path.relative_to(ROOT)}: private {imported}.{name}")
            elif name not in _defined(MODULES[imported]):
                wrong.append(f"{path.relative_to(ROOT)}: {imported}.{name} is defined elsewhere")
    assert wrong == []


def test_every_module_lists_its_public_names_and_defines_them():
    wrong = []
    for module, path in MODULES.items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        listed = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                  and any(isinstance(t, ast.Name) and t.id == "__all__"
                          for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
        if not listed:
            wrong.append(f"{module}: no __all__")
            continue
        missing = [e.value for e in listed[0].value.elts if e.value not in _defined(path)]
        if missing:
            wrong.append(f"{module}: __all__ lists {missing}, not defined there")
    assert wrong == []
