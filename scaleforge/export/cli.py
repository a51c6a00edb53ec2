"""`orchestrate export RUN_DIR --to hf OUT`: a trained run as a Hugging Face model directory.

Everything that can be refused is checked before anything heavy runs: the target directory, the
run's last complete checkpoint, its family and settings (the model config's `hf_target`, which
names the family's mapping or says why it has none), the run's tokenizer.
This module imports no torch at module level (the CLI imports it to build its parser).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scaleforge import rundir
from scaleforge.errors import ConfigError

TARGETS = ("hf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    parser.add_argument("--to", choices=TARGETS, required=True,
                        help="export format: hf (a transformers model directory)")
    parser.add_argument("out", metavar="OUT", help="new (or empty) directory to write")


def export_hf(run_dir: str | Path, out: str | Path) -> dict:
    """Export RUN_DIR's last complete checkpoint to OUT; returns {architecture, step, path}."""
    from scaleforge.config import load_runspec
    from scaleforge.export.writer import check_target, run_tokenizer
    from scaleforge.pretrain.grow import last_checkpoint

    out = Path(out)
    check_target(out)
    try:
        path = last_checkpoint(run_dir)
    except ConfigError:
        latest = f"{rundir.CHECKPOINTS_DIR}/{rundir.LATEST}"
        raise ConfigError(f"{run_dir} has no complete checkpoint ({latest} naming a step directory "
                          "with COMPLETE); train the run first") from None
    spec = load_runspec(rundir.spec_path(path))  # the spec the checkpoint was made with
    target = spec.model.hf_target(spec.data.seq_len)
    tokenizer = run_tokenizer(spec)

    from scaleforge.export import gather, writer

    with gather.one_process(spec):
        model = gather.load_model(spec, path)
        state = gather.full_state(model)
        del model
    writer.write(out, target, target.convert(state), tokenizer, max_length=spec.data.seq_len)
    return {"architecture": target.architecture, "step": path.name, "path": str(out)}


def run(args: argparse.Namespace) -> int:
    done = export_hf(args.run_dir, args.out)
    print(f"wrote {done['path']} ({done['architecture']}, from checkpoint {done['step']})")
    return 0
