"""`orchestrate fit DATA.csv --law NAME`: fit a scaling law to a CSV table of runs.

Variables: N (parameters), D (tokens) or C (training FLOPs, D = C / 6N), P (parallel streams),
M (tokens per parameter, M = D / N), S1 / S2 (annealing areas) or LR (one schedule, one row per
step), L (loss; a column named `loss` is taken when there is no `L`). A variable is read from the
column of its own name unless `--map VAR=COLUMN` names another.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from scaleforge.errors import FitError
from scaleforge.orchestrator.fit import fitter, laws
from scaleforge.orchestrator.fit.laws.annealing import areas

VARIABLES = ("N", "D", "C", "P", "M", "S1", "S2", "LR", "L")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA.csv", help="table of runs, one per row, with a header")
    parser.add_argument("--law", required=True, help="chinchilla, isoflop, parscale, overtrain or annealing")
    parser.add_argument("--map", action="append", default=[], metavar="VAR=COLUMN", help="read variable VAR from COLUMN (repeatable)")
    parser.add_argument("--drop-highest", type=int, default=0, metavar="K", help="drop the K highest-loss rows first")
    parser.add_argument("--predict", metavar="OTHER.csv", help="predict the loss of OTHER.csv's rows (read with the same --map)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples for confidence intervals")


def parse_map(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        var, sep, col = item.partition("=")
        if not sep or not col or var not in VARIABLES:
            raise FitError(f"--map {item!r}: write VAR=COLUMN with VAR one of {', '.join(VARIABLES)}")
        out[var] = col
    return out


def read_table(path: str | Path) -> dict[str, list[str]]:
    """Column name -> raw cells of a CSV file with a header row."""
    p = Path(path)
    if not p.is_file():
        raise FitError(f"{p}: no such file")
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise FitError(f"{p}: empty file, expected a header row")
        rows = [r for r in reader if r]
    cols = {name.strip(): [] for name in header}
    names = list(cols)
    for i, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise FitError(f"{p} line {i}: {len(row)} cells, the header has {len(header)}")
        for name, cell in zip(names, row):
            cols[name].append(cell)
    return cols


def _column(table: dict[str, list[str]], name: str, var: str, path: str) -> np.ndarray:
    try:
        return np.array([float(c) for c in table[name]])
    except ValueError as exc:
        raise FitError(f"{path}: column {name!r} (variable {var}) is not numeric: {exc}") from None


def variables(table: dict[str, list[str]], mapping: dict[str, str], needed: tuple[str, ...], path: str, *, with_loss: bool = True) -> dict[str, np.ndarray]:
    """The law's variables (plus L when `with_loss`), derived where the table holds an equivalent."""
    found: dict[str, np.ndarray] = {}
    for var in VARIABLES:
        name = mapping.get(var, var)
        if name in table:
            found[var] = _column(table, name, var, path)
        elif var in mapping and (with_loss or var != "L"):
            raise FitError(f"{path}: no column {name!r} (mapped to {var}); columns are: {', '.join(table)}")
    if "L" not in found and "loss" in table:
        found["L"] = _column(table, "loss", "L", path)
    if "D" not in found and "C" in found and "N" in found:
        found["D"] = found["C"] / (6.0 * found["N"])
    if "C" not in found and "D" in found and "N" in found:
        found["C"] = 6.0 * found["N"] * found["D"]
    if "M" not in found and "D" in found and "N" in found:
        found["M"] = found["D"] / found["N"]
    if ("S1" not in found or "S2" not in found) and "LR" in found:
        found["S1"], found["S2"] = areas(found["LR"])
    want = (*needed, "L") if with_loss else needed
    missing = [v for v in want if v not in found]
    if missing:
        hint = {"D": "D or C", "C": "C or D", "M": "M or D", "S1": "S1 and S2, or LR", "S2": "S1 and S2, or LR"}
        need = ", ".join(dict.fromkeys(hint.get(v, v) for v in missing))
        raise FitError(f"{path}: law needs {need}; columns are: {', '.join(table)} (use --map VAR=COLUMN)")
    return {v: found[v] for v in want}


def run(args: argparse.Namespace) -> int:
    if args.law not in laws.NAMES:
        raise FitError(f"unknown law {args.law!r}: choose one of {', '.join(laws.NAMES)}")
    if args.drop_highest < 0 or args.bootstrap < 0:
        raise FitError("--drop-highest and --bootstrap must be >= 0")
    if args.law == "isoflop" and args.bootstrap:
        raise FitError("--bootstrap applies to the parametric laws; isoflop's intervals come from its power-law regression")
    mapping = parse_map(args.map)
    needed = ("N", "C") if args.law == "isoflop" else laws.get(args.law).variables
    data = variables(read_table(args.data), mapping, needed, args.data)
    if args.drop_highest:
        keep = np.argsort(data["L"], kind="stable")[: max(data["L"].size - args.drop_highest, 0)]
        keep.sort()
        data = {k: v[keep] for k, v in data.items()}
    if args.law == "isoflop":
        result = laws.isoflop.fit(data)
        out = result.to_json()
        if args.predict:
            other = variables(read_table(args.predict), mapping, ("C",), args.predict, with_loss=False)
            out["predictions"] = [float(v) for v in result.n_opt(other["C"])]
    else:
        law = laws.get(args.law)
        result = fitter.fit(law, data, fitter.FitOptions(bootstrap=args.bootstrap))
        out = result.to_json()
        if args.predict:
            other = variables(read_table(args.predict), mapping, law.variables, args.predict, with_loss=False)
            x = law.features(other)
            out["predictions"] = [float(v) for v in np.exp(law.evaluate(result.theta[None], x).value[0])]
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


def print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{out['law']} fit: {out['n_points']} points, objective {out['objective']:.6g}, R^2 {out['r2']:.5f}")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_column("interval", justify="right")
    for name, value in out["params"].items():
        lo_hi = out["ci"].get(name)
        table.add_row(name, f"{value:.6g}", f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi and np.isfinite(lo_hi).all() else "")
    console = Console(file=sys.stdout)
    console.print(table)
    for warning in out.get("warnings", []):
        console.print(f"warning: {warning}")
    if "predictions" in out:
        console.print("predictions: " + ", ".join(f"{v:.6g}" for v in out["predictions"]))
