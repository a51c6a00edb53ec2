"""Torch-free: the Hugging Face architecture a run's model exports to, or a one-line refusal.

Each family with a transformers counterpart has a mapping module with `target(cfg, seq_len)`; a
setting transformers cannot express is refused there, naming the field, before anything is read or
written. Families without a counterpart are refused here with the reason.
"""

from __future__ import annotations

import importlib
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


# family -> mapping module (with `target(cfg, seq_len) -> Target`)
MAPPINGS: dict[str, str] = {
    "dense": "scaleforge.export.llama",
    "parscale": "scaleforge.export.llama",
    "moe": "scaleforge.export.moe",
    "mamba": "scaleforge.export.mamba",
}

# families whose architecture transformers does not have: why, in one line
NO_COUNTERPART: dict[str, str] = {
    "tokenformer": "transformers has no TokenFormer architecture (Pattention token-parameter "
                   "layers with GeLU-normalised scores); export is not possible",
    "mor": "transformers has no Mixture-of-Recursions architecture (shared recursed blocks with a "
           "per-token depth router); export is not possible",
}


def target_for(model: Any, *, seq_len: int) -> Target:
    """The export target of `model` (a family config) trained at `seq_len`; ConfigError otherwise."""
    arch = model.arch
    if arch in NO_COUNTERPART:
        raise ConfigError(f"model.arch={arch}: {NO_COUNTERPART[arch]}")
    if arch not in MAPPINGS:
        known = ", ".join(sorted(MAPPINGS))
        raise ConfigError(f"model.arch={arch}: no Hugging Face export for this family "
                          f"(exportable: {known})")
    return importlib.import_module(MAPPINGS[arch]).target(model, seq_len=seq_len)
