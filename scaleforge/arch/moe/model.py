"""Mixture-of-Experts decoder as a megatron-core GPTModel with megatron's own MoE layers.

The builder half of the family contract (docs/families.md, docs/moe.md): `build_model`,
`forward_step`, `step_metrics`. MoE layers are megatron's `MoELayer` (TopKRouter, SequentialMLP of
megatron `MLP` experts, optional SharedExpertMLP) from `get_gpt_layer_local_spec(num_experts=...)`,
with the project's SDPA/flash core attention and RMSNorm swapped in; dense layers between them (when
`moe_every` > 1) are dense's blocks (local spec, `SwiGLUMLP`). Expert parallelism, the token
dispatcher and the expert tensor parallelism (= tp) are megatron's; the layout reaches this builder
only as TransformerConfig fields (`runtime`). Grouped GEMM (`moe_grouped_gemm`) and Transformer
Engine's MoE spec need a GPU and are not used.

Losses: the aux (load-balancing) and z losses are not in the returned loss; megatron's
`MoEAuxLossAutoScaler` adds their gradients in backward, scaled by the schedule's
`grad_scale_func(1) / num_microbatches` (megatron sets it inside forward_backward_func).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from scaleforge.arch.common.attention import core_attention
from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import gpt_rule, init_params
from scaleforge.arch.common.mlp import SwiGLUMLP
from scaleforge.arch.common.norm import RMSNorm
from scaleforge.arch.common.transformer import gpt_model, llama_fields
from scaleforge.arch.moe.config import MoEConfig

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
    """TransformerConfig keyword arguments of the MoE keys of `cfg` (MoEConfig, or a Mamba hybrid
    with `E` layers: the same field names)."""
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


def transformer_config(cfg: MoEConfig, runtime: dict[str, Any]) -> TransformerConfig:
    """megatron TransformerConfig of the shape `cfg` under `runtime` (layout, dtype, fusions)."""
    return TransformerConfig(
        **llama_fields(layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, ffn_hidden=cfg.ffn_hidden,
                       norm_eps=cfg.norm_eps, init_std=cfg.init_std),
        moe_layer_freq=cfg.moe_every,
        **moe_fields(cfg),
        **moe_runtime(runtime),
    )


def _moe_layer_spec(config: TransformerConfig) -> ModuleSpec:
    layer = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = core_attention(config.params_dtype)
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    return layer


def _dense_layer_spec(config: TransformerConfig) -> ModuleSpec:
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = core_attention(config.params_dtype)
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    layer.submodules.mlp.module = SwiGLUMLP  # as the dense family's blocks
    return layer


def layer_spec(cfg: MoEConfig, config: TransformerConfig) -> ModuleSpec:
    """This pipeline stage's block: MoE layers at cfg.is_moe_layer(i), dense ones between."""
    moe, dense = _moe_layer_spec(config), _dense_layer_spec(config)
    offset = get_transformer_layer_offset(config)
    count = get_num_layers_to_build(config)
    specs = [moe if cfg.is_moe_layer(offset + i) else dense for i in range(count)]
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm),
    )


def build_model(
    cfg: MoEConfig, *, seq_len: int, seed: int, runtime: dict[str, Any]
) -> GPTModel:
    """This rank's pipeline stage (and expert shard), initialised from `seed` independently of the
    TP/PP/EP/DP layout: experts are drawn by their global index (arch.common.init), the router like
    any other weight, normal(0, init_std), expert fc1 as [gate; up] parts."""
    config = transformer_config(cfg, runtime)
    model = gpt_model(cfg, config, layer_spec(cfg, config), seq_len=seq_len)
    rule = gpt_rule(std=cfg.init_std, layers=cfg.layers, gated=True)
    init_params(model, seed=seed, rule=rule, tied=cfg.tied_embeddings)
    track_expert_load(model, layers=cfg.layers, experts=cfg.experts,
                      moe_layers=[i for i in range(cfg.layers) if cfg.is_moe_layer(i)])
    return model



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


class MoEBuilder(FamilyBuilder):
    """The builder half (arch/common/builder.py): the language model's step, the MoE metrics."""

    build_model = staticmethod(build_model)
    step_metrics = staticmethod(step_metrics)
