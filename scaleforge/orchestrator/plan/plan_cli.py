"""`orchestrate plan`: a compute budget -> an IsoFLOP ladder of small runs and one target run
(`ladder.py`, `plan.py`), written to plan.yaml (`planfile.py`) and shown as a table; `plan PLAN
--extend K` adds the runs that most shrink a refitted target's interval (`extend.py`).

Torch-free; the whole command answers in under a second.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scaleforge.arch.registry import known_archs
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan import prior
from scaleforge.orchestrator.plan.cluster import DEFAULT_CLUSTER, load_cluster
from scaleforge.orchestrator.plan.growth_ladder import table_lines
from scaleforge.orchestrator.plan.ladder import make_plan
from scaleforge.orchestrator.plan.plan import DEFAULT_UNIQUE_TOKENS, check_budget, law_from_fit, prior_law
from scaleforge.orchestrator.plan.plan_table import print_plan
from scaleforge.orchestrator.plan.planfile import load_plan, save_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("plan_file", nargs="?", metavar="PLAN",
        help="with --extend: the refitted plan.yaml to add runs to (written in place)")
    add("--extend", default=None, metavar="K",
        help="add K runs chosen to shrink the target loss's interval most (needs PLAN, after refit)")
    add("--allowance", default=None, metavar="C",
        help="with --extend: FLOPs the added runs may spend (default: one more IsoFLOP budget)")
    add("--budget", metavar="C", help="target compute in FLOPs, e.g. 1e21")
    add("--arch", default="dense", help=f"architecture family (known: {', '.join(known_archs())})")
    add("--cluster", metavar="FILE", help="cluster YAML (default: 16 nodes of 8 x H100 80 GB)")
    add("--law", metavar="FILE", help="fit.json to plan from (default: the Chinchilla prior)")
    add("--out", default="plan.yaml", metavar="PLAN", help="plan file to write (plan.yaml)")
    add("--ladder-min", default="1e-3", metavar="F", help="smallest ladder budget / C (1e-3)")
    add("--ladder-max", default=str(1 / 30), metavar="F", help="largest ladder budget / C (1/30)")
    add("--budgets", default="5", metavar="K", help="ladder budgets (5)")
    add("--sizes", default="7", metavar="S", help="model sizes per ladder budget (7)")
    add("--size-span", default="4", metavar="X", help="sizes span N_opt/X .. N_opt*X (4)")
    add("--unique-tokens", default=None, metavar="T",
        help="unique tokens in the data pool (default: the stores' train tokens, "
        f"or {DEFAULT_UNIQUE_TOKENS:.3g} when they are not built here)")
    add("--seq-len", default=None, metavar="S", help="sequence length (2048 on GPUs)")
    add("--runs-dir", default="runs", metavar="DIR", help="run directories, beside the plan (runs)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="RunSpec override for every run, e.g. model.vocab_size=32000 (repeatable)")
    add("--growth-stages", default="0", metavar="K",
        help="also plan the target as a growth ladder of K stages, each starting from the "
        "previous one's checkpoint (families with a growth rule: tokenformer, parscale)")
    add("--quiet", action="store_true", help="do not print the table")


def run(args: argparse.Namespace) -> int:
    if args.extend is not None or args.plan_file is not None:
        return _run_extend(args)
    if args.budget is None:
        raise ConfigError("--budget is required (or PLAN --extend K to add runs to a refitted plan)")
    budget = parse_number("--budget", args.budget)
    check_budget(budget)
    cluster = load_cluster(args.cluster) if args.cluster else DEFAULT_CLUSTER
    law, samples = law_from_fit(args.law) if args.law else (prior_law(budget), None)
    plan = make_plan(
        budget, arch=args.arch, cluster=cluster, law=law, samples=samples,
        ladder_min=parse_number("--ladder-min", args.ladder_min),
        ladder_max=parse_number("--ladder-max", args.ladder_max),
        budgets=parse_integer("--budgets", args.budgets), sizes=parse_integer("--sizes", args.sizes),
        size_span=parse_number("--size-span", args.size_span),
        unique_tokens=(parse_number("--unique-tokens", args.unique_tokens)
                       if args.unique_tokens is not None else None),
        seq_len=parse_integer("--seq-len", args.seq_len) if args.seq_len is not None else None,
        overrides=tuple(args.overrides), runs_dir=args.runs_dir,
        growth_stages=parse_integer("--growth-stages", args.growth_stages),
    )
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the plan file, e.g. {out / 'plan.yaml'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    if not args.quiet:
        print_plan(plan)
        for line in table_lines(plan.growth):
            print(line)
    save_plan(plan, out)
    sys.stdout.flush()
    for line in plan.warnings:
        print(f"warning: {line}", file=sys.stderr)
    sys.stderr.flush()
    print(f"wrote {out}")
    return 0


def _run_extend(args: argparse.Namespace) -> int:
    """`plan PLAN --extend K`: add the K runs that most shrink the target's interval, in place."""
    # imported here, not at the top: extend needs numpy (0.12-0.2 s), which `plan --budget` does
    # without to answer in under a second (see ladder.pool_tokens)
    from scaleforge.orchestrator.plan import extend

    if args.plan_file is None or args.extend is None:
        raise ConfigError("use `orchestrate plan PLAN --extend K` (both PLAN and --extend)")
    if args.budget is not None:
        raise ConfigError("--extend keeps the plan's budget: drop --budget")
    path = Path(args.plan_file)
    plan = load_plan(path)
    if plan.law.source != "fit" or not plan.law.path:
        raise ConfigError(f"{path}: planned from the prior; run `orchestrate refit {path}` before --extend")
    fit = prior.load_fit(plan.law.path)
    fit["residuals"] = json.loads(Path(plan.law.path).read_text()).get("residuals") or []
    allowance = parse_number("--allowance", args.allowance) if args.allowance is not None else None
    new, choice, _ = extend.extend_plan(plan, fit, k=parse_integer("--extend", args.extend), allowance=allowance)
    added = new.ladder[len(plan.ladder):]
    before = math.sqrt(choice.variance_before)
    print(f"target log-loss sd over the fit's bootstrap samples: {before:.4g}")
    for run, var in zip(added, choice.variance_after):
        print(f"  + {run.name}  N={run.N:.3g} D={run.D:.3g} FLOPs={run.flops:.3g}  "
              f"expected sd {math.sqrt(var):.4g}")
    print(f"{len(added)} runs, {choice.cost:.3g} FLOPs of the allowance")
    save_plan(new, path)
    print(f"wrote {path}")
    return 0


def parse_number(flag: str, text) -> float:
    """A flag's text as a finite float, or a one-line ConfigError naming the flag."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {text!r}")
    return value


def parse_integer(flag: str, text) -> int:
    """A flag's text as an integer (`1e3` is 1000), or a one-line ConfigError naming the flag."""
    value = parse_number(flag, text)
    if not value.is_integer():
        raise ConfigError(f"{flag} must be an integer, got {text!r}")
    return int(value)
