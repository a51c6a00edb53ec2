"""Dense LLaMA-style decoder as a megatron-core GPTModel: RoPE, RMSNorm, SwiGLU, GQA, no biases.

The builder half of the family contract (docs/families.md): `build_model`, `forward_step`,
`step_metrics`. No parallel logic: the tensor-parallel layers sit inside megatron's spec, and the
layout reaches this builder only as TransformerConfig fields (`runtime`). With Transformer Engine
importable (GPU) its spec is used; otherwise megatron's local spec with the core attention
`arch.common.attention.core_attention()` picks (flash-attn on a GPU where it imports, else SDPA).
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

from scaleforge.arch.common.attention import core_attention, have_te
from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import gpt_rule, init_params
from scaleforge.arch.common.mlp import SwiGLUMLP
from scaleforge.arch.common.norm import RMSNorm
from scaleforge.arch.common.transformer import gpt_model, llama_fields
from scaleforge.arch.dense.config import DenseConfig


def transformer_config(cfg: DenseConfig, runtime: dict[str, Any]) -> TransformerConfig:
    """megatron TransformerConfig of the shape `cfg` under `runtime` (layout, dtype, fusions)."""
    return TransformerConfig(
        **llama_fields(layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, ffn_hidden=cfg.ffn_hidden,
                       norm_eps=cfg.norm_eps, init_std=cfg.init_std),
        **runtime,
    )


def layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The block spec: TE modules where Transformer Engine imports, else local + flash-attn/SDPA."""
    if have_te():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        from megatron.core.extensions.transformer_engine import TENorm

        # TE's fused norm-linears and TENorm read config.normalization (RMSNorm) themselves
        layer = get_gpt_layer_with_transformer_engine_spec()
        final_norm = TENorm
    else:
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        attn = layer.submodules.self_attention
        attn.submodules.core_attention = core_attention(config.params_dtype)
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        layer.submodules.mlp.module = SwiGLUMLP
        final_norm = RMSNorm
    layers = get_num_layers_to_build(config)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=final_norm),
    )


def build_model(
    cfg: DenseConfig, *, seq_len: int, seed: int, runtime: dict[str, Any]
) -> GPTModel:
    """This rank's pipeline stage of the model, initialised from `seed` independently of layout."""
    config = transformer_config(cfg, runtime)
    model = gpt_model(cfg, config, layer_spec(config), seq_len=seq_len)
    rule = gpt_rule(std=cfg.init_std, layers=cfg.layers, gated=True)
    init_params(model, seed=seed, rule=rule, tied=cfg.tied_embeddings)
    return model


class DenseBuilder(FamilyBuilder):
    """The builder half (arch/common/builder.py): the language model's step, no metrics."""

    build_model = staticmethod(build_model)
