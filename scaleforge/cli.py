"""`orchestrate`: the command line. Each verb lives in its own module, imported only when used.

A verb module exposes `add_arguments(parser)` and `run(args) -> int`, and imports nothing heavy
(torch, megatron) at module level, so `orchestrate plan` answers in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from scaleforge import _warnings
from scaleforge.errors import ScaleforgeError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "plan": ("scaleforge.orchestrator.plan.plan_cli", "plan a compute-optimal ladder and target run for a budget"),
    "submit": ("scaleforge.orchestrator.run.submit", "launch a plan's runs (local or Slurm), skipping finished ones"),
    "status": ("scaleforge.orchestrator.run.status", "show the state of a plan's runs"),
    "refit": ("scaleforge.orchestrator.report.refit_cli", "fit the laws to a plan's finished runs and re-plan the target"),
    "fit": ("scaleforge.orchestrator.fit.fit_cli", "fit a scaling law to a CSV table of runs"),
    "train": ("scaleforge.pretrain.cli", "train one run from a RunSpec YAML"),
    "grow": ("scaleforge.pretrain.grow", "a new run from a trained run's checkpoint with a changed shape (the family's growth rule)"),
    "export": ("scaleforge.export.cli", "write a trained run's last checkpoint as a Hugging Face model directory"),
    "rewire": ("scaleforge.data_pipeline.rewire.cli", "REWIRE: classify a pool, rewrite it with an instruct model, filter, mix into a new store"),
    "demo": ("scaleforge.orchestrator.report.demo", "the whole loop on this machine: plan, train, refit, forecast"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen verb's module is imported (each may be slower to import than the others).
        if verb is None or verb == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    _warnings.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    try:  # a verb's options may ask the registry (a bad SCALEFORGE_FAMILIES: one line)
        parser = build_parser(verb if verb in VERBS else None)
        args = parser.parse_args(argv)
        return int(importlib.import_module(VERBS[args.verb][0]).run(args) or 0)
    except ScaleforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
