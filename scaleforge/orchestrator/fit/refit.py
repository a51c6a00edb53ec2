"""Refit: the laws fitted to a plan's finished ladder runs (what `orchestrate refit` writes).

Reads each ladder run's directory (run.yaml, metrics.jsonl, status.json), keeps the runs whose final
loss can be trusted, fits Chinchilla Approach 3 (with bootstrap intervals) and, where the ladder has
IsoFLOP groups, Approach 2 beside it, and the LR-annealing law to each kept run's whole curve; the
result becomes fit.json (`fit_json`). The verb itself (`report/refit_cli.py`) writes it with the
plots and re-plans the target from it.

A run is left out, with a warning naming it and why, when it
- has not completed (status.json `state` other than `completed`, or no metrics),
- diverged (state `diverged`, or a NaN / inf loss anywhere in its metrics),
- is undercooled: its loss still falls at the end (mean of the last 5% of training lines more than
  `UNDERCOOLED_DROP` below the mean of the 5% before) while its learning rate was never annealed
  (final lr above `ANNEALED_LR_RATIO` of the peak), or falls more than `STEEP_DROP` even though it
  was annealed, so its final loss is not final,
- or is dominated: another kept run has no more parameters AND no more tokens yet a lower loss
  (L falls in both N and D, so the larger run's loss is not believable: a bad rung).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from scaleforge import rundir
from scaleforge.config import load_runspec
from scaleforge.errors import FitError
from scaleforge.orchestrator.fit import fitter
from scaleforge.orchestrator.fit.laws import annealing, chinchilla, isoflop
from scaleforge.orchestrator.plan import planfile
from scaleforge.pretrain.schedules import lr_at

UNDERCOOLED_DROP = 0.01
"""Relative drop between the last two 5% windows above which a run with a high final lr is still cooling."""
STEEP_DROP = 0.05
"""The same drop above which even an annealed run is still learning fast: its loss is not final.
(Completed WSD runs of the CPU demo ladder measured 0.3-2.2%: the decay itself lowers the loss.)"""
ANNEALED_LR_RATIO = 0.1
"""A run whose final lr is at most this fraction of its peak has been annealed (cooled)."""
MIN_LINES_FOR_COOLING = 40
"""Training lines needed to judge cooling (two windows of >= 2 lines)."""
FINAL_EVAL_FRACTION = 0.95
"""An evaluation at or after this fraction of the last step counts as the run's final loss."""
DEFAULT_BOOTSTRAP = 1000
"""Bootstrap resamples for refit's intervals (Epoch used 4,000; 1,000 takes about a second)."""


@dataclass(kw_only=True, frozen=True)
class RunRecord:
    """What refit reads from one run directory."""

    name: str
    """Run name."""
    path: str
    """Run directory."""
    budget: float
    """The budget the planner sized the run for (groups IsoFLOP profiles)."""
    N: float
    """The law's N (run.yaml's model `law_variables()["N"]`, else the plan's N)."""
    state: str = "missing"
    """status.json `state` (`missing` without one)."""
    D: float = float("nan")
    """Tokens trained (last metrics line)."""
    C: float = float("nan")
    """FLOPs spent (last metrics line)."""
    L: float = float("nan")
    """Final loss: a final evaluation if there is one, else the mean of the last training losses."""
    curve: dict = field(default_factory=dict)
    """Training lines as arrays: step, tokens, flops, loss, lr."""
    excluded: str = ""
    """Why the run is left out of the fits (empty: used)."""
    train: object = None
    """The run's TrainSpec (from run.yaml; None without one): its learning-rate schedule."""
    evals: tuple = ()
    """Evaluation lines as (step, tokens, eval_loss)."""


# ----------------------------------------------------------------------------------------------
# reading run directories


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a metrics.jsonl; torn lines are skipped."""
    train, evals = [], []
    for rec in rundir.read_metrics(path):
        if not isinstance(rec.get("step"), int):
            continue
        if "loss" in rec:
            train.append(rec)
        elif "eval_loss" in rec:
            evals.append(rec)
    return train, evals


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def collect_run(run_dir: str | Path, *, name: str, budget: float, n_params: float) -> RunRecord:
    """One run directory -> RunRecord, with `excluded` set when it cannot be used as it is."""
    run_dir = Path(run_dir)
    rec = RunRecord(name=name, path=str(run_dir), budget=float(budget), N=float(n_params))
    if not run_dir.is_dir():
        return replace(rec, excluded="no run directory (not submitted)")
    spec_file = rundir.spec_path(run_dir)
    if spec_file.is_file():
        try:
            spec = load_runspec(spec_file)
            rec = replace(rec, N=float(spec.model.law_variables()["N"]), train=spec.train)
        except Exception as exc:  # an unreadable run.yaml is reported, not fatal to the refit
            return replace(rec, excluded=f"run.yaml unreadable ({str(exc).splitlines()[0]})")
    status = rundir.read_status(run_dir)
    state = str(status.get("state", "missing")) if isinstance(status, dict) else "missing"
    rec = replace(rec, state=state)
    train, evals = read_metrics(rundir.metrics_path(run_dir))
    if train:
        curve = {k: np.array([_number(r.get(k)) for r in train]) for k in ("step", "tokens", "flops", "loss", "lr")}
        rec = replace(rec, curve=curve, D=float(curve["tokens"][-1]), C=float(curve["flops"][-1]))
    rec = replace(rec, evals=tuple((int(r["step"]), _number(r.get("tokens")), _number(r.get("eval_loss")))
                                   for r in evals))
    losses = [_number(r.get("loss")) for r in train] + [_number(r.get("eval_loss")) for r in evals]
    if state == rundir.DIVERGED or not all(math.isfinite(v) for v in losses):
        bad = next((v for v in losses if not math.isfinite(v)), None)
        why = f"a {bad} loss" if bad is not None else "status diverged"
        return replace(rec, excluded=f"diverged ({why})")
    if state != rundir.COMPLETED:
        return replace(rec, excluded=f"not completed (state {state})")
    if not train:
        return replace(rec, excluded="no training lines in metrics.jsonl")
    last_step = train[-1]["step"]
    finals = [r for r in evals if r["step"] >= FINAL_EVAL_FRACTION * last_step]
    if finals:
        loss = _number(finals[-1]["eval_loss"])
    else:
        loss = float(np.mean(rec.curve["loss"][-max(1, len(train) // 100) :]))
    rec = replace(rec, L=loss)
    if not (math.isfinite(rec.D) and rec.D > 0 and math.isfinite(rec.C) and rec.C > 0):
        return replace(rec, excluded="metrics lines lack positive tokens / flops")
    drop = cooling_drop(rec.curve["loss"])
    lr = rec.curve["lr"]
    annealed = bool(lr.size) and np.nanmax(lr) > 0 and lr[-1] <= ANNEALED_LR_RATIO * np.nanmax(lr)
    if drop > (STEEP_DROP if annealed else UNDERCOOLED_DROP):
        how = "" if annealed else f", final lr {lr[-1]:.3g} not annealed"
        return replace(rec, excluded=f"undercooled (loss still fell {100 * drop:.1f}% over the last 5% of training{how})")
    return rec


def cooling_drop(loss: np.ndarray) -> float:
    """Relative drop of the mean loss from the second-to-last to the last 5% window (0 if too short)."""
    n = loss.size
    if n < MIN_LINES_FOR_COOLING:
        return 0.0
    w = max(2, n // 20)
    before, last = float(loss[-2 * w : -w].mean()), float(loss[-w:].mean())
    return (before - last) / last


def exclude_dominated(records: list[RunRecord]) -> list[RunRecord]:
    """Mark runs whose loss is above that of a run with no more parameters and no more tokens."""
    out = list(records)
    kept = [i for i, r in enumerate(out) if not r.excluded]
    for i in kept:
        ri = out[i]
        for j in kept:
            rj = out[j]
            if i != j and rj.N <= ri.N * 1.0001 and rj.D <= ri.D * 1.0001 and rj.L < ri.L and (rj.N, rj.D) != (ri.N, ri.D):
                out[i] = replace(
                    ri, excluded=f"loss {ri.L:.4g} above {rj.name}'s {rj.L:.4g}, which has fewer parameters and tokens"
                )
                break
    return out


def collect_plan(plan, plan_path: str | Path) -> list[RunRecord]:
    """RunRecords of a plan's ladder runs, with exclusions applied."""
    records = [collect_run(planfile.run_dir(plan, plan_path, r), name=r.name, budget=r.budget, n_params=r.N) for r in plan.ladder]
    return exclude_dominated(records)


# ----------------------------------------------------------------------------------------------
# fitting


@dataclass(kw_only=True, frozen=True)
class Refit:
    """Everything refit computed, before anything is written."""

    records: tuple
    """RunRecord per ladder run."""
    chinchilla: object
    """fit.FitResult of Approach 3 on the kept runs."""
    isoflop: object | None
    """isoflop.IsoflopResult, or None when the ladder has too few IsoFLOP groups."""
    annealing: dict
    """Run name -> fitted annealing-law parameters (runs with a curve long enough)."""
    holdout: dict | None = None
    """Approach 3 refit without the largest budget, scored on that budget's runs (None: too few)."""
    points: tuple = ()
    """The Point list Approach 3 was fitted to (finals and intermediate evaluations)."""
    warnings: tuple
    """One line each."""


def fit_records(records: list[RunRecord], *, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                intermediate: bool = True) -> Refit:
    warnings = [f"excluded {r.name}: {r.excluded}" for r in records if r.excluded]
    kept = usable(records)
    points, curves = fit_points(kept, intermediate, warnings)
    data = {k: np.array([getattr(q, k) for q in points]) for k in ("N", "D", "L")}
    groups = np.array([q.run for q in points])
    a3 = fitter.fit(chinchilla.LAW, data, fitter.FitOptions(bootstrap=bootstrap, seed=seed), groups=groups)
    a2 = None
    finals = {"N": np.array([r.N for r in kept]), "D": np.array([r.D for r in kept]), "L": np.array([r.L for r in kept])}
    try:
        a2 = isoflop.fit({"N": finals["N"], "C": np.array([r.budget for r in kept]), "L": finals["L"]})
        warnings += [f"isoflop: {w}" for w in a2.warnings]
    except FitError as exc:
        warnings.append(f"isoflop (Approach 2) not fitted: {exc}")
    holdout = rollout(kept, points)
    return Refit(records=tuple(records), chinchilla=a3, isoflop=a2, annealing=curves, holdout=holdout,
                 points=tuple(points), warnings=tuple(warnings))


def usable(records: list[RunRecord]) -> list[RunRecord]:
    """The runs a fit can use; too few is a FitError saying so."""
    kept = [r for r in records if not r.excluded]
    if not kept:
        causes = sorted({r.excluded.split(" (")[0] for r in records}) or ["no ladder runs"]
        raise FitError(f"no usable runs to fit ({len(records)} ladder runs: {'; '.join(causes)}); finish or rerun them first")
    need = chinchilla.LAW.min_points
    if len(kept) < need:
        raise FitError(f"law chinchilla needs at least {need} usable runs, got {len(kept)} of {len(records)}: finish more ladder runs")
    return kept


def fit_points(kept: list[RunRecord], intermediate: bool, warnings: list[str]) -> tuple[list, dict]:
    """(Approach-3 points, annealing-law parameters by run): each run's final loss, plus its
    annealing-corrected intermediate evaluations when `intermediate`."""
    curves = {}
    for r in kept:
        s1, s2, loss = annealing_points(r)
        if loss.size >= annealing.LAW.min_points:
            try:
                # A per-run fit of a 4-parameter curve: a bounded effort (60 iterations).
                curves[r.name] = fitter.fit(annealing.LAW, {"S1": s1, "S2": s2, "L": loss}, fitter.FitOptions(max_iter=60)).params
            except FitError as exc:
                warnings.append(f"annealing law on {r.name} not fitted: {exc}")
    points = [Point(run=r.name, N=r.N, D=r.D, L=r.L, kind="final", step=int(r.curve["step"][-1])) for r in kept]
    if intermediate:
        for r in kept:
            points += intermediate_points(r, curves.get(r.name))
    return points, curves


@dataclass(kw_only=True, frozen=True)
class Point:
    """One (N, D, L) point of the Approach-3 fit."""

    run: str
    """The run it comes from."""
    N: float
    """The law's N."""
    D: float
    """Tokens trained at the point."""
    L: float
    """Loss: the run's final loss, or an annealing-corrected intermediate evaluation."""
    kind: str
    """`final`, or `intermediate` (an evaluation in the stable phase of a WSD run, shifted by the
    run's fitted annealing law to the loss a run of that length would have reached)."""
    step: int
    """The step of the evaluation (the last step for `final`)."""


INTERMEDIATE_FROM = 0.3
"""Evaluations before this fraction of a run's steps are not used as points: the earliest part of
training fits no scaling law (Choshen et al. 2024 drop it)."""


def intermediate_points(r: RunRecord, law: dict | None) -> list[Point]:
    """Extra (N, D, L) points from a WSD run's evaluations in its stable phase (methods 8.2, 8.5).

    An evaluation at step s of the stable phase is not the loss of a run of s steps: that run would
    have decayed its learning rate over its last `decay_fraction`. The run's own annealing law
    L = L0 + A S1^-alpha - C S2 (Tissue et al. 2024) gives the difference between that schedule and
    the one actually followed up to s; the point is the evaluation plus that difference. Without an
    annealing fit, a schedule other than WSD, or no evaluations, there are none.
    """
    train = r.train
    if law is None or train is None or train.schedule != "wsd" or not r.evals:
        return []
    decay_start = train.steps - max(1, round(train.decay_fraction * train.steps))
    out = []
    for step, tokens, loss in r.evals:
        if not (INTERMEDIATE_FROM * train.steps <= step <= decay_start and step < train.steps):
            continue
        if step <= train.warmup_steps + 1 or not (math.isfinite(tokens) and tokens > 0):
            continue
        short = replace(train, steps=step)
        hyp = np.array([lr_at(i, short) for i in range(step)])
        act = np.array([lr_at(i, train) for i in range(step)])
        warm = min(train.warmup_steps, step - 1)
        (s1h, s2h), (s1a, s2a) = (tuple(a[-1] for a in annealing.areas(x, warmup=warm)) for x in (hyp, act))
        shift = float(annealing.loss(law, s1h, s2h) - annealing.loss(law, s1a, s2a))
        out.append(Point(run=r.name, N=r.N, D=float(tokens), L=loss + shift, kind="intermediate", step=step))
    return out


def rollout(kept: list[RunRecord], points: list[Point], *, bootstrap: int = 0) -> dict | None:
    """Held-out check: fit Approach 3 without the largest budget's runs, predict their final losses.

    The error on the held-out budget is what to expect, at best, from the extrapolation to the
    target (Choshen et al. put the floor from seed noise at about 4%). With `bootstrap`, each
    prediction carries its 95% interval over the refits.
    """
    top = max(r.budget for r in kept)
    held = [r for r in kept if r.budget >= top]
    held_names = {r.name for r in held}
    train_pts = [q for q in points if q.run not in held_names]
    if len({q.run for q in train_pts}) < chinchilla.LAW.min_points or not held:
        return None
    data = {k: np.array([getattr(q, k) for q in train_pts]) for k in ("N", "D", "L")}
    res = fitter.fit(chinchilla.LAW, data, fitter.FitOptions(bootstrap=bootstrap),
                     groups=np.array([q.run for q in train_pts]))
    n, d, actual = (np.array([getattr(r, k) for r in held]) for k in ("N", "D", "L"))
    pred = chinchilla.loss(res.params, n, d)
    err = pred / actual - 1.0
    out = {
        "budget": float(top),
        "runs": [r.name for r in held],
        "params": res.params,
        "predicted": [float(v) for v in pred],
        "actual": [float(v) for v in actual],
        "rel_error": [float(v) for v in err],
        "mean_abs_rel_error": float(np.abs(err).mean()),
    }
    if bootstrap and len(res.samples):
        per = np.array([chinchilla.loss(chinchilla.published(t), n, d) for t in res.samples])
        lo, hi = np.percentile(per, 2.5, axis=0), np.percentile(per, 97.5, axis=0)
        out["interval"] = [[float(a), float(b)] for a, b in zip(lo, hi)]
        out["inside"] = [bool(a <= v <= b) for a, b, v in zip(lo, hi, actual)]
    return out


def annealing_points(r: RunRecord, max_points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S1, S2, loss) along a run's curve from its logged learning rates (warmup: lr still rising)."""
    if not r.curve or not np.all(np.isfinite(r.curve["lr"])) or r.curve["lr"].max() <= 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    lr, step, loss = r.curve["lr"], r.curve["step"], r.curve["loss"]
    # Metrics may be logged every k steps: expand to one learning rate per step.
    per_step = np.interp(np.arange(1, int(step[-1]) + 1), step, lr)
    warmup = int(np.argmax(per_step >= per_step.max() * (1 - 1e-9)))
    s1, s2 = annealing.areas(per_step, warmup=warmup)
    idx = step.astype(int) - 1 - warmup
    ok = idx >= 0
    idx, loss = idx[ok], loss[ok]
    take = np.unique(np.linspace(0, idx.size - 1, min(max_points, idx.size)).astype(int)) if idx.size else idx
    return s1[idx[take]], s2[idx[take]], loss[take]


# ----------------------------------------------------------------------------------------------
# writing


def fit_json(refit: Refit) -> dict:
    a3 = refit.chinchilla
    out = a3.to_json()
    out["samples"] = [chinchilla.published(t) for t in a3.samples]
    out["runs"] = [
        {"name": r.name, "N": r.N, "D": _json_num(r.D), "C": _json_num(r.C), "budget": r.budget, "L": _json_num(r.L), "state": r.state, "used": not r.excluded, "excluded": r.excluded}
        for r in refit.records
    ]
    out["residuals"] = [float(v) for v in a3.residuals]
    out["points"] = [
        {"run": q.run, "N": q.N, "D": q.D, "L": q.L, "kind": q.kind, "step": q.step} for q in refit.points
    ]
    out["isoflop"] = refit.isoflop.to_json() if refit.isoflop is not None else None
    out["annealing"] = refit.annealing
    out["holdout"] = refit.holdout
    out["warnings"] = list(refit.warnings)
    return out


def _json_num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def holdout_check(records: list[RunRecord], *, bootstrap: int = DEFAULT_BOOTSTRAP, intermediate: bool = True) -> dict:
    """The `--holdout-largest` report: Approach 3 without the largest budget, scored on its runs."""
    warnings: list[str] = [f"excluded {r.name}: {r.excluded}" for r in records if r.excluded]
    kept = usable(records)
    points, _ = fit_points(kept, intermediate, warnings)
    out = rollout(kept, points, bootstrap=bootstrap)
    if out is None:
        raise FitError(
            "too few runs below the largest budget to fit without it (the law needs "
            "6 runs): plan more budgets"
        )
    return {**out, "warnings": warnings}
