"""Torch-free memory model and parallel-layout search (TP, PP, DP, SP, recompute, micro-batch).

Memory per GPU = model states + activations (+ logits on the last stage), for the fullest stage.

Model states (mixed-precision Adam, bytes per parameter, before dividing by tp x pp):
  16 = bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m 4 + v 4; ZeRO-1 4 + 12/dp,
  ZeRO-2 2 + 14/dp, ZeRO-3 16/dp (Rajbhandari et al. 2020). Megatron accumulates and reduces gradients
  in fp32 (4 bytes), so its total is 18: 6 + 12/dp with the distributed optimizer (that is what the
  planner uses, `megatron_state_bytes`), 18 without.

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
Bubble fraction (pp - 1) / m for m micro-batches per step (Narayanan et al. 2021).
CPU offload of optimizer states or activations (megatron-core, MEMO) is modelled by `memory_per_gpu`
for analysis; the search does not choose it yet (the RunSpec has no offload field).

Search (methods 9, planner rule of thumb): the smallest tp (dividing the GPUs per node, the query and
key/value head counts, ffn_hidden, the vocabulary and the sequence), then the smallest pp (dividing
layers; m >= 4 pp) whose fullest stage fits, first without recomputation (selective where the attention kernel needs it), only then
with full recomputation; SP whenever tp > 1. The rest of the GPUs, as many as the global batch
allows (a divisor of a node or whole nodes), go to DP with the distributed optimizer. For a family
with experts (a `divisibility` row on `ep`), when a layout does not fit at ep = 1, the smallest EP
dividing dp and the experts that fits is taken (expert weights and their states / ep). Step time
assumes the cluster's MFU (default 40%, OLMo-core's H100 number).
"""

from __future__ import annotations

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


@dataclass(kw_only=True, frozen=True)
class Memory:
    """Bytes per GPU of the fullest pipeline stage."""

    states: float
    """Weights, gradients and optimizer states."""
    activations: float
    """Activations of the in-flight micro-batches."""
    logits: float
    """fp32 logits (last stage only)."""

    @property
    def total(self) -> float:
        return self.states + self.activations + self.logits


def memory_per_gpu(
    model: Any, *, seq_len: int, micro_batch: int, tp: int = 1, pp: int = 1, dp: int = 1,
    sp: bool = False, recompute: str = "none", flash: bool = False, microbatches: int = 1,
    distributed_optimizer: bool = True, optimizer_offload: float = 0.0,
    activation_offload: bool = False, ep: int = 1,
) -> Memory:
    """Memory of the fullest stage for `model`, any family config (the contract of
    arch/common/family.py: `layer_kinds()`, `activation_bytes()`, `num_params()`,
    `non_embedding_params()`, `vocab_size`, `hidden`).

    Each layer kind brings its own activation bytes (attention + MLP, MoE, Mamba, ...). Routed
    expert weights are split over ep and their optimizer states over the dp / ep ranks that hold the
    same experts (megatron's expert-data-parallel group), the rest over tp and dp as before.
    Offload (methods 7; analysis only, the layout search and the RunSpec do not use it yet):
    `optimizer_offload` is megatron's optimizer_offload_fraction, the share of the fp32 master weights
    and Adam moments (12 bytes) kept in CPU memory. `activation_offload` is megatron's cpu_offloading of
    all layers' activations, which needs pp = 1 and no recomputation; two layers stay on the GPU (the
    one computing and the one being copied), as in MEMO's double buffering.
    """
    if not 0 <= optimizer_offload <= 1:
        raise ValueError(f"optimizer_offload must be in [0, 1], got {optimizer_offload}")
    if activation_offload and (pp > 1 or recompute != "none"):
        raise LayoutError("activation offload needs pp=1 and recompute=none (megatron's restriction)")
    layers = model.layer_kinds()
    vh = model.vocab_size * model.hidden
    experts = sum(layer.expert_params for layer in layers)
    body = model.non_embedding_params() - experts
    embedding = model.num_params() - model.non_embedding_params()  # input table (+ untied output)

    def state_bytes(dp_group: int) -> float:
        sharded = 12 / dp_group if distributed_optimizer and dp_group > 1 else 12.0
        return megatron_state_bytes(dp_group, distributed_optimizer) - optimizer_offload * sharded

    def states(dense_params: float, expert_params: float) -> float:
        return (dense_params / tp * state_bytes(dp)
                + expert_params / (tp * ep) * state_bytes(max(1, dp // ep)))

    def activations(stage: list) -> float:
        counts: dict = {}
        for layer in stage:
            counts[layer] = counts.get(layer, 0) + 1
        return sum(
            n * model.activation_bytes(layer, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                       sp=sp, recompute=recompute, flash=flash)
            for layer, n in counts.items()
        )

    logits = 4.0 * seq_len * micro_batch * model.vocab_size / tp
    if pp == 1:
        resident = layers[:2] if activation_offload else layers
        return Memory(states=states(body + embedding, experts), activations=activations(resident),
                      logits=logits)
    # first stage: embedding + the most micro-batches in flight; last: output layer + logits
    per_stage = math.ceil(len(layers) / pp)
    first_layers, last_layers = layers[:per_stage], layers[-per_stage:]
    first = Memory(
        states=states(body / pp + vh, experts / pp),
        activations=activations(first_layers) * min(pp, microbatches), logits=0.0,
    )
    last = Memory(states=states(body / pp + vh, experts / pp),
                  activations=activations(last_layers), logits=logits)
    return first if first.total >= last.total else last


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

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

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
        }


def round_batch(target: float, multiple: int) -> int:
    """`target` sequences rounded to the nearest multiple of `multiple` (at least one multiple)."""
    return max(multiple, int(round(target / multiple)) * multiple)


def step_time(model: Any, *, seq_len: int, global_batch: int, gpus: int, cluster: Any,
              recompute: str, bubble: float) -> float:
    """Seconds per step: FLOPs / (gpus x peak x MFU), stretched by recompute and the bubble."""
    flops = model.flops_per_token(seq_len) * seq_len * global_batch
    if recompute == "full":
        flops *= FULL_RECOMPUTE_COST
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
    closest = None  # the smallest memory seen, for the error message
    for recomputes in (("none", "selective"), ("full",)):
        for tp in tps:
            for pp in pps:
                if tp * pp > max_gpus:
                    break
                for recompute in recomputes:
                    if recompute == "selective" and cluster.flash_attention:
                        continue  # same memory as none with flash attention
                    for mb in micro_batches:
                        need = mb * (4 * pp if pp > 1 else 1)  # m >= 4 pp keeps the bubble <= 25%
                        dp = _whole_nodes(tp * pp, min(max_gpus // (tp * pp), int(batch_target // need)),
                                          cluster.gpus_per_node)
                        if dp < 1:
                            continue
                        layout = _evaluate(model, tp, pp, dp, mb, recompute, seq_len, batch_target,
                                           cluster, limit)
                        if layout.memory.total <= limit:
                            return layout
                        if closest is None or layout.memory.total < closest.memory.total:
                            closest = layout
    if closest is None:
        raise LayoutError(
            f"no layout: a global batch of {batch_target:.3g} sequences of {seq_len} is smaller than "
            f"one micro-batch; raise the budget or lower data.seq_len"
        )
    raise LayoutError(
        f"model does not fit on {max_gpus} GPUs of {cluster.gpu_memory_gb:g} GB: "
        f"{model.num_params():.3g} parameters need {closest.memory.total / 1e9:.1f} GB per GPU at best "
        f"(tp={closest.tp}, pp={closest.pp}, micro_batch={closest.micro_batch}, "
        f"recompute={closest.recompute}) against {limit / 1e9:.1f} GB usable; "
        "add nodes (--cluster), use larger GPUs, or lower the budget"
        + _tp_limit(model, tps, seq_len, cluster)
    )


def _eps(model: Any, dp: int, seq_len: int) -> list[int]:
    """Expert-parallel sizes to try, smallest first: 1, then divisors of dp that divide every field
    the family splits over `ep` (its expert count); only 1 for a family without such a field."""
    if not any(row.axis == "ep" for row in model.divisibility(seq_len)):
        return [1]
    return [e for e in _divisors(dp, dp) if _divides(model, "ep", e, seq_len)]


def _evaluate(model, tp, pp, dp, mb, recompute, seq_len, batch_target, cluster, limit) -> Layout:
    global_batch = round_batch(batch_target, mb * dp)
    m = global_batch // (mb * dp)
    sp = tp > 1
    # EP only when the experts do not fit: the smallest ep (dividing dp and the experts) that fits,
    # else the one with the least memory. EP adds all-to-all traffic and, per rank, fewer experts to
    # batch tokens into, so ep = 1 wins whenever it fits.
    ep, memory = 1, None
    for size in _eps(model, dp, seq_len):
        need = memory_per_gpu(
            model, seq_len=seq_len, micro_batch=mb, tp=tp, pp=pp, dp=dp, sp=sp,
            recompute=recompute, flash=cluster.flash_attention, microbatches=m, ep=size,
        )
        if memory is None or need.total < memory.total:
            ep, memory = size, need
        if need.total <= limit:
            break
    bubble = bubble_fraction(pp, m)
    return Layout(
        tp=tp, pp=pp, dp=dp, sp=sp, recompute=recompute, micro_batch=mb, global_batch=global_batch,
        memory=memory, ep=ep, memory_limit=limit, bubble=bubble,
        step_time_s=step_time(model, seq_len=seq_len, global_batch=global_batch, gpus=tp * pp * dp,
                              cluster=cluster, recompute=recompute, bubble=bubble),
        gpus_per_node=cluster.gpus_per_node,
    )
