"""Mixture-of-Recursions shape (torch-free) with its exact parameter and FLOP accounting.

MoR (Bae et al. 2025, methods.md section 3): a LLaMA-style GPT (arch/common/decoder.py) of `layers` applied
layers whose weights are shared across `recursions` recursion steps, with a router that decides per
token how many steps it takes.

Sharing (`sharing`, `sharing_strategy/llama.py` of the reference):
- `cycle`: base_depth = L / N_r unique layers, applied as (1..b)(1..b)...: recursion step r runs them all;
- `sequence`: the same unique layers, each applied N_r times in a row, (1,1,1)(2,2,2)...; recursion
  step r is the r-th run of base_depth consecutive applied layers;
- `middle_cycle` / `middle_sequence` (the paper's best is Middle-Cycle): the first and the last layer
  are unique and run for every token; base_depth = (L - 2) / N_r.
A shape whose layers do not split evenly is refused (the reference resamples with linspace).

Routing (`routing`): `expert` (expert choice: per step r a linear router, sigmoid x 0.1 gates, the top
k_r = floor(s (N_r - r + 1) / N_r) of the tokens that survived step r - 1) or `token` (token choice:
one linear router to N_r logits at the start, softmax, top-1 is each token's depth). Either router
is N_r x hidden weights without bias.

Counts (unique parameters, each shared block once): embedding (+ untied output layer) + U blocks
+ N_r hidden (router) + hidden (final norm), U = base_depth (+ 2 with a middle scheme).
FLOPs per token (PaLM/MFU convention like dense) count the block passes a token really makes: the
unique first and last layers once, the shared block sum_r k_r / s = (N_r + 1) / 2 times (expert
choice, methods section 3; token choice is planned at the balanced depth distribution, which gives
the same schedule), attention of step r over its k_r tokens (12 H Q k_r^2 / s per token), the router
on its candidates, and the output layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from scaleforge.arch.common.decoder import DecoderConfig
from scaleforge.arch.common.family import Divisible, LayerKind
from scaleforge.arch.common.hf import Target
from scaleforge.arch.common.shapes import dense_shape
from scaleforge.errors import ConfigError

SHARINGS = ("middle_cycle", "cycle", "middle_sequence", "sequence")
ROUTINGS = ("expert", "token")
GATE_SCALE = 0.1
"""Expert-choice gate g = sigmoid(logit) x 0.1 (the reference's alpha)."""


@dataclass(kw_only=True, frozen=True)
class MoRConfig(DecoderConfig):
    """A LLaMA-style GPT whose middle layers are one shared block applied recursively, routed."""

    builder_class: ClassVar[str] = "scaleforge.arch.mor.model:MoRBuilder"
    """The builder half (arch/common/builder.py), imported when a model is built."""
    planned_fields: ClassVar[tuple[str, ...]] = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden")
    """Fields the shape rule (`for_params`) decides; the planner refuses `--set` on them."""

    arch: str = "mor"
    """Family name in the architecture registry."""
    layers: int = 8
    """Applied layers of the equivalent unshared model (L): with middle_cycle and 3 recursions,
    8 = 1 unique first + 3 x 2 shared + 1 unique last."""
    recursions: int = 3
    """Recursion steps N_r (1: no sharing, no routing effect); must divide the shared layers."""
    sharing: str = "middle_cycle"
    """Parameter sharing: `middle_cycle` (unique first and last layers, the paper's best), `cycle`,
    `middle_sequence` or `sequence`."""
    routing: str = "expert"
    """`expert` (expert choice, capacity (N_r - r + 1) / N_r per step, hierarchical filtering) or
    `token` (token choice, softmax top-1 depth)."""
    router_aux_coeff: float = 1e-3
    """Coefficient of the router's auxiliary loss: the BCE of the expert-choice router logits against
    top-k membership (the paper's 0.001), or the token-choice balancing loss sum_i f_i P_i (the
    paper's token config uses 0.1). 0: off."""
    router_z_coeff: float = 0.0
    """Router z-loss coefficient, mean(logsumexp(logits)^2) (token choice: the paper's 1e-5; for
    the expert-choice single logit it is mean(logit^2)). 0: off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.recursions
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"model.recursions must be an integer >= 1, got {r!r}")
        if self.sharing not in SHARINGS:
            raise ConfigError(f"model.sharing={self.sharing!r} is not one of {', '.join(SHARINGS)}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"model.routing={self.routing!r} is not one of {', '.join(ROUTINGS)}")
        shared = self.layers - 2 if self.middle else self.layers
        if shared < r or shared % r:
            what = "model.layers - 2 (first and last are unique)" if self.middle else "model.layers"
            raise ConfigError(
                f"model.recursions={r} must divide {what} = {shared} into steps of at least one "
                f"layer; pick layers = {'2 + ' if self.middle else ''}{r} x k"
            )
        for name in ("router_aux_coeff", "router_z_coeff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"model.{name} must be a finite number >= 0 (0: off), got {value!r}")

    # ------------------------------------------------------------------------------------------
    # the sharing pattern

    @property
    def middle(self) -> bool:
        """Unique first and last layers (middle_cycle, middle_sequence)."""
        return self.sharing.startswith("middle_")

    @property
    def base_depth(self) -> int:
        """Applied layers per recursion step."""
        return ((self.layers - 2) if self.middle else self.layers) // self.recursions

    @property
    def unique_layers(self) -> int:
        """Built (unique) transformer layers: base_depth, plus the first and last with middle_*."""
        return self.base_depth + (2 if self.middle else 0)

    def step_layers(self) -> list[list[int]]:
        """For each recursion step, the indices of the unique layers it applies in order (the shared
        block's layers are numbered from 1 with a middle scheme, 0 is the unique first layer)."""
        b, n = self.base_depth, self.recursions
        first = 1 if self.middle else 0
        if self.sharing.endswith("cycle"):
            applied = [first + i for _ in range(n) for i in range(b)]
        else:  # sequence: each unique layer N_r times in a row
            applied = [first + i // n for i in range(n * b)]
        return [applied[r * b:(r + 1) * b] for r in range(n)]

    def capacity_tokens(self, step: int, seq_len: int) -> int:
        """k_r, the tokens of a sequence that step `step` (1-based) processes under expert choice:
        floor(s (N_r - r + 1) / N_r), at least 1."""
        n = self.recursions
        return max(1, (seq_len * (n - step + 1)) // n)

    def block_passes(self, seq_len: int | None = None) -> float:
        """Mean passes through the shared block per token, sum_r k_r / s ((N_r + 1) / 2 without the
        floor of a finite sequence)."""
        n = self.recursions
        if seq_len is None:
            return (n + 1) / 2
        return sum(self.capacity_tokens(r, seq_len) for r in range(1, n + 1)) / seq_len

    # ------------------------------------------------------------------------------------------
    # the family contract (arch/common/family.py)

    @classmethod
    def for_params(cls, n: float, base: "MoRConfig") -> "MoRConfig":
        """About `n` UNIQUE parameters: dense's rule (arch/common/shapes.py) picks the width and the
        number of unique layers U; the applied depth is then L = 2 + (U - 2) N_r (middle schemes,
        U >= 3) or U N_r, the recursions, sharing and routing from `base`."""
        # the rule counts the unshared decoder's parameters, not MoR's
        common = {f.name: getattr(base, f.name) for f in dataclasses.fields(DecoderConfig)}
        dense = dense_shape(n, DecoderConfig(**common))
        r = base.recursions
        if base.middle:
            layers = 2 + max(1, dense.layers - 2) * r
        else:
            layers = dense.layers * r
        return dataclasses.replace(
            base, layers=layers, hidden=dense.hidden, heads=dense.heads, kv_heads=dense.kv_heads,
            ffn_hidden=dense.ffn_hidden,
        )

    def law_variables(self) -> dict[str, float]:
        """The law's N is the UNIQUE parameter count (what memory holds); the compute of the
        recursion passes is in `flops_per_token`. `block_passes` is reported alongside."""
        return {"N": float(self.num_params()),
                "N_non_embedding": float(self.non_embedding_params()),
                "block_passes": self.block_passes()}

    def divisibility(self, seq_len: int) -> list[Divisible]:
        """Heads, KV heads, the FFN and the vocabulary over tp (as dense); no pipeline cut (pp = 1):
        the recursion steps share one block's weights and carry the router's token selection from
        step to step, which megatron's pipeline (one hidden-state tensor between stages) cannot."""
        rows = [row for row in super().divisibility(seq_len) if row.axis != "pp"]
        rows.append(Divisible(
            "model.arch=mor pipeline stages", 1, "pp",
            "the shared recursion block and its router state cannot be cut; set parallel.pp=1",
        ))
        return rows

    def pipeline_layers(self) -> int:
        """1: no pipeline cut (see `divisibility`)."""
        return 1

    def layer_kinds(self) -> list[LayerKind]:
        """The applied layers in order: the unique first layer, each recursion step's block layers
        (kind `recursion_<r>`, parameters counted at their first use only), the unique last layer."""
        block = self.layer_params()
        kinds: list[LayerKind] = []
        if self.middle:
            kinds.append(LayerKind("transformer", block, kv_heads=self.kv_heads))
        seen: set[int] = set()
        for r, layers in enumerate(self.step_layers(), start=1):
            for index in layers:
                params = 0 if index in seen else block
                seen.add(index)
                kinds.append(LayerKind(f"recursion_{r}", params, kv_heads=self.kv_heads))
        if self.middle:
            kinds.append(LayerKind("transformer", block, kv_heads=self.kv_heads))
        return kinds

    def activation_bytes(self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int = 1,
                         sp: bool = False, recompute: str = "none", flash: bool = False,
                         fp32: bool = False) -> float:
        """A recursion step's layer keeps Korthikanti's bytes for its k_r tokens (attention over
        k_r tokens: the score term shrinks with them too)."""
        if layer.kind.startswith("recursion_"):
            seq_len = self.capacity_tokens(int(layer.kind.split("_")[1]), seq_len)
        return super().activation_bytes(layer, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                        sp=sp, recompute=recompute, flash=flash, fp32=fp32)

    def summary(self) -> str:
        """`layers x hidden / r N_r`: applied depth, width, recursions."""
        return f"{self.layers}x{self.hidden}/r{self.recursions}"

    def hf_target(self, seq_len: int) -> Target:
        """Refused: transformers has no MoR model."""
        raise ConfigError(
            f"model.arch={self.arch}: transformers has no Mixture-of-Recursions architecture "
            "(shared recursed blocks with a per-token depth router); export is not possible"
        )

    # ------------------------------------------------------------------------------------------
    # accounting

    def router_params(self) -> int:
        """N_r x hidden: one logit per step (expert choice) or N_r depth logits (token choice)."""
        return self.recursions * self.hidden

    def num_params(self) -> int:
        """Exact unique parameters: embedding, U blocks, router, final norm, (untied) output."""
        return (self.embedding_params() + self.unique_layers * self.layer_params()
                + self.router_params() + self.hidden)

    def matmul_params(self) -> float:
        """Weights multiplied per token (mean): unique first/last once, the block per pass, the
        router on its candidates, the output layer."""
        s_free = self.block_passes()  # (N_r + 1) / 2, for the planner's seq-free use
        return self._matmul(s_free, self._router_fraction(None))

    def _router_fraction(self, seq_len: int | None) -> float:
        """Router rows a token multiplies (mean): expert choice runs step r's row on the survivors
        of step r - 1; token choice runs all N_r rows once on every token."""
        n = self.recursions
        if self.routing == "token":
            return float(n)
        if seq_len is None:
            return sum((n - r + 2) / n if r > 1 else 1.0 for r in range(1, n + 1))
        return sum(1.0 if r == 1 else self.capacity_tokens(r - 1, seq_len) / seq_len
                   for r in range(1, n + 1))

    def _matmul(self, passes: float, router_rows: float) -> float:
        edges = 2 if self.middle else 0
        layer = self.layer_matmul_params()
        return (edges * layer + passes * self.base_depth * layer + router_rows * self.hidden
                + self.vocab_size * self.hidden)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x the matmul weights a token multiplies (block passes
        sum_r k_r / s) + 12 H Q per attended token (first/last: s; step r: k_r^2 / s per token)."""
        n = self.recursions
        ks = [self.capacity_tokens(r, seq_len) for r in range(1, n + 1)]
        matmul = self._matmul(sum(ks) / seq_len, self._router_fraction(seq_len))
        hq = self.heads * self.head_dim
        attended = (2 * seq_len if self.middle else 0) + self.base_depth * sum(k * k for k in ks) / seq_len
        return float(6 * matmul + 12 * hq * attended)
