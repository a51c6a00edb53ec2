"""Mamba-2 / hybrid stack as a megatron-core MambaModel with the family's own mixer.

The builder half of the family contract (docs/families.md): `build_model`, `forward_step`,
`step_metrics`. megatron's MambaModel, MambaStack (layer types from the pattern, pipeline cuts and
global layer numbers) and MambaLayer are used as they are; what differs:
- the mixer is `mixer.MambaMixer` (pure PyTorch + megatron's parallel layers; megatron's own needs
  triton, mamba_ssm and Transformer Engine);
- `_Stack` builds the final RMSNorm itself, because MambaStack hard-codes Transformer Engine's norm;
- `*` layers are megatron TransformerLayers with attention only (core attention from
  `arch.common.attention`: SDPA on CPU), `-` layers MLPLayers with the SwiGLU MLP; no positional
  embedding (as megatron's MambaModel and Nemotron-H: the Mamba layers carry position).
No parallel logic: the layout reaches this builder only as TransformerConfig fields (`runtime`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.mamba import MambaModel
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from scaleforge.arch.common.attention import core_attention
from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import Init, Rule, gpt_rule, init_params
from scaleforge.arch.common import moe as moe_layers
from scaleforge.arch.common.mlp import SwiGLUMLP
from scaleforge.arch.common.norm import RMSNorm
from scaleforge.arch.common.transformer import llama_fields
from scaleforge.arch.mamba.config import MambaConfig
from scaleforge.arch.mamba.mixer import MambaMixer


class _Stack(MambaStack):
    """MambaStack with the project's RMSNorm as final norm (megatron's is TENorm, GPU-only) and
    full activation recomputation, which megatron's MambaStack does not implement (it would ignore
    `recompute_granularity="full"` silently): each layer then keeps only its input."""

    def __init__(self, config: TransformerConfig, submodules: MambaStackSubmodules,
                 post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        if config.recompute_granularity == "full":
            for layer in self.layers:
                # an instance attribute: parameter names stay layers.N.*
                layer.forward = functools.partial(_recomputed, layer.forward)


def _recomputed(forward, hidden_states, attention_mask=None, **kwargs):
    """`forward` of one layer under megatron's activation checkpoint (recomputed in backward)."""
    if not torch.is_grad_enabled():
        return forward(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
    returns_tuple = []

    def run(hidden):
        out = forward(hidden_states=hidden, attention_mask=attention_mask, **kwargs)
        if isinstance(out, tuple):  # TransformerLayer: (hidden, context)
            returns_tuple.append(True)
            return out[0]
        return out

    out = tensor_parallel.checkpoint(run, False, hidden_states)
    return (out, None) if returns_tuple else out


def transformer_config(cfg: MambaConfig, runtime: dict[str, Any]) -> TransformerConfig:
    """megatron TransformerConfig of the shape `cfg` under `runtime` (layout, dtype, fusions)."""
    heads, kv_heads = cfg.heads, cfg.kv_heads
    if "attention" not in cfg.layer_names():
        # no `*` layer: megatron still checks num_attention_heads % tp, so give it tp heads
        # (unused) rather than refuse a tp that divides everything the stack splits
        heads = kv_heads = runtime.get("tensor_model_parallel_size", 1)
    moe: dict[str, Any] = {}
    if cfg.has_moe:  # the moe family's settings, for the same reasons (arch/common/moe.py)
        runtime = moe_layers.moe_runtime(runtime)
        moe = moe_layers.moe_fields(cfg)
    return TransformerConfig(
        **llama_fields(layers=cfg.layers, hidden=cfg.hidden, heads=heads, kv_heads=kv_heads,
                       head_dim=cfg.head_dim, ffn_hidden=cfg.ffn_hidden, norm_eps=cfg.norm_eps,
                       init_std=cfg.init_std),
        **moe,
        **runtime,
    )


def stack_spec(cfg: MambaConfig, config: TransformerConfig) -> ModuleSpec:
    """MambaStack spec: the mixer in MambaLayer, attention-only and MLP-only TransformerLayers."""
    mixer = ModuleSpec(module=MambaMixer, params=dict(
        d_state=cfg.d_state, headdim=cfg.headdim, expand=cfg.expand, groups=cfg.groups,
        d_conv=cfg.d_conv, chunk_size=cfg.chunk_size, norm_eps=cfg.norm_eps,
    ))
    mamba = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        # MambaLayer builds its norm as norm(config, hidden) without an eps: give it here
        norm=ModuleSpec(module=RMSNorm, params={"eps": cfg.norm_eps}),
        mixer=mixer,
        mamba_bda=get_bias_dropout_add,
    ))
    gpt = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    gpt.self_attention.submodules.core_attention = core_attention(config.params_dtype)
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm,
        self_attention=gpt.self_attention,
        self_attn_bda=gpt.self_attn_bda,
        sharded_state_dict_keys_map=dict(gpt.sharded_state_dict_keys_map),
    ))
    mlp_module = gpt.mlp
    mlp_module.module = SwiGLUMLP
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=RMSNorm,
        mlp=mlp_module,
        mlp_bda=gpt.mlp_bda,
        sharded_state_dict_keys_map=dict(gpt.sharded_state_dict_keys_map),
    ))
    moe = IdentityOp
    if cfg.has_moe:
        # megatron's MoELayer (router, SequentialMLP experts, shared expert) alone in a layer
        routed = get_gpt_layer_local_spec(num_experts=cfg.experts, normalization="RMSNorm")
        moe = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=RMSNorm,
            mlp=routed.submodules.mlp,
            mlp_bda=routed.submodules.mlp_bda,
            sharded_state_dict_keys_map=dict(routed.submodules.sharded_state_dict_keys_map),
        ))
    return ModuleSpec(module=_Stack, submodules=MambaStackSubmodules(
        mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp, moe_layer=moe,
    ))


def mamba_rule(cfg: MambaConfig) -> Rule:
    """Init (mamba_ssm's Mamba2 / megatron's MambaMixer), by global name:
    A_log = log(uniform(A_init_range)); dt_bias = softplus^-1(dt), dt log-uniform in
    [dt_min, dt_max] floored at dt_init_floor; D = 1 and norm gains 1; the depthwise convs as
    torch's Conv1d default (weight and bias uniform +-1/sqrt(d_conv), fan-in d_conv); in_proj and
    bc_proj normal(init_std) (parts cut over tp separately), out_proj normal(init_std / sqrt(2
    layers)) like the attention and MLP output projections; attention / MLP layers and the
    embedding as dense (`gpt_rule`)."""
    gpt = gpt_rule(std=cfg.init_std, layers=cfg.layers, gated=True)
    out_std = cfg.init_std / math.sqrt(2.0 * cfg.layers)
    ed, h, gn = cfg.d_inner, cfg.mamba_heads, cfg.groups * cfg.d_state
    lo, hi = cfg.A_init_range
    bound = 1.0 / math.sqrt(cfg.d_conv)

    def a_log(shape, gen):
        return torch.log(torch.empty(shape).uniform_(lo, hi, generator=gen))

    def dt_bias(shape, gen):
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus

    def conv(shape, gen):
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    def rule(name: str, param: torch.nn.Parameter) -> Init:
        if ".mixer." not in name:
            return gpt(name, param)
        leaf = name.split(".mixer.", 1)[1]
        if leaf == "A_log":
            return Init("draw", draw=a_log)
        if leaf == "dt_bias":
            return Init("draw", draw=dt_bias)
        if leaf in ("D", "norm.weight"):
            return Init("ones")
        if leaf == "conv_x.weight" or leaf == "conv_x.bias":
            return Init("draw", draw=conv)
        if leaf in ("conv_bc.weight", "conv_bc.bias"):
            return Init("draw", draw=conv, parts=(gn, gn))
        if leaf == "in_proj.weight":
            return Init("normal", cfg.init_std, parts=(ed, ed, h))
        if leaf == "bc_proj.weight":
            return Init("normal", cfg.init_std, parts=(gn, gn))
        if leaf == "out_proj.weight":
            return Init("normal", out_std)
        raise ValueError(f"no init rule for {name}")

    return rule


def build_model(
    cfg: MambaConfig, *, seq_len: int, seed: int, runtime: dict[str, Any]
) -> MambaModel:
    """This rank's pipeline stage of the model, initialised from `seed` independently of layout."""
    config = transformer_config(cfg, runtime)
    model = MambaModel(
        config=config,
        mamba_stack_spec=stack_spec(cfg, config),
        vocab_size=cfg.vocab_size,
        max_sequence_length=seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        hybrid_override_pattern=cfg.layer_pattern,
        share_embeddings_and_output_weights=cfg.tied_embeddings,
        position_embedding_type="none",
    )
    init_params(model, seed=seed, rule=mamba_rule(cfg), tied=cfg.tied_embeddings)
    if cfg.has_moe:
        moe_layers.track_expert_load(
            model, layers=cfg.layers, experts=cfg.experts,
            moe_layers=[i for i, c in enumerate(cfg.layer_pattern) if c == "E"])
    return model


class MambaBuilder(FamilyBuilder):
    """The builder half (arch/common/builder.py): the language model's step; the MoE metrics
    (only with `E` layers), over the pattern's `E` layers."""

    build_model = staticmethod(build_model)
    step_metrics = staticmethod(moe_layers.step_metrics)
