"""The session's Slurm dev cluster (slurm/dev-cluster), shared by every `slurm` test module.

Two nodes (sf1, sf2) on this machine when it has at least two cores, started once per test session
under a temporary root on free ports and stopped at its end. Needs root and the Debian packages
(`make slurm-packages`).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
# slurmctld BASE, slurmdbd BASE+2, MariaDB BASE+3, slurmd i BASE+4+i
PORTS_PER_CLUSTER = 8


def cluster_nodes() -> int:
    """Nodes of the session's cluster: two where the machine has two cores."""
    return min(2, len(os.sched_getaffinity(0)))


# The daemons' ports sit between the jobs' rendezvous ports and the kernel's ephemeral range: a job's
# MASTER_PORT is 20000 + its job id (parallel.setup; a test cluster's ids stay below 1000), and Linux
# hands out outgoing ports from 32768 up, so a daemon port in either range could be taken by a job's
# store or a client socket.
PORT_RANGE = (21000, 32760)


def free_port_base() -> int:
    for _ in range(50):
        base = random.randrange(*PORT_RANGE, PORTS_PER_CLUSTER)
        try:
            for port in range(base, base + PORTS_PER_CLUSTER):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {PORTS_PER_CLUSTER} free consecutive ports found")


def daemon_pids(root: Path) -> list[int]:
    out = []
    for pidfile in (root / "run").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.append(pid)
    return out


RUNNING: list[Path] = []
"""Roots of this session's clusters while they are up (the process-leak check excepts their daemons)."""


def running_daemon_pids() -> set[int]:
    return {pid for root in RUNNING for pid in daemon_pids(root)}


@pytest.fixture(scope="session")
def slurm_root(tmp_path_factory):
    """A running dev cluster; yields its root. SLURM_CONF is set for this process meanwhile."""
    if os.geteuid() != 0:
        pytest.skip("the dev cluster's daemons run as root")
    root = tmp_path_factory.mktemp("slurm")
    base = free_port_base()
    t0 = time.perf_counter()
    up = subprocess.run([str(DEV_CLUSTER), "up", "--root", str(root), "--port", str(base),
                         "--nodes", str(cluster_nodes())],
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    print(f"dev cluster up in {time.perf_counter() - t0:.1f} s")
    export = up.stdout.strip().splitlines()[-1]
    assert export == f"export SLURM_CONF={root}/etc/slurm.conf"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = f"{root}/etc/slurm.conf"
    RUNNING.append(root)
    try:
        yield root
    finally:
        down = subprocess.run([str(DEV_CLUSTER), "down", "--root", str(root)],
                              capture_output=True, text=True, timeout=120)
        RUNNING.remove(root)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        assert down.returncode == 0, down.stderr
        assert daemon_pids(root) == []  # `down` leaves no daemon running


def wait_for(cond, timeout: float, what: str, poll: float = 0.5):
    """`cond()` once it is truthy, polled every `poll` s; an AssertionError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
