"""The torch-free half of the parallel-block family: the LLaMA-style decoder shape, one norm a layer.

A layer is GPT-J's (Wang & Komatsuzaki 2021) and PaLM's: attention and MLP read the same pre-norm
output and both add to the residual, x + attn(norm(x)) + mlp(norm(x)); RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases. The shape, its checks, the FLOPs (the same matmuls as the
sequential block) and the shape rule are the LLaMA-style decoder's (arch/common/decoder.py), which this
config extends; what
differs is the parameter count of the megatron model `model.py` builds: one RMSNorm weight per layer
(there is no pre-MLP norm) besides the fused QKV, the output projection, the fused [gate; up] fc1 and
fc2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scaleforge.arch.common.decoder import DecoderConfig


@dataclass(kw_only=True, frozen=True)
class ParallelBlockConfig(DecoderConfig):
    """A decoder of parallel attention + MLP blocks sharing one pre-norm."""

    builder_class: ClassVar[str] = "families.parallel_block.model:ParallelBlockBuilder"
    """The builder half, imported when a model is built."""

    arch: str = "parallel_block"
    """Family name in the architecture registry."""

    def layer_params(self) -> int:
        """All weights of one block: its linear layers plus its one RMSNorm weight."""
        return self.layer_matmul_params() + self.hidden
