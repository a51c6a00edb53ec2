"""ParScale shape (torch-free): P parallel streams through one dense backbone, with exact accounting.

ParScale (Chen et al. 2025, methods.md section 1): the input is embedded once and replicated P times
along the batch; every attention layer owns learnable prefix keys and values per stream,
`(P, kv_heads, prefix_tokens, head_dim)` each, that the stream's real tokens attend to (without
shifting their RoPE positions); the P final-norm hidden states are aggregated by a dynamic weighted
sum: an MLP `Linear(P h -> h) -> SiLU -> Linear(h -> P)` (both with bias), an fp32 softmax over P,
label smoothing `w (1 - eps) + eps / P`, then one LM head.

Extra parameters (methods: Delta N(P) = 2 L P n_kv n_prefix d_head + (P h h + h) + (h P + P)):
15,326,722 / 30,650,884 / 61,299,208 for P = 2 / 4 / 8 on the 4.4B shape (h 2560, L 36, n_kv 2,
d_head 160), tests/test_parscale.py. At P = 1 the model is the dense model exactly: no prefix, no
aggregator, Delta N = 0.

FLOPs per token (PaLM / MFU convention like dense): P x (6 x the blocks' matmul weights + 12 L heads
head_dim (seq_len + prefix_tokens) for attention over the prefix and the real keys) + 6 x (the LM
head + the aggregator's P h h + h P weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from scaleforge.arch.common.family import Divisible, LayerKind
from scaleforge.arch.common import law
from scaleforge.arch.common.decoder import DecoderConfig
from scaleforge.arch.common.hf import Target
from scaleforge.arch.common.shapes import dense_shape
from scaleforge.arch.parscale import hf
from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class ParScaleConfig(DecoderConfig):
    """A dense LLaMA-style GPT run as P parallel streams (prefix K/V per stream), aggregated."""

    builder_class: ClassVar[str] = "scaleforge.arch.parscale.model:ParScaleBuilder"
    """The builder half (arch/common/builder.py), imported when a model is built."""
    planned_fields: ClassVar[tuple[str, ...]] = DecoderConfig.planned_fields
    """Fields the shape rule decides; `streams` is the user's (`--set model.streams=`) or the
    planner's choice among 1, 2, 4, 8."""

    arch: str = "parscale"
    """Family name in the architecture registry."""
    streams: int = 2
    """P, the parallel streams (1: exactly the dense model, no prefix and no aggregator)."""
    prefix_tokens: int = 48
    """Learnable prefix keys/values per stream per attention layer (the paper's 48); 0: the streams
    differ only through nothing, which makes them identical (kept for ablations)."""
    smoothing: float = 0.01
    """Label smoothing eps of the aggregation weights, w (1 - eps) + eps / P, in [0, 1)
    (0.01 is the reference config's `parscale_attn_smooth`; the paper's ablation reportedly
    favours 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.streams, int) or isinstance(self.streams, bool) or self.streams < 1:
            raise ConfigError(f"model.streams must be an integer >= 1 (1: the dense model), "
                              f"got {self.streams!r}")
        if (not isinstance(self.prefix_tokens, int) or isinstance(self.prefix_tokens, bool)
                or self.prefix_tokens < 0):
            raise ConfigError(f"model.prefix_tokens must be an integer >= 0, got "
                              f"{self.prefix_tokens!r}")
        eps = self.smoothing
        if (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                or not 0 <= eps < 1):
            raise ConfigError(f"model.smoothing must be in [0, 1), got {eps!r}")

    @property
    def prefix(self) -> int:
        """Prefix tokens actually built: none at P = 1 (the dense model)."""
        return self.prefix_tokens if self.streams > 1 else 0

    # ------------------------------------------------------------------------------------------
    # accounting

    def prefix_params(self) -> int:
        """Prefix keys and values of one attention layer: 2 P kv_heads prefix head_dim."""
        return 2 * self.streams * self.kv_heads * self.prefix * self.head_dim

    def aggregator_params(self) -> int:
        """Linear(P h -> h) + bias and Linear(h -> P) + bias; none at P = 1."""
        if self.streams == 1:
            return 0
        p, h = self.streams, self.hidden
        return (p * h * h + h) + (h * p + p)

    def extra_params(self) -> int:
        """Delta N(P): what ParScale adds to the dense model of the same shape."""
        return self.layers * self.prefix_params() + self.aggregator_params()

    def layer_params(self) -> int:
        """One block: dense's weights plus its prefix keys and values."""
        return super().layer_params() + self.prefix_params()

    def num_params(self) -> int:
        """Exact total parameters: the dense model plus the prefixes and the aggregator."""
        return super().num_params() + self.aggregator_params()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: P x (blocks + attention over prefix + real keys) + LM head +
        aggregator, 6 x matmul weights each (PaLM convention)."""
        p = self.streams
        blocks = self.layers * self.layer_matmul_params()
        attention = 12 * self.layers * self.heads * self.head_dim * (seq_len + self.prefix)
        head = self.vocab_size * self.hidden
        agg = (p * self.hidden * self.hidden + self.hidden * p) if p > 1 else 0
        return float(p * (6 * blocks + attention) + 6 * (head + agg))

    # ------------------------------------------------------------------------------------------
    # the family contract

    def law_variables(self) -> dict[str, float]:
        """N (prefixes and aggregator included, as the ParScale law wants), and P."""
        return {**super().law_variables(), "P": float(self.streams)}

    @classmethod
    def for_params(cls, n: float, base: "ParScaleConfig") -> "ParScaleConfig":
        """Dense's shape rule (arch/common/shapes.py) on the ParScale count (the prefixes are part
        of each layer, the aggregator of the fixed part): about `n` total parameters at `base`'s P."""
        return dense_shape(n, base)

    def hf_target(self, seq_len: int) -> Target:
        """LlamaForCausalLM at P=1, refused for P > 1 (arch/parscale/hf.py)."""
        return hf.target(self, seq_len=seq_len)

    # planning hooks of the contract (arch/common/family.py); the rules: arch/parscale/planning.py

    def plan_variant(self, params: dict, budget: float, user_keys: frozenset) -> "ParScaleConfig":
        """This config at the P the planner picks for `budget` (`--set model.streams` fixes P)."""
        import dataclasses

        from scaleforge.arch.parscale import planning

        if "model.streams" in user_keys:
            return self
        p = planning.choose_streams(params, budget, planning.law_k(params))
        return dataclasses.replace(self, streams=p)

    def compute_optimal(self, params: dict, budget: float) -> tuple[float, float]:
        """(N, D) compute-optimal at this P: Chinchilla at compute budget m / P, N = N' / m."""
        from scaleforge.arch.parscale import planning

        k = planning.law_k(params)
        m = planning.multiplier(self.streams, k)
        n_eff, d = law.compute_optimal(params, budget * m / self.streams)
        return n_eff / m, d

    def law_loss(self, params: dict, n: float, d: float) -> float:
        """Predicted loss with the P streams' parameter multiplier k ln P + 1."""
        from scaleforge.arch.parscale import planning

        return planning.predicted_loss(params, n, d, self.streams, planning.law_k(params))

    def plan_notes(self, params: dict, budget: float) -> list[str]:
        """The streams table: each P's N, D, loss and inference weight memory against the dense
        model of the same parameter term (the paper's reason to pick P over N)."""
        from scaleforge.arch.parscale import planning

        k = planning.law_k(params)
        lines = [
            f"ParScale streams at {budget:.3g} FLOPs: assumes L = E + A/(N(k ln P + 1))^alpha + "
            f"B/D^beta, k={k:.4g}, C = 6 N D P (P acts on the parameter term only)",
            f"{'P':>3} {'N':>10} {'D':>10} {'loss':>8} {'weights GB':>11} {'dense N same loss':>18} "
            f"{'dense GB':>9} {'KV x':>5}",
        ]
        for row in planning.stream_options(params, budget, k):
            mark = " <- planned" if row.p == self.streams else ""
            lines.append(
                f"{row.p:>3} {row.n:>10.3g} {row.d:>10.3g} {row.loss:>8.4f} {row.weights_gb:>11.3g} "
                f"{row.dense_n:>18.3g} {row.dense_weights_gb:>9.3g} {row.p:>5}{mark}")
        lines.append("At fixed training compute P=1 predicts the lowest loss; P>1 serves the loss of "
                     "the 'dense N' model with 1/(k ln P + 1) of its weight memory (plus a P x KV "
                     "cache): pick it with --set model.streams=P when inference memory binds.")
        return lines

    _BACKBONE: ClassVar[tuple[str, ...]] = (
        "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab_size", "tied_embeddings",
        "rope_base", "norm_eps",
    )

    def grow_from(self, old: "ParScaleConfig") -> "ParScaleConfig":
        """The growth rule (pretrain/grow.py), the paper's two-stage recipe: a P = 1 run's backbone
        is loaded as it is (same names as dense), the prefixes and the aggregator keep the seed's
        initialisation. Only from P = 1 (a P > 1 run's prefixes would have to be re-cut per stream)
        or from the same P and prefix (a continuation, e.g. with other smoothing), and only with
        the same backbone shape."""
        for name in self._BACKBONE:
            if getattr(old, name) != getattr(self, name):
                raise ConfigError(
                    f"model.{name}={getattr(self, name)}: ParScale grows the streams of a fixed "
                    f"backbone; keep model.{name}={getattr(old, name)} of the run it grows from"
                )
        if old.streams != 1 and old.streams != self.streams:
            raise ConfigError(
                f"model.streams={self.streams}: ParScale grows from a P=1 run only (this one has "
                f"P={old.streams}); grow from its P=1 stage"
            )
        if old.streams > 1 and old.prefix_tokens != self.prefix_tokens:
            raise ConfigError(
                f"model.prefix_tokens={self.prefix_tokens}: a P={old.streams} run's prefixes have "
                f"{old.prefix_tokens} tokens; keep model.prefix_tokens={old.prefix_tokens}"
            )
        return self

    STAGE_ONE_SHARE: ClassVar[float] = 1000 / 1020
    """Tokens of the P = 1 stage in a planned two-stage run: the paper trains 1T tokens at P = 1,
    then 20B with P > 1 (its new parameters converge after about 0.2B)."""

    def growth_stages(self, count: int) -> list[tuple["ParScaleConfig", float]]:
        """The paper's two-stage recipe as a planned ladder (`orchestrate plan --growth-stages 2`):
        this backbone at P = 1 for 1000/1020 of the tokens, then grown to this P for the rest."""
        if count != 2:
            raise ConfigError(f"--growth-stages {count}: ParScale's recipe has 2 stages (P=1, then "
                              "P>1); use --growth-stages 2")
        if self.streams == 1:
            raise ConfigError("--growth-stages 2 with model.streams=1: the second stage adds "
                              "streams; pass --set model.streams=P with P > 1")
        first = replace(self, streams=1)
        return [(first, self.STAGE_ONE_SHARE), (self.grow_from(first), 1 - self.STAGE_ONE_SHARE)]

    def divisibility(self, seq_len: int) -> list[Divisible]:
        """Dense's rows: the prefix keys/values are cut by KV heads over tp, as the attention is."""
        return super().divisibility(seq_len)

    def layer_kinds(self) -> list[LayerKind]:
        """`layers` identical blocks, each with its prefix keys/values (KV cache P x as large)."""
        block = LayerKind("transformer", self.layer_params(), kv_heads=self.kv_heads * self.streams)
        return [block] * self.layers

    def activation_bytes(
        self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int = 1, sp: bool = False,
        recompute: str = "none", flash: bool = False, fp32: bool = False,
    ) -> float:
        """A dense layer's bytes at a micro-batch P times as large (the streams ride the batch)."""
        return super().activation_bytes(layer, seq_len=seq_len, micro_batch=micro_batch * self.streams,
                                        tp=tp, sp=sp, recompute=recompute, flash=flash, fp32=fp32)

    def summary(self) -> str:
        """`layers x hidden P<streams>`, the table's shape column."""
        return f"{self.layers}x{self.hidden} P{self.streams}"
