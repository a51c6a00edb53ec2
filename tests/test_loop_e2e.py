"""The whole loop on this machine: plan -> submit (local executor) -> status -> refit -> re-planned target.

Real trainer, real token store, real fit; only the ladder is tiny. The law handed to `plan` puts the
compute-optimal model at about 4e4 parameters for 1e10 FLOPs (the Chinchilla prior would ask for
models smaller than the smallest shape at such budgets), so each run takes a few seconds.
"""

from __future__ import annotations

import json

import pytest
import yaml

from scaleforge.cli import main
from scaleforge.orchestrator.plan.cluster import cluster_to_dict, cpu_cluster
from scaleforge.orchestrator.plan.planfile import load_plan

pytestmark = pytest.mark.slow

# alpha = beta and A = B: G = 1, so N_opt = D_opt = sqrt(C / 6) (4.1e4 at 1e10 FLOPs).
LAW = {"law": "chinchilla", "params": {"A": 400.0, "B": 400.0, "E": 1.5, "alpha": 0.3, "beta": 0.3},
       "ci": {}}


def test_plan_submit_status_refit(tmp_path, tiny_store, capsys):
    law = tmp_path / "law.json"
    law.write_text(json.dumps(LAW))
    cluster = tmp_path / "cpu.yaml"
    cluster.write_text(yaml.safe_dump(cluster_to_dict(cpu_cluster(1))))
    plan = tmp_path / "plan.yaml"
    assert main([
        "plan", "--budget", "1e12", "--law", str(law), "--cluster", str(cluster),
        "--ladder-min", "1e-2", "--ladder-max", "6e-2", "--budgets", "3", "--sizes", "3",
        "--size-span", "2", "--seq-len", "64", "--set", f"data.stores=[{tiny_store}]",
        "--set", "model.vocab_size=512", "--set", "eval.batches=2", "--set", "eval.every=100",
        "--set", "checkpoint.every=0", "--out", str(plan), "--quiet",
    ]) == 0
    planned = load_plan(plan)
    assert len(planned.ladder) >= 6
    old_target = planned.target

    assert main(["submit", str(plan), "--cores", "2"]) == 0
    capsys.readouterr()
    assert main(["status", str(plan)]) == 0
    table = capsys.readouterr().out
    assert table.count("completed") == len(planned.ladder)

    # Idempotent: a second submit launches nothing.
    assert main(["submit", str(plan)]) == 0
    assert "nothing to launch" in capsys.readouterr().out

    assert main(["refit", str(plan), "--bootstrap", "50"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["law"] == "chinchilla" and fit["n_points"] >= 6
    assert all(r["used"] or r["excluded"] for r in fit["runs"])
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "isoflop.png", "optimal.png", "residuals.png"]
    replanned = load_plan(plan)
    assert replanned.law.source == "fit"
    assert replanned.history and replanned.history[-1]["N"] == old_target.N
    # Every ladder run logged each step exactly once.
    for run in planned.ladder:
        run_dir = next((tmp_path / "runs").glob(f"{run.name}-*"))
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        assert steps == list(range(1, run.spec.train.steps + 1))
