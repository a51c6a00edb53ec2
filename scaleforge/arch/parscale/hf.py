"""ParScale -> LlamaForCausalLM at P=1 (no prefix, no aggregator: the dense model exactly, the same
tensor names); transformers has no architecture for P > 1."""

from __future__ import annotations

from typing import Any

from scaleforge.arch.common import hf_llama
from scaleforge.arch.common.hf import Target
from scaleforge.errors import ConfigError


def target(cfg: Any, *, seq_len: int) -> Target:
    """LlamaForCausalLM of the P=1 model; a one-line refusal for P > 1."""
    if cfg.streams != 1:
        raise ConfigError(
            f"model.streams={cfg.streams}: transformers has no ParScale architecture (P parallel "
            "streams with learned prefixes and an aggregator); only streams=1, the dense model, "
            "exports (as LlamaForCausalLM)"
        )
    return hf_llama.target(cfg, seq_len=seq_len)
