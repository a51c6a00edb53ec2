"""No process of scaleforge prints a Python warning: a warning from our own code is fixed where it
is raised, one from a dependency is fixed at our call or listed, with its reason, in
scaleforge/_warnings.py. pytest's summary sees only the test process; the trainer's ranks are
checked here on their stderr (DeprecationWarnings shown: rank_env sets PYTHONWARNINGS=default)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from conftest import seed_from_checkpoint, train_records, warning_lines
from scaleforge import _warnings


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


@pytest.mark.slow
@pytest.mark.distributed
def test_training_and_resharded_resume_print_no_warning(tmp_path, tiny_store):
    """One rank trains and saves; two ranks (tp=2) resume from its first checkpoint."""
    spec = _spec(tmp_path, tiny_store)
    train_records(spec, tmp_path / "one", 1, [])  # it asserts that stderr holds no warning line
    seed_from_checkpoint(tmp_path / "one", tmp_path / "two", 2)
    resumed = train_records(spec, tmp_path / "two", 2, ["parallel.tp=2"])
    assert [r["step"] for r in resumed] == [3, 4]
