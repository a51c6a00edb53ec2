"""One robust multi-start fitter shared by every scaling law.

A law predicts log-loss; the fitter minimises the SUM over points of Huber(delta) on the log-loss
residuals (the mean makes L-BFGS stop early: the Chinchilla Approach-3 bug Epoch found). Every start
of the law's grid is optimised at once: a batched, bounded Levenberg-Marquardt-damped Newton method
in numpy, one (P x P) system per start per iteration, with analytic gradients from the law. Starts
that have converged leave the batch. The best start is kept. Bootstrap confidence intervals refit
all resamples in one batch too, each starting from the full-data optimum.

Torch-free and scipy-free (imports in milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from scaleforge.errors import FitError

SEARCH_FTOL = 3e-4
"""Relative objective change at which a start of the float32 search stops. The search only has to
find the basins; the polish makes the optimum exact. On Epoch's data (4,500 starts) the search
takes 149k start-evaluations and leaves 344 starts within 1e-4 of the optimum (1e-4: 194k and 750;
1e-6: 450k and 3,500)."""
POLISH = 16
"""Distinct best search end points refined in float64 to `FitOptions.ftol`."""

# curvature(c_gn, c_h) -> sum_i c_gn_i g_i g_i^T + sum_i c_h_i Hess(m_i), shape (S, P, P)
Curvature = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(kw_only=True, frozen=True)
class Evaluation:
    """A law's log-prediction at a batch of parameter vectors."""

    value: np.ndarray
    """(S, n) predicted log-loss for each start s and point i."""
    jac: np.ndarray
    """(S, P, n) derivative of `value` with respect to each fit-space parameter."""
    curvature: Curvature | None = None
    """Exact second-order term (see `Curvature`); None: the fitter differentiates `jac` numerically."""


@dataclass(kw_only=True, frozen=True)
class Law:
    """What a law module supplies to the fitter."""

    name: str
    """Name used on the command line (`--law NAME`)."""
    params: tuple[str, ...]
    """Fit-space parameter names, in the order of the columns of `starts`."""
    variables: tuple[str, ...]
    """Data variables the law reads besides the loss `L` (e.g. `N`, `D`)."""
    features: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    """Variables (each (n,)) -> (n, k) feature matrix that `evaluate` reads (e.g. ln N, ln D)."""
    evaluate: Callable[[np.ndarray, np.ndarray], Evaluation]
    """(theta (S, P), features (n, k)) -> predicted log-loss and its derivatives."""
    starts: np.ndarray
    """(S, P) initial points: the law's standard grid."""
    lower: np.ndarray
    """(P,) lower bounds in fit space."""
    upper: np.ndarray
    """(P,) upper bounds in fit space."""
    published: Callable[[np.ndarray], dict[str, float]]
    """Fit-space vector (P,) -> parameters under their published names."""
    min_points: int
    """Fewest data points a fit is attempted with."""

    def __post_init__(self) -> None:
        p = len(self.params)
        for name in ("starts", "lower", "upper"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float))
        if self.starts.ndim != 2 or self.starts.shape[1] != p:
            raise ValueError(f"law {self.name}: starts must be (S, {p}), got {self.starts.shape}")
        if self.lower.shape != (p,) or self.upper.shape != (p,) or np.any(self.lower >= self.upper):
            raise ValueError(f"law {self.name}: bounds must be (P,) with lower < upper")
        if self.min_points < p:
            raise ValueError(f"law {self.name}: min_points {self.min_points} < {p} parameters")


@dataclass(kw_only=True, frozen=True)
class FitOptions:
    """How hard the fitter works."""

    delta: float = 1e-3
    """Huber threshold on log-loss residuals (1e-3 as in Hoffmann et al. 2022 and Epoch)."""
    max_iter: int = 300
    """Newton iterations per start (accepted or rejected)."""
    ftol: float = 1e-13
    """A start has converged when an accepted step lowers its objective by less than ftol * f."""
    bootstrap: int = 0
    """Bootstrap resamples for confidence intervals (0: none)."""
    level: float = 0.95
    """Central coverage of the bootstrap percentile intervals."""
    seed: int = 0
    """Seed of the bootstrap resampling."""

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        if self.max_iter < 1 or self.bootstrap < 0:
            raise ValueError("max_iter must be >= 1 and bootstrap >= 0")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")


@dataclass(kw_only=True, frozen=True)
class FitResult:
    """The best fit of a law to a set of points."""

    law: str
    """Law name."""
    params: dict[str, float]
    """Fitted parameters under their published names."""
    theta: np.ndarray
    """(P,) the optimum in fit space."""
    objective: float
    """Summed Huber loss at the optimum."""
    ci: dict[str, tuple[float, float]]
    """Bootstrap percentile interval per published parameter (empty without bootstrap)."""
    residuals: np.ndarray
    """(n,) ln(predicted) - ln(observed) at the optimum."""
    r2: float
    """Coefficient of determination of the predicted loss (linear scale)."""
    n_points: int
    """Points fitted."""
    n_starts: int
    """Starts optimised."""
    n_converged: int
    """Starts that met the convergence test within max_iter."""
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """(B, P) bootstrap optima in fit space (empty without bootstrap)."""

    def to_json(self) -> dict:
        """Plain JSON-able summary (published names)."""
        return {
            "law": self.law,
            "params": {k: float(v) for k, v in self.params.items()},
            "objective": float(self.objective),
            "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()},
            "r2": float(self.r2),
            "n_points": self.n_points,
            "n_starts": self.n_starts,
        }


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss: r^2/2 inside [-delta, delta], linear outside (same convention as scipy.special.huber)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _fd_curvature(law: Law, theta: np.ndarray, x: np.ndarray, ev: Evaluation) -> Curvature:
    """Second-order term by forward differences of the law's analytic Jacobian."""
    s, p, n = ev.jac.shape
    hd = np.empty((p, s, p, n))
    # Step ~ sqrt(machine epsilon) of the law's arithmetic: 1e-6 in float64, 3e-3 in float32.
    rel = 1e-6 if ev.jac.dtype == np.float64 else 3e-3
    for k in range(p):
        h = rel * np.maximum(1.0, np.abs(theta[:, k]))
        t = theta.copy()
        t[:, k] += h
        hd[k] = (law.evaluate(t, x).jac - ev.jac) / h[:, None, None]

    def curvature(c_gn: np.ndarray, c_h: np.ndarray) -> np.ndarray:
        gn = np.matmul(ev.jac * c_gn[:, None, :], ev.jac.transpose(0, 2, 1))
        second = np.einsum("sn,ksjn->skj", c_h, hd)
        return gn + 0.5 * (second + second.transpose(0, 2, 1))

    return curvature


def _objective(law: Law, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, delta: float):
    """(theta (S, P), rows (S,)) -> f (S,), gradient (S, P), Hessian (S, P, P) of the summed Huber loss.

    `w` is None (every point once) or (B, n) point weights (bootstrap counts), indexed by `rows`.
    Point-wise work runs in x's dtype; sums come back in float64.
    """

    def evaluate(theta: np.ndarray, rows: np.ndarray):
        # Non-finite values (a trial step outside a law's domain) are rejected by the minimiser.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            return _huber_terms(theta, rows)

    def _huber_terms(theta: np.ndarray, rows: np.ndarray):
        ev = law.evaluate(theta, x)
        r = ev.value - y
        psi = np.clip(r, -delta, delta)
        rho = psi * (r - 0.5 * psi)  # r^2/2 inside [-delta, delta], delta (|r| - delta/2) outside
        inside = (np.abs(r) <= delta).astype(x.dtype)
        if w is not None:
            ws = w[rows]
            rho *= ws
            psi *= ws
            inside *= ws
        f = rho.sum(axis=1, dtype=float)
        g = np.matmul(ev.jac, psi[:, :, None])[:, :, 0].astype(float)
        curvature = ev.curvature or _fd_curvature(law, theta, x, ev)
        scale = np.sqrt(np.einsum("spn,spn->sp", ev.jac, ev.jac) / r.shape[1])
        return f, g, curvature(inside, psi).astype(float), scale.astype(float)

    return evaluate


def minimize_batched(
    evaluate: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]],
    theta0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    max_iter: int = 300,
    ftol: float = 1e-13,
    radius: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise S independent smooth objectives at once; returns (theta, f, converged).

    `evaluate(theta, rows)` gives, for the starts `rows`: f (S,), gradient (S, P), Hessian (S, P, P)
    and a per-parameter scale (S, P) (how much one unit of each parameter moves the prediction).
    Each iteration is a trust-region Newton step in the scaled coordinates: the Hessian's
    eigenvalues are taken in absolute value (so every step descends, also where the Hessian is
    indefinite) and the step is shortened to the start's radius, which doubles after good steps
    and shrinks after poor ones. Bounds by projection: a parameter on a bound whose gradient
    pushes outward is held for that step.
    """
    theta = np.clip(np.array(theta0, dtype=float), lower, upper)
    s, p = theta.shape
    f, g, h, sc = evaluate(theta, np.arange(s))
    rad = np.full(s, float(radius))
    done = ~np.isfinite(f)
    converged = np.zeros(s, dtype=bool)
    eye = np.eye(p)
    for _ in range(max_iter):
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        th, ga, ha, ra = theta[act], g[act], h[act], rad[act]
        held = ((th <= lower) & (ga > 0)) | ((th >= upper) & (ga < 0))
        free = ~held
        d = sc[act]
        d = np.maximum(d, 1e-9 * d.max(axis=1, keepdims=True) + 1e-300)
        gt = np.where(free, ga, 0.0) / d
        ht = ha * (free[:, :, None] & free[:, None, :]) / (d[:, :, None] * d[:, None, :]) + eye * held[:, :, None]
        ev, vec = np.linalg.eigh(ht)
        lam = 1e-9 * np.abs(ev).max(axis=1, keepdims=True) + 1e-300
        z = -np.einsum("sij,sj->si", vec, np.einsum("sji,sj->si", vec, gt) / (np.abs(ev) + lam))
        z = np.where(np.isfinite(z), z, 0.0)  # a parameter with no effect (scale ~ 0) takes no step
        z = np.clip(z, -1e150, 1e150)
        zn = np.sqrt((z * z).sum(axis=1))
        capped = zn > ra
        z *= np.where(capped, ra / np.maximum(zn, 1e-300), 1.0)[:, None]
        trial = np.clip(th + z / d, lower, upper)
        step = trial - th
        pred = -(np.einsum("si,si->s", ga, step) + 0.5 * np.einsum("si,sij,sj->s", step, ha, step))
        ft, gt2, ht2, sc2 = evaluate(trial, act)
        fa = f[act]
        gain = fa - ft
        ok = np.isfinite(ft) & (gain > 0)
        rho = np.where(pred > 0, gain / np.where(pred > 0, pred, 1.0), 0.0)
        zlen = np.minimum(zn, ra)
        ra = np.where(~ok | (rho < 0.25), 0.25 * zlen, np.where((rho > 0.75) & capped, 2.0 * ra, ra))
        # Converged: an accepted step gained, or the model promises, less than ftol * f.
        small = (ok & (gain <= ftol * np.abs(ft))) | ((pred >= 0) & (pred <= ftol * np.abs(fa)) & ~capped)
        stuck = ra <= 1e-12
        idx = act[ok]
        theta[idx], f[idx], g[idx], h[idx], sc[idx] = trial[ok], ft[ok], gt2[ok], ht2[ok], sc2[ok]
        rad[act] = ra
        converged[act] = small | stuck
        done[act] = small | stuck
    return theta, f, converged


def _design(law: Law, data: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    missing = [v for v in (*law.variables, "L") if v not in data]
    if missing:
        raise FitError(f"law {law.name} needs variables {', '.join(missing)}: add those columns")
    cols = {k: np.asarray(v, dtype=float).ravel() for k, v in data.items()}
    n = cols["L"].size
    if any(cols[v].size != n for v in law.variables):
        raise FitError(f"law {law.name}: every variable needs one value per loss ({n})")
    bad = ~np.isfinite(cols["L"]) | (cols["L"] <= 0)
    for v in law.variables:
        bad |= ~np.isfinite(cols[v])
    if bad.any():
        raise FitError(f"{int(bad.sum())} points have a non-finite or non-positive value: drop them first")
    if n < law.min_points:
        raise FitError(f"law {law.name} needs at least {law.min_points} points, got {n}: add runs")
    return law.features({v: cols[v] for v in law.variables}), np.log(cols["L"])


def fit(law: Law, data: Mapping[str, np.ndarray], options: FitOptions = FitOptions(), starts: np.ndarray | None = None,
        groups: np.ndarray | None = None) -> FitResult:
    """Fit `law` to `data` (variables named as in `law.variables`, losses under `L`).

    `groups` (one label per point) makes the bootstrap resample whole groups: points of one run
    (its final loss and its intermediate evaluations) share that run's noise, and resampling them
    one by one would understate the uncertainty.

    Every start is optimised in float32 to a relative objective change of `SEARCH_FTOL`; the best
    `POLISH` distinct end points are then refined in float64 to `options.ftol`.
    """
    x, y = _design(law, data)
    n = y.size
    grid = law.starts if starts is None else np.atleast_2d(np.asarray(starts, dtype=float))
    search = _objective(law, x.astype(np.float32), y.astype(np.float32), None, options.delta)
    theta, f, conv = minimize_batched(search, grid, law.lower, law.upper, max_iter=options.max_iter, ftol=SEARCH_FTOL)
    if not np.isfinite(f).any():
        raise FitError(f"law {law.name}: no start reached a finite objective; check the data's units")
    order = np.argsort(np.where(np.isfinite(f), f, np.inf))[: 4 * POLISH]
    cand = np.unique(np.round(theta[order], 6), axis=0)
    cand = cand[np.argsort(search(cand, np.arange(len(cand)))[0])[:POLISH]]
    polish = _objective(law, x, y, None, options.delta)
    theta_p, f_p, _ = minimize_batched(polish, cand, law.lower, law.upper, max_iter=options.max_iter, ftol=options.ftol)
    best = int(np.argmin(np.where(np.isfinite(f_p), f_p, np.inf)))
    tb = theta_p[best]
    pred = law.evaluate(tb[None], x).value[0]
    loss = np.exp(y)
    ss_tot = float(((loss - loss.mean()) ** 2).sum())
    r2 = 1.0 - float(((np.exp(pred) - loss) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    samples = np.zeros((0, tb.size))
    ci: dict[str, tuple[float, float]] = {}
    if options.bootstrap:
        samples = bootstrap(law, x, y, tb, options, groups)
        ci = intervals(law, samples, options.level)
    return FitResult(
        law=law.name,
        params=law.published(tb),
        theta=tb,
        objective=float(f_p[best]),
        ci=ci,
        residuals=pred - y,
        r2=r2,
        n_points=n,
        n_starts=grid.shape[0],
        n_converged=int(conv.sum()),
        samples=samples,
    )


def bootstrap(law: Law, x: np.ndarray, y: np.ndarray, theta: np.ndarray, options: FitOptions,
              groups: np.ndarray | None = None) -> np.ndarray:
    """(B, P) optima of B resamples of the points (with replacement; of whole groups when `groups`
    labels them), all refit at once from `theta`."""
    n = y.size
    rng = np.random.default_rng(options.seed)
    if groups is None:
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(options.bootstrap)])
    else:
        _, label = np.unique(np.asarray(groups), return_inverse=True)
        g = int(label.max()) + 1
        counts = np.stack([np.bincount(rng.integers(0, g, g), minlength=g)[label] for _ in range(options.bootstrap)])
    evaluate = _objective(law, x, y, counts.astype(float), options.delta)
    start = np.repeat(theta[None], options.bootstrap, axis=0)
    out, f, _ = minimize_batched(evaluate, start, law.lower, law.upper, max_iter=options.max_iter, ftol=options.ftol)
    return out[np.isfinite(f)]


def intervals(law: Law, samples: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """Percentile interval of each published parameter over bootstrap optima."""
    pub = [law.published(t) for t in samples]
    q = 100 * (1 - level) / 2
    return {k: (float(np.percentile([d[k] for d in pub], q)), float(np.percentile([d[k] for d in pub], 100 - q))) for k in pub[0]}
