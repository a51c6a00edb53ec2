"""Growth, one path for every family: a new run that starts from an old run's last checkpoint.

`orchestrate grow RUN_DIR --out NEW_DIR --set K=V ...` builds the new RunSpec from RUN_DIR/run.yaml
plus the sets, with `checkpoint.init_from=RUN_DIR`, validates it, writes NEW_DIR/run.yaml and prints
the `orchestrate train` command that trains it (it does not train: the layout, `--nproc` or a Slurm
submission are chosen as for any run). Nothing is written when a check fails.

The trainer (`pretrain/loop.py`), at step 0 of a run with `checkpoint.init_from` set and no checkpoint
of its own, calls `start_from`: it reads the old run's last checkpoint's model tensors in full (model
space, layers stacked as megatron saves them, in any old layout), asks the family's builder
`grow_state(old_cfg, new_cfg, old_tensors)` for the new model's full tensors, and copies this rank's
shard of each into the freshly initialised model. The optimizer state is fresh and the schedule starts
at step 0. A run that already has a checkpoint resumes from it (init_from is then ignored).

The family's growth rule (docs/families.md "Growth") has two halves, both in the family contract:
- torch-free, on its config: `grow_from(self, old) -> config`: refuses a change it cannot make (a
  one-line ConfigError naming the field) and returns the config the grown run trains (TokenFormer sets
  its frozen score scale there, so a resumed grown run rebuilds with it). The contract's default
  refuses: a family that does not override it has no growth rule.
- torch, on its builder: `grow_state(old_cfg, new_cfg, old) -> dict[key, full tensor]`; the keys it
  returns are loaded, the others keep the seed's initialisation. The default returns every old tensor
  as it is; unless the builder's `growth_fills_prefix`, a shape change is then an error.

This module imports no torch at module level (the CLI imports it to build its parser).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Any

from scaleforge import rundir
from scaleforge.errors import CheckpointError, ConfigError


# ----------------------------------------------------------------------------------------------
# torch-free: the checks (the grow verb and the trainer both make them)


def last_checkpoint(run_dir: str | Path) -> Path:
    """The complete checkpoint that RUN_DIR/checkpoints/latest names (ConfigError otherwise)."""
    latest = rundir.latest_path(run_dir)
    if not latest.is_file():
        raise ConfigError(
            f"checkpoint.init_from={run_dir}: no complete checkpoint ({latest} is missing); "
            "train that run first"
        )
    name = rundir.read_latest(run_dir)
    path = rundir.checkpoints_dir(run_dir) / name
    if not rundir.is_step_dir_name(name) or not rundir.is_complete(path):
        raise ConfigError(
            f"checkpoint.init_from={run_dir}: {latest} names {name!r}, not a complete checkpoint"
        )
    return path


def source_dir(spec: Any, run_dir: str | Path | None = None) -> Path:
    """The run directory `checkpoint.init_from` names. A relative path is taken from the new run's
    own directory when it is known (a planned growth stage names its predecessor `../NAME-ID`, so
    the plan folder can move), else from the working directory."""
    source = Path(spec.checkpoint.init_from).expanduser()
    if source.is_absolute() or run_dir is None:
        return source
    return Path(run_dir) / source


def old_spec(spec: Any, run_dir: str | Path | None = None) -> Any:
    """The RunSpec the init_from run's last checkpoint was made with."""
    from scaleforge.config import load_runspec

    return load_runspec(rundir.spec_path(last_checkpoint(source_dir(spec, run_dir))))


def grown_model(new_model: Any, old_model: Any) -> Any:
    """`new_model` as the family's growth rule makes it from `old_model` (one-line errors)."""
    if new_model.arch != old_model.arch:
        raise ConfigError(
            f"model.arch={new_model.arch}: growing from a {old_model.arch} run into another "
            f"family is not possible; keep model.arch={old_model.arch}"
        )
    return new_model.grow_from(old_model)  # the contract's default refuses (no growth rule)


def check(spec: Any) -> Any:
    """The spec a run with `checkpoint.init_from` trains, its model adapted by `grow_from`."""
    if not spec.checkpoint.init_from:
        return spec
    old = old_spec(spec)
    model = grown_model(spec.model, old.model)
    return dataclasses.replace(spec, model=model)


def check_spec(spec: Any, run_dir: str | Path | None = None) -> Any:
    """The trainer's check of a spec with init_from (torch-free): the model must be what the growth
    rule makes of the old run's (a hand-written spec without TokenFormer's frozen scale is refused).
    Returns the old run's spec."""
    old = old_spec(spec, run_dir)
    model = grown_model(spec.model, old.model)
    if model != spec.model:
        field = _first_diff(model, spec.model)
        raise ConfigError(
            f"checkpoint.init_from={spec.checkpoint.init_from}: model.{field}="
            f"{getattr(spec.model, field)} differs from the growth rule's "
            f"{getattr(model, field)}; make the spec with `orchestrate grow`"
        )
    return old


# ----------------------------------------------------------------------------------------------
# the `grow` verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the trained run to grow from")
    parser.add_argument("--out", metavar="NEW_DIR", required=True,
                        help="the new run's directory (must not exist or be empty)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="change a RunSpec field, e.g. model.qkv_tokens=512")


def make_spec(run_dir: str | Path, overrides: list[str]) -> Any:
    """The grown run's RunSpec: RUN_DIR/run.yaml + overrides, init_from=RUN_DIR, checked."""
    from scaleforge.config import load_runspec
    from scaleforge.parallel.checks import check_shape

    run_dir = Path(run_dir)
    source = rundir.spec_path(run_dir)
    if not source.is_file():
        raise ConfigError(f"{run_dir} is not a run directory ({source} is missing)")
    last_checkpoint(run_dir)
    for item in overrides:
        if item.split("=", 1)[0].strip() == "checkpoint.init_from":
            raise ConfigError("--set checkpoint.init_from: grow sets it to RUN_DIR itself")
    spec = load_runspec(source, [*overrides, f"checkpoint.init_from={run_dir.resolve()}"])
    spec = check(spec)
    check_shape(spec)
    return spec


def run(args: argparse.Namespace) -> int:
    from scaleforge.config import spec_to_yaml

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; pick a new directory")
    spec = make_spec(args.run_dir, args.overrides)
    out.mkdir(parents=True, exist_ok=True)
    spec_file = rundir.spec_path(out)
    spec_file.write_text(spec_to_yaml(spec))
    print(f"wrote {spec_file} (starts from {spec.checkpoint.init_from})")
    print("train it with:")
    world = spec.parallel.world_size
    nproc = f" --nproc {world}" if world > 1 else ""  # the layout the old run.yaml carries
    print(f"  orchestrate train {shlex.quote(str(spec_file))} --out {shlex.quote(str(out))}{nproc}")
    return 0


# ----------------------------------------------------------------------------------------------
# torch: the trainer's step 0


def read_model_tensors(path: Path) -> dict:
    """{checkpoint key: full tensor} of the model part of a dist checkpoint (optimizer skipped)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(path))
    request = {k: v for k, v in meta.items() if not k.startswith("optimizer.")}
    try:
        # every rank reads whole tensors: the shards overlap (megatron's load_plain_tensors)
        return dist_checkpointing.load(request, str(path), validate_access_integrity=False)
    except Exception as exc:  # noqa: BLE001 - name the checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read to grow from: {first}") from exc


def sharded_tensors(tree: Any):
    """Every ShardedTensor of a megatron sharded state dict (factories built), depth first."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(tree, ShardedTensor):
        yield tree
    elif isinstance(tree, ShardedTensorFactory):
        yield from sharded_tensors(tree.build())
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from sharded_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from sharded_tensors(value)


def _local_piece(full: Any, leaf: Any) -> Any:
    """This rank's piece of a full (global-shape) tensor, as the ShardedTensor `leaf` places it."""
    return full[_region(leaf)].reshape(leaf.data.shape)


def _region(leaf: Any) -> tuple[slice, ...]:
    """The slices of the global tensor that this rank's `leaf` holds (layer axes first)."""
    sizes = [1] * leaf.prepend_axis_num + list(leaf.local_shape)
    return tuple(slice(off, off + size) for off, size in zip(leaf.global_offset, sizes))


def load_into(model: Any, tensors: dict, *, prefix: bool = False) -> list[str]:
    """Copy this rank's shard of each full tensor in `tensors` into `model`; returns the keys loaded.

    With `prefix`, a tensor smaller than the model's along some axes fills the leading part of
    each axis (the rest keeps its initialisation); otherwise shapes must be equal."""
    import torch

    loaded = []
    with torch.no_grad():
        for leaf in sharded_tensors(model.sharded_state_dict()):
            if leaf.key not in tensors or leaf.data is None:
                continue
            full = tensors[leaf.key]
            want = tuple(leaf.global_shape)
            fits = full.dim() == len(want) and all(a <= b for a, b in zip(full.shape, want))
            if tuple(full.shape) != want and not (prefix and fits):
                raise CheckpointError(
                    f"growth: tensor {leaf.key} has shape {tuple(full.shape)}, the new model's is "
                    f"{want}; the family's grow_state must adapt it"
                )
            region = _region(leaf)
            local = leaf.data
            for _ in range(leaf.prepend_axis_num):
                local = local.unsqueeze(0)  # a view: writes reach the parameter
            # the part of this rank's region inside the given tensor
            src, dst = [], []
            for cut, size in zip(region, full.shape):
                stop = min(cut.stop, size)
                if stop <= cut.start:
                    break
                src.append(slice(cut.start, stop))
                dst.append(slice(0, stop - cut.start))
            else:
                local[tuple(dst)].copy_(full[tuple(src)].to(local.dtype))
                loaded.append(leaf.key)
    return loaded


def start_from(spec: Any, built: Any, run_dir: str | Path | None = None) -> list[str]:
    """Step 0 of a grown run: the old run's last weights, adapted by the family, into `built`."""
    from scaleforge.pretrain import checkpoint

    old = check_spec(spec, run_dir)
    path = last_checkpoint(source_dir(spec, run_dir))
    checkpoint.verify(path)
    old_tensors = read_model_tensors(path)
    tensors = built.builder.grow_state(old.model, spec.model, old_tensors)
    loaded = load_into(built.model, tensors, prefix=built.builder.growth_fills_prefix)
    # mixed precision keeps fp32 main copies made when the optimizer was built: refresh them
    reload = getattr(built.optimizer, "reload_model_params", None)
    if reload is not None:
        reload()
    return loaded


def _first_diff(a: Any, b: Any) -> str:
    for field in dataclasses.fields(a):
        if getattr(a, field.name) != getattr(b, field.name):
            return field.name
    return "?"
