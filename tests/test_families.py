"""Every registered family goes through the same checks (the family contract, docs/families.md).

For each `model.arch` in the registry, on its `examples/<family>-tiny.yaml` shrunk to the 512-token
test store: the built model's parameter count equals the config's accounting exactly; `--dry-run`
prints the contract's counts; TP=2 and (where the stack can be cut) PP=2 reproduce the
single-process losses within 1e-5 for 10 steps; a SIGKILL mid-run and the same command again give
bit-identical losses; `orchestrate plan --arch` plans it torch-free (its time printed),
deterministically. One single-process run per family is trained once and reused. The checks are
functions (`check_*`) that tests/test_family_contract.py runs on a family defined outside the package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import rank_env, seed_from_checkpoint
from scaleforge.arch.registry import config_class, known_archs
from scaleforge.config import RunSpec, apply_overrides, from_dict, load_yaml_file, spec_to_yaml
from scaleforge.pretrain import signals
from scaleforge.pretrain.metrics import read_metrics
from test_resume import Run, _finish

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
EVERY = 4  # checkpoints after steps 4, 8 and 10
TOL = 1e-5
FAMILIES = known_archs()
# the example shrunk to the test store and 10 short steps; batch 8 of micro 2 gives PP=2 four
# micro-batches through 1F1B and leaves dp=2 a whole number of micro-batches
SHRINK = {
    "model.vocab_size": 512, "data.seq_len": 64, "train.steps": STEPS, "train.global_batch": 8,
    "train.micro_batch": 2, "train.warmup_steps": 2, "eval.every": 0, "checkpoint.every": EVERY,
    "checkpoint.keep": 3,
}


def example(arch: str) -> Path:
    return ROOT / "examples" / f"{arch}-tiny.yaml"


class _Specs(dict):
    """arch -> its shrunk example as a RunSpec file, written on first use."""

    def __init__(self, store: Path, root: Path):
        super().__init__()
        self.store, self.root = store, root

    def __missing__(self, arch: str) -> Path:
        data = load_yaml_file(example(arch))
        data.setdefault("data", {})["stores"] = [str(self.store)]
        spec = apply_overrides(from_dict(RunSpec, data), [f"{k}={v}" for k, v in SHRINK.items()])
        path = self.root / f"{arch}.yaml"
        path.write_text(spec_to_yaml(spec))
        self[arch] = path
        return path


@pytest.fixture(scope="session")
def family_specs(tiny_store, tmp_path_factory) -> dict[str, Path]:
    """Each family's shrunk example as a RunSpec file."""
    return _Specs(tiny_store, tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def reference(family_specs, tmp_path_factory):
    """The uninterrupted single-process run of a family (trained once per session)."""
    runs: dict[str, tuple[Path, dict[int, float]]] = {}

    def get(arch: str) -> tuple[Path, dict[int, float]]:
        if arch not in runs:
            out = tmp_path_factory.mktemp(f"ref_{arch}") / "run"
            losses = _finish(family_specs[arch], out)
            assert sorted(losses) == list(range(1, STEPS + 1)), losses
            runs[arch] = (out, losses)
        return runs[arch]

    return get


def _spec(arch: str, family_specs) -> RunSpec:
    return from_dict(RunSpec, load_yaml_file(family_specs[arch]))


def test_every_family_has_an_example_and_a_doc():
    for arch in FAMILIES:
        assert example(arch).is_file(), f"examples/{arch}-tiny.yaml missing"
        assert (ROOT / "docs" / f"{arch}.md").is_file(), f"docs/{arch}.md missing"
        config_class(arch)  # importable torch-free (test_plan checks the planner path)


@pytest.fixture(scope="module")
def megatron_single():
    from scaleforge.parallel.setup import init_distributed, shutdown

    init_distributed(RunSpec())
    yield
    shutdown()


# ----------------------------------------------------------------------------------------------
# the checks, each on one family's RunSpec file (tests/test_family_contract.py runs them too)


def check_built_parameters(spec_path: Path) -> None:
    """The built model (one process, megatron initialised) has exactly the accounting's parameters."""
    import torch

    from scaleforge.arch.registry import builder_module

    spec = from_dict(RunSpec, load_yaml_file(spec_path))
    runtime = dict(use_cpu_initialization=True, params_dtype=torch.float32)
    model = builder_module(spec.model.arch).build_model(spec.model, seq_len=spec.data.seq_len,
                                                        seed=1, runtime=runtime)
    built = sum(p.numel() for p in model.parameters())
    assert built == spec.model.num_params(), (spec.model.arch, built, spec.model.num_params())
    assert spec.model.active_params() <= spec.model.num_params()
    assert spec.model.non_embedding_params() == spec.model.num_params() - spec.model.embedding_params()


def check_dry_run(spec_path: Path) -> None:
    """`orchestrate train --dry-run` prints the contract's counts."""
    proc = subprocess.run(
        [sys.executable, "-m", "scaleforge.cli", "train", str(spec_path), "--dry-run"],
        env=rank_env(1), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    head, tail = proc.stdout.split("\n---\n")
    spec = from_dict(RunSpec, load_yaml_file(spec_path))
    assert yaml.safe_load(head)["model"]["arch"] == spec.model.arch
    lines = dict(line.split(": ", 1) for line in tail.splitlines())
    model = spec.model
    assert int(lines["parameters"].replace(",", "")) == model.num_params()
    assert int(lines["active_parameters"].replace(",", "")) == model.active_params()
    assert int(lines["non_embedding_parameters"].replace(",", "")) == model.non_embedding_params()
    assert float(lines["flops_per_token"]) == pytest.approx(
        model.flops_per_token(spec.data.seq_len), rel=1e-3)


def check_parallel_equals_single(spec_path: Path, single: dict[int, float], out: Path,
                                 sets: list[str]) -> None:
    """Two ranks with `sets` (`parallel.tp=2`) give the single process's losses within TOL."""
    losses = _finish(spec_path, out, nproc=2, sets=sets)
    diffs = [abs(single[s] - losses[s]) for s in single]
    assert max(diffs) < TOL, f"{sets}: |loss - single| = {diffs}"


def check_kill_and_rerun(spec_path: Path, single: dict[int, float], out: Path, *,
                         every: int) -> None:
    """SIGKILL after the step after a checkpoint, the same command again: the losses of the
    uninterrupted run, bit for bit, every step once."""
    run = Run(spec_path, out, env={signals.TEST_STOP_ENV: str(every + 2)})
    run.wait_stopped()
    run.kill()
    logged = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert max(logged) == every + 1  # killed mid-run, after the checkpoint of step `every`
    assert _finish(spec_path, out) == single  # exact float equality, every step once


def check_plan_torch_free(arch: str) -> None:
    """`make_plan --arch` with torch and megatron unimportable, twice the same plan."""
    code = (
        "import sys, time; sys.modules['torch'] = None; sys.modules['megatron'] = None\n"
        "from scaleforge.orchestrator.plan.ladder import make_plan\n"
        "from scaleforge.orchestrator.plan.planfile import plan_to_yaml\n"
        "start = time.perf_counter()\n"
        f"a = plan_to_yaml(make_plan(1e21, arch={arch!r}, unique_tokens=1e13))\n"
        "print(time.perf_counter() - start)\n"
        f"assert a == plan_to_yaml(make_plan(1e21, arch={arch!r}, unique_tokens=1e13))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds = float(proc.stdout.strip().splitlines()[-1])
    print(f"plan --budget 1e21 --arch {arch}: {seconds:.3f} s")


# ----------------------------------------------------------------------------------------------
# the six (every registered family)


@pytest.mark.parametrize("arch", FAMILIES)
def test_built_parameters_equal_accounting(arch, family_specs, megatron_single):
    check_built_parameters(family_specs[arch])


@pytest.mark.parametrize("arch", FAMILIES)
def test_dry_run_prints_the_contract_counts(arch, family_specs):
    check_dry_run(family_specs[arch])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("arch", FAMILIES)
def test_tp2_equals_single_process(arch, family_specs, reference, tmp_path):
    _, single = reference(arch)
    check_parallel_equals_single(family_specs[arch], single, tmp_path / "run", ["parallel.tp=2"])
    assert single[STEPS] < single[1] - 0.1  # it learned: not two constant curves


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("arch", FAMILIES)
def test_pp2_equals_single_process(arch, family_specs, reference, tmp_path):
    model = _spec(arch, family_specs).model
    if model.pipeline_layers() % 2:
        pytest.skip(f"{arch}: {model.pipeline_layers()} layers cannot be cut in two")
    _, single = reference(arch)
    check_parallel_equals_single(family_specs[arch], single, tmp_path / "run", ["parallel.pp=2"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_sigkill_and_rerun_gives_identical_losses(arch, family_specs, reference, tmp_path):
    _, single = reference(arch)
    check_kill_and_rerun(family_specs[arch], single, tmp_path / "run", every=EVERY)


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_activation_offload_is_bit_identical(arch, family_specs, reference, tmp_path):
    """MEMO's hooks (alpha 0.5) wrap whatever megatron layers a family builds: from the reference's
    step-8 checkpoint, the last two steps with offload are the reference's bit for bit."""
    source, single = reference(arch)
    out = seed_from_checkpoint(source, tmp_path / "run", 2 * EVERY)
    losses = _finish(family_specs[arch], out, sets=["parallel.activation_offload=0.5"])
    assert losses == {s: single[s] for s in (2 * EVERY + 1, STEPS)}
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(r["offload/bytes_to_host"] > 0 and r["offload/bytes_recomputed"] > 0 for r in records)


@pytest.mark.parametrize("arch", FAMILIES)
def test_plan_for_the_family_is_torch_free_and_deterministic(arch):
    check_plan_torch_free(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_example_loss_clearly_falls_on_the_bundled_corpus(arch, tmp_path):
    """The examples' contract (design.md): over 40 steps at the example's settings, the mean of the
    last 5 losses is at least 0.3 nats below the mean of the first 5."""
    from scaleforge.data_pipeline.store import store_path

    if not (store_path("bundled") / "zarr.json").exists():
        pytest.skip("bundled store not built: run `python -m scaleforge.data_pipeline.prepare`")
    out = tmp_path / "run"
    losses = _finish(example(arch), out, sets=["train.steps=40", "eval.every=0",
                                               "checkpoint.every=0"])
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(36, 41)) / 5
    print(f"{arch}-tiny: first 5 {first:.3f}, last 5 {last:.3f}")
    assert last <= first - 0.3, f"{arch}: mean loss {first:.3f} -> {last:.3f}"
