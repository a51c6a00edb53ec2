"""The names inside a REWIRE output directory, and JSON/JSONL reading and atomic writing.

```
OUT/rewire.json                 the config and its digest (an OUT belongs to one config)
OUT/rewire.log                  history: stages run, attempts, resumes, timings (not data)
OUT/classify/                   pool.jsonl (id, text, tokens), model.bin, scores.jsonl, done.json
OUT/rewrite/settings.json       prompt template, sampling, generator: recorded with the output
OUT/rewrite/shard-NNNNN.jsonl   a finished shard: one reply per document, in pool order
OUT/rewrite/shard-NNNNN/        a shard in progress: one committed file per batch
OUT/rewrite/shard-NNNNN.failed  why the last attempt failed (a rerun retries the shard)
OUT/filter/                     model.bin, rewrites.jsonl (kept or dropped, with reason), done.json
OUT/mixed/                      the mixed token store (+ provenance arrays per split)
OUT/mix/done.json, OUT/report.json
```
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scaleforge.rundir import write_atomic

STAGES = ("classify", "rewrite", "filter", "mix", "report")
MARKER = "rewire.json"
LOG = "rewire.log"
REPORT = "report.json"
MIXED = "mixed"


def stage_dir(out: Path, stage: str) -> Path:
    """OUT/<stage>."""
    return out / stage


def done_path(out: Path, stage: str) -> Path:
    """The marker a finished stage leaves (its summary)."""
    return stage_dir(out, stage) / "done.json"


def shard_file(out: Path, shard: int) -> Path:
    """A finished rewrite shard."""
    return stage_dir(out, "rewrite") / f"shard-{shard:05d}.jsonl"


def shard_batches(out: Path, shard: int) -> Path:
    """The batch files of a shard in progress."""
    return stage_dir(out, "rewrite") / f"shard-{shard:05d}"


def shard_failed(out: Path, shard: int) -> Path:
    """The failure note of a shard."""
    return stage_dir(out, "rewrite") / f"shard-{shard:05d}.failed"


def dump(value) -> str:
    """Canonical JSON text (sorted keys, indented): equal data, equal bytes."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, value) -> None:
    """Atomically write canonical JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, dump(value))


def read_json(path: Path):
    """JSON from a file this pipeline wrote."""
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomically write one JSON object per line (sorted keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    write_atomic(path, text)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file this pipeline wrote."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def log(out: Path, message: str) -> None:
    """Append a timestamped line to OUT/rewire.log (history, never part of the report)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    with (out / LOG).open("a", encoding="utf-8") as fh:
        fh.write(f"{stamp} pid={os.getpid()} {message}\n")
