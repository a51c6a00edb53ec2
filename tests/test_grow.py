"""The generic growth path: `orchestrate grow` (the checks, nothing written on a refusal) and the
trainer's step 0 that loads the old run's last weights through the family's rule.

TokenFormer's own growth (more tokens, identical logits) is in tests/test_tokenformer.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaleforge.cli import main
from scaleforge.config import load_runspec
from conftest import rank_env

CLI = [sys.executable, "-m", "scaleforge.cli"]


def _dense_spec(tmp_path: Path, store: Path) -> Path:
    spec = {
        "name": "grow-dense", "seed": 7,
        "model": {"arch": "dense", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
                  "ffn_hidden": 96, "vocab_size": 512, "tied_embeddings": True},
        "data": {"stores": [str(store)], "seq_len": 32},
        "train": {"steps": 2, "global_batch": 4, "micro_batch": 4, "lr": 0.003,
                  "warmup_steps": 1},
        "eval": {"every": 0}, "checkpoint": {"every": 0},
    }
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, tiny_store) -> Path:
    """A 2-step dense run with its final checkpoint."""
    tmp = tmp_path_factory.mktemp("grow_dense")
    out = tmp / "run"
    proc = subprocess.run([*CLI, "train", str(_dense_spec(tmp, tiny_store)), "--out", str(out)],
                          env=rank_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _grow(capsys, *args) -> tuple[int, str]:
    code = main(["grow", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_a_family_without_a_rule_is_refused(dense_run, tmp_path, capsys):
    out = tmp_path / "new"
    code, err = _grow(capsys, dense_run, "--out", out, "--set", "model.hidden=128")
    assert code == 2 and err.count("\n") == 0
    assert "model.arch=dense has no growth rule" in err
    assert not out.exists()


def test_bad_input_is_one_line_and_writes_nothing(dense_run, tmp_path, capsys, monkeypatch):
    from scaleforge.arch.dense.config import DenseConfig

    monkeypatch.setattr(DenseConfig, "grow_from", lambda self, old: self, raising=False)
    out = tmp_path / "new"
    # into another family
    code, err = _grow(capsys, dense_run, "--out", out, "--set", "model.arch=moe")
    assert code == 2 and "into another family" in err and err.count("\n") == 0
    # a directory that is not a run, a run without a complete checkpoint
    code, err = _grow(capsys, tmp_path, "--out", out)
    assert code == 2 and "is not a run directory" in err
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "run.yaml").write_text((dense_run / "run.yaml").read_text())
    code, err = _grow(capsys, empty_run, "--out", out)
    assert code == 2 and "no complete checkpoint" in err
    # NEW_DIR exists and is not empty
    out.mkdir()
    (out / "x").write_text("x")
    code, err = _grow(capsys, dense_run, "--out", out)
    assert code == 2 and "exists and is not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    # init_from is grow's to set
    code, err = _grow(capsys, dense_run, "--out", tmp_path / "other",
                      "--set", "checkpoint.init_from=/x")
    assert code == 2 and "checkpoint.init_from" in err
    assert not (tmp_path / "other").exists()


def test_grown_run_starts_from_the_old_weights(dense_run, tmp_path, capsys, monkeypatch):
    """A family whose rule changes nothing (dense, patched): step 0 holds the old run's last weights
    exactly, the optimizer is fresh, and the new run's spec names the old run."""
    import torch

    from scaleforge.arch.dense.config import DenseConfig
    from scaleforge.parallel.setup import init_distributed, shutdown
    from scaleforge.pretrain import grow, model_build

    monkeypatch.setattr(DenseConfig, "grow_from", lambda self, old: self, raising=False)
    out = tmp_path / "new"
    code = main(["grow", str(dense_run), "--out", str(out), "--set", "train.lr=0.001"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"orchestrate train {out / 'run.yaml'} --out {out}" in printed
    spec = load_runspec(out / "run.yaml")
    assert spec.checkpoint.init_from == str(dense_run.resolve())
    assert spec.train.lr == 0.001

    init_distributed(spec)
    try:
        built = model_build.build(spec)
        fresh = {k: v.clone() for k, v in built.model.state_dict().items() if v is not None}
        loaded = grow.start_from(spec, built)
        old = grow.read_model_tensors(grow.last_checkpoint(dense_run))
        assert loaded and set(loaded) <= set(old)
        changed = 0
        for name, value in built.model.state_dict().items():
            if value is None or name.endswith("_extra_state"):
                continue
            changed += int(not torch.equal(value, fresh[name]))
        assert changed > 0
        # every loaded tensor equals the checkpoint's (one process: the shard is the whole tensor)
        for leaf in grow.sharded_tensors(built.model.sharded_state_dict()):
            assert torch.equal(leaf.data, grow._local_piece(old[leaf.key], leaf)), leaf.key
        assert not any(built.optimizer.optimizer.state.values())  # fresh Adam state
    finally:
        shutdown()
