"""Checkpoint plumbing without training: atomic publish, `latest`, pruning, the manifest check, RNG
capture/restore, and preemption signals (flag, deferral, forwarding to the ranks of a launcher)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleforge import rundir
from scaleforge.errors import CheckpointError
from scaleforge.pretrain import checkpoint, signals


def _fake_save(root: Path, step: int, payload: bytes = b"x" * 1000) -> Path:
    """A finished save in a temporary directory, published the way `checkpoint.save` does."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / rundir.tmp_name(rundir.step_dir_name(step))
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(payload + bytes([step]))
    (tmp / "common.pt").write_bytes(b"common")
    final = root / rundir.step_dir_name(step)
    checkpoint.publish(root, tmp, final)
    return final


def test_publish_names_latest_and_writes_a_manifest(tmp_path):
    root = tmp_path / "checkpoints"
    final = _fake_save(root, 3)
    assert (root / "latest").read_text() == "step_0000003\n"
    assert checkpoint.latest_dir(tmp_path) == final
    assert not list(root.glob(f"{rundir.TMP_PREFIX}*"))
    checkpoint.verify(final)  # a fresh checkpoint passes its own manifest


def test_no_latest_is_a_fresh_start(tmp_path):
    assert checkpoint.latest_dir(tmp_path) is None
    (tmp_path / "checkpoints" / ".tmp_step_0000004").mkdir(parents=True)  # a killed first save
    assert checkpoint.latest_dir(tmp_path) is None


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    final = _fake_save(root, 6)
    os.rename(final, root / "moved")
    with pytest.raises(CheckpointError, match="names step_0000006, which does not exist"):
        checkpoint.latest_dir(tmp_path)


def test_latest_naming_an_unsealed_directory_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    final = _fake_save(root, 6)
    (final / checkpoint.MARKER).unlink()
    with pytest.raises(CheckpointError, match="COMPLETE is missing"):
        checkpoint.latest_dir(tmp_path)


def test_garbage_in_latest_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a step directory name"):
        checkpoint.latest_dir(tmp_path)


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_save(root, step)
    (root / rundir.tmp_name("step_0000008")).mkdir()  # in progress: neither kept nor counted
    removed = checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_0000002"]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000004", "step_0000006"]
    # the checkpoint `latest` names survives even when it is not among the newest
    (root / "latest").write_text("step_0000004\n")
    _fake_save(root, 10)
    (root / "latest").write_text("step_0000004\n")
    checkpoint.prune(tmp_path, keep=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000004", "step_0000010"]


def test_resaving_a_step_replaces_an_unpublished_copy(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_save(root, 3)
    stale = _fake_save(root, 6, payload=b"old")
    (root / "latest").write_text("step_0000003\n")  # killed after the rename, before `latest`
    fresh = _fake_save(root, 6, payload=b"new")
    assert fresh == stale and (fresh / "__0_0.distcp").read_bytes().startswith(b"new")
    assert checkpoint.latest_dir(tmp_path) == fresh


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:500]), "is truncated"),
        (lambda f: f.write_bytes(b"y" + f.read_bytes()[1:]), "is corrupt"),
        (lambda f: f.unlink(), "is missing"),
    ],
)
def test_verify_names_the_bad_file(tmp_path, damage, words):
    final = _fake_save(tmp_path / "checkpoints", 3)
    victim = final / "__0_0.distcp"
    damage(victim)
    with pytest.raises(CheckpointError) as info:
        checkpoint.verify(final)
    message = str(info.value)
    assert str(victim) in message and words in message and "\n" not in message


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save(checkpoint.capture_rng(), path)
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoint.restore_rng(torch.load(path, weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# ----------------------------------------------------------------------------------------------
# signals


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in signals.HANDLED}
    signals.reset()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    signals.reset()


def test_signal_only_sets_the_flag(handlers):
    signals.install()
    assert not signals.stop_requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signals.stop_requested() and signals.received() == "SIGUSR1"


def test_install_unblocks_signals_a_launcher_held_back(handlers):
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals.HANDLED)
    try:
        signals.install()
        assert not set(signals.HANDLED) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def test_processes_started_in_deferred_survive_preemption_signals(handlers):
    # the purpose: the checkpoint writer's helper processes inherit the blocked mask
    with signals.deferred():
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for sig in signals.HANDLED:
            helper.send_signal(sig)
        time.sleep(0.5)
        assert helper.poll() is None
    finally:
        helper.kill()
        helper.wait()
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    outside.send_signal(signal.SIGUSR2)
    assert outside.wait(timeout=30) == -signal.SIGUSR2


RANK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from scaleforge.pretrain import signals
    signals.install()
    Path(sys.argv[1]).write_text("ready")
    while not signals.stop_requested():
        time.sleep(0.01)
    Path(sys.argv[1]).write_text(signals.received())
    sys.exit(signals.REQUEUE_EXIT_CODE)
    """
)

# A stand-in for torchrun: it starts two ranks and dies of SIGUSR1's default action if it gets one.
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    ranks = [subprocess.Popen([sys.executable, "-c", sys.argv[1], f"{sys.argv[2]}/rank{i}"])
             for i in range(2)]
    sys.exit(max(r.wait() for r in ranks))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_forward_to_ranks_signals_each_rank_not_the_launcher(handlers, tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(tmp_path)])
    try:
        files = [tmp_path / "rank0", tmp_path / "rank1"]
        end = time.monotonic() + 60
        while not all(f.exists() for f in files):
            assert time.monotonic() < end and proc.poll() is None, "ranks did not start"
            time.sleep(0.02)
        with signals.forward_to_ranks(proc):
            os.kill(os.getpid(), sig)
            code = proc.wait(timeout=60)
        assert code == signals.REQUEUE_EXIT_CODE  # the launcher survived and reported its ranks
        assert [f.read_text() for f in files] == [sig.name, sig.name]
        assert not signals.stop_requested()  # this process only forwarded
    finally:
        proc.kill()
