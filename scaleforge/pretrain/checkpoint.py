"""Checkpoints for an exact, layout-free resume: megatron dist-checkpointing (torch_dist) plus our own
atomic publish, manifest, RNG and run-state files.

Run directory layout::

    checkpoints/step_0000040/      a complete checkpoint (only complete ones carry this name)
        common.pt .metadata metadata.json __R_T.distcp   megatron torch_dist files
        rng_rank00000.pt ...       per-rank RNG states (python, numpy, torch, megatron's TP tracker)
        state.json                 step, scheduler and sampler state, layout, optimizer step
        run.yaml                   the RunSpec the checkpoint was made with
        COMPLETE                   manifest (size and CRC-32 of every file above), written last
    checkpoints/latest             one line naming the newest complete step directory
    checkpoints/.tmp_step_0000060/ a save in progress (deleted by the next save)

A save writes into the temporary directory, writes the manifest, renames the directory to its step
name and only then replaces `latest` (tmp + fsync + os.replace), and prunes older checkpoints beyond
`checkpoint.keep` after that. A kill at any moment therefore leaves `latest` naming a complete
checkpoint. A load verifies the manifest first, so a truncated or corrupt file is reported by name.

The optimizer state is stored in model space (one tensor per parameter and state, keyed by the
parameter's global name), so a checkpoint resumes under another TP/PP/DP layout: megatron's
distributed optimizer saves with `fully_reshardable` and the plain optimizer in its native model-space
form; both use `optimizer.state.<name>.<param key>` keys. The Adam step is saved by us and restored into
each parameter's own tensor (megatron gives all parameters one shared step tensor on load, which
torch's foreach AdamW then increments once per parameter: measured drift 3e-4 after 3 steps).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from scaleforge import rundir
from scaleforge.errors import CheckpointError
from scaleforge.pretrain import signals

FORMAT_VERSION = 1
MARKER = rundir.COMPLETE_MARKER
STATE_FILE = "state.json"
SPEC_FILE = rundir.SPEC_FILE  # a checkpoint keeps the spec it was made with under the same name
DISTOPT_FORMAT = "fully_reshardable"

PAUSE_ENV = "SCALEFORGE_TEST_PAUSE_IN_SAVE"
"""Test-only: `SCALEFORGE_TEST_PAUSE_IN_SAVE=<step>` makes the save of that step stop after the
tensor files are written and before the manifest, rename and `latest` (rank 0 creates `PAUSED` in the
temporary directory, then sleeps), so a test can SIGKILL the run inside a save deterministically."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return rundir.checkpoints_dir(run_dir)


# ----------------------------------------------------------------------------------------------
# save


def _in_process_write_results() -> None:
    """Give megatron's checkpoint writer a plain in-process queue for its write results.

    megatron-core's FileSystemWriterAsync (the torch_dist writer, used for synchronous saves too)
    hands each save's write results to the finalisation through a module-global queue that it
    creates at the first save as `multiprocessing.get_context("spawn").Manager().Queue()`: a
    Manager server process (plus multiprocessing's resource tracker) started by the rank, built for
    async saves where the writing happens in another process. Nothing ties that server to its rank:
    a spawned child does not inherit PR_SET_PDEATHSIG, and the server is stopped only by an
    exit-time finaliser in the rank, so a SIGKILLed rank left both running forever, orphaned to
    pid 1. Our saves are synchronous: the queue is filled and read inside this process (the
    writer's forked workers report through their own local queue), so a `queue.Queue` carries
    exactly the same results and no helper process exists to outlive the rank.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):  # megatron changed: find the new seam
        raise RuntimeError("megatron's FileSystemWriterAsync no longer has _results_queue")
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save(
    run_dir: str | Path,
    step: int,
    *,
    model: Any,
    optimizer: Any,
    scheduler_state: dict,
    sampler_state: dict,
    spec: Any,
) -> Path:
    """Write the checkpoint of `step` on every rank (a collective) and publish it as `latest`.

    `model` is this rank's unwrapped megatron model chunk, `optimizer` the megatron optimizer.
    Returns the published step directory.
    """
    from megatron.core import dist_checkpointing

    from scaleforge.config import spec_to_yaml

    root = checkpoint_root(run_dir)
    rank, world = _rank(), _world()
    tmp = root / rundir.tmp_name(rundir.step_dir_name(step))
    final = root / rundir.step_dir_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{rundir.TMP_PREFIX}*"):  # saves killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    with _plain_params(model, optimizer) as plain:  # Megatron-FSDP: gathered, as DDP holds them
        model_sd = model.sharded_state_dict()
        if plain:
            optim_flat = _fsdp_optimizer_leaves(optimizer, model_sd, plain, loading=False)
        else:
            optim_sd = optimizer.sharded_state_dict(model_sd, metadata=_optim_metadata(optimizer))
            optim_flat = _sharded_leaves(optim_sd)
        # save() rewrites the dict in place (factories become their parts): read the names before
        names = sorted({_state_name(leaf.key) for leaf in optim_flat.values()})
        _in_process_write_results()
        # the writer's worker processes (forked during the save) inherit the blocked mask, so a
        # Slurm step-wide signal cannot kill them
        with signals.deferred():
            dist_checkpointing.save({"model": model_sd, "optimizer": optim_flat}, str(tmp))
    with open(tmp / _rng_file(rank), "wb") as f:
        torch.save(capture_rng(), f)
        f.flush()
        os.fsync(f.fileno())

    state = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "scheduler_state": scheduler_state,
        "sampler_state": sampler_state,
        "optimizer_step": _optimizer_step(optimizer),
        "optimizer_states": names,
        "layout": _layout(world),
    }
    states = _gather(state["optimizer_states"])
    state["optimizer_states"] = sorted(set().union(*states))
    if rank == 0:
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1) + "\n")
        _write_synced(tmp / SPEC_FILE, spec_to_yaml(spec))
    _barrier()
    _maybe_pause(step, tmp)
    manifest = _manifest(tmp)
    if rank == 0:
        publish(root, tmp, final, manifest)
        prune(run_dir, spec.checkpoint.keep)
    _barrier()
    return final


def _manifest(tmp: Path) -> dict:
    """{file: (size, CRC-32)} of a finished save; the files are digested by all ranks in turn."""
    names = sorted(os.listdir(tmp))
    rank, world = _rank(), _world()
    mine = {name: _file_digest(tmp / name) for i, name in enumerate(names) if i % world == rank}
    merged: dict = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def publish(root: Path, tmp: Path, final: Path, manifest: dict | None = None) -> None:
    """Seal the finished save in `tmp` (manifest), rename it to `final`, then point `latest` at it."""
    if manifest is None:
        manifest = {name: _file_digest(tmp / name) for name in sorted(os.listdir(tmp))}
    for name in manifest:  # megatron's common.pt and metadata are written without fsync
        _fsync_file(tmp / name)
    _write_synced(tmp / MARKER, json.dumps(manifest, indent=1) + "\n")
    _fsync_dir(tmp)
    if final.exists():  # a complete but unpublished save of this step from a killed run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_synced(root / rundir.tmp_name(rundir.LATEST), final.name + "\n")
    os.replace(root / rundir.tmp_name(rundir.LATEST), root / rundir.LATEST)
    _fsync_dir(root)


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep` (never the one `latest` names)."""
    latest = read_latest_name(run_dir)
    root = checkpoint_root(run_dir)
    complete = sorted(p for p in root.glob(f"{rundir.STEP_PREFIX}*") if (p / MARKER).exists())
    doomed = [p for p in complete[:-keep] if p.name != latest] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _maybe_pause(step: int, tmp: Path) -> None:
    if os.environ.get(PAUSE_ENV) != str(step):
        return
    if _rank() == 0:
        (tmp / "PAUSED").write_text("paused inside a checkpoint save (test hook)\n")
    time.sleep(600)


# ----------------------------------------------------------------------------------------------
# load


def read_latest_name(run_dir: str | Path) -> str | None:
    """The step directory name that `latest` holds (None when there is no `latest`)."""
    name = rundir.read_latest(run_dir)
    if name is not None and not rundir.is_step_dir_name(name):
        raise CheckpointError(f"{rundir.latest_path(run_dir)} holds {name!r}, not a step directory "
                              "name; fix or remove it")
    return name


def latest_dir(run_dir: str | Path) -> Path | None:
    """The complete checkpoint that `latest` names; None when the run has no checkpoint yet."""
    root = checkpoint_root(run_dir)
    name = read_latest_name(run_dir)
    if name is None:
        return None
    path = root / name
    if not path.is_dir():
        raise CheckpointError(
            f"{root / rundir.LATEST} names {name}, which does not exist; restore it or remove {root}"
            " to start afresh"
        )
    if not rundir.is_complete(path):
        raise CheckpointError(f"{path / MARKER} is missing: checkpoint {path} is incomplete")
    return path


def verify(path: Path) -> None:
    """Check every file of a checkpoint against its manifest (size, then CRC-32).

    The files are split over the ranks; a mismatch anywhere raises the same CheckpointError on all.
    """
    try:
        manifest = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / MARKER} is unreadable ({exc}); checkpoint {path} is corrupt")
    rank, world = _rank(), _world()
    problem = None
    for index, (name, (size, crc)) in enumerate(sorted(manifest.items())):
        if index % world != rank:
            continue
        file = path / name
        if not file.is_file():
            problem = f"{file} is missing from checkpoint {path.name}"
        elif file.stat().st_size != size:
            problem = (f"{file} is truncated or altered ({file.stat().st_size} bytes, "
                       f"the manifest says {size})")
        elif _file_digest(file)[1] != crc:
            problem = f"{file} is corrupt (its CRC-32 differs from the manifest)"
        if problem:
            break
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise CheckpointError(
            f"{problems[0]}; write the name of an earlier {rundir.STEP_PREFIX}* directory into "
            f"{path.parent / rundir.LATEST} to resume from it"
        )


def load_latest(
    run_dir: str | Path, *, model: Any, optimizer: Any, spec: Any = None
) -> dict | None:
    """Load `latest` into `model` and `optimizer` (any TP/PP/DP layout) and restore RNG states.

    Returns {step, scheduler_state, sampler_state, path} or None when the run has no `latest`.
    A missing, truncated or corrupt checkpoint raises CheckpointError naming the file; a checkpoint of
    a different run (another run id) does too. Nothing on disk is changed.
    """
    path = latest_dir(run_dir)
    if path is None:
        return None
    verify(path)
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / STATE_FILE} has checkpoint format {state.get('format')}, this scaleforge "
            f"reads {FORMAT_VERSION}; resume it with the version that wrote it"
        )
    if spec is not None:
        _check_same_run(path, spec)
    with torch.no_grad():
        _load_tensors(path, model, optimizer, state)
    if state["layout"] == _layout(_world()):
        restore_rng(torch.load(path / _rng_file(_rank()), weights_only=True))
    return {
        "step": state["step"],
        "scheduler_state": state["scheduler_state"],
        "sampler_state": state["sampler_state"],
        "path": path,
    }


def _check_same_run(path: Path, spec: Any) -> None:
    from scaleforge.config import load_runspec, run_id

    saved = load_runspec(path / SPEC_FILE)
    if run_id(saved) != run_id(spec):
        raise CheckpointError(
            f"{path} was made by run {run_id(saved)}, not by this run ({run_id(spec)}): only "
            "parallel.* and checkpoint.* may change on resume; use another --out"
        )


def _load_tensors(path: Path, model: Any, optimizer: Any, state: dict) -> None:
    _init_optimizer_state(optimizer)
    if _fsdp(optimizer):
        _load_fsdp(path, model, optimizer, state)
        return
    model_sd = model.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=_optim_metadata(optimizer)
    )
    request = _sharded_leaves(optim_sd)
    saved_states = set(state["optimizer_states"])
    from_model = _substitute_missing(request, saved_states, path)
    loaded = _dist_load(path, {"model": model_sd, "optimizer": request})
    model.load_state_dict(loaded["model"])
    tensors = loaded["optimizer"]
    if from_model:
        tensors.update(_dist_load(path, from_model))
    _apply_optimizer_tensors(optimizer, optim_sd, tensors, state["optimizer_step"])
    _set_optimizer_step(optimizer, state["optimizer_step"])


# ----------------------------------------------------------------------------------------------
# Megatron-FSDP (parallel.shard grads | full)
#
# megatron's optimizer refuses every model-space format under Megatron-FSDP ("sharding_type ... is
# not supported with Megatron FSDP", distrib_optimizer.py:1230; only its own DCP `fsdp_dtensor`).
# To keep one checkpoint format for every layout, the DTensor parameters and their Adam states are
# gathered over the data-parallel ranks (megatron's `gather_uneven_dtensor_to_full_tensor`: the
# shards are uneven) into the tensors a DDP rank holds, and saved under the same keys; a load reads
# those and keeps this rank's slice. A checkpoint therefore resumes across shard levels and DP sizes.

FSDP_STATES = ("exp_avg", "exp_avg_sq")
"""Adam states gathered per parameter; `param` (the fp32 master) too where it is a separate copy."""


def _fsdp(optimizer: Any) -> bool:
    """Whether the optimizer runs under Megatron-FSDP (parallel.shard grads or full)."""
    config = getattr(_chained(optimizer)[0], "ddp_config", None)
    return bool(getattr(config, "use_megatron_fsdp", False))


def _shard_dims(dtensor: Any) -> list:
    """(process group, tensor dim) of each mesh dimension that shards `dtensor`."""
    from torch.distributed.tensor import Shard

    mesh = dtensor.device_mesh
    return [(mesh.get_group(i), place.dim) for i, place in enumerate(dtensor.placements)
            if isinstance(place, Shard)]


def _sizes(local: torch.Tensor, group: Any, dim: int) -> list[int]:
    sizes: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, int(local.shape[dim]), group=group)
    return sizes


def _full(tensor: Any) -> torch.Tensor:
    """A DTensor gathered on every rank (a collective), a plain tensor as is.

    Megatron-FSDP's shards are uneven (a rank may hold none of a parameter) and lie in rank order
    (its `gather_and_compute_chunk_metadata`); gloo's all_gather needs equal sizes, so each shard is
    padded to the largest and cut after the gather."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.detach()
    full = tensor.to_local().detach()
    for group, dim in _shard_dims(tensor):
        sizes = _sizes(full, group, dim)
        shape = list(full.shape)
        shape[dim] = max(sizes)
        padded = full.new_zeros(shape)
        padded.narrow(dim, 0, full.shape[dim]).copy_(full)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        full = torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, sizes)], dim)
    return full


def _local_slice(dtensor: Any, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` for an (unevenly) sharded DTensor (a collective)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(dtensor, DTensor):
        return full
    local = dtensor.to_local()
    for group, dim in _shard_dims(dtensor):
        sizes = _sizes(local, group, dim)
        rank = dist.get_rank(group)
        full = full.narrow(dim, sum(sizes[:rank]), sizes[rank])
    return full


_MEGATRON_PARAM_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride",
                         "sequence_parallel", "shared", "shared_embedding", "allreduce",
                         "is_embedding_or_output_parameter")


class _plain_params:
    """Within: every DTensor parameter of `model` is replaced by its gathered plain tensor, so
    megatron's `sharded_state_dict` describes it as under DDP; yields {id(plain): dtensor} (empty
    without Megatron-FSDP). On leaving, `writeback()` copies plain tensors back into the shards."""

    def __init__(self, model: Any, optimizer: Any):
        self.model, self.swaps, self.plain, self.fsdp = model, [], {}, []
        # Megatron-FSDP swaps its DTensor shards for gathered "raw" parameters around forward and
        # backward (megatron_fsdp.py:1215-1245); the shards are the ones the optimizer updates
        for chunk in getattr(_chained(optimizer)[0], "model_chunks", ()):
            fsdp = getattr(chunk, "module", None)
            if hasattr(fsdp, "_replace_param_with_distributed_if_needed"):
                fsdp._replace_param_with_distributed_if_needed()
                self.fsdp.append(fsdp)

    def __enter__(self) -> dict:
        from torch.distributed.tensor import DTensor

        for prefix, module in self.model.named_modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor):
                    plain = torch.nn.Parameter(_full(param), requires_grad=param.requires_grad)
                    for attr in _MEGATRON_PARAM_ATTRS:
                        if hasattr(param, attr):
                            setattr(plain, attr, getattr(param, attr))
                    module._parameters[name] = plain
                    self.swaps.append((module, f"{prefix}.{name}" if prefix else name, param, plain))
                    self.plain[id(plain)] = param
        return self.plain

    def writeback(self, loaded: dict) -> None:
        """Copy this rank's slice of each loaded weight (by state-dict name) into its shard."""
        with torch.no_grad():
            for _module, qualified, param, _plain in self.swaps:
                if qualified in loaded:  # a tied output weight is stored once, as the embedding
                    param.to_local().copy_(_local_slice(param, loaded[qualified]))
        for fsdp in self.fsdp:  # the shards are the optimizer's; the forward gathers the model's
            fsdp.install_optimized_model_weights()

    def __exit__(self, *exc) -> None:
        for module, qualified, param, _plain in self.swaps:
            module._parameters[qualified.rpartition(".")[2]] = param


def _main_states(optimizer: Any, param: Any) -> dict:
    """{param (the fp32 master, when separate), exp_avg, exp_avg_sq} of a model parameter."""
    opt = _chained(optimizer)[0]
    try:
        states = dict(opt._get_main_param_and_optimizer_states(param))
    except (KeyError, AttributeError):
        states = {"param": param, **opt.optimizer.state.get(param, {})}
    if states.get("param") is param:
        states.pop("param")  # fp32: the weight is the master; nothing more to save
    for name in FSDP_STATES:
        # a rank whose shard of the parameter is empty has no Adam state for it; zeros keep the
        # ranks' collectives in step (measured: the gathers otherwise hang)
        if name not in states:
            states[name] = torch.zeros_like(states.get("param", param))
    states.pop("step", None)
    return states


def _fsdp_optimizer_leaves(optimizer: Any, model_sd: dict, plain: dict, *, loading: bool,
                           names: tuple = ()) -> dict:
    """{`optimizer/<path>`: ShardedTensor} of the gathered Adam states under model-space keys
    (`optimizer.state.<name>.<model key>`), in the path order every rank shares."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    out, done = {}, {}
    for path, leaf in sorted(_sharded_leaves(model_sd).items()):
        dtensor = plain.get(id(leaf.data))
        if dtensor is None:
            continue
        if id(dtensor) not in done:
            states = _main_states(optimizer, dtensor)
            done[id(dtensor)] = {
                name: (torch.empty_like(leaf.data) if loading else _full(states[name]))
                for name in (names or states)
            }
        for name, tensor in done[id(dtensor)].items():
            out[f"/optimizer{path}/{name}"] = make_sharded_optimizer_tensor(
                leaf, tensor, f"optimizer.state.{name}")
    return out


def _load_fsdp(path: Path, model: Any, optimizer: Any, state: dict) -> None:
    saved_states = set(state["optimizer_states"])
    swap = _plain_params(model, optimizer)
    with swap as plain:
        model_sd = model.sharded_state_dict()
        separate_master = any("param" in _main_states(optimizer, p) for p in plain.values())
        names = (("param",) if separate_master else ()) + FSDP_STATES
        request = _fsdp_optimizer_leaves(optimizer, model_sd, plain, loading=True, names=names)
        # the load rewrites the state dicts in place: note which parameter each path is first
        param_of = {path: plain[id(leaf.data)] for path, leaf in _sharded_leaves(model_sd).items()
                    if id(leaf.data) in plain}
        from_model = _substitute_missing(request, saved_states, path)
        loaded = _dist_load(path, {"model": model_sd, "optimizer": request})
        swap.writeback(loaded["model"])
        tensors = loaded["optimizer"]
        if from_model:
            tensors.update(_dist_load(path, from_model))
        # each parameter's states, in the shared path order: the slices are collectives
        by_param: dict = {}
        for key in sorted(tensors):
            param_path, _, name = key.rpartition("/")
            leaf_path = param_path[len("/optimizer"):]
            by_param.setdefault(leaf_path, {})[name] = tensors[key]
        with torch.no_grad():
            for leaf_path in sorted(by_param):
                param = param_of[leaf_path]
                states = _main_states(optimizer, param)
                for name, full in by_param[leaf_path].items():
                    local = _local_slice(param, full)
                    target = states[name]
                    (target.to_local() if hasattr(target, "to_local") else target).copy_(local)
    _set_optimizer_step(optimizer, state["optimizer_step"])
    for inner in _inner_optimizers(optimizer):
        for param in list(inner.state):
            if hasattr(param, "to_local") and param.to_local().numel() == 0:
                # no shard here: as in a fresh run, no Adam state (else its step would stay behind)
                del inner.state[param]


# ----------------------------------------------------------------------------------------------
# optimizer helpers


def _dist_load(path: Path, request: dict) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(request, str(path))
    except Exception as exc:  # noqa: BLE001 - megatron raises many kinds; name the checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded into this model: {first}") from exc


def _substitute(leaf: Any, name: str, saved: set[str], path: Path) -> Any:
    """Where the checkpoint lacks optimizer state `name`, read its equivalent.

    Master weights are called `param` by the distributed optimizer and `fp32_param` by the plain
    bf16 one; the plain fp32 optimizer keeps none (the model weight is the master weight).
    """
    from dataclasses import replace

    prefix, _, model_key = leaf.key.partition(f"{name}.")
    if name in ("param", "fp32_param"):
        other = "fp32_param" if name == "param" else "param"
        return replace(leaf, key=f"{prefix}{other}.{model_key}" if other in saved else model_key)
    raise CheckpointError(f"{path} holds no optimizer state {name!r} (it has {sorted(saved)})")


def _chained(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(opt: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def _optim_metadata(optimizer: Any) -> dict:
    # Model-space formats only: `dp_reshardable` reshards only over DP and does not save the step;
    # the default `fully_sharded_model_space` fails at save on torch_dist (flattened_range).
    return {"distrib_optim_sharding_type": DISTOPT_FORMAT, "chained_optim_avoid_prefix": True}


def _substitute_missing(request: dict, saved_states: set, path: Any) -> dict:
    """Replace in `request` each optimizer state the checkpoint lacks by its substitute; returns
    the substitutes read from the model's own weights, removed from `request`: they go in a second
    load, since one load may read each shard once only (megatron's access-integrity check)."""
    from_model = {}
    for key, leaf in list(request.items()):
        name = _state_name(leaf.key)
        if name not in saved_states:
            substitute = _substitute(leaf, name, saved_states, path)
            if substitute.key.startswith("optimizer."):
                request[key] = substitute
            else:
                from_model[key] = substitute
                del request[key]
    return from_model


def _sharded_leaves(tree: Any, path: str = "") -> dict:
    """{tree path: ShardedTensor or factory} of a nested state dict.

    Paths, not sharded keys, name the entries: one key may hold several tensors (megatron stacks
    the layers of a stage under one key with different offsets).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(tree, (ShardedTensor, ShardedTensorFactory)):
        return {path: tree}
    items = tree.items() if isinstance(tree, dict) else (
        enumerate(tree) if isinstance(tree, (list, tuple)) else ())
    out = {}
    for k, v in items:
        out.update(_sharded_leaves(v, f"{path}/{k}"))
    return out


def _replace_leaves(tree: Any, tensors: dict, path: str = "") -> Any:
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    if isinstance(tree, (ShardedTensor, ShardedTensorFactory)):
        return tensors[path]
    if isinstance(tree, LocalNonpersistentObject):  # kept as is by a load: the optimizer's own
        return tree.unwrap()
    if isinstance(tree, dict):
        return {k: _replace_leaves(v, tensors, f"{path}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_replace_leaves(v, tensors, f"{path}/{i}") for i, v in enumerate(tree))
    return tree


def _state_name(key: str) -> str:
    # `optimizer.state.exp_avg.decoder.layers.0...` -> `exp_avg`
    parts = key.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["optimizer", "state"] else key


def _inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return [opt.optimizer for opt in _chained(optimizer) if getattr(opt, "optimizer", None)]


def _per_param_step(inner: torch.optim.Optimizer) -> bool:
    # torch Adam/AdamW keep a step tensor per parameter; apex/TE FusedAdam (GPU) keep one in each
    # param group instead
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _init_optimizer_state(optimizer: Any) -> None:
    """Give every parameter zero Adam state and its own step tensor (megatron's load needs it)."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                if _per_param_step(inner) and "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)


def _optimizer_step(optimizer: Any) -> float:
    steps = set()
    for inner in _inner_optimizers(optimizer):
        if _per_param_step(inner):
            steps |= {float(state["step"]) for state in inner.state.values() if "step" in state}
        else:
            steps |= {float(g["step"]) for g in inner.param_groups if g["params"] and "step" in g}
    if len(steps) > 1:
        raise CheckpointError(f"optimizer parameters disagree on the Adam step: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _set_optimizer_step(optimizer: Any, step: float) -> None:
    for inner in _inner_optimizers(optimizer):
        if _per_param_step(inner):
            for state in inner.state.values():
                # one tensor per parameter: foreach AdamW increments each step tensor it is given
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
        else:
            for group in inner.param_groups:
                group["step"] = int(step)


def _apply_optimizer_tensors(optimizer: Any, optim_sd: Any, tensors: dict, step: float) -> None:
    filled = _replace_leaves(optim_sd, tensors)
    chained = _chained(optimizer)
    parts = [filled] if len(chained) == 1 else [filled[i] for i in sorted(filled)]
    for opt, part in zip(chained, parts):
        if _is_distributed(opt):
            param_state = part.pop("param_state")
            part.pop("param_state_sharding_type", None)
            opt.load_state_dict(part)
            # megatron's copy expects exactly {param, exp_avg, exp_avg_sq}; the step is set after
            for state in opt.optimizer.state.values():
                state.pop("step", None)
            opt.load_parameter_state_from_fully_reshardable(param_state)
        else:
            # torch's load needs a step per parameter; megatron copies `common_step` to each
            inner = part["optimizer"] if "optimizer" in part else part
            inner["state"]["common_step"] = torch.tensor(float(step), dtype=torch.float32)
            opt.load_state_dict(part)


# ----------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict:
    """This rank's RNG states: python, numpy, torch CPU, CUDA (when present), megatron's tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    np_state = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["tracker"]:
        get_cuda_rng_tracker().set_states(dict(state["tracker"]))


# ----------------------------------------------------------------------------------------------
# small helpers


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _layout(world: int) -> dict:
    from megatron.core import parallel_state

    return {
        "world_size": world,
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
    }


def _file_digest(path: Path) -> tuple[int, int]:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return path.stat().st_size, crc


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
