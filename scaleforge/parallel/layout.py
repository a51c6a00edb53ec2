"""Torch-free memory model and parallel-layout search (TP, PP, DP, SP, recompute, micro-batch).

Memory per GPU = model states + activations (+ logits on the last stage), for the fullest stage.

Model states (mixed-precision Adam, bytes per parameter, before dividing by tp x pp):
  16 = bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m 4 + v 4; ZeRO-1 4 + 12/dp,
  ZeRO-2 2 + 14/dp, ZeRO-3 16/dp (Rajbhandari et al. 2020). Megatron accumulates and reduces gradients
  in fp32 (4 bytes), so its total is 18 = weights w 2 + grads g 4 + optimizer o 12, and the
  `parallel.shard` levels give (`state_bytes_per_param`): none w + g + o = 18; optimizer
  w + g + o/dp (the distributed optimizer); grads w + (g + o)/dp; full (w + g + o)/dp. Megatron-FSDP
  gathers a layer's weights before its forward and its gradients before they are reduce-scattered,
  and prefetches the next layer: shard=grads adds two layers' unsharded gradients, shard=full two
  layers' weights and gradients. `parallel.grad_reduce_fp32=false` (megatron's
  `grad_reduce_in_fp32=False`) keeps the gradients in bf16: g 2, 16 in all unsharded. The fp32 CPU
  mode (`fp32=True`: the benchmark's) has w 4, g 4 and o 8 (no master copy), 16 in all; its
  gradients are fp32 whatever `grad_reduce_fp32` says.

Activations per layer (Korthikanti et al. 2022, arXiv 2205.05198; bf16, dropout masks included), with
s sequence, b micro-batch, h hidden, a heads, t tensor-parallel size:
  no parallelism            s b h (34 + 5 a s / h)
  TP, no SP                 s b h (10 + 24/t + 5 a s / (h t))
  TP + SP                   s b h / t (34 + 5 a s / h)
  selective recompute       the 5 a s / h term is gone (the softmax/dropout of QK^T is recomputed)
  full recompute            2 s b h (the layer input only), / t with SP
FlashAttention never materialises the s x s scores, which removes the 5 a s / h term like selective
recompute does. The 34 assumes a 4h GeLU MLP; a SwiGLU MLP of 8h/3 stores the same 19 s b h
(fc1 input 2, fused fc1 output 2 x 8/3 x 2, SwiGLU output 8/3 x 2, mask 1), so it carries over. GQA's
smaller K and V are not credited (an over-estimate of at most 4 s b h).
1F1B pipeline: the first stage holds min(pp, m) micro-batches of layers/pp layers, so the total stays
about layers x per-layer regardless of pp. The last stage also holds fp32 logits, 4 s b V / t.
Backward needs working memory on top: the gradients of one layer's saved tensors (one more layer of
activations) and, on the last stage, the output weight's gradient (V h / t at the weights' width)
before it is added into the fp32 gradient buffer (measured: without them the fp32 peak of
benchmarks/memory_model.py is 5% under).
Bubble fraction (pp - 1) / m for m micro-batches per step (Narayanan et al. 2021).
The fp32 CPU mode counts what autograd really saves in the project's dense layer (SDPA, RMSNorm,
SwiGLU, RoPE, GQA; `transformer_saved_bytes`), element by element, no dropout masks.
Offload (methods 7): `optimizer_offload` f moves the share f of the sharded optimizer states (o/dp)
to host memory (megatron's HybridDeviceOptimizer). `activation_offload` alpha is MEMO: every layer's
input and attention output and the fraction alpha of its other saved tokens go to host memory, the rest
is recomputed in backward; the device keeps two layers' activations (the one computing and the one
being copied). `memo_alpha` is MEMO's choice: the largest alpha whose copy hides behind one layer's
forward at the host link's bandwidth and whose host copies fit in host memory. `offload_layers` k is
megatron's own (Transformer Engine) offload of k layers' activations.

Search (methods 9, planner rule of thumb): the levers in order of cost (`LEVERS`), each tried only
when no layout fits with the ones before: shard optimizer (free), grads, full (more data-parallel
traffic), full recomputation (a third more compute), MEMO activation offload (host traffic, partial
recomputation), then optimizer offload (the host runs that share of the Adam step), and last bf16
gradients (`grad_reduce_fp32=false`: 2 bytes a parameter less, at the cost of precision), with the
levers before it again in their order. Within a lever: the smallest tp (dividing the GPUs per node, the query and
key/value head counts, ffn_hidden, the vocabulary and the sequence), then the smallest pp (dividing
layers; m >= 4 pp) whose fullest stage fits, first without recomputation (selective where the attention kernel needs it), only then
with full recomputation; SP whenever tp > 1. The rest of the GPUs, as many as the global batch
allows (a divisor of a node or whole nodes), go to DP with the distributed optimizer. For a family
with experts (a `divisibility` row on `ep`), when a layout does not fit at ep = 1, the smallest EP
dividing dp and the experts that fits is taken (expert weights and their states / ep). Step time
assumes the cluster's MFU (default 40%, OLMo-core's H100 number).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from scaleforge.errors import LayoutError

MICRO_BATCH_TOKENS = 8192
"""Largest micro-batch tried, in tokens (4 sequences of 2048): enough to keep an H100 busy."""
MAX_MICRO_BATCH = 64
"""Largest micro-batch tried, in sequences (tiny models with short sequences)."""
FULL_RECOMPUTE_COST = 4 / 3
"""Full recomputation adds one forward pass: 8 instead of 6 FLOPs per parameter per token."""
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# formulas


def activation_bytes_per_layer(
    *, seq_len: int, micro_batch: int, hidden: int, heads: int, tp: int = 1, sp: bool = False,
    recompute: str = "none", flash: bool = False,
) -> float:
    """Korthikanti's per-layer activation bytes (see the module docstring)."""
    sbh = seq_len * micro_batch * hidden
    if recompute == "full":
        return 2 * sbh / (tp if sp else 1)
    scores = 0.0 if (flash or recompute == "selective") else 5 * heads * seq_len / hidden
    if sp:
        return sbh / tp * (34 + scores)
    return sbh * (10 + 24 / tp + scores / tp)


def zero_bytes_per_param(stage: int, dp: int) -> float:
    """Model-state bytes per parameter of mixed-precision Adam at ZeRO stage 0-3 (16 unsharded)."""
    if stage == 0:
        return 16.0
    if stage == 1:
        return 4 + 12 / dp
    if stage == 2:
        return 2 + 14 / dp
    if stage == 3:
        return 16 / dp
    raise ValueError(f"ZeRO stage must be 0-3, got {stage}")


def megatron_state_bytes(dp: int, distributed_optimizer: bool = True) -> float:
    """Megatron's bytes per parameter: bf16 weights 2, fp32 grads 4, master + Adam 12 (/dp sharded)."""
    return 6 + 12 / dp if distributed_optimizer and dp > 1 else 18.0


SHARD_LEVELS = ("none", "optimizer", "grads", "full")
"""`parallel.shard`, least sharded first."""
FSDP_LEVELS = ("grads", "full")
"""The levels Megatron-FSDP runs (with tp and dp only: parallel/checks.py)."""


def state_parts(fp32: bool = False, grad_reduce_fp32: bool = True) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per parameter: bf16 2/4/12 (fp32 gradients, fp32 master
    + Adam m, v), 2/2/12 with bf16 gradients (`grad_reduce_fp32=False`), fp32 4/4/8 (the weights
    are the master copy; the gradients take the parameters' fp32 either way)."""
    if fp32:
        return (4.0, 4.0, 8.0)
    return (2.0, 4.0 if grad_reduce_fp32 else 2.0, 12.0)


def state_bytes_per_param(shard: str, dp: int, *, fp32: bool = False,
                          optimizer_offload: float = 0.0, grad_reduce_fp32: bool = True) -> float:
    """Device bytes per parameter of `parallel.shard` over `dp` ranks, less the offloaded share."""
    w, g, o = state_parts(fp32, grad_reduce_fp32)
    if shard == "none":
        device = w + g + o
    elif shard == "optimizer":
        device = w + g + o / dp
    elif shard == "grads":
        device = w + (g + o) / dp
    elif shard == "full":
        device = (w + g + o) / dp
    else:
        raise ValueError(f"shard must be one of {SHARD_LEVELS}, got {shard!r}")
    return device - optimizer_offload * (o if shard == "none" else o / dp)


def transformer_saved_bytes(*, seq_len: int, micro_batch: int, hidden: int, heads: int,
                            kv_heads: int, ffn_hidden: int, tp: int = 1, sp: bool = False,
                            element_bytes: int = 4) -> float:
    """Bytes autograd saves for one of the project's dense layers (SDPA, RMSNorm, SwiGLU, RoPE, GQA,
    no bias, no dropout), counted storage by storage (benchmarks/memory_model.py measures it).

    Per token: the layer input, each norm's rsqrt (1) and normalised output, the residual sum, and
    each norm-times-weight output the next linear saves (sequence-split under SP, else replicated);
    split over tp: the query, the rotated key, the fused QKV output (h + 2 h g / a; the value is a
    view of it), the attention output, SDPA's log-sum-exp (a), the fused fc1 output (2 f) and the
    SwiGLU output and its saved copy (2 f). RoPE's cos/sin tables: 4 x seq x head width per
    micro-batch.
    """
    h, a, g, f = hidden, heads, kv_heads, ffn_hidden
    norm_side = 4 * h + 2 + 2 * h  # input, rsqrt, normed, residual, rsqrt, normed + 2 linear inputs
    split = 3 * h + 3 * h * g / a + a + 4 * f
    per_token = norm_side / (tp if sp else 1) + split / tp
    tokens = seq_len * micro_batch
    return element_bytes * (tokens * per_token + 4 * seq_len * (h // a))


def layer_io_bytes(model: Any, layer: Any, *, seq_len: int, micro_batch: int, tp: int = 1,
                   sp: bool = False, element_bytes: int = 2) -> tuple[float, float]:
    """(input, attention output) bytes of one layer: what MEMO always copies. A layer without
    attention (no key/value heads: Mamba, MLP) has no attention output."""
    sbh = seq_len * micro_batch * model.hidden * element_bytes
    return sbh / (tp if sp else 1), (sbh / tp if layer.kv_heads else 0.0)


@dataclass(kw_only=True, frozen=True)
class Memory:
    """Bytes per GPU of the fullest pipeline stage."""

    states: float
    """Weights, gradients and optimizer states (and Megatron-FSDP's gathered working copies)."""
    activations: float
    """Activations of the in-flight micro-batches held on the device."""
    logits: float
    """fp32 logits (last stage only)."""
    working: float = 0.0
    """Transient backward memory: the gradients of one layer's saved tensors, and on the last
    stage the output weight's gradient before it joins the gradient buffer."""
    host: float = 0.0
    """Bytes in host memory per GPU (offloaded optimizer states and activations)."""

    @property
    def total(self) -> float:
        return self.states + self.activations + self.logits + self.working


def _layer_activation(model: Any, layer: Any, *, fp32: bool, **kw: Any) -> float:
    return model.activation_bytes(layer, fp32=fp32, **kw)  # the family counts, in each precision


def memory_per_gpu(
    model: Any, *, seq_len: int, micro_batch: int, tp: int = 1, pp: int = 1, dp: int = 1,
    sp: bool = False, recompute: str = "none", flash: bool = False, microbatches: int = 1,
    distributed_optimizer: bool = True, shard: str | None = None, optimizer_offload: float = 0.0,
    activation_offload: float = 0.0, offload_layers: int = 0, ep: int = 1, fp32: bool = False,
    grad_reduce_fp32: bool = True,
) -> Memory:
    """Memory of the fullest stage for `model`, any family config (the contract of
    arch/common/family.py: `layer_kinds()`, `activation_bytes()`, `num_params()`,
    `non_embedding_params()`, `vocab_size`, `hidden`).

    Each layer kind brings its own activation bytes (attention + MLP, MoE, Mamba, ...). Routed
    expert weights are split over ep and their optimizer states over the dp / ep ranks that hold the
    same experts (megatron's expert-data-parallel group), the rest over tp and dp as before.
    `shard` is `parallel.shard` (default: optimizer, or none when `distributed_optimizer` is false);
    the offload options are described in the module docstring. `fp32` is the CPU mode (16 bytes a
    parameter, the dense layer's exact saved tensors, no dropout masks). `grad_reduce_fp32=False`
    holds the gradient buffer (and Megatron-FSDP's gathered gradients) in bf16.
    """
    if shard is None:
        shard = "optimizer" if distributed_optimizer else "none"
    if shard not in SHARD_LEVELS:
        raise ValueError(f"shard must be one of {SHARD_LEVELS}, got {shard!r}")
    for name, value in (("optimizer_offload", optimizer_offload),
                        ("activation_offload", activation_offload)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if (activation_offload or offload_layers) and (pp > 1 or recompute != "none"):
        raise LayoutError("activation offload needs pp=1 and recompute=none")
    layers = model.layer_kinds()
    vh = model.vocab_size * model.hidden
    experts = sum(layer.expert_params for layer in layers)
    body = model.non_embedding_params() - experts
    embedding = model.num_params() - model.non_embedding_params()  # input table (+ untied output)
    w, g, o = state_parts(fp32, grad_reduce_fp32)
    widest = max(layer.params - layer.expert_params for layer in layers) / tp
    # Megatron-FSDP's gathered working copies: two layers (the one computing, the one prefetched)
    gathered = {"grads": 2 * widest * g, "full": 2 * widest * (w + g)}.get(shard, 0.0)

    def per_param(dp_group: int) -> float:
        return state_bytes_per_param(shard, dp_group, fp32=fp32, optimizer_offload=optimizer_offload,
                                     grad_reduce_fp32=grad_reduce_fp32)

    def offloaded(dp_group: int) -> float:
        return optimizer_offload * (o if shard == "none" else o / dp_group)

    def states(dense_params: float, expert_params: float) -> tuple[float, float]:
        dense, expert = dense_params / tp, expert_params / (tp * ep)
        edp = max(1, dp // ep)
        return (dense * per_param(dp) + expert * per_param(edp) + gathered,
                dense * offloaded(dp) + expert * offloaded(edp))

    kw = dict(seq_len=seq_len, micro_batch=micro_batch, tp=tp, sp=sp, recompute=recompute,
              flash=flash)

    def activations(stage: list) -> float:
        counts: dict = {}
        for layer in stage:
            counts[layer] = counts.get(layer, 0) + 1
        return sum(n * _layer_activation(model, layer, fp32=fp32, **kw) for layer, n in counts.items())

    logits = 4.0 * seq_len * micro_batch * model.vocab_size / tp
    # backward: one layer's gradients of what it saved, and the output layer's weight gradient
    # (fp32 or bf16 like the weights) before megatron adds it into the fp32 gradient buffer
    out_grad = vh / tp * w

    def working(stage: list, last: bool) -> float:
        widest_layer = max((_layer_activation(model, layer, fp32=fp32, **kw) for layer in stage),
                           default=0.0)
        return widest_layer + (out_grad if last else 0.0)

    if pp == 1:
        device_states, host = states(body + embedding, experts)
        resident, moved = layers, []
        if activation_offload:  # MEMO: two layers stay, the rest is copied (or recomputed)
            resident, moved = layers[-2:], layers[:-2]
            host += sum(memo_layer_bytes(model, layer, activation_offload, fp32=fp32, **kw)
                        for layer in moved)
        elif offload_layers:  # megatron's: the first k layers' activations go to the host
            resident, moved = layers[offload_layers:], layers[:offload_layers]
            host += activations(moved)
        return Memory(states=device_states, activations=activations(resident), logits=logits,
                      working=working(layers, True), host=host)
    # first stage: embedding + the most micro-batches in flight; last: output layer + logits
    per_stage = math.ceil(len(layers) / pp)
    first_layers, last_layers = layers[:per_stage], layers[-per_stage:]
    stage_states, host = states(body / pp + vh, experts / pp)
    first = Memory(states=stage_states,
                   activations=activations(first_layers) * min(pp, microbatches), logits=0.0,
                   working=working(first_layers, False), host=host)
    last = Memory(states=stage_states, activations=activations(last_layers), logits=logits,
                  working=working(last_layers, True), host=host)
    return first if first.total >= last.total else last


def memo_layer_bytes(model: Any, layer: Any, alpha: float, *, fp32: bool = False,
                     **kw: Any) -> float:
    """Bytes MEMO copies to the host for one layer: input + attention output + alpha x the rest."""
    total = _layer_activation(model, layer, fp32=fp32, **kw)
    io = sum(layer_io_bytes(model, layer, seq_len=kw["seq_len"], micro_batch=kw["micro_batch"],
                            tp=kw["tp"], sp=kw["sp"], element_bytes=4 if fp32 else 2))
    return io + alpha * max(0.0, total - io)


def memo_alpha(model: Any, *, seq_len: int, micro_batch: int, tp: int = 1, sp: bool = False,
               flash: bool = False, link_bytes_per_s: float, host_bytes: float,
               layer_seconds: float, fp32: bool = False) -> float | None:
    """MEMO's alpha (methods 7): the largest fraction with (S_in + S_attn + alpha S_other) / B <=
    T_layer_forward and (n - 2) (S_in + S_attn + alpha S_other) <= M_host, for the fullest layer
    kind; None when even alpha = 0 breaks one of them (offload would stall or not fit)."""
    layers = model.layer_kinds()
    if len(layers) <= 2:
        return None
    kw = dict(seq_len=seq_len, micro_batch=micro_batch, tp=tp, sp=sp, recompute="none",
              flash=flash)
    per_layer = max(layers, key=lambda layer: _layer_activation(model, layer, fp32=fp32, **kw))
    io = sum(layer_io_bytes(model, per_layer, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                            sp=sp, element_bytes=4 if fp32 else 2))
    other = max(0.0, _layer_activation(model, per_layer, fp32=fp32, **kw) - io)
    budget = min(link_bytes_per_s * layer_seconds, host_bytes / (len(layers) - 2))
    if budget < io:
        return None
    return 1.0 if other == 0 else min(1.0, (budget - io) / other)


def bubble_fraction(pp: int, microbatches: int) -> float:
    """1F1B pipeline bubble (pp - 1) / m, as a fraction of the ideal step time."""
    return (pp - 1) / microbatches


# ----------------------------------------------------------------------------------------------
# search


@dataclass(kw_only=True, frozen=True)
class Layout:
    """A parallel layout for one run, with its memory and time estimates."""

    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size."""
    sp: bool
    """Sequence parallelism (tp > 1)."""
    recompute: str
    """`none`, `selective` or `full`."""
    micro_batch: int
    """Sequences per micro-batch."""
    global_batch: int
    """Sequences per step (a multiple of micro_batch x dp)."""
    memory: Memory
    """Bytes per GPU of the fullest stage."""
    ep: int = 1
    """Expert-parallel size (inside dp; 1 for families without experts)."""
    memory_limit: float
    """Bytes per GPU the plan may use (inf: unchecked, CPU)."""
    bubble: float
    """Pipeline bubble fraction."""
    step_time_s: float
    """Estimated seconds per optimizer step at the cluster's MFU."""
    gpus_per_node: int
    """From the cluster, to count nodes."""
    shard: str = "optimizer"
    """`parallel.shard`: what the data-parallel ranks shard."""
    activation_offload: float = 0.0
    """MEMO's alpha (0: off)."""
    optimizer_offload: float = 0.0
    """Share of the optimizer states in host memory (0: off)."""
    grad_reduce_fp32: bool = True
    """Gradients accumulated and reduced in fp32 (false: in bf16, the last lever)."""
    levers: str = ""
    """Which memory levers beyond the defaults the layout needed, and why (empty: none)."""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def parallel_spec(self, base: Any) -> Any:
        """`base` (a ParallelSpec) with this layout's sizes, sharding, recomputation and offload."""
        return dataclasses.replace(
            base, tp=self.tp, pp=self.pp, dp=self.dp, sp=self.sp, ep=self.ep,
            recompute=self.recompute, shard=self.shard, activation_offload=self.activation_offload,
            optimizer_offload=self.optimizer_offload, grad_reduce_fp32=self.grad_reduce_fp32,
        )

    def summary(self) -> dict:
        """Plain dict for plan.yaml."""
        return {
            "memory_gb": round(self.memory.total / 1e9, 3),
            "memory_limit_gb": (None if math.isinf(self.memory_limit)
                                else round(self.memory_limit / 1e9, 3)),
            "bubble": round(self.bubble, 4),
            "step_time_s": float(f"{self.step_time_s:.4g}"),
            "recompute": self.recompute,
            "micro_batch": self.micro_batch,
            "shard": self.shard,
            "activation_offload": self.activation_offload,
            "optimizer_offload": self.optimizer_offload,
            "grad_reduce_fp32": self.grad_reduce_fp32,
            "host_memory_gb": round(self.memory.host / 1e9, 3),
            "levers": self.levers,
        }


def round_batch(target: float, multiple: int) -> int:
    """`target` sequences rounded to the nearest multiple of `multiple` (at least one multiple)."""
    return max(multiple, int(round(target / multiple)) * multiple)


def step_time(model: Any, *, seq_len: int, global_batch: int, gpus: int, cluster: Any,
              recompute: str, bubble: float, activation_offload: float = 0.0) -> float:
    """Seconds per step: FLOPs / (gpus x peak x MFU), stretched by recompute and the bubble.

    MEMO recomputes the (1 - alpha) share of a layer's tensors it did not copy: at most that share
    of full recomputation's extra forward."""
    flops = model.flops_per_token(seq_len) * seq_len * global_batch
    if recompute == "full":
        flops *= FULL_RECOMPUTE_COST
    elif activation_offload:
        flops *= 1 + (1 - activation_offload) * (FULL_RECOMPUTE_COST - 1)
    return flops / (gpus * cluster.peak_tflops * 1e12 * cluster.mfu) * (1 + bubble)


def _axis_rows(model: Any, axis: str, seq_len: int, size: int) -> list:
    """The family's (field, value) pairs that parallel `axis` must divide (SP adds the sequence)."""
    rows = [(r.field, r.value) for r in model.divisibility(seq_len) if r.axis == axis]
    if axis == "tp" and size > 1:
        rows.append(("data.seq_len", seq_len))  # SP whenever tp > 1 splits the sequence
    return rows


def _tp_limit(model: Any, tps: list[int], seq_len: int, cluster: Any) -> str:
    """Why tensor parallelism stopped below the node size, as a clause for the error message."""
    excluded = [t for t in _divisors(cluster.gpus_per_node, cluster.gpus_per_node) if t not in tps]
    if not excluded:
        return ""
    t = excluded[0]
    name, size = next((n, v) for n, v in _axis_rows(model, "tp", seq_len, t) if v % t)
    return f"; tp stops at {max(tps)} because {name}={size} is not divisible by {t}"


def _divides(model: Any, axis: str, size: int, seq_len: int) -> bool:
    """Whether `size` divides every field the family splits over `axis`."""
    return all(value % size == 0 for _, value in _axis_rows(model, axis, seq_len, size))


def _whole_nodes(group: int, dp: int, per_node: int) -> int:
    """The largest dp' <= dp whose group x dp' GPUs divide one node or fill whole nodes."""
    while dp > 0:
        gpus = group * dp
        if (gpus <= per_node and per_node % gpus == 0) or gpus % per_node == 0:
            return dp
        dp -= 1
    return 0


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@dataclass(kw_only=True, frozen=True)
class Lever:
    """One step of the memory levers: a sharding level, a recomputation set, and offload."""

    shard: str
    """`parallel.shard`."""
    recomputes: tuple[str, ...]
    """Recomputation settings tried, cheapest first."""
    activation_offload: bool = False
    """MEMO activation offload (alpha from the cluster's host link and memory)."""
    optimizer_offload: bool = False
    """Optimizer offload (the smallest share, in tenths, that fits)."""
    bf16_grads: bool = False
    """Gradients kept and reduced in bf16 (`parallel.grad_reduce_fp32=false`)."""
    name: str = ""
    """How the plan names it."""


_FULL_SHARD_LEVERS = (
    Lever(shard="full", recomputes=("none", "selective"), name="shard=full"),
    Lever(shard="full", recomputes=("full",), name="shard=full, recompute=full"),
    Lever(shard="full", recomputes=("none",), activation_offload=True,
          name="shard=full, activation offload"),
    Lever(shard="full", recomputes=("full",), optimizer_offload=True,
          name="shard=full, recompute=full, optimizer offload"),
    Lever(shard="full", recomputes=("none",), activation_offload=True, optimizer_offload=True,
          name="shard=full, activation and optimizer offload"),
)
LEVERS = (
    Lever(shard="optimizer", recomputes=("none", "selective")),
    Lever(shard="grads", recomputes=("none", "selective"), name="shard=grads"),
    *_FULL_SHARD_LEVERS,
    # last, because it costs precision rather than time: bf16 gradients, with the sharded levers
    # again in their order (only what still does not fit reaches them)
    *(dataclasses.replace(lever, bf16_grads=True, name=f"{lever.name}, bf16 gradients")
      for lever in _FULL_SHARD_LEVERS),
)
"""The memory levers in order of cost; each is tried only when no layout fits with the ones before."""


def search_layout(
    model: Any, *, seq_len: int, batch_target: float, cluster: Any, max_gpus: int | None = None,
) -> Layout:
    """The layout for `model` with a global batch near `batch_target` sequences on `cluster`."""
    max_gpus = min(max_gpus or cluster.gpus, cluster.gpus)
    limit = cluster.memory_bytes
    top_mb = max(1, min(MAX_MICRO_BATCH, MICRO_BATCH_TOKENS // seq_len))
    micro_batches = [m for m in (64, 32, 16, 8, 4, 2, 1) if m <= top_mb]
    # tp divides the node (so a TP group never straddles two) and both head counts (megatron's rule)
    tps = [t for t in _divisors(cluster.gpus_per_node, cluster.gpus_per_node)
           if _divides(model, "tp", t, seq_len)]
    pps = [p for p in _divisors(model.pipeline_layers(), max_gpus)
           if _divides(model, "pp", p, seq_len)]
    closest = None  # the smallest memory seen at the default lever, for the error message
    best = None  # the smallest memory seen with any lever
    for lever in LEVERS:
        before = best  # the least memory without this lever, to say why it was needed
        for tp in tps:
            for pp in pps:
                if tp * pp > max_gpus:
                    break
                if pp > 1 and (lever.activation_offload or lever.shard in FSDP_LEVELS):
                    continue  # offload and Megatron-FSDP run with pp = 1 (parallel/checks.py)
                for recompute in lever.recomputes:
                    if recompute == "selective" and cluster.flash_attention:
                        continue  # same memory as none with flash attention
                    for mb in micro_batches:
                        need = mb * (4 * pp if pp > 1 else 1)  # m >= 4 pp keeps the bubble <= 25%
                        dp = _whole_nodes(tp * pp, min(max_gpus // (tp * pp), int(batch_target // need)),
                                          cluster.gpus_per_node)
                        if dp < 1 or (lever.shard in ("grads", "full") and dp == 1):
                            continue  # sharding beyond the optimizer needs dp > 1
                        layout = _evaluate(model, tp, pp, dp, mb, recompute, seq_len, batch_target,
                                           cluster, limit, lever)
                        if layout is None:
                            continue
                        if layout.memory.total <= limit:
                            if before is not None:
                                layout = dataclasses.replace(layout, levers=(
                                    f"{layout.levers}: {before.memory.total / 1e9:.1f} GB per GPU "
                                    f"at best without it > {limit / 1e9:.1f} GB usable"))
                            return layout
                        if lever is LEVERS[0] and (
                                closest is None or layout.memory.total < closest.memory.total):
                            closest = layout
                        if best is None or layout.memory.total < best.memory.total:
                            best = layout
    if closest is None and best is None:
        raise LayoutError(
            f"no layout: a global batch of {batch_target:.3g} sequences of {seq_len} is smaller than "
            f"one micro-batch; raise the budget or lower data.seq_len"
        )
    closest = closest or best
    raise LayoutError(
        f"model does not fit on {max_gpus} GPUs of {cluster.gpu_memory_gb:g} GB: "
        f"{model.num_params():.3g} parameters need {closest.memory.total / 1e9:.1f} GB per GPU at best "
        f"(tp={closest.tp}, pp={closest.pp}, micro_batch={closest.micro_batch}, "
        f"recompute={closest.recompute}) against {limit / 1e9:.1f} GB usable"
        + (f", {best.memory.total / 1e9:.1f} GB with every memory lever ({best.levers})"
           if best is not None and best is not closest else "")
        + "; add nodes (--cluster), use larger GPUs, or lower the budget"
        + _tp_limit(model, tps, seq_len, cluster)
    )


def _eps(model: Any, dp: int, seq_len: int) -> list[int]:
    """Expert-parallel sizes to try, smallest first: 1, then divisors of dp that divide every field
    the family splits over `ep` (its expert count); only 1 for a family without such a field."""
    if not any(row.axis == "ep" for row in model.divisibility(seq_len)):
        return [1]
    return [e for e in _divisors(dp, dp) if _divides(model, "ep", e, seq_len)]


def _host_bytes_per_gpu(cluster: Any) -> float:
    return cluster.host_memory_gb * 1e9 / cluster.gpus_per_node


def _evaluate(model, tp, pp, dp, mb, recompute, seq_len, batch_target, cluster, limit,
              lever: Lever = LEVERS[0]) -> Layout | None:
    global_batch = round_batch(batch_target, mb * dp)
    m = global_batch // (mb * dp)
    sp = tp > 1
    alpha = 0.0
    if lever.activation_offload:
        layers = len(model.layer_kinds())
        # one layer's forward at the cluster's MFU: a third of its training FLOPs
        layer_s = (model.flops_per_token(seq_len) * seq_len * mb / 3 / layers / tp
                   / (cluster.peak_tflops * 1e12 * cluster.mfu))
        found = memo_alpha(model, seq_len=seq_len, micro_batch=mb, tp=tp, sp=sp,
                           flash=cluster.flash_attention,
                           link_bytes_per_s=cluster.host_link_gb_s * 1e9,
                           host_bytes=_host_bytes_per_gpu(cluster), layer_seconds=layer_s)
        if not found:
            return None  # the copies would not hide behind compute, or not fit in host memory
        alpha = round(math.floor(found * 100) / 100, 2)
        if alpha == 0:
            return None

    def need(size: int, offload: float) -> Memory:
        return memory_per_gpu(
            model, seq_len=seq_len, micro_batch=mb, tp=tp, pp=pp, dp=dp, sp=sp,
            recompute=recompute, flash=cluster.flash_attention, microbatches=m, ep=size,
            shard=lever.shard, activation_offload=alpha, optimizer_offload=offload,
            grad_reduce_fp32=not lever.bf16_grads,
        )

    # EP only when the experts do not fit: the smallest ep (dividing dp and the experts) that fits,
    # else the one with the least memory. EP adds all-to-all traffic and, per rank, fewer experts to
    # batch tokens into, so ep = 1 wins whenever it fits.
    ep, memory = 1, None
    for size in ([1] if lever.shard in FSDP_LEVELS else _eps(model, dp, seq_len)):
        mem = need(size, 0.0)
        if memory is None or mem.total < memory.total:
            ep, memory = size, mem
        if mem.total <= limit:
            break
    offload = 0.0
    if lever.optimizer_offload and memory.total > limit:
        # the smallest share in tenths that fits (host Adam is slow: keep as much on the GPU)
        movable = memory.total - need(ep, 1.0).total
        if movable > 0:
            offload = min(1.0, math.ceil((memory.total - limit) / movable * 10) / 10)
            memory = need(ep, offload)
        if memory.host > _host_bytes_per_gpu(cluster):
            return None
    bubble = bubble_fraction(pp, m)
    levers = ""
    if lever.name:
        levers = lever.name + (f" (alpha={alpha:g})" if alpha else "") + (
            f" (optimizer {offload:g})" if offload else "")
    return Layout(
        tp=tp, pp=pp, dp=dp, sp=sp, recompute=recompute, micro_batch=mb, global_batch=global_batch,
        memory=memory, ep=ep, memory_limit=limit, bubble=bubble,
        step_time_s=step_time(model, seq_len=seq_len, global_batch=global_batch, gpus=tp * pp * dp,
                              cluster=cluster, recompute=recompute, bubble=bubble,
                              activation_offload=alpha),
        gpus_per_node=cluster.gpus_per_node, shard=lever.shard, activation_offload=alpha,
        optimizer_offload=offload, grad_reduce_fp32=not lever.bf16_grads, levers=levers,
    )
