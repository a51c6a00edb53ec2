"""`orchestrate refit`'s plots (matplotlib, Agg backend: no display needed) and its terminal summary.

- isoflop.png: final loss against N per budget, each IsoFLOP parabola and its minimum, and the
  Approach-3 law's curve L(N, C / 6N) at the same budgets;
- optimal.png: N_opt(C) and D_opt(C) from Approach 3 with the bootstrap 95% band, Approach 2's
  per-budget minima and power law with its band, and the target budget marked;
- residuals.png: Approach-3 log-loss residuals against N and against C.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from scaleforge.orchestrator.fit.laws import chinchilla


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def write_plots(refit, out_dir: str | Path, *, target_budget: float | None = None) -> list[Path]:
    """Write the three PNGs into `out_dir` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = [
        _isoflop_plot(plt, refit, out / "isoflop.png"),
        _optimal_plot(plt, refit, out / "optimal.png", target_budget),
        _residual_plot(plt, refit, out / "residuals.png"),
    ]
    return paths


def _kept(refit):
    return [r for r in refit.records if not r.excluded]


def _isoflop_plot(plt, refit, path: Path) -> Path:
    kept = _kept(refit)
    params = refit.chinchilla.params
    fig, ax = plt.subplots(figsize=(7, 5))
    budgets = sorted({r.budget for r in kept})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(budgets), 1)))
    for color, budget in zip(colors, budgets):
        rs = [r for r in kept if r.budget == budget]
        ax.scatter([r.N for r in rs], [r.L for r in rs], color=color, s=18, label=f"C={budget:.2g}")
        lo, hi = min(r.N for r in rs) / 1.5, max(r.N for r in rs) * 1.5
        grid = np.geomspace(lo, hi, 100)
        # Runs spend more than 6ND (attention, embeddings): follow their own FLOPs per 6ND.
        k = float(np.mean([r.C / (6 * r.N * r.D) for r in rs]))
        ax.plot(grid, chinchilla.loss(params, grid, budget / (6 * k * grid)), color=color, lw=0.8, ls=":")
    if refit.isoflop is not None:
        for prof in refit.isoflop.profiles:
            grid = np.geomspace(prof.n_range[0] / 1.2, prof.n_range[1] * 1.2, 100)
            ax.plot(grid, prof.loss(grid), color="k", lw=0.8)
            ax.plot([prof.n_opt], [prof.loss_opt], marker="x", color="red" if prof.at_edge else "k")
    excluded = [r for r in refit.records if r.excluded and np.isfinite(r.L)]
    if excluded:
        ax.scatter([r.N for r in excluded], [r.L for r in excluded], marker="x", color="grey", label="excluded")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP profiles (solid: parabola, dotted: Approach 3)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _optimal_plot(plt, refit, path: Path, target_budget: float | None) -> Path:
    kept = _kept(refit)
    lo_c = min(r.budget for r in kept) / 3
    hi_c = max(target_budget or 0, max(r.budget for r in kept)) * 3
    cs = np.geomspace(lo_c, hi_c, 60)
    a3 = refit.chinchilla
    n_opt, d_opt = chinchilla.compute_optimal(a3.params, cs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, centre, which in ((axes[0], n_opt, 0), (axes[1], d_opt, 1)):
        ax.plot(cs, centre, color="C0", label="Approach 3")
        if a3.samples.size:
            sims = np.array([chinchilla.compute_optimal(chinchilla.published(t), cs)[which] for t in a3.samples])
            # a bootstrap fit whose optimum runs away gives inf; the nearest-rank percentiles keep
            # inf as inf (interpolating between two infs is inf - inf), and an unbounded side of the
            # band is left undrawn
            lo = np.percentile(sims, 2.5, axis=0, method="lower")
            hi = np.percentile(sims, 97.5, axis=0, method="higher")
            ax.fill_between(cs, np.where(np.isfinite(lo), lo, np.nan), np.where(np.isfinite(hi), hi, np.nan),
                            color="C0", alpha=0.2, label="95% bootstrap")
        if refit.isoflop is not None:
            iso = refit.isoflop
            fn = iso.n_opt if which == 0 else iso.d_opt
            ax.plot(cs, fn(cs), color="C1", label=f"Approach 2 (a={iso.a:.3f})")
            if iso.dof > 0:
                band_lo, band_hi = iso.n_opt_band(cs)
                if which == 1:
                    band_lo, band_hi = cs / (6 * band_hi), cs / (6 * band_lo)
                ax.fill_between(cs, band_lo, band_hi, color="C1", alpha=0.15)
            pts = np.array([p.n_opt for p in iso.profiles])
            bs = np.array([p.budget for p in iso.profiles])
            ax.scatter(bs, pts if which == 0 else bs / (6 * pts), color="C1", s=20, zorder=3)
        if target_budget:
            ax.axvline(target_budget, color="grey", ls="--", lw=0.8, label="target budget")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel("N_opt (parameters)" if which == 0 else "D_opt (tokens)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _residual_plot(plt, refit, path: Path) -> Path:
    pts = refit.points
    res = np.asarray(refit.chinchilla.residuals)
    final = np.array([q.kind == "final" for q in pts], dtype=bool)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # compute of a point: 6 N D is enough to place it on the axis
    for ax, xs, label in ((axes[0], np.array([q.N for q in pts]), "parameters N"),
                          (axes[1], np.array([6.0 * q.N * q.D for q in pts]), "compute 6ND (FLOPs)")):
        ax.scatter(xs[final], res[final], s=14, label="final losses")
        if (~final).any():
            ax.scatter(xs[~final], res[~final], s=8, marker="x", label="intermediate evaluations")
            ax.legend(fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("ln L_pred - ln L")
    fig.suptitle(f"Approach 3 residuals (R^2 {refit.chinchilla.r2:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_summary(refit, fit_path: Path, plots: list[Path], new_plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    a3 = refit.chinchilla
    runs = len({q.run for q in refit.points}) or a3.n_points
    extra = a3.n_points - runs
    table = Table(title=f"Approach 3 on {runs} runs{f' + {extra} intermediate points' if extra else ''} "
                  f"(objective {a3.objective:.4g}, R^2 {a3.r2:.4f})")
    for col in ("parameter", "value", "95% interval"):
        table.add_column(col, justify="right" if col != "parameter" else "left")
    for name, value in a3.params.items():
        ci = a3.ci.get(name)
        table.add_row(name, f"{value:.5g}", f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
    console.print(table)
    if refit.isoflop is not None:
        iso = refit.isoflop
        console.print(f"Approach 2: N_opt = {iso.k:.4g} C^{iso.a:.4f} (95% a in [{iso.ci['a'][0]:.3f}, {iso.ci['a'][1]:.3f}]) over {len(iso.profiles)} budgets", markup=False)
    if refit.holdout is not None:
        h = refit.holdout
        console.print(
            f"held out budget {h['budget']:.3g} ({len(h['runs'])} runs): fit on the smaller budgets predicts "
            f"their loss to {100 * h['mean_abs_rel_error']:.2f}% (mean absolute relative error)", markup=False,
        )
    for w in refit.warnings:
        console.print(f"warning: {w}", markup=False)
    console.print(f"wrote {fit_path}", markup=False)
    for p in plots:
        console.print(f"wrote {p}", markup=False)
    if new_plan is not None:
        t = new_plan.target
        console.print(f"re-planned target: N={t.N:.4g} D={t.D:.4g} predicted loss {t.loss:.4g} (previous target kept in history)", markup=False)
