"""The Mamba-2 mixer for megatron's MambaLayer, in pure PyTorch with megatron's parallel layers.

megatron's own MambaMixer needs triton, mamba_ssm, causal-conv1d and Transformer Engine, and asserts
groups % tp == 0; this one runs anywhere, with the SSD scan of `ssd.py` (mamba_ssm's Triton kernel
where it imports on a GPU). Data flow (mamba_ssm's Mamba2, methods.md section 4):

    z, x, dt = in_proj(u)          column-parallel, parts [z, x, dt] each cut over tp (heads)
    B, C     = bc_proj(u)          column-parallel [B, C] when tp divides groups, else replicated
    x, B, C  = silu(causal depthwise conv(x, B, C))
    y        = SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D x
    y        = RMSNormGated(y, z) = rmsnorm(y silu(z)) w, over groups of Ed / G channels
    out      = out_proj(y)         row-parallel

mamba_ssm fuses [z, x, B, C, dt] into one in_proj (and x, B, C into one conv); here B and C have
their own projection and conv so that they can be replicated when tp does not divide the groups
(G = 1 under tp = 2): the module names and full shapes are then the same under every tp, so the
layout-independent init and checkpoint re-sharding work; the parameter count is the same.

Replicated B, C: every rank computes them from the full (sequence-gathered) input; their values go
through megatron's `copy_to_tensor_model_parallel_region` after the conv (identity forward,
all-reduce backward), so the gradients of bc_proj and conv_bc are the full sums, equal on all ranks;
megatron counts such non-tensor-parallel parameters once in the grad norm.

Gated norm under tp: a norm group (Ed / G channels) spans ranks when tp does not divide G; the
per-head sums of squares are then all-reduced over tp (forward and backward), so tp = 2 equals
tp = 1 (tests/test_mamba.py). When tp divides G each rank's groups are whole and local.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from scaleforge.arch.mamba.ssd import mamba_chunk_scan


class _Replicated(torch.nn.Module):
    """A bias-free linear weight held in full on every tensor-parallel rank."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype,
                                                     device=device))


class _GatedNorm(torch.nn.Module):
    """The gain of RMSNormGated over this rank's Ed / tp channels (computed by the mixer)."""

    def __init__(self, channels: int, dtype: torch.dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels, dtype=dtype, device=device))


def _tp_param(param: torch.Tensor) -> None:
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)


class MambaMixer(MegatronModule):
    """Mamba-2 mixer: hidden [s, b, d] (s / tp under sequence parallelism) -> (out, None)."""

    def __init__(self, config, d_model: int, layer_number: int | None = None, pg_collection=None,
                 pp_layer_offset: int = 0, *, d_state: int, headdim: int, expand: int, groups: int,
                 d_conv: int, chunk_size: int, norm_eps: float):
        super().__init__(config)
        self.tp_group = pg_collection.tp
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        self.layer_number = layer_number
        self.d_state, self.headdim, self.d_conv, self.chunk_size = d_state, headdim, d_conv, chunk_size
        self.norm_eps = norm_eps
        d_inner = expand * d_model
        heads = d_inner // headdim
        if heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide the Mamba heads ({heads})")
        self.heads, self.groups, self.tp, self.rank = heads, groups, tp, rank
        self.heads_local = heads // tp
        self.d_inner_local = d_inner // tp
        self.bc_split = groups % tp == 0  # else B and C are replicated
        self.groups_local = groups // tp if self.bc_split else groups
        self.group_channels = d_inner // groups  # gated-norm group size Ed / G
        dtype = config.params_dtype

        self.in_proj = ColumnParallelLinear(
            d_model, 2 * d_inner + heads, config=config, init_method=config.init_method,
            bias=False, gather_output=False, tp_group=self.tp_group,
        )
        gn = groups * d_state
        # the rest lives where megatron put in_proj (GPU or CPU); no device logic of our own
        device = self.in_proj.weight.device
        if self.bc_split:
            self.bc_proj = ColumnParallelLinear(
                d_model, 2 * gn, config=config, init_method=config.init_method, bias=False,
                gather_output=False, tp_group=self.tp_group,
            )
        else:
            self.bc_proj = _Replicated(d_model, 2 * gn, dtype, device)
        bc_local = 2 * self.groups_local * d_state
        self.conv_x = torch.nn.Conv1d(self.d_inner_local, self.d_inner_local, d_conv,
                                      groups=self.d_inner_local, padding=d_conv - 1, dtype=dtype,
                                      device=device)
        self.conv_bc = torch.nn.Conv1d(bc_local, bc_local, d_conv, groups=bc_local,
                                       padding=d_conv - 1, dtype=dtype, device=device)
        # A_log and D stay fp32 under bf16 (as mamba_ssm and megatron's mixer): exp(A_log) and the
        # skip are precision-sensitive; megatron's optimizer keeps fp32 parameters as they are
        self.A_log = torch.nn.Parameter(torch.empty(self.heads_local, device=device))
        self.dt_bias = torch.nn.Parameter(torch.empty(self.heads_local, dtype=dtype, device=device))
        self.D = torch.nn.Parameter(torch.ones(self.heads_local, device=device))
        self.norm = _GatedNorm(self.d_inner_local, dtype, device)
        for p in (self.conv_x.weight, self.conv_x.bias, self.A_log, self.dt_bias, self.D,
                  self.norm.weight):
            _tp_param(p)
        if self.bc_split:
            _tp_param(self.conv_bc.weight)
            _tp_param(self.conv_bc.bias)
        self.out_proj = RowParallelLinear(
            d_inner, d_model, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group,
        )
        # global head h reads group h // (heads / groups); index it in this rank's B, C
        first = rank * self.heads_local
        group = torch.arange(first, first + self.heads_local, device=device) // (heads // groups)
        local_group = group - (rank * self.groups_local if self.bc_split else 0)
        self.register_buffer("head_group", local_group, persistent=False)
        # (heads, heads_local): 1 where global head h is in the group of local head i
        same = (torch.arange(heads, device=device) // (heads // groups))[:, None] == group[None, :]
        self.register_buffer("norm_groups", same.to(torch.float32), persistent=False)

    # ------------------------------------------------------------------------------------------

    def _conv(self, conv: torch.nn.Conv1d, t: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv + SiLU of [s, b, c]."""
        s = t.size(0)
        out = conv(t.permute(1, 2, 0))[..., :s]  # left padding d_conv - 1: causal
        return F.silu(out).permute(2, 0, 1)

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """rmsnorm(y silu(z)) w over groups of Ed / G channels, y and z [s, b, Ed / tp]."""
        s, b, _ = y.shape
        v = (y.float() * F.silu(z.float())).view(s, b, self.heads_local, self.headdim)
        per_head = v.pow(2).sum(-1)  # (s, b, heads_local)
        if self.bc_split:
            sums = per_head.view(s, b, self.groups_local, -1).sum(-1)
            sums = sums.repeat_interleave(self.heads_local // self.groups_local, dim=-1)
        else:
            # the group spans ranks: all heads' sums on every rank (all-reduce both ways)
            full = F.pad(per_head, (self.rank * self.heads_local,
                                    (self.tp - 1 - self.rank) * self.heads_local))
            full = copy_to_tensor_model_parallel_region(
                reduce_from_tensor_model_parallel_region(full, group=self.tp_group),
                group=self.tp_group)
            # the group sums as a matmul: its backward hands copy_to a contiguous gradient
            # (megatron's all-reduce works on `.contiguous()`, so the expanded gradient of a
            # view-sum would be all-reduced in a copy and dropped: D's grad was 37% off at tp=2)
            sums = full @ self.norm_groups
        rstd = torch.rsqrt(sums / self.group_channels + self.norm_eps)
        out = (v * rstd[..., None]).view(s, b, -1)
        return (out * self.norm.weight.float()).to(y.dtype)

    def forward(self, hidden_states: torch.Tensor, inference_context=None,
                packed_seq_params=None, **_unused):
        if inference_context is not None or packed_seq_params is not None:
            raise NotImplementedError("the Mamba mixer supports training only (no inference cache, "
                                      "no packed sequences)")
        zxdt, _ = self.in_proj(hidden_states)  # [s, b, (2 Ed + H) / tp]
        if self.bc_split:
            bc, _ = self.bc_proj(hidden_states)
            bc = self._conv(self.conv_bc, bc)
        else:
            full = hidden_states
            if self.config.sequence_parallel:
                # the gradient reaching here is already the full sum (copy_to below): split it
                full = gather_from_sequence_parallel_region(
                    full, tensor_parallel_output_grad=False, group=self.tp_group)
            bc = self._conv(self.conv_bc, F.linear(full, self.bc_proj.weight))
            bc = copy_to_tensor_model_parallel_region(bc, group=self.tp_group)
        z, x, dt = torch.split(zxdt, [self.d_inner_local, self.d_inner_local, self.heads_local],
                               dim=-1)
        x = self._conv(self.conv_x, x)
        s, b, _ = x.shape
        gn = self.groups_local * self.d_state
        B, C = torch.split(bc, [gn, gn], dim=-1)

        def heads(t, n):  # [s, b, k n] -> (b, s, k, n)
            return t.permute(1, 0, 2).reshape(b, s, -1, n)

        xh = heads(x, self.headdim)
        Bh = heads(B, self.d_state).index_select(2, self.head_group)
        Ch = heads(C, self.d_state).index_select(2, self.head_group)
        dt = F.softplus(dt.float() + self.dt_bias.float()).permute(1, 0, 2)  # (b, s, H / tp)
        A = -torch.exp(self.A_log.float())
        y = mamba_chunk_scan(xh, dt, A, Bh, Ch, self.chunk_size)
        y = (y.float() + xh.float() * self.D.float()[:, None]).to(xh.dtype)
        y = y.reshape(b, s, -1).permute(1, 0, 2)
        y = self._gated_norm(y, z)
        return self.out_proj(y)

    # ------------------------------------------------------------------------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Checkpoint tensors with global keys and shapes: fused parts split ([z, x, dt], [B, C])
        so that a checkpoint re-shards to any tp; replicated B, C tensors saved once."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        state: dict = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(
            state, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets, **groups)
        bc_axis = {"weight": 0, "bias": 0} if self.bc_split else {}
        for name, module in self.named_children():
            key = f"{prefix}{name}."
            if name == "in_proj" or name == "out_proj" or (name == "bc_proj" and self.bc_split):
                out.update(sharded_state_dict_default(module, key, sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
            else:
                axis = {"conv_x": {"weight": 0, "bias": 0}, "norm": {"weight": 0},
                        "conv_bc": bc_axis, "bc_proj": {}}[name]
                out.update(make_sharded_tensors_for_checkpoint(
                    module.state_dict(prefix="", keep_vars=True), key, axis, sharded_offsets,
                    **groups))
        e, h, gn = self.d_inner_local, self.heads_local, self.groups_local * self.d_state
        out[f"{prefix}in_proj.weight"] = _split(out[f"{prefix}in_proj.weight"], [e, e, h],
                                                ["z", "x", "dt"])
        for key in ("bc_proj.weight", "conv_bc.weight", "conv_bc.bias"):
            out[f"{prefix}{key}"] = _split(out[f"{prefix}{key}"], [gn, gn], ["B", "C"])
        return out


def _split(tensor: ShardedTensor, sizes: list[int], names: list[str]) -> ShardedTensorFactory:
    """A factory saving `tensor`'s local parts along dim 0 as separate global tensors `key.name`
    (as megatron's MambaMixer does for its fused in_proj and conv)."""
    bare = tensor.without_data()

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = dataclasses.replace(bare, key=key, data=t, dtype=t.dtype, replica_id=replica_id,
                                    flattened_range=flattened_range)
        pieces, start = [], 0
        for size, name in zip(sizes, names):
            for piece in whole.narrow(0, start, size):
                piece.key = f"{piece.key}.{name}"
                pieces.append(piece)
            start += size
        return pieces

    @torch.no_grad()
    def merge(parts):
        return torch.cat(parts)

    return ShardedTensorFactory(tensor.key, tensor.data, build, merge, tensor.replica_id)
