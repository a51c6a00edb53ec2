"""Shared fixtures (keep small; add fixtures additively)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A real token store: 24 State of the Union speeches, a 512-token BPE, 2+ validation docs."""
    from scaleforge.data_pipeline import corpus
    from scaleforge.data_pipeline.ingest import ingest
    from scaleforge.data_pipeline.store import SplitConfig
    from scaleforge.data_pipeline.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny_corpus")
    sotu = corpus.bundled_sources()[0]
    texts = [text for _key, text in sotu.documents() if text.strip()][:24]
    for i, text in enumerate(texts):
        (root / f"doc{i:02d}.txt").write_text(text)
    sources = corpus.path_sources([root])
    tokenizer = train_bpe(texts, vocab_size=512)
    path = tmp_path_factory.mktemp("tiny_store") / "store"
    ingest(path, sources, tokenizer,
           split=SplitConfig(validation_fraction=0.1, min_validation_docs=2), log=lambda _m: None)
    return path


def rank_env(threads: int = 1) -> dict[str, str]:
    """Environment for launched ranks: one OpenMP thread each (2 ranks share 2 cores)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def train_records(spec: str | Path, out: Path, nproc: int, overrides: list[str]) -> list[dict]:
    """`orchestrate train SPEC --out OUT --nproc N --set ...` to completion; its training lines."""
    from scaleforge.pretrain.metrics import read_metrics

    cmd = [sys.executable, "-m", "scaleforge.cli", "train", str(spec), "--out", str(out),
           "--nproc", str(nproc)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=rank_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def seed_from_checkpoint(source: Path, out: Path, step: int) -> Path:
    """A new run directory `out` holding only `source`'s checkpoint of `step`, as its latest."""
    from scaleforge import rundir
    from scaleforge.pretrain.checkpoint import step_name

    name = step_name(step)
    shutil.copytree(rundir.checkpoints_dir(source) / name, rundir.checkpoints_dir(out) / name)
    (rundir.checkpoints_dir(out) / rundir.LATEST).write_text(name + "\n")
    return out


from slurm_cluster import slurm_root  # noqa: E402,F401  (the Slurm dev cluster, one per session)

import process_leaks  # noqa: E402
import slurm_cluster  # noqa: E402


def pytest_configure(config):
    process_leaks.mark_session()  # every process the tests start inherits this session's marker


def _no_leftover_processes(where: str, exclude: set[int]) -> None:
    leaks = process_leaks.leftovers(exclude)
    if leaks:
        message = process_leaks.report(leaks, where)
        process_leaks.kill(leaks)  # so that later modules are not affected
        pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session():
    """After every fixture's teardown (the Slurm cluster's `down` included): nothing left at all."""
    yield
    _no_leftover_processes("the test session", exclude=set())


@pytest.fixture(scope="module", autouse=True)
def no_process_outlives_its_module(request):
    """A process that a test started (a rank, a launcher, a server, a helper of any of them, a
    Slurm job step) and that is still alive `process_leaks.GRACE_S` seconds after the end of its
    module fails the module, named with its pid, command line and test; it is then killed. The
    session's Slurm daemons are excepted (they belong to the session-scoped `slurm_root`)."""
    yield
    _no_leftover_processes(request.module.__name__, exclude=slurm_cluster.running_daemon_pids())
