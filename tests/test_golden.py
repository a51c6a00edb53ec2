"""Numerics-neutral refactorings prove it: the dense example's losses equal the golden file bit for bit.

tests/golden/dense-tiny.json was made by tests/golden/make_golden.py before the dense GPT moved onto
the family contract (arch/<family>/ config + builder); every per-step loss and the final evaluation
loss of the single-process, TP=2 and PP=2 runs must be reproduced exactly (==, not a tolerance).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

GOLDEN_DIR = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)
GOLDEN = json.loads(make_golden.GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(make_golden.RUNS))
def test_dense_losses_equal_golden(name, tmp_path):
    nproc, overrides = make_golden.RUNS[name]
    got = make_golden.train(tmp_path / name, nproc, overrides)
    assert got == GOLDEN[name], f"{name}: losses differ from the golden file"
