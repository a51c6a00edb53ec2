"""ParScale (Chen et al. 2025): L(N, P) = (A * 1e9 / (N * (k ln P + 1)))^alpha + E.

N is the non-embedding parameter count including the ParScale prefixes and aggregator; P is the
number of parallel streams. Fitted in natural parameters (E, A, alpha, k), each bounded >= 1e-8,
on the log of the predicted loss, from the published grid E0 in e^{-1, -0.5, 0},
A0 in e^{-4, -2, 0, 2, 4}, alpha0 in {0, 0.5, ..., 2}, k0 in {0.2, 0.4, 0.6, 0.8} (300 starts).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from scaleforge.orchestrator.fit.fitter import Evaluation, Law

PARAMS = ("E", "A", "alpha", "k")
A_UNIT = 1e9
"""A is quoted in units of 1e9 parameters, as in the reference code."""


def features(data: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.log(data["N"]), np.log(data["P"])], axis=1)


def evaluate(theta: np.ndarray, x: np.ndarray) -> Evaluation:
    e, a, al, k = (theta[:, j : j + 1] for j in range(4))
    ln_n, ln_p = x[:, 0], x[:, 1]
    mult = 1.0 + k * ln_p
    q = np.log(a * A_UNIT) - ln_n - np.log(mult)
    t = np.exp(al * q)
    tot = e + t
    inv = 1.0 / tot
    jac = np.stack([inv, t * al / a * inv, t * q * inv, -t * al * ln_p / mult * inv], axis=1)
    return Evaluation(value=np.log(tot), jac=jac)


def published(theta: np.ndarray) -> dict[str, float]:
    return dict(zip(PARAMS, (float(v) for v in theta)))


def grid() -> np.ndarray:
    es = np.exp([-1.0, -0.5, 0.0])
    as_ = np.exp([-4.0, -2.0, 0.0, 2.0, 4.0])
    als = [0.0, 0.5, 1.0, 1.5, 2.0]
    ks = [0.2, 0.4, 0.6, 0.8]
    return np.array(list(itertools.product(es, as_, als, ks)))


LAW = Law(
    name="parscale",
    params=PARAMS,
    variables=("N", "P"),
    features=features,
    evaluate=evaluate,
    starts=grid(),
    lower=np.full(4, 1e-8),
    upper=np.array([20.0, 1e4, 5.0, 20.0]),
    published=published,
    min_points=5,
)


def multiplier(params: Mapping[str, float], p: np.ndarray | float) -> np.ndarray:
    """Equivalent parameter multiplier k ln P + 1 of P parallel streams."""
    return 1.0 + params["k"] * np.log(np.asarray(p, dtype=float))


def loss(params: Mapping[str, float], n: np.ndarray | float, p: np.ndarray | float) -> np.ndarray:
    """L(N, P) with published parameters (A in units of 1e9)."""
    n = np.asarray(n, dtype=float)
    return (params["A"] * A_UNIT / (n * multiplier(params, p))) ** params["alpha"] + params["E"]
