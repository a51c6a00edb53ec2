"""Layout-independent weight initialisation for megatron models, driven by each family's rules.

Every parameter is drawn in full from its own generator, seeded by the run seed and the parameter's
GLOBAL name (layer numbers counted over the whole model, not the pipeline stage; expert indices
counted over all experts, not this expert-parallel rank's), and then cut into this rank's
tensor-parallel shard with megatron's partition attributes (`partition_dim`) and the family's fused
parts. The same seed therefore gives the same weights under every TP/PP/EP/DP layout, which is what
lets a 2-rank run reproduce the 1-rank losses.

A family says what each tensor gets with a rule `rule(global_name, param) -> Init`; `gpt_rule` is
the GPT one (norm gains 1, residual output projections scaled down, the rest normal).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"(^|\.)local_experts\.(\d+)\.")

# Output projections of each residual branch: normal(0, std / sqrt(2 * layers)) (GPT-2, Megatron).
_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")


@dataclass(frozen=True)
class Init:
    """How one parameter is drawn (in full, before sharding)."""

    kind: str
    """`normal` (std), `ones`, `zeros`, or `draw` (the `draw` function)."""
    std: float = 0.0
    """Standard deviation of `normal`."""
    draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor] | None = None
    """`draw(full_shape, generator)`: the full fp32 tensor, for family-specific distributions."""
    parts: tuple[int, ...] = ()
    """Sizes, along the partition dimension, of the fused parts of the full tensor (SwiGLU fc1:
    (ffn, ffn)); each part is cut over tp separately and rank r keeps [part0_r; part1_r; ...]."""


Rule = Callable[[str, torch.nn.Parameter], Init]


def gpt_rule(*, std: float, layers: int, gated: bool) -> Rule:
    """GPT init: 1-D tensors (norm gains; the models have no biases) 1, residual output projections
    normal(0, std / sqrt(2 layers)), the rest normal(0, std); a gated fc1 is [gate; up]."""
    out_std = std / math.sqrt(2.0 * layers)

    def rule(name: str, param: torch.nn.Parameter) -> Init:
        if param.dim() == 1:
            return Init("ones")
        if name.endswith(_RESIDUAL_OUT):
            return Init("normal", out_std)
        if gated and name.endswith("linear_fc1.weight"):
            # each rank holds [gate_r; up_r] (megatron's local MLP says so with stride 2; TE does not)
            half = _full_shape(param)[param.partition_dim if _tp(param) else 0] // 2
            return Init("normal", std, parts=(half, half))
        return Init("normal", std)

    return rule


def global_name(model: torch.nn.Module, name: str, tied: bool) -> str:
    """Name of a parameter in the unsplit, single-stage, single-expert-rank model."""
    if tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    local_name = name  # this stage's module path (layer indices local), to look modules up
    match = _LAYER_RE.search(name)
    if match:
        layers = model.decoder.layers
        number = layers[int(match.group(2))].layer_number - 1  # megatron's is 1-based and global
        name = name[: match.start(2)] + str(number) + name[match.end(2):]
    match = _EXPERT_RE.search(name)
    if match:
        from megatron.core import parallel_state

        local = int(match.group(2))
        # the expert list's path on THIS stage: with pp > 1 the global layer number just put into
        # `name` is not a local index (PP=2 stage 1: "decoder.layers.1" has no module)
        local_match = _EXPERT_RE.search(local_name)
        per_rank = _local_experts(model, local_name[: local_match.start(2)])
        index = parallel_state.get_expert_model_parallel_rank() * per_rank + local
        name = name[: match.start(2)] + str(index) + name[match.end(2):]
    return name


def _local_experts(model: torch.nn.Module, prefix: str) -> int:
    module = model.get_submodule(prefix.rstrip("."))
    return len(module)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _tp(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _tp_group_size(param: torch.Tensor) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group that splits `param` (experts: expert TP)."""
    from megatron.core import parallel_state

    if not getattr(param, "allreduce", True):  # megatron marks expert parameters allreduce=False
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    if _tp(param):
        shape[param.partition_dim] *= _tp_group_size(param)[1]
    return shape


def shard(full: torch.Tensor, param: torch.Tensor, init: Init) -> torch.Tensor:
    """This rank's piece of `full` (each fused part cut over tp, the pieces concatenated)."""
    if not _tp(param):
        return full
    rank, size = _tp_group_size(param)
    if size == 1:
        return full
    dim = param.partition_dim
    parts = torch.split(full, list(init.parts), dim=dim) if init.parts else (full,)
    return torch.cat([part.chunk(size, dim=dim)[rank] for part in parts], dim=dim)


@torch.no_grad()
def init_params(model: torch.nn.Module, *, seed: int, rule: Rule, tied: bool) -> None:
    """Initialise `model` in place by `rule`, drawn in full from (seed, global name), then sharded."""
    for name, param in model.named_parameters():
        key = global_name(model, name, tied)
        init = rule(key, param)
        if init.kind == "ones":
            param.fill_(1.0)
            continue
        if init.kind == "zeros":
            param.zero_()
            continue
        shape = _full_shape(param)
        if init.kind == "normal":
            full = torch.empty(shape, dtype=torch.float32)
            full.normal_(0.0, init.std, generator=_generator(seed, key))
        elif init.kind == "draw":
            full = init.draw(tuple(shape), _generator(seed, key)).to(torch.float32)
        else:
            raise ValueError(f"unknown init kind {init.kind!r} for {key}")
        param.copy_(shard(full, param, init).to(param.dtype))
