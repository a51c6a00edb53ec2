"""Torch-free registry: `model.arch` name -> the family's config class (its builder imports lazily).

The only place a family is looked up by name. Adding an architecture is one folder `arch/<family>/`
(config.py + model.py) and one line here; a family defined outside the package is registered through
the environment instead (docs/adding-a-family.md):

    SCALEFORGE_FAMILIES=my_package.my_family:MyConfig[,other.module:OtherConfig]

Each entry names a `FamilyConfig` subclass whose `arch` default is its name; its module must be
importable (on PYTHONPATH) wherever the family is used. The variable is read on every look-up, so
`orchestrate plan`, `orchestrate train` and the trainer's ranks (torchrun's children and Slurm's
tasks inherit the environment) all see the same families.
"""

from __future__ import annotations

import functools
import importlib
import os

from scaleforge.arch.common.family import FamilyConfig
from scaleforge.errors import ConfigError

FAMILIES: dict[str, str] = {
    "dense": "scaleforge.arch.dense.config:DenseConfig",
    "moe": "scaleforge.arch.moe.config:MoEConfig",
    "mamba": "scaleforge.arch.mamba.config:MambaConfig",
    "mor": "scaleforge.arch.mor.config:MoRConfig",
    "parscale": "scaleforge.arch.parscale.config:ParScaleConfig",
    "tokenformer": "scaleforge.arch.tokenformer.config:TokenFormerConfig",
}
"""The families of the package: name -> `module:Class` of its config."""

ENV = "SCALEFORGE_FAMILIES"
"""Environment variable naming out-of-tree family configs, `module:Class` separated by commas."""


def _load(ref: str) -> type:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def _outside(value: str) -> dict[str, type]:
    """The families `SCALEFORGE_FAMILIES=value` registers (one-line ConfigErrors)."""
    found: dict[str, type] = {}
    for ref in (part.strip() for part in value.split(",")):
        if not ref:
            continue
        module, sep, name = ref.partition(":")
        if not sep or not module or not name.isidentifier():
            raise ConfigError(f"{ENV}: {ref!r} is not module:Class; write e.g. "
                              f"{ENV}=my_package.my_family:MyConfig")
        try:
            cls = _load(ref)
        except ImportError as exc:
            raise ConfigError(f"{ENV}: cannot import {module!r} ({exc}); put its folder on "
                              "PYTHONPATH or correct the module name") from None
        except AttributeError:
            raise ConfigError(f"{ENV}: module {module!r} has no {name!r}; name its config "
                              "class") from None
        if not (isinstance(cls, type) and issubclass(cls, FamilyConfig)):
            raise ConfigError(f"{ENV}: {ref} is not a FamilyConfig subclass "
                              "(scaleforge.arch.common.family); name the family's config class")
        arch = getattr(cls, "arch", None)  # the dataclass field's default
        if not isinstance(arch, str):
            raise ConfigError(f"{ENV}: {ref} has no `arch` default; give its first field "
                              "`arch: str = \"<family name>\"`")
        if arch in FAMILIES or arch in found:
            raise ConfigError(f"{ENV}: {ref} registers model.arch={arch!r}, which is taken; "
                              "give its `arch` field another default")
        found[arch] = cls
    return found


def _families() -> dict[str, str | type]:
    return {**FAMILIES, **_outside(os.environ.get(ENV, ""))}


def known_archs() -> list[str]:
    """Registered family names (the package's and `SCALEFORGE_FAMILIES`')."""
    return sorted(_families())


def config_class(arch: str) -> type:
    """The config dataclass of family `arch` (a FamilyConfig subclass)."""
    families = _families()
    if arch not in families:
        raise ConfigError(f"unknown model.arch {arch!r}; known: {', '.join(sorted(families))}")
    found = families[arch]
    return _load(found) if isinstance(found, str) else found


def builder_module(arch: str):
    """The family's builder half, a `FamilyBuilder` (its module imports torch and megatron)."""
    return _load(config_class(arch).builder_class)()
