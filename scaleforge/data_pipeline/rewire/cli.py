"""`orchestrate rewire CONFIG.yaml --out DIR`: the REWIRE stages (classify, rewrite, filter, mix,
report). Imports nothing heavy at module level; the stages import torch, transformers, fastText
and datatrove only when they run."""

from __future__ import annotations

import argparse
import sys

STAGE_NAMES = ("classify", "rewrite", "filter", "dedup", "mix", "report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="the REWIRE config (see examples/rewire-tiny.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: stage folders, the mixed store, report.json; a rerun resumes")
    parser.add_argument("--stage", choices=STAGE_NAMES, default="report",
                        help="run the stages up to this one (default: all)")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="datatrove's local executor (default) or its Slurm executor: one job per "
                             "stage, chained by dependencies (executor.* in the config)")


def run(args: argparse.Namespace) -> int:
    """Validate, then run the stages that are not done."""
    from scaleforge.data_pipeline.rewire import pipeline
    from scaleforge.data_pipeline.rewire.config import load_config

    cfg = load_config(args.config)
    pipeline.run(cfg, args.out, until=args.stage, executor=args.executor,
                 echo=lambda m: print(m, file=sys.stdout, flush=True))
    return 0
