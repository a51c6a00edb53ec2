"""Local executor: each run is `orchestrate train RUN.yaml --out DIR --nproc N`, queued within this
machine's cores.

A simple scheduler: runs start in plan order while their ranks fit the free cores (a later, smaller run
may start while a larger one waits); a run needing more ranks than the machine has cores starts only
when nothing else runs. Each rank gets one core (OMP_NUM_THREADS=1 unless set). A run that exits with
the trainer's requeue code (it saved after SIGTERM/SIGUSR1/SIGUSR2) is started again and resumes from
its checkpoint, up to `max_requeues` times. SIGINT/SIGTERM to this process is passed on as SIGTERM to
every running run (each saves and stops); queued runs are not started; `submit` resumes them later.
Output of each run is appended to `<run_dir>/logs/local.log`. Torch-free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from scaleforge import rundir
from scaleforge.orchestrator.run.executors import ACTIVE, ENDED, UNKNOWN, JobState, SchedulerError
from scaleforge.orchestrator.run.entries import RunEntry, prepare_run_dir, run_name
from scaleforge.rundir import JobRecord

Command = Callable[[RunEntry], list[str]]
LOG_NAME = "local.log"


def requeue_exit_code() -> int:
    """The trainer's "saved, start me again" exit code."""
    return int(rundir.REQUEUE_EXIT_CODE)


# ----------------------------------------------------------------------------------------------
# job states (the executors' state interface)


def process_start(pid: int) -> float | None:
    """Start time of process `pid`, None if there is none. SchedulerError without psutil: the
    process table cannot be read, which says nothing about the run."""
    try:
        import psutil
    except ImportError:
        raise SchedulerError("psutil is not installed, so the process table cannot be read "
                             "(pip install psutil)") from None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error as exc:
        raise SchedulerError(f"cannot read process {pid}: {exc}") from None


def local_record(**kwargs: Any) -> JobRecord:
    """A local JobRecord for this process on this host."""
    return JobRecord(executor="local", host=socket.gethostname(), pid=os.getpid(),
                     pid_started=process_start(os.getpid()) or 0.0, submitted_at=time.time(),
                     **kwargs)


def query_states(records: Sequence[JobRecord], *, now: float, runner: Any = None) -> list[JobState]:
    """Whether the `orchestrate submit` process that recorded each run still runs it.

    A run recorded on another host, or a process table that cannot be read, is `unknown`.
    """
    host = socket.gethostname()
    out = []
    for rec in records:
        if rec.host != host:
            out.append(JobState(kind=UNKNOWN, label=f"on {rec.host}", job=rec.job,
                                why=f"it runs on {rec.host}; ask there"))
        elif rec.ended_at:
            label = "GONE" if rec.exit_code is None else f"EXIT {rec.exit_code}"
            out.append(JobState(kind=ENDED, label=label, job=rec.job))
        else:
            started = process_start(rec.pid)
            if started is not None and abs(started - rec.pid_started) < 1.0:
                out.append(JobState(kind=ACTIVE, label="RUNNING" if rec.attempts else "PENDING",
                                    job=rec.job))
            else:
                out.append(JobState(kind=ENDED, label="GONE", job=rec.job))
    return out


def train_command(entry: RunEntry) -> list[str]:
    """`orchestrate train` for one run (torchrun for more than one rank)."""
    return [sys.executable, "-m", "scaleforge.cli", "train", str(entry.spec_path), "--out",
            str(entry.run_dir), "--nproc", str(entry.ranks)]


@dataclass
class _Slot:
    entry: RunEntry
    proc: subprocess.Popen
    attempts: int
    record: JobRecord


def run_local(
    entries: list[RunEntry],
    *,
    cores: int | None = None,
    max_requeues: int = 3,
    command: Command = train_command,
    requeue_code: int | None = None,
    echo: Callable[[str], None] = print,
    poll_s: float = 0.2,
) -> dict[str, int]:
    """Run every entry to its end on this machine; returns {run name: final exit code}.

    Writes each run's directory (run.yaml, logs/) and job.json before anything starts, so a second
    `submit` started meanwhile sees the runs as queued and launches none of them.
    """
    cores = cores or os.cpu_count() or 1
    code_requeue = requeue_exit_code() if requeue_code is None else requeue_code
    for entry in entries:
        prepare_run_dir(entry)
    records = {e.name: local_record() for e in entries}
    for entry in entries:
        rundir.write_job(entry.run_dir, records[entry.name])

    queue = list(entries)
    running: list[_Slot] = []
    results: dict[str, int] = {}
    stopping = {"n": 0}

    def on_signal(signum: int, _frame) -> None:
        stopping["n"] += 1
        # first signal: every run saves and stops; a second one does not wait for the saves
        sig = signal.SIGTERM if stopping["n"] == 1 else signal.SIGKILL
        echo(f"{signal.Signals(signum).name}: stopping {len(running)} running run(s)"
             + (" now" if sig == signal.SIGKILL else " after they save"))
        for slot in running:
            _send(slot.proc, sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            for entry, source in _blocked_for_good(queue, running):
                queue.remove(entry)
                results[entry.name] = 1
                records[entry.name] = _finish(entry, records[entry.name], None)
                echo(f"{entry.name}: not started: it starts from {source}, which did not complete")
            if not stopping["n"]:
                for entry in _startable(queue, running, cores):
                    queue.remove(entry)
                    running.append(_launch(entry, records[entry.name], 1, command, echo))
            elif queue:
                for entry in queue:
                    _finish(entry, records[entry.name], None)
                    echo(f"{entry.name}: not started (stopped)")
                queue.clear()
            for slot in list(running):
                code = slot.proc.poll()
                if code is None:
                    continue
                running.remove(slot)
                if code == code_requeue and not stopping["n"] and slot.attempts <= max_requeues:
                    echo(f"{slot.entry.name}: saved and stopped (exit {code}); resuming "
                         f"(requeue {slot.attempts}/{max_requeues})")
                    running.append(_launch(slot.entry, slot.record, slot.attempts + 1, command, echo))
                    continue
                results[slot.entry.name] = code
                records[slot.entry.name] = _finish(slot.entry, slot.record, code)
                echo(f"{slot.entry.name}: {_describe(code, code_requeue)} "
                     f"(log: {rundir.log_dir(slot.entry.run_dir) / LOG_NAME})")
            if queue or running:
                time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results


def _source_done(path: Path) -> bool:
    return rundir.read_status(path).get("state") == rundir.COMPLETED


def _blocked_for_good(queue: list[RunEntry], running: list[_Slot]) -> list[tuple[RunEntry, str]]:
    """Queued runs whose source run (checkpoint.init_from) is neither queued, running nor completed:
    it ended without completing, so they can never start."""
    pending = {e.run_dir for e in queue} | {s.entry.run_dir for s in running}
    out = []
    for entry in queue:
        for source in entry.after:
            if source not in pending and not _source_done(source):
                out.append((entry, run_name(source)))
                break
    return out


def _startable(queue: list[RunEntry], running: list[_Slot], cores: int) -> list[RunEntry]:
    free = cores - sum(s.entry.ranks for s in running)
    picked = []
    for entry in queue:
        if not all(_source_done(p) for p in entry.after):
            continue  # a growth stage starts only from its source's completed run
        if entry.ranks <= free:
            picked.append(entry)
            free -= entry.ranks
        elif entry.ranks > cores and not running and not picked:
            # more ranks than cores: it can only ever run oversubscribed, so it runs alone
            picked.append(entry)
            break
    return picked


def _launch(entry: RunEntry, record: JobRecord, attempt: int, command: Command,
            echo: Callable[[str], None]) -> _Slot:
    env = dict(os.environ)
    # one core per rank: several runs share the machine, so no rank may start a full OpenMP pool
    env.setdefault("OMP_NUM_THREADS", "1")
    log_path = rundir.log_dir(entry.run_dir) / LOG_NAME
    with open(log_path, "a") as log:
        log.write(f"=== attempt {attempt} at {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n")
        log.flush()
        # own session: a Ctrl-C in the terminal reaches this process only, which passes it on
        proc = subprocess.Popen(command(entry), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    record = replace(record, attempts=attempt)
    rundir.write_job(entry.run_dir, record)
    echo(f"{entry.name}: started ({entry.ranks} rank{'s' if entry.ranks > 1 else ''}, pid {proc.pid})")
    return _Slot(entry=entry, proc=proc, attempts=attempt, record=record)


def _finish(entry: RunEntry, record: JobRecord, code: int | None) -> JobRecord:
    record = replace(record, ended_at=time.time(), exit_code=code)
    rundir.write_job(entry.run_dir, record)
    return record


def _send(proc: subprocess.Popen, sig: int) -> None:
    # SIGTERM goes to the run's launcher, which passes it to its ranks (they save); SIGKILL goes to
    # the launcher's whole process group (its own session), so no orphaned rank survives it
    try:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _describe(code: int, requeue_code: int) -> str:
    if code == 0:
        return "finished"
    if code == requeue_code:
        return f"saved and stopped (exit {code}); `submit` resumes it"
    return f"failed (exit {code})"


def log_tail(run_dir: Path, lines: int = 20) -> str:
    """The last lines of a run's local log (for error messages)."""
    path = rundir.log_dir(run_dir) / LOG_NAME
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
