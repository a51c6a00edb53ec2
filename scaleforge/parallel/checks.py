"""Torch-free checks that a parallel layout fits a model and a world size, before anything launches.

`--dry-run`, the planner and the trainer call `check_layout`; each failure is one LayoutError line
that says what to change.
"""

from __future__ import annotations

from typing import Any

from scaleforge.errors import LayoutError


def check_layout(spec: Any, world_size: int | None = None) -> None:
    """Raise LayoutError if `spec.parallel` cannot run `spec.model` (on `world_size` ranks if given)."""
    par, model, train = spec.parallel, spec.model, spec.train
    if world_size is not None and world_size != par.world_size:
        raise LayoutError(
            f"world size {world_size} != parallel.tp x parallel.pp x parallel.dp = "
            f"{par.tp} x {par.pp} x {par.dp} = {par.world_size}; launch {par.world_size} ranks "
            "or change the layout"
        )
    for field, size, axis, advice in (
        ("heads", par.tp, "tp", "pick a tp that divides it"),
        ("kv_heads", par.tp, "tp", "pick a tp that divides it"),
        ("ffn_hidden", par.tp, "tp", "pick a tp that divides it"),
        ("vocab_size", par.tp, "tp", "round the vocabulary up to a multiple of tp"),
        ("layers", par.pp, "pp", "pick a pp that divides the layer count"),
    ):
        value = getattr(model, field, None)
        if value is not None and value % size:
            raise LayoutError(
                f"parallel.{axis}={size} does not divide model.{field}={value}; {advice}"
            )
    if par.sp and par.tp == 1:
        raise LayoutError("parallel.sp=true needs parallel.tp > 1; set parallel.sp=false")
    if par.sp and spec.data.seq_len % par.tp:
        raise LayoutError(
            f"sequence parallelism splits data.seq_len={spec.data.seq_len} over "
            f"parallel.tp={par.tp}; pick a seq_len divisible by tp"
        )
    per_step = train.micro_batch * par.dp
    if train.global_batch % per_step:
        raise LayoutError(
            f"train.global_batch={train.global_batch} is not divisible by train.micro_batch x "
            f"parallel.dp = {train.micro_batch} x {par.dp}; change the batch or the layout"
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
