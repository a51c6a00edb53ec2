"""Chinchilla Approach 2: IsoFLOP profiles.

For each compute budget C, fit a parabola of the final loss in ln N through that budget's runs and
take its minimum N_opt(C) (with a delta-method standard error from the parabola's covariance);
then fit the power law N_opt = k C^a through the minima (weighted by those errors), so
D_opt = C / (6 N_opt) = C^(1-a) / (6 k). A budget whose minimum lies at the edge of its grid of
model sizes says the grid was too narrow (the minimum is extrapolated, and Approach 2 is biased
by the grid's span): it is reported in `warnings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from scaleforge.errors import FitError

BUDGET_GAP = 0.1
"""Decades between consecutive sorted budgets that start a new IsoFLOP group (FLOP counts of one
budget differ by a few percent: Epoch's extracted points spread by <= 0.04 decades)."""


@dataclass(kw_only=True, frozen=True)
class Profile:
    """One budget's parabola L = c2 x^2 + c1 x + c0 in x = ln N (x centred on `x_mean`)."""

    budget: float
    """Compute budget C (geometric mean of the group's FLOP counts)."""
    n_opt: float
    """Model size at the parabola's minimum."""
    ln_n_se: float
    """Standard error of ln N_opt (nan with exactly 3 points)."""
    loss_opt: float
    """Parabola value at its minimum."""
    coef: tuple[float, float, float]
    """(c2, c1, c0) in the centred variable ln N - x_mean."""
    x_mean: float
    """Centre of ln N used by `coef`."""
    n_range: tuple[float, float]
    """Smallest and largest model size of the group."""
    n_points: int
    """Runs in the group."""
    at_edge: bool
    """The minimum sits at (or beyond) the edge of the group's model sizes."""

    def loss(self, n: np.ndarray | float) -> np.ndarray:
        x = np.log(np.asarray(n, dtype=float)) - self.x_mean
        c2, c1, c0 = self.coef
        return c2 * x * x + c1 * x + c0


@dataclass(kw_only=True, frozen=True)
class IsoflopResult:
    """Per-budget minima and the power law through them."""

    profiles: tuple[Profile, ...]
    """One per budget with a minimum, by increasing budget."""
    a: float
    """Exponent of N_opt = k C^a."""
    k: float
    """Coefficient of N_opt = k C^a."""
    cov: np.ndarray
    """(2, 2) covariance of (ln k, a)."""
    dof: int
    """Residual degrees of freedom of the power-law fit."""
    ci: dict[str, tuple[float, float]]
    """95% intervals of `a` and `k`."""
    r2: float
    """R^2 of ln N_opt against ln C."""
    objective: float
    """Weighted sum of squared residuals of the power law (ln N)."""
    warnings: tuple[str, ...]
    """Budgets whose minimum is at the edge of their grid, or that have no minimum."""

    @property
    def params(self) -> dict[str, float]:
        return {"k": self.k, "a": self.a, "b": 1.0 - self.a}

    def n_opt(self, budget: np.ndarray | float) -> np.ndarray:
        return self.k * np.asarray(budget, dtype=float) ** self.a

    def d_opt(self, budget: np.ndarray | float) -> np.ndarray:
        c = np.asarray(budget, dtype=float)
        return c / (6.0 * self.n_opt(c))

    def n_opt_band(self, budget: np.ndarray | float, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise interval of N_opt(C) from the power law's parameter covariance."""
        lc = np.log(np.asarray(budget, dtype=float))
        var = self.cov[0, 0] + 2 * lc * self.cov[0, 1] + lc * lc * self.cov[1, 1]
        half = _t_quantile(level, self.dof) * np.sqrt(np.maximum(var, 0.0))
        centre = np.log(self.k) + self.a * lc
        return np.exp(centre - half), np.exp(centre + half)

    def to_json(self) -> dict:
        return {
            "law": "isoflop",
            "params": self.params,
            "objective": self.objective,
            "ci": {k: [lo, hi] for k, (lo, hi) in self.ci.items()},
            "r2": self.r2,
            "n_points": int(sum(p.n_points for p in self.profiles)),
            "budgets": [
                {"C": p.budget, "N_opt": p.n_opt, "ln_N_opt_se": None if np.isnan(p.ln_n_se) else p.ln_n_se, "L_opt": p.loss_opt, "points": p.n_points, "at_edge": p.at_edge}
                for p in self.profiles
            ],
            "warnings": list(self.warnings),
        }


def _t_quantile(level: float, dof: int) -> float:
    if dof <= 0:
        return float("nan")
    from scipy.stats import t  # lazy: scipy.stats takes ~0.3 s to import

    return float(t.ppf(0.5 + level / 2, dof))


def group_budgets(c: np.ndarray, gap: float = BUDGET_GAP) -> np.ndarray:
    """Group label per point: budgets closer than `gap` decades (single linkage) share a group."""
    lc = np.log10(np.asarray(c, dtype=float))
    order = np.argsort(lc, kind="stable")
    labels = np.empty(lc.size, dtype=int)
    breaks = np.concatenate([[0], np.cumsum(np.diff(lc[order]) > gap)])
    labels[order] = breaks
    return labels


def fit_profile(n: np.ndarray, loss: np.ndarray, budget: float) -> Profile | None:
    """Parabola in ln N through one budget's runs; None when it opens downward (no minimum)."""
    x = np.log(np.asarray(n, dtype=float))
    xm = float(x.mean())
    xc = x - xm
    design = np.stack([xc * xc, xc, np.ones_like(xc)], axis=1)
    coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
    c2, c1, c0 = (float(v) for v in coef)
    if c2 <= 0:
        return None
    xs = -c1 / (2 * c2)
    se = float("nan")
    if x.size > 3:
        resid = loss - design @ coef
        s2 = float(resid @ resid) / (x.size - 3)
        cov = s2 * np.linalg.inv(design.T @ design)
        grad = np.array([c1 / (2 * c2 * c2), -1 / (2 * c2)])
        se = float(np.sqrt(max(grad @ cov[:2, :2] @ grad, 0.0)))
    lowest = int(np.argmin(loss))
    at_edge = not (x.min() < xs + xm < x.max()) or x[lowest] in (x.min(), x.max())
    return Profile(
        budget=float(budget),
        n_opt=float(np.exp(xs + xm)),
        ln_n_se=se,
        loss_opt=float(c0 - c1 * c1 / (4 * c2)),
        coef=(c2, c1, c0),
        x_mean=xm,
        n_range=(float(np.exp(x.min())), float(np.exp(x.max()))),
        n_points=int(x.size),
        at_edge=bool(at_edge),
    )


def fit(data: Mapping[str, np.ndarray], *, gap: float = BUDGET_GAP, level: float = 0.95) -> IsoflopResult:
    """Approach 2 on points with variables N, C (FLOPs) and L."""
    missing = [v for v in ("N", "C", "L") if v not in data]
    if missing:
        raise FitError(f"law isoflop needs variables {', '.join(missing)}: add those columns")
    n, c, loss = (np.asarray(data[v], dtype=float).ravel() for v in ("N", "C", "L"))
    ok = np.isfinite(n) & np.isfinite(c) & np.isfinite(loss) & (n > 0) & (c > 0)
    if not ok.all():
        raise FitError(f"{int((~ok).sum())} points have a non-finite or non-positive value: drop them first")
    labels = group_budgets(c, gap)
    profiles: list[Profile] = []
    warnings: list[str] = []
    for g in np.unique(labels):
        sel = labels == g
        budget = float(np.exp(np.log(c[sel]).mean()))
        if sel.sum() < 3:
            warnings.append(f"budget {budget:.3g}: only {int(sel.sum())} runs, a parabola needs 3; skipped")
            continue
        prof = fit_profile(n[sel], loss[sel], budget)
        if prof is None:
            warnings.append(f"budget {budget:.3g}: loss has no minimum in ln N (parabola opens downward); skipped")
            continue
        if prof.at_edge:
            warnings.append(
                f"budget {budget:.3g}: minimum N={prof.n_opt:.3g} at the edge of the grid "
                f"[{prof.n_range[0]:.3g}, {prof.n_range[1]:.3g}]; widen the model sizes of this budget"
            )
        profiles.append(prof)
    if len(profiles) < 2:
        raise FitError(f"law isoflop needs at least 2 budgets with 3+ runs each and a minimum, got {len(profiles)}")
    lc = np.log([p.budget for p in profiles])
    ln_opt = np.log([p.n_opt for p in profiles])
    se = np.array([p.ln_n_se for p in profiles])
    w = 1.0 / se**2 if np.all(np.isfinite(se) & (se > 0)) else np.ones_like(lc)
    design = np.stack([np.ones_like(lc), lc], axis=1)
    xtwx = design.T @ (design * w[:, None])
    beta = np.linalg.solve(xtwx, design.T @ (w * ln_opt))
    resid = ln_opt - design @ beta
    dof = len(profiles) - 2
    wssr = float((w * resid * resid).sum())
    # Scale the covariance by the residual variance (robust when the per-budget errors are off).
    cov = np.linalg.inv(xtwx) * (wssr / dof if dof > 0 else float("nan"))
    tq = _t_quantile(level, dof)
    half = tq * np.sqrt(np.diag(cov)) if dof > 0 else np.array([np.nan, np.nan])
    ss_tot = float(((ln_opt - ln_opt.mean()) ** 2).sum())
    return IsoflopResult(
        profiles=tuple(profiles),
        a=float(beta[1]),
        k=float(np.exp(beta[0])),
        cov=cov,
        dof=dof,
        ci={"a": (float(beta[1] - half[1]), float(beta[1] + half[1])), "k": (float(np.exp(beta[0] - half[0])), float(np.exp(beta[0] + half[0])))},
        r2=1.0 - float((resid * resid).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        objective=wssr,
        warnings=tuple(warnings),
    )
