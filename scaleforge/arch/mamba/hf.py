"""Mamba-2 -> Mamba2ForCausalLM (all `M` layers); hybrid `M` / `*` stacks -> NemotronHForCausalLM.

The mixer maps one to one: mamba_ssm's fused in_proj [z, x, B, C, dt] and conv over [x, B, C] are
the project's in_proj [z, x, dt] and bc_proj [B, C] (and conv_x, conv_bc) concatenated; B and C are
group-major and head h reads group h // (heads / groups) in both; the gated RMSNorm normalises per
group of Ed / G channels in both (transformers' `group_size = intermediate_size // n_groups`).
dt is not clamped here: Mamba2's `time_step_limit` stays (0, inf) and NemotronH's lower limit (it
clamps dt at `time_step_min`) is set to 0.

NemotronH uses the same letters; its attention layers carry no positional encoding, as the
project's hybrid `*` layers (megatron's MambaModel, position_embedding_type none). Its `-` layers
are ungated squared-ReLU MLPs and its `E` layers sigmoid-routed ungated experts, so a stack with
the project's SwiGLU `-` or softmax SwiGLU `E` layers is refused.
"""

from __future__ import annotations

from typing import Any

from scaleforge.arch.common.hf import Target, attention, cat, embeddings
from scaleforge.errors import ConfigError


def _mixer_fields(cfg: Any) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, expand=cfg.expand,
                n_groups=cfg.groups, conv_kernel=cfg.d_conv, chunk_size=cfg.chunk_size,
                use_bias=False, use_conv_bias=True, layer_norm_epsilon=cfg.norm_eps,
                tie_word_embeddings=cfg.tied_embeddings, residual_in_fp32=False)


def target(cfg: Any, *, seq_len: int) -> Target:
    """Mamba2 for a pure Mamba-2 stack, NemotronH for an `M` / `*` hybrid."""
    letters = set(cfg.layer_pattern)
    if letters == {"M"}:
        fields = dict(_mixer_fields(cfg), num_hidden_layers=cfg.layers, num_heads=cfg.mamba_heads,
                      head_dim=cfg.headdim, state_size=cfg.d_state, time_step_limit=(0.0, float("inf")))
        return Target(architecture="Mamba2ForCausalLM", model_type="mamba2", config=fields,
                      convert=lambda state: convert(cfg, state, prefix="backbone"))
    for letter, why in (("-", "NemotronH's MLP layers are ungated squared-ReLU, not SwiGLU"),
                        ("E", "NemotronH's MoE layers route with sigmoid scores over ungated "
                              "experts, not softmax over SwiGLU experts")):
        if letter in letters:
            raise ConfigError(
                f"model.pattern={cfg.pattern}: a hybrid with `{letter}` layers has no transformers "
                f"counterpart ({why}); only `M` / `*` hybrids export (as NemotronHForCausalLM)")
    fields = dict(
        _mixer_fields(cfg), hybrid_override_pattern=cfg.layer_pattern,
        mamba_num_heads=cfg.mamba_heads, mamba_head_dim=cfg.headdim, ssm_state_size=cfg.d_state,
        mamba_hidden_act="silu", time_step_min=0.0, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, attention_bias=False,
        max_position_embeddings=seq_len, attention_dropout=0.0, hidden_dropout=0.0,
        # NemotronH declares no tied weights (save_pretrained refuses shared tensors): a tied run
        # exports its table twice
        tie_word_embeddings=False,
    )
    return Target(architecture="NemotronHForCausalLM", model_type="nemotron_h", config=fields,
                  convert=lambda state: convert(cfg, state, prefix="model"))


def mixer(state: dict, src: str, dst: str) -> dict:
    """One Mamba-2 mixer in mamba_ssm's fused layout."""
    in_proj = state[f"{src}.in_proj.weight"]  # [z, x, dt]
    heads = state[f"{src}.A_log"].shape[0]
    zx, dt = in_proj[:-heads], in_proj[-heads:]
    return {
        f"{dst}.in_proj.weight": cat([zx, state[f"{src}.bc_proj.weight"], dt]),
        f"{dst}.conv1d.weight": cat([state[f"{src}.conv_x.weight"], state[f"{src}.conv_bc.weight"]]),
        f"{dst}.conv1d.bias": cat([state[f"{src}.conv_x.bias"], state[f"{src}.conv_bc.bias"]]),
        f"{dst}.dt_bias": state[f"{src}.dt_bias"],
        f"{dst}.A_log": state[f"{src}.A_log"],
        f"{dst}.D": state[f"{src}.D"],
        f"{dst}.norm.weight": state[f"{src}.norm.weight"],
        f"{dst}.out_proj.weight": state[f"{src}.out_proj.weight"],
    }


def convert(cfg: Any, state: dict, *, prefix: str) -> dict:
    """Gathered megatron MambaModel state -> Mamba2 (`backbone.`) or NemotronH (`model.`) state."""
    out = embeddings(state, cfg, embed=f"{prefix}.embeddings.weight", can_tie=prefix == "backbone")
    out[f"{prefix}.norm_f.weight"] = state["decoder.final_norm.weight"]
    for i, letter in enumerate(cfg.layer_pattern):
        src, dst = f"decoder.layers.{i}", f"{prefix}.layers.{i}"
        if letter == "M":
            out[f"{dst}.norm.weight"] = state[f"{src}.norm.weight"]
            out.update(mixer(state, f"{src}.mixer", f"{dst}.mixer"))
        else:  # `*`: attention only
            out[f"{dst}.norm.weight"] = state[f"{src}.input_layernorm.weight"]
            out.update(attention(state, f"{src}.self_attention", f"{dst}.mixer", cfg))
    return out
