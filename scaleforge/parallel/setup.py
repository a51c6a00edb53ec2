"""Process-group and megatron parallel-state set-up from the RunSpec's ParallelSpec.

One rank per process, started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) or by `srun` (one task =
one rank: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), or a plain single process. torch is imported
lazily so `env_from_launcher` and the layout checks stay cheap.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from scaleforge.parallel.checks import check_layout


@dataclass(kw_only=True, frozen=True)
class RankEnv:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks in the job."""
    local_rank: int
    """Rank on this node (picks the GPU)."""
    master_addr: str
    """Host of rank 0's rendezvous store."""
    master_port: int
    """Port of rank 0's rendezvous store."""


def env_from_launcher(environ: dict[str, str] | None = None) -> RankEnv:
    """Rank, world size and rendezvous address from torchrun, Slurm srun, or a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also an sbatch script that exports them)
        return RankEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun: one task is one rank
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        return RankEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR")
            or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")),
            # Derived from the job id so two jobs sharing a node do not collide on one port.
            master_port=int(env.get("MASTER_PORT") or 20000 + job % 40000),
        )
    return RankEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0)


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as `gpu[003-005,010],cpu1` -> `gpu003`."""
    if not nodelist:
        return "127.0.0.1"
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return "127.0.0.1"
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


PG_TIMEOUT_ENV = "SCALEFORGE_PG_TIMEOUT_S"
PG_TIMEOUT_S = 600.0
"""A collective waiting longer than this fails instead of hanging: a rank on a lost node never
answers, and gloo's own default would wait 30 minutes. 10 minutes (megatron's default
distributed-timeout) covers the longest legitimate wait, a checkpoint save on a slow file system."""


def process_group_timeout(environ: dict[str, str] | None = None) -> Any:
    """The process group's timeout: $SCALEFORGE_PG_TIMEOUT_S seconds, else PG_TIMEOUT_S."""
    from datetime import timedelta

    env = os.environ if environ is None else environ
    raw = env.get(PG_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else PG_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        from scaleforge.errors import ConfigError

        raise ConfigError(f"{PG_TIMEOUT_ENV}={raw!r}: use a positive number of seconds")
    return timedelta(seconds=seconds)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(spec: Any, environ: dict[str, str] | None = None) -> RankEnv:
    """Start torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel state.

    Checks the layout against the model and the world size first, so a bad layout fails with one
    line before any process group exists.
    """
    rank_env = env_from_launcher(environ)
    check_layout(spec, rank_env.world_size)

    import torch
    import torch.distributed as dist

    from scaleforge.parallel import cpu

    cpu.install()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank_env.local_rank)
    if not dist.is_initialized():
        port = rank_env.master_port or _free_port()
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=f"tcp://{rank_env.master_addr}:{port}",
            rank=rank_env.rank,
            world_size=rank_env.world_size,
            timeout=process_group_timeout(),
        )
    par = spec.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            expert_model_parallel_size=par.ep,
        )
    # Seeds megatron's tensor-parallel RNG tracker (dropout inside TP regions). Weights do not use
    # it: arch.common.init draws them independently of the layout.
    model_parallel_cuda_manual_seed(spec.seed)
    return rank_env


def shutdown() -> None:
    """Tear down megatron's parallel state and the process group (safe to call twice)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
