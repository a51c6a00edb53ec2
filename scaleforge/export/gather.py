"""The run's last complete checkpoint as one single-process model (TP = PP = EP = DP = 1).

megatron's dist checkpoints store every tensor under its global key and shape (layers numbered over
the whole model, experts over all experts, fused parts split), whatever layout wrote them, so a
checkpoint from TP=2, PP=2 or EP=2 loads into the family's own model built in one process, exactly
as a resume into another layout does (`pretrain.grow.read_model_tensors` / `load_into`). Every
tensor of that model must come from the checkpoint: a key left at its initialisation is an error.
The model is built in fp32 whatever precision trained it (on the GPU where there is one); its
tensors are handed on as CPU copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from scaleforge.errors import CheckpointError


def single_layout(spec: Any) -> Any:
    """`spec` with the one-process layout (and fp32): what the export builds."""
    from scaleforge.config import ParallelSpec

    train = dataclasses.replace(spec.train, precision="fp32")
    return dataclasses.replace(spec, parallel=ParallelSpec(), train=train)


@contextmanager
def one_process(spec: Any) -> Iterator[None]:
    """megatron's parallel state for a world of one (gloo), torn down after unless it existed."""
    from megatron.core import parallel_state

    from scaleforge.parallel.setup import init_distributed, shutdown

    if parallel_state.model_parallel_is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise CheckpointError("export runs in one process; start it without torchrun")
        yield
        return
    init_distributed(single_layout(spec), environ={})
    try:
        yield
    finally:
        shutdown()


def load_model(spec: Any, path: Path) -> Any:
    """The family's single-process model with the checkpoint `path`'s weights (inside one_process)."""
    from scaleforge.arch.registry import builder_module
    from scaleforge.pretrain import checkpoint
    from scaleforge.pretrain.grow import sharded_tensors, load_into, read_model_tensors
    from scaleforge.pretrain.model_build import runtime_config

    checkpoint.verify(path)
    one = single_layout(spec)
    model = builder_module(spec.model.arch).build_model(
        spec.model, seq_len=spec.data.seq_len, seed=spec.seed, runtime=runtime_config(one))
    tensors = read_model_tensors(path)
    loaded = set(load_into(model, tensors))
    missing = sorted({leaf.key for leaf in sharded_tensors(model.sharded_state_dict())} - loaded)
    if missing:
        raise CheckpointError(f"{path} lacks model tensor {missing[0]} ({len(missing)} missing); "
                              "it was not written by this run's model")
    model.eval()
    return model


def full_state(model: Any) -> dict[str, torch.Tensor]:
    """{name: full fp32 CPU tensor} of a single-process model (megatron's extra states dropped)."""
    return {name: value.detach().to("cpu", torch.float32).contiguous()
            for name, value in model.state_dict().items()
            if isinstance(value, torch.Tensor) and not name.endswith("_extra_state")}
