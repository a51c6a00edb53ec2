"""The builder half of the parallel-block family: a megatron-core GPTModel of parallel blocks.

Megatron's TransformerLayer runs attention, then the MLP on the attention's residual sum; a
`ParallelLayer` keeps its submodules (so parameter names, tensor-parallel layers, sharded
checkpoints and the layout-independent initialiser are megatron's and the project's as they are) and
replaces only its forward: both branches read the one pre-norm output and add to the input. The
local spec (megatron's local layers, the project's RMSNorm, SwiGLU MLP and core attention): no
parallel logic here, the layout reaches the builder as TransformerConfig fields (`runtime`).
"""

from __future__ import annotations

from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from families.parallel_block.config import ParallelBlockConfig
from scaleforge.arch.common.attention import core_attention
from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import gpt_rule, init_params
from scaleforge.arch.common.mlp import SwiGLUMLP
from scaleforge.arch.common.norm import RMSNorm
from scaleforge.arch.common.transformer import gpt_model, llama_fields


class ParallelLayer(TransformerLayer):
    """x + attn(norm(x)) + mlp(norm(x)): megatron's layer with its branches side by side."""

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        normed = self.input_layernorm(hidden_states)
        attention, _ = self.self_attention(normed, attention_mask=attention_mask,
                                           rotary_pos_emb=rotary_pos_emb,
                                           packed_seq_params=kwargs.get("packed_seq_params"))
        mlp, _ = self.mlp(normed)  # no biases, no dropout (llama_fields)
        return hidden_states + attention + mlp, kwargs.get("context")


def layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The block spec: megatron's local layer spec with the parallel forward and no pre-MLP norm."""
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    parts = layer.submodules
    parts.self_attention.submodules.core_attention = core_attention(config.params_dtype)
    parts.input_layernorm, parts.pre_mlp_layernorm, parts.mlp.module = RMSNorm, IdentityOp, SwiGLUMLP
    layers = [ModuleSpec(module=ParallelLayer, submodules=parts)] * get_num_layers_to_build(config)
    blocks = TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)
    return ModuleSpec(module=TransformerBlock, submodules=blocks)


class ParallelBlockBuilder(FamilyBuilder):
    """The builder half (scaleforge/arch/common/builder.py): only the build differs from the
    defaults (the language model's step, no metrics of its own, no growth)."""

    def build_model(self, cfg: ParallelBlockConfig, *, seq_len: int, seed: int,
                    runtime: dict[str, Any]) -> Any:
        """This rank's pipeline stage, initialised from `seed` independently of the layout."""
        config = TransformerConfig(
            **llama_fields(layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                           kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, ffn_hidden=cfg.ffn_hidden,
                           norm_eps=cfg.norm_eps, init_std=cfg.init_std),
            **runtime,
        )
        model = gpt_model(cfg, config, layer_spec(config), seq_len=seq_len)
        init_params(model, seed=seed, rule=gpt_rule(std=cfg.init_std, layers=cfg.layers, gated=True),
                    tied=cfg.tied_embeddings)
        return model
