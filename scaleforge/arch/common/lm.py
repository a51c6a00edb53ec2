"""The language-model step every family's builder can use: forward to per-token losses, mean loss.

megatron's models (GPTModel, MambaModel) return per-token cross-entropy [b, s] when given labels; the
loss is their mean. A family with extra losses adds them in its own forward (MoE's aux and z losses
reach the gradient through megatron's MoEAuxLossAutoScaler), and its extra metrics in `step_metrics`.
"""

from __future__ import annotations

from typing import Any

import torch


def loss_func(output_tensor: torch.Tensor):
    """Mean per-token loss, and a copy to report (the schedule divides the returned one in place)."""
    loss = output_tensor.float().mean()
    return loss, {"loss": loss.detach().clone()}


def forward_step(model: Any, tokens: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor):
    """megatron's forward_step contract: (per-token losses, the function that reduces them)."""
    return model(tokens, positions, None, labels=labels), loss_func
