"""Regenerate the golden loss file of the dense example (run from the repository root):

    python tests/golden/make_golden.py

Each entry trains `examples/dense-tiny.yaml` for 20 steps (single process, TP=2, PP=2 on 2 ranks) and
records every per-step training loss and the final evaluation loss, together with the fingerprint of
the machine and software that produced them (`fingerprint()`). tests/test_golden.py requires today's
code to reproduce them bit for bit where the fingerprint matches, and within the measured
cross-machine noise elsewhere (tests/golden/noise.py measures it). A refactoring proves itself
numerics-neutral with `make golden-compare BASE=<commit>` (tests/golden/compare.py), which trains
these runs at both commits on one machine and requires equal losses bit for bit.
Regenerate only for a change that is meant to change the numbers, or to record them on another
machine, and say which in its commit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = Path("examples") / "dense-tiny.yaml"  # relative to the tree that is trained
GOLDEN = Path(__file__).with_name("dense-tiny.json")
COMMON = ["train.steps=20", "eval.every=20", "eval.batches=2"]
RUNS = {"single": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"])}
THREADS = 1  # OMP_NUM_THREADS of every rank
# Environment variables that select other CPU kernels (and so other rounding) in torch, MKL, oneDNN.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA",
              "ONEDNN_MAX_CPU_ISA")


def tree_env(root: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a golden run of the tree `root`: its source first on PYTHONPATH."""
    full = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONWARNINGS="default")
    full.update(env or {})
    full["PYTHONPATH"] = os.pathsep.join(
        [str(root)] + [p for p in full.get("PYTHONPATH", "").split(os.pathsep) if p])
    return full


def train(out: Path, nproc: int, overrides: list[str], *, root: Path = ROOT,
          env: dict[str, str] | None = None) -> dict:
    """Train one golden entry of the tree `root` (its own source and example) into `out`.

    The ranks import `scaleforge` from `root` (PYTHONPATH), never from the installed package, so a
    second checkout of another commit trains with its own code. `env` adds or overrides variables
    (tests/golden/noise.py varies the kernels and threads through it). Returns the per-step losses
    and the final evaluation loss.
    """
    cmd = [sys.executable, "-m", "scaleforge.cli", "train", str(root / EXAMPLE), "--out", str(out),
           "--nproc", str(nproc)]
    for item in COMMON + overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=tree_env(root, env), cwd=root, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [r["loss"] for r in records if "loss" in r],
            "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r]}


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    if found := re.search(r"^model name\s*:\s*(.*)$", text, re.M):
        model = found.group(1).strip()
    if found := re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M):
        flags = sorted(found.group(1).split())
    return model, flags


def fingerprint(threads: int = THREADS) -> dict:
    """What decides the rounding of the golden runs besides the code: the machine and the software.

    Two runs whose fingerprints are equal produce the same losses bit for bit; any difference (CPU
    model or instruction-set flags, torch build, a kernel-selecting environment variable, thread
    count, a dependency version) may change the last bits. The CPU capability is read in this process,
    which sees the same ATEN_CPU_CAPABILITY as the ranks it launches.
    """
    import numpy
    import torch

    model, flags = _cpuinfo()
    # The build description without its capability line (that one is recorded by itself below).
    build = "\n".join(line for line in torch.__config__.show().splitlines()
                      if "CPU capability usage" not in line)

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": model,
        "cpu_flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "torch_build_sha256": hashlib.sha256(build.encode()).hexdigest()[:16],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "env": {name: os.environ.get(name) for name in KERNEL_ENV},
        "megatron_core": version("megatron-core"),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        golden = {name: train(Path(tmp) / name, n, o) for name, (n, o) in RUNS.items()}
    record = {"overrides": COMMON, "fingerprint": fingerprint(), **golden}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
