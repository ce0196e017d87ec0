"""The package's import graph has no cycles (module-level and function-level imports alike): a
lazy import inside a function hides a circle from Python, not from the design."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmadapt"


def import_graph() -> dict[str, set[str]]:
    mods = {".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in PKG.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
                for c in [target] + [f"{target}.{a.name}" for a in node.names]:
                    # the package itself (`from . import __version__`) is the root, not a module edge
                    if c in mods and c != m and c != "lmadapt":
                        graph[m].add(c)
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := dfs(v)):
                return c
        state[u] = 2
        stack.pop()
    for m in sorted(graph):
        if m not in state and (c := dfs(m)):
            return c


def test_no_import_cycles():
    graph = import_graph()
    assert "lmadapt.adapted" in graph and graph["lmadapt.trainer"]  # the walk found the modules
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
