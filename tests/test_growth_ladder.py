"""A planned growth ladder (`orchestrate plan --growth-stages K`): the target trained in stages, each
starting from the previous stage's last checkpoint (orchestrator/plan/growth_ladder.py)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from scaleforge.cli import main
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan.cluster import cpu_cluster
from scaleforge.orchestrator.plan.growth_ladder import source_name
from scaleforge.orchestrator.plan.ladder import make_plan
from scaleforge.orchestrator.plan.planfile import load_plan, save_plan
from scaleforge.pretrain.grow import grown_model
from conftest import rank_env

CLI = [sys.executable, "-m", "scaleforge.cli"]


def _tiny_plan(store: Path):
    # one ladder run (the plan needs one), the target at the smallest shape; 44 steps a stage
    return make_plan(
        1e10, arch="tokenformer", cluster=cpu_cluster(1), ladder_min=0.5, ladder_max=0.5,
        budgets=1, sizes=1, seq_len=64, growth_stages=2,
        overrides=(f"data.stores=[{store}]", "model.vocab_size=512", "checkpoint.every=0",
                   "eval.every=0"),
    )


def test_tokenformer_ladder_shapes_tokens_and_sources():
    plan = make_plan(1e21, arch="tokenformer", growth_stages=3)
    stages = plan.growth
    assert len(stages) == 3
    final = plan.target.spec.model
    for i, run in enumerate(stages):
        model = run.spec.model
        # the paper's ladder: token counts double per stage, the last stage at the target's counts
        for kind in ("qkv", "proj", "ffn"):
            assert getattr(model, f"{kind}_tokens") == getattr(final, f"{kind}_tokens") // 2 ** (2 - i)
        assert (model.layers, model.hidden) == (final.layers, final.hidden)
        if i:
            # each stage is what the growth rule makes of the one before (the trainer re-checks it),
            # with the score scale frozen at stage 0's counts
            assert grown_model(model, stages[i - 1].spec.model) == model
            assert model.qkv_scale_tokens == stages[0].spec.model.qkv_tokens
            assert source_name(run) == stages[i - 1].name
            assert run.spec.checkpoint.init_from == f"../{stages[i - 1].name}-{stages[i - 1].run_id}"
        else:
            assert run.spec.checkpoint.init_from == "" and source_name(run) is None
    # equal tokens per stage (the paper's 30B a stage), together spending the target's budget
    tokens = [run.D for run in stages]
    assert max(tokens) / min(tokens) < 1.01
    assert math.isclose(sum(run.flops for run in stages), plan.budget, rel_tol=0.02)


def test_parscale_two_stage_recipe():
    plan = make_plan(1e21, arch="parscale", overrides=("model.streams=4",), growth_stages=2)
    first, second = plan.growth
    assert (first.spec.model.streams, second.spec.model.streams) == (1, 4)
    # the paper: 1T tokens at P=1, then 20B with P=4
    assert second.D / first.D == pytest.approx(20 / 1000, rel=0.02)
    assert math.isclose(first.flops + second.flops, plan.budget, rel_tol=0.02)


def test_plan_file_keeps_the_stages(tmp_path):
    plan = make_plan(1e21, arch="tokenformer", growth_stages=2)
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(path).growth == plan.growth


@pytest.mark.parametrize("arch, stages, extra, message", [
    ("dense", 2, (), "model.arch=dense has no planned growth ladder"),
    ("tokenformer", 1, (), "--growth-stages must be an integer of at least 2"),
    ("tokenformer", 10, (), "is below 8 tokens; plan fewer stages"),
    ("parscale", 3, ("model.streams=2",), "ParScale's recipe has 2 stages"),
    ("parscale", 2, ("model.streams=1",), "pass --set model.streams=P with P > 1"),
])
def test_refusals(arch, stages, extra, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(1e21, arch=arch, overrides=extra, growth_stages=stages)


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    code = main(["plan", "--budget", "1e21", "--growth-stages", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "has no planned growth ladder" in err
    assert not out.exists()


@pytest.mark.slow
def test_stages_train_in_order_each_from_the_last(tiny_store, tmp_path):
    """The planned stages train through the trainer, the second from the first's last weights."""
    from scaleforge.pretrain.metrics import read_metrics

    plan = _tiny_plan(tiny_store)
    plan = dataclasses.replace(plan, runs_dir=str(tmp_path / "runs"))
    plan_path = save_plan(plan, tmp_path / "plan.yaml")
    stages = [run.name for run in plan.growth]  # not the ladder run the plan needs
    proc = subprocess.run([*CLI, "submit", str(plan_path), "--growth", "--only", *stages],
                          env=rank_env(2),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses = []
    for run in plan.growth:
        run_dir = tmp_path / "runs" / f"{run.name}-{run.run_id}"
        lines = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        assert len(lines) == run.spec.train.steps
        losses.append([r["loss"] for r in lines])
    first, second = losses
    # a fresh 512-token model starts near ln 512 = 6.24; the grown stage starts where stage 0 ended
    # (its function at step 0 is stage 0's final one exactly, tests/test_tokenformer.py), far below
    assert first[0] > 6.0
    assert sum(first[-5:]) / 5 < first[0] - 0.4
    assert second[0] < first[0] - 0.4
