"""The package's import graph: imports only go down the pipeline, and never in a circle.

Every `import` in advisor/ counts, at module level or inside a function (an import moved
into a function still ties the two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "advisor"

# Floors, lowest first: a module may import its own floor and the floors below it.
FLOORS: list[tuple[str, ...]] = [
    ("advisor.version", "advisor.errors", "advisor.schema", "advisor.vllm_versions"),
    ("advisor.blockhash", "advisor.kvmemory", "advisor.kvlayers", "advisor.kvlayout", "advisor.runfolder",
     "advisor.workload",
     "advisor.executor", "advisor.executor_ray", "advisor.compiled", "advisor.jsonio"),
    ("advisor.ingest",),
    ("advisor.tokens",),
    ("advisor.analyze", "advisor.sim"),
    ("advisor.recommend",),
    ("advisor.replay",),
    ("advisor.report",),
    ("advisor.pipeline",),
    ("advisor",),  # the package's face: the public API
    ("advisor.cli", "advisor.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}


def floor_of(module: str) -> int:
    best, floor = -1, -1
    for i, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), i
    assert floor >= 0, f"{module} is on no floor: add it to FLOORS"
    return floor


def imports_of(module: str) -> set[str]:
    """The advisor modules `module` imports (`from advisor import x` names module x when
    there is one, else the package face)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "advisor"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "advisor":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_on_a_floor() -> None:
    for m in MODULES:
        floor_of(m)


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
            for m, targets in graph.items() for t in targets if floor_of(t) > floor_of(m)]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_imports_only_go_down() -> None:
    assert not upward_edges(GRAPH), "\n".join(upward_edges(GRAPH))


def test_no_import_circles() -> None:
    cycles = find_cycles(GRAPH)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_are_for() -> None:
    """The checker itself, on a copy of the graph with an upward edge and a circle planted."""
    graph = {m: set(t) for m, t in GRAPH.items()}
    graph["advisor.schema"].add("advisor.report.stage")
    assert upward_edges(graph) == ["advisor.schema (floor 0) imports advisor.report.stage (floor 7)"]
    graph["advisor.sim.fast.trace"].add("advisor.sim.grid")  # grid imports trace, through others
    assert any(c[0] == c[-1] and "advisor.sim.fast.trace" in c for c in find_cycles(graph))


def test_only_replay_imports_vllm() -> None:
    """vLLM is optional: only the replay engine imports it, and only inside functions."""
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("vllm", "torch") for n in names), f"{m} imports {names} at load"
