"""The LLaMA-style decoder in megatron-core: the TransformerConfig fields every family with its
attention and MLP layers shares, the decoder's block spec and its GPTModel.

RMSNorm, SwiGLU, no biases, no dropout; weights drawn by `arch.common.init` (layout-independent), so
megatron's own draw is a no-op. `perform_initialization` must stay on: megatron tags the
tensor-parallel attributes (partition_dim, stride) only on that path, and the init and the grad norm
read them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from scaleforge.arch.common.attention import core_attention, have_te
from scaleforge.arch.common.mlp import SwiGLUMLP
from scaleforge.arch.common.norm import RMSNorm


class _QuietSubclassedMLP(logging.Filter):
    # TransformerLayer warns once per layer for any MLP class other than megatron's own MLP (an
    # exact type check), although a subclass such as SwiGLUMLP gets the same tp group by default.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_QuietSubclassedMLP())


def keep(tensor: torch.Tensor) -> torch.Tensor:
    """megatron's init_method that leaves the tensor as it is (arch.common.init draws it)."""
    return tensor


MEGATRON_DEFAULTS: dict[str, Any] = dict(
    # the whole layer, as megatron's default "full" (which is deprecated and warns on every
    # TransformerConfig); in the model's fields, not the runtime's, so every config gets it
    cuda_graph_scope=[],
)
"""TransformerConfig arguments that every family passes, whatever its shape and layout."""


def llama_fields(*, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 ffn_hidden: int, norm_eps: float, init_std: float) -> dict[str, Any]:
    """TransformerConfig keyword arguments of a LLaMA-style shape (the layout comes separately)."""
    return dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        ffn_hidden_size=ffn_hidden,
        normalization="RMSNorm",
        layernorm_epsilon=norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        # megatron's MoE path also fails with biases on CPU (in-place bias add on a view)
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_std,
        perform_initialization=True,
        init_method=keep,
        output_layer_init_method=keep,
        **MEGATRON_DEFAULTS,
    )


def transformer_config(cfg: Any, runtime: dict[str, Any]) -> TransformerConfig:
    """megatron TransformerConfig of the decoder shape `cfg` (arch/common/decoder.py) under `runtime`
    (layout, dtype, fusions)."""
    return TransformerConfig(
        **llama_fields(layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, ffn_hidden=cfg.ffn_hidden,
                       norm_eps=cfg.norm_eps, init_std=cfg.init_std),
        **runtime,
    )


def layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The decoder's block spec: TE modules where Transformer Engine imports, else local +
    flash-attn/SDPA."""
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


def gpt_model(cfg: Any, config: Any, layer_spec: Any, *, seq_len: int, cls: Any = None,
              **extra: Any) -> Any:
    """This pipeline stage's megatron GPTModel (or the family's subclass `cls`): RoPE, the
    config's vocabulary and embedding tying; `extra` reaches the constructor (rotary_percent, ...)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    return (cls or GPTModel)(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rope_base,
        **extra,
    )
