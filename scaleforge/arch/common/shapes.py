"""The dense shape rule: parameter count -> (layers, hidden, heads, kv_heads, ffn_hidden).

`DecoderConfig.for_params` (dense, ParScale) is this rule; MoE, MoR and Mamba build theirs on its
grid, head sizes and depth rule. Torch-free and deterministic. Rules (the exact N is then recomputed
by the config's own `num_params`):
- Width grid and head size (the head count must be divisible by the tensor-parallel size):
    16   ..  127:   steps of 16,   head_dim 16  (tiny CPU models, 3e4-1e5 parameters, the demo's)
    128  ..  255:   steps of 32,   head_dim 32  (tiny CPU models, 1e5-1e7 parameters)
    256  .. 1023:   steps of 64,   head_dim 64
    1024 .. 2047:   steps of 128,  head_dim 64  (even head counts)
    2048 .. 8191:   steps of 512,  head_dim 128 (head counts divisible by 4; LLaMA-2 7B's 4096)
    8192 ..     :   steps of 1024, head_dim 128 (head counts divisible by 8; GPT-3's 12288)
  heads = hidden / head_dim, kv_heads = heads (multi-head attention; `--set` cannot change it, the
  shape is planned, but a family config may).
- Depth: the aspect ratio hidden / layers is 32 up to hidden 128 and grows as 32 sqrt(hidden / 128) to
  128 at hidden 2048, then stays 128. That reproduces OLMo-2 1B (2048 / 16), LLaMA-2 7B (4096 / 32)
  and GPT-3 175B (12288 / 96); Marin's and OLMo's small ladder rungs sit at 64-100 near hidden 512-1024.
- Depth is a multiple of 2 from hidden 1024 and of 4 from hidden 2048, so pipeline stages divide it.
- ffn_hidden = 8/3 hidden (SwiGLU with the weights of a 4h MLP) rounded up to a multiple of 64
  (of 32 below hidden 256).
- Among widths on the grid and depths within a factor 4/3 of the rule, the shape whose N is within 5%
  of the target and nearest the aspect rule wins; if none is within 5%, the nearest N wins.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from scaleforge.errors import ConfigError

Shape = TypeVar("Shape")
"""A decoder config (arch/common/decoder.py or a family extending it): `base` and what the rule
returns, its type kept."""

TOLERANCE = 0.05
"""Accept shapes whose N is within 5% of the target, then prefer the aspect rule."""
DEPTH_SLACK = 4 / 3
"""Depths tried: within this factor of the aspect rule's depth."""
MAX_HIDDEN = 65536
MIN_HIDDEN = 16
"""Narrowest width: one head of 16 (with a 512-id vocabulary, a 1-layer model of 2e4 parameters)."""


def width_step(hidden: int) -> int:
    """Grid step at this width."""
    if hidden < 128:  # the demo's ladder needs distinct sizes between 5e4 and 3e5 parameters
        return 16
    if hidden < 256:
        return 32
    if hidden < 1024:
        return 64
    if hidden < 2048:
        return 128
    if hidden < 8192:
        return 512
    return 1024


def head_dim_for(hidden: int) -> int:
    """Head size at this width."""
    if hidden < 128:
        return 16
    if hidden < 256:
        return 32
    if hidden < 2048:
        return 64
    return 128


def depth_step(hidden: int) -> int:
    """Depths are multiples of this, so that pipeline stages can split them (GPT-3's 96, LLaMA's 32)."""
    if hidden < 1024:
        return 1
    if hidden < 2048:
        return 2
    return 4


def aspect_ratio(hidden: int) -> float:
    """Target hidden / layers."""
    return min(128.0, max(32.0, 32.0 * math.sqrt(hidden / 128)))


def rule_layers(hidden: int) -> int:
    """Depth the aspect rule gives for this width."""
    return max(1, int(round(hidden / aspect_ratio(hidden))))


def ffn_for(hidden: int) -> int:
    """SwiGLU inner width: 8/3 hidden rounded up to a multiple of 64 (32 for tiny widths)."""
    step = 32 if hidden < 256 else 64
    return -(-8 * hidden // (3 * step)) * step


def shape_for(hidden: int, layers: int, base: Shape) -> Shape:
    """`base` with the rule's heads and ffn at this width and depth."""
    heads = hidden // head_dim_for(hidden)
    return dataclasses.replace(
        base, layers=layers, hidden=hidden, heads=heads, kv_heads=heads, ffn_hidden=ffn_for(hidden)
    )


def widths() -> list[int]:
    """The width grid (see the module docstring)."""
    out, h = [], MIN_HIDDEN
    while h <= MAX_HIDDEN:
        out.append(h)
        h += width_step(h)
    return out


def dense_shape(n_target: float, base: Shape) -> Shape:
    """The dense shape with about `n_target` total parameters (vocab and tying taken from `base`)."""
    if not (isinstance(n_target, (int, float)) and math.isfinite(n_target) and n_target > 0):
        raise ConfigError(f"target parameter count must be a positive number, got {n_target!r}")
    smallest = shape_for(MIN_HIDDEN, 1, base)
    if n_target < smallest.num_params() / (1 + TOLERANCE) ** 4:
        raise ConfigError(
            f"N={n_target:.3g} is below the smallest dense model for vocab_size={base.vocab_size} "
            f"({smallest.num_params():.3g} parameters): raise the budget or lower model.vocab_size"
        )
    best = None  # (key, hidden, layers)
    for hidden in widths():
        rule = rule_layers(hidden)
        step = depth_step(hidden)
        lo = max(step, math.floor(rule / DEPTH_SLACK))
        hi = max(-(-rule // step) * step, math.floor(rule * DEPTH_SLACK))
        one = shape_for(hidden, 1, base)
        # N is affine in depth: fixed part (embeddings, final norm) + layers x one block
        per_layer = one.layer_params()
        fixed = one.num_params() - per_layer
        if fixed + lo * per_layer > n_target * 2:
            break  # wider shapes only grow
        for layers in range(-(-lo // step) * step, hi + 1, step):
            err = abs(math.log((fixed + layers * per_layer) / n_target))
            aspect = abs(math.log(layers / rule))
            within = err <= math.log1p(TOLERANCE)
            key = (0, aspect, err, hidden) if within else (1, err, aspect, hidden)
            if best is None or key < best[0]:
                best = (key, hidden, layers)
    return shape_for(best[1], best[2], base)
