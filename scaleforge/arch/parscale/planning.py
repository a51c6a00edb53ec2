"""Choosing P (torch-free): the ParScale law joined to the planner's Chinchilla law.

Assumption (stated in docs/parscale.md and the plan's streams table): P streams act on the parameter
term only, as the ParScale law L(N, P) = (A / (N (k ln P + 1)))^alpha + E has it, so

    L(N, D, P) = E + A / (N m)^alpha + B / D^beta,   m = k ln P + 1,

with the data term unchanged (D = tokens trained on; the ParScale fits held D fixed at 42B tokens,
so how P and D interact is not measured), and training compute C = 6 N D P (every token runs P
times). With N' = N m this is Chinchilla at compute C m / P: N' = N_opt(C m / P), N = N' / m,
D = D_opt(C m / P). k defaults to the Pile refit's 0.3345 (methods.md section 1) until a fit says
otherwise (a law with a `k` parameter).

At fixed TRAINING compute m / P < 1 for every P > 1, so P = 1 predicts the lowest loss, and that is
the planner's choice unless `--set model.streams=P` fixes P. The paper's case for P is inference:
a P-stream model of N weights matches a dense model of N m weights, so it serves that loss with
~1/m of the weight memory (plus a P x KV cache). The streams table shows both for each P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaleforge.arch.common.law import chinchilla_loss, compute_optimal

STREAM_CHOICES = (1, 2, 4, 8)
"""The P the planner considers (the paper's)."""
DEFAULT_K = 0.3345
"""k of the ParScale law, the Pile refit (methods.md section 1; Stack-V2-Python: 0.3935)."""
BYTES_PER_PARAM = 2
"""bf16 weights at inference."""


def multiplier(p: int, k: float = DEFAULT_K) -> float:
    """Equivalent parameter multiplier k ln P + 1."""
    return 1.0 + k * math.log(p)


def optimal_n(params: dict, budget: float, p: int, k: float = DEFAULT_K) -> float:
    """Compute-optimal N (weights) of a P-stream model at training compute `budget`."""
    m = multiplier(p, k)
    return compute_optimal(params, budget * m / p)[0] / m


def predicted_loss(params: dict, n: float, d: float, p: int, k: float = DEFAULT_K) -> float:
    """L(N, D, P) = E + A / (N m)^alpha + B / D^beta (the assumption above)."""
    return chinchilla_loss(params, n * multiplier(p, k), d)


@dataclass(frozen=True)
class StreamOption:
    """One P at the plan's budget."""

    p: int
    n: float
    """Compute-optimal N (weights)."""
    d: float
    """Tokens."""
    loss: float
    """Predicted loss."""
    weights_gb: float
    """bf16 weights at inference."""
    dense_n: float
    """The dense model of the same parameter term: N m."""
    dense_weights_gb: float


def stream_options(params: dict, budget: float, k: float = DEFAULT_K) -> list[StreamOption]:
    """Each P in STREAM_CHOICES at `budget`: N, D, loss, and the inference-memory comparison."""
    rows = []
    for p in STREAM_CHOICES:
        m = multiplier(p, k)
        n_eff, d = compute_optimal(params, budget * m / p)
        n = n_eff / m
        rows.append(StreamOption(
            p=p, n=n, d=d, loss=predicted_loss(params, n, d, p, k),
            weights_gb=n * BYTES_PER_PARAM / 1e9, dense_n=n_eff,
            dense_weights_gb=n_eff * BYTES_PER_PARAM / 1e9,
        ))
    return rows


def choose_streams(params: dict, budget: float, k: float = DEFAULT_K) -> int:
    """The P with the lowest predicted loss at training compute `budget` (ties: the smaller P)."""
    return min(stream_options(params, budget, k), key=lambda r: (r.loss, r.p)).p


def law_k(params: dict) -> float:
    """k from a law that has one (a ParScale fit), else the default."""
    k = params.get("k")
    return float(k) if isinstance(k, (int, float)) and k > 0 else DEFAULT_K
