"""Torch-free parallel-layout search (TP, PP, DP, SP, EP, recompute, micro-batch, memory levers) and
step-time estimate; each candidate is checked against the memory model of parallel/memory.py.

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
assumes the cluster's MFU (default 40%, OLMo-core's H100 number), stretched by the 1F1B bubble
(pp - 1) / m for m micro-batches per step (Narayanan et al. 2021).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from scaleforge.errors import LayoutError
from scaleforge.parallel.memory import FSDP_LEVELS, Memory, memo_alpha, memory_per_gpu

MICRO_BATCH_TOKENS = 8192
"""Largest micro-batch tried, in tokens (4 sequences of 2048): enough to keep an H100 busy."""
MAX_MICRO_BATCH = 64
"""Largest micro-batch tried, in sequences (tiny models with short sequences)."""
FULL_RECOMPUTE_COST = 4 / 3
"""Full recomputation adds one forward pass: 8 instead of 6 FLOPs per parameter per token."""


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
