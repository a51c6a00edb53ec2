"""Executors and the one interface through which they report job states. Torch-free.

Each executor module (`local`, `slurm`) answers `query_states(records, now=, runner=)` with a
JobState per record. `runs.job_states(records)` answers, for the job records of many runs, whether
each recorded job still holds or waits for resources: it asks each executor once for all of its
records (Slurm: one squeue and at most one sacct call, whatever the number of runs; local: the
process table). An executor that cannot be asked (squeue failing, slurmctld down, psutil missing) reports `unknown` for its
records, never "gone": `status` shows unknown, `submit` retries (`retry`) and then refuses.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from scaleforge.errors import ScaleforgeError

ACTIVE, ENDED, UNKNOWN = "active", "ended", "unknown"

BACKOFF_S = (1.0, 2.0, 4.0)
"""Waits between the attempts of a scheduler command (4 attempts in 7 s): a busy slurmctld answers
`Socket timed out` for a few seconds under load, which a retry rides out. $SCALEFORGE_RETRY_BACKOFF_S
(comma-separated seconds) replaces it."""
BACKOFF_ENV = "SCALEFORGE_RETRY_BACKOFF_S"


def _backoff() -> tuple[float, ...]:
    raw = os.environ.get(BACKOFF_ENV, "")
    if not raw:
        return BACKOFF_S
    try:
        waits = tuple(float(x) for x in raw.split(",") if x.strip())
    except ValueError:
        waits = (-1.0,)
    if any(not 0 <= w < 3600 for w in waits):
        raise SchedulerError(f"{BACKOFF_ENV}={raw!r}: use comma-separated seconds, each 0-3600")
    return waits


class SchedulerError(ScaleforgeError):
    """The scheduler could not be asked or refused a command (after retries)."""


@dataclass(kw_only=True, frozen=True)
class JobState:
    """One run's job as its executor sees it."""

    kind: str
    """`active` (pending or running), `ended`, or `unknown` (the executor could not be asked)."""
    label: str = ""
    """The executor's own word: a Slurm state (PENDING, RUNNING, FAILED, NODE_FAIL...), GONE, or
    `EXIT n` for a local run."""
    job: str = ""
    """The job id shown (the chain's active job, else its last one)."""
    why: str = ""
    """For `unknown`: why the executor could not tell."""

    @property
    def running(self) -> bool:
        """Active and holding resources (not only waiting)."""
        return self.kind == ACTIVE and self.label in ("RUNNING", "COMPLETING")


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def run_command(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a scheduler client command (60 s limit: slurmctld answers within seconds when healthy)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]}: no answer within 60 s")


def first_line(proc: subprocess.CompletedProcess) -> str:
    """The first line of a failed scheduler command's message (at most 300 characters)."""
    text = (proc.stderr or proc.stdout or f"exit {proc.returncode}").strip()
    return (text.splitlines() or [""])[0][:300]


T = TypeVar("T")


def retry(call: Callable[[], T], *, what: str, backoff: Sequence[float] | None = None,
          echo: Callable[[str], None] | None = None) -> T:
    """`call()`, retried after each wait of `backoff` while it raises SchedulerError; then the last
    error, as one line naming `what` and the attempts."""
    waits = _backoff() if backoff is None else tuple(backoff)
    for attempt, wait in enumerate((*waits, None), start=1):
        try:
            return call()
        except SchedulerError as exc:
            if wait is None:
                raise SchedulerError(f"{what} failed {attempt} times: {exc}") from None
            if echo is not None:
                echo(f"{what}: {exc}; retrying in {wait:g} s")
            time.sleep(wait)
    raise AssertionError("unreachable")
