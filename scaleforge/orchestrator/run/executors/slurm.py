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

Modules: this one submits (login node); `slurm_task.py` is what each srun task runs (`TrainTask`);
`slurm_states.py` answers the job states of every record in one squeue and at most one sacct call.

Everything that reaches a shell or an `#SBATCH` line is checked here or quoted by submitit (shlex):
run names are restricted by the RunSpec; partition, account and paths are checked below.
Torch-free (submitit is imported when jobs are submitted).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from scaleforge import rundir
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.run.entries import RunEntry, prepare_run_dir, run_name
from scaleforge.orchestrator.run.executors import Runner, SchedulerError, first_line, retry, run_command
from scaleforge.orchestrator.run.executors.slurm_task import TrainTask
from scaleforge.rundir import JobRecord

# Slurm names (partition, account, qos) and job names: no shell or sbatch metacharacters.
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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
# submission (login node)


def cluster_gpus() -> bool:
    """Whether any node of the cluster offers GPUs as a generic resource (gres)."""
    out = run_command(["sinfo", "-h", "-o", "%G"])
    if out.returncode != 0:
        raise SchedulerError(f"sinfo failed: {first_line(out)} (is SLURM_CONF set and the "
                             "cluster up? `slurm/dev-cluster up` starts one on this machine)")
    return "gpu" in out.stdout


def cluster_nodes(partition: str | None = None, *, runner: Runner = run_command) -> int:
    """Nodes of the partition (the default one when None): the most one job may span."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%P|%t"]
    out = runner(cmd)
    if out.returncode != 0:
        raise SchedulerError(f"sinfo failed: {first_line(out)} (is SLURM_CONF set and the cluster "
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
        prepare_run_dir(e)
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
            raise ConfigError(f"run {e.name} starts from {run_name(source)}, which is neither "
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
