"""The loop's forecast and what keeps a run honest: rungs chosen to shrink the target's interval
(against one more IsoFLOP budget of the same compute, on data from a known law), precision bound
into the run id, and a resume refused when its data store was rebuilt under the same path."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import rank_env
from scaleforge.config import check_device, resolve_precision, run_id, same_run
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan import extend
from scaleforge.orchestrator.fit import fitter
from scaleforge.orchestrator.fit.laws import chinchilla

# ----------------------------------------------------------------------------------------------
# --extend on synthetic data

TRUE = {"A": 400.0, "B": 400.0, "E": 1.5, "alpha": 0.3, "beta": 0.3}
"""alpha = beta, A = B: N_opt = D_opt = sqrt(C / 6)."""
NOISE = 0.01
"""Log-loss noise of one run (about the seed spread of the CPU ladder's final losses)."""
TARGET_C = 1e13
LADDER = (1e10, 3e10, 1e11)


def _law(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def _isoflop(budgets, sizes=5, span=3.0):
    out = []
    for c in budgets:
        for u in np.linspace(-1, 1, sizes):
            n = np.sqrt(c / 6) * span**u
            out.append((n, c / (6 * n), c))
    return out


def _observe(points, rng):
    n, d = (np.array([p[i] for p in points]) for i in (0, 1))
    return n, d, _law(n, d) * np.exp(rng.normal(0.0, NOISE, n.size))


def _fit(n, d, loss, seed):
    res = fitter.fit(chinchilla.LAW, {"N": n, "D": d, "L": loss}, fitter.FitOptions(bootstrap=200, seed=seed))
    return res, [chinchilla.published(t) for t in res.samples]


def _width(samples, n_t, d_t):
    f = extend.log_losses(samples, np.array([n_t]), np.array([d_t]))[:, 0]
    return float(np.percentile(f, 97.5) - np.percentile(f, 2.5))


@pytest.mark.slow
def test_extend_shrinks_the_interval_more_than_one_more_isoflop_budget():
    """8 noisy ladders of a known law: the 2 rungs --extend picks within the compute of one more
    IsoFLOP budget (5 sizes, one ladder step up) leave a narrower 95% interval of the target's
    log-loss, on average, than that budget does."""
    n_t = d_t = np.sqrt(TARGET_C / 6)
    more = _isoflop([LADDER[-1] * np.sqrt(10)])
    allowance = sum(p[2] for p in more)
    widths = {"extend": [], "isoflop": []}
    for rep in range(8):
        n, d, loss = _observe(_isoflop(LADDER), np.random.default_rng(rep))
        res, samples = _fit(n, d, loss, rep)
        cands = []
        for c in extend.candidate_budgets(LADDER[0], allowance):
            from scaleforge.orchestrator.plan.prior import compute_optimal

            n_opt, _ = compute_optimal(res.params, c)
            cands += [(n_opt * 3**u, c / (6 * n_opt * 3**u), c) for u in np.linspace(-1, 1, 7)]
        choice = extend.choose(samples, (n_t, d_t), cands, k=2, allowance=allowance,
                               sigma=float(np.sqrt(np.mean(res.residuals**2))))
        assert len(choice.picks) == 2 and choice.cost <= allowance * (1 + 1e-9)
        assert choice.variance_after[-1] < choice.variance_before
        for name, extra in (("extend", [cands[j] for j in choice.picks]), ("isoflop", more)):
            n2, d2, l2 = _observe(extra, np.random.default_rng(100 + rep))
            _res, s2 = _fit(np.r_[n, n2], np.r_[d, d2], np.r_[loss, l2], rep)
            widths[name].append(_width(s2, n_t, d_t))
    mean = {k: float(np.mean(v)) for k, v in widths.items()}
    print("mean 95% width of the target log-loss:", mean)
    assert mean["extend"] < mean["isoflop"], mean


def test_conditional_variance_matches_the_closed_form():
    """One linear observation g = f + e of a Gaussian f: Var[f | g] = v s^2 / (v + s^2)."""
    rng = np.random.default_rng(0)
    f = rng.normal(0.0, 0.2, 20000)
    got = extend.conditional_variance(f, f[:, None], 0.1)
    v = f.var(ddof=1)
    assert got == pytest.approx(v * 0.01 / (v + 0.01), rel=1e-9)
    # weight 0 (missing from a resample): no information
    assert extend.conditional_variance(f, f[:, None], 0.1, np.zeros((1, 1))) == pytest.approx(v)


# ----------------------------------------------------------------------------------------------
# precision and the device kind


def test_plan_resolves_precision_from_the_cluster_kind_so_run_ids_differ():
    from scaleforge.orchestrator.plan.cluster import DEFAULT_CLUSTER, cpu_cluster
    from scaleforge.orchestrator.plan.plan import base_spec, for_cluster

    base = base_spec("dense", ("model.vocab_size=512",))
    assert base.train.precision == "auto"
    cpu, gpu = for_cluster(base, cpu_cluster(1)), for_cluster(base, DEFAULT_CLUSTER)
    assert (cpu.train.precision, cpu.train.device) == ("fp32", "cpu")
    assert (gpu.train.precision, gpu.train.device) == ("bf16", "gpu")
    assert run_id(cpu) != run_id(gpu)
    # the trainer resolves a remaining auto the same way, and knows it is the same run
    assert run_id(resolve_precision(base, "cpu")) != run_id(resolve_precision(base, "gpu"))
    assert same_run(resolve_precision(base, "cpu"), base) and not same_run(gpu, base)
    with pytest.raises(ConfigError, match="train.device is gpu .* this machine is cpu"):
        check_device(gpu, "cpu")
    check_device(base, "cpu")  # `any`


def test_a_run_planned_for_gpus_is_refused_here(tmp_path, capsys):
    from scaleforge.cli import main
    from scaleforge.config import spec_to_yaml
    from scaleforge.orchestrator.plan.cluster import DEFAULT_CLUSTER
    from scaleforge.orchestrator.plan.plan import base_spec, for_cluster

    spec = for_cluster(base_spec("dense", ("model.vocab_size=512",)), DEFAULT_CLUSTER)
    path = tmp_path / "run.yaml"
    path.write_text(spec_to_yaml(spec))
    out = tmp_path / "out"
    assert main(["train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.device is gpu" in err[0]
    assert not out.exists()


@pytest.mark.gpu
def test_on_a_gpu_auto_trains_bf16_and_a_cpu_plan_is_refused(tmp_path, tiny_store):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the trainer resolves precision on the device it runs on")
    from scaleforge.config import spec_to_yaml
    from scaleforge.orchestrator.plan.cluster import cpu_cluster
    from scaleforge.orchestrator.plan.plan import base_spec, for_cluster
    from scaleforge.pretrain.cli import resolve

    base = base_spec("dense", ("model.vocab_size=512", f"data.stores=[{tiny_store}]"))
    path = tmp_path / "auto.yaml"
    path.write_text(spec_to_yaml(base))
    spec, _ = resolve(str(path), [], 1)
    assert spec.train.precision == "bf16" and run_id(spec) == run_id(resolve_precision(base, "gpu"))
    path.write_text(spec_to_yaml(for_cluster(base, cpu_cluster(1))))
    with pytest.raises(ConfigError, match="train.device is cpu .* this machine is gpu"):
        resolve(str(path), [], 1)


# ----------------------------------------------------------------------------------------------
# a store rebuilt under the same path


def _build_store(path: Path, docs: int) -> None:
    from scaleforge.data_pipeline import corpus
    from scaleforge.data_pipeline.ingest import ingest
    from scaleforge.data_pipeline.store import SplitConfig, open_store

    texts = [t for _k, t in corpus.bundled_sources()[0].documents() if t.strip()][:docs]
    root = path.parent / f"docs{docs}"
    root.mkdir()
    for i, text in enumerate(texts):
        (root / f"doc{i:02d}.txt").write_text(text)
    tokenizer = open_store(_build_store.tokenizer_store).tokenizer()
    ingest(path, corpus.path_sources([root]), tokenizer,
           split=SplitConfig(validation_fraction=0.1, min_validation_docs=2), log=lambda _m: None)


@pytest.mark.slow
def test_resume_on_a_rebuilt_store_is_refused_before_anything_is_written(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    spec = {
        "name": "rebuilt", "seed": 3,
        "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 2, "ffn_hidden": 64,
                  "vocab_size": 512},
        "data": {"stores": [str(store)], "seq_len": 32},
        "train": {"steps": 4, "global_batch": 4, "micro_batch": 4, "warmup_steps": 1},
        "eval": {"every": 0}, "checkpoint": {"every": 2, "keep": 3},
    }
    spec_path = tmp_path / "run.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scaleforge.cli", "train", str(spec_path), "--out", str(out)]
    done = subprocess.run(cmd, env=rank_env(2), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from scaleforge import rundir

    # rewind to step 2 (an interrupted run), then rebuild the store under its path
    rundir.write_atomic(rundir.latest_path(out), rundir.step_dir_name(2) + "\n")
    shutil.rmtree(store)
    _build_store.tokenizer_store = tiny_store
    _build_store(store, docs=12)

    def digest():
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    before = digest()
    again = subprocess.run(cmd, env=rank_env(2), capture_output=True, text=True, timeout=300)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode != 0 and errors, again.stderr[-2000:]
    assert str(store) in errors[0] and "content changed" in errors[0], errors[0]
    assert "Traceback" not in again.stderr
    assert digest() == before  # not even status.json
    assert yaml.safe_load((out / "run.yaml").read_text())["data"]["stores"] == [str(store)]

