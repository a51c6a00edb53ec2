"""Shared fixtures (keep small; add fixtures additively)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A real token store: 24 State of the Union speeches, a 512-token BPE, 2+ validation docs."""
    from scaleforge.data_pipeline import corpus
    from scaleforge.data_pipeline.ingest import ingest
    from scaleforge.data_pipeline.store import SplitConfig
    from scaleforge.data_pipeline.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny_corpus")
    sotu = corpus.bundled_sources()[0]
    texts = [text for _key, text in sotu.documents() if text.strip()][:24]
    for i, text in enumerate(texts):
        (root / f"doc{i:02d}.txt").write_text(text)
    sources = corpus.path_sources([root])
    tokenizer = train_bpe(texts, vocab_size=512)
    path = tmp_path_factory.mktemp("tiny_store") / "store"
    ingest(path, sources, tokenizer,
           split=SplitConfig(validation_fraction=0.1, min_validation_docs=2), log=lambda _m: None)
    return path


def rank_env(threads: int = 1) -> dict[str, str]:
    """Environment for launched ranks: one OpenMP thread each (2 ranks share 2 cores)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    return env
