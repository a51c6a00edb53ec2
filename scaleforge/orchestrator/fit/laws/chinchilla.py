"""Chinchilla Approach 3 (Hoffmann et al. 2022): L(N, D) = E + A / N^alpha + B / D^beta.

Fit space (a, b, e, alpha, beta) with a = ln A, b = ln B, e = ln E; the log-prediction is
LSE(a - alpha ln N, b - beta ln D, e). Standard grid: alpha, beta in {0, 0.5, ..., 2},
e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}: 4,500 starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import numpy as np

from scaleforge.orchestrator.fit.fitter import Evaluation, Law

PARAMS = ("a", "b", "e", "alpha", "beta")


def features(data: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.log(data["N"]), np.log(data["D"])], axis=1)


def evaluate(theta: np.ndarray, x: np.ndarray) -> Evaluation:
    # Computed in the features' dtype: the fitter searches in float32 (exp is 4x cheaper) and
    # polishes in float64. The bounds keep every term finite, so no max-shift is needed.
    th = theta.astype(x.dtype, copy=False)
    a, b, e, al, be = (th[:, k : k + 1] for k in range(5))
    ln_n, ln_d = x[:, 0], x[:, 1]
    # float32: exponents below -80 would give subnormal numbers (slow on x86, and meaningless:
    # such a term is < 1e-30 of E >= e^-10).
    floor = -80.0 if x.dtype == np.float32 else -700.0
    t1 = al * ln_n
    np.subtract(a, t1, out=t1)
    np.maximum(t1, floor, out=t1)
    np.exp(t1, out=t1)
    t2 = be * ln_d
    np.subtract(b, t2, out=t2)
    np.maximum(t2, floor, out=t2)
    np.exp(t2, out=t2)
    t3 = np.exp(e)
    tot = t1 + t2
    tot += t3
    value = np.log(tot)
    inv = np.reciprocal(tot, out=tot)
    jac = np.empty((th.shape[0], 5, x.shape[0]), dtype=x.dtype)
    p1 = np.multiply(t1, inv, out=jac[:, 0])
    p2 = np.multiply(t2, inv, out=jac[:, 1])
    p3 = np.multiply(inv, t3, out=jac[:, 2])
    np.multiply(p1, -ln_n, out=jac[:, 3])
    np.multiply(p2, -ln_d, out=jac[:, 4])
    # Features per point against which the diagonal-in-u term of Hess(LSE) is summed.
    fn = np.stack([np.ones_like(ln_n), ln_n, ln_n * ln_n], axis=1)
    fd = np.stack([np.ones_like(ln_d), ln_d, ln_d * ln_d], axis=1)

    def curvature(c_gn: np.ndarray, c_h: np.ndarray) -> np.ndarray:
        # Hess(m_i) = J_u^T diag(p) J_u - g g^T (u linear in theta), so the g g^T parts merge.
        out = np.matmul(jac * (c_gn - c_h)[:, None, :], jac.transpose(0, 2, 1)).astype(float)
        s1 = (c_h * p1) @ fn
        s2 = (c_h * p2) @ fd
        out[:, 0, 0] += s1[:, 0]
        out[:, 0, 3] -= s1[:, 1]
        out[:, 3, 0] -= s1[:, 1]
        out[:, 3, 3] += s1[:, 2]
        out[:, 1, 1] += s2[:, 0]
        out[:, 1, 4] -= s2[:, 1]
        out[:, 4, 1] -= s2[:, 1]
        out[:, 4, 4] += s2[:, 2]
        out[:, 2, 2] += (c_h * p3).sum(axis=1)
        return out

    return Evaluation(value=value, jac=jac, curvature=curvature)


def published(theta: np.ndarray) -> dict[str, float]:
    a, b, e, al, be = (float(v) for v in theta)
    return {"A": float(np.exp(a)), "B": float(np.exp(b)), "E": float(np.exp(e)), "alpha": al, "beta": be}


def to_theta(params: Mapping[str, float]) -> np.ndarray:
    """Published (A, B, E, alpha, beta) -> fit space."""
    return np.array([np.log(params["A"]), np.log(params["B"]), np.log(params["E"]), params["alpha"], params["beta"]])


def grid() -> np.ndarray:
    exps = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.1, 5.0)
    return np.array([(a, b, e, al, be) for a, b, e, al, be in itertools.product(abs_, abs_, es, exps, exps)])


LAW = Law(
    name="chinchilla",
    params=PARAMS,
    variables=("N", "D"),
    features=features,
    evaluate=evaluate,
    starts=grid(),
    # alpha, beta >= 0: a negative exponent makes loss grow with scale.
    lower=np.array([-30.0, -30.0, -10.0, 0.0, 0.0]),
    upper=np.array([60.0, 60.0, 5.0, 5.0, 5.0]),
    published=published,
    min_points=6,
)


def loss(params: Mapping[str, float], n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
    """L(N, D) with published parameters."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def compute_optimal(params: Mapping[str, float], budget: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) for C = 6 N D: G = (alpha A / (beta B))^(1/(alpha+beta)),
    N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G."""
    al, be = params["alpha"], params["beta"]
    c6 = np.asarray(budget, dtype=float) / 6.0
    # A bootstrap refit on few points can land on a bound (beta = 0: tokens do not lower the loss, so
    # all compute goes to parameters; alpha = 0: the reverse). Same convention as prior.compute_optimal.
    if be <= 0 or params["B"] <= 0:
        return np.full_like(c6, np.inf), np.zeros_like(c6)
    if al <= 0 or params["A"] <= 0:
        return np.zeros_like(c6), np.full_like(c6, np.inf)
    g = (al * params["A"] / (be * params["B"])) ** (1.0 / (al + be))
    return g * c6 ** (be / (al + be)), c6 ** (al / (al + be)) / g


def compute_optimal_flops(
    params: Mapping[str, float],
    budget: float,
    flops_per_token: Callable[[np.ndarray], np.ndarray],
    *,
    n_range: tuple[float, float] = (1e3, 1e16),
) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, C / flops_per_token(N)) for any vectorised FLOPs-per-token model.

    Dense log-grid scan, then golden-section refinement in ln N to relative precision 1e-10.
    """

    def objective(ln_n: np.ndarray) -> np.ndarray:
        n = np.exp(ln_n)
        d = budget / np.asarray(flops_per_token(n), dtype=float)
        return np.where(d > 0, loss(params, n, np.where(d > 0, d, 1.0)), np.inf)

    grid_ln = np.linspace(np.log(n_range[0]), np.log(n_range[1]), 4001)
    vals = objective(grid_ln)
    k = int(np.argmin(vals))
    if k in (0, grid_ln.size - 1):
        raise ValueError(f"optimum at the edge of N in {n_range}: widen n_range")
    lo, hi = grid_ln[k - 1], grid_ln[k + 1]
    ratio = (np.sqrt(5.0) - 1) / 2
    while hi - lo > 1e-10:
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        f1, f2 = objective(np.array([m1, m2]))
        if f1 < f2:
            hi = m2
        else:
            lo = m1
    n_opt = float(np.exp(0.5 * (lo + hi)))
    return n_opt, float(budget / flops_per_token(np.array([n_opt]))[0])
