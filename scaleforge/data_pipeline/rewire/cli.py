"""`orchestrate rewire CONFIG.yaml --out DIR`: the REWIRE stages (classify, rewrite, filter, mix,
report). Imports nothing heavy at module level; the stages import torch, transformers, fastText
and datatrove only when they run."""

from __future__ import annotations

import argparse
import dataclasses
import sys

STAGE_NAMES = ("classify", "rewrite", "filter", "mix", "report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="the REWIRE config (see examples/rewire-tiny.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: stage folders, the mixed store, report.json; a rerun resumes")
    parser.add_argument("--stage", choices=STAGE_NAMES, default="report",
                        help="run the stages up to this one (default: all)")
    parser.add_argument("--shard", type=int, default=None, metavar="I",
                        help="rewrite only shard I (a Slurm array task); classify must be done")
    parser.add_argument("--endpoint", default=None, metavar="URL",
                        help="override rewrite.endpoint (the server this task talks to)")


def run(args: argparse.Namespace) -> int:
    """Validate, then run the stages that are not done."""
    from scaleforge.data_pipeline.rewire import pipeline
    from scaleforge.data_pipeline.rewire.config import load_config
    from scaleforge.errors import ConfigError

    cfg = load_config(args.config)
    if args.endpoint is not None:
        cfg = dataclasses.replace(cfg, rewrite=dataclasses.replace(cfg.rewrite, endpoint=args.endpoint))
    if args.shard is not None and args.stage not in ("rewrite", "report"):
        raise ConfigError("--shard runs one rewrite shard: use it with --stage rewrite (or no --stage)")
    until = "rewrite" if args.shard is not None else args.stage
    pipeline.run(cfg, args.out, until=until, shard=args.shard,
                 echo=lambda m: print(m, file=sys.stdout, flush=True))
    return 0
