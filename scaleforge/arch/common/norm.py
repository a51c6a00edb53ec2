"""RMSNorm for megatron layer specs that also works under sequence parallelism without apex."""

from __future__ import annotations

import torch


class RMSNorm:
    """`torch.nn.RMSNorm` built from a TransformerConfig (a spec entry, like megatron's norms).

    megatron's WrappedTorchNorm refuses sequence parallelism; a torch norm whose gain is tagged
    `sequence_parallel=True` works: megatron's finalize_model_grads then all-reduces its gradient
    over the tensor-parallel group (each rank saw only its slice of the sequence).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        if config.sequence_parallel:
            norm.weight.sequence_parallel = True
        return norm
