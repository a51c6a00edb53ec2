"""`orchestrate status PLAN`: one table row per run of a plan (ladder and target).

Columns: run, arch, N (parameters), D (training tokens), state, step/total, last loss, job. States
come from each run directory first and then one batched query per executor (see `runs.run_states`:
one squeue and at most one sacct call for all Slurm runs); if an executor cannot be asked, its runs
that are not finished show `unknown` and the command still exits 0. A growth stage whose source has
not completed shows `waits for NAME`. Torch-free.
"""

from __future__ import annotations

import argparse
import json

from scaleforge.orchestrator.plan import planfile
from scaleforge.orchestrator.run import runs
from scaleforge.orchestrator.run.entries import entries_from_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="plan.yaml written by `orchestrate plan`")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run instead")


def run(args: argparse.Namespace) -> int:
    plan = planfile.load_plan(args.plan)
    entries = entries_from_plan(args.plan, target=True, growth=True, plan=plan)
    growth = {r.name for r in plan.growth}
    info = {r.name: r for r in (*plan.runs(), *plan.growth)}
    states = runs.run_states(entries, tolerant=True)
    rows = []
    for st in states:
        planned = info[st.entry.name]
        rows.append({
            "run": st.entry.name,
            "role": "target" if st.entry.name == plan.target.name
            else "growth" if st.entry.name in growth else "ladder",
            "arch": planned.spec.model.arch,
            "N": planned.N,
            "D": planned.D,
            "state": st.state,
            "step": st.step,
            "total_steps": st.total_steps,
            "last_loss": st.last_loss,
            "job": st.job,
            "job_state": st.job_state,
            "waits_for": list(st.waits_for),
            "run_dir": str(st.entry.run_dir),
        })
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print_table(rows, title=f"{args.plan}: {len(rows)} runs")
    return 0


STATE_STYLE = {
    "completed": "green", "running": "cyan", "queued": "blue", "preempted": "yellow",
    "interrupted": "yellow", "failed": "red", "diverged": "red", "unknown": "magenta", "new": "dim",
}


def print_table(rows: list[dict], *, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None, caption="* the target run")
    for name, justify in (("run", "left"), ("arch", "left"), ("N", "right"), ("D", "right"),
                          ("state", "left"), ("step/total", "right"), ("last loss", "right"),
                          ("job", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        style = STATE_STYLE.get(row["state"], "")
        name = row["run"] + (" *" if row["role"] == "target" else "")
        loss = "" if row["last_loss"] is None else f"{row['last_loss']:.4f}"
        job = row["job"] + (f" {row['job_state']}" if row["job"] and row["job_state"] else "")
        if row.get("waits_for"):
            job = (job + " " if job else "") + f"waits for {', '.join(row['waits_for'])}"
        table.add_row(name, row["arch"], _si(row["N"]), _si(row["D"]),
                      f"[{style}]{row['state']}[/{style}]" if style else row["state"],
                      f"{row['step']}/{row['total_steps'] or '?'}", loss, job)
    Console(width=max(100, Console().width)).print(table)


def _si(x: float) -> str:
    """1234567 -> 1.23M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
