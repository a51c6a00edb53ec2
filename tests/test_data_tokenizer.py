"""Byte-level BPE: lossless round trip, deterministic training, cache by corpus hash, user files."""

from __future__ import annotations

import pytest

from scaleforge.data_pipeline import corpus
from scaleforge.data_pipeline import tokenizer as T
from scaleforge.data_pipeline.store import store_path
from scaleforge.errors import DataError


@pytest.fixture(scope="module")
def texts():
    """Real text: 20 King James chapters, a play's opening, a speech with non-ASCII characters."""
    sotu, shakespeare, kjv = corpus.bundled_sources()
    docs = [t for _, (_k, t) in zip(range(20), kjv.documents())]
    play = next(t for _k, t in shakespeare.documents())
    speech = next(t for _k, t in sotu.documents() if any(ord(c) > 127 for c in t))
    return docs + [play[:30000], speech]


def test_round_trip_is_lossless(texts):
    tok = T.train_bpe(texts, vocab_size=400)
    assert T.vocab_size(tok) == 400 and T.eot_id(tok) == 0
    for text in texts + ["  odd\tspacing \u00e9\u00e8 \u4e2d\u6587 emoji \U0001F600\n\n"]:
        assert tok.decode(tok.encode(text).ids) == text
    # Bytes never seen in training still encode (the byte alphabet is complete).
    assert tok.decode(tok.encode("\u0416\u0436 \u00fe").ids) == "\u0416\u0436 \u00fe"


def test_training_is_deterministic(texts):
    a = T.train_bpe(texts, vocab_size=350)
    b = T.train_bpe(list(texts), vocab_size=350)
    assert T.tokenizer_hash(a) == T.tokenizer_hash(b)
    assert T.tokenizer_hash(a) != T.tokenizer_hash(T.train_bpe(texts, vocab_size=351))


def test_cache_hit_by_corpus_hash(texts, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEFORGE_HOME", str(tmp_path / "home"))
    assert T.scaleforge_home() == tmp_path / "home"
    assert store_path("bundled") == tmp_path / "home" / "stores" / "bundled"
    first = T.cached_bpe("corpus-a", iter(texts), 300)
    assert not first.cache_hit and first.path.is_file()
    assert first.path.is_relative_to(tmp_path / "home")

    def must_not_be_read():
        raise AssertionError("a cache hit must not read the corpus")
        yield ""

    again = T.cached_bpe("corpus-a", must_not_be_read(), 300)
    assert again.cache_hit and T.tokenizer_hash(again.tokenizer) == T.tokenizer_hash(first.tokenizer)
    assert not T.cached_bpe("corpus-b", iter(texts), 300).cache_hit
    assert not T.cached_bpe("corpus-a", iter(texts), 301).cache_hit


def test_user_tokenizer_files(texts, tmp_path):
    tok = T.train_bpe(texts, vocab_size=300)
    good = tmp_path / "tokenizer.json"
    good.write_text(tok.to_str())
    assert T.tokenizer_hash(T.load_tokenizer(good)) == T.tokenizer_hash(tok)
    # Without a document separator the tokenizer cannot be used.
    from tokenizers import Tokenizer, models, pre_tokenizers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    (tmp_path / "bare.json").write_text(bare.to_str())
    with pytest.raises(DataError, match="no document separator"):
        T.load_tokenizer(tmp_path / "bare.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        T.load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(DataError, match="too small"):
        T.train_bpe(texts, vocab_size=100)
