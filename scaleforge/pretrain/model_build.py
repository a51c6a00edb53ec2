"""From a RunSpec to this rank's megatron model, its DDP wrapper and the megatron optimizer.

Call after `scaleforge.parallel.setup.init_distributed` (megatron's parallel state must exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scaleforge.arch.registry import builder_module
from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class Built:
    """The pieces the training loop drives."""

    model: Any
    """This rank's model chunk, unwrapped (checkpoints save and load this one)."""
    ddp: Any
    """megatron DistributedDataParallel around `model` (grad buffers, DP reduction)."""
    optimizer: Any
    """megatron optimizer (AdamW; distributed optimizer when dp > 1 and enabled)."""
    config: Any
    """The model's megatron TransformerConfig."""
    builder: Any
    """The family's builder half, an `arch.common.builder.FamilyBuilder` (docs/families.md)."""
    offload: Any = None
    """The activation-offload hooks (`parallel.activation_offload` > 0; pretrain/offload.py)."""


def precision(spec: Any) -> torch.dtype:
    """Parameter/compute dtype: fp32 on CPU, bf16 on GPU under `auto`."""
    wanted = spec.train.precision
    if wanted == "auto":
        wanted = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if wanted == "bf16" else torch.float32


def runtime_config(spec: Any) -> dict[str, Any]:
    """TransformerConfig fields set by the layout, the dtype and the device (not by the shape)."""
    par = spec.parallel
    dtype = precision(spec)
    on_gpu = torch.cuda.is_available()
    # megatron's fused kernels (bias-act, bias-dropout-add, RoPE) need CUDA; off on CPU they fall
    # back to plain torch ops.
    fused = on_gpu
    runtime: dict[str, Any] = dict(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        expert_model_parallel_size=par.ep,
        sequence_parallel=par.sp,
        # On CPU the full weight is materialised on the host then split (megatron's CPU init path).
        use_cpu_initialization=not on_gpu,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=fused,
    )
    if par.recompute == "selective":
        runtime["recompute_granularity"] = "selective"
    elif par.recompute == "full":
        runtime.update(recompute_granularity="full", recompute_method="uniform",
                       recompute_num_layers=1)
    if par.offload_layers:  # Transformer Engine's offload context (GPU; check_runtime)
        runtime.update(cpu_offloading=True, cpu_offloading_num_layers=par.offload_layers,
                       cpu_offloading_activations=True, cpu_offloading_weights=False)
    return runtime


FSDP_STRATEGY = {"grads": "optim_grads", "full": "optim_grads_params"}
"""Megatron-FSDP's `data_parallel_sharding_strategy` for each `parallel.shard` level it runs."""


def check_runtime(spec: Any) -> None:
    """The layout options that need a GPU with Transformer Engine: one ConfigError line before
    anything is built (the spec itself validated them against each other)."""
    par = spec.parallel
    wanted = [name for name in ("offload_layers", "optimizer_offload") if getattr(par, name)]
    if not wanted:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"parallel.{wanted[0]} needs a CUDA GPU with Transformer Engine (megatron's "
            "cpu_offloading and HybridDeviceOptimizer); set it to 0, or use "
            "parallel.activation_offload, which runs on any device"
        )
    from megatron.core.extensions import transformer_engine as te_ext

    if not getattr(te_ext, "HAVE_TE", False):
        raise ConfigError(
            f"parallel.{wanted[0]} needs Transformer Engine (pip install "
            "'transformer-engine[pytorch]'); set it to 0 or install it"
        )
    if par.offload_layers >= spec.model.layers:
        raise ConfigError(
            f"parallel.offload_layers={par.offload_layers} must be below model.layers="
            f"{spec.model.layers} (megatron keeps the last layer on the GPU)"
        )


def ddp_config(spec: Any) -> Any:
    """megatron's DistributedDataParallelConfig for `parallel.shard` and `parallel.grad_reduce_fp32`
    (false: the gradient buffer and its reduction take the parameters' dtype, megatron's default)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    par = spec.parallel
    if par.shard in FSDP_STRATEGY:
        return DistributedDataParallelConfig(
            grad_reduce_in_fp32=par.grad_reduce_fp32,
            use_distributed_optimizer=True,
            use_megatron_fsdp=True,
            data_parallel_sharding_strategy=FSDP_STRATEGY[par.shard],
            # the fused division is ReduceOp.PREMUL_SUM, which gloo lacks; NCCL has it
            gradient_reduce_div_fusion=torch.cuda.is_available(),
        )
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=par.grad_reduce_fp32,
        use_distributed_optimizer=par.distributed_optimizer,
    )


def wrap(spec: Any, config: Any, model: Any) -> Any:
    """The data-parallel wrapper: megatron's DDP, or Megatron-FSDP for shard grads/full."""
    ddp = ddp_config(spec)
    if not ddp.use_megatron_fsdp:
        from megatron.core.distributed import DistributedDataParallel

        return DistributedDataParallel(config=config, ddp_config=ddp, module=model)
    from megatron.core.distributed.fsdp import mcore_fsdp_adapter as adapter

    if not isinstance(adapter.TELinear, type):
        # Without Transformer Engine the adapter's `isinstance(m, (TELinear,))` (tp > 1,
        # mcore_fsdp_adapter.py:184) raises TypeError on the placeholder megatron puts there; a class nothing is an instance of
        # gives megatron's own answer for the local layers (not a TE linear).
        adapter.TELinear = type("NoTELinear", (), {})
    FullyShardedDataParallel = adapter.FullyShardedDataParallel
    # Megatron-FSDP builds `cuda:{current_device()}` unless told the device (megatron_fsdp.py:184)
    device = None if torch.cuda.is_available() else torch.device("cpu")
    return FullyShardedDataParallel(config=config, ddp_config=ddp, module=model, device=device)


def build(spec: Any) -> Built:
    """Model chunk, DDP (or Megatron-FSDP) wrapper and optimizer for this rank."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    check_runtime(spec)
    builder = builder_module(spec.model.arch)
    model = builder.build_model(
        spec.model, seq_len=spec.data.seq_len, seed=spec.seed, runtime=runtime_config(spec)
    )
    config = model.config
    dtype = precision(spec)
    offload = None
    if spec.parallel.activation_offload:
        from scaleforge.pretrain.offload import ActivationOffload

        offload = ActivationOffload(spec.parallel.activation_offload,
                                    next(model.parameters()).device,
                                    gathered=spec.parallel.tp if spec.parallel.sp else 1)
        offload.wrap(model)
    ddp = wrap(spec, config, model)
    par, train = spec.parallel, spec.train
    host_optimizer = dict(
        optimizer_cpu_offload=True, optimizer_offload_fraction=par.optimizer_offload,
        # the HybridDeviceOptimizer needs the precision-aware path (fp32 master weights in TE's
        # FusedAdam), and overlaps its host copies with the GPU step
        use_precision_aware_optimizer=True, overlap_cpu_optimizer_d2h_h2d=True,
    ) if par.optimizer_offload else {}
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",  # torch AdamW (decoupled weight decay) without apex/TE
            lr=train.lr,
            min_lr=train.lr * train.min_lr_ratio,
            weight_decay=train.weight_decay,
            adam_beta1=train.beta1,
            adam_beta2=train.beta2,
            adam_eps=train.eps,
            clip_grad=train.grad_clip,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=ddp.ddp_config.use_distributed_optimizer,
            **host_optimizer,
        ),
        [ddp],
    )
    # the schedule calls these: DP all-reduce / reduce-scatter, SP norm and tied-embedding grads
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return Built(model=model, ddp=ddp, optimizer=optimizer, config=config, builder=builder,
                 offload=offload)
