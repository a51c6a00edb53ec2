"""Torch-free memory model: bytes per GPU of a parallel layout (model states, activations, logits,
offload), for the fullest pipeline stage; parallel/layout.py searches the layouts it checks.

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
The fp32 CPU mode counts what autograd really saves in the project's dense layer (SDPA, RMSNorm,
SwiGLU, RoPE, GQA; `transformer_saved_bytes`), element by element, no dropout masks.
Offload (methods 7): `optimizer_offload` f moves the share f of the sharded optimizer states (o/dp)
to host memory (megatron's HybridDeviceOptimizer). `activation_offload` alpha is MEMO: every layer's
input and attention output and the fraction alpha of its other saved tokens go to host memory, the rest
is recomputed in backward; the device keeps two layers' activations (the one computing and the one
being copied). `memo_alpha` is MEMO's choice: the largest alpha whose copy hides behind one layer's
forward at the host link's bandwidth and whose host copies fit in host memory. `offload_layers` k is
megatron's own (Transformer Engine) offload of k layers' activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scaleforge.errors import LayoutError

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
