"""What a family's Hugging Face mapping (`arch/<family>/hf.py`) returns, and the tensor pieces the
mappings share: megatron's fused attention and SwiGLU projections split into the separate Hugging Face
matrices (full TP=1 tensors, as `orchestrate export` gathers them).

Torch-free: a family config's `hf_target` (arch/common/family.py) refuses what transformers cannot
express at validation time, without loading torch; the conversions work on the tensors' own methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class Target:
    """What one run becomes in transformers."""

    architecture: str
    """The transformers model class (`LlamaForCausalLM`), written into config.json."""
    model_type: str
    """transformers' config `model_type` (`llama`): AutoConfig builds the config from it."""
    config: dict = field(default_factory=dict)
    """Config fields of the shape (the tokenizer's special ids are added by the writer)."""
    convert: Callable[[dict], dict]
    """Gathered single-process model state {name: full tensor} -> transformers' state dict."""

    def __post_init__(self) -> None:
        if not self.architecture.endswith("ForCausalLM") or not self.model_type:
            raise ConfigError(f"export target {self.architecture!r}/{self.model_type!r} is not a "
                              "causal language model")


def stack(tensors: list[Any]) -> Any:
    """`torch.stack(tensors)` (equal shapes) through the tensors' own methods (no torch import)."""
    out = tensors[0].new_empty((len(tensors), *tensors[0].shape))
    for i, tensor in enumerate(tensors):
        out[i] = tensor
    return out


def cat(tensors: list[Any]) -> Any:
    """`torch.cat(tensors)` along dim 0 through the tensors' own methods (no torch import)."""
    first = tensors[0]
    out = first.new_empty((sum(t.shape[0] for t in tensors), *first.shape[1:]))
    row = 0
    for tensor in tensors:
        out[row:row + tensor.shape[0]] = tensor
        row += tensor.shape[0]
    return out


def split_qkv(qkv: Any, *, heads: int, kv_heads: int, head_dim: int) -> tuple[Any, Any, Any]:
    """megatron's `linear_qkv.weight` [(heads + 2 kv_heads) head_dim, hidden] -> q, k, v weights.

    megatron interleaves per query group: for each of the kv_heads groups, its heads / kv_heads query
    heads, then its key head, then its value head. Query head j belongs to group j // (heads /
    kv_heads) in both libraries (transformers' repeat_kv repeats each key head consecutively)."""
    per = heads // kv_heads
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(kv_heads, per + 2, head_dim, hidden)
    q = grouped[:, :per].reshape(heads * head_dim, hidden)
    k = grouped[:, per].reshape(kv_heads * head_dim, hidden)
    v = grouped[:, per + 1].reshape(kv_heads * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def split_gate_up(fc1: Any) -> tuple[Any, Any]:
    """megatron's SwiGLU `linear_fc1.weight` [2 f, hidden] = [gate; up] -> (gate, up)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def attention(state: dict, src: str, dst: str, cfg: Any, *, q_name: str = "q_proj") -> dict:
    """HF q/k/v/o projections under `dst` from the megatron attention under `src`."""
    q, k, v = split_qkv(state[f"{src}.linear_qkv.weight"], heads=cfg.heads,
                        kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
    return {f"{dst}.{q_name}.weight": q, f"{dst}.k_proj.weight": k, f"{dst}.v_proj.weight": v,
            f"{dst}.o_proj.weight": state[f"{src}.linear_proj.weight"]}


def swiglu(state: dict, src: str, dst: str) -> dict:
    """HF gate/up/down projections under `dst` from a megatron SwiGLU MLP under `src`."""
    gate, up = split_gate_up(state[f"{src}.linear_fc1.weight"])
    return {f"{dst}.gate_proj.weight": gate, f"{dst}.up_proj.weight": up,
            f"{dst}.down_proj.weight": state[f"{src}.linear_fc2.weight"]}


def embeddings(state: dict, cfg: Any, *, embed: str, head: str = "lm_head.weight",
               can_tie: bool = True) -> dict:
    """Input table and output layer: the same tensor when tied (transformers expects both keys), a
    copy where the transformers class cannot tie them (`can_tie=False`: equal values, two tensors)."""
    table = state["embedding.word_embeddings.weight"]
    if not cfg.tied_embeddings:
        return {embed: table, head: state["output_layer.weight"]}
    return {embed: table, head: table if can_tie else table.clone()}


def rope(base: float) -> dict:
    """transformers 5's rope settings for plain RoPE over the whole head (megatron's default,
    rotate-half, not interleaved)."""
    return {"rope_type": "default", "rope_theta": float(base)}
