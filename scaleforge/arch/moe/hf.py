"""MoE -> MixtralForCausalLM, or Qwen2MoeForCausalLM where Mixtral cannot express the model.

Routing equals megatron's in both: megatron's softmax router with top_k > 1 takes the top-k logits
and a softmax over them, which is Mixtral's softmax, top-k, renormalise (Qwen2-MoE with
`norm_topk_prob`); with top_k = 1 megatron takes the softmax over all experts first (Switch) and keeps
the top probability unnormalised: Qwen2-MoE without `norm_topk_prob`.

Qwen2-MoE is used for a shared expert, for dense layers between MoE layers (`moe_every` > 1:
`mlp_only_layers`) and for top-1 routing. Its shared expert is always gated by sigmoid(w . x); the
project's shared expert is ungated, so it exports exactly with w = 0 (sigmoid 0.5) and the down
projection doubled. Without a shared expert the Qwen2-MoE one has width 0 (adds exactly 0).
Experts are stored as transformers 5 does: `gate_up_proj` [E, 2f, h] (gate first) and
`down_proj` [E, h, f]. Query/key/value biases are off (`qkv_bias=False`).

Refused (no transformers counterpart): sigmoid router scores, the aux-loss-free expert bias and
token dropping (capacity_factor > 0); the aux and z losses are training-only and export unchanged.
"""

from __future__ import annotations

from typing import Any

from scaleforge.arch.common.hf import Target, embeddings, stack, swiglu
from scaleforge.arch.common.hf_llama import attention_fields, block
from scaleforge.errors import ConfigError


def refuse_router(cfg: Any, where: str = "transformers' Mixtral and Qwen2-MoE") -> None:
    """One-line refusal of router/capacity settings transformers cannot express."""
    if cfg.expert_bias:
        raise ConfigError(
            f"model.expert_bias=true: {where} have no aux-loss-free expert bias (it changes which "
            "experts are chosen); export a run trained without it")
    if cfg.router_score != "softmax":
        raise ConfigError(
            f"model.router_score={cfg.router_score}: {where} route with softmax scores only; "
            "export a run trained with router_score=softmax")
    if cfg.capacity_factor:
        raise ConfigError(
            f"model.capacity_factor={cfg.capacity_factor}: {where} are dropless (no expert "
            "capacity, no token dropping); export a run trained with capacity_factor=0")


def target(cfg: Any, *, seq_len: int) -> Target:
    """Mixtral for plain top-k (k > 1) MoE in every layer without a shared expert, else Qwen2-MoE."""
    refuse_router(cfg)
    fields = dict(attention_fields(cfg, seq_len), num_experts_per_tok=cfg.top_k)
    if cfg.shared_expert_ffn == 0 and cfg.moe_every == 1 and cfg.top_k > 1:
        fields.update(intermediate_size=cfg.moe_ffn_hidden, num_local_experts=cfg.experts,
                      router_jitter_noise=0.0, sliding_window=None)
        return Target(architecture="MixtralForCausalLM", model_type="mixtral", config=fields,
                      convert=lambda state: convert(cfg, state, qwen=False))
    fields.update(
        intermediate_size=cfg.ffn_hidden, moe_intermediate_size=cfg.moe_ffn_hidden,
        shared_expert_intermediate_size=cfg.shared_expert_ffn, num_experts=cfg.experts,
        norm_topk_prob=cfg.top_k > 1, decoder_sparse_step=1, qkv_bias=False,
        mlp_only_layers=[i for i in range(cfg.layers) if not cfg.is_moe_layer(i)],
        use_sliding_window=False,
    )
    return Target(architecture="Qwen2MoeForCausalLM", model_type="qwen2_moe", config=fields,
                  convert=lambda state: convert(cfg, state, qwen=True))


def experts(state: dict, src: str, dst: str, count: int) -> dict:
    """Router and routed experts of one megatron MoELayer (`src`: its `mlp`) as transformers 5's
    fused expert tensors under `dst`."""
    local = f"{src}.experts.local_experts"
    return {
        f"{dst}.gate.weight": state[f"{src}.router.weight"],
        f"{dst}.experts.gate_up_proj": stack(
            [state[f"{local}.{e}.linear_fc1.weight"] for e in range(count)]),
        f"{dst}.experts.down_proj": stack(
            [state[f"{local}.{e}.linear_fc2.weight"] for e in range(count)]),
    }


def shared_expert(state: dict, src: str, dst: str, cfg: Any) -> dict:
    """Qwen2-MoE's sigmoid-gated shared expert from the ungated one (gate 0 -> 0.5, down x 2)."""
    hidden = cfg.hidden
    like = state[f"{src}.router.weight"]  # new tensors take its dtype and device
    if cfg.shared_expert_ffn == 0:
        width = like.new_zeros(0, hidden)
        out = {f"{dst}.shared_expert.gate_proj.weight": width,
               f"{dst}.shared_expert.up_proj.weight": width.clone(),
               f"{dst}.shared_expert.down_proj.weight": like.new_zeros(hidden, 0)}
    else:
        out = swiglu(state, f"{src}.shared_experts", f"{dst}.shared_expert")
        out[f"{dst}.shared_expert.down_proj.weight"] = 2 * out[f"{dst}.shared_expert.down_proj.weight"]
    out[f"{dst}.shared_expert_gate.weight"] = like.new_zeros(1, hidden)
    return out


def convert(cfg: Any, state: dict, *, qwen: bool) -> dict:
    """Gathered megatron MoE GPT state -> Mixtral or Qwen2-MoE state."""
    out = embeddings(state, cfg, embed="model.embed_tokens.weight")
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    for i in range(cfg.layers):
        out.update(block(state, cfg, i))
        src, dst = f"decoder.layers.{i}.mlp", f"model.layers.{i}.mlp"
        if not cfg.is_moe_layer(i):
            out.update(swiglu(state, src, dst))
            continue
        out.update(experts(state, src, dst, cfg.experts))
        if qwen:
            out.update(shared_expert(state, src, dst, cfg))
    return out
