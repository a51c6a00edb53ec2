"""Each law against published numbers (methods reference) or recovery of known parameters."""

from __future__ import annotations

import numpy as np
import pytest

from scaleforge.errors import FitError
from scaleforge.orchestrator.fit import fitter as F
from scaleforge.orchestrator.fit import laws
from scaleforge.orchestrator.fit.laws import annealing, chinchilla, isoflop, overtrain, parscale

STACK = {"E": 0.6912, "A": 0.0113, "alpha": 0.1894, "k": 0.3935}
PILE = {"E": 1.2888, "A": 0.1974, "alpha": 0.1963, "k": 0.3345}


def gradient_check(law: F.Law, data: dict, theta: np.ndarray) -> None:
    x, y = F._design(law, data)
    objective = F._objective(law, x, y, None, 1e-3)
    f, g, h, _ = objective(theta[None], np.arange(1))
    for k in range(theta.size):
        step = np.zeros(theta.size)
        step[k] = 1e-7 * max(1.0, abs(theta[k]))
        fp = objective((theta + step)[None], np.arange(1))[0]
        fm = objective((theta - step)[None], np.arange(1))[0]
        assert (fp - fm)[0] / (2 * step[k]) == pytest.approx(g[0, k], rel=1e-4, abs=1e-10)


# ParScale -----------------------------------------------------------------------------------


def test_parscale_published_multipliers_and_points():
    np.testing.assert_allclose(parscale.multiplier(STACK, [1, 2, 4, 8]), [1, 1.2728, 1.5455, 1.8183], atol=1e-4)
    np.testing.assert_allclose(parscale.multiplier(PILE, [1, 2, 4, 8]), [1, 1.2319, 1.4637, 1.6956], atol=1e-4)
    assert float(parscale.loss(STACK, 535.8e6, 1)) == pytest.approx(1.1727, abs=1e-4)
    assert float(parscale.loss(PILE, 4.4145e9, 8)) == pytest.approx(1.7787, abs=1e-4)


def test_parscale_grid_is_the_published_300_starts():
    assert parscale.LAW.starts.shape == (300, 4)


def test_parscale_recovers_pile_parameters():
    # The published design: 6 sizes (535.8M..4.35B) x P in {1, 2, 4, 8}.
    rng = np.random.default_rng(3)
    n = np.repeat(np.geomspace(535.8e6, 4.35e9, 6), 4)
    p = np.tile([1, 2, 4, 8], 6)
    loss = parscale.loss(PILE, n, p) * np.exp(rng.normal(0, 5e-5, n.size))
    res = F.fit(parscale.LAW, {"N": n, "P": p, "L": loss})
    assert res.params["k"] == pytest.approx(PILE["k"], rel=0.02)
    assert res.params["alpha"] == pytest.approx(PILE["alpha"], rel=0.03)
    assert res.params["E"] == pytest.approx(PILE["E"], rel=0.01)
    assert res.r2 > 0.999
    gradient_check(parscale.LAW, {"N": n, "P": p, "L": loss}, np.array([1.2, 0.3, 0.25, 0.4]))


# Over-training ------------------------------------------------------------------------------


def test_overtrain_equals_chinchilla_with_one_exponent():
    params = {"alpha": 300.0, "beta": 900.0, "b": -0.25, "E": 1.9}
    n, m = np.array([1e8, 1e9, 7e9]), np.array([20.0, 80.0, 640.0])
    ch = overtrain.to_chinchilla(params)
    np.testing.assert_allclose(overtrain.loss(params, n, m), chinchilla.loss(ch, n, m * n), rtol=1e-12)
    assert ch["alpha"] == ch["beta"] == 0.25


def test_overtrain_recovers_known_parameters():
    truth = {"alpha": 300.0, "beta": 900.0, "b": -0.25, "E": 1.9}
    rng = np.random.default_rng(4)
    n = np.repeat(np.geomspace(1.1e7, 6.9e9, 8), 5)
    m = np.tile([5.0, 10.0, 20.0, 80.0, 320.0], 8)
    loss = overtrain.loss(truth, n, m) * np.exp(rng.normal(0, 1e-4, n.size))
    res = F.fit(overtrain.LAW, {"N": n, "M": m, "L": loss})
    assert res.params["b"] == pytest.approx(-0.25, rel=0.02)
    assert res.params["E"] == pytest.approx(1.9, rel=0.01)
    assert res.params["alpha"] == pytest.approx(300.0, rel=0.1)
    assert res.params["beta"] == pytest.approx(900.0, rel=0.1)
    # Extrapolate to an over-trained point (M = 640) far outside the fitted N.
    assert float(overtrain.loss(res.params, 1.4e9, 640)) == pytest.approx(float(overtrain.loss(truth, 1.4e9, 640)), rel=2e-3)
    gradient_check(overtrain.LAW, {"N": n, "M": m, "L": loss}, np.array([5.0, 6.5, -0.2, 1.5]))


# Annealing ----------------------------------------------------------------------------------


def wsd(steps: int, peak: float, decay: float, warmup: int) -> np.ndarray:
    lr = np.full(steps, peak)
    lr[:warmup] = peak * np.arange(1, warmup + 1) / warmup
    k = int(steps * decay)
    lr[steps - k :] = peak * np.linspace(1, 0, k + 1)[1:]
    return lr


def cosine(steps: int, peak: float, warmup: int) -> np.ndarray:
    lr = peak * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps))
    lr[:warmup] = peak * np.arange(1, warmup + 1) / warmup
    return lr


def test_annealing_areas_match_the_definition():
    lrs = np.array([0.5, 1.0, 1.0, 0.8, 0.5, 0.1])
    s1, s2 = annealing.areas(lrs, warmup=2, decay=0.9)
    # Warmup counts as the peak (1.0): eta = 1, 1, 1, 0.8, 0.5, 0.1.
    eta = [1.0, 1.0, 1.0, 0.8, 0.5, 0.1]
    m, acc, s2_ref = [], 0.0, []
    for i in range(6):
        acc = 0.9 * acc + (eta[i - 1] - eta[i] if i else 0.0)
        m.append(acc)
    s2_ref = np.cumsum(m)
    np.testing.assert_allclose(s1, np.cumsum(eta)[2:])
    np.testing.assert_allclose(s2, s2_ref[2:])
    assert s2[-1] == pytest.approx(0.2 + (0.9 * 0.2 + 0.3) + (0.9 * (0.9 * 0.2 + 0.3) + 0.4))


def test_annealing_recovers_known_parameters_from_two_schedules():
    truth = {"L0": 2.0, "A": 0.8, "alpha": 0.45, "C": 1.5}
    s1s, s2s = [], []
    for lr in (wsd(4000, 3e-4, 0.2, 100), cosine(4000, 3e-4, 100)):
        s1, s2 = annealing.areas(lr, warmup=100)
        s1s.append(s1[::40])
        s2s.append(s2[::40])
    s1, s2 = np.concatenate(s1s), np.concatenate(s2s)
    rng = np.random.default_rng(5)
    loss = annealing.loss(truth, s1, s2) * np.exp(rng.normal(0, 2e-4, s1.size))
    res = F.fit(annealing.LAW, {"S1": s1, "S2": s2, "L": loss})
    for k, v in truth.items():
        assert res.params[k] == pytest.approx(v, rel=0.03), k
    # The annealing term is what separates the two schedules' final losses.
    lr = wsd(4000, 3e-4, 0.2, 100)
    s1, s2 = annealing.areas(lr, warmup=100)
    assert float(annealing.loss(res.params, s1[-1], s2[-1])) == pytest.approx(float(annealing.loss(truth, s1[-1], s2[-1])), rel=1e-3)
    gradient_check(annealing.LAW, {"S1": s1[::100], "S2": s2[::100], "L": annealing.loss(truth, s1[::100], s2[::100])}, np.array([1.8, 0.9, 0.4, 1.0]))


# IsoFLOP (Approach 2) -------------------------------------------------------------------------


def isoflop_points(truth: dict, budgets, shift: float = 0.0, sizes: int = 9):
    ns, cs, ls = [], [], []
    for c in budgets:
        n0, _ = chinchilla.compute_optimal(truth, c)
        grid = float(n0) * np.exp(np.linspace(-1.2, 1.2, sizes) + shift)
        ns.append(grid)
        cs.append(np.full(sizes, c))
        ls.append(chinchilla.loss(truth, grid, c / (6 * grid)))
    return {"N": np.concatenate(ns), "C": np.concatenate(cs), "L": np.concatenate(ls)}


def test_isoflop_power_law_matches_approach_3_allocation():
    truth = {"A": 482.01, "B": 2085.43, "E": 1.8169, "alpha": 0.3478, "beta": 0.3658}
    budgets = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20]
    res = isoflop.fit(isoflop_points(truth, budgets))
    assert len(res.profiles) == 6 and not res.warnings
    # a = beta / (alpha + beta) = 0.513 (methods 8.1).
    assert res.a == pytest.approx(0.3658 / (0.3478 + 0.3658), abs=0.005)
    n_true, d_true = chinchilla.compute_optimal(truth, 1e21)
    assert float(res.n_opt(1e21)) == pytest.approx(float(n_true), rel=0.03)
    assert float(res.d_opt(1e21)) == pytest.approx(float(d_true), rel=0.03)
    lo, hi = res.n_opt_band(np.array([1e18, 1e21]))
    assert np.all(lo < res.n_opt([1e18, 1e21])) and np.all(res.n_opt([1e18, 1e21]) < hi)


def test_isoflop_warns_when_a_minimum_is_at_the_grid_edge():
    truth = {"A": 482.01, "B": 2085.43, "E": 1.8169, "alpha": 0.3478, "beta": 0.3658}
    pts = isoflop_points(truth, [1e18, 1e19, 1e20])
    # Shift the last budget's sizes so that its optimum is below the smallest model.
    edge = isoflop_points(truth, [1e21], shift=1.6)
    pts = {k: np.concatenate([pts[k], edge[k]]) for k in pts}
    res = isoflop.fit(pts)
    assert len(res.warnings) == 1 and "1e+21" in res.warnings[0] and "edge" in res.warnings[0]
    assert [p.at_edge for p in res.profiles] == [False, False, False, True]


def test_isoflop_needs_two_budgets():
    truth = {"A": 482.01, "B": 2085.43, "E": 1.8169, "alpha": 0.3478, "beta": 0.3658}
    with pytest.raises(FitError, match="at least 2 budgets"):
        isoflop.fit(isoflop_points(truth, [1e19]))


def test_registry_and_unknown_law():
    assert set(laws.NAMES) == {"chinchilla", "parscale", "overtrain", "annealing", "isoflop"}
    with pytest.raises(FitError, match="unknown law 'kaplan'"):
        laws.get("kaplan")
