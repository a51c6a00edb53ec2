"""LLaMA-style decoder -> LlamaForCausalLM: the mapping of the dense family and of every family whose
model is that decoder (ParScale at P=1), and the attention blocks the MoE mappings reuse.

Same block as megatron's local GPT spec: RMSNorm pre-norms, RoPE (rotate-half) over the whole head,
grouped-query attention without biases, SwiGLU MLP. transformers 5 defaults `rms_norm_eps` to 1e-6:
the run's own epsilon is written.
"""

from __future__ import annotations

from typing import Any

from scaleforge.arch.common.hf import Target, attention, embeddings, rope, swiglu


def attention_fields(cfg: Any, seq_len: int) -> dict:
    """Config fields of a LLaMA-style attention stack (shared with the MoE mappings)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tied_embeddings, rope_parameters=rope(cfg.rope_base),
        attention_dropout=0.0,
    )


def target(cfg: Any, *, seq_len: int) -> Target:
    """LlamaForCausalLM of a decoder shape (arch/common/decoder.py)."""
    fields = dict(attention_fields(cfg, seq_len), intermediate_size=cfg.ffn_hidden,
                  attention_bias=False, mlp_bias=False)
    return Target(architecture="LlamaForCausalLM", model_type="llama", config=fields,
                  convert=lambda state: convert(cfg, state))


def block(state: dict, cfg: Any, i: int) -> dict:
    """Norms and attention of layer `i` under transformers' LLaMA-family names."""
    src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
    return {
        f"{dst}.input_layernorm.weight": state[f"{src}.input_layernorm.weight"],
        f"{dst}.post_attention_layernorm.weight": state[f"{src}.pre_mlp_layernorm.weight"],
        **attention(state, f"{src}.self_attention", f"{dst}.self_attn", cfg),
    }


def convert(cfg: Any, state: dict) -> dict:
    """Gathered megatron GPT state -> LlamaForCausalLM state."""
    out = embeddings(state, cfg, embed="model.embed_tokens.weight")
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    for i in range(cfg.layers):
        out.update(block(state, cfg, i))
        out.update(swiglu(state, f"decoder.layers.{i}.mlp", f"model.layers.{i}.mlp"))
    return out
