"""Run states and idempotence: what `submit` and `status` know about each run. Torch-free.

A run's identity is its run id (`scaleforge.config.run_id`); its directory is
`<runs_dir>/<name>-<run_id>` (names and files: `scaleforge.rundir`). A run's state is read from its
directory FIRST (status.json, metrics.jsonl, checkpoints/latest, which the trainer writes); the
executors are asked only about runs whose directory does not already say they are finished, through
one interface (`executors.job_states`) that batches the question: a ladder of hundreds of Slurm runs
costs one squeue and at most one sacct call. An executor that cannot be asked leaves its runs
`unknown`, never "gone".

The executor records each submission in job.json: executor, job ids (a Slurm run has a chain: its
first job and the continuation jobs that resume it after a preemption), submit time, host and pid
(local). `submit` never queues a run twice: a run whose recorded job is pending or running is
skipped, a finished run is skipped, an interrupted one is resumed.

A run whose `checkpoint.init_from` names another run of the same plan (a growth stage) waits for
that run: it is launched only after its source completed (`RunEntry.after`, `RunState.waits_for`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from scaleforge import rundir
from scaleforge.config import RunSpec, from_dict, load_yaml_file, run_id, same_run, spec_to_yaml
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.executors import (
    ACTIVE, UNKNOWN, JobState, Runner, SchedulerError, job_states, run_command,
)
from scaleforge.rundir import (
    FINAL_STATES, TRAINER_STATES, DirState, JobRecord, read_job, read_run_dir, write_job,
)

__all__ = [
    "FINAL_STATES", "TRAINER_STATES", "DirState", "JobRecord", "RunEntry", "RunState",
    "SchedulerError", "entries_from_plan", "entries_from_specs", "prepare_run_dir", "read_job",
    "read_run_dir", "run_states", "wait_for_runs", "write_job",
]


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
    after: tuple[Path, ...] = ()
    """Run directories of the plan's runs this run starts from (`checkpoint.init_from`): it is
    launched only after they completed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "after", tuple(Path(p) for p in self.after))
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
        return rundir.spec_path(self.run_dir)

    @property
    def after_names(self) -> tuple[str, ...]:
        """The names of the runs in `after` (`<name>-<run_id>` directories)."""
        return tuple(run_name(p) for p in self.after)


def run_name(run_dir: str | Path) -> str:
    """The run name of a `<name>-<run_id>` directory."""
    return Path(run_dir).name.rsplit("-", 1)[0]


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
                      only: Iterable[str] = (), growth: bool = False, plan=None) -> list[RunEntry]:
    """Entries for a plan's ladder (and its target when `target`, its growth stages when `growth`),
    filtered to `only` names. A run whose checkpoint.init_from names another run directory of the
    plan waits for that run (`RunEntry.after`). `plan`: the plan already loaded from `plan_path`."""
    from scaleforge.orchestrator import planfile

    plan = planfile.load_plan(plan_path) if plan is None else plan
    growth_runs = list(getattr(plan, "growth", ()) or ())
    runs = list(plan.ladder) + ([plan.target] if target else []) + (growth_runs if growth else [])
    every = {planfile.run_dir(plan, plan_path, r).resolve(): planfile.run_dir(plan, plan_path, r)
             for r in (*plan.ladder, plan.target, *growth_runs)}
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
        run_dir = planfile.run_dir(plan, plan_path, run)
        out.append(RunEntry(
            name=run.name, spec=run.spec, run_dir=run_dir, nodes=nodes,
            gpus_per_node=ranks // nodes if gpu else 0, time_min=limit,
            after=_sources(run.spec, run_dir, every),
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


def _sources(spec: RunSpec, run_dir: Path, plan_dirs: dict[Path, Path]) -> tuple[Path, ...]:
    """The plan run directory `checkpoint.init_from` names (relative to the run's own directory, as
    the trainer reads it there), if it names one."""
    source = str(getattr(spec.checkpoint, "init_from", "") or "")
    if not source:
        return ()
    path = Path(source)
    path = (path if path.is_absolute() else run_dir / path).resolve()
    return (plan_dirs[path],) if path in plan_dirs else ()


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
    rundir.log_dir(entry.run_dir).mkdir(exist_ok=True)
    if entry.spec_path.exists():
        try:
            old = from_dict(RunSpec, load_yaml_file(entry.spec_path))
        except ConfigError as exc:
            raise ConfigError(f"{entry.spec_path} is not a valid RunSpec ({exc}); move it away") from None
        if not same_run(old, entry.spec):  # `precision: auto` is resolved by the trainer
            raise ConfigError(
                f"{entry.run_dir} holds run {run_id(old)}, not {entry.run_id}: move that directory away"
            )
    rundir.write_atomic(entry.spec_path, spec_to_yaml(entry.spec))


# ----------------------------------------------------------------------------------------------
# states


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
    from scaleforge.orchestrator.executors import retry

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
