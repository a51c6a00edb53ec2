"""Run directories, run states and idempotence: what `submit` and `status` know about each run.

Torch-free. A run's identity is its run id (`scaleforge.config.run_id`); its directory is
`<runs_dir>/<name>-<run_id>`. A run's state is read from its directory FIRST (status.json,
metrics.jsonl, checkpoints/latest, which the trainer writes); the scheduler is asked only about runs
whose directory does not already say they are finished, and then in ONE batched call for all of them
(one `squeue` and at most one `sacct`), so a ladder of hundreds of runs costs two scheduler calls.

The executor records each submission in `job.json` inside the run directory: executor, job ids (a
Slurm run has a chain: its first job and the continuation jobs that resume it after a preemption),
submit time, host and pid (local). `submit` never queues a run twice: a run whose recorded job is
pending or running is skipped, a finished run is skipped, an interrupted one is resumed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from scaleforge.config import RunSpec, from_dict, load_yaml_file, run_id, spec_to_yaml
from scaleforge.errors import ConfigError, ScaleforgeError

JOB_FILE = "job.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
SPEC_FILE = "run.yaml"
LOG_DIR = "logs"

# Run states shown by `status` (the trainer writes the first five into status.json).
TRAINER_STATES = ("running", "completed", "failed", "preempted", "diverged")
# A finished run is never launched again by `submit` (a diverged run is a result: refit gates it).
FINAL_STATES = ("completed", "diverged")

# Slurm job states in which a job still holds or waits for resources (squeue's and sacct's names).
SLURM_ACTIVE = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
    "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "SPECIAL_EXIT",
    "STOPPED",
})
# A job missing from both squeue and sacct this long after submission is taken as gone; before that,
# as pending: slurmdbd may record a new job seconds after sbatch returns (accounting lags).
ACCOUNTING_LAG_S = 120.0


class SchedulerError(ScaleforgeError):
    """The scheduler could not be asked (squeue failed): a run's job state is unknown."""


@dataclass(kw_only=True, frozen=True)
class RunEntry:
    """One run to launch: its spec, its directory and the resources it asks for."""

    name: str
    """Run name (the RunSpec's name)."""
    spec: RunSpec
    """The full RunSpec the trainer reads."""
    run_dir: Path
    """`<runs_dir>/<name>-<run_id>`."""
    nodes: int = 1
    """Nodes the run spans (ranks are spread evenly over them)."""
    gpus_per_node: int = 0
    """Accelerators per node; 0 for CPU ranks."""
    time_min: int = 60
    """Wall-clock limit per job in minutes (a longer run continues in its continuation jobs)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.nodes < 1 or self.ranks % self.nodes:
            raise ConfigError(
                f"run {self.name}: {self.ranks} ranks cannot be spread evenly over {self.nodes} nodes"
            )
        if self.gpus_per_node < 0 or self.time_min < 1:
            raise ConfigError(f"run {self.name}: gpus_per_node must be >= 0 and time_min >= 1")

    @property
    def run_id(self) -> str:
        """The run's identity: the short hash of its spec."""
        return run_id(self.spec)

    @property
    def ranks(self) -> int:
        """Processes the run needs: tp x pp x dp (one srun task or torchrun worker each)."""
        return self.spec.parallel.world_size

    @property
    def ranks_per_node(self) -> int:
        """Processes per node."""
        return self.ranks // self.nodes

    @property
    def spec_path(self) -> Path:
        """The RunSpec YAML the trainer is started with."""
        return self.run_dir / SPEC_FILE


@dataclass(kw_only=True, frozen=True)
class JobRecord:
    """What an executor recorded about a run's submission (job.json)."""

    executor: str
    """`local` or `slurm`."""
    job_ids: tuple[str, ...] = ()
    """Slurm: the first job id then the continuation jobs' ids (array tasks as `ARRAY_TASK`)."""
    submitted_at: float = 0.0
    """Unix time of the submission."""
    host: str = ""
    """Host that submitted (local: the host the run executes on)."""
    pid: int = 0
    """Local: pid of the `orchestrate submit` process that runs the queue."""
    pid_started: float = 0.0
    """Local: that process's start time, so a recycled pid is not mistaken for it."""
    ended_at: float = 0.0
    """Local: when the executor saw the run end (0 while queued or running)."""
    exit_code: int | None = None
    """Local: the trainer's last exit code."""
    attempts: int = 0
    """Local: launches so far (1 + requeues)."""

    @property
    def job(self) -> str:
        """The id shown to users: the first Slurm job, or `local:<pid>`."""
        if self.executor == "slurm":
            return self.job_ids[0] if self.job_ids else "?"
        return f"local:{self.pid}"


@dataclass(kw_only=True, frozen=True)
class DirState:
    """What a run directory says about its run."""

    exists: bool = False
    """The run directory exists."""
    status: dict = field(default_factory=dict)
    """status.json as written by the trainer (empty if absent or unreadable)."""
    step: int = 0
    """Last completed step (status.json, else the last metrics line)."""
    total_steps: int | None = None
    """Steps the run trains for."""
    last_loss: float | None = None
    """Last training loss."""
    latest_checkpoint: str | None = None
    """The checkpoint `checkpoints/latest` names (None: no complete checkpoint)."""


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
    """The scheduler's state of the recorded job (a Slurm state name; PENDING, RUNNING, GONE or EXIT n locally)."""
    record: JobRecord | None = None
    """The recorded submission."""

    @property
    def action(self) -> str:
        """What `submit` does: `skip` (finished or queued), `start` (no checkpoint) or `resume`."""
        if self.state in FINAL_STATES or self.state in ("queued", "running", "unknown"):
            return "skip"
        return "start" if self.step == 0 else "resume"


# ----------------------------------------------------------------------------------------------
# entries


def run_dir_for(runs_dir: str | Path, name: str, rid: str) -> Path:
    """`<runs_dir>/<name>-<run_id>`."""
    return Path(runs_dir) / f"{name}-{rid}"


def entries_from_specs(
    pairs: Iterable[tuple[str, RunSpec]], runs_dir: str | Path, *, time_min: int = 60
) -> list[RunEntry]:
    """Entries for (name, RunSpec) pairs, one node each, CPU ranks."""
    out = []
    for name, spec in pairs:
        if spec.name != name:
            spec = replace(spec, name=name)
        out.append(RunEntry(name=name, spec=spec, run_dir=run_dir_for(runs_dir, name, run_id(spec)),
                            time_min=time_min))
    _check_unique(out)
    return out


def entries_from_plan(plan_path: str | Path, *, target: bool = False, time_min: int | None = None,
                      only: Iterable[str] = ()) -> list[RunEntry]:
    """Entries for a plan's ladder (and its target when `target`), filtered to `only` names."""
    from scaleforge.orchestrator import planfile

    plan = planfile.load_plan(plan_path)
    runs = list(plan.ladder) + ([plan.target] if target else [])
    gpu = plan.cluster.kind == "gpu"
    out = []
    for run in runs:
        if run.run_id != run_id(run.spec):
            raise ConfigError(
                f"{plan_path}: run {run.name} has run_id {run.run_id} but its spec hashes to "
                f"{run_id(run.spec)}; re-plan instead of editing specs by hand"
            )
        ranks = run.spec.parallel.world_size
        nodes = max(1, int(run.nodes))
        limit = time_min if time_min is not None else _time_limit_min(run.gpu_hours, ranks)
        out.append(RunEntry(
            name=run.name, spec=run.spec, run_dir=planfile.run_dir(plan, plan_path, run), nodes=nodes,
            gpus_per_node=ranks // nodes if gpu else 0, time_min=limit,
        ))
    _check_unique(out)
    only = list(only)
    if only:
        known = {e.name for e in out}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ConfigError(
                f"--only {unknown[0]}: no such run in {plan_path}; runs: {', '.join(sorted(known))}"
                + ("" if target else " (add --target for the target run)")
            )
        out = [e for e in out if e.name in only]
    return out


def _time_limit_min(gpu_hours: float, ranks: int) -> int:
    # Twice the planned time plus 10 minutes: the plan's estimate assumes an MFU the run may not reach.
    # A run that still hits the limit saves on the warning signal and continues in its next job.
    per_rank_min = 60.0 * float(gpu_hours) / max(1, ranks)
    return max(10, math.ceil(2 * per_rank_min + 10))


def _check_unique(entries: list[RunEntry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise ConfigError(f"two runs are named {e.name!r}: run names must be unique in a plan")
        seen[e.name] = e.run_id


def prepare_run_dir(entry: RunEntry) -> None:
    """Create the run directory and write run.yaml (refusing a directory that holds another run)."""
    entry.run_dir.mkdir(parents=True, exist_ok=True)
    (entry.run_dir / LOG_DIR).mkdir(exist_ok=True)
    if entry.spec_path.exists():
        try:
            old = from_dict(RunSpec, load_yaml_file(entry.spec_path))
        except ConfigError as exc:
            raise ConfigError(f"{entry.spec_path} is not a valid RunSpec ({exc}); move it away") from None
        if run_id(old) != entry.run_id:
            raise ConfigError(
                f"{entry.run_dir} holds run {run_id(old)}, not {entry.run_id}: move that directory away"
            )
    _write_atomic(entry.spec_path, spec_to_yaml(entry.spec))


# ----------------------------------------------------------------------------------------------
# job records


def read_job(run_dir: str | Path) -> JobRecord | None:
    """The recorded submission, or None (never submitted, or an unreadable file)."""
    path = Path(run_dir) / JOB_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("executor") not in ("local", "slurm"):
        return None
    data["job_ids"] = tuple(str(j) for j in data.get("job_ids", ()))
    known = JobRecord.__dataclass_fields__
    return JobRecord(**{k: v for k, v in data.items() if k in known})


def write_job(run_dir: str | Path, record: JobRecord) -> None:
    """Record a submission in job.json (atomically)."""
    body = {k: getattr(record, k) for k in JobRecord.__dataclass_fields__}
    body["job_ids"] = list(record.job_ids)
    _write_atomic(Path(run_dir) / JOB_FILE, json.dumps(body, indent=1) + "\n")


def local_record(**kwargs: Any) -> JobRecord:
    """A local JobRecord for this process on this host."""
    return JobRecord(executor="local", host=socket.gethostname(), pid=os.getpid(),
                     pid_started=_process_start(os.getpid()) or 0.0, submitted_at=time.time(),
                     **kwargs)


# ----------------------------------------------------------------------------------------------
# reading a run directory


def read_run_dir(run_dir: str | Path) -> DirState:
    """status.json, the last metrics line and checkpoints/latest of one run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return DirState()
    status = _read_json(run_dir / STATUS_FILE)
    step, last_loss = _last_train_line(run_dir / METRICS_FILE)
    if isinstance(status.get("step"), int):
        step = status["step"]
    if isinstance(status.get("last_loss"), (int, float)):
        last_loss = float(status["last_loss"])
    total = status.get("total_steps")
    latest = None
    latest_file = run_dir / "checkpoints" / "latest"
    try:
        name = latest_file.read_text().strip()
        if name and (run_dir / "checkpoints" / name).is_dir():
            latest = name
    except OSError:
        if latest_file.is_symlink() and latest_file.resolve().is_dir():
            latest = latest_file.resolve().name
    return DirState(exists=True, status=status, step=step,
                    total_steps=total if isinstance(total, int) else None,
                    last_loss=last_loss, latest_checkpoint=latest)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_train_line(path: Path) -> tuple[int, float | None]:
    """(step, loss) of the last training line; reads only the file's tail."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0, None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line or the cut first line of the tail
        if isinstance(rec, dict) and "loss" in rec and isinstance(rec.get("step"), int):
            return rec["step"], float(rec["loss"])
    return 0, None


# ----------------------------------------------------------------------------------------------
# scheduler states


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


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def slurm_job_states(job_ids: Iterable[str], *, runner: Runner = _run) -> dict[str, str]:
    """States of many Slurm jobs in one squeue call (+ one sacct call for those squeue no longer has).

    squeue answers from slurmctld's memory (pending and running jobs, always current); sacct answers
    from accounting, which may be disabled or lag behind. A job neither knows is left out: the caller
    decides from the submit time (see `ACCOUNTING_LAG_S`).
    """
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    bases = sorted({j.split("_")[0] for j in ids})
    if shutil.which("squeue") is None:
        raise SchedulerError("squeue is not on PATH: run `orchestrate submit/status` where Slurm's "
                             "client commands are installed (or use --executor local)")
    sq = runner(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)])
    if sq.returncode != 0 and "Invalid job id" not in (sq.stderr or ""):
        raise SchedulerError(f"squeue failed: {(sq.stderr or sq.stdout).strip()[:300]} "
                             "(is SLURM_CONF set and the cluster up?)")
    states = parse_slurm_table(sq.stdout if sq.returncode == 0 else "")
    missing = [j for j in ids if j not in states]
    if missing:
        acct = runner(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                       ",".join(sorted({j.split("_")[0] for j in missing}))])
        if acct.returncode == 0:  # accounting disabled or slurmdbd down: squeue's answer stands
            for jid, state in parse_slurm_table(acct.stdout).items():
                states.setdefault(jid, state)
    return {j: states[j] for j in ids if j in states}


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no such process, or psutil missing
        return None


def local_job_alive(record: JobRecord) -> bool | None:
    """Whether the local executor that recorded `record` still runs it (None: another host)."""
    if record.host != socket.gethostname():
        return None
    if record.ended_at:
        return False
    started = _process_start(record.pid)
    return started is not None and abs(started - record.pid_started) < 1.0


# ----------------------------------------------------------------------------------------------
# states


def run_states(entries: list[RunEntry], *, runner: Runner = _run, now: float | None = None,
               tolerant: bool = False) -> list[RunState]:
    """The state of every entry: run directories first, then one batched scheduler query.

    With `tolerant`, a scheduler that cannot be asked leaves those runs `unknown` instead of raising
    (`status` shows what it can; `submit` must not guess, so it raises).
    """
    now = time.time() if now is None else now
    dirs = [read_run_dir(e.run_dir) for e in entries]
    records = [read_job(e.run_dir) if d.exists else None for e, d in zip(entries, dirs)]
    to_ask = [
        j for d, r in zip(dirs, records)
        if r is not None and r.executor == "slurm" and d.status.get("state") not in FINAL_STATES
        for j in r.job_ids
    ]
    sched: dict[str, str] | None = {}
    if to_ask:
        try:
            sched = slurm_job_states(to_ask, runner=runner)
        except SchedulerError:
            if not tolerant:
                raise
            sched = None
    return [_state(e, d, r, sched, now) for e, d, r in zip(entries, dirs, records)]


def wait_for_runs(entries: list[RunEntry], *, timeout_s: float | None = None, poll_s: float = 10.0,
                  echo: Callable[[str], None] = print, runner: Runner = _run) -> list[RunState]:
    """Poll until no run is queued or running (one batched scheduler query per poll).

    Prints each state change; returns the final states. Raises SchedulerError after `timeout_s`.
    """
    deadline = None if timeout_s is None else time.time() + timeout_s
    seen: dict[str, str] = {}
    while True:
        states = run_states(entries, runner=runner)
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


def _state(entry: RunEntry, d: DirState, record: JobRecord | None, sched: dict[str, str] | None,
           now: float) -> RunState:
    base = dict(entry=entry, step=d.step, total_steps=d.total_steps or entry.spec.train.steps,
                last_loss=d.last_loss, record=record, job=record.job if record else "")
    written = d.status.get("state")
    if written in FINAL_STATES:
        return RunState(state=written, **base)
    if sched is None and record is not None and record.executor == "slurm":
        return RunState(state="unknown", job_state="?", **base)
    active, job_state, jid = _job_activity(record, sched or {}, now)
    base["job"] = jid
    if active is None:
        # a local run recorded on another host: its directory is all we know
        return RunState(state=written or "unknown", job_state=job_state, **base)
    if active:
        running = job_state in ("RUNNING", "COMPLETING")
        return RunState(state="running" if running else "queued", job_state=job_state, **base)
    if written == "running":
        # status.json says running but no job holds the run: killed without a chance to save
        return RunState(state="interrupted", job_state=job_state, **base)
    if written in TRAINER_STATES:
        return RunState(state=written, job_state=job_state, **base)
    never_launched = record is not None and record.executor == "local" and not record.attempts
    if record is not None and not never_launched and d.step == 0 and d.latest_checkpoint is None:
        # submitted, never started training, and the job is gone (cancelled, or it failed at start)
        return RunState(state="failed", job_state=job_state, **base)
    return RunState(state="new" if d.step == 0 else "interrupted", job_state=job_state, **base)


def _job_activity(record: JobRecord | None, sched: dict[str, str], now: float
                  ) -> tuple[bool | None, str, str]:
    """(active?, shown job state, shown job id) of a recorded submission."""
    if record is None:
        return False, "", ""
    if record.executor == "local":
        alive = local_job_alive(record)
        if alive is None:
            return None, f"on {record.host}", record.job
        if alive:
            return True, "RUNNING" if record.attempts else "PENDING", record.job
        return False, "GONE" if record.exit_code is None else f"EXIT {record.exit_code}", record.job
    last, last_id = "", record.job
    for jid in record.job_ids:
        state = sched.get(jid)
        if state is None:
            if now - record.submitted_at < ACCOUNTING_LAG_S:
                return True, "SUBMITTED", jid  # not visible yet: accounting lags behind sbatch
            continue
        if state in SLURM_ACTIVE:
            # the first active job of the chain: the running one, or the next to run
            return True, state, jid
        if not last or state != "CANCELLED":
            # continuations cancelled because the job before them ended well say nothing new
            last, last_id = state, jid
    return False, last or "GONE", last_id


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
