"""`orchestrate plan PLAN --extend K`: the K runs that most shrink the target loss's interval.

After a refit, the fit's bootstrap optima are an ensemble of plausible laws. A new run at (N, D)
would observe ln L(N, D) with noise sigma (the fit's residual scale); how much that observation
narrows the forecast ln L(N_t, D_t) of the target follows from the ensemble's covariances, as in an
ensemble Kalman update: with f the target's log-loss and g the new runs' log-losses over the
samples,

    Var[f | g] = Var f - Cov(f, g) (Cov(g, g) + sigma^2 I)^-1 Cov(g, f).

Candidates are shaped and costed by the planner itself (exact N, D and FLOPs), on a grid of budgets
from the smallest ladder budget up to the compute allowance and sizes over a factor `SIZE_SPAN`
either side of the fit's compute-optimal N. Runs are chosen greedily (the one that lowers Var[f | g]
most given those already chosen) while their total compute stays within the allowance. The default
allowance is what one more IsoFLOP budget would cost: the largest budget's runs again, one ladder
step (the ratio of the two largest budgets) higher.

Torch-free; numpy only on this path (the plan verb without --extend does not import it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan import prior
from scaleforge.orchestrator.plan.hparams import round_sig
from scaleforge.orchestrator.plan.plan import _variant, base_spec, for_cluster, override_keys, plan_run

SIZE_SPAN = 3.0
"""Candidate sizes span N_opt / 3 .. 3 N_opt at each candidate budget."""
SIZES = 7
"""Candidate sizes per candidate budget."""
BUDGET_STEP = math.sqrt(2.0)
"""Ratio between consecutive candidate budgets."""
BOOTSTRAP_DRAWS = 64
"""Draws of Poisson(1) point weights over which a pick's variance reduction is averaged."""
MIN_SIGMA = 1e-3
"""Floor on the observation noise (log-loss): the Huber threshold of the fit; a fit that went
through its points exactly would otherwise promise that one run pins the law."""


@dataclass(kw_only=True, frozen=True)
class Choice:
    """The rungs --extend proposes and what they are expected to do."""

    picks: tuple
    """Indices into the candidate list, in the order chosen."""
    variance_before: float
    """Variance of the target's log-loss over the bootstrap samples."""
    variance_after: tuple
    """Expected variance after each pick (same order as `picks`)."""
    cost: float
    """FLOPs of the picked runs."""


def log_losses(samples: list[dict], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(S, m) ln L(N, D) under each sample {A, B, E, alpha, beta}."""
    p = {k: np.array([s[k] for s in samples], dtype=float)[:, None] for k in ("A", "B", "E", "alpha", "beta")}
    n, d = np.asarray(n, dtype=float)[None, :], np.asarray(d, dtype=float)[None, :]
    return np.log(p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"])


def conditional_variance(f: np.ndarray, g: np.ndarray, sigma: float, weights: np.ndarray | None = None) -> float:
    """Var[f | g] of the linear-Gaussian update over an ensemble: f (S,), g (S, k).

    With `weights` (W, k), the mean of Var[f | g] over rows of point weights, a point of weight w
    observed with noise sigma / sqrt(w) (weight 0: not observed): the bootstrap's view of new points.
    """
    fc = f - f.mean()
    var_f = float(fc @ fc) / (f.size - 1)
    k = g.shape[1]
    if k == 0:
        return var_f
    gc = g - g.mean(axis=0)
    cov_gg = gc.T @ gc / (f.size - 1)
    cov_gf = gc.T @ fc / (f.size - 1)
    if weights is None:
        weights = np.ones((1, k))
    # weight w: noise variance sigma^2 / w; solve in the weighted form (W^1/2 C W^1/2 + sigma^2 I)
    # so that a zero weight drops the point without dividing by zero.
    out = 0.0
    for w in weights:
        r = np.sqrt(w)
        a = r[:, None] * cov_gg * r[None, :] + sigma**2 * np.eye(k)
        b = r * cov_gf
        out += var_f - float(b @ np.linalg.solve(a, b))
    return max(0.0, out / len(weights))


def choose(
    samples: list[dict], target: tuple[float, float], candidates: list[tuple[float, float, float]],
    *, k: int, allowance: float, sigma: float,
) -> Choice:
    """Greedily pick up to k candidates (N, D, FLOPs) within `allowance` FLOPs."""
    if len(samples) < 10:
        raise ConfigError(
            f"--extend needs the fit's bootstrap samples (got {len(samples)}); run `orchestrate refit` "
            "with --bootstrap 100 or more first"
        )
    sigma = max(float(sigma), MIN_SIGMA)
    f = log_losses(samples, np.array([target[0]]), np.array([target[1]]))[:, 0]
    ok = np.all(np.isfinite(f))
    cand = np.array(candidates, dtype=float).reshape(-1, 3)
    g_all = log_losses(samples, cand[:, 0], cand[:, 1])
    finite = np.all(np.isfinite(g_all), axis=0)
    if not ok:
        raise ConfigError("the fit's samples give a non-finite target loss; refit with more runs")
    picks: list[int] = []
    after: list[float] = []
    spent = 0.0
    before = conditional_variance(f, g_all[:, :0], sigma)
    # The interval is read off bootstrap refits, in which each point appears Poisson(1) times: a
    # lone high-leverage run is missing from 37% of them. Judging picks under those weights
    # favours a few well-placed runs over one far one.
    weights = np.random.default_rng(0).poisson(1.0, size=(BOOTSTRAP_DRAWS, k)).astype(float)
    share = allowance / k * (1 + 1e-9)  # no pick above its share: see SPREAD
    for _ in range(k):
        best, best_var = None, math.inf
        for j in range(cand.shape[0]):
            if j in picks or not finite[j] or cand[j, 2] > share or spent + cand[j, 2] > allowance * (1 + 1e-9):
                continue
            cols = picks + [j]
            var = conditional_variance(f, g_all[:, cols], sigma, weights[:, : len(cols)])
            if var < best_var - 1e-18:
                best, best_var = j, var
        if best is None:
            break
        picks.append(best)
        after.append(best_var)
        spent += cand[best, 2]
    return Choice(picks=tuple(picks), variance_before=before, variance_after=tuple(after), cost=spent)


def candidate_budgets(lo: float, hi: float) -> list[float]:
    """Budgets lo, lo * BUDGET_STEP, ... up to hi (2 significant digits each)."""
    out, c = [], lo
    while c <= hi * (1 + 1e-9):
        out.append(round_sig(c, 2))
        c *= BUDGET_STEP
    return sorted(set(out))


def default_allowance(plan) -> float:
    """FLOPs of one more IsoFLOP budget: the largest budget's runs, one ladder step higher."""
    budgets = sorted({r.budget for r in plan.ladder})
    if not budgets:
        raise ConfigError("the plan has no ladder runs to extend")
    top = budgets[-1]
    step = top / budgets[-2] if len(budgets) > 1 else 2.0
    return step * sum(r.flops for r in plan.ladder if r.budget == top)


def residual_sigma(fit: dict) -> float:
    """The fit's noise scale in log-loss: the residuals' RMS over the used runs."""
    res = np.asarray(fit.get("residuals") or [], dtype=float)
    res = res[np.isfinite(res)]
    return float(np.sqrt(np.mean(res**2))) if res.size else MIN_SIGMA


def extend_plan(plan, fit: dict, *, k: int, allowance: float | None = None):
    """(plan with up to k new ladder runs, Choice, candidate runs) from a refit's fit.json."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--extend must be a positive integer, got {k!r}")
    if plan.law.source != "fit":
        raise ConfigError(
            "--extend chooses runs from a fit's bootstrap samples: run `orchestrate refit PLAN` first"
        )
    allowance = default_allowance(plan) if allowance is None else float(allowance)
    if not (math.isfinite(allowance) and allowance > 0):
        raise ConfigError(f"--allowance must be a positive number of FLOPs, got {allowance!r}")
    samples = fit.get("samples") or []
    params = fit["params"]
    user_keys = override_keys(plan.overrides)
    base = for_cluster(_variant(base_spec(plan.arch, plan.overrides), params, plan.budget, user_keys), plan.cluster)
    lo = min(r.budget for r in plan.ladder)
    have = {r.name for r in plan.ladder}
    runs = []
    for c in candidate_budgets(lo, allowance):
        n_opt, _ = prior.compute_optimal(params, c)
        if not math.isfinite(n_opt) or n_opt <= 0:
            continue
        seen = set()
        for u in np.linspace(-1.0, 1.0, SIZES):
            try:
                run, _ = plan_run(
                    kind="extend", budget=c, n_target=n_opt * SIZE_SPAN**u, cluster=plan.cluster,
                    base=base, seq_len=plan.seq_len, unique_tokens=plan.unique_tokens,
                    user_keys=user_keys,
                )
            except ConfigError as exc:
                if "below the smallest" in str(exc):
                    continue
                raise
            if run.N in seen or run.name.replace("-extend-", "-ladder-") in have or run.name in have:
                continue
            seen.add(run.N)
            runs.append(run)
    if not runs:
        raise ConfigError(f"no candidate run fits the allowance of {allowance:.3g} FLOPs; raise --allowance")
    choice = choose(
        samples, (plan.target.N, plan.target.D), [(r.N, r.D, r.flops) for r in runs],
        k=k, allowance=allowance, sigma=residual_sigma(fit),
    )
    if not choice.picks:
        raise ConfigError(f"no candidate run fits the allowance of {allowance:.3g} FLOPs; raise --allowance")
    added = tuple(runs[j] for j in choice.picks)
    new = dataclasses.replace(plan, ladder=(*plan.ladder, *added))
    return new, choice, runs
