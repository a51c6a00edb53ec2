"""Mixture-of-Experts decoder shape (torch-free) with its exact parameter and FLOP accounting.

A LLaMA-style GPT (RoPE, RMSNorm, GQA, no biases, arch/common/decoder.py) whose MLP is, every `moe_every`-th
layer (megatron's `moe_layer_freq`: layers 0, k, 2k, ... counted from 0), a token-choice top-k MoE:
a router W_r [experts, hidden] (no bias), `experts` SwiGLU experts of width `moe_ffn_hidden`
(fc1 [2 f, h] = [gate; up], fc2 [h, f]) and optionally one shared SwiGLU expert of width
`shared_expert_ffn` that every token uses. The other layers are dense SwiGLU blocks of `ffn_hidden`.

The counts are megatron-core's GPTModel with `MoELayer` / `SequentialMLP` / `TopKRouter` /
`SharedExpertMLP` exactly (tests/test_moe.py builds it and compares). The expert bias of aux-loss-free
balancing is a buffer, not a parameter, and is not counted.

Accounting (methods.md section 5), per MoE layer with h hidden, E experts, k top_k, f moe_ffn_hidden,
s shared_expert_ffn:  total = attention + 2h (norms) + E 3hf + 3hs + hE (router);
active = attention + 2h + k 3hf + 3hs + hE (the router runs for every token, so it is active).
FLOPs per token (PaLM / MFU convention, like dense): 6 x the matmul parameters a token actually
multiplies (attention, k routed experts, the shared expert, the router, dense MLPs, the output layer)
plus 12 L heads head_dim seq_len for QK^T and AV. Mixtral-8x7B gives 46,702,792,704 parameters of
which 12,879,925,248 active (tests/test_moe.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from scaleforge.arch.common import shapes
from scaleforge.arch.common.decoder import DecoderConfig
from scaleforge.arch.common.experts import check_expert_keys
from scaleforge.arch.common.family import Divisible, LayerKind
from scaleforge.arch.common.hf import Target
from scaleforge.arch.moe import hf
from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class MoEConfig(DecoderConfig):
    """A LLaMA-style GPT whose MLPs are (every `moe_every`-th layer) top-k routed SwiGLU experts."""

    builder_class: ClassVar[str] = "scaleforge.arch.moe.model:MoEBuilder"
    """The builder half (arch/common/builder.py), imported when a model is built."""
    planned_fields: ClassVar[tuple[str, ...]] = (
        "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "moe_ffn_hidden",
    )
    """Fields the shape rule (`for_params`) decides; the planner refuses `--set` on them.
    `shared_expert_ffn` is not one: `plan --set model.shared_expert_ffn=1` (any value > 0) asks for a
    shared expert, whose width the rule then sets."""

    arch: str = "moe"
    """Family name in the architecture registry."""
    ffn_hidden: int = 352
    """SwiGLU inner width of the dense layers between MoE layers (unused when `moe_every` is 1,
    megatron still needs a value)."""
    experts: int = 4
    """Routed experts per MoE layer (megatron `num_moe_experts`); parallel.ep must divide it."""
    top_k: int = 2
    """Experts each token is sent to (megatron `moe_router_topk`); at most `experts`."""
    moe_ffn_hidden: int = 352
    """SwiGLU inner width of each routed expert (megatron `moe_ffn_hidden_size`)."""
    shared_expert_ffn: int = 0
    """SwiGLU inner width of a shared expert every token uses (0: none;
    megatron `moe_shared_expert_intermediate_size`)."""
    moe_every: int = 1
    """Every k-th layer (0, k, 2k, ...) is MoE, the rest dense (1: every layer; megatron
    `moe_layer_freq`)."""
    capacity_factor: float = 0.0
    """Expert capacity = ceil(capacity_factor x top_k x tokens / experts); overflow tokens are dropped
    (they pass through the residual only). 0: dropless (megatron `moe_expert_capacity_factor=None`)."""
    drop_policy: str = "probs"
    """Which tokens an over-capacity expert drops: `probs` (lowest router probability first) or
    `position` (latest in the sequence first); only with capacity_factor > 0."""
    router_score: str = "softmax"
    """Router score function: `softmax` (top-k renormalised, Mixtral; top-1 takes the softmax over
    all experts, Switch) or `sigmoid` (DeepSeek-V3)."""
    expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection only,
    moved by 1e-3 x sign(mean load - load) after every step; needs router_score=sigmoid."""
    aux_loss_coeff: float = 1e-2
    """Switch/GShard load-balancing loss coefficient alpha (0: no aux loss; megatron recommends 1e-2)."""
    z_loss_coeff: float = 1e-3
    """ST-MoE router z-loss coefficient beta (0: no z-loss; megatron recommends 1e-3)."""
    dispatcher: str = "allgather"
    """megatron token dispatcher: `allgather` (every rank sees all tokens, keeps its experts') or
    `alltoall` (tokens sent to their experts' ranks; what large EP uses). Same numerics."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_keys(self)
        if not isinstance(self.moe_every, int) or isinstance(self.moe_every, bool) or self.moe_every < 1:
            raise ConfigError(f"model.moe_every must be a positive integer, got {self.moe_every!r}")

    # ------------------------------------------------------------------------------------------
    # layer pattern

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based, global) is MoE: megatron's `i % moe_layer_freq == 0`."""
        return index % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        """Number of MoE layers."""
        return -(-self.layers // self.moe_every)

    @property
    def dense_layers(self) -> int:
        """Number of dense (SwiGLU MLP) layers."""
        return self.layers - self.moe_layers

    # ------------------------------------------------------------------------------------------
    # accounting

    def attention_params(self) -> int:
        """Weights of one attention block: fused QKV and the output projection."""
        h, hd = self.hidden, self.head_dim
        return h * (self.heads * hd + 2 * self.kv_heads * hd) + self.heads * hd * h

    def expert_params(self) -> int:
        """One routed expert: fused [gate; up] fc1 (2 f x h) and fc2 (h x f)."""
        return 3 * self.hidden * self.moe_ffn_hidden

    def shared_params(self) -> int:
        """The shared expert (0 without one)."""
        return 3 * self.hidden * self.shared_expert_ffn

    def router_params(self) -> int:
        """Router weight [experts, hidden] (no bias)."""
        return self.experts * self.hidden

    def dense_layer_params(self) -> int:
        """A dense layer: attention, SwiGLU MLP of ffn_hidden, two RMSNorm weights."""
        return self.attention_params() + 3 * self.hidden * self.ffn_hidden + 2 * self.hidden

    def moe_layer_params(self) -> int:
        """A MoE layer: attention, router, all experts, shared expert, two RMSNorm weights."""
        return (self.attention_params() + self.router_params() + self.experts * self.expert_params()
                + self.shared_params() + 2 * self.hidden)

    def moe_layer_active_params(self) -> int:
        """Parameters one token uses in a MoE layer: top_k experts, shared expert, router."""
        return (self.attention_params() + self.router_params() + self.top_k * self.expert_params()
                + self.shared_params() + 2 * self.hidden)

    def layer_params(self) -> int:
        """Parameters of one MoE layer (layer 0 is always one; `layer_kinds()` lists every layer)."""
        return self.moe_layer_params()

    def layer_matmul_params(self) -> int:
        """Weights one token multiplies in a MoE layer (attention, router, top_k experts, shared)."""
        return self.moe_layer_active_params() - 2 * self.hidden

    def num_params(self) -> int:
        """Exact total parameters: embedding, MoE and dense layers, final norm, untied output."""
        return (self.embedding_params() + self.moe_layers * self.moe_layer_params()
                + self.dense_layers * self.dense_layer_params() + self.hidden)

    def active_params(self) -> int:
        """Parameters one token uses (forward): total minus the (experts - top_k) unused experts."""
        idle = self.moe_layers * (self.experts - self.top_k) * self.expert_params()
        return self.num_params() - idle

    def matmul_params(self) -> int:
        """Weights a token multiplies: attention, router, k experts, shared expert, dense MLPs, and
        the output layer (the embedding lookup and norms are not matmuls)."""
        dense = self.dense_layer_params() - 2 * self.hidden
        return (self.moe_layers * self.layer_matmul_params() + self.dense_layers * dense
                + self.vocab_size * self.hidden)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active matmul params + 12 L H Q s attention (PaLM)."""
        attention = 12 * self.layers * self.heads * self.head_dim * seq_len
        return float(6 * self.matmul_params() + attention)

    # ------------------------------------------------------------------------------------------
    # the family contract (arch/common/family.py); law_variables: the base's N = active params

    @classmethod
    def for_params(cls, n: float, base: "MoEConfig") -> "MoEConfig":
        """The shape rule: about `n` ACTIVE parameters (module `moe_shape` says how)."""
        return moe_shape(n, base)

    def divisibility(self, seq_len: int) -> list[Divisible]:
        """Dense rows, experts over ep, expert widths over (expert) tp, layers over pp."""
        tp_advice = "pick a tp that divides it"
        rows = [row for row in super().divisibility(seq_len) if row.field != "model.ffn_hidden"]
        if self.dense_layers:
            rows.append(Divisible("model.ffn_hidden", self.ffn_hidden, "tp", tp_advice))
        rows.append(Divisible("model.moe_ffn_hidden", self.moe_ffn_hidden, "tp", tp_advice))
        if self.shared_expert_ffn:
            rows.append(Divisible("model.shared_expert_ffn", self.shared_expert_ffn, "tp", tp_advice))
        # with tp > 1 the MoE builder always runs sequence parallel (megatron's MoELayer requires it)
        rows.append(Divisible("data.seq_len", seq_len, "tp",
                              "MoE with tp > 1 runs sequence parallel; pick a seq_len divisible by tp"))
        rows.append(Divisible("model.experts", self.experts, "ep",
                              "pick an ep that divides the expert count"))
        return rows

    def layer_kinds(self) -> list[LayerKind]:
        """MoE layers (`transformer_moe`, routed experts marked) and dense layers in order."""
        moe = LayerKind("transformer_moe", self.moe_layer_params(),
                        expert_params=self.experts * self.expert_params(), kv_heads=self.kv_heads)
        dense = LayerKind("transformer", self.dense_layer_params(), kv_heads=self.kv_heads)
        return [moe if self.is_moe_layer(i) else dense for i in range(self.layers)]

    def activation_bytes(
        self, layer: LayerKind, *, seq_len: int, micro_batch: int, tp: int = 1, sp: bool = False,
        recompute: str = "none", flash: bool = False, fp32: bool = False,
    ) -> float:
        """Korthikanti's layer bytes with the dense MLP's share replaced by the routed experts' (in
        fp32: twice these bf16 bytes; a dense layer as the dense family counts it).

        Of Korthikanti's 34 s b h, 19 are the MLP's (fc1 input 2, fc1 output 2 x 2 x 8h/3, SwiGLU
        output 2 x 8h/3, dropout mask 1); under TP without SP 3 of them are not split (fc1 input,
        mask). A MoE layer instead keeps, per token and per routed copy (top_k copies), the dispatched
        fc1 input 2h (gathered over tp by the dispatcher, so not split) and 6 f / tp of fc1 and SwiGLU
        outputs, the shared expert's 2h + 6 s / tp once, the dropout mask, and the router's fp32
        logits and probabilities 8 E. Full recompute keeps only the layer input, as for dense.
        """
        if layer.kind != "transformer_moe" or recompute == "full":
            return super().activation_bytes(layer, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                            sp=sp, recompute=recompute, flash=flash, fp32=fp32)
        base = super().activation_bytes(layer, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                        sp=sp, recompute=recompute, flash=flash)
        sb, h = seq_len * micro_batch, self.hidden
        dense_mlp = sb * h * (19 / tp if sp else 3 + 16 / tp)
        routed = self.top_k * (2 * h + 6 * self.moe_ffn_hidden / tp)
        shared = (2 * h + 6 * self.shared_expert_ffn / tp) if self.shared_expert_ffn else 0.0
        mask = h / tp if sp else h
        router = 8 * self.experts
        return (base - dense_mlp + sb * (routed + shared + mask + router)) * (2 if fp32 else 1)

    def summary(self) -> str:
        """`layers x hidden, E experts top-k`, the table's shape column."""
        return f"{self.layers}x{self.hidden} E{self.experts}k{self.top_k}"

    def hf_target(self, seq_len: int) -> Target:
        """MixtralForCausalLM or Qwen2MoeForCausalLM (arch/moe/hf.py)."""
        return hf.target(self, seq_len=seq_len)


# ----------------------------------------------------------------------------------------------
# the shape rule


def expert_width(hidden: int) -> int:
    """Routed-expert width at `hidden`: the dense rule's SwiGLU width, 8h/3 rounded up to a multiple
    of 64 (of 32 below 256; arch/common/shapes.py `ffn_for`), as in Mixtral, where each expert is a
    full dense MLP. A finer-grained base is not scaled down: its width is planned like the rest."""
    return shapes.ffn_for(hidden)


def moe_shape(n_target: float, base: MoEConfig) -> MoEConfig:
    """The MoE shape with about `n_target` ACTIVE parameters.

    Rule: dense's width grid, head size and aspect-ratio depth rule (arch/common/shapes.py) with
    `experts`, `top_k`, `moe_every`, the routing and the losses kept from `base`; each expert as wide
    as the dense rule's MLP (`expert_width`, Mixtral); a shared expert, if `base` has one
    (shared_expert_ffn > 0), as wide as one routed expert; dense layers' ffn_hidden by the dense rule. Among widths on the grid and depths within 4/3 of the rule, the shape
    whose active N is within 5% of the target and nearest the aspect rule wins; if none is within 5%,
    the nearest active N wins. The law then sees N = active parameters (law_variables).
    """
    if not (isinstance(n_target, (int, float)) and math.isfinite(n_target) and n_target > 0):
        raise ConfigError(f"target parameter count must be a positive number, got {n_target!r}")

    def shape(hidden: int, layers: int) -> MoEConfig:
        heads = hidden // shapes.head_dim_for(hidden)
        width = expert_width(hidden)
        return dataclasses.replace(
            base, layers=layers, hidden=hidden, heads=heads, kv_heads=heads,
            ffn_hidden=shapes.ffn_for(hidden), moe_ffn_hidden=width,
            shared_expert_ffn=width if base.shared_expert_ffn else 0,
        )

    smallest = shape(shapes.MIN_HIDDEN, 1)
    if n_target < smallest.active_params() / (1 + shapes.TOLERANCE) ** 4:
        raise ConfigError(
            f"N={n_target:.3g} is below the smallest MoE model for vocab_size={base.vocab_size} "
            f"({smallest.active_params():.3g} active parameters): raise the budget or lower "
            "model.vocab_size"
        )
    best = None  # (key, hidden, layers)
    for hidden in shapes.widths():
        rule = shapes.rule_layers(hidden)
        step = shapes.depth_step(hidden)
        lo = max(step, math.floor(rule / shapes.DEPTH_SLACK))
        hi = max(-(-rule // step) * step, math.floor(rule * shapes.DEPTH_SLACK))
        if shape(hidden, lo).active_params() > n_target * 2:
            break  # wider shapes only grow
        for layers in range(-(-lo // step) * step, hi + 1, step):
            n = shape(hidden, layers).active_params()
            err = abs(math.log(n / n_target))
            aspect = abs(math.log(layers / rule))
            within = err <= math.log1p(shapes.TOLERANCE)
            key = (0, aspect, err, hidden) if within else (1, err, aspect, hidden)
            if best is None or key < best[0]:
                best = (key, hidden, layers)
    return shape(best[1], best[2])
