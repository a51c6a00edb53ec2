"""The import contracts in pyproject.toml ([tool.importlinter]; docs/architecture.md): `lint-imports`
passes, no module of scaleforge/ is on an import cycle, and the modules the torch-free contract names
import with torch and megatron blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lint_imports():
    # the console script `make setup` installs beside the venv's python (import-linter, a dev extra)
    script = Path(sys.executable).with_name("lint-imports")
    assert script.exists(), f"{script} is missing: run `make setup` (import-linter is in the dev extras)"
    # --no-cache: nothing written into the checkout; run from the root, where pyproject.toml is
    proc = subprocess.run([str(script), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports found a broken contract:\n{proc.stdout}\n{proc.stderr}"
    assert "0 broken" in proc.stdout, proc.stdout


def import_cycles(package: str) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected part of
    `package`'s import graph, function-local imports counted (grimp reads every import statement)."""
    import grimp

    graph = grimp.build_graph(package, cache_dir=None)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[list[str]] = []

    def visit(root: str) -> None:  # Tarjan's algorithm, iterative: the graph has ~200 modules
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    part = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        part.append(top)
                        if top == node:
                            break
                    if len(part) > 1:
                        parts.append(sorted(part))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in edges:
        if module not in index:
            visit(module)
    cycles = []
    for part in parts:  # the shortest way from the part's first module back to itself
        inside, start = set(part), part[0]
        paths = {start: [start]}
        frontier = [start]
        while frontier and len(paths[start]) < 2:
            nxt = []
            for node in frontier:
                for child in edges[node]:
                    if child == start:
                        paths[start] = paths[node] + [start]
                        break
                    if child in inside and child not in paths:
                        paths[child] = paths[node] + [child]
                        nxt.append(child)
                if len(paths[start]) > 1:
                    break
            frontier = nxt
        cycles.append(paths[start])
    return cycles


def test_import_cycles_are_found():
    # the check itself: a two-module circle in a throwaway package is named
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "cyclepkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "a.py").write_text("def f():\n    from cyclepkg import b  # hidden in a function\n")
        (pkg / "b.py").write_text("from cyclepkg import a\n")
        sys.path.insert(0, tmp)
        try:
            assert import_cycles("cyclepkg") == [["cyclepkg.a", "cyclepkg.b", "cyclepkg.a"]]
        finally:
            sys.path.remove(tmp)
            sys.modules.pop("cyclepkg", None)


def test_no_import_cycle():
    # docs/architecture.md: no module of scaleforge/ imports itself through other modules, not even
    # through a function-local import; a cycle is broken by moving code to the module that owns it
    cycles = import_cycles("scaleforge")
    assert not cycles, "import cycles (function-local imports counted): " + "; ".join(
        " -> ".join(cycle) for cycle in cycles)


def test_torch_free_modules_import_without_torch():
    # What the forbidden contract's one ignored import (executors.slurm_task -> parallel.setup) relies on:
    # at import time none of these modules loads torch or megatron, however it reaches them.
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "megatron"):
                    raise ImportError(f"{name} is blocked")
        sys.meta_path.insert(0, Block())
        import scaleforge.arch as arch, scaleforge.orchestrator as orch
        names = [m.name for m in pkgutil.walk_packages(orch.__path__, "scaleforge.orchestrator.")]
        names += [f"scaleforge.arch.{m.name}.config" for m in pkgutil.iter_modules(arch.__path__) if m.ispkg
                  and m.name != "common"]
        names += ["scaleforge.parallel.layout", "scaleforge.parallel.memory", "scaleforge.rundir"]
        for name in names:
            importlib.import_module(name)
        print(len(names))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 30
