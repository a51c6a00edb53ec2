"""Learning rate, batch size and schedule of a planned run, from the Step Law (torch-free).

Step Law (Li et al. 2025, arXiv 2503.04715), fitted on 3,700 models trained with AdamW to a fixed final
learning rate of 1e-5:
    lr_opt(N, D) = 1.79 N^-0.713 D^0.307     N = non-embedding parameters, D = training tokens
    B_opt(D)     = 0.58 D^0.571              in tokens (1e11 tokens -> 1.108e6, 541 sequences of 2048)
The schedule is WSD (warmup, stable, decay): a linear warmup, a constant phase, then a linear decay over
the last `decay_fraction` of steps to the Step Law's final 1e-5. WSD lets a run be continued or cooled
down early (Hu et al. 2024, MiniCPM), which is what a ladder that is refit mid-way wants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaleforge.errors import ConfigError

STEP_LAW_LR = (1.79, -0.713, 0.307)
STEP_LAW_BATCH = (0.58, 0.571)
FINAL_LR = 1e-5
"""The Step Law's final learning rate (its fits assume decay to this, not to lr/10)."""
MAX_LR = 1e-2
"""Cap on the planned peak lr: the Step Law was fitted on N >= 6e7; extrapolated to the 1e5-parameter
models of the laptop loop it asks for 0.04 and more, where AdamW diverges."""
WARMUP_FRACTION = 0.01
"""Warmup steps as a fraction of all steps (at least 1, at most 2000)."""
DECAY_FRACTION = 0.2
"""WSD decay phase as a fraction of all steps (MiniCPM uses 10-20%)."""


def step_law_lr(n_non_embedding: float, tokens: float) -> float:
    """Optimal peak learning rate (Step Law)."""
    c, a, b = STEP_LAW_LR
    return c * n_non_embedding**a * tokens**b


def step_law_batch_tokens(tokens: float) -> float:
    """Optimal batch size in tokens (Step Law)."""
    c, a = STEP_LAW_BATCH
    return c * tokens**a


def round_sig(x: float, digits: int = 4) -> float:
    """Round to `digits` significant digits (keeps plan files readable and deterministic)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def batch_sequences(tokens: float, seq_len: int, multiple: int) -> int:
    """The Step Law batch in sequences, rounded to the nearest multiple of `multiple` (at least one)."""
    if multiple <= 0:
        raise ConfigError(f"batch multiple must be positive, got {multiple}")
    seqs = step_law_batch_tokens(tokens) / seq_len
    return max(multiple, int(round(seqs / multiple)) * multiple)


@dataclass(kw_only=True, frozen=True)
class Hparams:
    """Optimisation settings of one planned run (the `train` part of its RunSpec)."""

    steps: int
    """Optimizer steps."""
    global_batch: int
    """Sequences per step."""
    lr: float
    """Peak learning rate."""
    min_lr_ratio: float
    """Final lr / peak lr (the Step Law's 1e-5 final lr)."""
    warmup_steps: int
    """Linear warmup steps."""
    schedule: str = "wsd"
    """Always `wsd` here."""
    decay_fraction: float = DECAY_FRACTION
    """Fraction of steps in the final decay."""


def plan_hparams(
    *, n_non_embedding: int, tokens: float, seq_len: int, batch_multiple: int,
    max_lr: float = MAX_LR, decay_fraction: float = DECAY_FRACTION,
) -> Hparams:
    """Hyperparameters for training a model of `n_non_embedding` parameters on `tokens` tokens.

    The batch is the Step Law's, rounded to a multiple of micro_batch x dp; steps = tokens / batch
    tokens (rounded, at least 1), so the run trains steps x batch tokens.
    """
    if not tokens > 0:
        raise ConfigError(f"tokens must be > 0, got {tokens}")
    batch = batch_sequences(tokens, seq_len, batch_multiple)
    steps = max(1, int(round(tokens / (batch * seq_len))))
    lr = round_sig(min(max_lr, step_law_lr(n_non_embedding, steps * batch * seq_len)))
    warmup = min(2000, max(1, int(round(WARMUP_FRACTION * steps)))) if steps > 1 else 0
    return Hparams(
        steps=steps, global_batch=batch, lr=lr,
        min_lr_ratio=round_sig(min(1.0, FINAL_LR / lr)), warmup_steps=warmup,
        decay_fraction=decay_fraction,
    )
