"""Inside a Slurm job: one srun task = one rank of one run (`TrainTask`, what submitit runs).

The task starts `python -m scaleforge.pretrain RUN.yaml --out DIR` as its rank, with the signals the
trainer handles held until its handler is in place, and turns the trainer's exit into the job's
(the launcher model, preemption and continuations: `slurm.py`). Torch-free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scaleforge import rundir
from scaleforge.orchestrator.run.executors import Runner, run_command

# Signals that ask the trainer to save and stop (scaleforge.pretrain.signals.HANDLED).
HELD_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(kw_only=True, frozen=True)
class TrainTask:
    """The function submitit runs in every srun task: trains one rank of one run."""

    run_dir: str
    """The run directory (run.yaml is read from it; logs are written to its logs/)."""
    continuation: bool = False
    """A continuation job: returns at once if the run already finished or failed."""
    python: str = ""
    """Interpreter for the trainer (default: the one running this task)."""
    after: tuple[str, ...] = ()
    """Run directories this run starts from (checkpoint.init_from): it trains only once they
    completed, and returns at once otherwise."""
    stop_ok: bool = False
    """A task of an array that has a continuation array: a run that saved and stopped (preempted,
    time limit) ends the task successfully, which starts its continuation task (`aftercorr` starts
    a task only after its corresponding task succeeded)."""

    def __call__(self) -> dict:
        return run_task(self)


class RunStopped(RuntimeError):
    """The trainer saved and stopped (preempted or at its time limit): the job ends failed, so the
    run's next continuation job starts."""


class RunFailed(RuntimeError):
    """The trainer failed."""


def run_task(task: TrainTask, *, requeue_code: int | None = None) -> dict:
    run_dir = Path(task.run_dir)
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    job = _job_id_from_env()
    restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if task.continuation or restarted:
        # a continuation, or a job Slurm requeued (after a node failure): a failed run is resumed
        # by `orchestrate submit`, not retried behind the user's back
        state = _status(run_dir).get("state")
        if state in rundir.FINAL_STATES or state == rundir.FAILED:
            return {"run_dir": str(run_dir), "state": state, "job": job, "skipped": True}
    waiting = [p for p in task.after if _status(Path(p)).get("state") != rundir.COMPLETED]
    if waiting:
        # its source did not complete (a dependency Slurm cancelled, then this continuation ran)
        return {"run_dir": str(run_dir), "state": "waiting", "waits_for": waiting, "job": job,
                "skipped": True}
    noted: list[int] = []
    # Replace submitit's handlers: its USR2 handler would requeue through scontrol immediately. The
    # trainer (this task's child, signalled by Slurm too) saves; we only wait for it.
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: noted.append(s))
    log_path = rundir.log_dir(run_dir) / f"slurm-{job}.rank{rank}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [task.python or sys.executable, "-m", "scaleforge.pretrain", str(rundir.spec_path(run_dir)),
           "--out", str(run_dir)]
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", rendezvous_address(env))
    with open(log_path, "a") as log:
        log.write(f"=== job {job} rank {rank} on {socket.gethostname()} node "
                  f"{env.get('SLURMD_NODENAME', '?')} local rank {env.get('SLURM_LOCALID', '0')} "
                  f"rendezvous {env['MASTER_ADDR']} "
                  f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')} ===\n")
        log.flush()
        # The trainer starts with the signals blocked and unblocks them once its handler is in
        # place (signals.install): a USR2 or SIGTERM during its start-up (imports, rendezvous) is
        # held instead of killing it, and its helpers started before that inherit the block.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        code = proc.wait()
    status = _status(run_dir)
    if code == 0:
        return {"run_dir": str(run_dir), "state": status.get("state"), "step": status.get("step"),
                "job": job}
    code_requeue = _requeue_exit_code() if requeue_code is None else requeue_code
    signals = ",".join(signal.Signals(s).name for s in noted) or "none seen by the task"
    if code == code_requeue and (rank != 0 or task.stop_ok):
        # Only rank 0 fails the job (which starts the continuation): srun --kill-on-bad-exit would
        # end rank 0 the moment another rank exited non-zero, while rank 0 still writes status.json
        # after the save's last barrier. In an array, the job ends well instead (`stop_ok`).
        return {"run_dir": str(run_dir), "state": rundir.PREEMPTED, "job": job, "rank": rank}
    if code == code_requeue:
        raise RunStopped(f"{run_dir.name}: saved at step {status.get('step')} and stopped "
                         f"(signals: {signals}); the next continuation job resumes it")
    raise RunFailed(f"{run_dir.name}: trainer exited with {code} (signals: {signals}); log: {log_path}")


def rendezvous_address(env: dict[str, str], *, runner: Runner = run_command) -> str:
    """The address of the job's first node as Slurm records it (its NodeAddr), for rank 0's store.

    Node names need not resolve (on many clusters and on the dev cluster they do not), so the name
    in SLURM_JOB_NODELIST is looked up in Slurm's node table (`sinfo -n NAME -o %o`, no scontrol:
    compute nodes often lack it). Without an answer: the address srun was started from, which is the
    batch host, the first node of the allocation (SLURM_LAUNCH_NODE_IPADDR).
    """
    # parallel.setup imports torch inside init_distributed and shutdown only; imported here, where
    # the rank runs, it stays out of the orchestrator's import graph (pyproject.toml's torch-free
    # contract ignores this one edge)
    from scaleforge.parallel.setup import first_host

    first = first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_STEP_NODELIST", ""))
    out = runner(["sinfo", "-h", "-N", "-n", first, "-o", "%o"])
    addr = out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else ""
    return addr or env.get("SLURM_LAUNCH_NODE_IPADDR") or first


def _requeue_exit_code() -> int:
    return int(rundir.REQUEUE_EXIT_CODE)


def _job_id_from_env() -> str:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID", "nojob")


def _status(run_dir: Path) -> dict:
    return rundir.read_status(run_dir)

