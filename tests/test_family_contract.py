"""A family the package has never seen goes through the six's checks (docs/adding-a-family.md).

tests/families/parallel_block/ defines GPT-J-style parallel blocks, both halves of the contract,
outside `scaleforge/`; `SCALEFORGE_FAMILIES` registers it in this process and in every process the
tests start (the CLI, torchrun's ranks). On a tiny shape and 3 steps: the built parameters equal the
accounting, the dry run prints the contract's counts, `orchestrate plan --arch parallel_block` plans
it (torch-free, deterministic), TP=2 reproduces one process within test_families' tolerance, and a
SIGKILL then the same command again give bit-identical losses. Bad values of the variable are one
line that names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import rank_env
from scaleforge.config import RunSpec, apply_overrides, spec_to_yaml
from scaleforge.orchestrator.plan.planfile import load_plan
from test_families import (  # the checks the six go through, and their megatron fixture
    check_built_parameters,
    check_dry_run,
    check_kill_and_rerun,
    check_parallel_equals_single,
    check_plan_torch_free,
    megatron_single,  # noqa: F401  (a fixture)
)
from test_resume import _finish

TESTS = Path(__file__).resolve().parent
ARCH = "parallel_block"
HOOK = "families.parallel_block.config:ParallelBlockConfig"
STEPS = 3
EVERY = 1  # checkpoints after every step: the kill comes after step 2, the rerun trains step 3
SETS = {
    "model.arch": ARCH, "model.layers": 2, "model.hidden": 64, "model.heads": 4,
    "model.kv_heads": 2, "model.ffn_hidden": 176, "model.vocab_size": 512, "data.seq_len": 64,
    "train.steps": STEPS, "train.global_batch": 4, "train.micro_batch": 2, "train.warmup_steps": 1,
    "train.lr": 0.006, "eval.every": 0, "checkpoint.every": EVERY, "checkpoint.keep": 3,
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The hook set for this module's process and its children (tests/ on their PYTHONPATH)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEFORGE_FAMILIES", HOOK)
        mp.setenv("PYTHONPATH", os.pathsep.join(
            p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p))
        yield


@pytest.fixture(scope="module")
def spec_path(registered, tiny_store, tmp_path_factory) -> Path:
    """The family's tiny RunSpec on the test store."""
    spec = apply_overrides(RunSpec(), [f"{k}={v}" for k, v in SETS.items()]
                           + [f"data.stores=[{tiny_store}]"])
    path = tmp_path_factory.mktemp("parallel_block") / "run.yaml"
    path.write_text(spec_to_yaml(spec))
    return path


@pytest.fixture(scope="module")
def single(spec_path, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted single-process losses."""
    losses = _finish(spec_path, tmp_path_factory.mktemp("pb_ref") / "run")
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    return losses


def test_nothing_under_the_package_names_it():
    hits = [p for p in (TESTS.parent / "scaleforge").rglob("*")
            if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml")
            and ARCH in p.read_text(errors="replace")]
    assert not hits, hits


def test_built_parameters_equal_accounting(spec_path, megatron_single):
    check_built_parameters(spec_path)


def test_dry_run_prints_the_contract_counts(spec_path):
    check_dry_run(spec_path)


def test_plan_through_the_cli(tmp_path):
    out = tmp_path / "plan.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "scaleforge.cli", "plan", "--budget", "1e21", "--arch", ARCH,
         "--out", str(out), "--quiet"], env=rank_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = load_plan(out)
    assert plan.target.spec.model.arch == ARCH and len(plan.ladder) > 3
    assert plan.target.spec.model.num_params() == pytest.approx(plan.target.N, rel=0.05)
    check_plan_torch_free(ARCH)


@pytest.mark.distributed
def test_tp2_equals_single_process(spec_path, single, tmp_path):
    check_parallel_equals_single(spec_path, single, tmp_path / "run", ["parallel.tp=2"])


def test_sigkill_and_rerun_gives_identical_losses(spec_path, single, tmp_path):
    check_kill_and_rerun(spec_path, single, tmp_path / "run", every=EVERY)


@pytest.mark.parametrize("value, message", [
    ("families.parallel_block.config", "is not module:Class"),
    ("families.no_such_family:Config", "cannot import 'families.no_such_family'"),
    ("families.parallel_block.config:Nope", "has no 'Nope'"),
    ("families.parallel_block.config:dataclass", "is not a FamilyConfig subclass"),
    ("scaleforge.arch.dense.config:DenseConfig", "model.arch='dense', which is taken"),
])
def test_a_bad_hook_is_one_line_naming_it(value, message, tmp_path):
    env = {**rank_env(1), "SCALEFORGE_FAMILIES": value}
    proc = subprocess.run(
        [sys.executable, "-m", "scaleforge.cli", "plan", "--budget", "1e21", "--out",
         str(tmp_path / "plan.yaml")], env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0, err
    assert err.startswith("error: SCALEFORGE_FAMILIES") and message in err, err
    assert not (tmp_path / "plan.yaml").exists()

