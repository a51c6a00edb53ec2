"""Near-duplicate removal before the mix: datatrove's four MinHash stages over the mix candidates.

The candidates are the raw top fraction of the pool and the kept rewrites, together, streamed in
pool order (the raw text before its rewrite) by one reader task, so that the signature and the
filter stage see the same document indices. Stages: signatures (one task), buckets (one task per
bucket), clusters (one task), filter (one task; what passes is recorded in `dedup/kept.jsonl`).

datatrove's cluster stage writes `{rank:06d}.remove` only when something is to be removed, and its
filter stage keeps every document, with a warning, when the file is missing: a cluster stage that
never ran would pass for "no duplicates". So the filter runs only after the cluster stage's
completion marker, and an empty removal file is written when there is none.

`dedup.threshold` is the Jaccard similarity (of word 5-gram shingles) at which a pair is caught
with probability 1/2: with 8 hashes per bucket, buckets = round(threshold ** -8) (datatrove's
default 14 buckets is threshold 0.72).
"""

from __future__ import annotations

from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from scaleforge.data_pipeline.rewire import files
from scaleforge.data_pipeline.rewire.config import RewireConfig
from scaleforge.data_pipeline.rewire.workers import die_with_parent

HASHES_PER_BUCKET = 8


def minhash_config(cfg: RewireConfig):
    """datatrove's MinhashConfig for `dedup.threshold`."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    buckets = max(1, round(cfg.dedup.threshold ** -HASHES_PER_BUCKET))
    return MinhashConfig(n_grams=cfg.dedup.n_grams, num_buckets=buckets, hashes_per_bucket=HASHES_PER_BUCKET,
                         seed=cfg.seed + 1)


def candidates(out: Path) -> set[tuple[str, int]]:
    """(kind, pool position) of the mix candidates, as the filter stage wrote them."""
    return {(r["kind"], r["pos"]) for r in files.read_jsonl(files.stage_dir(out, "dedup") / "candidates.jsonl")}


class _OutStep(PipelineStep):
    """A step that works in OUT."""

    type = "♻️ REWIRE"

    def __init__(self, out: Path):
        super().__init__()
        self.out = Path(out)


class CandidateReader(_OutStep):
    """The mix candidates as datatrove documents (id `raw/<pos>` or `rewrite/<pos>`), in pool order."""

    name = "candidates"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        die_with_parent()
        chosen = candidates(self.out)
        rewrites = files.read_shards(self.out, "rewrite")
        for src in files.read_shards(self.out, "classify"):
            rw = next(rewrites)
            if ("raw", src["pos"]) in chosen:
                yield Document(text=src["text"], id=f"raw/{src['pos']}")
            if ("rewrite", src["pos"]) in chosen:
                yield Document(text=rw["text"], id=f"rewrite/{src['pos']}")


class KeptRecorder(_OutStep):
    """Writes the ids of the documents that pass the MinHash filter to `dedup/kept.jsonl`."""

    name = "kept"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        rows = []
        for doc in data:
            kind, pos = doc.id.split("/")
            rows.append({"kind": kind, "pos": int(pos)})
            self.stat_update("kept")
        files.write_jsonl(files.stage_dir(self.out, "dedup") / "kept.jsonl", rows)
        yield from ()


def pipelines(cfg: RewireConfig, out: Path) -> list[tuple[str, list, int]]:
    """(step name, datatrove pipeline, tasks) of the four MinHash stages."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    mh = minhash_config(cfg)
    d = files.stage_dir(out, "dedup")
    return [
        ("dedup-signatures", [CandidateReader(out), MinhashDedupSignature(output_folder=str(d / "signatures"),
                                                                          config=mh)], 1),
        ("dedup-buckets", [MinhashDedupBuckets(input_folder=str(d / "signatures"), output_folder=str(d / "buckets"),
                                               config=mh)], mh.num_buckets),
        ("dedup-clusters", [MinhashDedupCluster(input_folder=str(d / "buckets"), output_folder=str(d / "remove"),
                                                config=mh)], 1),
        ("dedup-filter", [CandidateReader(out), RemovalGuard(out), MinhashDedupFilter(input_folder=str(d / "remove")),
                          KeptRecorder(out)], 1),
    ]


class RemovalGuard(_OutStep):
    """Runs `before_filter` when the executor assembles the filter pipeline: eagerly, because the
    MinHash filter looks for its removal file before it reads its first document."""

    name = "removal guard"

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        before_filter(self.out)
        return data

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        return data


def before_filter(out: Path) -> None:
    """The cluster stage finished: make its removal file exist (empty: nothing to remove)."""
    remove = files.stage_dir(out, "dedup") / "remove" / f"{0:06d}.remove"
    if not (files.logging_dir(out, "dedup-clusters") / "completions" / f"{0:05d}").is_file():
        from scaleforge.errors import ScaleforgeError

        raise ScaleforgeError("dedup: the cluster stage has not finished, so its removals are unknown: rerun")
    if not remove.is_file():
        remove.parent.mkdir(parents=True, exist_ok=True)
        remove.write_bytes(b"")


def summary(out: Path) -> dict:
    """What dedup removed, by kind."""
    chosen = candidates(out)
    kept = {(r["kind"], r["pos"]) for r in files.read_jsonl(files.stage_dir(out, "dedup") / "kept.jsonl")}
    removed = chosen - kept
    return {"candidates": len(chosen), "removed": len(removed),
            "removed_raw": sum(k == "raw" for k, _ in removed),
            "removed_rewrites": sum(k == "rewrite" for k, _ in removed)}
