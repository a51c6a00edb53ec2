"""REWIRE's deduplication: exact-duplicate prompts are sent once, datatrove's MinHash stages remove
near duplicates among the mix candidates (counted in the report), and the filter stage never runs
on a missing removal file. The generator is an echo (the reply is the document): no model needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaleforge.errors import ScaleforgeError


class Echo:
    """A generator whose reply is the document itself; records what it was asked."""

    description = {"backend": "echo", "model": "none"}

    def __init__(self):
        self.asked: list[str] = []

    def generate(self, requests, cfg, seed):
        from scaleforge.data_pipeline.rewire.backends import Generation

        docs = [r[-1]["content"].split("\n\n", 1)[-1] for r in requests]
        self.asked += docs
        return [Generation(text=d, finish_reason="stop", tokens=len(d.split())) for d in docs]


def test_duplicates_sent_once_and_near_duplicates_removed(tiny_store, tmp_path):
    from scaleforge.config import from_dict
    from scaleforge.data_pipeline.rewire import files, pipeline
    from scaleforge.data_pipeline.rewire.config import RewireConfig

    from scaleforge.data_pipeline.rewire import texts as texts_mod
    from scaleforge.data_pipeline.rewire.config import TextSet

    texts = [d.text for d in texts_mod.read(TextSet(store=str(tiny_store), count=6, max_chars=600), "t")]
    pool = tmp_path / "pool.jsonl"
    rows = texts + [texts[1], texts[3]]  # two exact duplicates at the end of the pool
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    ft = {"dim": 16, "bucket": 4096, "epochs": 5, "lr": 0.5}
    body = {
        "pool": {"reader": "jsonl", "paths": [str(pool)]},
        "classify": {"positives": [{"store": str(tiny_store), "start": 8, "count": 8, "max_chars": 300}],
                     "negatives": [{"store": str(tiny_store), "start": 16, "count": 8, "max_chars": 300}],
                     "fasttext": ft},
        "rewrite": {"batch_size": 2, "shard_size": 4},
        "filter": {"keep_fraction": 1.0, "fasttext": ft, "repetition": False},
        "mix": {"raw_fraction": 1.0, "raw_share": 1.0, "validation_fraction": 0.2, "tokenizer": str(tiny_store)},
    }
    cfg = from_dict(RewireConfig, body)
    echo = Echo()
    out = tmp_path / "out"
    report = pipeline.run(cfg, out, generator=echo, echo=lambda _m: None)
    # The duplicates were not sent: six prompts, one per distinct document.
    assert sorted(echo.asked) == sorted(texts)
    assert report["filter"]["dropped"] == {"duplicate_prompt": 2}
    # Classifier metrics on held-out texts: a fifth of each set (8 positives, 6 negatives) held out.
    h = report["classify"]["held_out"]
    assert (report["classify"]["positives"], h["positives"]) == (6, 2)
    assert (report["classify"]["negatives"], h["negatives"]) == (5, 1) and 0 <= h["auc"] <= 1
    # The rewrite classifier: two folds of the 6 survivors, each scored by the other fold's model.
    assert report["filter"]["negatives"] == [3, 3] and len(report["filter"]["held_out"]) == 2
    # Every kept rewrite equals its raw document: MinHash removes one of each pair (and the two raw
    # duplicates): 8 raw + 6 rewrites in, 6 distinct texts left.
    d = report["dedup"]
    assert d["candidates"] == 14 and d["removed"] == 8, d
    kept = files.read_jsonl(out / "dedup" / "kept.jsonl")
    assert len(kept) == 6
    m = report["mix"]
    assert m["raw_documents"] + m["rewritten_documents"] == m["train_documents"] + m["validation_documents"] == 6


def test_filter_refuses_to_run_before_the_clusters(tmp_path):
    from scaleforge.data_pipeline.rewire import dedup

    with pytest.raises(ScaleforgeError, match="cluster stage has not finished"):
        dedup.before_filter(tmp_path)
    done = tmp_path / "logs" / "dedup-clusters" / "completions"
    done.mkdir(parents=True)
    (done / "00000").write_text("")
    dedup.before_filter(tmp_path)
    assert (tmp_path / "dedup" / "remove" / "000000.remove").read_bytes() == b""


def test_dedup_threshold_sets_the_buckets(tmp_path):
    from scaleforge.config import from_dict
    from scaleforge.data_pipeline.rewire import dedup
    from scaleforge.data_pipeline.rewire.config import RewireConfig
    from scaleforge.errors import ConfigError

    base = {"pool": {"store": "bundled"}, "classify": {"positives": [{"store": "bundled"}],
                                                     "negatives": [{"store": "bundled"}]}}
    assert dedup.minhash_config(from_dict(RewireConfig, base)).num_buckets == 14
    assert dedup.minhash_config(from_dict(RewireConfig, {**base, "dedup": {"threshold": 1.0}})).num_buckets == 1
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match=r"dedup.threshold must be in \(0, 1\]"):
            from_dict(RewireConfig, {**base, "dedup": {"threshold": bad}})
    assert Path(tmp_path).is_dir()
