"""The torch-free half of the family contract: what every `arch/<family>/config.py` class provides.

The planner, the layout search and the checks use only these methods, never the family's name
(docs/families.md). `FamilyConfig` is the base every family config inherits; its defaults hold for a
model whose active parameters are all its parameters and whose pipeline cuts between equal layers.

A family config must define (the base has no default for these):
- `num_params()`: exact total parameters of the built model;
- `embedding_params()`: the input table plus an untied output layer;
- `flops_per_token(seq_len)`: training FLOPs per token, PaLM/MFU convention, the family's real work;
- `for_params(n, base)` (classmethod): a shape whose law N is about `n`, other fields from `base`;
- `layer_kinds()`: the built layers in order, as `LayerKind`s (memory model, pipeline cuts);
- `divisibility(seq_len)`: `Divisible` rows (field, value, parallel axis that must divide it);
- `summary()`: a short shape description for tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleforge.arch.common.hf import Target
from scaleforge.errors import ConfigError


@dataclass(frozen=True)
class Divisible:
    """A model field that a parallel size must divide."""

    field: str
    """Dotted RunSpec key (`model.heads`, `data.seq_len`)."""
    value: int
    """Its value in this shape."""
    axis: str
    """`tp`, `pp` or `ep`: the ParallelSpec field that must divide `value`."""
    advice: str = ""
    """What to change, for the one-line error (default: pick a size that divides it)."""


@dataclass(frozen=True)
class LayerKind:
    """One built layer as the memory model sees it."""

    kind: str
    """`transformer` (attention + MLP), `transformer_moe` (attention + MoE), `mamba`, `attention`,
    `mlp`, `moe`: the family's `activation_bytes` knows each of its kinds."""
    params: int
    """Parameters of the layer (experts included)."""
    expert_params: int = 0
    """The part of `params` in routed experts (sharded over expert parallelism)."""
    kv_heads: int = 0
    """Key/value heads of its attention (0: no KV cache, e.g. a Mamba layer)."""


class FamilyConfig:
    """Defaults of the contract; a family overrides what differs (MoE: active parameters, ...)."""

    def active_params(self) -> int:
        """Parameters one token uses (forward): equals the total for a model without routing."""
        return self.num_params()

    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and output layer (Kaplan's N; the Step Law's N)."""
        return self.num_params() - self.embedding_params()

    def active_non_embedding_params(self) -> int:
        """Non-embedding parameters one token uses."""
        return self.active_params() - self.embedding_params()

    def law_variables(self) -> dict[str, float]:
        """What the scaling law sees: `N` (Chinchilla's N, embeddings counted) and `N_non_embedding`
        (the Step Law's); a family adds its own (ParScale: `P`)."""
        return {"N": float(self.active_params()),
                "N_non_embedding": float(self.active_non_embedding_params())}

    def pipeline_layers(self) -> int:
        """Layers a pipeline cut divides evenly (pp must divide it)."""
        return len(self.layer_kinds())

    def activation_bytes(
        self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int = 1, sp: bool = False,
        recompute: str = "none", flash: bool = False,
    ) -> float:
        """Activation bytes one layer keeps for backward (bf16); the base knows transformer layers."""
        from scaleforge.parallel.layout import activation_bytes_per_layer

        return activation_bytes_per_layer(
            seq_len=seq_len, micro_batch=micro_batch, hidden=self.hidden,
            heads=getattr(self, "heads", 1), tp=tp, sp=sp, recompute=recompute, flash=flash,
        )

    def hf_target(self, seq_len: int) -> Target:
        """The Hugging Face model this shape exports to: `orchestrate export` asks before it reads
        the checkpoint. A family that transformers has overrides it with its mapping
        (`arch/<family>/hf.py`), refusing a setting transformers cannot express with a one-line
        ConfigError naming it; a family without a counterpart says why. Torch-free."""
        raise ConfigError(f"model.arch={self.arch}: no Hugging Face export for this family")
