"""`orchestrate refit` on hand-written run directories in the contract format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaleforge.cli import main
from scaleforge.config import spec_to_yaml
from scaleforge.orchestrator.fit import refit
from scaleforge.orchestrator.fit.laws import chinchilla
from scaleforge.orchestrator.plan.ladder import make_plan
from scaleforge.orchestrator.plan.planfile import load_plan, run_dir, save_plan

TRUTH = {"A": 482.01, "B": 2085.43, "E": 1.8169, "alpha": 0.3478, "beta": 0.3658}
STEPS = 60


def write_run(d: Path, run, *, state: str = "completed", losses=None, lrs=None) -> float:
    """A run directory as the trainer leaves it; returns the final loss written."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.yaml").write_text(spec_to_yaml(run.spec))
    final = float(chinchilla.loss(TRUTH, run.spec.model.num_params(), run.D))
    t = np.arange(1, STEPS + 1) / STEPS
    if losses is None:
        losses = final + 2.0 * (1 - t) ** 3  # flat at the end: cooled
    if lrs is None:
        lrs = 3e-3 * np.minimum(1, np.arange(1, STEPS + 1) / 5) * np.where(t < 0.8, 1.0, (1 - t) / 0.2 + 1e-3)
    lines = [
        json.dumps({"step": s, "tokens": run.D * s / STEPS, "flops": run.flops * s / STEPS, "loss": float(l), "lr": float(lr), "grad_norm": 1.0, "tokens_per_s": 1e4})
        for s, l, lr in zip(range(1, STEPS + 1), losses, lrs)
    ]
    lines.append(json.dumps({"step": STEPS, "tokens": run.D, "flops": run.flops, "eval_loss": final}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "status.json").write_text(json.dumps({"state": state, "step": STEPS, "total_steps": STEPS}))
    return final


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    plan = make_plan(1e21, budgets=3, sizes=5)
    return save_plan(plan, tmp_path / "plan.yaml")


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_refit_fits_excludes_and_replans(plan_path: Path, capsys):
    plan = load_plan(plan_path)
    ladder = list(plan.ladder)
    assert len(ladder) == 15
    t = np.arange(1, STEPS + 1) / STEPS
    special = {
        ladder[1].name: "diverged",
        ladder[6].name: "failed",
        ladder[11].name: "undercooled",
        ladder[13].name: "dominated",
    }
    for r in ladder:
        d = run_dir(plan, plan_path, r)
        kind = special.get(r.name)
        if kind == "diverged":
            losses = np.full(STEPS, 3.0)
            losses[40:] = np.nan
            write_run(d, r, state="diverged", losses=losses)
        elif kind == "failed":
            write_run(d, r, state="failed")
        elif kind == "undercooled":
            final = float(chinchilla.loss(TRUTH, r.spec.model.num_params(), r.D))
            # still falling linearly at the end, at a constant (never annealed) learning rate
            write_run(d, r, losses=final + 2.0 * (1 - t), lrs=np.full(STEPS, 3e-3))
        else:
            write_run(d, r)
    # The dominated run: a loss far above the law, so some run with fewer parameters and fewer
    # tokens does better.
    dom = ladder[13]
    worse = float(chinchilla.loss(TRUTH, dom.spec.model.num_params(), dom.D)) + 0.5
    d = run_dir(plan, plan_path, dom)
    text = (d / "metrics.jsonl").read_text().splitlines()
    last = json.loads(text[-1])
    last["eval_loss"] = worse
    text[-1] = json.dumps(last)
    (d / "metrics.jsonl").write_text("\n".join(text) + "\n")
    old_target = plan.target

    assert main(["refit", str(plan_path), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out

    fit = json.loads((plan_path.parent / "fit.json").read_text())
    used = {r["name"]: r for r in fit["runs"]}
    assert fit["law"] == "chinchilla" and fit["n_points"] == 11
    assert not used[ladder[1].name]["used"] and used[ladder[1].name]["excluded"].startswith("diverged")
    assert used[ladder[6].name]["excluded"] == "not completed (state failed)"
    assert used[ladder[11].name]["excluded"].startswith("undercooled")
    assert "above" in used[dom.name]["excluded"] and "fewer parameters and tokens" in used[dom.name]["excluded"]
    for name in special:
        assert f"excluded {name}:" in out.replace("\n", " ") or f"excluded {name}:" in " ".join(fit["warnings"])
    assert len(fit["warnings"]) >= 4
    # Exact data from the law: the kept runs pin the law down.
    kept = [r for r in fit["runs"] if r["used"]]
    pred = chinchilla.loss(fit["params"], np.array([r["N"] for r in kept]), np.array([r["D"] for r in kept]))
    np.testing.assert_allclose(pred, [r["L"] for r in kept], rtol=1e-4)
    assert fit["objective"] < 1e-8
    assert len(fit["samples"]) == 100 and set(fit["samples"][0]) == {"A", "B", "E", "alpha", "beta"}
    assert fit["isoflop"] is not None and len(fit["isoflop"]["budgets"]) == 3
    assert fit["isoflop"]["params"]["a"] == pytest.approx(TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"]), abs=0.03)
    assert fit["annealing"]  # fitted on kept curves
    # Held-out rollout: fitted without the largest budget, exact data predicts it almost exactly.
    assert fit["holdout"]["budget"] == max(r.budget for r in ladder)
    assert len(fit["holdout"]["runs"]) >= 3 and fit["holdout"]["mean_abs_rel_error"] < 0.01
    for png in ("isoflop.png", "optimal.png", "residuals.png"):
        data = (plan_path.parent / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    new = load_plan(plan_path)
    assert new.law.source == "fit" and new.law.params["alpha"] == pytest.approx(fit["params"]["alpha"])
    assert len(new.history) == 1 and new.history[0]["N"] == old_target.N
    n_opt, _ = chinchilla.compute_optimal(fit["params"], 1e21)
    assert new.target.N == pytest.approx(float(n_opt), rel=0.15)


def test_too_few_runs_writes_nothing(plan_path: Path, capsys):
    plan = load_plan(plan_path)
    for r in plan.ladder[:3]:
        write_run(run_dir(plan, plan_path, r), r)
    before = files_under(plan_path.parent)
    assert main(["refit", str(plan_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: law chinchilla needs at least 6 usable runs, got 3 of 15") and err.count("\n") == 1
    assert files_under(plan_path.parent) == before


def test_only_diverged_runs_writes_nothing(plan_path: Path, capsys):
    plan = load_plan(plan_path)
    for r in plan.ladder:
        write_run(run_dir(plan, plan_path, r), r, state="diverged", losses=np.full(STEPS, np.inf))
    before = files_under(plan_path.parent)
    assert main(["refit", str(plan_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no usable runs to fit") and "diverged" in err and err.count("\n") == 1
    assert files_under(plan_path.parent) == before


def test_collect_run_reads_the_contract(tmp_path: Path, plan_path: Path):
    plan = load_plan(plan_path)
    r = plan.ladder[0]
    final = write_run(tmp_path / "one", r)
    rec = refit.collect_run(tmp_path / "one", name=r.name, budget=r.budget, n_params=1.0)
    assert rec.excluded == "" and rec.state == "completed"
    assert rec.N == r.spec.model.num_params()  # from run.yaml, not the argument
    assert rec.L == pytest.approx(final) and rec.D == pytest.approx(r.D) and rec.C == pytest.approx(r.flops)
    assert rec.curve["loss"].shape == (STEPS,)
    missing = refit.collect_run(tmp_path / "nope", name="x", budget=1.0, n_params=1.0)
    assert missing.excluded.startswith("no run directory")


def _all_runs(plan_path: Path):
    plan = load_plan(plan_path)
    for r in plan.ladder:
        write_run(run_dir(plan, plan_path, r), r)
    return plan


def test_holdout_largest_reports_the_error_and_changes_nothing_else(plan_path: Path, capsys):
    plan = _all_runs(plan_path)
    before = files_under(plan_path.parent)
    assert main(["refit", str(plan_path), "--holdout-largest", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    body = json.loads((plan_path.parent / "holdout.json").read_text())
    top = max(r.budget for r in plan.ladder)
    assert body["budget"] == top and len(body["runs"]) == sum(r.budget == top for r in plan.ladder)
    # exact data from the law: the smaller budgets predict the largest one almost exactly
    assert body["mean_abs_rel_error"] < 0.01 and all(abs(e) < 0.02 for e in body["rel_error"])
    assert len(body["interval"]) == len(body["runs"]) and all(lo <= hi for lo, hi in body["interval"])
    assert "mean |relative error|" in out
    after = files_under(plan_path.parent)
    assert {k: v for k, v in after.items() if k != "holdout.json"} == before  # no fit.json, same plan


def test_intermediate_points_are_the_losses_of_shorter_runs():
    """On curves generated by an annealing law, the point made from a long WSD run's evaluation at
    step s is the final loss a WSD run of s steps (same warmup and decay fraction) reaches."""
    from dataclasses import replace

    from scaleforge.config import TrainSpec
    from scaleforge.orchestrator.fit.laws import annealing
    from scaleforge.pretrain.schedules import lr_at

    law = {"L0": 2.5, "A": 0.3, "alpha": 0.5, "C": 3.0}
    train = TrainSpec(steps=400, global_batch=4, micro_batch=4, lr=2e-3, warmup_steps=8,
                      schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.01)

    def final(t: TrainSpec) -> float:
        s1, s2 = annealing.areas(np.array([lr_at(i, t) for i in range(t.steps)]), warmup=t.warmup_steps)
        return float(annealing.loss(law, s1[-1], s2[-1]))

    lrs = np.array([lr_at(i, train) for i in range(train.steps)])
    s1, s2 = annealing.areas(lrs, warmup=train.warmup_steps)
    curve = annealing.loss(law, s1, s2)
    evals = tuple((s, 1000.0 * s, float(curve[s - 1 - train.warmup_steps])) for s in range(50, 401, 50))
    rec = refit.RunRecord(name="r", path="", budget=1e12, N=5e4, D=4e5, L=float(curve[-1]),
                          state="completed", train=train, evals=evals)
    points = refit.intermediate_points(rec, law)
    # stable phase only (steps 120 .. 320), not the final step
    assert [p.step for p in points] == [150, 200, 250, 300]
    assert all(p.kind == "intermediate" and p.D == 1000.0 * p.step for p in points)
    for p in points:
        shorter = final(replace(train, steps=p.step))
        assert p.L == pytest.approx(shorter, rel=1e-9)
        assert p.L < dict((s, v) for s, _t, v in evals)[p.step]  # annealing lowers it
    assert refit.intermediate_points(replace(rec, train=replace(train, schedule="cosine")), law) == []


def test_fit_json_marks_points_and_extend_adds_runs_that_refit_reads(plan_path: Path, capsys):
    from scaleforge.orchestrator.plan import extend

    plan = _all_runs(plan_path)
    assert main(["refit", str(plan_path), "--bootstrap", "30"]) == 0
    fit = json.loads((plan_path.parent / "fit.json").read_text())
    assert {p["kind"] for p in fit["points"]} == {"final"}  # the synthetic runs evaluate only at the end
    assert len(fit["residuals"]) == len(fit["points"]) == fit["n_points"]
    refitted = load_plan(plan_path)
    allowance = extend.default_allowance(refitted)
    capsys.readouterr()
    assert main(["plan", str(plan_path), "--extend", "2"]) == 0
    out = capsys.readouterr().out
    grown = load_plan(plan_path)
    added = grown.ladder[len(plan.ladder):]
    assert len(added) == 2 and all("-extend-" in r.name for r in added)
    assert sum(r.flops for r in added) <= allowance * (1 + 1e-9)
    assert "expected sd" in out
    names = {r.name for r in refit.collect_plan(grown, plan_path)}
    assert {r.name for r in added} <= names  # refit reads them (not submitted yet: excluded, named)
    # the prior cannot be extended
    assert main(["plan", str(plan_path.parent / "nope.yaml"), "--extend", "2"]) == 2
