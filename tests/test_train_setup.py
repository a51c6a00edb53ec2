"""Rank environment from torchrun / srun, layout checks, and the learning-rate schedules (no torch)."""

from __future__ import annotations

import math

import pytest

from scaleforge.config import DataSpec, ParallelSpec, RunSpec, TrainSpec
from scaleforge.errors import LayoutError
from scaleforge.parallel.checks import check_layout, dp_for_world
from scaleforge.parallel.setup import env_from_launcher, first_host
from scaleforge.pretrain.schedules import lr_at


def test_torchrun_environment_wins():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    r = env_from_launcher(env)
    assert (r.rank, r.world_size, r.local_rank, r.master_addr, r.master_port) == (3, 4, 1, "n1", 1234)


def test_srun_task_is_one_rank():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[003-005,010],cpu1"}
    r = env_from_launcher(env)
    assert (r.rank, r.world_size, r.local_rank) == (5, 8, 1)
    assert r.master_addr == "gpu003"
    assert r.master_port == 20000 + 123456 % 40000
    # an explicit MASTER_ADDR/PORT (set by an sbatch script) is kept
    r = env_from_launcher({**env, "MASTER_ADDR": "head", "MASTER_PORT": "999"})
    assert (r.master_addr, r.master_port) == ("head", 999)


def test_single_process_default():
    r = env_from_launcher({})
    assert (r.rank, r.world_size, r.local_rank) == (0, 1, 0)


@pytest.mark.parametrize("nodelist,host", [("node7", "node7"), ("a[1-3]", "a1"),
                                           ("gpu[010,003]", "gpu010"), ("x-1,y-2", "x-1")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_layout_against_world_size_and_nproc():
    spec = RunSpec(parallel=ParallelSpec(tp=2, pp=1, dp=2))
    check_layout(spec, 4)
    with pytest.raises(LayoutError, match="world size 2 != parallel.tp x parallel.pp x parallel.dp"):
        check_layout(spec, 2)
    assert dp_for_world(spec, 6) == 3
    with pytest.raises(LayoutError, match="--nproc 3 is not divisible"):
        dp_for_world(spec, 3)


def test_sequence_parallel_needs_divisible_sequence():
    spec = RunSpec(parallel=ParallelSpec(tp=2, sp=True))
    check_layout(spec)
    odd = RunSpec(parallel=ParallelSpec(tp=2, sp=True), data=DataSpec(seq_len=33))
    with pytest.raises(LayoutError, match="seq_len=33"):
        check_layout(odd)


def _train(**kw) -> TrainSpec:
    return TrainSpec(**{"steps": 100, "lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 10, **kw})


def test_warmup_then_cosine_to_the_floor():
    t = _train()
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(99, t) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2  # halfway through the decay the cosine is at the mean
    assert lr_at(int(mid), t) == pytest.approx(0.55 + 0.45 * math.cos(math.pi * 44 / 89))
    lrs = [lr_at(s, t) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_holds_then_decays_linearly():
    t = _train(schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, t) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(99, t) == pytest.approx(0.1)
    assert lr_at(89, t) == pytest.approx(1.0 - 0.9 * 10 / 20)


def test_constant():
    t = _train(schedule="constant")
    assert lr_at(5, t) == pytest.approx(0.6) and lr_at(99, t) == 1.0
