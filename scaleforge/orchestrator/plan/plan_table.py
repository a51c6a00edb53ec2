"""The plan as a table on the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from scaleforge.orchestrator.plan.planfile import Plan, PlannedRun


def _memory_levers(p) -> str:
    """shard level, recomputation, offload fractions and bf16 gradients (`parallel.grad_reduce_fp32`
    false) in a few characters (`full/full/a0.5/o0.3/g16`)."""
    parts = [p.shard, p.recompute]
    if p.activation_offload:
        parts.append(f"a{p.activation_offload:g}")
    if p.optimizer_offload:
        parts.append(f"o{p.optimizer_offload:g}")
    if not p.grad_reduce_fp32:
        parts.append("g16")
    return "/".join(parts)


def _row(run: PlannedRun) -> list[str]:
    spec = run.spec
    m, p, t = spec.model, spec.parallel, spec.train
    return [
        run.name,
        f"{run.budget:.2g}",
        f"{run.N:.3g}",
        f"{run.D:.3g}",
        f"{run.D / run.N:.1f}",
        m.summary(),
        f"{p.tp}/{p.pp}/{p.dp}",
        _memory_levers(p),
        str(run.gpus),
        str(t.global_batch),
        str(t.steps),
        f"{t.lr:.3g}",
        f"{run.layout.get('memory_gb', 0):.1f}",
        f"{run.gpu_hours:.3g}",
        f"{run.epochs:.2g}",
    ]


def plan_table(plan: Plan) -> Table:
    """Ladder rows, then the target row in bold."""
    unit = "GPU" if plan.cluster.kind == "gpu" else "rank"
    table = Table(
        title=f"{plan.arch} plan for {plan.budget:.3g} FLOPs on {plan.cluster.name} "
        f"({plan.cluster.nodes} x {plan.cluster.gpus_per_node} {unit}s), law: {plan.law.name} "
        f"({plan.law.source})"
    )
    for header in ("run", "C", "N", "D", "D/N", "LxH", "tp/pp/dp",
                   "memory levers", f"{unit}s", "batch", "steps",
                   "lr", "mem GB", f"{unit}-h", "epochs"):
        table.add_column(header, justify="left" if header == "run" else "right")
    for run in plan.ladder:
        table.add_row(*_row(run))
    table.add_row(*_row(plan.target), style="bold")
    return table


def print_plan(plan: Plan, console: Console | None = None) -> None:
    import sys

    # a pipe gets a wide table rather than rich's 80 columns of ellipses
    console = console or Console(width=None if sys.stdout.isatty() else 170)
    console.print(plan_table(plan))
    for line in plan.target.spec.model.plan_notes(plan.law.params, plan.budget):  # ParScale's
        console.print(line, markup=False, highlight=False)
    for run in [*plan.ladder, plan.target]:  # the memory levers a run needed, and why
        if run.layout.get("levers"):
            console.print(f"{run.name}: {run.layout['levers']}", markup=False, highlight=False)
    t = plan.target
    ladder_hours = sum(r.gpu_hours for r in plan.ladder)
    console.print(
        f"target: N={t.N:.3g} [{t.N_ci[0]:.3g}, {t.N_ci[1]:.3g}]  D={t.D:.3g} "
        f"[{t.D_ci[0]:.3g}, {t.D_ci[1]:.3g}]  loss={t.loss:.4f} [{t.loss_ci[0]:.4f}, "
        f"{t.loss_ci[1]:.4f}]  {t.gpu_hours:.3g} GPU-h; ladder: {len(plan.ladder)} runs, "
        f"{ladder_hours:.3g} GPU-h"
    )
