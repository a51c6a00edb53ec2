"""Layout-independent weight initialisation for megatron models.

Every parameter is drawn in full from its own generator, seeded by the run seed and the parameter's
GLOBAL name (layer numbers counted over the whole model, not the pipeline stage), and then cut into
this rank's tensor-parallel shard with megatron's own partition attributes (`partition_dim`,
`partition_stride`). The same seed therefore gives the same weights under every TP/PP/DP layout,
which is what lets a 2-rank run reproduce the 1-rank losses.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")

# Output projections of each residual branch: normal(0, std / sqrt(2 * layers)) (GPT-2, Megatron).
_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")


def global_name(model: torch.nn.Module, name: str, tied: bool) -> str:
    """Name of a parameter in the unsplit, single-stage model."""
    if tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    match = _LAYER_RE.search(name)
    if match:
        layers = model.decoder.layers
        number = layers[int(match.group(2))].layer_number - 1  # megatron's is 1-based and global
        name = name[: match.start(2)] + str(number) + name[match.end(2):]
    return name


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _shard(
    full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int, stride: int
) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    chunks = torch.split(full, full.shape[dim] // (stride * tp_size), dim=dim)
    # stride 2 (SwiGLU fc1): the full [gate; up] weight gives rank r [gate_r; up_r]
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


@torch.no_grad()
def init_params(model: torch.nn.Module, *, seed: int, std: float, layers: int, tied: bool) -> None:
    """Initialise `model` in place: norms to 1, residual outputs scaled, the rest normal(0, std)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out_std = std / math.sqrt(2.0 * layers)
    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    for name, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm/LayerNorm gains (the model has no biases)
            param.fill_(1.0)
            continue
        full_shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            full_shape[param.partition_dim] *= tp_size
        key = global_name(model, name, tied)
        sigma = out_std if name.endswith(_RESIDUAL_OUT) else std
        full = torch.empty(full_shape, dtype=torch.float32)
        full.normal_(0.0, sigma, generator=_generator(seed, key))
        stride = getattr(param, "partition_stride", 1)
        if gated and name.endswith("linear_fc1.weight"):
            stride = 2  # each rank holds [gate_r; up_r] (megatron's local MLP says so; TE does not)
        param.copy_(_shard(full, param, tp_rank, tp_size, stride).to(param.dtype))
