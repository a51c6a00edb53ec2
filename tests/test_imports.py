"""The import contracts in pyproject.toml ([tool.importlinter]; docs/architecture.md): `lint-imports`
passes, and the modules the torch-free contract names import with torch and megatron blocked."""

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


def test_torch_free_modules_import_without_torch():
    # What the forbidden contract's one ignored import (executors.slurm -> parallel.setup) relies on:
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
