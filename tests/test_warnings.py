"""No process of scaleforge prints a Python warning: a warning from our own code is fixed where it
is raised, one from a dependency is fixed at our call or listed, with its reason, in
scaleforge/_warnings.py. pytest's summary sees only the test process; the trainer's ranks are
checked here on their stderr (DeprecationWarnings shown: rank_env sets PYTHONWARNINGS=default)."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import rank_env, seed_from_checkpoint, warning_lines
from scaleforge import _warnings
from scaleforge.pretrain.metrics import read_metrics


def test_warning_lines_finds_formatted_warnings():
    text = warnings.formatwarning("x is deprecated", FutureWarning, "/a/b.py", 12)
    ranked = "[rank1]:" + warnings.formatwarning("tp", DeprecationWarning, "/c.py", 3, line="")
    assert warning_lines("info\n" + text + ranked + "step 1/2  loss 6.2\n") == [
        "/a/b.py:12: FutureWarning: x is deprecated", "[rank1]:/c.py:3: DeprecationWarning: tp"]
    assert warning_lines("step 1/4  loss 6.2  (eval: 6.1)\nerror: no store\n") == []


def test_policy_is_well_formed():
    from _pytest.config import parse_warning_filter

    lines = _warnings.pytest_filters()
    assert len(lines) == len(_warnings.IGNORED)
    for item, line in zip(_warnings.IGNORED, lines):
        assert ":" not in item.message + item.module  # pytest's field separator
        assert parse_warning_filter(line, escape=False) == (
            "ignore", item.message, item.category, item.module, item.lineno)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _warnings.install()
        warnings.warn_explicit("`load_state_dict` is deprecated", FutureWarning, "t.py", 9,
                               module="megatron.core.dist_checkpointing.strategies.torch")
        warnings.warn_explicit("Warning: tp_group is None, using default tp group", DeprecationWarning,
                               "layers.py", 836, module="megatron.core.tensor_parallel.layers")
        warnings.warn_explicit("anything else", DeprecationWarning, "x.py", 1, module="scaleforge.x")
    assert [str(w.message) for w in seen] == [
        "Warning: tp_group is None, using default tp group", "anything else"]


def _spec(directory: Path, store: Path) -> Path:
    spec = {
        "name": "warnings",
        "seed": 5,
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128,
                  "vocab_size": 512},
        "data": {"stores": [str(store)], "seq_len": 32},
        "train": {"steps": 4, "global_batch": 4, "micro_batch": 2, "lr": 3e-3, "warmup_steps": 1},
        "eval": {"every": 2, "batches": 1},
        "checkpoint": {"every": 2},
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _train(spec: Path, out: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "scaleforge.cli", "train", str(spec), "--out",
                           str(out), *args], env=rank_env(1), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_training_and_resharded_resume_print_no_warning(tmp_path, tiny_store):
    """One rank trains and saves; two ranks (tp=2) resume from its first checkpoint."""
    spec = _spec(tmp_path, tiny_store)
    one = _train(spec, tmp_path / "one")
    seed_from_checkpoint(tmp_path / "one", tmp_path / "two", 2)
    two = _train(spec, tmp_path / "two", "--nproc", "2", "--set", "parallel.tp=2")
    resumed = [r["step"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert resumed == [3, 4]
    assert warning_lines(one) == [] and warning_lines(two) == [], (one[-3000:], two[-3000:])
