"""Scaling-law forms, one module each. Parametric laws expose `LAW` (a `fitter.Law`) for the shared
fitter; `isoflop` (Chinchilla Approach 2) has its own two-stage fit."""

from __future__ import annotations

from scaleforge.errors import FitError
from scaleforge.orchestrator.fit.fitter import Law
from scaleforge.orchestrator.fit.laws import annealing, chinchilla, isoflop, overtrain, parscale

PARAMETRIC: dict[str, Law] = {m.LAW.name: m.LAW for m in (chinchilla, parscale, overtrain, annealing)}
"""Laws fitted by the shared Huber fitter, by name."""

NAMES: tuple[str, ...] = (*PARAMETRIC, "isoflop")
"""Every law `orchestrate fit --law` accepts."""

__all__ = ["NAMES", "PARAMETRIC", "get", "isoflop"]


def get(name: str) -> Law:
    """The parametric law called `name`."""
    try:
        return PARAMETRIC[name]
    except KeyError:
        raise FitError(f"unknown law {name!r}: choose one of {', '.join(NAMES)}") from None
