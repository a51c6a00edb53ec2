"""TokenSampler: a deterministic, epoch-aware, mixable, data-parallel-shardable sample stream."""

from __future__ import annotations

import time

import numpy as np
import pytest

from scaleforge.data_pipeline import corpus
from scaleforge.data_pipeline.ingest import ingest
from scaleforge.data_pipeline.sampler import MIX_BLOCK, DPShard, TokenSampler, rank_rows
from scaleforge.data_pipeline.store import SplitConfig, open_store
from scaleforge.data_pipeline.tokenizer import train_bpe
from scaleforge.errors import DataError

SEQ = 32


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two real stores sharing one tokenizer (King James chapters; speeches), and one with another."""
    root = tmp_path_factory.mktemp("corpus")
    sotu, _shakespeare, kjv = corpus.bundled_sources()
    for name, source, lo, hi in (("kjv", kjv, 0, 30), ("sotu", sotu, 0, 4), ("psalms", kjv, 478, 500)):
        (root / name).mkdir()
        for i, (_key, text) in enumerate(source.documents()):
            if i == hi:
                break
            if i >= lo:
                (root / name / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    sources = {name: corpus.path_sources([root / name]) for name in ("kjv", "sotu", "psalms")}
    texts = [t for s in sources.values() for _, _, t in corpus.iter_documents(s)]
    tok = train_bpe(texts, vocab_size=500)
    out = {}
    split = SplitConfig(validation_fraction=0.1, min_validation_docs=2)
    for name, src in sources.items():
        path = tmp_path_factory.mktemp(name) / "store"
        ingest(path, src, tok, split=split, chunk_tokens=2048)
        out[name] = open_store(path)
    other = tmp_path_factory.mktemp("other") / "store"
    ingest(other, sources["sotu"], train_bpe(texts, vocab_size=400), split=split, chunk_tokens=2048)
    out["other_tokenizer"] = open_store(other)
    return out


def _all_windows(store, split="train", seq=SEQ) -> np.ndarray:
    n = (store.num_tokens(split) - 1) // seq
    return np.stack([store.read(split, w * seq, w * seq + seq + 1) for w in range(n)]).astype(np.int64)


def _rows(a: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in a]


def test_windows_are_the_store_tokens_and_deterministic(stores):
    store = stores["kjv"]
    a = TokenSampler([store], None, SEQ, seed=5).samples(100, 16)
    b = TokenSampler([store], None, SEQ, seed=5).samples(100, 16)
    c = TokenSampler([store], None, SEQ, seed=6).samples(100, 16)
    assert a.dtype == np.int64 and a.shape == (16, SEQ + 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    windows = set(_rows(_all_windows(store)))
    assert all(r in windows for r in _rows(a))


def test_every_window_exactly_once_per_epoch(stores):
    store = stores["kjv"]
    sampler = TokenSampler([store], None, SEQ, seed=11)
    n = sampler.samples_per_epoch
    assert n == (store.num_tokens("train") - 1) // SEQ
    expected = sorted(_rows(_all_windows(store)))
    two = sampler.samples(0, 2 * n)
    first, second = two[:n], two[n:]
    assert sorted(_rows(first)) == expected
    assert sorted(_rows(second)) == expected
    assert not np.array_equal(first, second)  # each epoch has a fresh order
    # An epoch boundary inside one request is the same as two requests.
    assert np.array_equal(sampler.samples(n - 3, 6), two[n - 3 : n + 3])
    assert sampler.epochs(n) == [1.0]


def test_resume_from_any_position_continues_the_stream(stores):
    store = stores["kjv"]
    sampler = TokenSampler([store], None, SEQ, seed=2)
    whole = sampler.samples(0, 300)
    state = sampler.state_dict()
    resumed = TokenSampler([open_store(store.path)], None, SEQ, seed=2)
    resumed.load_state_dict(state)
    parts = [resumed.samples(0, 37), resumed.samples(37, 100), resumed.samples(137, 163)]
    assert np.array_equal(np.concatenate(parts), whole)


def test_dp_ranks_partition_the_global_batch(stores):
    sampler = TokenSampler([stores["kjv"], stores["sotu"]], [0.5, 0.5], SEQ, seed=4)
    global_batch, step = 24, 7
    full = sampler.samples(step * global_batch, global_batch)
    for dp in (1, 2, 3, 4, 6):
        ranks = [sampler.batch(step, global_batch, r, dp) for r in range(dp)]
        assert np.array_equal(np.concatenate(ranks), full)
        rows = [list(DPShard(dp_rank=r, dp_size=dp).rows(global_batch)) for r in range(dp)]
        assert sorted(sum(rows, [])) == list(range(global_batch))
    # A resume under another data-parallel size reads the very same global batches.
    assert np.array_equal(np.concatenate([sampler.batch(step, global_batch, r, 2) for r in range(2)]),
                          np.concatenate([sampler.batch(step, global_batch, r, 4) for r in range(4)]))
    with pytest.raises(DataError, match="not divisible"):
        rank_rows(10, 0, 4)


def test_mixture_proportions_hold_in_every_window(stores):
    kjv, sotu = stores["kjv"], stores["sotu"]
    weights = [0.3, 0.7]
    sampler = TokenSampler([kjv, sotu], weights, SEQ, seed=9)
    kjv_windows = set(_rows(_all_windows(kjv)))
    sotu_windows = set(_rows(_all_windows(sotu)))
    assert not kjv_windows & sotu_windows
    start, count = 12345, 2000
    from_kjv = np.array([r in kjv_windows for r in _rows(sampler.samples(start, count))])
    assert all(r in kjv_windows or r in sotu_windows for r in _rows(sampler.samples(start, 50)))
    # Every run of 100 consecutive samples holds 30 +- 2 from the first store, across block edges.
    runs = np.convolve(from_kjv.astype(int), np.ones(100, dtype=int), mode="valid")
    assert runs.min() >= 28 and runs.max() <= 32
    assert abs(from_kjv.mean() - 0.3) < 0.005
    # No weights: proportional to the stores' train tokens.
    auto = TokenSampler([kjv, sotu], None, SEQ, seed=9)
    share = kjv.num_tokens("train") / (kjv.num_tokens("train") + sotu.num_tokens("train"))
    assert auto.weights[0] == pytest.approx(share)
    # A long run: each store's epochs advance at its own pace, each still a permutation.
    n_total = 3 * MIX_BLOCK
    epochs = sampler.epochs(n_total)
    assert epochs[0] == pytest.approx(n_total * 0.3 / sampler.windows(0), rel=1e-3)


def test_three_store_mixture_in_every_window(stores):
    names = ("kjv", "sotu", "psalms")
    weights = [0.2, 0.5, 0.3]
    sampler = TokenSampler([stores[n] for n in names], weights, SEQ, seed=21)
    windows = [set(_rows(_all_windows(stores[n]))) for n in names]
    assert not (windows[0] & windows[1]) and not (windows[0] & windows[2]) and not (windows[1] & windows[2])
    rows = _rows(sampler.samples(MIX_BLOCK - 700, 1500))  # spans a block edge
    owner = np.array([[r in w for w in windows] for r in rows])
    assert np.all(owner.sum(axis=1) == 1)
    for s, w in enumerate(weights):
        runs = np.convolve(owner[:, s].astype(int), np.ones(100, dtype=int), mode="valid")
        assert runs.min() >= 100 * w - 2 and runs.max() <= 100 * w + 2


def test_state_mismatch_is_refused(stores):
    kjv, sotu = stores["kjv"], stores["sotu"]
    state = TokenSampler([kjv, sotu], [0.5, 0.5], SEQ, seed=1).state_dict()
    with pytest.raises(DataError, match="data stores differ"):
        TokenSampler([sotu, kjv], [0.5, 0.5], SEQ, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        TokenSampler([kjv, sotu], [0.5, 0.5], SEQ, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        TokenSampler([kjv, sotu], [0.5, 0.5], SEQ * 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="weights"):
        TokenSampler([kjv, sotu], [0.4, 0.6], SEQ, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="different tokenizers"):
        TokenSampler([kjv, stores["other_tokenizer"]], None, SEQ, seed=1)
    with pytest.raises(DataError, match="fewer than one sample"):
        TokenSampler([kjv], None, kjv.num_tokens("validation"), seed=1, split="validation")


def test_validation_split_stream(stores):
    store = stores["sotu"]
    val = TokenSampler([store], None, SEQ, seed=3, split="validation").samples(0, 8)
    windows = set(_rows(_all_windows(store, "validation")))
    assert all(r in windows for r in _rows(val))


def test_global_batch_is_fast(stores):
    store = stores["sotu"]
    sampler = TokenSampler([store, stores["kjv"]], [0.5, 0.5], 256, seed=0)
    sampler.samples(0, 4096)  # touch (and verify) every chunk once
    times = []
    for step in range(30):
        t0 = time.perf_counter()
        sampler.samples(step * 64, 64)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.010
