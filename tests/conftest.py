"""Shared fixtures (keep small; add fixtures additively)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_configure(config):
    """The suite runs under the same warning policy as scaleforge's processes (scaleforge/_warnings.py):
    a warning it does not list fails nothing but shows in the summary, and must be fixed or listed."""
    from scaleforge import _warnings

    for line in _warnings.pytest_filters():
        config.addinivalue_line("filterwarnings", line)
    process_leaks.mark_session()  # every process the tests start inherits this session's marker


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
    """Environment for launched ranks: one OpenMP thread each (2 ranks share 2 cores), and every
    warning shown once per place (DeprecationWarnings included, which Python hides by default)
    under the ranks' own policy (scaleforge/_warnings.py), so that `warning_lines` finds them."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "default"
    return env


# warnings.formatwarning's first line, "FILE:LINE: CATEGORY: MESSAGE", as torchrun prefixes it
WARNING_LINE = re.compile(r"^(\[rank\d+\]:)?\S.*:\d+: \w*Warning: ", re.MULTILINE)


def warning_lines(stderr: str) -> list[str]:
    """The Python warnings a process printed (scaleforge's processes must print none)."""
    return [m.group(0) + stderr[m.end():].split("\n", 1)[0] for m in WARNING_LINE.finditer(stderr)]


def train_records(spec: str | Path, out: Path, nproc: int, overrides: list[str]) -> list[dict]:
    """`orchestrate train SPEC --out OUT --nproc N --set ...` to completion; its training lines."""
    from scaleforge.pretrain.metrics import read_metrics

    cmd = [sys.executable, "-m", "scaleforge.cli", "train", str(spec), "--out", str(out),
           "--nproc", str(nproc)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=rank_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not warning_lines(proc.stderr), warning_lines(proc.stderr)
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def seed_from_checkpoint(source: Path, out: Path, step: int) -> Path:
    """A new run directory `out` holding only `source`'s checkpoint of `step`, as its latest."""
    from scaleforge import rundir

    name = rundir.step_dir_name(step)
    shutil.copytree(rundir.checkpoints_dir(source) / name, rundir.checkpoints_dir(out) / name)
    rundir.latest_path(out).write_text(name + "\n")
    return out


from slurm_cluster import slurm_root  # noqa: E402,F401  (the Slurm dev cluster, one per session)


# Two workers (`pytest -n 2 --dist loadgroup`, the Makefile's `make test`) take whole groups: a module
# is one group, so its module-scoped reference run is trained once; every Slurm test is one group, so
# the session's dev cluster starts once; the family checks are one group per family, so a family's
# session-scoped reference run is trained once. Groups start longest first (seconds measured on 2 cores
# with one worker, `pytest --durations=0`, summed per group; only their order matters), so the longest
# does not start last and leave one worker idle at the end; groups not listed start after these.
GROUP_SECONDS = {
    "test_resume": 305, "slurm": 296, "test_mamba": 291, "test_memory": 184, "test_moe": 154,
    "test_train_cli": 137, "test_loop_e2e": 132, "test_families[tokenformer]": 128,
    "test_parallel_equality": 107, "test_family_contract": 100, "test_families[parscale]": 80,
    "test_families[mamba]": 78, "test_families[moe]": 77, "test_tokenformer": 72,
    "test_families[dense]": 71,
    "test_families[mor]": 68, "test_parscale": 57, "test_mor": 57, "test_rewire": 50,
    "test_export": 49, "test_golden": 46, "test_forecast": 25, "test_growth_ladder": 23,
    "test_executors_local": 19,
}


def _group(item) -> str:
    if item.get_closest_marker("slurm"):
        return "slurm"
    module = item.module.__name__
    arch = getattr(item, "callspec", None) and item.callspec.params.get("arch")
    if module == "test_families" and arch:
        return f"{module}[{arch}]"
    return module


def pytest_collection_modifyitems(config, items):
    first: dict[str, int] = {}
    for item in items:
        group = _group(item)
        first.setdefault(group, len(first))
        item.add_marker(pytest.mark.xdist_group(group))
    # each group contiguous (a module's fixtures are set up once), the longest groups first
    items.sort(key=lambda item: (-GROUP_SECONDS.get(_group(item), 0), first[_group(item)]))


import process_leaks  # noqa: E402
import slurm_cluster  # noqa: E402


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
