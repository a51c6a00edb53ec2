"""Stage 2: rewrite every pool document, shard by shard, batch by batch, resumably.

Pool position p belongs to shard p // shard_size and, within it, to the batch of positions
[p - p % batch_size, + batch_size): batches are fixed by document index, never by what is left to
do, so a resumed shard decodes exactly the batches an uninterrupted one would. Each batch is
committed as one file written atomically; a kill loses at most the batch in flight, and a rerun
skips committed batches, so no document is duplicated or dropped. A finished shard's batches are
joined into one file (atomically) and the batch directory removed.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from scaleforge.data_pipeline.rewire import files, prompts
from scaleforge.data_pipeline.rewire.backends import BackendError, Generator
from scaleforge.data_pipeline.rewire.config import RewriteConfig


def num_shards(pool_size: int, cfg: RewriteConfig) -> int:
    """Shards of a pool."""
    return math.ceil(pool_size / cfg.shard_size)


def settings(cfg: RewriteConfig, generator: dict) -> dict:
    """The prompt and sampling settings, recorded with the output and in the report."""
    return {
        "prompt": {"variant": cfg.prompt, "template": prompts.TEMPLATES[cfg.prompt]},
        "sampling": cfg.sampling(),
        "generator": generator,
        "min_length_ratio": cfg.min_length_ratio,
    }


def run_shard(out: Path, shard: int, pool: list[dict], cfg: RewriteConfig, gen: Generator) -> int:
    """Rewrite one shard (skipping committed batches); returns the batches generated now."""
    final = files.shard_file(out, shard)
    if final.is_file():
        return 0
    bdir = files.shard_batches(out, shard)
    bdir.mkdir(parents=True, exist_ok=True)
    lo = shard * cfg.shard_size
    hi = min(len(pool), lo + cfg.shard_size)
    generated = 0
    for start in range(lo, hi, cfg.batch_size):
        bfile = bdir / f"batch-{start:09d}.jsonl"
        if bfile.is_file():
            continue
        docs = pool[start : min(hi, start + cfg.batch_size)]
        t0 = time.perf_counter()
        requests = [prompts.messages(cfg.prompt, d["text"]) for d in docs]
        # The seed is the batch's first pool position: the same on every attempt.
        replies = gen.generate(requests, cfg, cfg.seed + start)
        rows = [
            {"id": d["id"], "reply": r.text, "finish_reason": r.finish_reason, "tokens": r.tokens}
            for d, r in zip(docs, replies)
        ]
        files.write_jsonl(bfile, rows)
        generated += 1
        files.log(out, f"rewrite shard {shard} batch {start}: {len(docs)} documents, "
                       f"{sum(r.tokens for r in replies)} tokens in {time.perf_counter() - t0:.1f} s")
    rows = []
    for start in range(lo, hi, cfg.batch_size):
        rows.extend(files.read_jsonl(bdir / f"batch-{start:09d}.jsonl"))
    files.write_jsonl(final, rows)
    shutil.rmtree(bdir, ignore_errors=True)
    files.shard_failed(out, shard).unlink(missing_ok=True)
    return generated


def run(out: Path, pool: list[dict], cfg: RewriteConfig, gen: Generator,
        only: int | None = None) -> list[tuple[int, str]]:
    """Rewrite every unfinished shard (or only shard `only`); returns the (shard, error) failures.

    A shard whose requests fail after their retries is marked failed (its note says why) and the
    next shard goes on; a rerun retries it.
    """
    failures = []
    shards = range(num_shards(len(pool), cfg)) if only is None else [only]
    for shard in shards:
        try:
            run_shard(out, shard, pool, cfg, gen)
        except BackendError as exc:
            files.write_json(files.shard_failed(out, shard), {"error": str(exc)})
            files.log(out, f"rewrite shard {shard} failed: {exc}")
            failures.append((shard, str(exc)))
    return failures


def missing_shards(out: Path, pool_size: int, cfg: RewriteConfig) -> list[int]:
    """Shards without a finished file."""
    return [s for s in range(num_shards(pool_size, cfg)) if not files.shard_file(out, s).is_file()]


def load(out: Path, pool_size: int, cfg: RewriteConfig) -> list[dict]:
    """Every reply, in pool order."""
    rows = []
    for s in range(num_shards(pool_size, cfg)):
        rows.extend(files.read_jsonl(files.shard_file(out, s)))
    return rows
