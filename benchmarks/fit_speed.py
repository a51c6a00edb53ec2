"""Full-grid Chinchilla Approach-3 fit: the batched fitter against a naive loop, plus bootstrap time.

Naive: scipy L-BFGS-B from each of the 4,500 grid starts, one start at a time, numerical gradients,
a vectorised numpy objective (summed Huber, delta 1e-3, on log-sum-exp log-loss). Ours:
`scaleforge.orchestrator.fit.fitter.fit` (every start at once, analytic derivatives). Both on Epoch's 240
points (the 5 highest losses dropped); the script checks they reach the same optimum.

    python benchmarks/fit_speed.py [--naive-starts K] [--bootstrap 4000]

`--naive-starts K` times K evenly spaced starts and extrapolates the naive time linearly to all
4,500 (the output says so). Last line: `fit_speedup=<x> full_fit_s=<y> bootstrap_s=<z>`.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

# One BLAS thread for both sides (the naive loop is single-threaded too). On a busy 2-core machine a
# second BLAS thread makes the small matrix products ~10x slower (7.7 vs 0.6 ms for 4,500 x 240 x 3).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings)

from scaleforge.orchestrator.fit import fitter as F  # noqa: E402
from scaleforge.orchestrator.fit.laws import chinchilla  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "chinchilla_fig4_epoch.csv"


def epoch_points(path: Path) -> dict[str, np.ndarray]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(loss, kind="stable")[:-5]
    return {"N": n[keep], "D": c[keep] / (6 * n[keep]), "L": loss[keep]}


def naive_fit(data: dict[str, np.ndarray], starts: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize
    from scipy.special import huber, logsumexp

    ln_n, ln_d, ln_l = np.log(data["N"]), np.log(data["D"]), np.log(data["L"])

    def objective(t: np.ndarray) -> float:
        a, b, e, al, be = t
        pred = logsumexp([a - al * ln_n, b - be * ln_d, np.full_like(ln_n, e)], axis=0)
        return float(huber(1e-3, pred - ln_l).sum())

    best_x, best_f = None, np.inf
    for x0 in starts:
        res = minimize(objective, x0, method="L-BFGS-B")
        if res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    return best_x, best_f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--naive-starts", type=int, default=4500, metavar="K", help="naive starts to time (extrapolated to 4,500)")
    parser.add_argument("--bootstrap", type=int, default=4000, metavar="B", help="bootstrap refits to time")
    parser.add_argument("--data", type=Path, default=DATA, help="Epoch's chinchilla_fig4_epoch.csv")
    args = parser.parse_args()

    data = epoch_points(args.data)
    grid = chinchilla.LAW.starts
    k = max(1, min(args.naive_starts, len(grid)))
    subset = grid[np.linspace(0, len(grid) - 1, k).astype(int)]

    t0 = time.perf_counter()
    res = F.fit(chinchilla.LAW, data)
    ours_s = time.perf_counter() - t0
    print(f"batched fit: {len(grid)} starts in {ours_s:.2f} s, objective {res.objective:.7e}")
    print("  " + ", ".join(f"{n}={v:.5g}" for n, v in res.params.items()))

    t0 = time.perf_counter()
    x, f = naive_fit(data, subset)
    naive_s = time.perf_counter() - t0
    naive_full = naive_s * len(grid) / k
    note = "" if k == len(grid) else f" (timed {k} of {len(grid)} starts, extrapolated linearly)"
    print(f"naive loop: {naive_full:.1f} s for {len(grid)} starts{note}, best objective {f:.7e}")
    print("  " + ", ".join(f"{n}={v:.5g}" for n, v in chinchilla.published(x).items()))
    if res.objective > f * (1 + 1e-6):
        raise SystemExit(f"batched fit is worse than the naive loop: {res.objective:.7e} > {f:.7e}")
    print(f"same optimum: batched {res.objective:.7e} <= naive {f:.7e} (x 1+1e-6)")

    x_pts, y = F._design(chinchilla.LAW, data)
    t0 = time.perf_counter()
    samples = F.bootstrap(chinchilla.LAW, x_pts, y, res.theta, F.FitOptions(bootstrap=args.bootstrap))
    boot_s = time.perf_counter() - t0
    ci = F.intervals(chinchilla.LAW, samples, 0.95)
    print(f"bootstrap: {len(samples)} refits in {boot_s:.2f} s; 95% alpha {ci['alpha'][0]:.4f}..{ci['alpha'][1]:.4f}, E {ci['E'][0]:.4f}..{ci['E'][1]:.4f}")
    print(f"fit_speedup={naive_full / ours_s:.1f} full_fit_s={ours_s:.2f} bootstrap_s={boot_s:.2f}")


if __name__ == "__main__":
    main()
