"""Run-directory outputs of the trainer: metrics.jsonl, status.json, run.yaml, TensorBoard events.

metrics.jsonl is the public contract: training lines carry step, tokens, flops, loss, lr, grad_norm,
tokens_per_s, plus the family's own metrics, each under one key namespaced by the family
(`moe/aux_loss`); evaluation lines carry step, tokens, flops, eval_loss. Only rank 0 writes.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scaleforge import rundir
from scaleforge.rundir import read_metrics, write_atomic  # noqa: F401  (the trainer's names for them)

TRAIN_KEYS = ("step", "tokens", "flops", "loss", "lr", "grad_norm", "tokens_per_s")
EVAL_KEYS = ("step", "tokens", "flops", "eval_loss")


def truncate_after(path: str | Path, step: int) -> None:
    """Drop every line of a metrics.jsonl with step > `step` (a resume from `step` re-logs them)."""
    rundir.truncate_metrics_after(path, step)


class RunLog:
    """Rank 0's writer for one run directory (a no-op object on other ranks)."""

    def __init__(self, run_dir: Path, *, run_id: str, total_steps: int, enabled: bool):
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.total_steps = total_steps
        self.enabled = enabled
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self._tb = None
        self._metrics = None  # opened at the first line, after a resume has truncated the file
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb

    def train(self, **record: Any) -> None:
        """Append one training line (keys TRAIN_KEYS, then the family's `family/name` keys) and its
        TensorBoard scalars."""
        extra = tuple(sorted(k for k in record if k not in TRAIN_KEYS))
        bad = [k for k in extra if "/" not in k]
        if bad:
            raise ValueError(f"family metric keys must be namespaced `family/name`, got {bad}")
        self._write(TRAIN_KEYS + extra, record)
        self.last_loss = record["loss"]

    def eval(self, **record: Any) -> None:
        """Append one evaluation line (keys EVAL_KEYS) and its TensorBoard scalar."""
        self._write(EVAL_KEYS, record)
        self.last_eval_loss = record["eval_loss"]

    def _write(self, keys: tuple[str, ...], record: dict) -> None:
        if set(record) != set(keys):
            raise ValueError(f"metrics record keys {sorted(record)} != {sorted(keys)}")
        if not self.enabled:
            return
        if self._metrics is None:
            self._metrics = open(rundir.metrics_path(self.run_dir), "a", buffering=1)
        self._metrics.write(json.dumps({k: record[k] for k in keys}) + "\n")
        tb = self._tensorboard()
        for key in keys:
            if key not in ("step", "tokens", "flops"):
                tb.add_scalar(key if "/" in key else f"train/{key}" if key != "eval_loss" else "eval/loss",
                              record[key], record["step"])

    def status(self, state: str, step: int) -> None:
        """Rewrite status.json atomically."""
        if state not in rundir.TRAINER_STATES:
            raise ValueError(f"unknown run state {state!r}")
        if not self.enabled:
            return
        body = {
            "state": state,
            "step": step,
            "total_steps": self.total_steps,
            "run_id": self.run_id,
            "last_loss": self.last_loss,
            "last_eval_loss": self.last_eval_loss,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        rundir.write_status(self.run_dir, body)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


class StepTimer:
    """Wall time of one optimizer step."""

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._t = now - self._t, now
        return elapsed
