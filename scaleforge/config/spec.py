"""The RunSpec and its parts: frozen dataclasses, one docstring per field, each part validated on
construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from scaleforge.arch.registry import config_class
from scaleforge.errors import ConfigError
from scaleforge.parallel.memory import SHARD_LEVELS  # one spelling: the memory model's levels

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEVICE_KINDS = ("any", "cpu", "gpu")
"""Values of `train.device`."""


@dataclass(kw_only=True, frozen=True)
class DataSpec:
    """Where the training tokens come from and how they are cut into samples."""

    stores: tuple[str, ...] = ("bundled",)
    """Zarr token stores to sample from: paths, or `bundled` for the corpus the set-up ingests."""
    weights: tuple[float, ...] = ()
    """Mixture weights, one per store (empty: proportional to each store's token count)."""
    seq_len: int = 256
    """Tokens per training sample (the context length)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stores", tuple(self.stores))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.stores:
            raise ConfigError("data.stores is empty: name at least one token store (or `bundled`)")
        if self.weights and len(self.weights) != len(self.stores):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries but data.stores has {len(self.stores)}"
            )
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"data.weights must be >= 0 with a positive sum, got {self.weights}")
        _positive("data.seq_len", self.seq_len)


@dataclass(kw_only=True, frozen=True)
class TrainSpec:
    """Optimisation: steps, batch, AdamW and the learning-rate schedule."""

    steps: int = 100
    """Optimizer steps to train for."""
    global_batch: int = 8
    """Samples per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to the peak."""
    schedule: str = "cosine"
    """Decay after warmup: `cosine`, `wsd` (warmup-stable-decay) or `constant`."""
    decay_fraction: float = 0.2
    """WSD only: fraction of all steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    precision: str = "auto"
    """`auto`, `fp32` or `bf16`. `orchestrate plan` writes its cluster's (bf16 for `kind: gpu`, fp32
    for `kind: cpu`) and the trainer resolves a remaining `auto` on its device the same way before
    the run id is taken, so a CPU fp32 run and a GPU bf16 run of one YAML are different runs."""
    device: str = "any"
    """Kind of device the run must train on: `any`, `cpu` or `gpu`. The planner writes its cluster's
    kind; the trainer refuses a run planned for the other kind (its precision and speed assumptions
    would not hold)."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch"):
            _positive(f"train.{name}", getattr(self, name))
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(
                f"train.schedule must be cosine, wsd or constant, got {self.schedule!r}"
            )
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.device not in DEVICE_KINDS:
            raise ConfigError(f"train.device must be any, cpu or gpu, got {self.device!r}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by "
                f"train.micro_batch={self.micro_batch}"
            )


@dataclass(kw_only=True, frozen=True)
class ParallelSpec:
    """The parallel layout: world size = tp * pp * dp (expert parallelism lives inside dp)."""

    tp: int = 1
    """Tensor-parallel size (keep it inside a node)."""
    pp: int = 1
    """Pipeline-parallel size (1F1B over micro-batches)."""
    dp: int = 1
    """Data-parallel size; `orchestrate train --nproc N` sets it to N / (tp * pp)."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1)."""
    ep: int = 1
    """Expert-parallel size for MoE models (must divide dp and the experts; checked with the layout,
    after `--nproc` has set dp)."""
    shard: str = "optimizer"
    """What the data-parallel ranks shard: `none` (plain DDP), `optimizer` (megatron's distributed
    optimizer, ZeRO-1; the same as `none` at dp=1), `grads` (optimizer states and gradients, ZeRO-2)
    or `full` (also the weights, ZeRO-3); `grads` and `full` run megatron's Megatron-FSDP and need
    dp > 1 (checked with the layout, after `--nproc` has set dp)."""
    recompute: str = "none"
    """Activation recomputation: `none`, `selective` or `full`."""
    activation_offload: float = 0.0
    """MEMO-style offload of saved activations to host memory (any device): the fraction alpha of
    the other saved tensors' tokens that is copied (the rest is recomputed); each layer's input and
    attention output are always copied. 0 turns it off; needs recompute=none."""
    offload_layers: int = 0
    """megatron's own activation offload (`cpu_offloading`; needs a GPU with Transformer Engine):
    the number of transformer layers whose activations go to host memory; 0 turns it off. Needs
    pp=1 and recompute=none (megatron's restrictions)."""
    optimizer_offload: float = 0.0
    """Fraction of the optimizer states (and their update) held in host memory by megatron's
    HybridDeviceOptimizer; 0 turns it off. Needs a GPU with Transformer Engine and a sharded
    optimizer (shard != none)."""
    grad_reduce_fp32: bool = True
    """Accumulate gradients over micro-batches and reduce them over the data-parallel ranks in fp32
    (megatron's `grad_reduce_in_fp32`, 4 bytes a parameter). `false` keeps them in the parameters'
    precision: under bf16, 2 bytes a parameter saved, at the cost of precision (bf16's 8-bit
    mantissa rounds each addition, so many micro-batches and ranks lose the small contributions);
    the fp32 master weights and Adam states are unchanged. Under `train.precision: fp32` the
    gradients are fp32 either way and `false` changes nothing (accepted, so one YAML runs on a GPU
    in bf16 and on a CPU in fp32). The planner sets it to false only when nothing else fits."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep"):
            _positive(f"parallel.{name}", getattr(self, name))
        if self.sp and self.tp == 1:
            raise ConfigError("parallel.sp=true needs parallel.tp > 1")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(
                f"parallel.recompute must be none, selective or full, got {self.recompute!r}"
            )
        if self.shard not in SHARD_LEVELS:
            raise ConfigError(
                f"parallel.shard must be one of {', '.join(SHARD_LEVELS)}, got {self.shard!r}"
            )
        for name in ("activation_offload", "optimizer_offload"):
            value = getattr(self, name)
            if not 0 <= value <= 1:  # also NaN
                raise ConfigError(f"parallel.{name} must be a fraction in [0, 1], got {value!r}")
        if self.offload_layers < 0:
            raise ConfigError(f"parallel.offload_layers must be >= 0, got {self.offload_layers}")
        if self.activation_offload and self.offload_layers:
            raise ConfigError(
                "parallel.activation_offload and parallel.offload_layers are two ways to offload "
                "the same activations; set one of them to 0"
            )
        if self.activation_offload and self.recompute != "none":
            raise ConfigError(
                f"parallel.activation_offload recomputes what it does not copy; it needs "
                f"parallel.recompute=none (got {self.recompute}), or set activation_offload=0"
            )
        if self.offload_layers and self.pp > 1:
            raise ConfigError(
                f"parallel.offload_layers needs parallel.pp=1 (megatron's cpu_offloading has no "
                f"pipeline support; got pp={self.pp}); use parallel.activation_offload instead"
            )
        if self.offload_layers and self.recompute != "none":
            raise ConfigError(
                f"parallel.offload_layers needs parallel.recompute=none (megatron's cpu_offloading "
                f"does not work with recomputation; got {self.recompute})"
            )
        if self.optimizer_offload and self.shard == "none":
            raise ConfigError(
                "parallel.optimizer_offload needs a sharded optimizer (megatron's "
                "HybridDeviceOptimizer runs inside the distributed optimizer); set parallel.shard "
                "to optimizer, grads or full"
            )

    @property
    def world_size(self) -> int:
        """Total ranks this layout needs."""
        return self.tp * self.pp * self.dp

    @property
    def distributed_optimizer(self) -> bool:
        """Whether megatron's distributed optimizer holds the optimizer states: shard is not `none`
        and dp > 1 (Megatron-FSDP always runs with it), or optimizer offload asks for it."""
        return self.shard != "none" and (self.dp > 1 or self.optimizer_offload > 0)


@dataclass(kw_only=True, frozen=True)
class CheckpointSpec:
    """When checkpoints are written and how many are kept."""

    every: int = 50
    """Save every this many steps (0 turns periodic checkpoints off; the final step always saves)."""
    keep: int = 2
    """Complete checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    init_from: str = ""
    """A run directory whose last checkpoint a new run starts from, adapted by the family (its growth
    rule: docs/families.md "Growth"); read only at step 0 when this run has no checkpoint of its own,
    with a fresh optimizer and schedule. What `orchestrate grow` writes; "" starts from the seed."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        _positive("checkpoint.keep", self.keep)


@dataclass(kw_only=True, frozen=True)
class EvalSpec:
    """Validation-loss evaluation on the stores' held-out split."""

    every: int = 50
    """Evaluate every this many steps and at the last step (0 turns evaluation off)."""
    batches: int = 4
    """Global batches of validation samples per evaluation (a fixed, seeded set, the same in every layout)."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        _positive("eval.batches", self.batches)


@dataclass(kw_only=True, frozen=True)
class RunSpec:
    """Everything that defines one training run."""

    name: str = "run"
    """Human-readable run name: letters, digits, `.`, `_`, `-` (it reaches file names and Slurm)."""
    seed: int = 1234
    """Seed for weights, data order and every other random choice."""
    model: Any = field(default_factory=lambda: config_class("dense")())
    """Architecture shape; `model.arch` picks the family (see `scaleforge.arch.registry`)."""
    data: DataSpec = field(default_factory=DataSpec)
    """Token stores and sample length."""
    train: TrainSpec = field(default_factory=TrainSpec)
    """Optimisation settings."""
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    """Parallel layout."""
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    """Checkpoint cadence."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    """Evaluation cadence."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not RUN_NAME_RE.match(self.name):
            raise ConfigError(
                f"name={self.name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-' "
                "(it becomes part of file names and Slurm job names)"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        per_step = self.train.micro_batch * self.parallel.dp
        if self.train.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.train.global_batch} is not divisible by "
                f"train.micro_batch x parallel.dp = {self.train.micro_batch} x {self.parallel.dp}"
            )

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.train.global_batch // (self.train.micro_batch * self.parallel.dp)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens consumed by one optimizer step."""
        return self.train.global_batch * self.data.seq_len



def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
