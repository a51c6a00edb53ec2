"""Torch-free checks that a parallel layout fits a model and a world size, before anything launches.

`--dry-run`, the planner and the trainer call `check_layout`; each failure is one LayoutError line
that says what to change.
"""

from __future__ import annotations

from typing import Any

from scaleforge.errors import LayoutError


def check_layout(spec: Any, world_size: int | None = None) -> None:
    """Raise LayoutError if `spec.parallel` cannot run `spec.model` (on `world_size` ranks if given)."""
    par, train = spec.parallel, spec.train
    if world_size is not None and world_size != par.world_size:
        raise LayoutError(
            f"world size {world_size} != parallel.tp x parallel.pp x parallel.dp = "
            f"{par.tp} x {par.pp} x {par.dp} = {par.world_size}; launch {par.world_size} ranks "
            "or change the layout"
        )
    check_shape(spec)
    if par.ep > 1 and par.dp % par.ep:
        raise LayoutError(
            f"parallel.ep={par.ep} must divide parallel.dp={par.dp} (experts are sharded inside the "
            "data-parallel ranks); pick an ep that divides dp, or launch more ranks"
        )
    if par.shard in ("grads", "full") and par.dp == 1:
        raise LayoutError(
            f"parallel.shard={par.shard} shards over data-parallel ranks but parallel.dp=1; "
            "launch more ranks (--nproc) or set parallel.shard=optimizer"
        )
    if par.shard in ("grads", "full") and (par.pp > 1 or par.ep > 1):
        raise LayoutError(
            f"parallel.shard={par.shard} (Megatron-FSDP) runs here with tp and dp only, not with "
            f"pp={par.pp} or ep={par.ep}; set parallel.shard=optimizer or pp=ep=1"
        )
    if (par.activation_offload or par.offload_layers) and par.pp > 1:
        raise LayoutError(
            f"activation offload needs parallel.pp=1 (got pp={par.pp}): it keeps one micro-batch's "
            "layers in order on the host; set pp=1 or turn the offload off"
        )
    per_step = train.micro_batch * par.dp
    if train.global_batch % per_step:
        raise LayoutError(
            f"train.global_batch={train.global_batch} is not divisible by train.micro_batch x "
            f"parallel.dp = {train.micro_batch} x {par.dp}; change the batch or the layout"
        )


def check_shape(spec: Any) -> None:
    """The checks that do not depend on dp: each parallel axis divides what it splits."""
    par, model = spec.parallel, spec.model
    rows = model.divisibility(spec.data.seq_len)
    if par.ep > 1 and not any(row.axis == "ep" for row in rows):
        raise LayoutError(
            f"parallel.ep={par.ep} but model.arch={model.arch} has no experts to shard; "
            "set parallel.ep=1"
        )
    # the family says which of its fields each parallel axis splits (arch/common/family.py)
    for row in rows:
        size = getattr(par, row.axis)
        if row.value % size:
            advice = row.advice or f"pick a {row.axis} that divides it"
            raise LayoutError(
                f"parallel.{row.axis}={size} does not divide {row.field}={row.value}; {advice}"
            )
    if par.sp and par.tp == 1:
        raise LayoutError("parallel.sp=true needs parallel.tp > 1; set parallel.sp=false")
    if par.sp and spec.data.seq_len % par.tp:
        raise LayoutError(
            f"sequence parallelism splits data.seq_len={spec.data.seq_len} over "
            f"parallel.tp={par.tp}; pick a seq_len divisible by tp"
        )


def dp_for_world(spec: Any, nproc: int) -> int:
    """The data-parallel size that `nproc` ranks give under the spec's tp and pp."""
    model_parallel = spec.parallel.tp * spec.parallel.pp
    if nproc % model_parallel:
        raise LayoutError(
            f"--nproc {nproc} is not divisible by parallel.tp x parallel.pp = "
            f"{spec.parallel.tp} x {spec.parallel.pp}; use a multiple of {model_parallel}"
        )
    return nproc // model_parallel
