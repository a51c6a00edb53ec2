"""The check that no process outlives its test (tests/process_leaks.py, run by conftest per module)
reports what it should, and only that."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

import process_leaks
import slurm_cluster

# A child that forks a sleeper into a session of its own and exits: the sleeper is orphaned (its
# parent becomes pid 1 or a subreaper), as a helper of a SIGKILLed rank was.
DETACHED = textwrap.dedent(
    """
    import os, sys, time
    if os.fork():
        os._exit(0)
    os.setsid()
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
    """
)


def _leftovers(exclude=(), grace: float = process_leaks.GRACE_S) -> list[psutil.Process]:
    """What the module check would report now: the session's Slurm daemons excepted (under two
    workers, the Slurm tests may have started them in this process)."""
    return process_leaks.leftovers(set(exclude) | slurm_cluster.running_daemon_pids(), grace)


def _wait_for_pid(path, timeout=30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"no pid in {path}")


def test_an_orphaned_process_is_reported_with_its_test_then_killed(tmp_path):
    pidfile = tmp_path / "pid"
    subprocess.run([sys.executable, "-c", DETACHED, str(pidfile)], check=True, timeout=60)
    pid = _wait_for_pid(pidfile)
    try:
        assert psutil.Process(pid).ppid() != os.getpid()  # no descendant: found by the marker alone
        leaks = _leftovers(grace=0.5)
        assert [p.pid for p in leaks] == [pid]
        message = process_leaks.report(leaks, "test_process_leaks")
        assert f"pid {pid} " in message and DETACHED.strip().splitlines()[0] in message
        assert f"started by {os.environ['PYTEST_CURRENT_TEST']}" in message
        process_leaks.kill(leaks)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert _leftovers(grace=0) == []
    finally:
        if psutil.pid_exists(pid):
            process_leaks.kill([psutil.Process(pid)])


def test_a_child_without_the_marker_is_found_as_a_descendant():
    env = {k: v for k, v in os.environ.items() if k != process_leaks.SESSION_ENV}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    try:
        assert [p.pid for p in _leftovers(grace=0)] == [child.pid]
        assert "started by unknown" not in process_leaks.report(_leftovers(grace=0), "x")
        assert _leftovers(exclude={child.pid}, grace=0) == []  # the Slurm daemons' way
    finally:
        child.kill()
        child.wait()
    assert _leftovers(grace=0) == []  # reaped: not reported


def test_a_process_that_exits_within_the_grace_period_is_not_reported():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    try:
        assert _leftovers(grace=30) == []
    finally:
        child.kill()
        child.wait()


def test_pytests_own_multiprocessing_helpers_are_not_reported():
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # lives as long as this process, by design
    assert resource_tracker._resource_tracker._pid is not None
    assert _leftovers(grace=0) == []
    # a process that multiprocessing starts for a test is
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=time.sleep, args=(120,))
    proc.start()
    try:
        assert [p.pid for p in _leftovers(grace=0)] == [proc.pid]
    finally:
        proc.kill()
        proc.join()


def test_the_module_check_fails_a_module_that_leaks(tmp_path):
    """End to end through conftest's fixtures, in a pytest of its own: the leaking module errors,
    naming the process and its test, and the next module passes clean."""
    here = Path(__file__).parent
    for name in ("conftest.py", "process_leaks.py", "slurm_cluster.py"):
        shutil.copy(here / name, tmp_path / name)
    (tmp_path / "test_a_leaks.py").write_text(textwrap.dedent(
        f"""
        import subprocess, sys
        def test_starts_a_sleeper():
            subprocess.run([sys.executable, "-c", {DETACHED!r}, {str(tmp_path / "pid")!r}], check=True)
        """
    ))
    (tmp_path / "test_b_clean.py").write_text("def test_nothing():\n    pass\n")
    env = {**os.environ, "SCALEFORGE_TEST_LEAK_GRACE_S": "0.5"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rE", "."],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 1, out
    assert "2 passed, 1 error" in out, out
    assert "ERROR at teardown of test_starts_a_sleeper" in out, out
    assert "1 process(es) started by tests still alive at the end of test_a_leaks" in out, out
    assert "started by test_a_leaks.py::test_starts_a_sleeper (call)" in out, out
    pid = _wait_for_pid(tmp_path / "pid")
    assert f"pid {pid} " in out, out
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
