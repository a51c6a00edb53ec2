"""Torch-free registry: `model.arch` name -> the family's config class (its builder imports lazily).

Adding an architecture is one folder `arch/<family>/` (config.py + model.py) and one line here.
"""

from __future__ import annotations

import importlib

from scaleforge.errors import ConfigError

# name -> (config module, config class, builder module)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "dense": ("scaleforge.arch.dense.config", "DenseConfig", "scaleforge.arch.dense.model"),
    "moe": ("scaleforge.arch.moe.config", "MoEConfig", "scaleforge.arch.moe.model"),
    "mamba": ("scaleforge.arch.mamba.config", "MambaConfig", "scaleforge.arch.mamba.model"),
    "mor": ("scaleforge.arch.mor.config", "MoRConfig", "scaleforge.arch.mor.model"),
    "parscale": ("scaleforge.arch.parscale.config", "ParScaleConfig", "scaleforge.arch.parscale.model"),
    "tokenformer": ("scaleforge.arch.tokenformer.config", "TokenFormerConfig", "scaleforge.arch.tokenformer.model"),
}


def known_archs() -> list[str]:
    """Registered family names."""
    return sorted(FAMILIES)


def config_class(arch: str) -> type:
    """The config dataclass of family `arch`."""
    if arch not in FAMILIES:
        raise ConfigError(f"unknown model.arch {arch!r}; known: {', '.join(known_archs())}")
    module, cls, _ = FAMILIES[arch]
    return getattr(importlib.import_module(module), cls)


def builder_module(arch: str):
    """The family's model-building module (imports torch and megatron)."""
    config_class(arch)
    return importlib.import_module(FAMILIES[arch][2])
