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

The Megatron-FSDP gather and scatter live in fsdp_checkpoint.py; the optimizer state in model space
(one format that every TP/PP/DP layout and shard level reads) in optimizer_state.py.
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
from scaleforge.pretrain.fsdp_checkpoint import (
    fsdp_optimizer_leaves,
    is_fsdp,
    load_fsdp,
    plain_params,
)
from scaleforge.pretrain.optimizer_state import (
    apply_optimizer_tensors,
    dist_load,
    init_optimizer_state,
    optim_metadata,
    optimizer_step,
    set_optimizer_step,
    sharded_leaves,
    state_name,
    substitute_missing,
)

FORMAT_VERSION = 1
MARKER = rundir.COMPLETE_MARKER
STATE_FILE = "state.json"
SPEC_FILE = rundir.SPEC_FILE  # a checkpoint keeps the spec it was made with under the same name

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

    with plain_params(model, optimizer) as plain:  # Megatron-FSDP: gathered, as DDP holds them
        model_sd = model.sharded_state_dict()
        if plain:
            optim_flat = fsdp_optimizer_leaves(optimizer, model_sd, plain, loading=False)
        else:
            optim_sd = optimizer.sharded_state_dict(model_sd, metadata=optim_metadata(optimizer))
            optim_flat = sharded_leaves(optim_sd)
        # save() rewrites the dict in place (factories become their parts): read the names before
        names = sorted({state_name(leaf.key) for leaf in optim_flat.values()})
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
        "optimizer_step": optimizer_step(optimizer),
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
    init_optimizer_state(optimizer)
    if is_fsdp(optimizer):
        load_fsdp(path, model, optimizer, state)
        return
    model_sd = model.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=optim_metadata(optimizer)
    )
    request = sharded_leaves(optim_sd)
    saved_states = set(state["optimizer_states"])
    from_model = substitute_missing(request, saved_states, path)
    loaded = dist_load(path, {"model": model_sd, "optimizer": request})
    model.load_state_dict(loaded["model"])
    tensors = loaded["optimizer"]
    if from_model:
        tensors.update(dist_load(path, from_model))
    apply_optimizer_tensors(optimizer, optim_sd, tensors, state["optimizer_step"])
    set_optimizer_step(optimizer, state["optimizer_step"])


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
