"""The training loop: megatron's 1F1B schedule over grad-accum micro-batches, AdamW steps,
periodic evaluation, metrics, and the checkpoint/signal seams.

Data: step k takes GLOBAL samples [k * global_batch, (k + 1) * global_batch) of the train split;
data-parallel rank r takes rows [r * per_rank, (r + 1) * per_rank) and cuts them into micro-batches
in order. The losses therefore do not depend on the layout (tests/test_parallel_equality.py).
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaleforge import rundir
from scaleforge.config import run_id, spec_to_yaml
from scaleforge.errors import ConfigError
from scaleforge.pretrain import metrics as metrics_mod
from scaleforge.pretrain.schedules import lr_at

DIVERGED_EXIT_CODE = 3


def open_samplers(spec: Any) -> tuple[Any, Any]:
    """Train and validation TokenSamplers over the spec's stores (vocabulary checked)."""
    from scaleforge.data_pipeline import TokenSampler, open_store

    stores = [open_store(path) for path in spec.data.stores]
    for path, store in zip(spec.data.stores, stores):
        if store.vocab_size > spec.model.vocab_size:
            raise ConfigError(
                f"data store {path} has vocabulary {store.vocab_size} > "
                f"model.vocab_size={spec.model.vocab_size}; raise model.vocab_size"
            )
    weights = list(spec.data.weights) or None
    make = partial(TokenSampler, stores, weights, spec.data.seq_len, spec.seed)
    return make(split="train"), make(split="validation")


def _rows(sampler: Any, spec: Any, batch_index: int) -> torch.Tensor:
    """This data-parallel rank's [per_rank, seq_len + 1] rows of global batch `batch_index`."""
    from megatron.core import parallel_state

    from scaleforge.data_pipeline import rank_rows

    mine = rank_rows(spec.train.global_batch, parallel_state.get_data_parallel_rank(),
                     spec.parallel.dp)
    start = batch_index * spec.train.global_batch + mine.start
    return torch.as_tensor(sampler.samples(start, len(mine)), dtype=torch.long)


def _micro_batches(rows: torch.Tensor, micro_batch: int, device: torch.device):
    positions = torch.arange(rows.shape[1] - 1, device=device).unsqueeze(0)
    for chunk in rows.split(micro_batch):
        chunk = chunk.to(device, non_blocking=True)
        yield chunk[:, :-1], chunk[:, 1:], positions.expand(chunk.shape[0], -1)


def _forward_step(builder: Any):
    """megatron's forward_step_func over the family's own forward and loss (its builder)."""

    def step(data_iterator, model):
        tokens, labels, positions = next(data_iterator)
        return builder.forward_step(model, tokens, positions, labels)

    return step


def run_batch(built: Any, spec: Any, rows: torch.Tensor, *, forward_only: bool) -> float:
    """Forward (and backward) one global batch's rows; returns this rank's summed micro-batch loss.

    The sum is nonzero only on the last pipeline stage.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(built.model.parameters()).device
    micro = spec.train.micro_batch
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step(built.builder),
        data_iterator=_micro_batches(rows, micro, device),
        model=[built.ddp],
        num_microbatches=rows.shape[0] // micro,
        seq_length=spec.data.seq_len,
        micro_batch_size=micro,
        forward_only=forward_only,
    )
    return float(sum(out["loss"].item() for out in outputs)) if outputs else 0.0


def _global_mean(local_sum: float, count: int, *extra: float) -> list[float]:
    """Mean loss over the job (only last-stage, tp-rank-0 ranks contribute) plus summed flags."""
    from megatron.core import parallel_state

    owner = parallel_state.is_pipeline_last_stage() and (
        parallel_state.get_tensor_model_parallel_rank() == 0
    )
    values = torch.tensor([local_sum if owner else 0.0, *extra], dtype=torch.float64)
    dist.all_reduce(values)
    values = values.tolist()
    return [values[0] / count, *values[1:]]


def evaluate(built: Any, spec: Any, sampler: Any) -> float:
    """Mean validation loss over `eval.batches` global batches of the validation split."""
    built.ddp.eval()
    total = 0.0
    with torch.no_grad():
        for index in range(spec.eval.batches):
            total += run_batch(built, spec, _rows(sampler, spec, index), forward_only=True)
    built.ddp.train()
    micro_per_batch = spec.train.global_batch // spec.train.micro_batch
    return _global_mean(total, micro_per_batch * spec.eval.batches)[0]


def train_step(built: Any, spec: Any, rows: torch.Tensor, step: int) -> tuple[float, float, float]:
    """One optimizer step; returns (this rank's loss sum, lr, grad_norm).

    The family's own metrics of the step are read by `built.builder.step_metrics` afterwards.
    """
    lr = lr_at(step, spec.train)
    for group in built.optimizer.param_groups:
        group["lr"] = lr
    built.ddp.zero_grad_buffer()
    built.optimizer.zero_grad()
    local = run_batch(built, spec, rows, forward_only=False)
    _ok, grad_norm, _zeros = built.optimizer.step()
    return local, lr, float(grad_norm if grad_norm is not None else float("nan"))


def train(spec: Any, run_dir: Path) -> int:
    """Train `spec` into `run_dir` on this rank; returns the process exit code."""
    from scaleforge.parallel.setup import init_distributed, shutdown
    from scaleforge.pretrain import model_build

    rank_env = init_distributed(spec)
    rank0 = rank_env.rank == 0
    log = metrics_mod.RunLog(
        run_dir, run_id=run_id(spec), total_steps=spec.train.steps, enabled=rank0
    )
    try:
        train_sampler, val_sampler = open_samplers(spec)
        built = model_build.build(spec)
        hooks = _Hooks.install()
        step = hooks.load(run_dir, built, spec, train_sampler)
        # Read the data this run starts from (chunks are checksummed on first read): a damaged store
        # stops the run here, before the run directory changes.
        _rows(train_sampler, spec, step)
        if spec.eval.every:
            _rows(val_sampler, spec, 0)
    except BaseException:
        log.close()
        shutdown()
        raise
    state = rundir.FAILED
    try:
        if rank0:
            metrics_mod.truncate_after(rundir.metrics_path(run_dir), step)
            metrics_mod.write_atomic(rundir.spec_path(run_dir), spec_to_yaml(spec))
        log.status(rundir.RUNNING, step)
        state, step = _loop(spec, built, train_sampler, val_sampler, log, hooks, run_dir, step)
    finally:
        log.status(state, step)
        log.close()
        shutdown()
    if state == rundir.PREEMPTED:
        return hooks.requeue_exit_code
    if state == rundir.DIVERGED:
        if rank0:
            print(f"error: loss is not finite at step {step}; lower train.lr", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    return 0


def _loop(spec, built, train_sampler, val_sampler, log, hooks, run_dir, step):
    tokens_per_step = spec.tokens_per_step
    flops_per_token = spec.model.flops_per_token(spec.data.seq_len)
    micro_per_step = spec.train.global_batch // spec.train.micro_batch
    progress = _Progress(spec.train.steps, step, enabled=log.enabled)
    timer = metrics_mod.StepTimer()
    while step < spec.train.steps:
        local, lr, grad_norm = train_step(built, spec, _rows(train_sampler, spec, step), step)
        loss, stop = _global_mean(local, micro_per_step, float(hooks.stop_requested()))
        # collective on every rank (MoE: aux/z losses and expert load reduced over the job)
        extra = built.builder.step_metrics(built.model, num_microbatches=spec.grad_accum)
        if built.offload is not None:  # bytes the activation-offload hooks moved (pretrain/offload.py)
            extra = {**extra, **built.offload.step_metrics()}
        elapsed = timer.lap()
        step += 1
        tokens = step * tokens_per_step
        log.train(step=step, tokens=tokens, flops=flops_per_token * tokens, loss=loss, lr=lr,
                  grad_norm=grad_norm, tokens_per_s=tokens_per_step / elapsed, **extra)
        progress.update(step, loss, tokens_per_step / elapsed)
        if not math.isfinite(loss):
            return rundir.DIVERGED, step
        last = step == spec.train.steps
        if spec.eval.every and (step % spec.eval.every == 0 or last):
            eval_loss = evaluate(built, spec, val_sampler)
            log.eval(step=step, tokens=tokens, flops=flops_per_token * tokens, eval_loss=eval_loss)
            timer.lap()  # evaluation time is not training throughput
        if stop or last or (spec.checkpoint.every and step % spec.checkpoint.every == 0):
            hooks.save(run_dir, step, built, spec, train_sampler)
            timer.lap()
        log.status(rundir.RUNNING, step)
        if stop:
            progress.close()
            return rundir.PREEMPTED, step
    progress.close()
    return rundir.COMPLETED, step


class _Hooks:
    """The seams to scaleforge.pretrain.checkpoint and .signals (owned by their own modules)."""

    def __init__(self, checkpoint, signals):
        self.checkpoint = checkpoint
        self.signals = signals
        self.requeue_exit_code = signals.REQUEUE_EXIT_CODE

    @classmethod
    def install(cls) -> "_Hooks":
        from scaleforge.pretrain import checkpoint, signals

        signals.install()
        return cls(checkpoint, signals)

    def stop_requested(self) -> bool:
        return bool(self.signals.stop_requested())

    def load(self, run_dir: Path, built, spec, sampler) -> int:
        """Restore the latest checkpoint, if any (reads only); returns the step to continue from.

        Without one, a run with `checkpoint.init_from` starts from that run's last weights, adapted
        by the family's growth rule (pretrain/grow.py), with a fresh optimizer and schedule.
        """
        state = self.checkpoint.load_latest(
            run_dir, model=built.model, optimizer=built.optimizer, spec=spec
        )
        if state is not None and "stores" in state["sampler_state"]:
            # A store rebuilt or replaced under the same path would silently change the data: refuse
            # (naming what changed) before anything in the run directory is written. (Checkpoints
            # from before the identity was recorded hold only consumed_samples: nothing to compare.)
            sampler.load_state_dict(
                state["sampler_state"], position=int(state["step"]) * spec.train.global_batch
            )
        if state is None and spec.checkpoint.init_from:
            from scaleforge.pretrain import grow

            grow.start_from(spec, built, run_dir)
        return 0 if state is None else int(state["step"])

    def save(self, run_dir: Path, step: int, built, spec, sampler) -> None:
        self.checkpoint.save(
            run_dir, step, model=built.model, optimizer=built.optimizer,
            scheduler_state={"step": step},
            sampler_state={"consumed_samples": step * spec.train.global_batch,
                           **sampler.state_dict(position=step * spec.train.global_batch)},
            spec=spec,
        )


class _Progress:
    """A rich progress bar on a terminal; a plain line every ~5% of the steps otherwise."""

    def __init__(self, total: int, start: int, *, enabled: bool):
        self.total, self.enabled = total, enabled
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import Progress

            self.bar = Progress()
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step,
                            description=f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s")
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
