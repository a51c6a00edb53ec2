"""`orchestrate train RUN.yaml [--out DIR] [--nproc N] [--set key.path=value ...] [--dry-run]`.

Everything that can be wrong with the input (YAML, fields, layout, data stores) is checked here,
before a directory is created or a process launched. `--nproc N > 1` re-launches under torchrun
(one process per rank, `python -m scaleforge.pretrain`); otherwise the run trains in this process,
as one rank of whatever launcher started it (torchrun or srun), or alone.
Imports no torch at module level: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from scaleforge.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="RUN.yaml", help="the RunSpec to train")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="run directory (default: runs/<name>-<run_id>)")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="ranks to launch on this machine with torchrun; parallel.dp becomes "
                             "N / (tp x pp)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a RunSpec field, e.g. train.steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved RunSpec, parameter and FLOP counts; launch nothing")


def resolve(spec_path: str, overrides: list[str], nproc: int | None) -> tuple[Any, list[str]]:
    """The resolved RunSpec and the override list that reproduces it in each rank."""
    from scaleforge.config import load_runspec
    from scaleforge.parallel.checks import check_layout, check_shape, dp_for_world
    from scaleforge.parallel.setup import env_from_launcher

    spec = _on_this_device(load_runspec(spec_path, overrides))
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    check_shape(spec)  # the model-shape checks first: they name the field to change
    # dp comes from the world size before the rest is checked: `--nproc 2 --set parallel.ep=2` is a
    # valid MoE layout only once dp is 2
    world = nproc if nproc is not None else env_from_launcher().world_size
    dp = dp_for_world(spec, world)
    overrides = list(overrides)
    if dp != spec.parallel.dp:
        overrides.append(f"parallel.dp={dp}")
        spec = _on_this_device(load_runspec(spec_path, overrides))
    check_layout(spec, world)
    return spec, overrides


def device_kind() -> str:
    """`gpu` when CUDA is usable here, else `cpu`."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _on_this_device(spec: Any) -> Any:
    """Refuse a run planned for the other kind of device; resolve `train.precision: auto` here, so
    the run id (and run.yaml) name the precision actually trained."""
    from scaleforge.config import check_device, resolve_precision

    kind = device_kind()
    check_device(spec, kind)
    return resolve_precision(spec, kind)


def check_stores(spec: Any) -> None:
    """Open every data store (a missing or incomplete one is a one-line DataError)."""
    from scaleforge.data_pipeline.store import open_store

    for path in spec.data.stores:
        store = open_store(path)
        if store.vocab_size > spec.model.vocab_size:
            raise ConfigError(
                f"data store {path} has vocabulary {store.vocab_size} > "
                f"model.vocab_size={spec.model.vocab_size}; raise model.vocab_size"
            )


def default_out(spec: Any) -> Path:
    from scaleforge.config import run_id

    return Path("runs") / f"{spec.name}-{run_id(spec)}"


def dry_run_text(spec: Any) -> str:
    """The resolved RunSpec YAML followed by its counts, as `--dry-run` prints it."""
    from scaleforge.config import run_id, spec_to_yaml

    model, train = spec.model, spec.train
    flops_token = model.flops_per_token(spec.data.seq_len)
    tokens = spec.tokens_per_step * train.steps
    lines = [
        spec_to_yaml(spec).rstrip(),
        "---",
        f"run_id: {run_id(spec)}",
        f"parameters: {model.num_params():,}",
        f"active_parameters: {model.active_params():,}",
        f"non_embedding_parameters: {model.non_embedding_params():,}",
        f"flops_per_token: {flops_token:.4g}",
        f"tokens: {tokens:,}",
        f"total_flops: {flops_token * tokens:.4g}",
        f"world_size: {spec.parallel.world_size}  "
        f"(tp={spec.parallel.tp} pp={spec.parallel.pp} dp={spec.parallel.dp})",
        f"grad_accum: {spec.grad_accum}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    spec, overrides = resolve(args.spec, args.overrides, args.nproc)
    if args.dry_run:
        print(dry_run_text(spec))
        return 0
    check_stores(spec)
    out = Path(args.out) if args.out else default_out(spec)
    if args.nproc is not None and args.nproc > 1:
        return launch_torchrun(args.spec, out, overrides, args.nproc)
    from scaleforge.pretrain.loop import train

    return train(spec, out)


def torchrun_command(spec_path: str, out: Path, overrides: list[str], nproc: int) -> list[str]:
    """The torchrun command line that starts `nproc` ranks of this run on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "scaleforge.pretrain", str(spec_path),
           "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def launch_torchrun(spec_path: str, out: Path, overrides: list[str], nproc: int) -> int:
    """Run the ranks under torchrun; the exit code is the run's (requeue code when preempted)."""
    env = dict(os.environ)
    # Ranks sharing cores must not each start a full OpenMP pool: 37 ms vs 663 ms a step measured
    # with 2 ranks on 2 cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    from scaleforge.pretrain import signals

    proc = subprocess.Popen(torchrun_command(spec_path, out, overrides, nproc), env=env)
    previous = signal.signal(signal.SIGINT, lambda s, _f: proc.send_signal(s))
    try:
        # SIGTERM/USR1/USR2 go straight to the ranks: torchrun dies of SIGUSR1/2 (default action)
        # and SIGKILLs its ranks 30 s after forwarding a SIGTERM, which can cut a save short.
        with signals.forward_to_ranks(proc):
            code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return _run_exit_code(out, code)


def _run_exit_code(out: Path, code: int) -> int:
    # torchrun reports any failed rank as 1; a preempted run must still exit with the requeue code.
    from scaleforge import rundir

    if code != 0 and rundir.read_status(out).get("state") == rundir.PREEMPTED:
        return rundir.REQUEUE_EXIT_CODE
    return code
