"""The torch-free half of the parallel-block family: its shape, exact accounting and shape rule.

A layer is GPT-J's (Wang & Komatsuzaki 2021) and PaLM's: attention and MLP read the same pre-norm
output and both add to the residual, x + attn(norm(x)) + mlp(norm(x)); RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases. The parameter count is the megatron model `model.py` builds: per
layer one RMSNorm weight (there is no pre-MLP norm), the fused QKV, the output projection, the fused
[gate; up] fc1 and fc2; then the final norm and the (untied) output layer. FLOPs per token follow
the PaLM / MFU convention: 6 x the matmul parameters + 12 L H Q s for QK^T and AV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from scaleforge.arch.common.family import Divisible, FamilyConfig, LayerKind
from scaleforge.errors import ConfigError

HEAD_DIM = 64
"""Head width the shape rule keeps (heads = hidden / 64)."""
ASPECT = 100.0
"""hidden / layers the shape rule aims for (Kaplan et al. 2020: the loss is flat from 50 to 200)."""


@dataclass(kw_only=True, frozen=True)
class ParallelBlockConfig(FamilyConfig):
    """A decoder of parallel attention + MLP blocks sharing one pre-norm."""

    builder_class: ClassVar[str] = "families.parallel_block.model:ParallelBlockBuilder"
    """The builder half, imported when a model is built."""
    planned_fields: ClassVar[tuple[str, ...]] = ("layers", "hidden", "heads", "kv_heads",
                                                 "ffn_hidden")
    """Fields the shape rule (`for_params`) decides; the planner refuses `--set` on them."""

    arch: str = "parallel_block"
    """Family name in the architecture registry."""
    layers: int = 2
    """Number of parallel blocks."""
    hidden: int = 64
    """Model width (residual stream size)."""
    heads: int = 4
    """Attention (query) heads; must divide `hidden`."""
    kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide `heads`."""
    ffn_hidden: int = 176
    """SwiGLU inner width (each of the gate and up projections is hidden x ffn_hidden)."""
    vocab_size: int = 512
    """Vocabulary size of the embedding and output layer; at least the tokenizer's vocabulary."""
    tied_embeddings: bool = False
    """Share the input embedding with the output layer."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        for name, value in (("layers", self.layers), ("hidden", self.hidden),
                            ("heads", self.heads), ("kv_heads", self.kv_heads),
                            ("ffn_hidden", self.ffn_hidden), ("vocab_size", self.vocab_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"model.heads={self.heads} must divide model.hidden={self.hidden}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"model.kv_heads={self.kv_heads} must divide model.heads={self.heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    # ------------------------------------------------------------------------------------------
    # accounting

    def layer_matmul_params(self) -> int:
        """Weights of one block's linear layers: fused QKV, output projection, fused fc1, fc2."""
        h, hd = self.hidden, self.head_dim
        qkv = h * (self.heads * hd + 2 * self.kv_heads * hd)
        proj = self.heads * hd * h
        return qkv + proj + 3 * h * self.ffn_hidden  # fc1 [gate; up] 2 h f, fc2 f h

    def layer_params(self) -> int:
        """All weights of one block: its linear layers plus its one RMSNorm weight."""
        return self.layer_matmul_params() + self.hidden

    def embedding_params(self) -> int:
        """Input embedding plus the output layer when it is not tied to it."""
        table = self.vocab_size * self.hidden
        return table if self.tied_embeddings else 2 * table

    def num_params(self) -> int:
        """Exact total parameters: embedding, blocks, final norm and (untied) output layer."""
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (blocks' and output layer's weights) + 12 L H Q s."""
        matmul = self.layers * self.layer_matmul_params() + self.vocab_size * self.hidden
        attention = 12 * self.layers * self.heads * self.head_dim * seq_len
        return float(6 * matmul + attention)

    # ------------------------------------------------------------------------------------------
    # the rest of the contract (arch/common/family.py; the defaults cover what is not here)

    @classmethod
    def for_params(cls, n: float, base: "ParallelBlockConfig") -> "ParallelBlockConfig":
        """About `n` total parameters: for each width (a multiple of 64, heads of 64, SwiGLU width
        8/3 of it rounded to 64) the layer count that comes closest, then the width whose
        hidden / layers is closest to ASPECT; vocabulary and the rest from `base`."""
        best = None
        for hidden in range(128, 16384 + 1, 128):
            heads = hidden // HEAD_DIM
            shape = dict(hidden=hidden, heads=heads, kv_heads=heads,
                         ffn_hidden=64 * round(8 * hidden / 3 / 64), layers=1)
            one = replace(base, **shape)
            fixed = one.num_params() - one.layer_params()
            layers = round((n - fixed) / one.layer_params())
            if layers < 1:
                continue
            score = abs(math.log(hidden / layers / ASPECT))
            if best is None or score < best[0]:
                best = (score, {**shape, "layers": layers})
        if best is None:
            raise ConfigError(f"no parallel_block shape has about {n:.3g} parameters at "
                              f"model.vocab_size={base.vocab_size}; plan a larger size")
        return replace(base, **best[1])

    def divisibility(self, seq_len: int) -> list[Divisible]:
        """Megatron splits heads, KV heads, the FFN and the vocabulary over tp; pp cuts layers."""
        tp_advice = "pick a tp that divides it"
        return [
            Divisible("model.heads", self.heads, "tp", tp_advice),
            Divisible("model.kv_heads", self.kv_heads, "tp", tp_advice),
            Divisible("model.ffn_hidden", self.ffn_hidden, "tp", tp_advice),
            Divisible("model.vocab_size", self.vocab_size, "tp",
                      "round the vocabulary up to a multiple of tp"),
            Divisible("model.layers", self.layers, "pp", "pick a pp that divides the layer count"),
        ]

    def layer_kinds(self) -> list[LayerKind]:
        """`layers` identical blocks; the memory model counts each as a transformer layer (the
        contract's default `activation_bytes`: one norm fewer, so a slight over-count)."""
        return [LayerKind("transformer", self.layer_params(), kv_heads=self.kv_heads)] * self.layers

    def summary(self) -> str:
        """`layers x hidden`, the table's shape column."""
        return f"{self.layers}x{self.hidden}"

