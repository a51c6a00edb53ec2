"""The torch-free half of the family contract: what every `arch/<family>/config.py` class provides.

The planner, the layout search, the checks and the trainer's torch-free checks call only these
methods and read only the fields declared here, never the family's name (docs/families.md has the
contract as a table). `FamilyConfig` is the base every family config inherits; a family overrides
what differs. The defaults hold for a model whose active parameters are all its parameters, whose
pipeline cuts between equal layers, whose compute is 6 N D, and which has no growth rule.

A family config must define (the base raises NotImplementedError for these): `num_params()`,
`embedding_params()`, `flops_per_token(seq_len)`, `for_params(n, base)`, `layer_kinds()`,
`divisibility(seq_len)`, `summary()`, and the fields `arch`, `layers`, `hidden`, `heads`,
`vocab_size`. The builder half is named by `builder_class` (arch/common/builder.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scaleforge.arch.common import law
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
    """Defaults of the contract; a family overrides what differs (MoE: active parameters, ...).

    Fields every family has (dataclass fields of the family's config; the core reads them):"""

    arch: str
    """Family name in the registry (`model.arch`); the first field, its default the family's name."""
    layers: int
    """Layers of the built model (the trainer checks `parallel.offload_layers` against it)."""
    hidden: int
    """Residual stream width (the memory model's layer inputs and logits)."""
    heads: int
    """Attention heads (the default `activation_bytes`' score term)."""
    vocab_size: int
    """Vocabulary size (the memory model's logits; the trainer checks it against the store's)."""

    builder_class: ClassVar[str] = ""
    """`module:Class` of the family's builder half (an `arch.common.builder.FamilyBuilder`),
    imported by the registry only when a model is built (the planner stays torch-free)."""
    planned_fields: ClassVar[tuple[str, ...]] = ()
    """Fields the shape rule (`for_params`) decides; `orchestrate plan --set` refuses them."""

    # ------------------------------------------------------------------------------------------
    # accounting (required)

    def num_params(self) -> int:
        """Exact total parameters of the built model. Dry run, memory model, planner, tests."""
        raise NotImplementedError(f"{type(self).__name__} defines no num_params()")

    def embedding_params(self) -> int:
        """The input table plus an untied output layer. `non_embedding_params`, memory model."""
        raise NotImplementedError(f"{type(self).__name__} defines no embedding_params()")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM/MFU convention, the family's real work (experts visited,
        P streams, recursion passes). Planner (D = C / this), layout step time, metrics `flops`."""
        raise NotImplementedError(f"{type(self).__name__} defines no flops_per_token()")

    @classmethod
    def for_params(cls, n: float, base: "FamilyConfig") -> "FamilyConfig":
        """The shape rule: a shape whose law N is about `n`, the unplanned fields from `base`.
        Planner, for every ladder rung and the target."""
        raise NotImplementedError(f"{cls.__name__} defines no for_params()")

    def layer_kinds(self) -> list[LayerKind]:
        """The built layers in order. Memory model (per-layer bytes), pipeline cuts."""
        raise NotImplementedError(f"{type(self).__name__} defines no layer_kinds()")

    def divisibility(self, seq_len: int) -> list[Divisible]:
        """Rows (field, value, parallel axis that must divide it). RunSpec checks, layout search."""
        raise NotImplementedError(f"{type(self).__name__} defines no divisibility()")

    def summary(self) -> str:
        """A short shape description (`4x256`). Plan table, growth table."""
        raise NotImplementedError(f"{type(self).__name__} defines no summary()")

    # ------------------------------------------------------------------------------------------
    # accounting (defaults)

    def active_params(self) -> int:
        """Parameters one token uses (forward): equals the total for a model without routing.
        Dry run, `law_variables`."""
        return self.num_params()

    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and output layer (Kaplan's N; the Step Law's N).
        Dry run, planner."""
        return self.num_params() - self.embedding_params()

    def active_non_embedding_params(self) -> int:
        """Non-embedding parameters one token uses. `law_variables`."""
        return self.active_params() - self.embedding_params()

    def law_variables(self) -> dict[str, float]:
        """What the scaling law sees: `N` (Chinchilla's N, embeddings counted) and `N_non_embedding`
        (the Step Law's); a family adds its own (ParScale: `P`). Planner, refit."""
        return {"N": float(self.active_params()),
                "N_non_embedding": float(self.active_non_embedding_params())}

    def pipeline_layers(self) -> int:
        """Layers a pipeline cut divides evenly (pp must divide it). Layout search, checks."""
        return len(self.layer_kinds())

    def activation_bytes(
        self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int = 1, sp: bool = False,
        recompute: str = "none", flash: bool = False, fp32: bool = False,
    ) -> float:
        """Activation bytes one layer keeps for backward. Memory model (parallel/memory.py), for
        every layer, in both precisions: bf16 (2 bytes an element), or with `fp32` the CPU mode
        (4 bytes an element; a family that counts its saved tensors exactly says so here). The
        default: Korthikanti's transformer layer, in fp32 at twice its bf16 bytes (its dropout
        masks are then over-counted)."""
        from scaleforge.parallel.memory import activation_bytes_per_layer

        bf16 = activation_bytes_per_layer(
            seq_len=seq_len, micro_batch=micro_batch, hidden=self.hidden, heads=self.heads, tp=tp,
            sp=sp, recompute=recompute, flash=flash,
        )
        return bf16 * (2 if fp32 else 1)

    # ------------------------------------------------------------------------------------------
    # planning (defaults: the Chinchilla law as it is, nothing planned besides the shape)

    def plan_variant(self, params: dict, budget: float, user_keys: frozenset) -> "FamilyConfig":
        """This config with what the family plans besides the shape at `budget` under the law
        `params` (ParScale: P; `user_keys`: the `--set` keys, which the rule must keep). Planner,
        once per plan, before the ladder. Default: itself."""
        return self

    def compute_optimal(self, params: dict, budget: float) -> tuple[float, float]:
        """Compute-optimal (N, D) at `budget` FLOPs. Planner, for the target. Default: the
        Chinchilla law's under C = 6 N D (`arch.common.law`)."""
        return law.compute_optimal(params, budget)

    def law_loss(self, params: dict, n: float, d: float) -> float:
        """Predicted loss of N parameters trained on D tokens. Planner, for every run. Default: the
        Chinchilla law's (`arch.common.law`)."""
        return law.chinchilla_loss(params, n, d)

    def plan_notes(self, params: dict, budget: float) -> list[str]:
        """Lines the plan table prints after the runs (ParScale: its streams table). `orchestrate
        plan`, once. Default: none."""
        return []

    # ------------------------------------------------------------------------------------------
    # growth (defaults: none; docs/families.md "Growth")

    def grow_from(self, old: "FamilyConfig") -> "FamilyConfig":
        """The growth rule: the config a run of this shape trains when it starts from a run of
        shape `old` (one-line ConfigError for a change it cannot make). `orchestrate grow` and the
        trainer at step 0 of a run with `checkpoint.init_from` (pretrain/grow.py). Default:
        refused."""
        raise ConfigError(
            f"model.arch={self.arch} has no growth rule (its config defines no grow_from); "
            "start the run from its seed instead"
        )

    def growth_stages(self, count: int) -> list[tuple["FamilyConfig", float]]:
        """A planned growth ladder ending at this shape: `count` (shape, share of the tokens)
        stages, each grown from the one before. `orchestrate plan --growth-stages K`. Default:
        refused (`plans_growth()` is then False)."""
        raise ConfigError(
            f"--growth-stages: model.arch={self.arch} has no planned growth ladder (its config "
            "defines no growth_stages); plan it from scratch"
        )

    def plans_growth(self) -> bool:
        """Whether the family defines `growth_stages` (the planner refuses `--growth-stages`
        before it plans anything when it does not). Not for a family to override."""
        return type(self).growth_stages is not FamilyConfig.growth_stages

    def hf_target(self, seq_len: int) -> Target:
        """The Hugging Face model this shape exports to: `orchestrate export` asks before it reads
        the checkpoint. A family that transformers has overrides it with its mapping
        (`arch/<family>/hf.py`), refusing a setting transformers cannot express with a one-line
        ConfigError naming it; a family without a counterpart says why. Torch-free."""
        raise ConfigError(f"model.arch={self.arch}: no Hugging Face export for this family")
