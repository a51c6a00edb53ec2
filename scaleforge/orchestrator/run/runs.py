"""Run states and idempotence: what `submit` and `status` know about each run. Torch-free.

A run's state is read from its directory FIRST (status.json, metrics.jsonl, checkpoints/latest, which
the trainer writes); the executors are asked only about runs whose directory does not already say
they are finished, through one interface (`job_states`) that batches the question: a ladder of
hundreds of Slurm runs costs one squeue and at most one sacct call. An executor that cannot be asked
leaves its runs `unknown`, never "gone".

The executor records each submission in job.json: executor, job ids (a Slurm run has a chain: its
first job and the continuation jobs that resume it after a preemption), submit time, host and pid
(local). `submit` never queues a run twice: a run whose recorded job is pending or running is
skipped, a finished run is skipped, an interrupted one is resumed. A growth stage waits for the run
it starts from (`RunState.waits_for`; the entries: `entries.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from scaleforge import rundir
from scaleforge.orchestrator.run.entries import RunEntry, run_name
from scaleforge.orchestrator.run.executors import (
    ACTIVE, UNKNOWN, JobState, Runner, SchedulerError, retry, run_command,
)
from scaleforge.orchestrator.run.executors import local, slurm_states
from scaleforge.rundir import (
    FINAL_STATES, TRAINER_STATES, DirState, JobRecord, read_job, read_run_dir, write_job,
)

__all__ = [
    "FINAL_STATES", "TRAINER_STATES", "DirState", "JobRecord", "RunState", "SchedulerError",
    "job_states", "read_job", "read_run_dir", "run_states", "wait_for_runs", "write_job",
]


@dataclass(kw_only=True, frozen=True)
class RunState:
    """A run's state as `status` shows it and `submit` acts on it."""

    entry: RunEntry
    """The run."""
    state: str
    """new | queued | running | completed | failed | preempted | interrupted | diverged | unknown."""
    step: int = 0
    """Last completed step."""
    total_steps: int | None = None
    """Steps the run trains for."""
    last_loss: float | None = None
    """Last training loss."""
    job: str = ""
    """Job id shown (first Slurm job, or local:<pid>), empty if never submitted."""
    job_state: str = ""
    """The executor's word for the recorded job (a Slurm state name; PENDING, RUNNING, GONE or
    EXIT n locally; ? when the executor could not be asked)."""
    record: JobRecord | None = None
    """The recorded submission."""
    waits_for: tuple[str, ...] = ()
    """Runs this one starts from that have not completed yet (it launches after them)."""
    why: str = ""
    """For `unknown`: why the executor could not tell."""
    checkpoint: str | None = None
    """The last complete checkpoint (what a resume starts from), None without one."""
    job_active: bool = False
    """A job of the run still holds or waits for resources (a failed run's job may be ending, or
    requeued by Slurm after a node failure: it is not launched again until that job has gone)."""

    @property
    def action(self) -> str:
        """What `submit` does: `skip` (finished or queued), `start` (no checkpoint) or `resume`."""
        if self.state in FINAL_STATES or self.state in ("queued", "running", "unknown"):
            return "skip"
        if self.job_active:
            return "skip"
        return "start" if self.step == 0 and self.checkpoint is None else "resume"


def run_states(entries: list[RunEntry], *, runner: Runner = run_command, now: float | None = None,
               tolerant: bool = False) -> list[RunState]:
    """The state of every entry: run directories first, then one batched query per executor.

    Without `tolerant`, a run left `unknown` because its executor could not be asked raises
    SchedulerError (`submit` must not guess); with it, `status` shows `unknown`.
    """
    now = time.time() if now is None else now
    dirs = [read_run_dir(e.run_dir) for e in entries]
    records = [read_job(e.run_dir) if d.exists else None for e, d in zip(entries, dirs)]
    # a finished run's directory is the whole answer: its executor is not asked
    asked = [r if d.state not in FINAL_STATES else None for d, r in zip(dirs, records)]
    jobs = job_states(asked, now=now, runner=runner)
    states = [_state(e, d, r, j) for e, d, r, j in zip(entries, dirs, records, jobs)]
    if not tolerant:
        unknown = [s for s in states if s.state == "unknown"]
        if unknown:
            raise SchedulerError(f"the state of run {unknown[0].entry.name} is unknown "
                                 f"({unknown[0].why or 'no executor could tell'})")
    return _with_waits(states)


def _with_waits(states: list[RunState]) -> list[RunState]:
    out = []
    for st in states:
        waits = tuple(run_name(p) for p in st.entry.after
                      if read_run_dir(p).state != rundir.COMPLETED)
        out.append(replace(st, waits_for=waits) if waits and st.state not in FINAL_STATES else st)
    return out


def wait_for_runs(entries: list[RunEntry], *, timeout_s: float | None = None, poll_s: float = 10.0,
                  echo: Callable[[str], None] = print, runner: Runner = run_command
                  ) -> list[RunState]:
    """Poll until no run is queued or running (one batched scheduler query per poll).

    Prints each state change; returns the final states. Raises SchedulerError after `timeout_s`, or
    when the executor could not be asked after its retries.
    """
    deadline = None if timeout_s is None else time.time() + timeout_s
    seen: dict[str, str] = {}
    while True:
        states = retry(lambda: run_states(entries, runner=runner), what="asking for job states",
                       echo=echo)
        for st in states:
            shown = f"{st.state} {st.step}/{st.total_steps}"
            if seen.get(st.entry.name, "").split()[:1] != shown.split()[:1]:
                job = " ".join(x for x in (st.job, st.job_state) if x)
                echo(f"{st.entry.name}: {shown}" + (f" (job {job})" if st.job else ""))
            seen[st.entry.name] = shown
        if not any(st.state in ("queued", "running") for st in states):
            return states
        if deadline is not None and time.time() > deadline:
            raise SchedulerError(f"runs still queued or running after {timeout_s:.0f} s: "
                                 + ", ".join(s.entry.name for s in states
                                             if s.state in ("queued", "running")))
        time.sleep(poll_s)


def _state(entry: RunEntry, d: DirState, record: JobRecord | None, job: JobState | None) -> RunState:
    base = dict(entry=entry, step=d.step, total_steps=d.total_steps or entry.spec.train.steps,
                last_loss=d.last_loss, record=record, job=record.job if record else "",
                checkpoint=d.latest_checkpoint)
    written = d.state
    if written in FINAL_STATES:
        return RunState(state=written, **base)
    if record is None or job is None:
        return RunState(state=_from_dir(written, d, None), **base)
    base["job"] = job.job or base["job"]
    if job.kind == UNKNOWN:
        return RunState(state="unknown", job_state=job.label or "?", why=job.why, **base)
    if job.kind == ACTIVE:
        if written == rundir.FAILED:
            # the trainer already failed (a rank died, a node was lost): its job is only ending
            return RunState(state=rundir.FAILED, job_state=job.label, job_active=True, **base)
        return RunState(state=rundir.RUNNING if job.running else "queued", job_state=job.label,
                        **base)
    return RunState(state=_from_dir(written, d, record), job_state=job.label, **base)


def _from_dir(written: str | None, d: DirState, record: JobRecord | None) -> str:
    """The state of a run no job holds, from what its directory says."""
    if written == rundir.RUNNING:
        # status.json says running but no job holds the run: killed without a chance to save
        return "interrupted"
    if written in TRAINER_STATES:
        return written
    never_launched = record is None or (record.executor == "local" and not record.attempts)
    if not never_launched and d.step == 0 and d.latest_checkpoint is None:
        # submitted, never started training, and the job is gone (cancelled, or it failed at start)
        return rundir.FAILED
    return "new" if d.step == 0 else "interrupted"


def job_states(records: Sequence[JobRecord | None], *, now: float | None = None,
               runner: Runner = run_command) -> list[JobState | None]:
    """The job state of each record (None for None), one batched query per executor."""
    now = time.time() if now is None else now
    out: list[JobState | None] = [None] * len(records)
    by_kind: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if rec is not None:
            by_kind.setdefault(rec.executor, []).append(i)
    for kind, idx in by_kind.items():
        module = slurm_states if kind == "slurm" else local
        try:
            states = module.query_states([records[i] for i in idx], now=now, runner=runner)
        except SchedulerError as exc:
            states = [JobState(kind=UNKNOWN, label="?", job=records[i].job, why=str(exc))
                      for i in idx]
        for i, state in zip(idx, states):
            out[i] = state
    return out
