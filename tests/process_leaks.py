"""No process outlives its test: find the processes that this pytest process's tests started.

A process counts as started by this session when it is a descendant of the pytest process, or when
its environment carries this session's marker (SESSION_ENV, set by conftest at start and inherited
by every child that gets a copy of os.environ): that finds the ones orphaned to pid 1 or put in a
session of their own too (ranks whose launcher was SIGKILLed, daemonised helpers, Slurm job steps).
conftest checks at the end of every module, with the session's Slurm daemons excepted, and once more
at the end of the session, with nothing excepted.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterable

import psutil

SESSION_ENV = "SCALEFORGE_TEST_SESSION"
GRACE_S = float(os.environ.get("SCALEFORGE_TEST_LEAK_GRACE_S", "5"))
"""How long a process started by a test may take to exit after its module ends."""

# helpers that multiprocessing starts once for the pytest process itself; they end with it
_OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def mark_session() -> str:
    """Give this pytest process (and so every process it starts) a marker of its own."""
    os.environ[SESSION_ENV] = f"{os.getpid()}-{secrets.token_hex(6)}"
    return os.environ[SESSION_ENV]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _own_helper(proc: psutil.Process, me: int) -> bool:
    try:
        return proc.ppid() == me and any(h in " ".join(proc.cmdline()) for h in _OWN_HELPERS)
    except psutil.Error:
        return False


def started_processes(exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """The live processes that this session started (see the module's doc), less `exclude`."""
    me = os.getpid()
    marker = os.environ.get(SESSION_ENV)
    found: dict[int, psutil.Process] = {}
    try:
        for proc in psutil.Process(me).children(recursive=True):
            found[proc.pid] = proc
    except psutil.Error:
        pass
    if marker:
        for proc in psutil.process_iter():
            if proc.pid in found or proc.pid == me:
                continue
            try:
                if proc.environ().get(SESSION_ENV) == marker:
                    found[proc.pid] = proc
            except psutil.Error:  # gone, or another user's
                continue
    skip = set(exclude)
    return sorted((p for p in found.values()
                   if p.pid not in skip and _alive(p) and not _own_helper(p, me)),
                  key=lambda p: p.pid)


def leftovers(exclude: Iterable[int] = (), grace: float = GRACE_S) -> list[psutil.Process]:
    """started_processes(exclude) that are still alive `grace` seconds from now (polled: returns
    at once when there are none)."""
    exclude = set(exclude)
    deadline = time.monotonic() + grace
    while True:
        procs = started_processes(exclude)
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(0.1)


def describe(proc: psutil.Process) -> str:
    """`pid N (parent P): CMDLINE, started by TEST` for a failure message."""
    try:
        cmdline = " ".join(a if a.isprintable() else repr(a) for a in proc.cmdline()) or proc.name()
        ppid = proc.ppid()
    except psutil.Error:
        return f"pid {proc.pid}: gone"
    try:
        test = proc.environ().get("PYTEST_CURRENT_TEST") or "unknown (no PYTEST_CURRENT_TEST)"
    except psutil.Error:
        test = "unknown (environment unreadable)"
    if len(cmdline) > 300:
        cmdline = cmdline[:300] + " ..."
    return f"pid {proc.pid} (parent {ppid}): {cmdline}\n    started by {test}"


def report(procs: list[psutil.Process], where: str) -> str:
    lines = [f"{len(procs)} process(es) started by tests still alive at the end of {where}:"]
    lines += ["  " + describe(p) for p in procs]
    return "\n".join(lines)


def kill(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL `procs` (stopped ones too) and wait for them."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)
