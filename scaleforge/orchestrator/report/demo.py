"""`orchestrate demo`: the whole loop on this machine, ending in a forecast checked against a run.

plan a tiny IsoFLOP ladder -> train it -> refit -> extend once (`plan PLAN --extend`, the runs that
shrink the target's interval most) -> train them -> refit -> forecast the target budget (4x the
largest ladder budget) -> train that check run at the forecast's shape -> `demo/forecast.json`:
budget, predicted_loss, interval, actual_loss, relative_error and seed_spread (the spread of the
final eval loss over three seeds of one run at the largest ladder budget: the noise floor the error
is read against). Local executor, or the Slurm cluster SLURM_CONF names.

Sized for two CPU cores (4.6 minutes here: docs/scaling-laws.md has the measured run): ladder budgets of 6.2e10-2.5e11 FLOPs, models of
2e4-2e5 parameters, 128-token samples, on the bundled corpus re-tokenised with a 512-id BPE (with
the default 8,192 ids the embedding alone is 5e5 parameters, more than the compute-optimal model at
these budgets). The plan starts from the small-model prior (`prior.SMALL_BELOW`). Re-running the
command resumes: finished runs are skipped, interrupted ones continue.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

from scaleforge import rundir
from scaleforge.config import run_id
from scaleforge.data_pipeline import prepare
from scaleforge.data_pipeline.tokenizer import scaleforge_home
from scaleforge.errors import ConfigError, ScaleforgeError
from scaleforge.orchestrator.fit.refit import collect_run
from scaleforge.orchestrator.plan import plan_cli
from scaleforge.orchestrator.plan.cluster import cpu_cluster
from scaleforge.orchestrator.plan.ladder import make_plan
from scaleforge.orchestrator.plan.plan_table import print_plan
from scaleforge.orchestrator.plan.planfile import load_plan, run_dir, save_plan
from scaleforge.orchestrator.report import refit_cli
from scaleforge.orchestrator.run import runs, submit
from scaleforge.orchestrator.run.entries import entries_from_plan

DEMO_VOCAB = 512
"""BPE ids of the demo store: keeps the embedding small beside 5e4-3e5-parameter models."""
DEMO_SEQ_LEN = 128
"""Tokens per sample in the demo ladder."""
SEEDS = 3
"""Seeds of the run whose final-loss spread is the noise floor."""
STAGES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--executor", choices=("local", "slurm"), default="local",
        help="local: subprocesses on this machine (default); slurm: the cluster SLURM_CONF names")
    add("--out", default="demo", metavar="DIR", help="folder for plan.yaml, runs/, fit.json, plots (demo)")
    add("--budget", default="1e12", metavar="C",
        help="the check run's budget, FLOPs (1e12); the ladder ends at a quarter of it")
    add("--budgets", type=int, default=3, metavar="K", help="ladder budgets (3)")
    add("--sizes", type=int, default=7, metavar="S",
        help="model sizes asked for per ladder budget (7; tiny widths round some to one shape)")
    add("--ladder-min", type=float, default=1 / 16, metavar="F", help="smallest ladder budget / C (1/16)")
    add("--ladder-max", type=float, default=1 / 4, metavar="F",
        help="largest ladder budget / C (1/4: the forecast is 4x the ladder's top)")
    add("--extend", type=int, default=2, metavar="K", help="runs added by the one --extend (2)")
    add("--cores", type=int, default=None, metavar="N", help="cores for the local executor (all)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: name a folder for the demo")
    budget = plan_cli.parse_number("--budget", args.budget)
    if not args.ladder_max * 4 <= 1 + 1e-9:
        raise ConfigError(f"--ladder-max must be <= 1/4 (the check run is 4x the ladder's top), got {args.ladder_max:g}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    _stage(1, "token store", f"bundled corpus, {DEMO_VOCAB}-id BPE")
    store = demo_store()

    _stage(2, "plan", f"ladder up to {budget * args.ladder_max:.3g} FLOPs, check run at {budget:.3g}")
    plan = make_plan(
        budget, cluster=cpu_cluster(1), ladder_min=args.ladder_min, ladder_max=args.ladder_max,
        budgets=args.budgets, sizes=args.sizes, size_span=4.0, seq_len=DEMO_SEQ_LEN,
        # Runs of a few hundred steps: a checkpoint every 250 steps and an evaluation every 50 keep
        # the trainer's time on training and give the refit intermediate points.
        overrides=(f"data.stores=[{store}]", f"model.vocab_size={DEMO_VOCAB}",
                   "checkpoint.every=250", "eval.every=50"),
    )
    plan_path = out / "plan.yaml"
    if plan_path.exists() and load_plan(plan_path).ladder[: len(plan.ladder)] == plan.ladder:
        print(f"{plan_path}: same ladder as before; finished runs are skipped")
        plan = load_plan(plan_path)
    else:
        save_plan(plan, plan_path)
    seeds_path = out / "seeds.yaml"
    save_plan(seed_plan(plan), seeds_path)
    print_plan(plan)
    for line in plan.warnings:
        print(f"note: {line}")

    _stage(3, "train", f"{len(plan.ladder)} ladder runs with the {args.executor} executor")
    _submit(plan_path, args)

    _stage(4, "refit", "the law from the ladder's own losses")
    _check(_verb(["refit", str(plan_path), "--bootstrap", "400"]), "refit")

    _stage(5, "extend", f"{args.extend} runs that shrink the target's interval most")
    _check(_verb(["plan", str(plan_path), "--extend", str(args.extend),
                  "--allowance", f"{_seed_cost(plan):.3g}"]), "plan --extend")

    _stage(6, "train", f"the added runs, and {SEEDS - 1} more seeds of one largest-budget run")
    seeds = _background_submit(seeds_path, args)
    try:
        _submit(plan_path, args)
    except BaseException:
        _stop(seeds)  # the demo ends here: its background submit must not go on training alone
        raise
    _check(seeds.wait(), "submit (seeds)")

    _stage(7, "refit", "with the added runs; forecast the target")
    _check(_verb(["refit", str(plan_path), "--bootstrap", "400"]), "refit")
    replanned = load_plan(plan_path)
    t = replanned.target
    print(f"forecast at {replanned.budget:.3g} FLOPs: N={t.N:.3g}, D={t.D:.3g}: loss {t.loss:.4f} "
          f"[{t.loss_ci[0]:.4f}, {t.loss_ci[1]:.4f}]")

    _stage(8, "check run", f"{t.name} at the forecast's shape")
    _submit(plan_path, args, target=True)
    body = forecast_json(replanned, plan_path, seeds_path)
    path = out / "forecast.json"
    rundir.write_atomic(path, json.dumps(body, indent=1) + "\n")
    print_forecast(body)
    plots = sorted(str(p.relative_to(out)) for p in (out / "plots").glob("*.png"))
    print(f"wrote {path}, {out / 'fit.json'} and {', '.join(plots) or 'no plots'} "
          f"in {time.monotonic() - started:.0f} s")
    return 0


def seed_plan(plan):
    """A plan whose ladder is SEEDS - 1 copies, other seeds, of the middle-sized run of the largest
    budget (the plan's own run is the first seed); its runs live in `seeds/`."""
    top = max(r.budget for r in plan.ladder if "-ladder-" in r.name)
    rungs = sorted((r for r in plan.ladder if r.budget == top and "-ladder-" in r.name), key=lambda r: r.N)
    base = rungs[len(rungs) // 2]
    runs = []
    for k in range(1, SEEDS):
        name = f"{base.name}-seed{base.spec.seed + k}"
        spec = dataclasses.replace(base.spec, name=name, seed=base.spec.seed + k)
        runs.append(dataclasses.replace(base, name=name, spec=spec, run_id=run_id(spec)))
    return dataclasses.replace(plan, ladder=tuple(runs), runs_dir="seeds", history=(), warnings=())


def _seed_cost(plan) -> float:
    """The --extend allowance: what the extra seeds cost (two runs at the largest budget)."""
    top = max(r.budget for r in plan.ladder)
    return 2.0 * top


def forecast_json(plan, plan_path: Path, seeds_path: Path) -> dict:
    """The check: the target's forecast against its trained final eval loss, and the seed spread."""
    def record(p, path: Path, r):
        return collect_run(run_dir(p, path, r), name=r.name, budget=r.budget, n_params=r.N)

    t = plan.target
    rec = record(plan, plan_path, t)
    if not math.isfinite(rec.L):
        raise ScaleforgeError(f"the check run {t.name} has no final loss ({rec.excluded or rec.state})")
    seeds = load_plan(seeds_path)
    first = next(r for r in plan.ladder if r.name == seeds.ladder[0].name.rsplit("-seed", 1)[0])
    losses = [record(plan, plan_path, first).L] + [record(seeds, seeds_path, r).L for r in seeds.ladder]
    actual = float(rec.L)
    return {
        "budget": float(plan.budget),
        "N": int(t.N),
        "D": int(t.D),
        "predicted_loss": float(t.loss),
        "interval": [float(t.loss_ci[0]), float(t.loss_ci[1])],
        "actual_loss": actual,
        "relative_error": (float(t.loss) - actual) / actual,
        "inside_interval": bool(t.loss_ci[0] <= actual <= t.loss_ci[1]),
        "seed_spread": float(max(losses) - min(losses)),
        "seed_losses": [float(v) for v in losses],
        "seed_run": first.name,
        "law": {"params": dict(plan.law.params), "ci": {k: list(v) for k, v in plan.law.ci.items()}},
        "ladder_runs": len(plan.ladder),
        "largest_ladder_budget": float(max(r.budget for r in plan.ladder)),
    }


def print_forecast(body: dict) -> None:
    lo, hi = body["interval"]
    print(
        f"check at {body['budget']:.3g} FLOPs (N={body['N']:.3g}, D={body['D']:.3g}): predicted "
        f"{body['predicted_loss']:.4f} [{lo:.4f}, {hi:.4f}], actual {body['actual_loss']:.4f}, "
        f"relative error {100 * body['relative_error']:+.2f}% "
        f"({'inside' if body['inside_interval'] else 'OUTSIDE'} the 95% interval); "
        f"seed spread {body['seed_spread']:.4f} "
        f"({100 * body['seed_spread'] / body['actual_loss']:.2f}% of the loss, {len(body['seed_losses'])} seeds)"
    )


def _verb(argv: list[str]) -> int:
    """`orchestrate VERB ...` for the demo's verbs (plan, submit, refit), in this process: the verb
    module's own arguments and `run`; an error is printed and becomes the exit code, as on the
    command line."""
    module = {"plan": plan_cli, "submit": submit, "refit": refit_cli}[argv[0]]
    parser = argparse.ArgumentParser(prog=f"orchestrate {argv[0]}")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except ScaleforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _submit(plan_path: Path, args, *, target: bool = False) -> None:
    cmd = ["submit", str(plan_path), "--executor", args.executor] + (["--target"] if target else [])
    if args.cores:
        cmd += ["--cores", str(args.cores)]
    with ladder_progress(plan_path, target=target):
        _check(_verb(cmd), "submit")
        if args.executor == "slurm":
            runs.wait_for_runs(entries_from_plan(plan_path, target=target), poll_s=5.0)


def _background_submit(plan_path: Path, args) -> subprocess.Popen:
    """`submit` of another plan in a child process, one core, its output in its folder's log."""
    cmd = [sys.executable, "-m", "scaleforge.cli", "submit", str(plan_path), "--executor", args.executor]
    if args.executor == "local":
        cmd += ["--cores", "1"]
    else:
        cmd += ["--wait"]
    log = open(plan_path.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """SIGTERM a background `submit` (its runs save and stop), SIGKILL it if that takes too long."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def demo_store() -> Path:
    """The bundled corpus tokenised with a DEMO_VOCAB-id BPE (built once, then reused)."""
    path = scaleforge_home() / "stores" / f"bundled-v{DEMO_VOCAB}"
    code = prepare.main(["--out", str(path), "--vocab-size", str(DEMO_VOCAB)])
    _check(code, "building the demo token store")
    return path


@contextlib.contextmanager
def ladder_progress(plan_path: Path, poll_s: float = 1.0, *, target: bool = False):
    """A progress bar over all ladder steps, read from the run directories while the block runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    entries = entries_from_plan(plan_path, target=target)
    if target:
        entries = entries[-1:]
    total = sum(e.spec.train.steps for e in entries)
    stop = threading.Event()
    columns = (TextColumn("ladder steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("ladder", total=total)

        def poll() -> None:
            while not stop.wait(poll_s):
                done = sum(min(runs.read_run_dir(e.run_dir).step, e.spec.train.steps) for e in entries)
                progress.update(task, completed=done)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            done = sum(min(runs.read_run_dir(e.run_dir).step, e.spec.train.steps) for e in entries)
            progress.update(task, completed=done)


def _stage(i: int, name: str, detail: str) -> None:
    print(f"\n[{i}/{STAGES}] {name}" + (f": {detail}" if detail else ""), flush=True)


def _check(code: int, what: str) -> None:
    if code:
        raise ScaleforgeError(f"demo stopped: {what} failed (exit {code}); see the messages above")
