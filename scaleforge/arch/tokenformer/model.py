"""TokenFormer as a megatron-core GPTModel whose projections are Pattention layers.

The builder half of the family contract (docs/families.md): `build_model`, `forward_step`,
`step_metrics`, and the growth rule's tensor half `grow_state`. megatron's GPTModel, TransformerBlock,
TransformerLayer and SelfAttention are used as they are (embedding, rotary on a fraction of the head
dims, core attention, pipeline cuts, tied output layer, loss); what differs sits in the layer spec:
- `linear_qkv`: three Pattentions (Q, K, V) whose outputs are laid out as megatron's fused QKV
  ([q_h, k_h, v_h] per head) for this rank's heads;
- `linear_proj` and the MLP: one Pattention each;
- the pre-norms are LayerNorms without parameters, the final LayerNorm has a gain and a bias.

Tensor parallelism shards every Pattention's parameter tokens (key and value tokens along n): rank r
scores the input against its n / tp key tokens, the squared score norms are summed over the ranks
(all-reduce forward and backward) so that GeLU(S sqrt(n) / ||S||) normalises over all n tokens
exactly, and the partial outputs Θ_r V_r are summed (all-reduce). Q, K, V then keep this rank's heads;
the output projection first gathers all heads. Every collective runs on a contiguous tensor (megatron's
own all-reduce reduces `input.contiguous()`, which loses a non-contiguous gradient: arch/mamba).
Sequence parallelism is not supported (parallel.sp is refused).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from scaleforge.arch.common.attention import core_attention
from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import Init, Rule, init_params
from scaleforge.arch.common.transformer import MEGATRON_DEFAULTS, gpt_model, keep
from scaleforge.arch.tokenformer.config import TokenFormerConfig
from scaleforge.errors import ConfigError


# ----------------------------------------------------------------------------------------------
# collectives (on contiguous copies)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


class _SumForward(torch.autograd.Function):
    """Sum over the tp group forward; the gradient passes as it is (megatron's reduce_from)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumBackward(torch.autograd.Function):
    """Identity forward; the gradient summed over the tp group (megatron's copy_to)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def _device(config: TransformerConfig):
    """Where megatron's own layers put their weights: the GPU unless initialised on the CPU."""
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


# ----------------------------------------------------------------------------------------------
# Pattention


class Pattention(MegatronModule):
    """O = GeLU(S sqrt(n_scale) / ||S||) V_P with S = X K_P^T, over this rank's n / tp tokens.

    Returns this rank's PARTIAL output (the sum over its tokens); the caller sums over tp."""

    def __init__(self, config: TransformerConfig, d_in: int, d_out: int, tokens: int,
                 scale_tokens: int):
        super().__init__(config=config)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.scale = math.sqrt(scale_tokens)
        local = tokens // self.tp
        dtype = config.params_dtype
        device = _device(config)
        self.key_tokens = torch.nn.Parameter(torch.empty(local, d_in, dtype=dtype, device=device))
        self.value_tokens = torch.nn.Parameter(torch.empty(local, d_out, dtype=dtype,
                                                           device=device))
        for param in (self.key_tokens, self.value_tokens):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            x = _SumBackward.apply(x, _tp_group())  # every rank's key tokens saw x
        scores = torch.matmul(x, self.key_tokens.t())
        sq = scores.float().pow(2).sum(-1, keepdim=True)
        if self.tp > 1:  # ||S|| over all n tokens: sum both ways
            sq = _SumBackward.apply(_SumForward.apply(sq, _tp_group()), _tp_group())
        norm = sq.sqrt().clamp_min(1e-12)  # torch's F.normalize, the reference's l2 norm
        theta = F.gelu(scores * (self.scale / norm).to(scores.dtype))
        return torch.matmul(theta, self.value_tokens)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Both token tables sharded along n (axis 0): a checkpoint re-shards to any tp."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"key_tokens": 0, "value_tokens": 0}, sharded_offsets,
            tp_group=_tp_group(), dp_cp_group=metadata["dp_cp_group"])


def _pattention(config: TransformerConfig, cfg: TokenFormerConfig, kind: str, d_in: int,
                d_out: int) -> Pattention:
    return Pattention(config, d_in, d_out, getattr(cfg, f"{kind}_tokens"), cfg.scale_tokens(kind))


class PattentionQKV(MegatronModule):
    """megatron's `linear_qkv`: Q, K and V Pattentions, [s, b, d] -> [s, b, (3 heads / tp) hd]
    laid out [q_h, k_h, v_h] per head of this rank."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 family: TokenFormerConfig, **_unused):
        super().__init__(config=config)
        d = family.hidden
        self.query = _pattention(config, family, "qkv", d, d)
        self.key = _pattention(config, family, "qkv", d, d)
        self.value = _pattention(config, family, "qkv", d, d)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads, self.head_dim = family.heads // self.tp, family.head_dim

    def forward(self, x: torch.Tensor):
        rank = parallel_state.get_tensor_model_parallel_rank()
        width = self.heads * self.head_dim
        parts = []
        for module in (self.query, self.key, self.value):
            out = module(x)
            if self.tp > 1:
                # all heads summed, then this rank's heads; the gradient of the slice covers
                # this rank's heads only, so it is summed over the ranks too
                out = _SumBackward.apply(_SumForward.apply(out, _tp_group()), _tp_group())
                out = out[..., rank * width:(rank + 1) * width]
            parts.append(out.reshape(*out.shape[:-1], self.heads, self.head_dim))
        mixed = torch.stack(parts, dim=-2)  # [s, b, heads, 3, hd]
        return mixed.reshape(*mixed.shape[:-3], 3 * width), None


class PattentionProj(MegatronModule):
    """megatron's `linear_proj`: this rank's heads [s, b, d / tp] -> [s, b, d] (all heads)."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 family: TokenFormerConfig, **_unused):
        super().__init__(config=config)
        self.proj = _pattention(config, family, "proj", family.hidden, family.hidden)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()

    def forward(self, x: torch.Tensor):
        if self.tp > 1:
            # all heads on every rank; backward splits the gradient, which the Pattention's input
            # sum has already made complete
            x = gather_from_tensor_model_parallel_region(x, group=_tp_group())
        out = self.proj(x)
        if self.tp > 1:
            out = _SumForward.apply(out, _tp_group())
        return out, None


class PattentionFFN(MegatronModule):
    """The FFN: one Pattention with n_ffn tokens, [s, b, d] -> [s, b, d]."""

    def __init__(self, config: TransformerConfig, *, family: TokenFormerConfig, **_unused):
        super().__init__(config=config)
        self.ffn = _pattention(config, family, "ffn", family.hidden, family.hidden)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()

    def forward(self, x: torch.Tensor, **_unused):
        out = self.ffn(x)
        if self.tp > 1:
            out = _SumForward.apply(out, _tp_group())
        return out, None


class NonParametricLayerNorm(torch.nn.Module):
    """LayerNorm without gain or bias (the pre-norms, `layernorm_nonparam`)."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **_unused):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), None, None, self.eps)


class FinalLayerNorm:
    """`torch.nn.LayerNorm` with gain and bias, built from a TransformerConfig (a spec entry)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype,
                                  device=_device(config))


# ----------------------------------------------------------------------------------------------
# the model


def transformer_config(cfg: TokenFormerConfig, runtime: dict[str, Any]) -> TransformerConfig:
    """megatron TransformerConfig of the shape `cfg` under `runtime` (layout, dtype, fusions)."""
    if runtime.get("sequence_parallel"):
        raise ConfigError("parallel.sp=true is not supported by model.arch=tokenformer; "
                          "set parallel.sp=false")
    return TransformerConfig(
        num_layers=cfg.layers,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.heads,
        num_query_groups=cfg.heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_tokens,
        normalization="LayerNorm",
        layernorm_epsilon=cfg.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        perform_initialization=True,
        init_method=keep,
        output_layer_init_method=keep,
        **MEGATRON_DEFAULTS,
        **runtime,
    )


def layer_spec(cfg: TokenFormerConfig, config: TransformerConfig) -> ModuleSpec:
    """The block spec: megatron's local GPT layer with Pattention projections and FFN."""
    layer = get_gpt_layer_local_spec(normalization="LayerNorm")
    attn = layer.submodules.self_attention
    attn.submodules.core_attention = core_attention(config.params_dtype)
    attn.submodules.linear_qkv = functools.partial(PattentionQKV, family=cfg)
    attn.submodules.linear_proj = ModuleSpec(module=PattentionProj, params={"family": cfg})
    attn.submodules.q_layernorm = None
    attn.submodules.k_layernorm = None
    layer.submodules.input_layernorm = NonParametricLayerNorm
    layer.submodules.pre_mlp_layernorm = NonParametricLayerNorm
    layer.submodules.mlp = ModuleSpec(module=PattentionFFN, params={"family": cfg})
    layer.submodules.sharded_state_dict_keys_map = {}
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=FinalLayerNorm),
    )


def tokenformer_rule(cfg: TokenFormerConfig) -> Rule:
    """Init (the reference's): key tokens normal(init_std), value tokens wang_init normal(2 /
    (layers sqrt(hidden))), the embedding normal(init_std), the final norm's gain 1 and bias 0."""
    value_std = 2.0 / (cfg.layers * math.sqrt(cfg.hidden))

    def rule(name: str, param: torch.nn.Parameter) -> Init:
        if name.endswith("value_tokens"):
            return Init("normal", value_std)
        if param.dim() == 1:
            return Init("zeros") if name.endswith("bias") else Init("ones")
        return Init("normal", cfg.init_std)

    return rule


def build_model(
    cfg: TokenFormerConfig, *, seq_len: int, seed: int, runtime: dict[str, Any]
) -> GPTModel:
    """This rank's pipeline stage of the model, initialised from `seed` independently of layout."""
    config = transformer_config(cfg, runtime)
    model = gpt_model(cfg, config, layer_spec(cfg, config), seq_len=seq_len,
                      rotary_percent=cfg.rotary_fraction)
    init_params(model, seed=seed, rule=tokenformer_rule(cfg), tied=cfg.tied_embeddings)
    return model



# ----------------------------------------------------------------------------------------------
# growth (pretrain/grow.py, docs/families.md "Growth")


def grow_state(old_cfg: TokenFormerConfig, new_cfg: TokenFormerConfig,
               old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Append parameter tokens: the old key tokens followed by zero key tokens (their scores are 0,
    GeLU(0) = 0, and the norm ||S|| is unchanged, so with the frozen scale every output is the
    same); the old value tokens fill the first rows and the appended value tokens keep the seed's
    draw (zero values too would give the new tokens zero gradient for ever). Everything else
    loads as it is."""
    out = {}
    for key, tensor in old.items():
        if key.endswith("key_tokens"):
            kind = ("ffn" if ".mlp." in key else "proj" if "linear_proj" in key else "qkv")
            n = getattr(new_cfg, f"{kind}_tokens")
            pad = torch.zeros(*tensor.shape[:-2], n - tensor.shape[-2], tensor.shape[-1],
                              dtype=tensor.dtype)
            out[key] = torch.cat([tensor, pad], dim=-2)
        else:
            out[key] = tensor  # value tokens: the first rows (pretrain/grow.py fills a prefix)
    return out


class TokenFormerBuilder(FamilyBuilder):
    """The builder half (arch/common/builder.py): the language model's step, no metrics, and the
    growth rule's tensor half (appended tokens fill the tensors' leading part)."""

    growth_fills_prefix = True
    build_model = staticmethod(build_model)
    grow_state = staticmethod(grow_state)
