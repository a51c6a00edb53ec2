"""REWIRE's worker processes die with the run that started them (PR_SET_PDEATHSIG): the engine and
the dedup stage's reader both ask for it, so it lives below both."""

from __future__ import annotations

import os
import signal

MAIN_PID = "SCALEFORGE_REWIRE_PID"
"""The pid of the process that runs the executors: its workers are the other processes."""


def pdeathsig() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1  # linux/prctl.h
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: nothing to ask the kernel for
        pass


def die_with_parent() -> None:
    """In a worker process (forked by the forkserver, which exits with the run): die with it."""
    if os.environ.get(MAIN_PID, str(os.getpid())) != str(os.getpid()):
        pdeathsig()
