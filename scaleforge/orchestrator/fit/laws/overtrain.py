"""Over-training law (Gadre et al. 2024): Chinchilla with one exponent, in (N, M = D / N).

L(N, M) = E + alpha N^b + beta 6^(b/2) (M N)^b with b < 0 (the reference code's form); it equals
Chinchilla's E + A / N^eta + B / D^eta with A = alpha, B = beta 6^(b/2), eta = -b. Fitted in
(ln alpha, ln beta, b, E) from the reference grid alpha0, beta0 in {1e2, 3e2, 1e3, 3e3},
b0 in {-0.1, -0.3}, E0 in {0, 1, 2, 10} (128 starts), with the shared Huber fitter.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from scaleforge.orchestrator.fit.fitter import Evaluation, Law

PARAMS = ("ln_alpha", "ln_beta", "b", "E")
LN6 = float(np.log(6.0))


def features(data: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.log(data["N"]), np.log(data["M"])], axis=1)


def evaluate(theta: np.ndarray, x: np.ndarray) -> Evaluation:
    la, lb, b, e = (theta[:, j : j + 1] for j in range(4))
    ln_n, ln_m = x[:, 0], x[:, 1]
    t1 = np.exp(la + b * ln_n)
    z = 0.5 * LN6 + ln_m + ln_n  # ln of 6^(1/2) M N
    t2 = np.exp(lb + b * z)
    tot = e + t1 + t2
    inv = 1.0 / tot
    jac = np.stack([t1 * inv, t2 * inv, (t1 * ln_n + t2 * z) * inv, np.broadcast_to(inv, t1.shape)], axis=1)
    return Evaluation(value=np.log(tot), jac=jac)


def published(theta: np.ndarray) -> dict[str, float]:
    la, lb, b, e = (float(v) for v in theta)
    return {"alpha": float(np.exp(la)), "beta": float(np.exp(lb)), "b": b, "E": e}


def grid() -> np.ndarray:
    amps = np.log([1e2, 3e2, 1e3, 3e3])
    return np.array(list(itertools.product(amps, amps, [-0.1, -0.3], [0.0, 1.0, 2.0, 10.0])))


LAW = Law(
    name="overtrain",
    params=PARAMS,
    variables=("N", "M"),
    features=features,
    evaluate=evaluate,
    starts=grid(),
    lower=np.array([-30.0, -30.0, -3.0, 0.0]),
    upper=np.array([60.0, 60.0, -1e-6, 20.0]),
    published=published,
    min_points=5,
)


def loss(params: Mapping[str, float], n: np.ndarray | float, m: np.ndarray | float) -> np.ndarray:
    """L(N, M) with published parameters (alpha, beta, b, E)."""
    n, m = np.asarray(n, dtype=float), np.asarray(m, dtype=float)
    b = params["b"]
    return params["E"] + params["alpha"] * n**b + params["beta"] * 6.0 ** (b / 2) * (m * n) ** b


def to_chinchilla(params: Mapping[str, float]) -> dict[str, float]:
    """The same law as Chinchilla parameters (A, B, E, alpha = beta = -b)."""
    b = params["b"]
    return {"A": params["alpha"], "B": params["beta"] * 6.0 ** (b / 2), "E": params["E"], "alpha": -b, "beta": -b}
