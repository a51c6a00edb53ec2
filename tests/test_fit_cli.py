"""`orchestrate fit` end to end in a subprocess, and the orchestrator's torch-free import."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from scaleforge.orchestrator.fit.laws import chinchilla, parscale

TRUTH = {"A": 482.01, "B": 2085.43, "E": 1.8169, "alpha": 0.3478, "beta": 0.3658}


def orchestrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaleforge.cli", *args], capture_output=True, text=True, timeout=300)


def write_csv(path: Path, header: list[str], rows) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def runs_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), 40))
    flops = np.exp(rng.uniform(np.log(6e18), np.log(3e21), 40))
    loss = chinchilla.loss(TRUTH, n, flops / (6 * n)) * np.exp(rng.normal(0, 2e-4, 40))
    # Two wild rows (e.g. diverged runs) that --drop-highest removes.
    rows = [(f"{a:.6e}", f"{c:.6e}", f"{l:.6f}") for a, c, l in zip(n, flops, loss)] + [("1e8", "1e19", "9.5"), ("2e8", "2e19", "8.0")]
    return write_csv(tmp_path / "runs.csv", ["Model Size", "Training FLOP", "final loss"], rows)


def test_fit_json_and_predict(runs_csv: Path, tmp_path: Path):
    other = write_csv(tmp_path / "other.csv", ["Model Size", "Training FLOP"], [("7e10", "5.88e23"), ("1e9", "1e20"), ("3e8", "1e19")])
    proc = orchestrate(
        "fit", str(runs_csv), "--law", "chinchilla", "--map", "N=Model Size", "--map", "C=Training FLOP",
        "--map", "L=final loss", "--drop-highest", "2", "--predict", str(other), "--json", "--bootstrap", "50",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["law"] == "chinchilla" and out["n_points"] == 40
    assert set(out["params"]) == {"A", "B", "E", "alpha", "beta"}
    assert out["params"]["alpha"] == pytest.approx(TRUTH["alpha"], rel=0.05)
    assert out["params"]["E"] == pytest.approx(TRUTH["E"], rel=0.01)
    assert out["objective"] > 0 and out["r2"] > 0.999
    assert set(out["ci"]) == set(out["params"])
    for name, (lo, hi) in out["ci"].items():
        assert lo <= out["params"][name] * 1.0001 and hi >= out["params"][name] * 0.9999, name
    # Predictions in OTHER.csv's row order: 70B at 5.88e23 (1.4T tokens) first.
    expect = chinchilla.loss(TRUTH, np.array([7e10, 1e9, 3e8]), np.array([5.88e23 / 4.2e11, 1e20 / 6e9, 1e19 / 1.8e9]))
    np.testing.assert_allclose(out["predictions"], expect, rtol=3e-3)
    assert out["predictions"][0] < out["predictions"][1] < out["predictions"][2]


def test_fit_table_output(tmp_path: Path):
    n = np.repeat(np.geomspace(535.8e6, 4.35e9, 6), 4)
    p = np.tile([1, 2, 4, 8], 6)
    pile = {"E": 1.2888, "A": 0.1974, "alpha": 0.1963, "k": 0.3345}
    data = write_csv(tmp_path / "ps.csv", ["N", "P", "loss"], zip(n, p, parscale.loss(pile, n, p)))
    proc = orchestrate("fit", str(data), "--law", "parscale")
    assert proc.returncode == 0, proc.stderr
    assert "parscale fit: 24 points" in proc.stdout and "0.3345" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--law", "kaplan"], "unknown law 'kaplan'"),
        (["--law", "chinchilla"], "law needs N, D or C"),
        (["--law", "chinchilla", "--map", "N=Params", "--map", "C=Training FLOP"], "no column 'Params'"),
        (["--law", "chinchilla", "--map", "N=Model Size", "--map", "C=Training FLOP", "--map", "L=final loss", "--drop-highest", "38"], "at least 6 points"),
    ],
)
def test_bad_input_is_one_line_exit_2(runs_csv: Path, args: list[str], message: str):
    proc = orchestrate("fit", str(runs_csv), *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr
    assert proc.stdout == ""


def test_orchestrator_imports_without_torch():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked")
        sys.meta_path.insert(0, Block())
        import scaleforge.orchestrator as pkg
        names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        assert "torch" not in sys.modules
        print(len(names))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 8
