"""TokenFormer shape (torch-free): Pattention layers with exact parameter and FLOP accounting.

TokenFormer (Wang et al. 2024, methods section 2) replaces every linear projection of a transformer
layer (Q, K, V, the attention output projection and the FFN) with Pattention: scores of the input
against n key parameter tokens, the modified softmax GeLU(S sqrt(n) / ||S||) over the n tokens, then a
weighted sum of n value parameter tokens. A Pattention with n tokens from d_in to d_out holds
n (d_in + d_out) parameters, so one layer holds 2 d (3 n_qkv + n_proj + n_ffn); pre-norms are
non-parametric LayerNorms, the final LayerNorm has a gain and a bias (2 d), the embedding is tied.

FLOPs per token, PaLM/MFU convention as the dense family: 6 x the multiplied parameters (every
Pattention's key and value tokens, the output layer) plus 12 L d s for QK^T and AV; the
normalisation's O(n) elementwise work is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from scaleforge.arch.common.family import Divisible, FamilyConfig, LayerKind
from scaleforge.arch.common.hf import Target
from scaleforge.errors import ConfigError

_COUNTS = ("qkv_tokens", "proj_tokens", "ffn_tokens")


@dataclass(kw_only=True, frozen=True)
class TokenFormerConfig(FamilyConfig):
    """A TokenFormer decoder: Pattention Q, K, V, output projection and FFN; rotary on a fraction of
    the head dims; non-parametric pre-norms; tied embeddings."""

    builder_class: ClassVar[str] = "scaleforge.arch.tokenformer.model:TokenFormerBuilder"
    """The builder half (arch/common/builder.py), imported when a model is built."""
    planned_fields: ClassVar[tuple[str, ...]] = (
        "layers", "hidden", "heads", "qkv_tokens", "proj_tokens", "ffn_tokens")
    """Fields the shape rule (`for_params`) decides; the planner refuses `--set` on them."""

    arch: str = "tokenformer"
    """Family name in the architecture registry."""
    layers: int = 4
    """Number of TokenFormer layers."""
    hidden: int = 128
    """Model width (the token dimension d)."""
    heads: int = 4
    """Attention heads (token-token attention); must divide `hidden`."""
    qkv_tokens: int = 128
    """Parameter tokens of each of the Q, K and V Pattentions (the paper's qkv_slot_num)."""
    proj_tokens: int = 128
    """Parameter tokens of the attention output Pattention (proj_slot_num)."""
    ffn_tokens: int = 512
    """Parameter tokens of the FFN Pattention (ffn_slot_num)."""
    qkv_scale_tokens: int = 0
    """n whose sqrt scales the Q/K/V scores (0: qkv_tokens). Set by `orchestrate grow` to the count
    before growth, so the grown model computes the same function at step 0."""
    proj_scale_tokens: int = 0
    """As qkv_scale_tokens for the output projection (0: proj_tokens)."""
    ffn_scale_tokens: int = 0
    """As qkv_scale_tokens for the FFN (0: ffn_tokens)."""
    rotary_fraction: float = 0.25
    """Fraction of each head's dims that get rotary embeddings (the paper: 0.25)."""
    rope_base: float = 10000.0
    """Rotary base frequency."""
    vocab_size: int = 8192
    """Vocabulary size of the (tied) embedding; at least the tokenizer's vocabulary."""
    tied_embeddings: bool = True
    """Share the input embedding with the output layer (the paper does)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the embedding and key-token initialisation (value tokens: wang_init,
    2 / (layers sqrt(hidden)))."""

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", *_COUNTS, "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("qkv_scale_tokens", "proj_scale_tokens", "ffn_scale_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"model.{name} must be an integer >= 0, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"model.heads={self.heads} must divide model.hidden={self.hidden}")
        rot = self.head_dim * self.rotary_fraction
        if not 0 < self.rotary_fraction <= 1 or rot != int(rot) or int(rot) % 2:
            raise ConfigError(
                f"model.rotary_fraction={self.rotary_fraction} must be in (0, 1] and give an even "
                f"number of rotary dims of the head dim {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def scale_tokens(self, kind: str) -> int:
        """The n whose sqrt scales the scores of a `qkv`, `proj` or `ffn` Pattention."""
        return getattr(self, f"{kind}_scale_tokens") or getattr(self, f"{kind}_tokens")

    # ------------------------------------------------------------------------------------------
    # the family contract (arch/common/family.py)

    @classmethod
    def for_params(cls, n: float, base: "TokenFormerConfig") -> "TokenFormerConfig":
        """The paper's ladder shape: head dim 64, layers = hidden / 64 (even, >= 2), n_qkv = n_proj
        = hidden and n_ffn = 4 hidden (a Pattention at its Transformer-equivalent size); the hidden
        (multiple of 64) whose total is nearest `n` in log. 150M: 12 x 768."""
        best = None
        for hidden in range(64, 16385, 64):
            layers = max(2, 2 * round(hidden / 128))
            shape = replace(base, layers=layers, hidden=hidden, heads=hidden // 64,
                            qkv_tokens=hidden, proj_tokens=hidden, ffn_tokens=4 * hidden,
                            qkv_scale_tokens=0, proj_scale_tokens=0, ffn_scale_tokens=0)
            gap = abs(math.log(shape.num_params() / n))
            if best is None or gap < best[0]:
                best = (gap, shape)
        return best[1]

    def divisibility(self, seq_len: int) -> list[Divisible]:
        """tp shards every Pattention's parameter tokens, the heads and the vocabulary; pp cuts
        layers."""
        tp_advice = "pick a tp that divides it"
        rows = [Divisible(f"model.{name}", getattr(self, name), "tp", tp_advice)
                for name in _COUNTS]
        return [
            *rows,
            Divisible("model.heads", self.heads, "tp", tp_advice),
            Divisible("model.vocab_size", self.vocab_size, "tp",
                      "round the vocabulary up to a multiple of tp"),
            Divisible("model.layers", self.layers, "pp", "pick a pp that divides the layer count"),
        ]

    def layer_kinds(self) -> list[LayerKind]:
        """`layers` identical attention + FFN layers (every head its own K and V)."""
        return [LayerKind("transformer", self.layer_params(), kv_heads=self.heads)] * self.layers

    def summary(self) -> str:
        """`layers x hidden`, the table's shape column."""
        return f"{self.layers}x{self.hidden}"

    def hf_target(self, seq_len: int) -> Target:
        """Refused: transformers has no TokenFormer model."""
        raise ConfigError(
            f"model.arch={self.arch}: transformers has no TokenFormer architecture (Pattention "
            "token-parameter layers with GeLU-normalised scores); export is not possible"
        )

    def grow_from(self, old: "TokenFormerConfig") -> "TokenFormerConfig":
        """The growth rule (docs/families.md "Growth"): only the token counts may change, none may
        shrink; each Pattention's score scale stays frozen at the old run's."""
        for field in ("layers", "hidden", "heads", "rotary_fraction", "rope_base", "vocab_size",
                      "tied_embeddings", "norm_eps"):
            if getattr(self, field) != getattr(old, field):
                raise ConfigError(
                    f"model.{field}={getattr(self, field)}: a TokenFormer grows by its token counts "
                    f"only; keep model.{field}={getattr(old, field)}"
                )
        frozen = {}
        for kind in ("qkv", "proj", "ffn"):
            new_n, old_n = getattr(self, f"{kind}_tokens"), getattr(old, f"{kind}_tokens")
            if new_n < old_n:
                raise ConfigError(
                    f"model.{kind}_tokens={new_n} is fewer than the run's {old_n}: growth only "
                    "adds tokens"
                )
            scale = old.scale_tokens(kind)
            frozen[f"{kind}_scale_tokens"] = 0 if scale == new_n else scale
        return replace(self, **frozen)

    GROWTH_STEP: ClassVar[int] = 8
    """Planned stages' token counts are multiples of this (tp up to 8 divides them)."""

    def growth_stages(self, count: int) -> list[tuple["TokenFormerConfig", float]]:
        """A planned growth ladder ending at this shape (`orchestrate plan --growth-stages K`):
        stage i has this shape's token counts halved K - 1 - i times (the paper's incremental
        ladder roughly doubles the parameter tokens per stage: 124M -> 354M -> 757M -> 1.4B), each
        stage grown from the one before by `grow_from` (so the score scales stay frozen at stage
        0's), and every stage trains the same number of tokens (the paper's 30B per stage)."""
        if count < 2:
            raise ConfigError(f"--growth-stages must be at least 2, got {count}")
        step = self.GROWTH_STEP
        first = {name: getattr(self, name) // 2 ** (count - 1) for name in _COUNTS}
        small = [name for name, n in first.items() if n < step]
        if small:
            raise ConfigError(
                f"--growth-stages {count}: model.{small[0]}={getattr(self, small[0])} halved "
                f"{count - 1} times is below {step} tokens; plan fewer stages or a larger budget"
            )
        stages: list[tuple[TokenFormerConfig, float]] = []
        previous = None
        for i in range(count):
            halvings = count - 1 - i
            counts = {name: max(step, getattr(self, name) // 2 ** halvings // step * step)
                      for name in _COUNTS}
            shape = replace(self, **counts, qkv_scale_tokens=0, proj_scale_tokens=0,
                            ffn_scale_tokens=0)
            if previous is not None:
                shape = shape.grow_from(previous)
            stages.append((shape, 1.0 / count))
            previous = shape
        return stages

    # ------------------------------------------------------------------------------------------
    # accounting

    def layer_params(self) -> int:
        """One layer's parameter tokens: 2 d (3 n_qkv + n_proj + n_ffn) (the pre-norms have none)."""
        return 2 * self.hidden * (3 * self.qkv_tokens + self.proj_tokens + self.ffn_tokens)

    def embedding_params(self) -> int:
        """Input embedding plus the output layer when it is not tied to it."""
        table = self.vocab_size * self.hidden
        return table if self.tied_embeddings else 2 * table

    def num_params(self) -> int:
        """Exact total parameters: embedding, layers, final LayerNorm (gain and bias)."""
        return self.embedding_params() + self.layers * self.layer_params() + 2 * self.hidden

    def matmul_params(self) -> int:
        """Parameters multiplied per token: every key and value token, plus the output layer."""
        return self.layers * self.layer_params() + self.vocab_size * self.hidden

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x multiplied parameters + 12 L d s (QK^T, AV)."""
        return float(6 * self.matmul_params() + 12 * self.layers * self.hidden * seq_len)
