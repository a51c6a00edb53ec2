"""Mamba-2 and hybrid Mamba-2 / attention / MLP stacks (torch-free): shape, exact parameter and FLOP counts.

The layer string `pattern` (megatron's hybrid_override_pattern letters) says what each layer is:
`M` a Mamba-2 block, `*` an attention block, `-` a SwiGLU MLP block; empty means all `M`. It is a
unit tiled over `layers` (repeated, the last repeat cut): layers=6, pattern="M*" builds M*M*M*;
layers=4, pattern="MM*" builds MM*M. `E` is a MoE block (megatron's MoELayer: a top-k router over
`experts` SwiGLU experts of `moe_ffn_hidden`, optionally a shared expert), with the moe family's keys
and checks (arch/common/experts.py).

Parameters, per layer (d hidden, E expand, Ed = E d, N d_state, G groups, H = Ed / headdim Mamba
heads, K d_conv; every block has a pre-norm RMSNorm weight of d and no linear bias):
- `M`: d (norm) + d (2 Ed + 2 G N + H) (in_proj: z, x, B, C, dt) + (Ed + 2 G N)(K + 1) (depthwise
  conv weight and bias over x, B, C) + 3 H (A_log, D, dt_bias) + Ed (gated norm) + Ed d (out_proj).
  mamba2-130m (d 768, 24 layers, N 128, headdim 64, E 2, G 1, K 4, tied, vocab 50288): 3,765,320 a
  block, 128,989,632 in all (methods.md section 4; tests/test_mamba.py).
- `*`: d + d (heads + 2 kv_heads) head_dim + heads head_dim d, head_dim = hidden / heads.
- `-`: d + 3 d ffn_hidden (fused [gate; up] fc1 and fc2).
- `E`: d + experts d (router) + experts 3 d moe_ffn_hidden + 3 d shared_expert_ffn; a token uses
  top_k of the experts (active parameters).
Plus the embedding (vocab x d), a final RMSNorm (d) and an untied output layer (vocab x d).

FLOPs per token (training, PaLM / MFU convention as dense: 3 x forward):
- 6 x the matmul parameters (in_proj, out_proj, attention and MLP linears, the output layer);
- per `M` layer 3 x (SSD + conv) forward work, SSD = 2 Q G N + Q Ed + 4 N Ed (methods.md section 4:
  the intra-chunk C B^T and its masked product with dt x, the chunk states and their read-out;
  Q = min(chunk_size, seq_len)), conv = 2 K (Ed + 2 G N);
- per `*` layer 12 heads head_dim seq_len (QK^T and AV, no causal halving, as dense);
- an `E` layer counts what a token multiplies: the router, top_k experts and the shared expert.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from scaleforge.arch.common import shapes
from scaleforge.arch.common.experts import check_expert_keys
from scaleforge.arch.common.family import Divisible, FamilyConfig, LayerKind
from scaleforge.arch.common.hf import Target
from scaleforge.arch.mamba import hf
from scaleforge.errors import ConfigError

LETTERS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_MOE_FIELDS = ("experts", "top_k", "moe_ffn_hidden", "shared_expert_ffn", "capacity_factor",
               "drop_policy", "router_score", "expert_bias", "aux_loss_coeff", "z_loss_coeff",
               "dispatcher")
"""The moe family's keys: they shape `E` layers and mean nothing without one."""
"""Pattern letters this family builds (megatron's Symbols), and their LayerKind names."""


@dataclass(kw_only=True, frozen=True)
class MambaConfig(FamilyConfig):
    """A Mamba-2 stack, optionally hybrid with attention and MLP layers (`pattern`)."""

    builder_class: ClassVar[str] = "scaleforge.arch.mamba.model:MambaBuilder"
    """The builder half (arch/common/builder.py), imported when a model is built."""
    planned_fields: ClassVar[tuple[str, ...]] = ("layers", "hidden", "heads", "kv_heads",
                                                 "ffn_hidden", "headdim", "moe_ffn_hidden")
    """Fields the shape rule (`for_params`) decides; the planner refuses `--set` on them. The
    pattern is not among them: `--set model.pattern=M*M-` gives the unit the rule tiles."""

    arch: str = "mamba"
    """Family name in the architecture registry."""
    layers: int = 4
    """Number of layers (blocks), `pattern` tiled over them."""
    hidden: int = 128
    """Model width (residual stream size)."""
    d_state: int = 16
    """SSM state size N per head (mamba_ssm's default 128 is for GPU kernels; 16 keeps a tiny CPU
    model's state (b, H, P, N) and the SSD's chunk states small)."""
    headdim: int = 32
    """Channels P per Mamba head; must divide expand x hidden (heads H = expand x hidden / P)."""
    expand: int = 2
    """Inner width factor E of a Mamba block (Ed = E x hidden channels)."""
    groups: int = 1
    """Groups G sharing one B and C (like key/value groups); must divide the Mamba heads. With tp not
    dividing it, B and C are computed on every tensor-parallel rank (replicated)."""
    d_conv: int = 4
    """Kernel width of the causal depthwise convolution over (x, B, C)."""
    pattern: str = ""
    """Hybrid layer string tiled over `layers`: `M` Mamba-2, `*` attention, `-` SwiGLU MLP, `E` MoE;
    empty: all `M`."""
    heads: int = 4
    """Attention (query) heads of `*` layers; must divide `hidden`. Also megatron's
    num_attention_heads for a pure Mamba stack, where it is unused."""
    kv_heads: int = 4
    """Key/value heads of `*` layers (grouped-query attention); must divide `heads`."""
    ffn_hidden: int = 352
    """SwiGLU inner width of `-` layers."""
    experts: int = 4
    """Routed experts of each `E` layer (megatron `num_moe_experts`); parallel.ep must divide it."""
    top_k: int = 2
    """Experts each token is sent to in an `E` layer; at most `experts`."""
    moe_ffn_hidden: int = 352
    """SwiGLU inner width of each routed expert."""
    shared_expert_ffn: int = 0
    """SwiGLU inner width of a shared expert every token uses in an `E` layer (0: none)."""
    capacity_factor: float = 0.0
    """Expert capacity factor (0: dropless); see the moe family."""
    drop_policy: str = "probs"
    """Which tokens an over-capacity expert drops (`probs` or `position`)."""
    router_score: str = "softmax"
    """Router score function: `softmax` or `sigmoid`."""
    expert_bias: bool = False
    """Aux-loss-free balancing bias (needs router_score=sigmoid)."""
    aux_loss_coeff: float = 1e-2
    """Load-balancing loss coefficient (0: off)."""
    z_loss_coeff: float = 1e-3
    """Router z-loss coefficient (0: off)."""
    dispatcher: str = "allgather"
    """megatron token dispatcher: `allgather` or `alltoall`."""
    vocab_size: int = 8192
    """Vocabulary size of the embedding and output layer; at least the tokenizer's vocabulary."""
    tied_embeddings: bool = True
    """Share the input embedding with the output layer (as the released Mamba-2 models)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (block norms, the final norm and the gated norm)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of linear weights and the embedding (as megatron's
    MambaMixer: in_proj normal(std), out_proj normal(std / sqrt(2 layers)))."""
    dt_min: float = 1e-3
    """Smallest initial step size: softplus(dt_bias) is log-uniform in [dt_min, dt_max]."""
    dt_max: float = 0.1
    """Largest initial step size."""
    dt_init_floor: float = 1e-4
    """Initial step sizes are floored here before the inverse softplus."""
    A_init_range: tuple[float, float] = (1.0, 16.0)
    """A_log = log(uniform(lo, hi)) per head, so the decay A = -exp(A_log) is in [-hi, -lo]."""
    chunk_size: int = 64
    """SSD chunk length Q (mamba_ssm's 256 suits its GPU kernel; on CPU the intra-chunk quadratic
    term costs Q per token, so a shorter chunk is faster at these sizes)."""

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "d_state", "headdim", "expand", "groups", "d_conv", "heads",
                     "kv_heads", "ffn_hidden", "vocab_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.pattern, str):
            raise ConfigError(f"model.pattern must be a string of M, *, -, got {self.pattern!r}")
        bad = sorted(set(self.pattern) - set(LETTERS))
        if bad:
            raise ConfigError(
                f"model.pattern={self.pattern!r} has unknown letter(s) {''.join(bad)!r}; use M "
                "(Mamba-2), * (attention), - (MLP), E (MoE)"
            )
        if not any(kind == "mamba" for kind in self.layer_names()):
            # a pattern without M (all * and -) would be a dense GPT: use that family
            raise ConfigError(
                f"model.pattern={self.pattern!r} over model.layers={self.layers} has no Mamba "
                "layer (M); add an M or use model.arch=dense (or moe)"
            )
        if (self.expand * self.hidden) % self.headdim:
            raise ConfigError(
                f"model.headdim={self.headdim} must divide model.expand x model.hidden = "
                f"{self.expand * self.hidden}; pick a headdim that divides it"
            )
        if self.mamba_heads % self.groups:
            raise ConfigError(
                f"model.groups={self.groups} must divide the Mamba heads (expand x hidden / headdim "
                f"= {self.mamba_heads}); pick groups that divide it"
            )
        if self.hidden % self.heads:
            raise ConfigError(f"model.heads={self.heads} must divide model.hidden={self.hidden}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"model.kv_heads={self.kv_heads} must divide model.heads={self.heads}")
        if len(self.A_init_range) != 2:
            raise ConfigError(f"model.A_init_range={list(self.A_init_range)!r} must be [lo, hi]")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ConfigError(f"model.A_init_range={self.A_init_range!r} must be 0 < lo <= hi")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(
                f"model.dt_min={self.dt_min} and model.dt_max={self.dt_max} must be 0 < min <= max"
            )
        if not 0 < self.dt_init_floor:
            raise ConfigError(f"model.dt_init_floor={self.dt_init_floor} must be positive")
        if self.has_moe:
            check_expert_keys(self)  # the moe family's checks of its keys (one-line ConfigErrors)
        else:
            # an MoE key on a stack without experts would be silently ignored: refuse it
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key in _MOE_FIELDS:
                if getattr(self, key) != defaults[key]:
                    raise ConfigError(
                        f"model.{key}={getattr(self, key)!r} has no effect: model.pattern="
                        f"{self.pattern!r} has no E (MoE) layer; add an E or drop the key"
                    )

    # ------------------------------------------------------------------------------------------
    # derived shape

    @property
    def d_inner(self) -> int:
        """Inner channels Ed of a Mamba block."""
        return self.expand * self.hidden

    @property
    def mamba_heads(self) -> int:
        """Mamba heads H = expand x hidden / headdim."""
        return self.d_inner // self.headdim

    @property
    def head_dim(self) -> int:
        """Width of one attention head (`*` layers)."""
        return self.hidden // self.heads

    @property
    def layer_pattern(self) -> str:
        """The built layer string: `pattern` (or `M`) tiled over `layers`."""
        unit = self.pattern or "M"
        return (unit * (-(-self.layers // len(unit))))[: self.layers]

    def layer_names(self) -> list[str]:
        """Kind of each layer in order (`mamba`, `attention`, `mlp`, `moe`)."""
        return [LETTERS[c] for c in self.layer_pattern]

    @property
    def has_moe(self) -> bool:
        """Whether the built stack has an `E` layer."""
        return "E" in self.layer_pattern

    # ------------------------------------------------------------------------------------------
    # accounting

    def mamba_matmul_params(self) -> int:
        """in_proj and out_proj weights of one Mamba block."""
        d, ed, gn, h = self.hidden, self.d_inner, self.groups * self.d_state, self.mamba_heads
        return d * (2 * ed + 2 * gn + h) + ed * d

    def mamba_layer_params(self) -> int:
        """All weights of one `M` layer (see the module docstring)."""
        ed, gn, h = self.d_inner, self.groups * self.d_state, self.mamba_heads
        conv = (ed + 2 * gn) * (self.d_conv + 1)
        return self.hidden + self.mamba_matmul_params() + conv + 3 * h + ed

    def attention_matmul_params(self) -> int:
        """QKV and output projection weights of one `*` layer."""
        d, hd = self.hidden, self.head_dim
        return d * (self.heads + 2 * self.kv_heads) * hd + self.heads * hd * d

    def mlp_matmul_params(self) -> int:
        """Fused [gate; up] fc1 and fc2 weights of one `-` layer."""
        return 3 * self.hidden * self.ffn_hidden

    def expert_params(self) -> int:
        """One routed expert: fused [gate; up] fc1 and fc2."""
        return 3 * self.hidden * self.moe_ffn_hidden

    def moe_matmul_params(self, active: bool) -> int:
        """An `E` layer's router, experts (all, or the top_k a token uses) and shared expert."""
        experts = self.top_k if active else self.experts
        return (self.experts * self.hidden + experts * self.expert_params()
                + 3 * self.hidden * self.shared_expert_ffn)

    def layer_params_of(self, kind: str) -> int:
        """All weights of one layer of `kind` (its norm included)."""
        if kind == "mamba":
            return self.mamba_layer_params()
        if kind == "attention":
            return self.hidden + self.attention_matmul_params()
        if kind == "moe":
            return self.hidden + self.moe_matmul_params(active=False)
        return self.hidden + self.mlp_matmul_params()

    def embedding_params(self) -> int:
        """Input embedding plus the output layer when it is not tied to it."""
        table = self.vocab_size * self.hidden
        return table if self.tied_embeddings else 2 * table

    def num_params(self) -> int:
        """Exact total parameters: embedding, layers, final norm and (untied) output layer."""
        return (self.embedding_params() + sum(self.layer_params_of(k) for k in self.layer_names())
                + self.hidden)

    def active_params(self) -> int:
        """Parameters one token uses: the total less the experts an `E` layer does not pick."""
        idle = (self.experts - self.top_k) * self.expert_params()
        return self.num_params() - self.layer_names().count("moe") * idle

    def matmul_params(self) -> int:
        """Weights multiplied per token: every layer's linears (an `E` layer's router, top_k and
        shared experts) plus the output layer."""
        per = {"mamba": self.mamba_matmul_params(), "attention": self.attention_matmul_params(),
               "mlp": self.mlp_matmul_params(), "moe": self.moe_matmul_params(active=True)}
        return sum(per[k] for k in self.layer_names()) + self.vocab_size * self.hidden

    def ssd_flops_forward(self, seq_len: int) -> float:
        """Forward FLOPs per token of one Mamba layer beyond its linears: SSD and the conv."""
        q = min(self.chunk_size, seq_len)
        ed, n, g = self.d_inner, self.d_state, self.groups
        ssd = 2 * q * g * n + q * ed + 4 * n * ed
        conv = 2 * self.d_conv * (ed + 2 * g * n)
        return float(ssd + conv)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + 3 x SSD/conv per `M` + 12 H Q s per `*`."""
        names = self.layer_names()
        mamba = names.count("mamba") * 3 * self.ssd_flops_forward(seq_len)
        attention = names.count("attention") * 12 * self.heads * self.head_dim * seq_len
        return float(6 * self.matmul_params() + mamba + attention)

    # ------------------------------------------------------------------------------------------
    # the family contract (arch/common/family.py)

    @classmethod
    def for_params(cls, n: float, base: "MambaConfig") -> "MambaConfig":
        """About `n` total parameters (vocab, pattern unit and SSM knobs from `base`): widths on
        dense's grid with Mamba headdim = dense's head_dim at that width, attention heads likewise;
        depth = twice dense's aspect rule (a Mamba-2 block at expand 2 holds ~6 d^2, half a
        transformer block, so mamba2-130m has 24 layers at width 768), in whole pattern units;
        groups = gcd(base groups, Mamba heads) so that they divide the heads at every width; `E`
        experts as wide as the MLP rule (8/3 d, Mixtral, as the moe family), N = active parameters
        (the law's), shared_expert_ffn and the expert count as in `base`."""
        if not (isinstance(n, (int, float)) and math.isfinite(n) and n > 0):
            raise ConfigError(f"target parameter count must be a positive number, got {n!r}")
        unit = _period(base.pattern) if base.pattern else "M"
        step = len(unit)
        best = None
        for hidden in shapes.widths():
            hd = shapes.head_dim_for(hidden)
            rule = max(step, 2 * shapes.rule_layers(hidden))
            lo = max(step, math.floor(rule / shapes.DEPTH_SLACK) // step * step)
            hi = max(-(-rule // step) * step, math.floor(rule * shapes.DEPTH_SLACK))
            heads = hidden // hd
            # expert width only where there are experts (an MoE key on a stack without E is an
            # error: it would be silently ignored)
            experts = {"moe_ffn_hidden": shapes.ffn_for(hidden)} if "E" in unit else {}
            shape = dataclasses.replace(
                base, hidden=hidden, headdim=hd, heads=heads, kv_heads=heads,
                ffn_hidden=shapes.ffn_for(hidden), **experts,
                pattern="" if unit == "M" else unit,
                layers=step, groups=math.gcd(base.groups, base.expand * hidden // hd),
            )
            fixed = shape.embedding_params() + hidden
            per_unit = shape.active_params() - fixed  # the law's N: active parameters
            if fixed + lo // step * per_unit > n * 2:
                break  # wider shapes only grow
            for layers in range(lo, hi + 1, step):
                total = fixed + layers // step * per_unit
                err = abs(math.log(total / n))
                aspect = abs(math.log(layers / rule))
                within = err <= math.log1p(shapes.TOLERANCE)
                key = (0, aspect, err, hidden) if within else (1, err, aspect, hidden)
                if best is None or key < best[0]:
                    best = (key, dataclasses.replace(shape, layers=layers))
        if best is None:
            raise ConfigError(f"N={n:.3g} is below the smallest mamba model; raise the budget")
        return best[1]

    def divisibility(self, seq_len: int) -> list[Divisible]:
        """tp splits the Mamba heads (inner channels with them), the attention heads, KV heads and
        FFN of `*` / `-` layers and the vocabulary; pp cuts layers. Groups need not divide by tp
        (B and C are replicated then)."""
        tp_advice = "pick a tp that divides it"
        names = set(self.layer_names())
        rows = [Divisible("model.expand x model.hidden / model.headdim (Mamba heads)",
                          self.mamba_heads, "tp", "pick a tp that divides the Mamba heads")]
        if "attention" in names:
            rows += [Divisible("model.heads", self.heads, "tp", tp_advice),
                     Divisible("model.kv_heads", self.kv_heads, "tp", tp_advice)]
        if "mlp" in names:
            rows.append(Divisible("model.ffn_hidden", self.ffn_hidden, "tp", tp_advice))
        if "moe" in names:
            rows.append(Divisible("model.moe_ffn_hidden", self.moe_ffn_hidden, "tp", tp_advice))
            if self.shared_expert_ffn:
                rows.append(Divisible("model.shared_expert_ffn", self.shared_expert_ffn, "tp",
                                      tp_advice))
            # megatron's MoELayer trains with tp > 1 only under sequence parallelism (the builder
            # turns it on), which splits the sequence
            rows.append(Divisible("data.seq_len", seq_len, "tp", "MoE with tp > 1 runs sequence "
                                  "parallel; pick a seq_len divisible by tp"))
            rows.append(Divisible("model.experts", self.experts, "ep",
                                  "pick an ep that divides the expert count"))
        rows += [
            Divisible("model.vocab_size", self.vocab_size, "tp",
                      "round the vocabulary up to a multiple of tp"),
            Divisible("model.layers", self.layers, "pp", "pick a pp that divides the layer count"),
        ]
        return rows

    def layer_kinds(self) -> list[LayerKind]:
        """One LayerKind per layer: `mamba` (no KV cache), `attention`, `mlp`, `moe` (routed
        experts marked)."""
        kinds = {
            "moe": LayerKind("moe", self.layer_params_of("moe"),
                             expert_params=self.experts * self.expert_params()),
            "mamba": LayerKind("mamba", self.layer_params_of("mamba"), kv_heads=0),
            "attention": LayerKind("attention", self.layer_params_of("attention"),
                                   kv_heads=self.kv_heads),
            "mlp": LayerKind("mlp", self.layer_params_of("mlp")),
        }
        return [kinds[k] for k in self.layer_names()]

    def activation_bytes(
        self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int = 1, sp: bool = False,
        recompute: str = "none", flash: bool = False, fp32: bool = False,
    ) -> float:
        """Activation bytes one layer keeps for backward (in fp32: twice the bf16 count below)."""
        bf16 = self._bf16_activation_bytes(layer, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                           sp=sp, recompute=recompute, flash=flash)
        return bf16 * (2 if fp32 else 1)

    def _bf16_activation_bytes(self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int,
                               sp: bool, recompute: str, flash: bool) -> float:
        """Activation bytes one layer keeps for backward (bf16, 2 bytes an element), per token x
        seq_len x micro_batch; `r` = what is replicated over tp (divided by tp under SP):
        - mamba: r 2 d (norm input and in_proj input) + 2 (Ed + H) (in_proj's z, x, dt) + (Ed + H)
          (conv output of x, softplus dt) + Ed (SSD output) + Ed (out_proj input) over tp, + 4 G N
          (B, C before and after the conv; over tp when tp divides G) + the SSD chunk states
          Ed N / Q over tp (the kernels recompute the rest in backward): in elements, x 2 bytes;
        - attention: Korthikanti's attention half, r 5 d + 8 d / tp + 5 heads s / tp (scores; 0 with
          flash attention or selective recompute);
        - mlp: r 5 d + 6 ffn_hidden / tp (SwiGLU: fc1 output 2 f, its product f, 2 bytes each);
        - moe: r 3 d + top_k (2 d + 6 moe_ffn_hidden / tp) + the shared expert's 2 d + 6 s / tp +
          8 experts (fp32 router logits and probabilities);
        full recompute keeps only the layer input, 2 d (over tp under SP)."""
        sb = seq_len * micro_batch
        d = self.hidden
        rep = 1 / tp if sp else 1.0
        if recompute == "full":
            return 2.0 * sb * d * rep
        if layer.kind == "mamba":
            ed, h, gn = self.d_inner, self.mamba_heads, self.groups * self.d_state
            q = min(self.chunk_size, seq_len)
            bc_split = tp if self.groups % tp == 0 else 1
            elems = (2 * d * rep + (5 * ed + 2 * h + ed * self.d_state / q) / tp
                     + 4 * gn / bc_split)
            return 2.0 * sb * elems
        if layer.kind == "attention":
            scores = 0.0 if (flash or recompute == "selective") else 5 * self.heads * seq_len
            return sb * (5 * d * rep + (8 * d + scores) / tp)
        if layer.kind == "mlp":
            return sb * (5 * d * rep + 6 * self.ffn_hidden / tp)
        if layer.kind == "moe":
            # as the moe family: per routed copy the dispatched input 2d and 6 f / tp of fc1 and
            # SwiGLU outputs, the shared expert once, the norm input, mask and fp32 router scores
            routed = self.top_k * (2 * d + 6 * self.moe_ffn_hidden / tp)
            shared = (2 * d + 6 * self.shared_expert_ffn / tp) if self.shared_expert_ffn else 0.0
            return sb * (3 * d * rep + routed + shared + 8 * self.experts)
        raise ValueError(f"mamba family has no layer kind {layer.kind!r}")

    def summary(self) -> str:
        """`layers x hidden` plus the pattern unit of a hybrid."""
        shape = f"{self.layers}x{self.hidden}"
        return f"{shape} {self.pattern}" if self.pattern and set(self.pattern) != {"M"} else shape

    def hf_target(self, seq_len: int) -> Target:
        """Mamba2ForCausalLM or NemotronHForCausalLM (arch/mamba/hf.py)."""
        return hf.target(self, seq_len=seq_len)


def _period(pattern: str) -> str:
    """The shortest unit whose repeats give `pattern` (M*M-M*M- -> M*M-)."""
    for size in range(1, len(pattern) + 1):
        if len(pattern) % size == 0 and pattern[:size] * (len(pattern) // size) == pattern:
            return pattern[:size]
    return pattern
