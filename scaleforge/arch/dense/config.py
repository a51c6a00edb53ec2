"""Dense LLaMA-style decoder (torch-free): the decoder of arch/common/decoder.py as it is, with its
shape rule (arch/common/shapes.py) and its export to LlamaForCausalLM (arch/dense/hf.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scaleforge.arch.common.decoder import DecoderConfig
from scaleforge.arch.common.hf import Target
from scaleforge.arch.dense import hf


@dataclass(kw_only=True, frozen=True)
class DenseConfig(DecoderConfig):
    """A LLaMA-style GPT: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases."""

    builder_class: ClassVar[str] = "scaleforge.arch.dense.model:DenseBuilder"
    """The builder half (arch/common/builder.py), imported when a model is built."""

    arch: str = "dense"
    """Family name in the architecture registry."""

    def hf_target(self, seq_len: int) -> Target:
        """LlamaForCausalLM (arch/dense/hf.py)."""
        return hf.target(self, seq_len=seq_len)
