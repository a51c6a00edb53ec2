"""The prior's data files regenerated with the fitter (`plan/prior.py` reads them).

`python -m scaleforge.orchestrator.fit.prior_fit EPOCH.csv` refits `prior_samples.yaml` (Epoch's
240 Chinchilla points, 400 bootstrap refits); `--collect PLAN.yaml ...` appends finished CPU ladders'
points to `small_ladder.csv` and `--small` refits `small_prior.yaml` from it.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from scaleforge.orchestrator.fit import fitter
from scaleforge.orchestrator.fit.laws.chinchilla import LAW, published
from scaleforge.orchestrator.fit.refit import collect_plan, fit_points
from scaleforge.orchestrator.plan import prior
from scaleforge.orchestrator.plan.planfile import load_plan


def collect_small(plan_paths: list[str | Path]) -> Path:
    """Append the points refit fits (each used run's final loss and its annealing-corrected
    intermediate evaluations) of finished plans to prior.SMALL_DATA."""
    rows = []
    if prior.SMALL_DATA.is_file():
        with open(prior.SMALL_DATA, newline="") as handle:
            rows = [r for r in csv.DictReader(line for line in handle if not line.startswith("#"))]
    have = {r["run"] for r in rows}
    for path in plan_paths:
        kept = [r for r in collect_plan(load_plan(path), path) if not r.excluded and Path(r.path).name not in have]
        points, _ = fit_points(kept, True, [])
        ids = {r.name: Path(r.path).name for r in kept}
        for q in points:
            rows.append({"run": ids[q.run], "kind": q.kind, "step": q.step, "N": f"{q.N:.0f}",
                         "D": f"{q.D:.0f}", "L": f"{q.L:.5f}"})
        have |= set(ids.values())
    with open(prior.SMALL_DATA, "w", newline="") as handle:
        handle.write("# CPU ladders on the bundled corpus (512-id BPE, seq_len 128, WSD): refit's points, final\n")
        handle.write("# eval losses and annealing-corrected intermediate evaluations; one run a directory name\n")
        handle.write("# (python -m scaleforge.orchestrator.fit.prior_fit --collect PLAN.yaml ...; then --small)\n")
        writer = csv.DictWriter(handle, fieldnames=["run", "kind", "step", "N", "D", "L"])
        writer.writeheader()
        writer.writerows(rows)
    return prior.SMALL_DATA


def write_small(count: int = 200, seed: int = 0) -> Path:
    """Fit Approach 3 to prior.SMALL_DATA with `count` bootstrap refits and write prior.SMALL_FILE."""
    with open(prior.SMALL_DATA, newline="") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    data = {k: np.array([float(r[k]) for r in rows]) for k in ("N", "D", "L")}
    groups = np.array([r["run"] for r in rows])  # resample whole runs
    result = fitter.fit(LAW, data, fitter.FitOptions(bootstrap=count, seed=seed), groups=groups)
    p = result.params
    lines = [
        f"# Approach 3 on the {len(rows)} points of {len(set(groups))} runs of {prior.SMALL_DATA.name} "
        f"with {count} bootstrap refits (whole runs resampled)",
        "# (python -m scaleforge.orchestrator.fit.prior_fit --small).",
        "params: {" + ", ".join(f"{k}: {p[k]:.6g}" for k in prior.PARAM_NAMES) + "}",
        "ci: {" + ", ".join(f"{k}: [{result.ci[k][0]:.6g}, {result.ci[k][1]:.6g}]" for k in prior.PARAM_NAMES) + "}",
        f"columns: [{', '.join(prior.PARAM_NAMES)}]",
        "samples:",
    ]
    for theta in result.samples:
        q = published(theta)
        lines.append("- [" + ", ".join(f"{q[k]:.6g}" for k in prior.PARAM_NAMES) + "]")
    prior.SMALL_FILE.write_text("\n".join(lines) + "\n")
    return prior.SMALL_FILE


def write_samples(csv_path: str | Path, count: int = 400, seed: int = 0) -> Path:
    """Regenerate `prior_samples.yaml` from Epoch's CSV (needs numpy and the fitter; ~15 s)."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    n = np.array([float(r["Model Size"]) for r in rows])
    flops = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.sort(np.argsort(loss)[:-5])  # Epoch drops the 5 highest-loss points
    data = {"N": n[keep], "D": flops[keep] / (6 * n[keep]), "L": loss[keep]}
    result = fitter.fit(LAW, data, fitter.FitOptions(bootstrap=count, seed=seed))
    lines = [
        "# Bootstrap refits of L = E + A/N^alpha + B/D^beta on Epoch's 240 Chinchilla points",
        f"# (scaleforge.orchestrator.fit.prior_fit.write_samples, {count} resamples, seed {seed}).",
        f"columns: [{', '.join(prior.PARAM_NAMES)}]",
        "samples:",
    ]
    for theta in result.samples:
        p = published(theta)
        lines.append("- [" + ", ".join(f"{p[k]:.6g}" for k in prior.PARAM_NAMES) + "]")
    prior.SAMPLES_FILE.write_text("\n".join(lines) + "\n")
    return prior.SAMPLES_FILE


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--collect"]:
        print(collect_small(args[1:]))
    elif args[:1] == ["--small"]:
        print(write_small())
    else:
        print(write_samples(args[0] if args else "tests/data/chinchilla_fig4_epoch.csv"))
