"""From a RunSpec to this rank's megatron model, its DDP wrapper and the megatron optimizer.

Call after `scaleforge.parallel.setup.init_distributed` (megatron's parallel state must exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scaleforge.arch.registry import builder_module


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
    """The family's builder module (`forward_step`, `step_metrics`; docs/families.md)."""


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
    return runtime


def build(spec: Any) -> Built:
    """Model chunk, DDP wrapper and optimizer for this rank."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    builder = builder_module(spec.model.arch)
    model = builder.build_model(
        spec.model, seq_len=spec.data.seq_len, seed=spec.seed, runtime=runtime_config(spec)
    )
    config = model.config
    dtype = precision(spec)
    distributed_optimizer = spec.parallel.distributed_optimizer and spec.parallel.dp > 1
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=distributed_optimizer,
        ),
        module=model,
    )
    train = spec.train
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
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    # the schedule calls these: DP all-reduce / reduce-scatter, SP norm and tied-embedding grads
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return Built(model=model, ddp=ddp, optimizer=optimizer, config=config, builder=builder)
