"""The builder half of the family contract: what every `arch/<family>/model.py` provides.

The trainer (pretrain/) and the export's gather ask a family's builder only through these methods;
the registry makes one from the `builder_class` its config names (`registry.builder_module`).
`FamilyBuilder` is the base every builder inherits; its defaults hold for a language model whose loss
is the mean token loss, with no metrics of its own and no tensor rule for growth. A family overrides
what differs (docs/families.md has the contract as a table). Imports torch: only the trainer's side
imports it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from scaleforge.arch.common import lm


class FamilyBuilder:
    """Defaults of the builder half; a family overrides what differs (MoE: its metrics, ...)."""

    growth_fills_prefix: ClassVar[bool] = False
    """Growth (pretrain/grow.py): True when a tensor `grow_state` returns may be smaller than the
    new model's, filling the leading part of each axis (TokenFormer's appended tokens keep the
    seed's draw); False: every returned tensor must have the new model's shape."""

    def build_model(self, cfg: Any, *, seq_len: int, seed: int, runtime: dict[str, Any]) -> Any:
        """This rank's pipeline stage of the model of shape `cfg`, initialised from `seed`
        independently of the layout (`arch.common.init.init_params`); `runtime`: the layout's
        TransformerConfig fields. The trainer, once per run (pretrain/model_build.py); the export's
        gather. Required."""
        raise NotImplementedError(f"{type(self).__name__} defines no build_model()")

    def forward_step(self, model: Any, tokens: torch.Tensor, positions: torch.Tensor,
                     labels: torch.Tensor):
        """megatron's forward-step contract: (per-token losses, the function that reduces them).
        The training loop, once per micro-batch (training and evaluation). Default: the language
        model's mean token loss (`arch.common.lm`)."""
        return lm.forward_step(model, tokens, positions, labels)

    def step_metrics(self, model: Any, *, num_microbatches: int) -> dict[str, float]:
        """The family's own metrics of the last optimizer step, each key namespaced by the family
        (`moe/aux_loss`); it may be collective. The training loop, on every rank after every
        step. Default: none."""
        return {}

    def grow_state(self, old_cfg: Any, new_cfg: Any,
                   old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new model's full tensors (model space, megatron's keys) from the old run's `old`;
        the keys returned are loaded, the others keep the seed's initialisation. The trainer at
        step 0 of a grown run (pretrain/grow.py). Default: every old tensor as it is."""
        return old
