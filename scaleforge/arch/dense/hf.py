"""Dense -> LlamaForCausalLM: the dense model is the LLaMA decoder, block for block, so its mapping
is arch/common/hf_llama.py's (which ParScale at P=1 shares)."""

from __future__ import annotations

from typing import Any

from scaleforge.arch.common import hf_llama
from scaleforge.arch.common.hf import Target


def target(cfg: Any, *, seq_len: int) -> Target:
    """LlamaForCausalLM of a dense shape; every dense setting has a LLaMA counterpart."""
    return hf_llama.target(cfg, seq_len=seq_len)
