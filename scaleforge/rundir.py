"""The run directory: its file names and their reading and writing, in one place. Torch-free.

The run directory is the contract between the trainer (which writes run.yaml, metrics.jsonl,
status.json and checkpoints/), the executors (which write job.json and logs/) and `status`, `submit`
and `refit` (which read them). Every other module asks this one for a path or a record instead of
spelling a file name:

    run.yaml              the resolved RunSpec (store names as the user wrote them)
    metrics.jsonl         one JSON object per line (training and evaluation lines)
    status.json           the trainer's state: running | completed | failed | preempted | diverged
    checkpoints/latest    names the last complete checkpoint (`step_NNNNNNN`)
    checkpoints/step_NNNNNNN/  a complete checkpoint (COMPLETE, its manifest, is written last)
    checkpoints/.tmp_*    a checkpoint save (or a `latest`) being written
    job.json              the executor's record of the run's submission (JobRecord)
    logs/                 the executors' per-job and per-rank logs

Writes that readers may race with (status.json, job.json, run.yaml, a truncated metrics.jsonl) are
atomic: a temporary file in the same directory, then `os.replace`, so a reader sees the old file or
the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
JOB_FILE = "job.json"
LOG_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
STEP_PREFIX = "step_"
"""A complete checkpoint's directory is `step_` and its step in 7 digits (`step_dir_name`)."""
TMP_PREFIX = ".tmp_"
"""A file or directory of checkpoints/ being written is its final name behind this prefix."""
COMPLETE_MARKER = "COMPLETE"
"""The file a checkpoint directory holds once it is complete (its manifest, written last)."""

REQUEUE_EXIT_CODE = 75
"""The trainer's exit code for "saved after a stop signal, start me again" (EX_TEMPFAIL, 75)."""

RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
PREEMPTED = "preempted"
DIVERGED = "diverged"
TRAINER_STATES = (RUNNING, COMPLETED, FAILED, PREEMPTED, DIVERGED)
"""The states the trainer writes into status.json."""
FINAL_STATES = (COMPLETED, DIVERGED)
"""A finished run is never launched again (a diverged run is a result: refit gates it)."""


def spec_path(run_dir: str | Path) -> Path:
    """run.yaml."""
    return Path(run_dir) / SPEC_FILE


def metrics_path(run_dir: str | Path) -> Path:
    """metrics.jsonl."""
    return Path(run_dir) / METRICS_FILE


def status_path(run_dir: str | Path) -> Path:
    """status.json."""
    return Path(run_dir) / STATUS_FILE


def job_path(run_dir: str | Path) -> Path:
    """job.json."""
    return Path(run_dir) / JOB_FILE


def log_dir(run_dir: str | Path) -> Path:
    """logs/."""
    return Path(run_dir) / LOG_DIR


def checkpoints_dir(run_dir: str | Path) -> Path:
    """checkpoints/."""
    return Path(run_dir) / CHECKPOINTS_DIR


# ----------------------------------------------------------------------------------------------
# atomic writes and tolerant reads


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`; {} when absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_status(run_dir: str | Path) -> dict:
    """status.json as the trainer wrote it ({} when absent or unreadable)."""
    return read_json(status_path(run_dir))


def write_status(run_dir: str | Path, body: dict) -> None:
    """Rewrite status.json atomically."""
    write_atomic(status_path(run_dir), json.dumps(body, indent=1) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (a run directory or the file itself; torn lines skipped)."""
    path = Path(path)
    if path.is_dir():
        path = metrics_path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def truncate_metrics_after(path: str | Path, step: int) -> None:
    """Drop every line of a metrics.jsonl with step > `step` (a resume from `step` re-logs them).

    A torn last line (the process died mid-write) is dropped too, so every step appears once.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(f"{line}\n" for line in kept))


def last_train_line(run_dir: str | Path) -> tuple[int, float | None]:
    """(step, loss) of the last training line of metrics.jsonl; reads only the file's tail."""
    try:
        with open(metrics_path(run_dir), "rb") as f:
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
# checkpoint directory names


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint after `step` optimizer steps (`step_0000040`)."""
    return f"{STEP_PREFIX}{step:07d}"


def is_step_dir_name(name: str) -> bool:
    """Whether `name` may name a checkpoint directory of checkpoints/ (what `latest` may hold)."""
    return name.startswith(STEP_PREFIX) and "/" not in name


def parse_step(name: str) -> int | None:
    """The step of a `step_NNNNNNN` directory name; None for any other name."""
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def tmp_name(name: str) -> str:
    """The name under which `name` (a step directory, `latest`) is written before its rename."""
    return f"{TMP_PREFIX}{name}"


def latest_path(run_dir: str | Path) -> Path:
    """checkpoints/latest."""
    return checkpoints_dir(run_dir) / LATEST


def read_latest(run_dir: str | Path) -> str | None:
    """The name checkpoints/latest holds, unchecked (None when there is no `latest`; OSError when it
    cannot be read)."""
    path = latest_path(run_dir)
    if not path.exists():
        return None
    return path.read_text().strip()


def is_complete(checkpoint: str | Path) -> bool:
    """Whether a checkpoint directory carries its COMPLETE manifest."""
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The checkpoint name `checkpoints/latest` names, if that directory exists (else None)."""
    latest = latest_path(run_dir)
    try:
        name = read_latest(run_dir)
    except OSError:
        if latest.is_symlink() and latest.resolve().is_dir():
            return latest.resolve().name
        return None
    if name and is_step_dir_name(name) and (checkpoints_dir(run_dir) / name).is_dir():
        return name
    return None


# ----------------------------------------------------------------------------------------------
# what a run directory says


@dataclass(kw_only=True, frozen=True)
class DirState:
    """What a run directory says about its run."""

    exists: bool = False
    """The run directory exists."""
    status: dict = field(default_factory=dict)
    """status.json as written by the trainer (empty if absent or unreadable)."""
    step: int = 0
    """Last completed step: the later of status.json's and the last metrics line's (a trainer that
    fails mid-run may leave status.json at the step it started from)."""
    total_steps: int | None = None
    """Steps the run trains for."""
    last_loss: float | None = None
    """Last training loss."""
    latest_checkpoint: str | None = None
    """The checkpoint `checkpoints/latest` names (None: no complete checkpoint)."""

    @property
    def state(self) -> str | None:
        """The trainer's state from status.json (None when it wrote none)."""
        state = self.status.get("state")
        return state if state in TRAINER_STATES else None


def read_run_dir(run_dir: str | Path) -> DirState:
    """status.json, the last metrics line and checkpoints/latest of one run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return DirState()
    status = read_status(run_dir)
    step, last_loss = last_train_line(run_dir)
    if isinstance(status.get("step"), int):
        step = max(step, status["step"])
    if isinstance(status.get("last_loss"), (int, float)):
        last_loss = float(status["last_loss"])
    total = status.get("total_steps")
    return DirState(exists=True, status=status, step=step,
                    total_steps=total if isinstance(total, int) else None,
                    last_loss=last_loss, latest_checkpoint=latest_checkpoint(run_dir))


# ----------------------------------------------------------------------------------------------
# job records


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
    after: tuple[str, ...] = ()
    """Run directories this run waits for (it starts from one's checkpoint: checkpoint.init_from)."""

    @property
    def job(self) -> str:
        """The id shown to users: the first Slurm job, or `local:<pid>`."""
        if self.executor == "slurm":
            return self.job_ids[0] if self.job_ids else "?"
        return f"local:{self.pid}"


JOB_EXECUTORS = ("local", "slurm")


def read_job(run_dir: str | Path) -> JobRecord | None:
    """The recorded submission, or None (never submitted, or an unreadable file)."""
    data = read_json(job_path(run_dir))
    if data.get("executor") not in JOB_EXECUTORS:
        return None
    try:
        data["job_ids"] = tuple(str(j) for j in data.get("job_ids", ()))
        data["after"] = tuple(str(j) for j in data.get("after", ()))
        known = JobRecord.__dataclass_fields__
        return JobRecord(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        return None  # a hand-edited or foreign job.json: taken as never submitted


def write_job(run_dir: str | Path, record: JobRecord) -> None:
    """Record a submission in job.json (atomically)."""
    body: dict[str, Any] = {k: getattr(record, k) for k in JobRecord.__dataclass_fields__}
    body["job_ids"] = list(record.job_ids)
    body["after"] = list(record.after)
    write_atomic(job_path(run_dir), json.dumps(body, indent=1) + "\n")
