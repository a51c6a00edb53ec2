"""Dense LLaMA-style decoder shape (torch-free) with its exact parameter and FLOP accounting."""

from __future__ import annotations

from dataclasses import dataclass

from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class DenseConfig:
    """A LLaMA-style GPT: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases."""

    arch: str = "dense"
    """Family name in the architecture registry."""
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
