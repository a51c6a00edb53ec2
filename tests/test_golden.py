"""The dense example reproduces its golden losses: bit for bit on the machine that made them, within the
measured cross-machine noise anywhere else.

tests/golden/dense-tiny.json holds every per-step training loss and the final evaluation loss of the
single-process, TP=2 and PP=2 runs of examples/dense-tiny.yaml (20 steps; tests/golden/make_golden.py)
and the fingerprint of the machine and software that made them (CPU model and flags, torch build,
CPU capability, kernel-selecting environment, threads, dependency versions).

- Same fingerprint: the losses must be equal (==). Nothing but the code can change them.
- Other fingerprint: other kernels round differently in the last bits of float32, and training
  amplifies that. The losses must lie within TOLERANCE below, derived from the noise measured by
  tests/golden/noise.py (numbers below). A numerics-neutral change is proved bit for bit on one
  machine by `make golden-compare BASE=<commit>` (tests/golden/compare.py), not by this test.

Measured (AMD EPYC, AVX-512, torch 2.13.0+cpu, megatron-core 0.16.1; `python tests/golden/noise.py
--old <the golden file made on another machine>`), largest relative deviation |x - x0| / |x0| from this
machine's default run over the three runs:

    source                             steps 1-12   steps 13-20 and final eval
    golden file made on another CPU    4.0e-7       3.4e-5
    ATEN_CPU_CAPABILITY=avx2           1.7e-7       6.7e-6
    ATEN_CPU_CAPABILITY=default        1.7e-7       1.0e-5
    MKL_CBWR=COMPATIBLE                4.1e-7       2.6e-5
    MKL_CBWR=AVX2                      0            0
    OMP_NUM_THREADS=2 (single)         0            0

Through step 12 the runs differ by a few float32 ulps (float32's is 1.2e-7) and the gap does not grow;
at step 13 the trajectory amplifies it about a hundredfold, and it stays there (1e-7 .. 3.4e-5) to step
20. Steps 1 and 2 are equal everywhere. The tolerance is the largest of each stretch times about ten
(a machine whose kernels round differently still differs by ulps, and the amplification is the
trajectory's, the same everywhere): 4e-6 through step 12, 4e-4 after.

A real change exceeds it: init std +1% moves steps 1-12 by 5.5e-5 .. 2.6e-4 (14x .. 65x the bound)
and steps 13-20 by 1.5e-3 .. 8.4e-3; learning rate +1% moves steps 2-12 by 9.8e-5 .. 3.0e-3 (25x and
more) and steps 13-20 by 6.2e-4 .. 7.1e-3. Even +0.1% is caught in the quiet steps: init std moves 10
of steps 1-12 by 5.4e-6 .. 1.5e-4, learning rate every one of steps 2-12 by 1.1e-5 .. 3.2e-4 (single
run). Regenerating the file for a change of numerics may move the step where the amplification
begins: run noise.py again then.
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

QUIET_STEPS = 12  # the steps before the trajectory amplifies rounding differences (measured above)
TOLERANCE = (4e-6, 4e-4)  # relative, through QUIET_STEPS and after (the final evaluation: after)


def tolerances(n_losses: int) -> list[float]:
    """Relative tolerance of each value of `loss + eval_loss` (steps 1..n_losses, then the eval)."""
    return [TOLERANCE[0] if step <= QUIET_STEPS else TOLERANCE[1] for step in range(1, n_losses + 1)] \
        + [TOLERANCE[1]]


def outside_tolerance(got: dict, want: dict) -> list[str]:
    """One line per value of `got` further from `want` than its tolerance allows."""
    assert len(got["loss"]) == len(want["loss"]) and len(got["eval_loss"]) == len(want["eval_loss"])
    labels = [f"step {i + 1}" for i in range(len(want["loss"]))] + ["final eval"]
    pairs = zip(labels, got["loss"] + got["eval_loss"], want["loss"] + want["eval_loss"],
                tolerances(len(want["loss"])))
    return [f"{label}: {g!r} vs golden {w!r} (relative {abs(g - w) / abs(w):.1e} > {tol:.0e})"
            for label, g, w, tol in pairs if not abs(g - w) <= tol * abs(w)]


def test_fingerprint_is_recorded_and_complete():
    recorded = GOLDEN["fingerprint"]
    assert set(recorded) == set(make_golden.fingerprint()), "regenerate the golden file"
    assert recorded["cpu_capability"] and recorded["torch"] and recorded["threads"] == make_golden.THREADS


@pytest.mark.parametrize("name", sorted(make_golden.RUNS))
def test_dense_losses_equal_golden(name, tmp_path):
    nproc, overrides = make_golden.RUNS[name]
    got = make_golden.train(tmp_path / name, nproc, overrides)
    want = {k: GOLDEN[name][k] for k in ("loss", "eval_loss")}
    here, recorded = make_golden.fingerprint(), GOLDEN["fingerprint"]
    if here == recorded:
        assert got == want, f"{name}: losses differ from the golden file made on this machine and software"
    else:
        changed = sorted(k for k in recorded if here.get(k) != recorded[k])
        bad = outside_tolerance(got, want)
        assert not bad, (f"{name}: beyond the cross-machine noise (fingerprint differs in {changed}):\n"
                         + "\n".join(bad))
