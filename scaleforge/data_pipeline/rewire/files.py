"""The names inside a REWIRE output directory, and JSON/JSONL reading and atomic writing.

```
OUT/rewire.json                 the config and its digest (an OUT belongs to one config)
OUT/rewire.log                  history: stages run, batches, timings (not data)
OUT/logs/<step>/                datatrove's logging folder of each step: completions (a finished
                                task is skipped on a rerun), per-task logs and stats
OUT/classify/model.bin          the quality classifier; summary.json (its training sets)
OUT/classify/docs/NNNNN.jsonl.gz  pool shard NNNNN: documents with their score and token count
OUT/rewrite/settings.json       prompt template, sampling, generator: recorded with the output
OUT/rewrite/batches/            one committed file per generated batch (resume inside a task)
OUT/rewrite/docs/NNNNN.jsonl.gz every document of shard NNNNN with its reply and drop reason
OUT/filter/                     model.bin, scores.jsonl (survivors: score, kept), summary.json
OUT/dedup/                      candidates.jsonl (raw top + kept rewrites), MinHash signatures,
                                buckets, removals, kept.jsonl
OUT/mixed/                      the mixed token store (+ provenance arrays per split)
OUT/mix/summary.json, OUT/report.json
```
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from scaleforge.rundir import write_atomic

STAGES = ("classify", "rewrite", "filter", "dedup", "mix", "report")
MARKER = "rewire.json"
LOG = "rewire.log"
REPORT = "report.json"
MIXED = "mixed"
SUMMARY = "summary.json"
DOCS = "docs"
SHARD_SUFFIX = ".jsonl.gz"


def stage_dir(out: Path, stage: str) -> Path:
    """OUT/<stage>."""
    return out / stage


def summary_path(out: Path, stage: str) -> Path:
    """The summary a finished stage leaves (what the report reads)."""
    return stage_dir(out, stage) / SUMMARY


def docs_dir(out: Path, stage: str) -> Path:
    """OUT/<stage>/docs: the stage's documents, one file per pool shard."""
    return stage_dir(out, stage) / DOCS


def shard_path(out: Path, stage: str, shard: int) -> Path:
    """The documents of pool shard `shard` after `stage`."""
    return docs_dir(out, stage) / f"{shard:05d}{SHARD_SUFFIX}"


def batch_path(out: Path, first: int) -> Path:
    """The committed replies of the rewrite batch that starts at pool position `first`."""
    return stage_dir(out, "rewrite") / "batches" / f"batch-{first:09d}.jsonl"


def logging_dir(out: Path, step: str) -> Path:
    """datatrove's logging folder of one step (its completion markers make reruns skip tasks)."""
    return out / "logs" / step


def write_shard(path: Path, rows: Iterable[dict]) -> None:
    """Atomically write gzipped JSONL (sorted keys, no timestamp in the gzip header: equal data, equal bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with part.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
        for r in rows:
            fh.write((json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n").encode())
    os.replace(part, path)


def read_shard(path: Path) -> Iterator[dict]:
    """The rows of one shard file."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def read_shards(out: Path, stage: str) -> Iterator[dict]:
    """Every row of a stage's shard files, in pool order."""
    for path in sorted(docs_dir(out, stage).glob(f"*{SHARD_SUFFIX}")):
        yield from read_shard(path)


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
