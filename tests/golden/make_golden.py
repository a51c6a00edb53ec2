"""Regenerate the golden loss file of the dense example (run from the repository root):

    python tests/golden/make_golden.py

Each entry trains `examples/dense-tiny.yaml` for 20 steps (single process, TP=2, PP=2 on 2 ranks) and
records every per-step training loss and the final evaluation loss. tests/test_golden.py requires
today's code to reproduce them bit for bit: a refactoring that should not change numerics proves it.
Regenerate only for a change that is meant to change the numbers, and say so in its commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dense-tiny.yaml"
GOLDEN = Path(__file__).with_name("dense-tiny.json")
COMMON = ["train.steps=20", "eval.every=20", "eval.batches=2"]
RUNS = {"single": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"])}


def train(out: Path, nproc: int, overrides: list[str]) -> dict:
    """Train one golden entry into `out`; its per-step losses and final eval loss."""
    cmd = [sys.executable, "-m", "scaleforge.cli", "train", str(EXAMPLE), "--out", str(out),
           "--nproc", str(nproc)]
    for item in COMMON + overrides:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [r["loss"] for r in records if "loss" in r],
            "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r]}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        golden = {name: train(Path(tmp) / name, n, o) for name, (n, o) in RUNS.items()}
    GOLDEN.write_text(json.dumps({"overrides": COMMON, **golden}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
