"""Mixture-of-Experts decoder as a megatron-core GPTModel with megatron's own MoE layers.

The builder half of the family contract (docs/families.md, docs/moe.md): `build_model`,
`forward_step`, `step_metrics`. MoE layers are megatron's `MoELayer` (TopKRouter, SequentialMLP of
megatron `MLP` experts, optional SharedExpertMLP) from `get_gpt_layer_local_spec(num_experts=...)`,
with the project's SDPA/flash core attention and RMSNorm swapped in; dense layers between them (when
`moe_every` > 1) are dense's blocks (local spec, `SwiGLUMLP`). Expert parallelism, the token
dispatcher and the expert tensor parallelism (= tp) are megatron's; the layout reaches this builder
only as TransformerConfig fields (`runtime`). Grouped GEMM (`moe_grouped_gemm`) and Transformer
Engine's MoE spec need a GPU and are not used.

The MoELayer settings, the aux and z losses and the expert-load metrics are arch/common/moe.py's
(a Mamba hybrid's `E` layers share them).
"""

from __future__ import annotations

from typing import Any

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from scaleforge.arch.common.attention import core_attention
from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import gpt_rule, init_params
from scaleforge.arch.common.mlp import SwiGLUMLP
from scaleforge.arch.common import moe
from scaleforge.arch.common.norm import RMSNorm
from scaleforge.arch.common.transformer import gpt_model, llama_fields
from scaleforge.arch.moe.config import MoEConfig


def transformer_config(cfg: MoEConfig, runtime: dict[str, Any]) -> TransformerConfig:
    """megatron TransformerConfig of the shape `cfg` under `runtime` (layout, dtype, fusions)."""
    return TransformerConfig(
        **llama_fields(layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, ffn_hidden=cfg.ffn_hidden,
                       norm_eps=cfg.norm_eps, init_std=cfg.init_std),
        moe_layer_freq=cfg.moe_every,
        **moe.moe_fields(cfg),
        **moe.moe_runtime(runtime),
    )


def _moe_layer_spec(config: TransformerConfig) -> ModuleSpec:
    layer = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = core_attention(config.params_dtype)
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    return layer


def _dense_layer_spec(config: TransformerConfig) -> ModuleSpec:
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = core_attention(config.params_dtype)
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    layer.submodules.mlp.module = SwiGLUMLP  # as the dense family's blocks
    return layer


def layer_spec(cfg: MoEConfig, config: TransformerConfig) -> ModuleSpec:
    """This pipeline stage's block: MoE layers at cfg.is_moe_layer(i), dense ones between."""
    routed, dense = _moe_layer_spec(config), _dense_layer_spec(config)
    offset = get_transformer_layer_offset(config)
    count = get_num_layers_to_build(config)
    specs = [routed if cfg.is_moe_layer(offset + i) else dense for i in range(count)]
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm),
    )


def build_model(
    cfg: MoEConfig, *, seq_len: int, seed: int, runtime: dict[str, Any]
) -> GPTModel:
    """This rank's pipeline stage (and expert shard), initialised from `seed` independently of the
    TP/PP/EP/DP layout: experts are drawn by their global index (arch.common.init), the router like
    any other weight, normal(0, init_std), expert fc1 as [gate; up] parts."""
    config = transformer_config(cfg, runtime)
    model = gpt_model(cfg, config, layer_spec(cfg, config), seq_len=seq_len)
    rule = gpt_rule(std=cfg.init_std, layers=cfg.layers, gated=True)
    init_params(model, seed=seed, rule=rule, tied=cfg.tied_embeddings)
    moe.track_expert_load(model, layers=cfg.layers, experts=cfg.experts,
                          moe_layers=[i for i in range(cfg.layers) if cfg.is_moe_layer(i)])
    return model


class MoEBuilder(FamilyBuilder):
    """The builder half (arch/common/builder.py): the language model's step, the MoE metrics."""

    build_model = staticmethod(build_model)
    step_metrics = staticmethod(moe.step_metrics)
