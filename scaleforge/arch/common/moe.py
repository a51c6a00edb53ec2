"""megatron's MoELayer in every family that builds it (the MoE family's layers, a Mamba hybrid's `E`
layers): its TransformerConfig fields from the routed-experts keys (arch/common/experts.py), the
runtime it needs, and the expert-load and aux-loss metrics of a train step.

Losses: the aux (load-balancing) and z losses are not in the returned loss; megatron's
`MoEAuxLossAutoScaler` adds their gradients in backward, scaled by the schedule's
`grad_scale_func(1) / num_microbatches` (megatron sets it inside forward_backward_func).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter

EXPERT_BIAS_UPDATE_RATE = 1e-3
"""DeepSeek-V3's bias step per optimizer step (megatron's default `moe_router_bias_update_rate`)."""


def moe_runtime(runtime: dict[str, Any]) -> dict[str, Any]:
    """`runtime` with sequence parallelism on whenever tp > 1: megatron's MoELayer.forward refuses to
    train with tp > 1 and SP off ("performance may degrade if MoE and tensor parallelism are enabled
    without also enabling sequence parallelism", a ValueError); the planner picks SP whenever tp > 1
    anyway, and the family's divisibility() asks tp to divide data.seq_len for it."""
    if runtime.get("tensor_model_parallel_size", 1) > 1:
        return {**runtime, "sequence_parallel": True}
    return runtime


def moe_fields(cfg: Any) -> dict[str, Any]:
    """TransformerConfig keyword arguments of the routed-experts keys of `cfg` (the same field names
    in every family that has them)."""
    return dict(
        num_moe_experts=cfg.experts,
        moe_router_topk=cfg.top_k,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden,
        moe_shared_expert_intermediate_size=cfg.shared_expert_ffn or None,
        # megatron needs a balancing type with a capacity factor; "none" when the aux loss is off
        moe_router_load_balancing_type="aux_loss" if cfg.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=float(cfg.aux_loss_coeff),
        moe_z_loss_coeff=float(cfg.z_loss_coeff) or None,
        moe_router_score_function=cfg.router_score,
        # top-1 with softmax: the gate is the softmax over all experts (Switch); without
        # pre-softmax megatron would take a softmax over the one selected logit, always 1.0
        moe_router_pre_softmax=cfg.top_k == 1 and cfg.router_score == "softmax",
        moe_router_enable_expert_bias=cfg.expert_bias,
        moe_router_bias_update_rate=EXPERT_BIAS_UPDATE_RATE,
        # router logits and scores in fp32 even under bf16 (megatron's advice for stable routing)
        moe_router_dtype="fp32",
        moe_expert_capacity_factor=float(cfg.capacity_factor) or None,
        moe_token_drop_policy=cfg.drop_policy,
        moe_token_dispatcher_type=cfg.dispatcher,
        moe_grouped_gemm=False,  # GroupedMLP needs CUDA's grouped_gemm package
    )


# ----------------------------------------------------------------------------------------------
# metrics


def track_expert_load(model: Any, *, layers: int, experts: int, moe_layers: list[int]) -> None:
    """Count, per global layer and expert, the tokens each router sends during training forwards.

    A forward hook on every TopKRouter adds its routing map's column sums (after any capacity drop)
    to `model.moe_expert_load` [layers, experts]. Evaluation (eval mode, no grad) and the no-grad
    first pass of activation recomputation are skipped, as megatron skips them for the aux losses.
    """
    # on the routers' device, so counting never waits for a device-to-host copy (one per step)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load = torch.zeros(layers, experts, dtype=torch.float64, device=device)
    model.moe_expert_load = load
    model.moe_layer_indices = list(moe_layers)
    # megatron's tracker is process-global and sized by the first model that logs into it: a model
    # built later in the same process (another layer count) would index past it
    get_moe_layer_wise_logging_tracker().clear()
    # likewise megatron's aux-loss gradient scale: a backward outside the schedule creates it as a
    # 0-d tensor, and the schedule's later set_loss_scale copies a [1] tensor into it (a RuntimeError)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None

    def hook(router: TopKRouter, _inputs, outputs) -> None:
        if router.training and torch.is_grad_enabled():
            _probs, routing_map = outputs
            load[router.layer_number - 1] += routing_map.sum(dim=0).to(load)

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(hook)


def step_metrics(model: Any, *, num_microbatches: int) -> dict[str, float]:
    """`moe/aux_loss`, `moe/z_loss` (the losses without their coefficients, mean over MoE layers and
    micro-batches, for the job's whole batch) and `moe/load_max_over_mean` (per MoE layer, the most
    loaded expert's tokens over the mean, averaged over MoE layers; 1.0 is perfect balance).

    Collective: every rank must call it after every train step; it empties megatron's aux-loss
    tracker and the load counts, so evaluation between steps cannot leak into the next step (its
    forwards are not tracked anyway). Keys are absent when their coefficient is 0.

    The reduction is megatron's `track_moe_metrics(loss_scale=1/num_microbatches)` done in one world
    all-reduce: megatron 0.16.1 sums the aux loss over pp and tp (each tp rank holds its 1/tp share)
    and averages it over dp, but reduces the z-loss over pp only, so its logged z-loss is one dp
    rank's; a pipeline stage without MoE layers would also skip the tp all-reduce the others enter.
    Here both are summed over the world and divided by the ranks holding copies (aux: dp; z: tp x dp),
    which makes the values independent of the layout (EP=2 and TP=2 give one rank's to 2.4e-7).
    """
    if not hasattr(model, "moe_expert_load"):  # a Mamba stack without `E` layers
        return {}
    config = model.config
    tracker = get_moe_layer_wise_logging_tracker()
    names = []
    if config.moe_aux_loss_coeff and config.moe_router_load_balancing_type == "aux_loss":
        names.append(("moe/aux_loss", "load_balancing_loss"))
    if config.moe_z_loss_coeff:
        names.append(("moe/z_loss", "z_loss"))
    layers = config.num_layers
    load = model.moe_expert_load
    losses = []
    for _key, name in names:
        values = tracker.get(name, {}).get("values")
        losses.append(values.sum().to(load) if values is not None else load.new_zeros(()))
    # one all-reduce over the world (NCCL needs the tensor on the GPU: `load` lives there)
    flat = torch.cat([torch.stack(losses) if losses else load.new_zeros(0), load.flatten()])
    dist.all_reduce(flat)
    flat = flat.cpu()
    clear_aux_losses_tracker()
    load.zero_()

    moe_layers = model.moe_layer_indices
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    copies = {"load_balancing_loss": dp, "z_loss": tp * dp}
    out = {}
    for i, (key, name) in enumerate(names):
        out[key] = float(flat[i]) / copies[name] / len(moe_layers) / num_microbatches
    counts = flat[len(names):].view(layers, -1)[moe_layers]
    mean = counts.mean(dim=1)
    if bool((mean > 0).all()):
        out["moe/load_max_over_mean"] = float((counts.max(dim=1).values / mean).mean())
    return out

