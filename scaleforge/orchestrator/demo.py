"""`orchestrate demo`: the whole loop on this machine in a few minutes.

plan a tiny IsoFLOP ladder -> train it (local executor, or the Slurm cluster SLURM_CONF names) ->
refit the law to the runs' own losses -> print the forecast for the target budget, write the plots.

The ladder is sized for two CPU cores: budgets of 5e10-5e11 FLOPs, models of 2e4-2e5 parameters,
128-token samples, on the bundled corpus re-tokenised with a 512-id BPE (with the default 8,192 ids
the embedding alone is 5e5 parameters, more than the compute-optimal model at these budgets).
Re-running the command resumes: finished runs are skipped, interrupted ones continue.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from pathlib import Path

from scaleforge.errors import ConfigError, ScaleforgeError

DEMO_VOCAB = 512
"""BPE ids of the demo store: keeps the embedding small beside 5e4-3e5-parameter models."""
DEMO_SEQ_LEN = 128
"""Tokens per sample in the demo ladder."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--executor", choices=("local", "slurm"), default="local",
        help="local: subprocesses on this machine (default); slurm: the cluster SLURM_CONF names")
    add("--out", default="demo", metavar="DIR", help="folder for plan.yaml, runs/, fit.json, plots (demo)")
    add("--budget", default="5e13", metavar="C", help="target budget to forecast, FLOPs (5e13)")
    add("--budgets", type=int, default=3, metavar="K", help="ladder budgets (3)")
    add("--sizes", type=int, default=4, metavar="S", help="model sizes per ladder budget (4)")
    add("--ladder-min", type=float, default=1e-3, metavar="F", help="smallest ladder budget / C (1e-3)")
    add("--ladder-max", type=float, default=1e-2, metavar="F", help="largest ladder budget / C (1e-2)")
    add("--cores", type=int, default=None, metavar="N", help="cores for the local executor (all)")


def run(args: argparse.Namespace) -> int:
    from scaleforge import cli
    from scaleforge.orchestrator.cluster import cpu_cluster
    from scaleforge.orchestrator.plan import _number, make_plan
    from scaleforge.orchestrator.planfile import load_plan, plan_to_yaml

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: name a folder for the demo")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    budget = _number("--budget", args.budget)

    _stage(1, "token store", f"bundled corpus, {DEMO_VOCAB}-id BPE")
    store = demo_store()

    _stage(2, "plan", f"ladder below {budget:.3g} FLOPs on this machine")
    plan = make_plan(
        budget, cluster=cpu_cluster(1), ladder_min=args.ladder_min, ladder_max=args.ladder_max,
        budgets=args.budgets, sizes=args.sizes, size_span=3.0, seq_len=DEMO_SEQ_LEN,
        # Runs of a few hundred steps: a checkpoint every 250 steps and an evaluation every 100 keep
        # the trainer's time on training (the planner's default is 10 checkpoints and 20 evaluations).
        overrides=(f"data.stores=[{store}]", f"model.vocab_size={DEMO_VOCAB}",
                   "checkpoint.every=250", "eval.every=100"),
    )
    plan_path = out / "plan.yaml"
    if plan_path.exists() and load_plan(plan_path).ladder == plan.ladder:
        print(f"{plan_path}: same ladder as before; finished runs are skipped")
    else:
        plan_path.write_text(plan_to_yaml(plan))
    from scaleforge.orchestrator.plan_table import print_plan

    print_plan(plan)

    _stage(3, "train", f"{len(plan.ladder)} runs with the {args.executor} executor")
    submit = ["submit", str(plan_path), "--executor", args.executor]
    if args.cores:
        submit += ["--cores", str(args.cores)]
    with ladder_progress(plan_path):
        _check(cli.main(submit), "submit")
        if args.executor == "slurm":
            from scaleforge.orchestrator import runs

            runs.wait_for_runs(runs.entries_from_plan(plan_path), poll_s=5.0)

    _stage(4, "refit", "fit the law to the ladder's own losses, re-plan the target")
    _check(cli.main(["refit", str(plan_path)]), "refit")

    _stage(5, "forecast", "")
    replanned = load_plan(plan_path)
    t = replanned.target
    print(
        f"forecast at {replanned.budget:.3g} FLOPs: N={t.N:.3g} parameters "
        f"[{t.N_ci[0]:.3g}, {t.N_ci[1]:.3g}], D={t.D:.3g} tokens [{t.D_ci[0]:.3g}, {t.D_ci[1]:.3g}], "
        f"loss {t.loss:.3f} [{t.loss_ci[0]:.3f}, {t.loss_ci[1]:.3f}] (law: {replanned.law.source})"
    )
    plots = sorted(str(p.relative_to(out)) for p in (out / "plots").glob("*.png"))
    print(f"wrote {out / 'fit.json'} and {', '.join(plots) or 'no plots'} in {time.monotonic() - started:.0f} s")
    return 0


def demo_store() -> Path:
    """The bundled corpus tokenised with a DEMO_VOCAB-id BPE (built once, then reused)."""
    from scaleforge.data_pipeline import prepare
    from scaleforge.data_pipeline.tokenizer import scaleforge_home

    path = scaleforge_home() / "stores" / f"bundled-v{DEMO_VOCAB}"
    code = prepare.main(["--out", str(path), "--vocab-size", str(DEMO_VOCAB)])
    _check(code, "building the demo token store")
    return path


@contextlib.contextmanager
def ladder_progress(plan_path: Path, poll_s: float = 1.0):
    """A progress bar over all ladder steps, read from the run directories while the block runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scaleforge.orchestrator import runs

    entries = runs.entries_from_plan(plan_path)
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
    print(f"\n[{i}/5] {name}" + (f": {detail}" if detail else ""), flush=True)


def _check(code: int, what: str) -> None:
    if code:
        raise ScaleforgeError(f"demo stopped: {what} failed (exit {code}); see the messages above")
