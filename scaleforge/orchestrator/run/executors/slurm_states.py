"""Slurm job states (the executors' state interface): one squeue and at most one sacct call for the
job chains of any number of runs. Torch-free.

A run's Slurm record is a chain (its first job and the continuation jobs that resume it, `slurm.py`);
`query_states` answers with each chain's first active job, else its last ended one.
"""

from __future__ import annotations

from scaleforge.orchestrator.run.executors import (
    ACTIVE, ENDED, UNKNOWN, JobState, Runner, SchedulerError, first_line, run_command,
)
from scaleforge.rundir import JobRecord

# Slurm job states in which a job still holds or waits for resources (squeue's and sacct's names).
SLURM_ACTIVE = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
    "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "SPECIAL_EXIT",
    "STOPPED",
})
# A job missing from both squeue and sacct this long after submission is taken as gone; before that,
# as pending: slurmdbd may record a new job seconds after sbatch returns (accounting lags).
ACCOUNTING_LAG_S = 120.0


def parse_slurm_table(text: str) -> dict[str, str]:
    """`JOBID|STATE` lines (squeue or sacct) -> {job id: state}; array ranges are expanded."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:
            continue  # job steps (`123.batch`) carry no state of their own
        jid, state = parts[0], parts[1].split()[0].rstrip("+") if parts[1].split() else ""
        for one in _expand_job_id(jid):
            out[one] = state
    return out


def _expand_job_id(jid: str) -> list[str]:
    # `12_[0-3,5%2]` (a pending array) -> 12_0 .. 12_3, 12_5
    if "_[" not in jid:
        return [jid]
    base, rest = jid.split("_[", 1)
    rest = rest.rstrip("]").split("%")[0]
    out = []
    for part in rest.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_job_states(job_ids: list[str], *, runner: Runner = run_command
                     ) -> tuple[dict[str, str], str | None]:
    """States of many Slurm jobs: one squeue call, plus one sacct call for those squeue no longer
    has. Returns ({job id: state}, why sacct could not answer or None).

    squeue answers from slurmctld's memory (pending and running jobs, always current): its failure is
    a SchedulerError. sacct answers from accounting, which may be disabled, down or lagging.
    """
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}, None
    bases = sorted({j.split("_")[0] for j in ids})
    # -t all: jobs that ended within MinJobAge too, so sacct is asked only about older ones
    sq = runner(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(bases)])
    if sq.returncode != 0 and "Invalid job id" not in (sq.stderr or ""):
        raise SchedulerError(f"squeue failed: {first_line(sq)} (is SLURM_CONF set and the "
                             "cluster up?)")
    states = parse_slurm_table(sq.stdout if sq.returncode == 0 else "")
    missing = [j for j in ids if j not in states]
    sacct_error = None
    if missing:
        acct = runner(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                       ",".join(sorted({j.split("_")[0] for j in missing}))])
        if acct.returncode == 0:
            for jid, state in parse_slurm_table(acct.stdout).items():
                states.setdefault(jid, state)
        else:
            sacct_error = f"sacct failed: {first_line(acct)}"
    return {j: states[j] for j in ids if j in states}, sacct_error



def query_states(records: list[JobRecord], *, now: float, runner: Runner = run_command
                 ) -> list[JobState]:
    """The state of each record's job chain: its first active job, else its last ended one.

    A chain squeue does not hold whose jobs sacct cannot name (slurmdbd down) is `unknown`; with
    accounting disabled for good ("accounting storage is disabled"), squeue, which holds every
    active job, is the answer and the chain has ended.
    """
    states, sacct_error = slurm_job_states([j for r in records for j in r.job_ids], runner=runner)
    gone_for_good = sacct_error is not None and "accounting storage is disabled" in sacct_error
    return [_chain_state(r, states, now, None if gone_for_good else sacct_error) for r in records]


def _chain_state(record: JobRecord, sched: dict[str, str], now: float, sacct_error: str | None
                 ) -> JobState:
    last, last_id, unseen = "", record.job, False
    for jid in record.job_ids:
        state = sched.get(jid)
        if state is None:
            if now - record.submitted_at < ACCOUNTING_LAG_S and not sacct_error:
                return JobState(kind=ACTIVE, label="SUBMITTED", job=jid)  # accounting lags sbatch
            unseen = True
            continue
        if state in SLURM_ACTIVE:
            # the first active job of the chain: the running one, or the next to run
            return JobState(kind=ACTIVE, label=state, job=jid)
        if not last or state != "CANCELLED":
            # continuations cancelled because the job before them ended well say nothing new
            last, last_id = state, jid
    if unseen and sacct_error:
        return JobState(kind=UNKNOWN, label="?", job=last_id, why=sacct_error)
    return JobState(kind=ENDED, label=last or "GONE", job=last_id)

