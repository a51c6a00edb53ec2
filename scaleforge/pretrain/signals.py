"""Preemption signals: a handler that only sets a flag, read by the training loop at step boundaries.

The loop all-reduces `stop_requested()` over the ranks after every step, so all ranks save the same
step, then exit with REQUEUE_EXIT_CODE so that an executor (local or Slurm) requeues the run; the
re-run resumes from that checkpoint.

How the signal reaches every rank:
- srun (one task = one rank): Slurm signals every task of the step itself (`scancel --signal=USR1`,
  `#SBATCH --signal=USR1@90` without `B:`), so each rank's handler runs.
- `orchestrate train --nproc N` (torchrun): torchrun's agent handles only SIGTERM, SIGINT, SIGHUP and
  SIGQUIT by default, and when it gets one it forwards it to the ranks and SIGKILLs them
  `--shutdown-timeout` (30 s) later, which may cut a save short; SIGUSR1/SIGUSR2 kill torchrun itself
  (default action) and never reach the ranks. The parent therefore installs `forward_to_ranks(proc)`,
  which sends the signal straight to the rank processes (torchrun's children) and leaves torchrun
  alone: the ranks save, exit with REQUEUE_EXIT_CODE, and the parent maps torchrun's failure code back
  to REQUEUE_EXIT_CODE from status.json.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from scaleforge.rundir import REQUEUE_EXIT_CODE  # noqa: F401  (owned by the run directory: 75)

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""Signals that request a save-and-exit at the next step boundary."""

_received: list[int] = []


def _handler(signum: int, _frame: Any) -> None:
    # Only record: saving from inside a signal handler would interrupt collectives and file writes.
    _received.append(signum)


def install() -> None:
    """Route HANDLED signals to the flag (call once per rank, from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("signals.install() must be called from the main thread")
    for sig in HANDLED:
        signal.signal(sig, _handler)
    die_with_torchrun()
    forked_children_die_with_this_process()
    # A launcher may start this process with HANDLED blocked (the Slurm executor does), so a signal
    # that arrives during start-up waits here instead of killing the process by its default action.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def die_with_torchrun() -> None:
    """Under torchrun, have the kernel SIGKILL this rank when torchrun dies.

    torchrun starts every rank in a session of its own, so a SIGKILL of the launcher's process group
    (a user's `kill -9`, an executor's timeout) leaves the ranks running, and they would go on writing
    the run directory next to the re-run: seen in tests as orphaned ranks. Linux only
    (prctl PR_SET_PDEATHSIG); elsewhere nothing changes.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    _die_with(os.getppid())


def _prctl() -> Any:
    """libc's prctl, looked up once (before any fork: a forked child then needs no dynamic loader)."""
    if not _libc:
        import ctypes

        _libc.append(ctypes.CDLL(None, use_errno=True).prctl)
    return _libc[0]


_libc: list[Any] = []


def _die_with(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux)."""
    pr_set_pdeathsig = 1
    if _prctl()(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


_fork_parent: list[int] = []  # [pid] while the main thread forks, in the parent and the new child
_fork_hooks: list[bool] = []  # [True] once registered in this process


def forked_children_die_with_this_process() -> None:
    """Give every child that this process forks from its main thread a parent-death SIGKILL.

    A forked child does not inherit PR_SET_PDEATHSIG, so the worker processes that megatron's
    checkpoint writer forks during a save (and any other `multiprocessing` fork child of a rank)
    would go on running, orphaned, when the rank is SIGKILLed in the middle of a save. The kernel
    sends the signal when the forking *thread* ends, so only forks from the main thread, which
    lives as long as the process, are covered: a child forked by a short-lived thread would be
    killed with that thread. Linux only; registered once per process.
    """
    if not sys.platform.startswith("linux") or _fork_hooks:
        return
    _prctl()

    def before() -> None:
        if threading.current_thread() is threading.main_thread():
            _fork_parent.append(os.getpid())

    def in_child() -> None:
        if _fork_parent:
            _die_with(_fork_parent.pop())

    os.register_at_fork(before=before, after_in_parent=_fork_parent.clear, after_in_child=in_child)
    _fork_hooks.append(True)


@contextlib.contextmanager
def deferred(signals: tuple[int, ...] = HANDLED) -> Iterator[None]:
    """Block `signals` in the calling thread while inside; processes started inside inherit the
    blocked mask through fork and exec (that is the point: the flag itself is set by whichever thread
    the kernel picks, so the loop still sees a signal that arrives during a save). Slurm signals every
    process of a job step (`--signal=USR2@N`, `scancel --signal`, SIGTERM on preemption), and a helper
    such as the worker processes that megatron's checkpoint writer forks during a save would
    otherwise die of the signal's default action and leave the save waiting for them (seen on the
    local Slurm cluster with `scancel --signal=USR2`, when the writer's helper was a Manager: the
    next save failed with ConnectionRefusedError).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


TEST_STOP_ENV = "SCALEFORGE_TEST_SIGSTOP_AT_CALL"
"""Test-only: `SCALEFORGE_TEST_SIGSTOP_AT_CALL=<n>` makes the n-th call of stop_requested() (the
loop calls it once per step, after the step's update and before its metrics line) SIGSTOP this
process, so a test can deliver SIGKILL, SIGTERM or SIGUSR1 at an exact step and then SIGCONT."""

_calls = 0


def stop_requested() -> bool:
    """True once any HANDLED signal has arrived in this process."""
    global _calls
    _calls += 1
    if os.environ.get(TEST_STOP_ENV) == str(_calls):
        os.kill(os.getpid(), signal.SIGSTOP)
        # A signal sent while stopped is delivered on SIGCONT, possibly to another thread; CPython
        # runs the Python handler in the main thread at its next function entry, so wait, then call.
        time.sleep(0.2)
        _run_pending_handlers()
    return bool(_received)


def _run_pending_handlers() -> None:
    pass


def received() -> str | None:
    """Name of the first signal received (None if none)."""
    return signal.Signals(_received[0]).name if _received else None


def reset() -> None:
    """Forget received signals (a new run in the same process)."""
    _received.clear()


def rank_pids(launcher_pid: int) -> list[int]:
    """Process ids of the ranks that torchrun (`launcher_pid`) started: its direct children."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(launcher_pid).children()]
    except psutil.NoSuchProcess:
        return []


@contextlib.contextmanager
def forward_to_ranks(proc: Any, signals: tuple[int, ...] = HANDLED) -> Iterator[None]:
    """While inside, a HANDLED signal to this process is sent to each rank under `proc` (torchrun).

    SIGINT is not forwarded: a terminal's Ctrl-C already reaches the whole process group.
    """

    def forward(signum: int, _frame: Any) -> None:
        pids = rank_pids(proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not pids:  # ranks not started yet (or gone): torchrun's own handling ends the run
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
