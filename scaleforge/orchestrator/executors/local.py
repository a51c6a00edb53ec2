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
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from scaleforge.orchestrator import runs
from scaleforge.orchestrator.runs import RunEntry

Command = Callable[[RunEntry], list[str]]


def requeue_exit_code() -> int:
    """The trainer's "saved, start me again" exit code."""
    from scaleforge.pretrain.signals import REQUEUE_EXIT_CODE

    return int(REQUEUE_EXIT_CODE)


def train_command(entry: RunEntry) -> list[str]:
    """`orchestrate train` for one run (torchrun for more than one rank)."""
    return [sys.executable, "-m", "scaleforge.cli", "train", str(entry.spec_path), "--out",
            str(entry.run_dir), "--nproc", str(entry.ranks)]


@dataclass
class _Slot:
    entry: RunEntry
    proc: subprocess.Popen
    attempts: int
    record: runs.JobRecord


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
        runs.prepare_run_dir(entry)
    records = {e.name: runs.local_record() for e in entries}
    for entry in entries:
        runs.write_job(entry.run_dir, records[entry.name])

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
                     f"(log: {slot.entry.run_dir / runs.LOG_DIR / 'local.log'})")
            if queue or running:
                time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results


def _startable(queue: list[RunEntry], running: list[_Slot], cores: int) -> list[RunEntry]:
    free = cores - sum(s.entry.ranks for s in running)
    picked = []
    for entry in queue:
        if entry.ranks <= free:
            picked.append(entry)
            free -= entry.ranks
        elif entry.ranks > cores and not running and not picked:
            # more ranks than cores: it can only ever run oversubscribed, so it runs alone
            picked.append(entry)
            break
    return picked


def _launch(entry: RunEntry, record: runs.JobRecord, attempt: int, command: Command,
            echo: Callable[[str], None]) -> _Slot:
    env = dict(os.environ)
    # one core per rank: several runs share the machine, so no rank may start a full OpenMP pool
    env.setdefault("OMP_NUM_THREADS", "1")
    log_path = entry.run_dir / runs.LOG_DIR / "local.log"
    with open(log_path, "a") as log:
        log.write(f"=== attempt {attempt} at {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n")
        log.flush()
        # own session: a Ctrl-C in the terminal reaches this process only, which passes it on
        proc = subprocess.Popen(command(entry), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    record = replace(record, attempts=attempt)
    runs.write_job(entry.run_dir, record)
    echo(f"{entry.name}: started ({entry.ranks} rank{'s' if entry.ranks > 1 else ''}, pid {proc.pid})")
    return _Slot(entry=entry, proc=proc, attempts=attempt, record=record)


def _finish(entry: RunEntry, record: runs.JobRecord, code: int | None) -> runs.JobRecord:
    record = replace(record, ended_at=time.time(), exit_code=code)
    runs.write_job(entry.run_dir, record)
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
    path = Path(run_dir) / runs.LOG_DIR / "local.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
