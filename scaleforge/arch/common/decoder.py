"""LLaMA-style decoder shape (torch-free): the fields, checks and exact accounting of the dense
family, which the families built on the same blocks (MoE, MoR, ParScale) extend.

The parameter count is megatron-core's GPTModel exactly: RMSNorm has a weight and no bias, no linear
layer has a bias, the SwiGLU gate and up projections are one fused [2 * ffn_hidden, hidden] matrix, and
a tied output layer reuses the embedding matrix.

FLOPs per token follow the PaLM / MFU convention (Chowdhery et al. 2022, appendix B): 6 x the matmul
parameters (forward 2 + backward 4 per multiply-add, the output layer included, the embedding lookup and
the norms excluded) plus 12 * layers * heads * head_dim * seq_len for QK^T and AV, counted without causal
halving. For a GPT-3 shape this equals Megatron's per-iteration formula (Narayanan et al. 2021) divided
by the tokens of the iteration; see `megatron_flops_per_token`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scaleforge.arch.common.family import Divisible, FamilyConfig, LayerKind
from scaleforge.arch.common.shapes import dense_shape
from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class DecoderConfig(FamilyConfig):
    """A LLaMA-style GPT: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.

    The fields are the `model.*` keys of every family that extends it, in this order (a family
    overriding a default keeps the field's place): plan files and run ids are written from them."""

    planned_fields: ClassVar[tuple[str, ...]] = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden")
    """Fields the shape rule (`for_params`) decides; the planner refuses `--set` on them."""

    arch: str
    """Family name in the architecture registry (each family sets its own)."""
    layers: int = 4
    """Number of transformer blocks."""
    hidden: int = 256
    """Model width (residual stream size)."""
    heads: int = 4
    """Attention (query) heads; must divide `hidden`."""
    kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide `heads`."""
    ffn_hidden: int = 704
    """SwiGLU inner width (each of the gate and up projections is hidden x ffn_hidden)."""
    vocab_size: int = 8192
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
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(
                f"model.heads={self.heads} must divide model.hidden={self.hidden}"
            )
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"model.kv_heads={self.kv_heads} must divide model.heads={self.heads}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    # ------------------------------------------------------------------------------------------
    # the family contract (arch/common/family.py)

    @classmethod
    def for_params(cls, n: float, base: "DecoderConfig") -> "DecoderConfig":
        """The shape rule (arch/common/shapes.py): about `n` total parameters, vocab from `base`."""
        return dense_shape(n, base)

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
        """`layers` identical attention + SwiGLU blocks."""
        block = LayerKind("transformer", self.layer_params(), kv_heads=self.kv_heads)
        return [block] * self.layers

    def activation_bytes(
        self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int = 1, sp: bool = False,
        recompute: str = "none", flash: bool = False, fp32: bool = False,
    ) -> float:
        """The contract's count (Korthikanti's), except a transformer layer in fp32: what autograd
        saves in this layer, storage by storage (`transformer_saved_bytes`; full recompute: the
        fp32 layer input)."""
        from scaleforge.parallel.memory import transformer_saved_bytes

        if not (fp32 and layer.kind == "transformer"):
            return super().activation_bytes(layer, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                            sp=sp, recompute=recompute, flash=flash, fp32=fp32)
        if recompute == "full":
            return 4 * seq_len * micro_batch * self.hidden / (tp if sp else 1)
        return transformer_saved_bytes(
            hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, ffn_hidden=self.ffn_hidden,
            seq_len=seq_len, micro_batch=micro_batch, tp=tp, sp=sp,
        )

    def summary(self) -> str:
        """`layers x hidden`, the table's shape column."""
        return f"{self.layers}x{self.hidden}"

    # ------------------------------------------------------------------------------------------
    # accounting

    def layer_matmul_params(self) -> int:
        """Weights of one block's linear layers: fused QKV, output projection, fused SwiGLU fc1, fc2."""
        h, hd = self.hidden, self.head_dim
        qkv = h * (self.heads * hd + 2 * self.kv_heads * hd)
        proj = self.heads * hd * h
        fc1 = h * 2 * self.ffn_hidden  # gate and up projections in one matrix
        fc2 = self.ffn_hidden * h
        return qkv + proj + fc1 + fc2

    def layer_params(self) -> int:
        """All weights of one block: its linear layers plus two RMSNorm weights."""
        return self.layer_matmul_params() + 2 * self.hidden

    def embedding_params(self) -> int:
        """Input embedding plus the output layer when it is not tied to it."""
        table = self.vocab_size * self.hidden
        return table if self.tied_embeddings else 2 * table

    def num_params(self) -> int:
        """Exact total parameters: embedding, blocks, final norm and (untied) output layer."""
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden

    def matmul_params(self) -> int:
        """Weights multiplied per token: all blocks' linear layers plus the output layer."""
        return self.layers * self.layer_matmul_params() + self.vocab_size * self.hidden

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul params + 12 L H Q s attention."""
        attention = 12 * self.layers * self.heads * self.head_dim * seq_len
        return float(6 * self.matmul_params() + attention)


def megatron_flops_per_token(*, layers: int, hidden: int, seq_len: int, vocab_size: int) -> float:
    """Narayanan et al. (2021) GPT FLOPs per iteration, 72 B s L h^2 (1 + s/6h + V/12Lh), per token.

    It assumes a 4h MLP (12 h^2 weights per block), which a SwiGLU block with ffn_hidden = 8h/3 matches,
    so for such a shape it equals `DecoderConfig.flops_per_token` (methods: GPT-3 175B gives 1.0764e12).
    """
    s, h, n = seq_len, hidden, layers
    return 72.0 * s * n * h * h * (1 + s / (6 * h) + vocab_size / (12 * n * h)) / s
