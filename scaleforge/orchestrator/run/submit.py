"""`orchestrate submit PLAN [--executor local|slurm] [--dry-run] [--only NAME...] [--target]`.

Launches a plan's runs, idempotently: each run's state is read from its run directory first, then the
jobs it recorded are looked up in one batched scheduler query. A finished run (completed, diverged) is
skipped, a run whose job is still pending or running is skipped, an interrupted, preempted or failed
run is resumed from its last checkpoint, and a new run is started. Submitting twice queues nothing the
second time.

The state of each run's job comes from its executor (`runs.job_states`); when the executor
cannot be asked (squeue or sacct failing, psutil missing), `submit` retries with backoff, then stops
with a one-line error and launches nothing. A run that starts from another run of the plan
(`checkpoint.init_from`, a growth stage) is launched after it: locally once it completed, on Slurm
with `--dependency=afterok` on its source's jobs. Torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl

from scaleforge.errors import ConfigError
from scaleforge.orchestrator.run import runs
from scaleforge.orchestrator.run.entries import entries_from_plan
from scaleforge.orchestrator.run.executors import retry
from scaleforge.orchestrator.run.executors.local import run_local
from scaleforge.orchestrator.run.executors.slurm import (
    SlurmOptions, check_cluster_fits, describe_plan, submit_slurm,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="plan.yaml written by `orchestrate plan`")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="local: subprocesses on this machine (default); slurm: jobs through "
                             "submitit on the cluster SLURM_CONF names")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would be launched, skipped or resumed; launch nothing")
    parser.add_argument("--only", nargs="+", action="extend", default=[], metavar="NAME",
                        help="launch only these runs (by name)")
    parser.add_argument("--target", action="store_true",
                        help="also launch the plan's target run (after `orchestrate refit`)")
    parser.add_argument("--growth", action="store_true",
                        help="also launch the plan's growth stages, each after the stage it starts "
                             "from has completed")
    parser.add_argument("--time-min", type=int, default=None, metavar="MIN",
                        help="per-job time limit in minutes (default: twice the plan's estimate "
                             "+ 10)")
    parser.add_argument("--max-requeues", type=int, default=3, metavar="N",
                        help="times a run may be preempted or stopped at its time limit and resumed "
                             "(default 3)")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--partition", default=None, help="partition (default: the cluster's)")
    slurm.add_argument("--account", default=None, help="account to charge")
    slurm.add_argument("--qos", default=None, help="quality of service")
    slurm.add_argument("--cpus-per-task", type=int, default=1, metavar="N",
                       help="CPU cores per rank (default 1)")
    slurm.add_argument("--signal-delay", type=int, default=120, metavar="S",
                       help="seconds before the time limit at which USR2 asks runs to save "
                            "(default 120)")
    slurm.add_argument("--no-array", action="store_true",
                       help="one job per run instead of arrays of same-shaped runs")
    slurm.add_argument("--throttle", type=int, default=32, metavar="N",
                       help="at most N tasks of one array run at once (default 32)")
    slurm.add_argument("--hold", action="store_true",
                       help="submit the jobs held: nothing starts before `scontrol release`")
    slurm.add_argument("--wait", action="store_true",
                       help="then wait until none of the plan's runs is queued or running (exit 1 "
                            "if any did not complete)")
    local = parser.add_argument_group("local")
    local.add_argument("--cores", type=int, default=None, metavar="N",
                       help="cores the local executor may fill (default: all)")


def run(args: argparse.Namespace) -> int:
    if args.max_requeues < 0:
        raise ConfigError(f"--max-requeues must be >= 0, got {args.max_requeues}")
    if args.time_min is not None and args.time_min < 1:
        raise ConfigError(f"--time-min must be >= 1, got {args.time_min}")
    if args.cores is not None and args.cores < 1:
        raise ConfigError(f"--cores must be >= 1, got {args.cores}")
    only = [n for item in args.only for n in item.split(",") if n]
    entries = entries_from_plan(args.plan, target=args.target, time_min=args.time_min,
                                only=only, growth=args.growth)
    options = _slurm_options(args) if args.executor == "slurm" else None
    if options is not None:
        check_cluster_fits(entries, options.partition)
    if args.executor != "slurm":
        return _submit(args, entries, options)
    with _submit_lock(entries):
        code = _submit(args, entries, options)
    if code or not args.wait or args.dry_run:
        return code
    final = runs.wait_for_runs(entries)
    return 0 if all(st.state == "completed" for st in final) else 1


def _submit(args: argparse.Namespace, entries: list, options) -> int:
    states = retry(lambda: runs.run_states(entries), what="asking the executor for job states",
                   echo=print)
    launch = []
    launching = {st.entry.name for st in states if st.action != "skip"}
    for st in states:
        verb = {"skip": "skip", "start": "start", "resume": "resume"}[st.action]
        why = st.state + (f", job {st.job} {st.job_state}" if st.job and st.job_state else "")
        step = ""
        if st.action == "resume":
            step = f" from {st.checkpoint}" if st.checkpoint else f" from step {st.step}"
        waits = f", waits for {', '.join(st.waits_for)}" if st.waits_for else ""
        print(f"{st.entry.name}: {verb}{step} ({why}){waits}")
        if st.action != "skip":
            stuck = [n for n, s in _sources(st, states) if s is None and n not in launching]
            if stuck:
                raise ConfigError(
                    f"run {st.entry.name} starts from {stuck[0]}, which is not completed and not "
                    f"part of this submission: submit {stuck[0]} too (drop --only, or add --growth)")
            launch.append(st.entry)
    if not launch:
        print("nothing to launch")
        return 0
    if args.dry_run:
        if options is not None:
            for line in describe_plan(launch, options):
                print(f"would submit {line}")
        print(f"dry run: {len(launch)} run(s) would be launched with the {args.executor} executor")
        return 0
    if args.executor == "slurm":
        queued = {st.entry.run_dir: st.record for st in states
                  if st.record is not None and st.state in ("queued", "running")}
        submit_slurm(launch, options, sources=queued)
        print(f"submitted {len(launch)} run(s); `orchestrate status {args.plan}` shows their states")
        return 0
    codes = run_local(launch, cores=args.cores, max_requeues=args.max_requeues)
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        print(f"{len(bad)} run(s) did not finish: "
              + ", ".join(f"{n} (exit {c})" for n, c in sorted(bad.items())))
        return 1
    return 0


def _sources(st, states) -> list[tuple[str, object]]:
    """(name, its RunState or None) for each not-completed source of `st`."""
    by_name = {s.entry.name: s for s in states}
    return [(n, by_name.get(n)) for n in st.waits_for]


def _slurm_options(args: argparse.Namespace):
    return SlurmOptions(partition=args.partition, account=args.account, qos=args.qos,
                        max_requeues=args.max_requeues, signal_delay_s=args.signal_delay,
                        cpus_per_task=args.cpus_per_task, array=not args.no_array,
                        throttle=args.throttle, hold=args.hold)


@contextlib.contextmanager
def _submit_lock(entries: list):
    """One `submit` at a time per runs directory: a second one waits until the first has recorded
    its jobs, then sees them queued (no run is queued twice)."""
    folders = sorted({e.run_dir.parent for e in entries})
    handles = []
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / ".submit.lock", "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
            handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.close()
