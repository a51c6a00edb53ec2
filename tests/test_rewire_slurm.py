"""REWIRE on the Slurm dev cluster: the same config through datatrove's Slurm executor (one job
array per step, chained by dependencies) gives the local executor's outputs, every zarr array of
the mixed store byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slurm_cluster import REPO

pytestmark = pytest.mark.slurm


def _arrays(store: Path) -> dict[str, bytes]:
    """Every file of the zarr store but the metadata that names no data (all of it is compared)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_slurm_executor_gives_the_local_outputs(slurm_root, tiny_store, tmp_path):
    from test_rewire import tiny_config

    from scaleforge.data_pipeline import corpus

    kjv = tmp_path / "kjv.jsonl"
    rows = []
    for _key, text in corpus.bundled_sources()[2].documents():
        rows.append(text.replace("\n", " "))
        if len(rows) == 12:
            break
    kjv.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    body = tiny_config(tiny_store, kjv, shard_size=2)
    # One MinHash bucket (threshold 1.0): one array task instead of 14 on the two one-CPU nodes.
    body["dedup"] = {"threshold": 1.0}
    body["executor"] = {"tasks": 2, "time": "00:20:00", "mem_per_cpu_gb": 1}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for executor in ("local", "slurm"):
        out = tmp_path / executor
        res = subprocess.run([sys.executable, "-m", "scaleforge.cli", "rewire", str(cfg), "--out", str(out),
                              "--executor", executor], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[executor] = out
    # Each step ran as Slurm jobs: datatrove wrote its sbatch script and Slurm logs.
    assert (outs["slurm"] / "logs" / "rewrite" / "launch_script.slurm").is_file()
    assert (outs["slurm"] / "report.json").read_bytes() == (outs["local"] / "report.json").read_bytes()
    local, slurm = _arrays(outs["local"] / "mixed"), _arrays(outs["slurm"] / "mixed")
    assert local.keys() == slurm.keys() and any("tokens" in k for k in local)
    assert local == slurm
