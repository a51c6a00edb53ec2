"""`orchestrate train` end to end: the run-directory contract, determinism, --dry-run, and the
shipped dense-tiny example learning more than unigram statistics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import rank_env
from scaleforge.config import load_runspec, resolve_precision, run_id
from scaleforge.pretrain.metrics import EVAL_KEYS, TRAIN_KEYS, read_metrics

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "dense-tiny.yaml"


def _tiny_spec(tmp_path: Path, store: Path, **train) -> Path:
    spec = {
        "name": "cli",
        "seed": 5,
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128,
                  "vocab_size": 512},
        "data": {"stores": [str(store)], "seq_len": 32},
        "train": {"steps": 6, "global_batch": 4, "micro_batch": 2, "lr": 3e-3,
                  "warmup_steps": 1, **train},
        "eval": {"every": 3, "batches": 1},
        "checkpoint": {"every": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _train(args: list[str], threads: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "scaleforge.cli", "train", *args],
                          env=rank_env(threads), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_run_directory_contract_and_determinism(tmp_path, tiny_store):
    spec_path = _tiny_spec(tmp_path, tiny_store)
    _train([str(spec_path), "--out", str(tmp_path / "a")])
    _train([str(spec_path), "--out", str(tmp_path / "b")])
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    # the contract: exactly these keys, every step once, evaluation at every 3rd and the last step
    train_lines = [r for r in a if "loss" in r]
    eval_lines = [r for r in a if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_lines] == [3, 6]
    assert all(set(r) == set(TRAIN_KEYS) for r in train_lines)
    assert all(set(r) == set(EVAL_KEYS) for r in eval_lines)
    spec = resolve_precision(load_runspec(spec_path), "cpu")  # the trainer resolves `auto` here
    per_token = spec.model.flops_per_token(32)
    for r in a:
        assert r["tokens"] == r["step"] * 4 * 32
        assert r["flops"] == pytest.approx(per_token * r["tokens"])
    assert all(math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in train_lines)
    assert train_lines[0]["lr"] == pytest.approx(3e-3)  # one warmup step reaches the peak
    assert train_lines[-1]["lr"] == pytest.approx(3e-4)  # cosine ends at min_lr_ratio x peak
    # same seed, same losses, bit for bit
    assert [r.get("loss", r.get("eval_loss")) for r in a] == [
        r.get("loss", r.get("eval_loss")) for r in b
    ]
    status = json.loads((tmp_path / "a" / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["total_steps"] == 6
    assert status["run_id"] == run_id(spec)
    assert status["last_loss"] == train_lines[-1]["loss"]
    assert status["last_eval_loss"] == eval_lines[-1]["eval_loss"]
    assert load_runspec(tmp_path / "a" / "run.yaml") == spec
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))


def test_dry_run_prints_resolved_spec_and_counts(tmp_path, tiny_store, capsys):
    from scaleforge.cli import main

    spec_path = _tiny_spec(tmp_path, tiny_store)
    out = tmp_path / "never"
    code = main(["train", str(spec_path), "--out", str(out), "--dry-run",
                 "--set", "train.steps=9", "--set", "parallel.tp=2", "--nproc", "4"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    resolved_yaml, counts = text.split("\n---\n")
    resolved = yaml.safe_load(resolved_yaml)
    assert resolved["train"]["steps"] == 9
    assert resolved["parallel"]["tp"] == 2 and resolved["parallel"]["dp"] == 2
    spec = resolve_precision(load_runspec(spec_path, ["train.steps=9", "parallel.tp=2", "parallel.dp=2"]), "cpu")
    fields = dict(line.split(": ", 1) for line in counts.splitlines())
    assert fields["run_id"] == run_id(spec)
    assert int(fields["parameters"].replace(",", "")) == spec.model.num_params()
    assert float(fields["total_flops"]) == pytest.approx(
        spec.model.flops_per_token(32) * 9 * 4 * 32, rel=1e-3
    )


def test_torchrun_command_sets_the_layout():
    from scaleforge.pretrain.cli import torchrun_command

    cmd = torchrun_command("r.yaml", Path("out"), ["train.steps=3", "parallel.dp=2"], 2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "scaleforge.pretrain", "r.yaml", "--out", "out",
                       "--set", "train.steps=3", "--set", "parallel.dp=2"]


@pytest.mark.slow
def test_dense_tiny_example_beats_unigram_entropy(tmp_path):
    from scaleforge.data_pipeline import open_store, unigram_entropy_nats

    spec = load_runspec(EXAMPLE)
    store = open_store(spec.data.stores[0])  # `make setup` builds the bundled store
    _train([str(EXAMPLE), "--out", str(tmp_path / "run")])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    final = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    entropy = unigram_entropy_nats(store, "validation")
    assert final < entropy, f"validation loss {final:.3f} >= unigram entropy {entropy:.3f} nats"


@pytest.mark.slow
def test_non_finite_loss_stops_as_diverged(tmp_path, tiny_store):
    # lr 1e30: after one AdamW step every weight is ~1e30 and the activations overflow
    spec_path = _tiny_spec(tmp_path, tiny_store, lr=1e30)
    proc = subprocess.run(
        [sys.executable, "-m", "scaleforge.cli", "train", str(spec_path), "--out",
         str(tmp_path / "run")], env=rank_env(2), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "error: loss is not finite at step" in proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "diverged" and status["step"] < 6
