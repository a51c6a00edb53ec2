"""requirements.lock is the environment: every installed distribution at its locked version, no CUDA
build, and `pip check` clean."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
# Not in the lock, by design: pip installs the lock (the Makefile pins its release), and the project
# itself is installed from its checkout.
UNLOCKED = {"pip", "scaleforge"}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"requirements.lock: not a `name==version` line: {line!r}"
        pins[_name(m[1])] = m[2]
    return pins


def _installed() -> dict[str, str]:
    # the venv's site-packages only: an imported setuptools appends its own vendored distributions'
    # folder to sys.path, and those are part of setuptools, not installed
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=paths)}


def test_lock_names_every_installed_distribution_at_its_version():
    locked, installed = _locked(), _installed()
    assert UNLOCKED <= installed.keys(), "the test runs in the project's venv (make setup)"
    unlocked = sorted(f"{n}=={v}" for n, v in installed.items() if n not in locked and n not in UNLOCKED)
    assert not unlocked, f"installed but not in requirements.lock: {unlocked}"
    missing = sorted(f"{n}=={v}" for n, v in locked.items() if n not in installed)
    assert not missing, f"in requirements.lock but not installed: {missing}"
    other = sorted(f"{n}: {installed[n]} installed, {v} locked" for n, v in locked.items() if installed[n] != v)
    assert not other, f"versions differ from requirements.lock: {other}"


def test_lock_has_no_cuda_packages():
    cuda = sorted(n for n in _locked() if n.startswith("nvidia-") or n == "triton")
    assert not cuda, f"requirements.lock pulls CUDA packages (resolve against the CPU torch wheel): {cuda}"
    assert _locked()["torch"].endswith("+cpu")


def test_pip_check():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
