"""Dense LLaMA-style decoder as a megatron-core GPTModel: RoPE, RMSNorm, SwiGLU, GQA, no biases.

The builder half of the family contract (docs/families.md): `build_model`, `forward_step`,
`step_metrics`. The decoder's TransformerConfig and block spec are arch/common/transformer.py's
(which ParScale and MoR build on). No parallel logic: the tensor-parallel layers sit inside
megatron's spec, and the layout reaches this builder only as TransformerConfig fields (`runtime`).
With Transformer Engine importable (GPU) its spec is used; otherwise megatron's local spec with the
core attention `arch.common.attention.core_attention()` picks (flash-attn on a GPU where it imports,
else SDPA).
"""

from __future__ import annotations

from typing import Any

from megatron.core.models.gpt import GPTModel

from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import gpt_rule, init_params
from scaleforge.arch.common.transformer import gpt_model, layer_spec, transformer_config
from scaleforge.arch.dense.config import DenseConfig


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
