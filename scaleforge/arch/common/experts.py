"""The routed-experts keys (torch-free): their allowed values and one-line checks, for every family
that builds megatron's MoELayer (the MoE family's layers, a Mamba hybrid's `E` layers)."""

from __future__ import annotations

import math
from typing import Any

from scaleforge.errors import ConfigError

ROUTER_SCORES = ("softmax", "sigmoid")
DISPATCHERS = ("allgather", "alltoall")
DROP_POLICIES = ("probs", "position")


def check_expert_keys(cfg: Any) -> None:
    """ConfigError for the first bad routed-experts key of `cfg` (experts, top_k, moe_ffn_hidden,
    shared_expert_ffn, capacity_factor, drop_policy, router_score, expert_bias, aux_loss_coeff,
    z_loss_coeff, dispatcher: the same names in every family that has them)."""
    for name in ("experts", "top_k", "moe_ffn_hidden"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    if (not isinstance(cfg.shared_expert_ffn, int) or isinstance(cfg.shared_expert_ffn, bool)
            or cfg.shared_expert_ffn < 0):
        raise ConfigError(
            f"model.shared_expert_ffn must be an integer >= 0 (0: no shared expert), "
            f"got {cfg.shared_expert_ffn!r}"
        )
    if cfg.top_k > cfg.experts:
        raise ConfigError(
            f"model.top_k={cfg.top_k} exceeds model.experts={cfg.experts}; lower top_k or add "
            "experts"
        )
    for name in ("capacity_factor", "aux_loss_coeff", "z_loss_coeff"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"model.{name} must be a finite number, got {value!r}")
        if value < 0:
            what = ("0 means dropless; use 0 or a factor such as 1.25"
                    if name == "capacity_factor" else "use 0 to turn it off")
            raise ConfigError(f"model.{name}={value} must be >= 0 ({what})")
    if cfg.router_score not in ROUTER_SCORES:
        raise ConfigError(
            f"model.router_score={cfg.router_score!r} is not one of {', '.join(ROUTER_SCORES)}"
        )
    if cfg.expert_bias and cfg.router_score != "sigmoid":
        raise ConfigError(
            "model.expert_bias=true needs model.router_score=sigmoid (megatron's aux-loss-free "
            "balancing biases sigmoid scores)"
        )
    if cfg.dispatcher not in DISPATCHERS:
        raise ConfigError(
            f"model.dispatcher={cfg.dispatcher!r} is not one of {', '.join(DISPATCHERS)}"
        )
    if cfg.drop_policy not in DROP_POLICIES:
        raise ConfigError(
            f"model.drop_policy={cfg.drop_policy!r} is not one of {', '.join(DROP_POLICIES)}"
        )
