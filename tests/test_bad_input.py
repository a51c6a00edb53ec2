"""Bad input to `orchestrate train`: one `error:` line, exit code 2, and nothing written or changed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaleforge.cli import main

GOOD = {
    "name": "bad-input",
    "model": {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128,
              "vocab_size": 512},
    "data": {"seq_len": 32},
    "train": {"steps": 2, "global_batch": 8, "micro_batch": 4},
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, tiny_store):
    """A spec that is valid except for what each test breaks, and an existing run directory."""
    spec = dict(GOOD, data=dict(GOOD["data"], stores=[str(tiny_store)]))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "status.json").write_text('{"state": "completed"}\n')
    return tmp_path


CASES = {
    "invalid_yaml": ("model: {layers: 4\n  hidden: [", [], "invalid YAML"),
    "unknown_field": ({"model": {"layerz": 4}}, [], "unknown config field 'model.layerz'"),
    "tp_heads": (None, ["parallel.tp=3"], "parallel.tp=3 does not divide model.heads=4"),
    "pp_layers": (None, ["parallel.pp=3"], "parallel.pp=3 does not divide model.layers=4"),
    "batch_micro_dp": (None, ["train.micro_batch=3"], "train.global_batch=8 is not divisible"),
    "batch_dp": (None, ["--nproc", "4", "train.micro_batch=4"], "is not divisible by train.micro_batch x"),
    "missing_store": ({"data": {"stores": ["nowhere/store"]}}, [], "data store nowhere/store not found"),
    "set_unknown": (None, ["train.stepz=3"], "--set train.stepz: no such field 'train.stepz'"),
    "nproc_layout": (None, ["--nproc", "3", "parallel.tp=2"], "--nproc 3 is not divisible"),
    "ep_without_experts": (None, ["--nproc", "2", "parallel.ep=2"], "has no experts to shard"),
    "moe_key_on_dense": (None, ["model.experts=4"], "no such field 'model.experts'"),
}


def _argv(workdir: Path, case: str) -> list[str]:
    change, extra, _ = CASES[case]
    spec = workdir / "run.yaml"
    if isinstance(change, str):
        spec.write_text(change)
    elif change is not None:
        data = yaml.safe_load(spec.read_text())
        for section, fields in change.items():
            data[section] = {**data.get(section, {}), **fields}
            if section == "model":
                data["model"] = dict(fields)
        spec.write_text(yaml.safe_dump(data))
    argv = ["train", str(spec), "--out", str(workdir / "out")]
    nproc = []
    if extra[:1] == ["--nproc"]:
        nproc, extra = extra[:2], extra[2:]
    for item in extra:
        argv += ["--set", item]
    return argv + nproc


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, workdir, capsys):
    argv = _argv(workdir, case)
    before = _snapshot(workdir)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert CASES[case][2] in err[0]
    assert _snapshot(workdir) == before  # nothing written, nothing overwritten


def test_bad_input_through_the_real_command(workdir):
    """The installed entry point behaves the same (exit 2, one line on stderr, no traceback)."""
    argv = _argv(workdir, "tp_heads")
    proc = subprocess.run([sys.executable, "-m", "scaleforge.cli", *argv],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: parallel.tp=3 does not divide model.heads=4")


def test_corrupt_chunk_is_named_and_nothing_is_overwritten(workdir, tiny_store):
    """A damaged zarr chunk stops the run before any step with an error naming the chunk."""
    store = workdir / "store"
    shutil.copytree(tiny_store, store)
    chunk = store / "train" / "tokens" / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    data = yaml.safe_load((workdir / "run.yaml").read_text())
    data["data"]["stores"] = [str(store)]
    (workdir / "run.yaml").write_text(yaml.safe_dump(data))
    before = _snapshot(workdir / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "scaleforge.cli", "train", str(workdir / "run.yaml"), "--out",
         str(workdir / "out")], capture_output=True, text=True, timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "train/tokens/c/0" in err[0], err
    after = _snapshot(workdir / "out")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
