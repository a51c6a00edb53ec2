"""`orchestrate refit PLAN`: fit the laws to a plan's finished ladder runs and re-plan the target.

The fits are `fit/refit.py`'s (which runs are used and why, the points, the holdout); this verb
writes fit.json next to the plan and PNG plots under `plots/` (`plots.py`), then re-plans the target
from the new fit (the previous target moves to the plan's history). Bad input writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scaleforge import rundir
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.fit.laws import chinchilla
from scaleforge.orchestrator.fit.refit import (
    DEFAULT_BOOTSTRAP, RunRecord, collect_plan, fit_json, fit_records, holdout_check,
)
from scaleforge.orchestrator.plan.plan import replan_target
from scaleforge.orchestrator.plan.planfile import LawInfo, load_plan, save_plan
from scaleforge.orchestrator.report import plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="plan.yaml written by `orchestrate plan`")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="N", help="bootstrap resamples for the intervals")
    parser.add_argument("--no-replan", action="store_true", help="write fit.json and plots but leave plan.yaml as it is")
    parser.add_argument("--json", action="store_true", help="print fit.json's summary as JSON")
    parser.add_argument("--holdout-largest", action="store_true",
                        help="fit without the largest budget's runs and report how well that fit "
                        "predicts them (writes holdout.json; fit.json and the plan stay as they are)")
    parser.add_argument("--no-intermediate", action="store_true",
                        help="fit final losses only (not the annealing-corrected intermediate evaluations)")


def run(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise ConfigError("--bootstrap must be >= 0")
    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise ConfigError(f"{plan_path}: no such plan file")
    plan = load_plan(plan_path)
    records = collect_plan(plan, plan_path)
    if args.holdout_largest:
        return _holdout(records, plan_path, bootstrap=args.bootstrap, intermediate=not args.no_intermediate)
    refit = fit_records(records, bootstrap=args.bootstrap, intermediate=not args.no_intermediate)
    out_dir = plan_path.resolve().parent
    fit_path = out_dir / "fit.json"
    body = fit_json(refit)
    new_plan = None
    if not args.no_replan:
        law = LawInfo(
            name="chinchilla", params=dict(refit.chinchilla.params),
            ci={k: [float(lo), float(hi)] for k, (lo, hi) in refit.chinchilla.ci.items()},
            source="fit", path=str(fit_path),
        )
        samples = [chinchilla.published(t) for t in refit.chinchilla.samples] or None
        new_plan = replan_target(plan, law, samples)
    # Everything is computed: only now write.
    rundir.write_atomic(fit_path, json.dumps(body, indent=1) + "\n")
    written = plots.write_plots(refit, out_dir / "plots", target_budget=plan.budget)
    if new_plan is not None:
        save_plan(new_plan, plan_path)
    if args.json:
        print(json.dumps({k: body[k] for k in ("law", "params", "objective", "ci", "r2", "n_points", "warnings")}))
    else:
        plots.print_summary(refit, fit_path, written, new_plan)
    return 0


def _holdout(records: list[RunRecord], plan_path: Path, *, bootstrap: int, intermediate: bool) -> int:
    body = holdout_check(records, bootstrap=bootstrap, intermediate=intermediate)
    out = plan_path.resolve().parent / "holdout.json"
    rundir.write_atomic(out, json.dumps(body, indent=1) + "\n")
    print(f"fit without budget {body['budget']:.3g} ({len(body['runs'])} runs held out):")
    intervals = body.get("interval") or [None] * len(body["runs"])
    for name, pred, act, err, iv in zip(body["runs"], body["predicted"], body["actual"], body["rel_error"], intervals):
        where = f" [{iv[0]:.4f}, {iv[1]:.4f}] {'inside' if iv[0] <= act <= iv[1] else 'OUTSIDE'}" if iv else ""
        print(f"  {name}: predicted {pred:.4f}{where}, actual {act:.4f}, error {100 * err:+.2f}%")
    print(f"mean |relative error| {100 * body['mean_abs_rel_error']:.2f}%; wrote {out}")
    return 0
