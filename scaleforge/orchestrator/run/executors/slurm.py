"""Slurm executor through submitit: one job per run, or one array for runs of the same shape.

Launcher model: one srun task per rank (`tasks_per_node` = ranks per node, ranks numbered node by
node, so tensor parallelism stays inside a node). Each task runs `TrainTask`, which starts
`python -m scaleforge.pretrain RUN.yaml --out DIR` as that rank (it reads SLURM_PROCID/SLURM_NTASKS
and the node-local SLURM_LOCALID), so every rank receives Slurm's signals itself: Slurm signals every
process of a job step on every node, not only the task's first one. The rendezvous (MASTER_ADDR) is
the job's first node's address as Slurm records it (NodeAddr, `rendezvous_address`), never its
name resolved: node names need not resolve. srun runs with `--kill-on-bad-exit=1`: a rank that fails
(a crash, or a peer lost with its node) ends every rank of the step, and the trainer's process-group
timeout bounds any wait on a peer that vanished without closing its sockets.

Preemption and time limits. Jobs are submitted with `--signal=USR2@<signal_delay_s>` (submitit's
preemption signal) and `--requeue`. On USR2 or SIGTERM the trainer's own handler sets a stop flag that
all ranks agree on at the next step, saves a checkpoint and exits with its requeue code. `TrainTask`
replaces submitit's USR2 handler (which would run `scontrol requeue` from the node at once, before the
trainer has saved) with one that only notes the signal, and turns rank 0's requeue exit into a failed
job (the other ranks end cleanly, so --kill-on-bad-exit does not cut rank 0's last writes short).

The requeue itself needs no Slurm command on the compute nodes (`scontrol` is often only on login
nodes, submitit#1601): at submission, each run also gets `max_requeues` continuation jobs, job k with
`--dependency=afternotok:J0:...:J(k-1) --kill-on-invalid-dep=yes`. A continuation starts only when all
jobs before it failed (saved-and-stopped, preempted, timed out or node failure), resumes from
checkpoints/latest, and is cancelled by Slurm as soon as one before it completes. A continuation (or
a job Slurm requeued itself) that finds the run finished or failed (status.json) returns at once, so
a crash is not retried behind the user's back. Runs in an array get continuation arrays, one per
level, task by task (`--dependency=aftercorr:<the array before>`): task i of level k starts as soon as
task i of level k-1 ended successfully, whatever the array's other tasks are doing, so a preempted
run of a 200-run ladder resumes at once instead of after the whole array. For that, a task that
saved and stopped ends successfully when a continuation follows it (`TrainTask.stop_ok`); a task
whose run finished returns at once (its continuation too), and a crash fails the task, which
cancels its continuations (kill-on-invalid-dep). Two sbatch calls queue a 200-run ladder with one
continuation each.

Job states: `query_states` answers for every record in one squeue and at most one sacct call.

Everything that reaches a shell or an `#SBATCH` line is checked here or quoted by submitit (shlex):
run names are restricted by the RunSpec; partition, account and paths are checked below.
Torch-free (submitit is imported when jobs are submitted).
"""


from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from scaleforge import rundir
from scaleforge.errors import ConfigError
from scaleforge.orchestrator import runs
from scaleforge.orchestrator.executors import (
    ACTIVE, ENDED, UNKNOWN, JobState, Runner, SchedulerError, retry, run_command,
)
from scaleforge.orchestrator.runs import RunEntry
from scaleforge.rundir import JobRecord

# Slurm names (partition, account, qos) and job names: no shell or sbatch metacharacters.
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Signals that ask the trainer to save and stop (scaleforge.pretrain.signals.HANDLED).
HELD_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Paths reach `#SBATCH --output=` (where Slurm expands %j and friends) and the srun command line.
UNSAFE_PATH_CHARS = ("%", "\n", "\r", "\0")


@dataclass(kw_only=True, frozen=True)
class SlurmOptions:
    """How runs are submitted to Slurm."""

    partition: str | None = None
    """Partition (default: the cluster's default partition)."""
    account: str | None = None
    """Account to charge (default: the user's default account)."""
    qos: str | None = None
    """Quality of service (default: none)."""
    max_requeues: int = 3
    """Continuation jobs per run: how often a run may be preempted or hit its time limit and resume."""
    signal_delay_s: int = 120
    """USR2 is sent this long before the time limit, so the trainer can save (Slurm may send it up
    to 60 s early)."""
    cpus_per_task: int = 1
    """CPU cores per rank (OMP_NUM_THREADS is set to it)."""
    array: bool = True
    """Submit runs of the same shape (nodes, ranks per node, GPUs) as one job array."""
    throttle: int = 32
    """At most this many tasks of one array run at once (`--array=0-N%throttle`): a ladder of
    hundreds of runs does not flood the queue's running slots."""
    hold: bool = False
    """Submit held (`sbatch --hold`): nothing starts until `scontrol release`."""
    python: str = field(default_factory=lambda: sys.executable)
    """Python interpreter on the compute nodes (the same environment as here by default)."""

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None and not SAFE_NAME_RE.match(value):
                raise ConfigError(f"slurm {name}={value!r}: use letters, digits, '.', '_' or '-'")
        if self.max_requeues < 0 or self.signal_delay_s < 0 or self.cpus_per_task < 1:
            raise ConfigError("slurm max_requeues and signal_delay_s must be >= 0, cpus_per_task >= 1")
        if self.throttle < 1:
            raise ConfigError(f"--throttle must be >= 1, got {self.throttle}")
        _check_path("python", self.python)


def _check_path(what: str, path: Any) -> None:
    text = str(path)
    bad = [c for c in UNSAFE_PATH_CHARS if c in text]
    if bad:
        raise ConfigError(f"{what} {text!r} contains {bad[0]!r}, which Slurm would expand or split: "
                          "use a path without it")


# ----------------------------------------------------------------------------------------------
# job states (the executors' state interface): one squeue and at most one sacct call per query

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
        raise SchedulerError(f"squeue failed: {_first_line(sq)} (is SLURM_CONF set and the "
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
            sacct_error = f"sacct failed: {_first_line(acct)}"
    return {j: states[j] for j in ids if j in states}, sacct_error


def _first_line(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stderr or proc.stdout or f"exit {proc.returncode}").strip()
    return (text.splitlines() or [""])[0][:300]


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


# ----------------------------------------------------------------------------------------------
# inside the job: one srun task = one rank


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


# ----------------------------------------------------------------------------------------------
# submission (login node)


def cluster_gpus() -> bool:
    """Whether any node of the cluster offers GPUs as a generic resource (gres)."""
    out = run_command(["sinfo", "-h", "-o", "%G"])
    if out.returncode != 0:
        raise SchedulerError(f"sinfo failed: {_first_line(out)} (is SLURM_CONF set and the "
                             "cluster up? `slurm/dev-cluster up` starts one on this machine)")
    return "gpu" in out.stdout


def cluster_nodes(partition: str | None = None, *, runner: Runner = run_command) -> int:
    """Nodes of the partition (the default one when None): the most one job may span."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%P|%t"]
    out = runner(cmd)
    if out.returncode != 0:
        raise SchedulerError(f"sinfo failed: {_first_line(out)} (is SLURM_CONF set and the cluster "
                             "up? `slurm/dev-cluster up` starts one on this machine)")
    nodes = set()
    for line in out.stdout.splitlines():
        name, _, rest = line.strip().partition("|")
        part, _, state = rest.partition("|")
        default = part.endswith("*")
        if (part.rstrip("*") == partition) if partition else default:
            nodes.add(name)  # down or drained ones too: they are the cluster's, and come back
    return len(nodes)


def check_cluster_fits(entries: list[RunEntry], partition: str | None = None, *,
                       runner: Runner = run_command) -> None:
    """Refuse, before anything is submitted, a run spanning more nodes than the cluster has."""
    if not entries:
        return
    widest = max(entries, key=lambda e: e.nodes)
    if widest.nodes == 1:
        return
    have = retry(lambda: cluster_nodes(partition, runner=runner), what="sinfo")
    if widest.nodes > have:
        where = f"partition {partition}" if partition else "the default partition"
        raise ConfigError(
            f"run {widest.name} needs {widest.nodes} nodes but {where} has {have}: plan for "
            f"{have} node(s) (`orchestrate plan --cluster FILE` with nodes: {have}) or add nodes")


def check_submittable(entries: list[RunEntry], *, has_gpus: bool) -> None:
    """Refuse runs the cluster cannot take, before anything is submitted."""
    for e in entries:
        _check_path("run directory", e.run_dir)
        if not SAFE_NAME_RE.match(e.name):
            raise ConfigError(f"run name {e.name!r}: use letters, digits, '.', '_' or '-'")
        if e.gpus_per_node and not has_gpus:
            raise ConfigError(
                f"run {e.name} asks for {e.gpus_per_node} GPUs per node but the cluster has no gpu "
                "gres: plan for a CPU cluster (`orchestrate plan --cluster FILE` with kind: cpu)"
            )


def _shape(e: RunEntry) -> tuple:
    # runs of one shape share an array; its time limit is the longest of theirs
    return (e.nodes, e.ranks_per_node, e.gpus_per_node)


def _parameters(e: RunEntry, options: SlurmOptions, job_name: str) -> dict:
    params: dict[str, Any] = dict(
        job_name=job_name,
        time=e.time_min,
        nodes=e.nodes,
        ntasks_per_node=e.ranks_per_node,
        cpus_per_task=options.cpus_per_task,
        signal_delay_s=options.signal_delay_s,
        stderr_to_stdout=True,
        setup=[f"export OMP_NUM_THREADS={int(options.cpus_per_task)}", "export PYTHONUNBUFFERED=1"],
        additional_parameters={"requeue": True, "kill-on-invalid-dep": "yes"},
        # one rank failing (a lost node, a crash) ends every rank of the step at once instead of
        # leaving the others blocked in a collective
        srun_args=["--kill-on-bad-exit=1"],
        array_parallelism=options.throttle,
    )
    if options.hold:
        params["additional_parameters"]["hold"] = True
    if e.gpus_per_node:
        params["gpus_per_node"] = e.gpus_per_node
    for name in ("partition", "account", "qos"):
        if getattr(options, name):
            params[name] = getattr(options, name)
    return params


def _executor(folder: Path, options: SlurmOptions, params: dict):
    import submitit

    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues,
                                python=_quote(options.python))
    ex.update_parameters(**params)
    return ex


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


def submit_slurm(entries: list[RunEntry], options: SlurmOptions | None = None, *,
                 echo: Callable[[str], None] = print,
                 sources: dict[Path, JobRecord] | None = None) -> dict[str, JobRecord]:
    """Submit every entry (first job + continuations); returns {run name: JobRecord}.

    Runs of one shape form one array (`--array=0-N%throttle`) and their continuations one array per
    level, task i after task i of the level before succeeded (`aftercorr`); a task whose run has
    finished returns at once. A single run's continuation k starts only if jobs 0..k-1 all failed
    (`afternotok`). A run that starts from another run (`RunEntry.after`) is a single job with
    `--dependency=afterok:<each job of its source's chain>` (any one of them), unless its source has
    completed. `sources` gives the records of sources queued by an earlier submission.

    Each run's job.json is written as soon as its first job is queued and rewritten as each
    continuation is added, so an interrupted submission never leaves a queued run unrecorded, and a
    failed sbatch records nothing for the runs it did not queue.
    """
    options = options or SlurmOptions()
    if not entries:
        return {}
    check_submittable(entries, has_gpus=retry(cluster_gpus, what="sinfo"))
    for e in entries:
        runs.prepare_run_dir(e)
    known: dict[Path, JobRecord] = dict(sources or {})
    groups: dict[tuple, list[RunEntry]] = {}
    for e in entries:
        # a run that waits for another is a job of its own: a dependency holds a whole array
        key = (e.run_dir.parent, *_shape(e), e.name if e.after else "")
        groups.setdefault(key, []).append(e)
    records: dict[str, JobRecord] = {}
    for (parent, *_), group in groups.items():
        folder = parent / ".slurm"
        depends = _dependency(group[0], known) if group[0].after else None
        first = _submit_first(group, folder, options, depends)
        for e, jid in zip(group, first):
            record = JobRecord(executor="slurm", job_ids=(jid,), submitted_at=time.time(),
                               host=socket.gethostname(), after=tuple(str(p) for p in e.after))
            rundir.write_job(e.run_dir, record)
            records[e.name] = known[e.run_dir] = record
            echo(f"{e.name}: job {jid} ({e.nodes} node{'s' if e.nodes > 1 else ''}, "
                 f"{e.ranks} rank{'s' if e.ranks > 1 else ''}, {e.time_min} min)"
                 + (f", after {depends}" if depends else ""))
        if len(group) > 1 and options.array:
            _array_continuations(group, folder, options, records)
        else:
            for e in group:
                _single_continuations(e, folder, options, records)
        for e in group:
            known[e.run_dir] = records[e.name]
    return records


def _dependency(e: RunEntry, known: dict[Path, JobRecord]) -> str | None:
    """`afterok:J0?afterok:J1...` over the job chains of e's not-yet-completed sources."""
    parts = []
    for source in e.after:
        if rundir.read_status(source).get("state") == rundir.COMPLETED:
            continue
        record = known.get(source)
        if record is None or record.executor != "slurm" or not record.job_ids:
            raise ConfigError(f"run {e.name} starts from {runs.run_name(source)}, which is neither "
                              "completed nor queued on Slurm: submit it too")
        parts.append("?".join(f"afterok:{j}" for j in record.job_ids))
    if len(parts) > 1:
        # `?` (any) and `,` (all) cannot be mixed: one growth source per stage is what plans make
        raise ConfigError(f"run {e.name} starts from {len(parts)} runs that have not completed; "
                          "submit it after all but one of them completed")
    return parts[0] if parts else None


def _single_continuations(e: RunEntry, folder: Path, options: SlurmOptions,
                          records: dict[str, JobRecord]) -> None:
    record = records[e.name]
    for _ in range(options.max_requeues):
        params = _parameters(e, options, f"sf-{e.name}")
        params["dependency"] = "afternotok:" + ":".join(record.job_ids)
        task = TrainTask(run_dir=str(e.run_dir), continuation=True, python=options.python,
                         after=tuple(str(p) for p in e.after))
        job = _sbatch(f"a continuation of {e.name}",
                      lambda: _executor(folder, options, params).submit(task))
        record = replace(record, job_ids=(*record.job_ids, job.job_id))
        rundir.write_job(e.run_dir, record)
    records[e.name] = record
    if options.max_requeues:
        echo_ids = ", ".join(record.job_ids[1:])
        print(f"{e.name}: continuation jobs {echo_ids} (each starts only if every job before it "
              "was preempted or stopped)")


def _array_continuations(group: list[RunEntry], folder: Path, options: SlurmOptions,
                         records: dict[str, JobRecord]) -> None:
    longest = max(group, key=lambda e: e.time_min)
    previous = records[group[0].name].job_ids[0].split("_")[0]
    for level in range(options.max_requeues):
        params = _parameters(longest, options, f"sf-{group[0].name}-x{len(group)}-c{level + 1}")
        params["dependency"] = f"aftercorr:{previous}"
        tasks = [TrainTask(run_dir=str(e.run_dir), continuation=True, python=options.python,
                           stop_ok=level + 1 < options.max_requeues) for e in group]
        jobs = _sbatch(f"continuation array {level + 1} of {group[0].name}..{group[-1].name}",
                       lambda: _executor(folder, options, params).submit_array(tasks))
        for e, job in zip(group, jobs):
            records[e.name] = replace(records[e.name],
                                      job_ids=(*records[e.name].job_ids, job.job_id))
            rundir.write_job(e.run_dir, records[e.name])
        previous = jobs[0].job_id.split("_")[0]
    if options.max_requeues:
        print(f"array {records[group[0].name].job_ids[0].split('_')[0]}: {options.max_requeues} "
              "continuation array(s); a task starts once its run's task before it saved and "
              "stopped, and returns at once if the run finished")


# sbatch refusing a job for what it asks (not for a failure to reach slurmctld): retrying is useless
REFUSALS = ("More processors requested", "Requested node configuration is not available",
            "Invalid", "invalid", "not permitted", "exceeds", "Job dependency problem")


def _sbatch(what: str, submit: Callable[[], Any]) -> Any:
    """Run a submitit submission, retried with backoff while sbatch is missing or cannot reach the
    controller; a refusal, or the last failure, is a one-line SchedulerError."""

    def once() -> Any:
        if shutil.which("sbatch") is None:
            raise SchedulerError("sbatch is not on PATH (submit from a host with Slurm's client "
                                 "commands, or use --executor local)")
        try:
            # submitit prints a failing sbatch's stderr before raising it: it becomes one line here
            with contextlib.redirect_stderr(io.StringIO()):
                return submit()
        except Exception as exc:  # noqa: BLE001 - submitit wraps sbatch's failure in several types
            lines = [ln.strip() for ln in str(exc).splitlines() if "error" in ln.lower()]
            reason = (lines[-1] if lines else (str(exc).strip().splitlines() or ["?"])[-1])[:300]
            if any(word in reason for word in REFUSALS):
                raise _Refused(f"sbatch refused {what}: {reason}") from exc
            raise SchedulerError(f"sbatch failed for {what}: {reason}") from exc

    try:
        return retry(once, what="sbatch", echo=print)
    except _Refused as exc:
        raise SchedulerError(str(exc)) from None


class _Refused(Exception):
    """sbatch refused the job itself (not retried)."""


def _submit_first(group: list[RunEntry], folder: Path, options: SlurmOptions,
                  depends: str | None = None) -> list[str]:
    head = group[0]
    array = len(group) > 1 and options.array
    # in an array, a stopped task ends well when a continuation array follows (`aftercorr`)
    tasks = [TrainTask(run_dir=str(e.run_dir), python=options.python,
                       after=tuple(str(p) for p in e.after),
                       stop_ok=array and options.max_requeues > 0) for e in group]
    if array:
        longest = max(group, key=lambda e: e.time_min)
        params = _parameters(longest, options, f"sf-{head.name}-x{len(group)}")
        jobs = _sbatch(f"the array of {head.name}..{group[-1].name} ({len(group)} runs)",
                       lambda: _executor(folder, options, params).submit_array(tasks))
        return [j.job_id for j in jobs]
    out = []
    for e, task in zip(group, tasks):
        params = _parameters(e, options, f"sf-{e.name}")
        if depends:
            params["dependency"] = depends
        out.append(_sbatch(f"run {e.name}",
                           lambda: _executor(folder, options, params).submit(task)).job_id)
    return out


def describe_plan(entries: list[RunEntry], options: SlurmOptions) -> list[str]:
    """What `submit --dry-run` would queue, one line per job group."""
    groups: dict[tuple, list[RunEntry]] = {}
    for e in entries:
        groups.setdefault((*_shape(e), e.name if e.after else ""), []).append(e)
    lines = []
    for (nodes, per_node, gpus, _), group in groups.items():
        time_min = max(e.time_min for e in group)
        array = len(group) > 1 and options.array
        kind = "array" if array else "job" + ("s" if len(group) > 1 else "")
        gres = f", {gpus} GPUs/node" if gpus else ""
        if array:
            throttle = f", at most {min(options.throttle, len(group))} running at once"
            cont = f"{options.max_requeues} continuation array(s)"
        else:
            throttle, cont = "", f"{options.max_requeues} continuation job(s) per run"
        after = group[0].after_names if group[0].after else ()
        lines.append(
            f"{kind} of {len(group)}: {', '.join(e.name for e in group)} - {nodes} node(s) x "
            f"{per_node} task(s), {options.cpus_per_task} CPU/task{gres}, {time_min} min"
            f"{throttle}, USR2 {options.signal_delay_s} s before the limit, + {cont}"
            + (f", after {', '.join(after)} completed" if after else "")
            + (", held" if options.hold else "")
        )
    return lines
