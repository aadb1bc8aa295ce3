"""No import cycles among mmfuse's modules (engine/ -> mmfuse, kernels/ -> mmfuse.kernels) and the
bench scripts (bench/, imported by file name).

The graph is read from the source with `ast`, without importing anything: every `import` and
`from ... import` statement counts, those inside functions too (a lazy import that closes a cycle
still couples the two modules). An edge goes from a module to each module it names and to the
packages (`__init__.py`) that importing it runs, except the importer's own enclosing packages,
which Python has always begun importing first.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mmfuse": ROOT / "engine", "mmfuse.kernels": ROOT / "kernels", "": ROOT / "bench"}


def module_files(packages: dict) -> dict:
    """Module name -> file for every .py file under each folder (recursively); the folder is the
    package `name` ("" for a folder of top-level scripts)."""
    modules = {}
    for name, folder in packages.items():
        for path in sorted(Path(folder).rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(([name] if name else []) + parts)] = path
    return modules


def _ancestors(module: str) -> list:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(module: str, path: Path, modules: dict) -> set:
    """The modules of `modules` that importing `module` (the file `path`) may import."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            named.add(source)
            named.update(f"{source}.{alias.name}" for alias in node.names)
    own = set(_ancestors(module))
    out = set()
    for name in named:
        for target in _ancestors(name) + [name]:
            if target in modules and target != module and target not in own:
                out.add(target)
    return out


def import_graph(packages: dict) -> dict:
    modules = module_files(packages)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict) -> list:
    """Every strongly connected group of modules, each as one cycle through it: [a, b, ..., a]."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, set(g), g[0]) for g in groups]


def _cycle_through(graph: dict, group: set, start: str) -> list:
    """A shortest path start -> ... -> start inside the group (breadth first)."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles():
    graph = import_graph(PACKAGES)
    assert "mmfuse.kernels.attention_dispatch" in graph and "mmfuse.envs" in graph  # the mapping works
    assert "mmfuse.envs" in graph["mmfuse.kernels.attention_dispatch"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _write(root: Path, files: dict) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_cycles_in_a_synthetic_package(tmp_path):
    _write(tmp_path / "pkg", {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from . import b  # lazy: still an edge\n    return b\n",
        "b.py": "import os\nfrom pkg.a import f\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..d import g\n",
        "d.py": "def g():\n    import pkg.sub.c\n",
        "e.py": "from .sub import c\n",  # one way only: no cycle
    })
    _write(tmp_path / "scripts", {"run.py": "import helper\n", "helper.py": "x = 1\n"})
    graph = import_graph({"pkg": tmp_path / "pkg", "": tmp_path / "scripts"})
    assert graph["pkg.b"] == {"pkg.a"}  # os is not ours; pkg (b's own package) is not an edge
    assert graph["pkg.e"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["run"] == {"helper"}
    cycles = sorted(find_cycles(graph))
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.d", "pkg.sub.c", "pkg.d"]]


def test_checker_sees_package_init_cycles(tmp_path):
    """Importing a module of another package runs that package's __init__, which may close a cycle."""
    _write(tmp_path / "top", {
        "__init__.py": "",
        "x.py": "from top.inner.y import v\n",
        "inner/__init__.py": "from top import x\n",
        "inner/y.py": "v = 1\n",
        "z.py": "import top.z\nfrom . import x\n",  # itself: no edge; x: one way
    })
    graph = import_graph({"top": tmp_path / "top"})
    assert graph["top.x"] == {"top.inner", "top.inner.y"} and graph["top.z"] == {"top.x"}
    assert find_cycles(graph) == [["top.inner", "top.x", "top.inner"]]
