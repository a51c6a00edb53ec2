"""Megatron-FSDP (parallel.shard grads | full) in the checkpoint format of every other layout.

megatron's optimizer refuses every model-space format under Megatron-FSDP ("sharding_type ... is
not supported with Megatron FSDP", distrib_optimizer.py:1230; only its own DCP `fsdp_dtensor`).
To keep one checkpoint format for every layout, the DTensor parameters and their Adam states are
gathered over the data-parallel ranks (megatron's `gather_uneven_dtensor_to_full_tensor`: the
shards are uneven) into the tensors a DDP rank holds, and saved under the same keys; a load reads
those and keeps this rank's slice. A checkpoint therefore resumes across shard levels and DP sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaleforge.pretrain.optimizer_state import (
    chained_optimizers,
    dist_load,
    inner_optimizers,
    set_optimizer_step,
    sharded_leaves,
    substitute_missing,
)


FSDP_STATES = ("exp_avg", "exp_avg_sq")
"""Adam states gathered per parameter; `param` (the fp32 master) too where it is a separate copy."""


def is_fsdp(optimizer: Any) -> bool:
    """Whether the optimizer runs under Megatron-FSDP (parallel.shard grads or full)."""
    config = getattr(chained_optimizers(optimizer)[0], "ddp_config", None)
    return bool(getattr(config, "use_megatron_fsdp", False))


def _shard_dims(dtensor: Any) -> list:
    """(process group, tensor dim) of each mesh dimension that shards `dtensor`."""
    from torch.distributed.tensor import Shard

    mesh = dtensor.device_mesh
    return [(mesh.get_group(i), place.dim) for i, place in enumerate(dtensor.placements)
            if isinstance(place, Shard)]


def _sizes(local: torch.Tensor, group: Any, dim: int) -> list[int]:
    sizes: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, int(local.shape[dim]), group=group)
    return sizes


def _full(tensor: Any) -> torch.Tensor:
    """A DTensor gathered on every rank (a collective), a plain tensor as is.

    Megatron-FSDP's shards are uneven (a rank may hold none of a parameter) and lie in rank order
    (its `gather_and_compute_chunk_metadata`); gloo's all_gather needs equal sizes, so each shard is
    padded to the largest and cut after the gather."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.detach()
    full = tensor.to_local().detach()
    for group, dim in _shard_dims(tensor):
        sizes = _sizes(full, group, dim)
        shape = list(full.shape)
        shape[dim] = max(sizes)
        padded = full.new_zeros(shape)
        padded.narrow(dim, 0, full.shape[dim]).copy_(full)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        full = torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, sizes)], dim)
    return full


def _local_slice(dtensor: Any, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` for an (unevenly) sharded DTensor (a collective)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(dtensor, DTensor):
        return full
    local = dtensor.to_local()
    for group, dim in _shard_dims(dtensor):
        sizes = _sizes(local, group, dim)
        rank = dist.get_rank(group)
        full = full.narrow(dim, sum(sizes[:rank]), sizes[rank])
    return full


_MEGATRON_PARAM_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride",
                         "sequence_parallel", "shared", "shared_embedding", "allreduce",
                         "is_embedding_or_output_parameter")


class plain_params:
    """Within: every DTensor parameter of `model` is replaced by its gathered plain tensor, so
    megatron's `sharded_state_dict` describes it as under DDP; yields {id(plain): dtensor} (empty
    without Megatron-FSDP). On leaving, `writeback()` copies plain tensors back into the shards."""

    def __init__(self, model: Any, optimizer: Any):
        self.model, self.swaps, self.plain, self.fsdp = model, [], {}, []
        # Megatron-FSDP swaps its DTensor shards for gathered "raw" parameters around forward and
        # backward (megatron_fsdp.py:1215-1245); the shards are the ones the optimizer updates
        for chunk in getattr(chained_optimizers(optimizer)[0], "model_chunks", ()):
            fsdp = getattr(chunk, "module", None)
            if hasattr(fsdp, "_replace_param_with_distributed_if_needed"):
                fsdp._replace_param_with_distributed_if_needed()
                self.fsdp.append(fsdp)

    def __enter__(self) -> dict:
        from torch.distributed.tensor import DTensor

        for prefix, module in self.model.named_modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor):
                    plain = torch.nn.Parameter(_full(param), requires_grad=param.requires_grad)
                    for attr in _MEGATRON_PARAM_ATTRS:
                        if hasattr(param, attr):
                            setattr(plain, attr, getattr(param, attr))
                    module._parameters[name] = plain
                    self.swaps.append((module, f"{prefix}.{name}" if prefix else name, param, plain))
                    self.plain[id(plain)] = param
        return self.plain

    def writeback(self, loaded: dict) -> None:
        """Copy this rank's slice of each loaded weight (by state-dict name) into its shard."""
        with torch.no_grad():
            for _module, qualified, param, _plain in self.swaps:
                if qualified in loaded:  # a tied output weight is stored once, as the embedding
                    param.to_local().copy_(_local_slice(param, loaded[qualified]))
        for fsdp in self.fsdp:  # the shards are the optimizer's; the forward gathers the model's
            fsdp.install_optimized_model_weights()

    def __exit__(self, *exc) -> None:
        for module, qualified, param, _plain in self.swaps:
            module._parameters[qualified.rpartition(".")[2]] = param


def _main_states(optimizer: Any, param: Any) -> dict:
    """{param (the fp32 master, when separate), exp_avg, exp_avg_sq} of a model parameter."""
    opt = chained_optimizers(optimizer)[0]
    try:
        states = dict(opt._get_main_param_and_optimizer_states(param))
    except (KeyError, AttributeError):
        states = {"param": param, **opt.optimizer.state.get(param, {})}
    if states.get("param") is param:
        states.pop("param")  # fp32: the weight is the master; nothing more to save
    for name in FSDP_STATES:
        # a rank whose shard of the parameter is empty has no Adam state for it; zeros keep the
        # ranks' collectives in step (measured: the gathers otherwise hang)
        if name not in states:
            states[name] = torch.zeros_like(states.get("param", param))
    states.pop("step", None)
    return states


def fsdp_optimizer_leaves(optimizer: Any, model_sd: dict, plain: dict, *, loading: bool,
                           names: tuple = ()) -> dict:
    """{`optimizer/<path>`: ShardedTensor} of the gathered Adam states under model-space keys
    (`optimizer.state.<name>.<model key>`), in the path order every rank shares."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    out, done = {}, {}
    for path, leaf in sorted(sharded_leaves(model_sd).items()):
        dtensor = plain.get(id(leaf.data))
        if dtensor is None:
            continue
        if id(dtensor) not in done:
            states = _main_states(optimizer, dtensor)
            done[id(dtensor)] = {
                name: (torch.empty_like(leaf.data) if loading else _full(states[name]))
                for name in (names or states)
            }
        for name, tensor in done[id(dtensor)].items():
            out[f"/optimizer{path}/{name}"] = make_sharded_optimizer_tensor(
                leaf, tensor, f"optimizer.state.{name}")
    return out


def load_fsdp(path: Path, model: Any, optimizer: Any, state: dict) -> None:
    saved_states = set(state["optimizer_states"])
    swap = plain_params(model, optimizer)
    with swap as plain:
        model_sd = model.sharded_state_dict()
        separate_master = any("param" in _main_states(optimizer, p) for p in plain.values())
        names = (("param",) if separate_master else ()) + FSDP_STATES
        request = fsdp_optimizer_leaves(optimizer, model_sd, plain, loading=True, names=names)
        # the load rewrites the state dicts in place: note which parameter each path is first
        param_of = {path: plain[id(leaf.data)] for path, leaf in sharded_leaves(model_sd).items()
                    if id(leaf.data) in plain}
        from_model = substitute_missing(request, saved_states, path)
        loaded = dist_load(path, {"model": model_sd, "optimizer": request})
        swap.writeback(loaded["model"])
        tensors = loaded["optimizer"]
        if from_model:
            tensors.update(dist_load(path, from_model))
        # each parameter's states, in the shared path order: the slices are collectives
        by_param: dict = {}
        for key in sorted(tensors):
            param_path, _, name = key.rpartition("/")
            leaf_path = param_path[len("/optimizer"):]
            by_param.setdefault(leaf_path, {})[name] = tensors[key]
        with torch.no_grad():
            for leaf_path in sorted(by_param):
                param = param_of[leaf_path]
                states = _main_states(optimizer, param)
                for name, full in by_param[leaf_path].items():
                    local = _local_slice(param, full)
                    target = states[name]
                    (target.to_local() if hasattr(target, "to_local") else target).copy_(local)
    set_optimizer_step(optimizer, state["optimizer_step"])
    for inner in inner_optimizers(optimizer):
        for param in list(inner.state):
            if hasattr(param, "to_local") and param.to_local().numel() == 0:
                # no shard here: as in a fresh run, no Adam state (else its step would stay behind)
                del inner.state[param]
