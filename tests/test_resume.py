"""Exact resume through the real CLI: a run that is killed, preempted or resharded and re-run with the
same command ends with the same per-step losses as a run that was never interrupted.

Every run is `python -m scaleforge.cli train` in its own session (so a SIGKILL takes the whole job:
the CLI, torchrun, the ranks and the checkpoint writer's helpers). Kills land at exact steps through
the test-only hooks documented in scaleforge.pretrain.signals (SIGSTOP at the n-th step boundary) and
scaleforge.pretrain.checkpoint (pause inside a save). fp32 on CPU, one thread per rank.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import rank_env
from scaleforge import rundir
from scaleforge.pretrain import checkpoint, signals
from scaleforge.pretrain.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 8
EVERY = 3  # checkpoints after steps 3, 6 and 8
RESHARD_TOL = 1e-5


def _write_spec(directory: Path, store: Path) -> Path:
    spec = {
        "name": "resume",
        "seed": 5,
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128,
                  "vocab_size": 512},
        "data": {"stores": [str(store)], "seq_len": 32},
        "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 2, "lr": 3e-3,
                  "warmup_steps": 2},
        "eval": {"every": 0},
        "checkpoint": {"every": EVERY, "keep": 3},
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Run:
    """One `orchestrate train` process group with its log."""

    def __init__(self, spec: Path, out: Path, *, nproc: int | None = None, sets=(), env=None):
        cmd = [sys.executable, "-m", "scaleforge.cli", "train", str(spec), "--out", str(out)]
        if nproc:
            cmd += ["--nproc", str(nproc)]
        for item in sets:
            cmd += ["--set", item]
        self.nranks = nproc or 1
        self.log_path = out.parent / f"{out.name}.{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env={**rank_env(1), **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def ranks(self) -> list[psutil.Process]:
        """The training processes: the CLI itself (one rank) or torchrun's children."""
        if self.nranks == 1:
            return [psutil.Process(self.proc.pid)]
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in kids if "scaleforge.pretrain" in " ".join(p.cmdline())
                and "torch.distributed.run" not in " ".join(p.cmdline())]

    def wait_stopped(self, timeout: float = 240) -> list[psutil.Process]:
        """Wait until every rank has SIGSTOPped itself (the test hook)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"run exited ({self.proc.returncode}) before the hook:\n"
                            f"{self.output()[-3000:]}")
            try:
                ranks = self.ranks()
                if len(ranks) == self.nranks and all(
                    p.status() == psutil.STATUS_STOPPED for p in ranks
                ):
                    return ranks
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"ranks did not stop within {timeout} s:\n{self.output()[-3000:]}")

    def wait_file(self, path: Path, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.kill()
                pytest.fail(f"{path} never appeared:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole job: CLI, torchrun, ranks (torchrun gives each its own session) and
        the checkpoint writer's helpers."""
        try:
            everyone = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            everyone = []
        self.kill_session()
        for proc in everyone:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()

    def kill_session(self) -> None:
        """SIGKILL the CLI's session only (the CLI and torchrun, not torchrun's ranks)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.kill()  # leftovers of the session, if any
        return code


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"a step appears twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _finish(spec: Path, out: Path, **kw) -> dict[int, float]:
    run = Run(spec, out, **kw)
    code = run.wait()
    assert code == 0, run.output()[-3000:]
    return _train_losses(out)


def _latest(run_dir: Path) -> str:
    return rundir.read_latest(run_dir)


def _rewind(src: Path, dst: Path, step: int) -> Path:
    """Copy a finished run and make checkpoint `step` its latest (later ones removed)."""
    shutil.copytree(src, dst)
    for path in rundir.checkpoints_dir(dst).glob(f"{rundir.STEP_PREFIX}*"):
        if rundir.parse_step(path.name) > step:
            shutil.rmtree(path)
    rundir.latest_path(dst).write_text(rundir.step_dir_name(step) + "\n")
    return dst


@pytest.fixture(scope="module")
def spec(tiny_store, tmp_path_factory) -> Path:
    return _write_spec(tmp_path_factory.mktemp("resume_spec"), tiny_store)


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The uninterrupted 1-rank run."""
    out = tmp_path_factory.mktemp("ref1") / "run"
    losses = _finish(spec, out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return out, losses


def test_sigkill_at_random_step_resumes_bit_exact(spec, reference, tmp_path):
    _ref_dir, ref = reference
    kill_step = random.Random(2024).randint(EVERY + 1, 2 * EVERY - 1)  # between checkpoints 3, 6
    out = tmp_path / "run"
    run = Run(spec, out, env={signals.TEST_STOP_ENV: str(kill_step)})
    run.wait_stopped()
    run.kill()
    assert _latest(out) == rundir.step_dir_name(EVERY)
    assert max(_train_losses(out)) == kill_step - 1  # step kill_step was never logged
    assert _finish(spec, out) == ref  # exact float equality, every step once


def test_sigkill_inside_save_keeps_previous_checkpoint(spec, reference, tmp_path):
    _ref_dir, ref = reference
    out = tmp_path / "run"
    run = Run(spec, out, env={checkpoint.PAUSE_ENV: str(2 * EVERY)})
    tmp = rundir.checkpoints_dir(out) / rundir.tmp_name(rundir.step_dir_name(2 * EVERY))
    run.wait_file(tmp / "PAUSED")
    assert any(tmp.glob("*.distcp")), "the kill must land after tensor files were written"
    run.kill()
    assert _latest(out) == rundir.step_dir_name(EVERY)
    assert not (rundir.checkpoints_dir(out) / rundir.step_dir_name(2 * EVERY)).exists()
    resumed = _finish(spec, out)
    assert resumed == ref
    assert not tmp.exists(), "the half-written save is cleaned up by the next save"


def test_sigterm_saves_at_step_boundary_and_requeues(spec, reference, tmp_path):
    _ref_dir, ref = reference
    out = tmp_path / "run"
    run = Run(spec, out, env={signals.TEST_STOP_ENV: "4"})
    (rank,) = run.wait_stopped()
    rank.send_signal(signal.SIGTERM)
    rank.send_signal(signal.SIGCONT)
    assert run.wait() == signals.REQUEUE_EXIT_CODE, run.output()[-3000:]
    assert _latest(out) == rundir.step_dir_name(4)  # saved at the step the signal arrived in
    assert max(_train_losses(out)) == 4
    assert _finish(spec, out) == ref


def test_truncated_checkpoint_is_named_and_nothing_is_changed(spec, reference, tmp_path):
    ref_dir, _ref = reference
    out = _rewind(ref_dir, tmp_path / "run", 2 * EVERY)
    victim = max((rundir.checkpoints_dir(out) / rundir.step_dir_name(2 * EVERY)).glob("*.distcp"),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    before = _tree_digest(out / "checkpoints"), (out / "metrics.jsonl").read_bytes()
    run = Run(spec, out)
    code = run.wait()
    text = run.output()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code != 0 and errors, text[-3000:]
    assert str(victim) in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in text
    assert (_tree_digest(out / "checkpoints"), (out / "metrics.jsonl").read_bytes()) == before


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.distributed
def test_dp2_sigusr1_then_sigkill_resume_bit_exact(spec, tmp_path):
    """DP=2 with the distributed optimizer, through `orchestrate train --nproc 2`."""
    ref = _finish(spec, tmp_path / "ref", nproc=2)
    out = tmp_path / "run"
    # 1) SIGUSR1 to the CLI (it forwards to the ranks) after step 2: save, exit with the requeue code
    run = Run(spec, out, nproc=2, env={signals.TEST_STOP_ENV: "2"})
    ranks = run.wait_stopped()
    os.kill(run.proc.pid, signal.SIGUSR1)
    time.sleep(0.5)  # the CLI forwards asynchronously
    for rank in ranks:
        rank.send_signal(signal.SIGCONT)
    assert run.wait() == signals.REQUEUE_EXIT_CODE, run.output()[-3000:]
    assert _latest(out) == rundir.step_dir_name(2)
    # 2) re-run; SIGKILL the whole job at a random step between the checkpoints of steps 3 and 6
    kill_step = random.Random(7).randint(EVERY + 1, 2 * EVERY - 1)
    run = Run(spec, out, nproc=2, env={signals.TEST_STOP_ENV: str(kill_step - 2)})
    ranks = run.wait_stopped()
    run.kill_session()  # the CLI and torchrun; the ranks must follow torchrun (die_with_torchrun)
    psutil.wait_procs(ranks, timeout=30)
    assert not any(rank.is_running() for rank in ranks), "ranks outlived a SIGKILLed torchrun"
    run.kill()
    assert _latest(out) == rundir.step_dir_name(EVERY)
    # 3) re-run to the end
    assert _finish(spec, out, nproc=2) == ref


@pytest.mark.distributed
def test_resharded_resume_tp1_to_tp2_then_tp2_to_dp2(spec, reference, tmp_path):
    """TP1 -> TP2 (weights and Adam state split), then TP2 -> DP2 (merged again and handed to the
    distributed optimizer, whose master weights come from the plain optimizer's model weights)."""
    ref_dir, ref = reference
    tp2 = _rewind(ref_dir, tmp_path / "tp2", EVERY)
    resumed = _finish(spec, tp2, nproc=2, sets=["parallel.tp=2"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(EVERY + 1, STEPS + 1):
        assert abs(resumed[step] - ref[step]) < RESHARD_TOL, (step, resumed[step], ref[step])
    dp2 = _rewind(tp2, tmp_path / "dp2", 2 * EVERY)
    resumed = _finish(spec, dp2, nproc=2)
    for step in range(2 * EVERY + 1, STEPS + 1):
        assert abs(resumed[step] - ref[step]) < RESHARD_TOL, (step, resumed[step], ref[step])


@pytest.mark.distributed
def test_resharded_resume_pp2_to_pp1(spec, tmp_path):
    pp2_dir = tmp_path / "pp2"
    ref = _finish(spec, pp2_dir, nproc=2, sets=["parallel.pp=2"])
    out = _rewind(pp2_dir, tmp_path / "run", EVERY)
    resumed = _finish(spec, out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(EVERY + 1, STEPS + 1):
        assert abs(resumed[step] - ref[step]) < RESHARD_TOL, (step, resumed[step], ref[step])
