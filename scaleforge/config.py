"""The RunSpec: one frozen value that the planner writes, the executors ship and the trainer reads.

Torch-free. Every field has a docstring; every part validates itself on construction; variants are
made with `dataclasses.replace` (or `apply_overrides`), never by mutation. A run's identity is the
short hash of its canonical spec minus the fields that do not change what is trained (`IDENTITY_EXCLUDE`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scaleforge.arch.registry import config_class, known_archs
from scaleforge.errors import ConfigError

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEVICE_KINDS = ("any", "cpu", "gpu")
"""Values of `train.device`."""
PRECISION_OF_KIND = {"cpu": "fp32", "gpu": "bf16"}
"""What `train.precision: auto` resolves to on each kind of device (bf16 needs a GPU's tensor cores
to pay; CPU kernels run fp32)."""


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


SHARD_LEVELS = ("none", "optimizer", "grads", "full")
"""`parallel.shard`: what data-parallel ranks split among themselves (docs/memory.md)."""
RENAMED_KEYS = {"parallel.distributed_optimizer": "parallel.shard (none | optimizer | grads | full)"}
"""Keys that were replaced, with what replaced them (named in the refusal of the old key)."""


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


# Layout and checkpoint cadence do not change what a run trains, so they are not part of its identity:
# the same run may be resumed under another layout and stays the same run.
IDENTITY_EXCLUDE = ("parallel", "checkpoint")


# ----------------------------------------------------------------------------------------------
# dict / YAML conversion


def to_dict(spec: Any) -> dict:
    """Plain nested dict of a dataclass (tuples become lists), in field order."""
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown fields and wrong types by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the spec'} must be a mapping, got {type(data).__name__}")
    if cls is RunSpec and "model" in data:
        data = dict(data)
        data["model"] = model_from_dict(data["model"])
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    for name in unknown:
        key = f"{where}.{name}" if where else name
        if key in RENAMED_KEYS:
            raise ConfigError(f"{key} was replaced by {RENAMED_KEYS[key]}; use that key instead")
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config field '{key}'; known fields: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or 'spec'}: {exc}") from None


def model_from_dict(data: Any) -> Any:
    """Build the family config named by `data['arch']` (default `dense`)."""
    if dataclasses.is_dataclass(data):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"model must be a mapping, got {type(data).__name__}")
    arch = data.get("arch", "dense")
    return from_dict(config_class(arch), data, "model")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(inner, v, f"{key}[]") for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a float.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def spec_to_yaml(spec: RunSpec) -> str:
    """Canonical YAML of a RunSpec (field order, no aliases)."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=False)


def load_yaml_file(path: str | Path) -> Any:
    """Read a YAML file safely; a missing file or invalid YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        # libyaml's safe loader where built in: the same documents, 10x faster (a 200-run plan.yaml
        # takes 5 s to parse in pure Python)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a YAML text file (byte {exc.start} is not UTF-8); pass the YAML file"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def load_runspec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Load a RunSpec YAML file and apply `key.path=value` overrides.

    An empty file (or one holding only comments or `{}`) is refused rather than read as all defaults:
    it is almost always the wrong file, and a run of defaults would silently train something else.
    """
    data = load_yaml_file(path)
    if data is None or data == {}:
        raise ConfigError(
            f"{path}: the RunSpec is empty; write at least name, model and train "
            "(see examples/dense-tiny.yaml)"
        )
    try:
        spec = from_dict(RunSpec, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return apply_overrides(spec, overrides)


def apply_overrides(spec: RunSpec, overrides: list[str] | tuple[str, ...]) -> RunSpec:
    """Return a new RunSpec with each `key.path=value` applied (YAML scalars; the last one wins)."""
    if not overrides:
        return spec
    data = to_dict(spec)
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    # The family decides which model keys exist, so apply `model.arch` first.
    for key, value in parsed:
        if key == "model.arch":
            if value not in known_archs():
                raise ConfigError(
                    f"--set model.arch={value}: unknown architecture; known: {', '.join(known_archs())}"
                )
            data["model"] = {**to_dict(config_class(value)()), "arch": value}
    for key, value in parsed:
        _set_path(data, key, value)
    return from_dict(RunSpec, data)


def _set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    if key in RENAMED_KEYS:
        raise ConfigError(f"--set {key}: replaced by {RENAMED_KEYS[key]}; use that key instead")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--set {key}: no such field '{'.'.join(parts[: i + 1])}'")
        if i == len(parts) - 1:
            if isinstance(node[part], dict):
                raise ConfigError(f"--set {key}: is a section, set one of its fields")
            node[part] = value
        else:
            node = node[part]


def resolve_precision(spec: RunSpec, kind: str) -> RunSpec:
    """`spec` with `train.precision: auto` resolved for a device of `kind` (`cpu` or `gpu`)."""
    if kind not in PRECISION_OF_KIND:
        raise ConfigError(f"device kind must be cpu or gpu, got {kind!r}")
    if spec.train.precision != "auto":
        return spec
    train = dataclasses.replace(spec.train, precision=PRECISION_OF_KIND[kind])
    return dataclasses.replace(spec, train=train)


def check_device(spec: RunSpec, kind: str) -> None:
    """Refuse a run planned for one kind of device (`train.device`) on the other."""
    if spec.train.device not in ("any", kind):
        raise ConfigError(
            f"train.device is {spec.train.device} (the plan's cluster) but this machine is {kind}: "
            f"train it on a {spec.train.device} machine, or re-plan with a {kind} cluster"
        )


def same_run(written: RunSpec, planned: RunSpec) -> bool:
    """Whether `written` (a run directory's run.yaml) is the run `planned` describes: the same run
    id, or the same once the trainer has resolved the planned spec's `precision: auto`."""
    if run_id(written) == run_id(planned):
        return True
    kinds = [k for k, p in PRECISION_OF_KIND.items() if p == written.train.precision]
    return any(run_id(resolve_precision(planned, k)) == run_id(written) for k in kinds)


def run_id(spec: RunSpec) -> str:
    """Short hash of the canonical spec without the fields in IDENTITY_EXCLUDE."""
    data = {k: v for k, v in to_dict(spec).items() if k not in IDENTITY_EXCLUDE}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
