"""Memory levers through the real CLI: sharded data parallelism (Megatron-FSDP), exact checkpoints
across shard levels and DP sizes, MEMO-style activation offload, recomputation; their bad input.

Every training run is `orchestrate train` (fp32 on CPU, gloo, one thread per rank) on one tiny shape,
10 steps, compared with one single-process reference run of the module (checkpoints after steps 5
and 10). A resumed run is a fresh run directory holding only the reference's (or a sharded run's)
step-5 checkpoint, trained to step 10 under another layout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import rank_env, seed_from_checkpoint, train_records
from scaleforge.config import ParallelSpec, RunSpec, apply_overrides, load_runspec
from scaleforge.errors import ConfigError, LayoutError
from scaleforge.parallel import memory
from scaleforge.parallel.checks import check_layout

STEPS = 10
TOL = 1e-5


def _spec(directory: Path, store: Path) -> Path:
    spec = {
        "name": "memory",
        "seed": 7,
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128,
                  "vocab_size": 512},
        "data": {"stores": [str(store)], "seq_len": 64},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "lr": 3e-3,
                  "warmup_steps": 2},
        "eval": {"every": 0},
        "checkpoint": {"every": 5, "keep": 3},
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_store):
    tmp = tmp_path_factory.mktemp("memory")
    spec = _spec(tmp, tiny_store)
    out = tmp / "single"
    records = train_records(spec, out, 1, [])
    assert len(records) == STEPS and records[-1]["loss"] < records[0]["loss"] - 0.1
    return spec, out, [r["loss"] for r in records]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def _resume(source: Path, out: Path, spec: Path, nproc: int, sets: list[str]) -> list[float]:
    """A new run directory with `source`'s step-5 checkpoint only, trained to the end."""
    seed_from_checkpoint(source, out, 5)
    records = train_records(spec, out, nproc, sets)
    return [r["loss"] for r in records if r["step"] > 5]


# ----------------------------------------------------------------------------------------------
# sharding levels


@pytest.mark.slow
@pytest.mark.distributed
def test_full_sharding_matches_one_process_and_resumes_across_levels(reference, tmp_path):
    spec, single_dir, single = reference
    full = [r["loss"] for r in train_records(spec, tmp_path / "full", 2, ["parallel.shard=full"])]
    assert _max_diff(full, single) < TOL
    # a ZeRO-3 checkpoint resumes in one process (no sharding, dp 1) ...
    one = _resume(tmp_path / "full", tmp_path / "full_to_one", spec, 1, [])
    assert _max_diff(one, single[5:]) < TOL
    # ... and a one-process checkpoint under ZeRO-2 on two ranks
    grads = _resume(single_dir, tmp_path / "one_to_grads", spec, 2, ["parallel.shard=grads"])
    assert _max_diff(grads, single[5:]) < TOL


@pytest.mark.slow
@pytest.mark.distributed
def test_full_sharding_with_tensor_parallelism(reference, tmp_path):
    spec, _single_dir, single = reference
    losses = [r["loss"] for r in train_records(
        spec, tmp_path / "tp2", 4, ["parallel.shard=full", "parallel.tp=2"])]
    assert _max_diff(losses, single) < TOL


# ----------------------------------------------------------------------------------------------
# activations


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_activation_offload_is_bit_identical_and_reports_bytes(reference, tmp_path, alpha):
    spec, _single_dir, single = reference
    run = train_records(spec, tmp_path / "run", 1, [f"parallel.activation_offload={alpha}"])
    assert [r["loss"] for r in run] == single  # bit for bit: copies and recomputation are exact
    moved = [r["offload/bytes_to_host"] for r in run]
    dropped = [r["offload/bytes_recomputed"] for r in run]
    # every step saves the same tensors and splits them the same way (a freed attention output's
    # address reused later in the layer once made the split vary by a few 16 KiB halves)
    assert len(set(moved)) == 1 and len(set(dropped)) == 1
    # ... each saved region once, as the memory model counts them: per layer and micro-batch the
    # input, the attention output and alpha of the other saved bytes (fp32, 2 layers x 4
    # micro-batches). The model counts the fused QKV output whole (without offload the value view
    # keeps it alive); the hooks copy only that view: (h + h g / a) x 4 bytes a token less, alpha
    # of it from the copies
    model = load_runspec(spec).model
    (layer,) = set(model.layer_kinds())
    shape = dict(seq_len=64, micro_batch=2, tp=1, sp=False, recompute="none", flash=False)
    qkv_rest = 2 * 4 * (64 * 2) * (64 + 64 * 2 // 4) * 4
    copies = 2 * 4 * memory.memo_layer_bytes(model, layer, alpha, fp32=True, **shape)
    saved = 2 * 4 * memory._layer_activation(model, layer, fp32=True, **shape) - qkv_rest
    assert (moved[0], moved[0] + dropped[0]) == (copies - alpha * qkv_rest, saved)
    assert (dropped[0] == 0) == (alpha == 1)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_gives_the_same_losses(reference, tmp_path, recompute):
    spec, _single_dir, single = reference
    losses = [r["loss"] for r in train_records(spec, tmp_path / recompute, 1,
                                               [f"parallel.recompute={recompute}"])]
    assert _max_diff(losses, single) < TOL


# ----------------------------------------------------------------------------------------------
# GPU-only paths: validated here, run only where CUDA and Transformer Engine are


def _has_te() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    from megatron.core.extensions import transformer_engine as te_ext

    return bool(getattr(te_ext, "HAVE_TE", False))


@pytest.mark.parametrize("key", ["parallel.offload_layers=1", "parallel.optimizer_offload=0.5"])
def test_gpu_offload_refused_without_a_gpu_in_one_line(key, tmp_path, tiny_store):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    from scaleforge.pretrain import model_build

    spec = load_runspec(_spec(tmp_path, tiny_store), [key])
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU with Transformer Engine") as err:
        model_build.check_runtime(spec)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_te(), reason="megatron's cpu_offloading and HybridDeviceOptimizer "
                    "need a CUDA GPU with Transformer Engine")
@pytest.mark.parametrize("sets", [["parallel.offload_layers=1"],
                                  ["parallel.optimizer_offload=0.5"]])
def test_gpu_offload_trains_like_without(sets, reference, tmp_path):
    spec, _single_dir, _single = reference
    base = [r["loss"] for r in train_records(spec, tmp_path / "base", 1, ["train.precision=fp32"])]
    losses = [r["loss"] for r in train_records(spec, tmp_path / "off", 1,
                                               ["train.precision=fp32", *sets])]
    assert _max_diff(losses, base) < 1e-4


# ----------------------------------------------------------------------------------------------
# gradients in the parameters' precision (parallel.grad_reduce_fp32=false)


BF16_STEPS = 4


def _bf16_losses(store: Path, grad_reduce_fp32: bool) -> tuple[list[float], Any]:
    """BF16_STEPS steps of the module's shape in bf16 through the loop's own functions (one process,
    megatron's parallel state already up); the losses and the built model."""
    from scaleforge.pretrain import loop, model_build

    spec = load_runspec(_spec(store.parent, store), [
        "train.precision=bf16", "train.global_batch=4", f"train.steps={BF16_STEPS}",
        f"parallel.grad_reduce_fp32={str(grad_reduce_fp32).lower()}"])
    train_sampler, _val = loop.open_samplers(spec)
    built = model_build.build(spec)
    losses = [loop.train_step(built, spec, loop._rows(train_sampler, spec, step), step)[0]
              / spec.grad_accum for step in range(BF16_STEPS)]
    return losses, built


def test_bf16_gradients_reach_megatron(tmp_path, tiny_store):
    """Real megatron, one process, bf16 on CPU: the flag sets megatron's gradient buffer dtype (and
    the Megatron-FSDP config), the default keeps fp32, and both train to nearby losses."""
    import torch

    from scaleforge.parallel.setup import init_distributed, shutdown
    from scaleforge.pretrain import model_build

    spec = load_runspec(_spec(tmp_path, tiny_store), ["train.precision=bf16"])
    for shard in ("optimizer", "full"):
        ddp = model_build.ddp_config(apply_overrides(spec, [
            f"parallel.shard={shard}", "parallel.dp=2", "parallel.grad_reduce_fp32=false"]))
        assert ddp.grad_reduce_in_fp32 is False and ddp.use_megatron_fsdp == (shard == "full")
    assert model_build.ddp_config(spec).grad_reduce_in_fp32 is True  # the default
    init_distributed(spec)
    try:
        runs = {flag: _bf16_losses(tiny_store, flag) for flag in (True, False)}
    finally:
        shutdown()
    for flag, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        built = runs[flag][1]
        assert built.ddp.ddp_config.grad_reduce_in_fp32 is flag
        assert [buffer.grad_dtype for buffer in built.ddp.buffers] == [dtype]
        assert {p.main_grad.dtype for p in built.model.parameters()} == {dtype}
        assert {p.dtype for p in built.model.parameters()} == {torch.bfloat16}
    fp32_grads, bf16_grads = runs[True][0], runs[False][0]
    assert bf16_grads[0] == fp32_grads[0]  # the same weights and batch before any update
    # bf16 rounding of the two accumulated micro-batches' gradients changes the arithmetic (the
    # updates differ: measured at most 6.3e-5, at step 3), and only a little
    assert bf16_grads[1:] != fp32_grads[1:]
    assert _max_diff(bf16_grads, fp32_grads) < 1e-2, (bf16_grads, fp32_grads)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="bf16 gradient reduction over NCCL needs a CUDA GPU")
def test_bf16_gradients_train_like_fp32_on_gpu(reference, tmp_path):
    spec, _single_dir, _single = reference
    fp32 = [r["loss"] for r in train_records(spec, tmp_path / "fp32", 1, ["train.precision=bf16"])]
    bf16 = [r["loss"] for r in train_records(spec, tmp_path / "bf16", 1, [
        "train.precision=bf16", "parallel.grad_reduce_fp32=false"])]
    assert fp32[0] == bf16[0]
    assert _max_diff(bf16, fp32) < 0.05


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(shard="zero3"), "parallel.shard must be one of none, optimizer, grads, full"),
    (dict(activation_offload=1.5), r"parallel.activation_offload must be a fraction in \[0, 1\]"),
    (dict(optimizer_offload=-0.1), r"parallel.optimizer_offload must be a fraction in \[0, 1\]"),
    (dict(offload_layers=1, pp=2), "offload_layers needs parallel.pp=1"),
    (dict(offload_layers=1, recompute="full"), "offload_layers needs parallel.recompute=none"),
    (dict(activation_offload=0.5, recompute="selective"), "needs parallel.recompute=none"),
    (dict(optimizer_offload=0.5, shard="none"), "needs a sharded optimizer"),
])
def test_bad_layout_fields_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        ParallelSpec(**kwargs)
    assert "\n" not in str(err.value)


def test_old_distributed_optimizer_key_names_the_new_one():
    with pytest.raises(ConfigError, match="replaced by parallel.shard"):
        apply_overrides(RunSpec(), ["parallel.distributed_optimizer=true"])
    from scaleforge.config import from_dict

    with pytest.raises(ConfigError, match="parallel.distributed_optimizer was replaced by "
                                          "parallel.shard"):
        from_dict(RunSpec, {"parallel": {"distributed_optimizer": False}})


def test_sharding_beyond_the_optimizer_needs_several_ranks(tmp_path, tiny_store):
    spec = load_runspec(_spec(tmp_path, tiny_store), ["parallel.shard=full"])
    with pytest.raises(LayoutError, match="parallel.shard=full shards over data-parallel ranks"):
        check_layout(spec)
    check_layout(apply_overrides(spec, ["parallel.dp=2"]))  # two ranks: fine
    with pytest.raises(LayoutError, match="runs here with tp and dp only, not with pp=2"):
        check_layout(apply_overrides(spec, ["parallel.dp=2", "parallel.pp=2"]))
    with pytest.raises(LayoutError, match="activation offload needs parallel.pp=1"):
        check_layout(apply_overrides(spec, ["parallel.shard=optimizer", "parallel.pp=2",
                                            "parallel.activation_offload=0.5"]))
    # through the command: one line on stderr, non-zero exit, no run directory
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "scaleforge.cli", "train", str(_spec(tmp_path, tiny_store)),
         "--out", str(out), "--set", "parallel.shard=grads"],
        env=rank_env(1), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "parallel.shard=grads" in proc.stderr
    assert not out.exists()
