"""Measure how far the golden losses move without a change of code, and how far a real change moves them.

    python tests/golden/noise.py [--old OLD.json ...] [--only NAME ...] [--json OUT.json]

Trains the golden runs (tests/golden/make_golden.py: single, TP=2, PP=2; 20 steps and a final
evaluation) once as they are, then under each configuration below, and prints for each the largest
relative deviation |x - x0| / |x0| from the baseline, per run and per step. Two kinds of rows:

- noise: the same code on other CPU kernels or threads (ATEN_CPU_CAPABILITY, MKL_CBWR,
  OMP_NUM_THREADS), and every --old golden file (the same code's numbers made on another machine);
  tests/test_golden.py's tolerance must lie above all of these;
- change: a real change of 1% or 0.1% (init std, learning rate), which the tolerance must still
  catch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("make_golden", Path(__file__).with_name("make_golden.py"))
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

# name: (kind, environment, extra overrides, runs)
CONFIGS = {
    "aten-avx2": ("noise", {"ATEN_CPU_CAPABILITY": "avx2"}, [], None),
    "aten-default": ("noise", {"ATEN_CPU_CAPABILITY": "default"}, [], None),
    "mkl-compatible": ("noise", {"MKL_CBWR": "COMPATIBLE"}, [], None),
    "mkl-avx2": ("noise", {"MKL_CBWR": "AVX2"}, [], None),
    "threads-2": ("noise", {"OMP_NUM_THREADS": "2"}, [], ["single"]),
    "init-std+1%": ("change", {}, ["model.init_std=0.0202"], None),
    "lr+1%": ("change", {}, ["train.lr=0.00606"], None),
    "init-std+0.1%": ("change", {}, ["model.init_std=0.02002"], ["single"]),
    "lr+0.1%": ("change", {}, ["train.lr=0.006006"], ["single"]),
}


def series(entry: dict) -> list[float]:
    """The losses of one run as one series: the 20 training losses, then the final evaluation."""
    return entry["loss"] + entry["eval_loss"]


def deviations(got: dict, base: dict) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(series(got), series(base), strict=True)]


def report(name: str, kind: str, runs: dict, base: dict) -> dict:
    per_run = {r: deviations(runs[r], base[r]) for r in runs}
    per_step = [max(col) for col in zip(*per_run.values())]
    first = next((i + 1 for i, d in enumerate(per_step) if d), None)
    print(f"{name:<16} {kind:<6} max {max(per_step):.2e}  "
          + "  ".join(f"{r} {max(d):.2e}" for r, d in per_run.items())
          + f"  first differing step {first}")
    print("    per step: " + " ".join(f"{d:.1e}" for d in per_step))
    return {"kind": kind, "per_run": per_run, "per_step": per_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", nargs="*", default=[], help="golden files made elsewhere by the same code")
    ap.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    ap.add_argument("--json", help="write every deviation here")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def train_all(tag: str, env: dict, extra: list[str], runs) -> dict:
            return {r: make_golden.train(tmp / tag / r, n, o + extra, env=env)
                    for r, (n, o) in make_golden.RUNS.items() if runs is None or r in runs}

        base = train_all("base", {}, [], None)
        print(f"baseline: {json.dumps(make_golden.fingerprint())}")
        print("deviation = |x - baseline| / |baseline| over 20 training losses and the final eval loss")
        for path in args.old:
            old = json.loads(Path(path).read_text())
            results[path] = report(Path(path).name, "noise", {r: old[r] for r in base}, base)
        for name, (kind, env, extra, runs) in CONFIGS.items():
            if args.only is None or name in args.only:
                results[name] = report(name, kind, train_all(name, env, extra, runs), base)
    noise = [d for r in results.values() if r["kind"] == "noise" for d in r["per_step"]]
    change = [max(r["per_step"]) for r in results.values() if r["kind"] == "change"]
    if noise:
        print(f"largest noise {max(noise):.2e}")
    if change:
        print(f"smallest real change (largest step of each) {min(change):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
