"""The Chinchilla loss law's closed forms: torch-free, numpy-free, no state.

They sit here, below the planner, because a family's planning rules build on them (ParScale's
`arch/parscale/planning.py` joins its streams law to this one) and arch does not import upward into
`orchestrator/` (the layers in docs/architecture.md). The planner reaches them as
`orchestrator.plan.prior.chinchilla_loss` and `orchestrator.plan.prior.compute_optimal`.

L(N, D) = E + A / N^alpha + B / D^beta, N all parameters, D tokens; `params` is a dict with the
keys A, B, E, alpha, beta.

Compute-optimal allocation under C = 6 N D (Hoffmann et al. 2022, appendix D.2):
G = (alpha A / (beta B))^(1/(alpha+beta)), N_opt = G (C/6)^a, D_opt = (C/6)^b / G,
a = beta / (alpha+beta), b = alpha / (alpha+beta).
"""

from __future__ import annotations

import math


def chinchilla_loss(params: dict, n: float, d: float) -> float:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def compute_optimal(params: dict, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = flops."""
    alpha, beta = params["alpha"], params["beta"]
    # A bootstrap refit on few points can land on a bound: with beta = 0 (or B = 0) tokens do not
    # lower the loss, so all compute goes to parameters; with alpha = 0 (or A = 0) the reverse.
    if beta <= 0 or params["B"] <= 0:
        return math.inf, 0.0
    if alpha <= 0 or params["A"] <= 0:
        return 0.0, math.inf
    g = (alpha * params["A"] / (beta * params["B"])) ** (1.0 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    return g * (flops / 6.0) ** a, (flops / 6.0) ** b / g
