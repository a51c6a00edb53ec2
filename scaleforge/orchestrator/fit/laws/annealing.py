"""LR-annealing scaling law (Tissue et al. 2024): the loss along a learning-rate schedule.

L(s) = L0 + A S1(s)^(-alpha) - C S2(s), with the forward area S1(s) = sum_{i<=s} eta_i and the
annealing area S2(s) = sum_{i<=s} m_i, m_i = lambda m_{i-1} + (eta_{i-1} - eta_i) (lambda = 0.999).
Warmup steps count as eta_max in both areas and are then dropped. One fit can pool several curves
(e.g. a constant and a WSD schedule): each point is (S1, S2, L). Fitted with the shared Huber
fitter on ln L over a small grid of (L0, A, alpha, C) (81 starts).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from scaleforge.orchestrator.fit.fitter import Evaluation, Law

PARAMS = ("L0", "A", "alpha", "C")
DECAY = 0.999
"""Default momentum lambda of the annealing area (the paper explores 0.99-0.999)."""


def areas(lrs: np.ndarray, *, warmup: int = 0, decay: float = DECAY) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after each step of the schedule `lrs` (one learning rate per step), warmup dropped.

    Returns arrays of length len(lrs) - warmup: entry j belongs to step warmup + j.
    """
    eta = np.asarray(lrs, dtype=float).copy()
    if eta.ndim != 1 or eta.size <= warmup:
        raise ValueError(f"need a 1-D schedule longer than the warmup ({warmup}), got shape {eta.shape}")
    if warmup:
        eta[:warmup] = eta.max()
    s1 = np.cumsum(eta)
    drop = np.concatenate([[0.0], eta[:-1] - eta[1:]])
    m = np.empty_like(eta)
    acc = 0.0
    for i, v in enumerate(drop):  # a recurrence: one pass, steps are at most ~1e6
        acc = decay * acc + v
        m[i] = acc
    s2 = np.cumsum(m)
    return s1[warmup:], s2[warmup:]


def features(data: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.log(data["S1"]), data["S2"]], axis=1)


def evaluate(theta: np.ndarray, x: np.ndarray) -> Evaluation:
    l0, a, al, c = (theta[:, j : j + 1] for j in range(4))
    ln_s1, s2 = x[:, 0], x[:, 1]
    t = np.exp(-al * ln_s1)
    tot = l0 + a * t - c * s2
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(tot > 0, np.log(np.where(tot > 0, tot, 1.0)), np.nan)
        inv = 1.0 / tot
    jac = np.stack([inv + 0 * t, t * inv, -a * t * ln_s1 * inv, -s2 * inv], axis=1)
    return Evaluation(value=value, jac=jac)


def published(theta: np.ndarray) -> dict[str, float]:
    return dict(zip(PARAMS, (float(v) for v in theta)))


def grid() -> np.ndarray:
    return np.array(list(itertools.product([0.5, 1.5, 3.0], [0.1, 1.0, 10.0], [0.2, 0.5, 1.0], [0.1, 1.0, 10.0])))


LAW = Law(
    name="annealing",
    params=PARAMS,
    variables=("S1", "S2"),
    features=features,
    evaluate=evaluate,
    starts=grid(),
    lower=np.array([0.0, 0.0, 0.0, 0.0]),
    upper=np.array([50.0, 1e4, 5.0, 1e6]),
    published=published,
    min_points=6,
)


def loss(params: Mapping[str, float], s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """L(s) with published parameters from the areas S1, S2."""
    return params["L0"] + params["A"] * np.asarray(s1, dtype=float) ** (-params["alpha"]) - params["C"] * np.asarray(s2, dtype=float)
