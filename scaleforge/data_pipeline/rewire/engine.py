"""datatrove runs the stages: each is a PipelineStep, run by LocalPipelineExecutor (default) or
SlurmPipelineExecutor (`--executor slurm`), with a logging folder per step under OUT/logs.

datatrove marks every finished task in its logging folder and skips it on a rerun; inside a task
the rewrite stage reuses committed batches, so a killed run loses at most the batch in flight.
Only the rewrite stage runs `executor.tasks` tasks; classify, filter and mix run as one task each
(they stream the pool once and hold a few numbers per document). A local worker process dies with
the process that started it (PR_SET_PDEATHSIG), so a killed run leaves nothing writing into OUT.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from scaleforge.data_pipeline.rewire import files, stages
from scaleforge.data_pipeline.rewire.config import RewireConfig
from scaleforge.data_pipeline.rewire.workers import MAIN_PID, die_with_parent, pdeathsig
from scaleforge.errors import ConfigError, ScaleforgeError

EXECUTORS = ("local", "slurm")
SLURM_POLL_S = 5.0
"""Seconds between checks of the Slurm jobs' completion markers."""

STEPS = (
    ("classify", stages.classify_stage, False),
    ("rewrite", stages.rewrite_stage, True),
    ("filter", stages.filter_stage, False),
    ("mix", stages.mix_stage, False),
)
"""(stage, function, runs executor.tasks tasks) in order; dedup's MinHash stages go before mix."""


_FORKS_DIE_WITH_ME = {"on": False}
"""While the executors run, a process forked from this one (datatrove's multiprocess Manager)
dies with it: a SIGKILLed run leaves no process behind."""
os.register_at_fork(after_in_child=lambda: _FORKS_DIE_WITH_ME["on"] and pdeathsig())


class RewireStep(PipelineStep):
    """One REWIRE stage as a datatrove step: runs `stages.<stage>_stage(cfg, out, rank, world_size)`."""

    type = "♻️ REWIRE"

    def __init__(self, stage: str, fn, cfg: RewireConfig, out: Path):
        self.name = stage  # before the base class names its stats after the step
        super().__init__()
        self.fn = fn
        self.cfg = cfg
        self.out = Path(out)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        die_with_parent()
        with self.track_time():
            self.fn(self.cfg, self.out, rank, world_size)
        self.stat_update("tasks")
        yield from ()


def plan(cfg: RewireConfig, out: Path, until: str) -> list[tuple[str, list, int]]:
    """(step name, datatrove pipeline, tasks) of every step up to stage `until`, in order."""
    from scaleforge.data_pipeline.rewire import dedup

    steps = []
    for stage, fn, parallel in STEPS:
        if stage == "mix" and cfg.dedup.enabled:
            steps += dedup.pipelines(cfg, out)
        if stage == "mix" and until == "dedup":
            break
        steps.append((stage, [RewireStep(stage, fn, cfg, out)], cfg.executor.tasks if parallel else 1))
        if stage == until:
            break
    return steps


def run_local(cfg: RewireConfig, out: Path, until: str) -> None:
    """Run the steps up to `until` one after the other in this process (and its workers)."""
    from datatrove.executor import LocalPipelineExecutor

    os.environ[MAIN_PID] = str(os.getpid())
    _FORKS_DIE_WITH_ME["on"] = True
    try:
        for name, pipeline, tasks in plan(cfg, out, until):
            LocalPipelineExecutor(
                pipeline, tasks=tasks, workers=min(cfg.executor.workers, tasks),
                logging_dir=str(files.logging_dir(out, name)), skip_completed=True,
            ).run()
            _check_complete(out, name, tasks)
    finally:
        _FORKS_DIE_WITH_ME["on"] = False


def _check_complete(out: Path, stage: str, tasks: int) -> None:
    done = files.logging_dir(out, stage) / "completions"
    missing = [r for r in range(tasks) if not (done / f"{r:05d}").is_file()]
    if missing:
        raise ScaleforgeError(f"{stage}: task(s) {', '.join(map(str, missing))} did not finish (logs in "
                              f"{files.logging_dir(out, stage)}/logs): rerun to retry them")


def default_partition() -> str:
    """The cluster's default partition (sinfo marks it with *)."""
    import subprocess

    res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    marked = [p[:-1] for p in res.stdout.split() if p.endswith("*")]
    if res.returncode or not marked:
        raise ConfigError("executor.partition is empty and the cluster names no default partition "
                          "(sinfo): set executor.partition")
    return marked[0]


def run_slurm(cfg: RewireConfig, out: Path, until: str, echo=print) -> None:
    """Submit the steps up to `until` as Slurm job arrays chained by dependencies; wait for them."""
    import sys

    from datatrove.executor import SlurmPipelineExecutor

    ex = cfg.executor
    partition = ex.partition or default_partition()
    activate = Path(sys.executable).parent / "activate"  # the job runs in this environment
    chain = []
    prev = None
    for name, pipeline, tasks in plan(cfg, out, until):
        prev = SlurmPipelineExecutor(
            pipeline, tasks=tasks, time=ex.time, partition=partition,
            cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=ex.mem_per_cpu_gb,
            gpus_per_task=ex.gpus_per_task if name == "rewrite" else 0,
            job_name=f"rewire-{name}", venv_path=str(activate) if activate.is_file() else None,
            depends=prev, requeue=False, logging_dir=str(files.logging_dir(out, name)), skip_completed=True,
            slurm_logs_folder=str(files.logging_dir(out, name) / "slurm"),
        )
        chain.append((name, tasks, prev))
    prev.run()  # submits the chain, first step first
    echo(f"submitted {len(chain)} Slurm job array(s): {', '.join(n for n, _, _ in chain)}")
    for name, tasks, _ in chain:
        done = files.logging_dir(out, name) / "completions"
        while sum((done / f"{r:05d}").is_file() for r in range(tasks)) < tasks:
            _check_jobs(chain)
            time.sleep(SLURM_POLL_S)


def _check_jobs(chain) -> None:
    """Stop waiting when a job of the chain ended without its completion markers."""
    import subprocess

    for name, _, job in chain:
        if job.job_id and job.job_id != -1:
            res = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job.job_id), "-o", "State"],
                                 capture_output=True, text=True)
            states = {s.split()[0] for s in res.stdout.split() if s}
            bad = states & {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
            if bad:
                raise ScaleforgeError(f"rewire: Slurm job {job.job_id} ({name}) ended {sorted(bad)[0]}; its logs "
                                      f"are under OUT/logs/{name}: fix and rerun (finished tasks are skipped)")


def run(cfg: RewireConfig, out: Path, until: str, executor: str = "local", echo=print) -> None:
    """The stages up to `until` on the named executor."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "slurm":
        run_slurm(cfg, out, until, echo)
    else:
        run_local(cfg, out, until)
