"""The cluster a plan is made for: node count, accelerators per node, their memory and speed.

Torch-free. A cluster file is YAML with the fields of `Cluster`; a missing required field or an unknown
one is a one-line error. Without a file the planner uses `DEFAULT_CLUSTER`: nodes of 8 x H100 80 GB SXM,
whose dense bf16 peak is 989 TFLOP/s per GPU (NVIDIA H100 datasheet, without sparsity).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleforge.config import load_yaml_file
from scaleforge.errors import ConfigError

KINDS = ("gpu", "cpu")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads `1e3` as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _number(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        limit = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"cluster.{name} must be a finite number {limit}, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class Cluster:
    """The machines runs are planned for (`gpu` fields also describe CPU ranks when kind is `cpu`)."""

    name: str = "cluster"
    """Label shown in plans."""
    kind: str
    """`gpu`, or `cpu` (ranks are CPU processes; no device-memory check, no flash attention)."""
    nodes: int
    """Nodes available to one run."""
    gpus_per_node: int
    """Accelerators (or CPU ranks) per node; tensor parallelism stays inside one node."""
    gpu_memory_gb: float
    """Memory of one accelerator in GB (1e9 bytes); 0 turns the memory check off (CPU)."""
    peak_tflops: float
    """Dense bf16 peak of one accelerator (or fp32 peak of one CPU rank) in TFLOP/s."""
    mfu: float = 0.4
    """Assumed model-FLOPs utilisation for time estimates (OLMo-core reports about 40% on H100)."""
    memory_headroom: float = 0.9
    """Fraction of device memory the plan may fill (the rest: CUDA context, allocator fragmentation)."""
    interconnect: str = "nvlink+infiniband"
    """Free-text description of the intra/inter-node links (informational)."""
    flash_attention: bool = True
    """Attention kernels keep no s x s score matrix (drops Korthikanti's 5as/h activation term)."""
    host_memory_gb: float = 2000.0
    """Host (CPU) memory of one node in GB, for offloaded optimizer states and activations (a DGX
    H100 has 2 TB)."""
    host_link_gb_s: float = 64.0
    """Device-to-host bandwidth of one accelerator in GB/s, one direction (PCIe Gen5 x16: 128 GB/s
    both ways); MEMO's alpha hides the activation copies behind compute at this rate."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"cluster.kind must be gpu or cpu, got {self.kind!r}")
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"cluster.{name} must be a positive integer, got {value!r}")
        _number("gpu_memory_gb", self.gpu_memory_gb, allow_zero=True)
        _number("peak_tflops", self.peak_tflops)
        _number("mfu", self.mfu)
        _number("memory_headroom", self.memory_headroom)
        _number("host_memory_gb", self.host_memory_gb, allow_zero=True)
        _number("host_link_gb_s", self.host_link_gb_s, allow_zero=True)
        if self.mfu > 1 or self.memory_headroom > 1:
            raise ConfigError("cluster.mfu and cluster.memory_headroom must be at most 1")
        if self.kind == "gpu" and self.gpu_memory_gb == 0:
            raise ConfigError("cluster.gpu_memory_gb must be > 0 for kind gpu (0 is for kind cpu)")

    @property
    def gpus(self) -> int:
        """All accelerators (or CPU ranks) of the cluster."""
        return self.nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> float:
        """Bytes of one device the plan may use (infinite when the memory check is off)."""
        if self.gpu_memory_gb == 0:
            return math.inf
        return self.gpu_memory_gb * 1e9 * self.memory_headroom


DEFAULT_CLUSTER = Cluster(
    name="h100x8", kind="gpu", nodes=16, gpus_per_node=8, gpu_memory_gb=80.0, peak_tflops=989.0
)
"""16 nodes of 8 x H100 80 GB (128 GPUs); pass --cluster FILE for another machine."""


def cpu_cluster(ranks: int = 2, *, tflops_per_rank: float = 0.05) -> Cluster:
    """One node of `ranks` CPU processes (the laptop loop); 0.05 TFLOP/s fp32 a core is a rough guess."""
    return Cluster(
        name=f"cpu{ranks}", kind="cpu", nodes=1, gpus_per_node=ranks, gpu_memory_gb=0.0,
        peak_tflops=tflops_per_rank, interconnect="shared memory", flash_attention=False,
    )


def cluster_to_dict(cluster: Cluster) -> dict:
    """Plain dict in field order (the form stored in plan.yaml)."""
    return {f.name: getattr(cluster, f.name) for f in dataclasses.fields(cluster)}


def cluster_from_dict(data: Any, where: str = "cluster") -> Cluster:
    """Build a Cluster; a missing required field, unknown field or wrong type is a one-line error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of cluster fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(Cluster)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}'; known fields: {', '.join(fields)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing field '{missing[0]}' (required: {', '.join(required)})")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default
        kind = type(default) if default is not dataclasses.MISSING else None
        if name in ("kind", "name", "interconnect") or kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{name} must be a string, got {value!r}")
        elif kind is bool or name == "flash_attention":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{name} must be true or false, got {value!r}")
        elif name in ("nodes", "gpus_per_node"):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
        else:
            value = _as_float(f"{where}.{name}", value)
        kwargs[name] = value
    return Cluster(**kwargs)


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster YAML file."""
    data = load_yaml_file(path)
    try:
        return cluster_from_dict(data, where=str(path))
    except ConfigError as exc:
        message = str(exc)
        if not message.startswith(str(path)):
            message = f"{path}: {message}"
        raise ConfigError(message) from None
