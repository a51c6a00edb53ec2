"""`python -m scaleforge.data_pipeline.prepare`: user text, idempotence, errors; the bundled store."""

from __future__ import annotations

import time

import numpy as np
import pytest

from scaleforge.data_pipeline import corpus, prepare
from scaleforge.data_pipeline.sampler import TokenSampler
from scaleforge.data_pipeline.store import open_store, read_metadata, store_path, unigram_entropy_nats


@pytest.fixture()
def user_text(tmp_path, monkeypatch):
    """A directory of real documents (speeches as .txt and .md) and a private SCALEFORGE_HOME."""
    monkeypatch.setenv("SCALEFORGE_HOME", str(tmp_path / "home"))
    root = tmp_path / "text"
    (root / "nested").mkdir(parents=True)
    sotu = corpus.bundled_sources()[0]
    for i, (_key, text) in enumerate(sotu.documents()):
        if i == 8:
            break
        (root / ("nested" if i % 2 else "") / f"s{i}.{'md' if i % 3 else 'txt'}").write_text(text)
    (root / "ignored.csv").write_text("a,b\n1,2\n")
    return root


def test_prepare_user_text_then_noop(user_text, tmp_path, capsys):
    out = tmp_path / "store"
    args = ["--input", str(user_text), "--out", str(out), "--vocab-size", "512"]
    assert prepare.main(args) == 0
    assert "built" in capsys.readouterr().out
    store = open_store(out)
    assert store.vocab_size == 512 and store.num_documents("train") + store.num_documents("validation") == 8
    assert read_metadata(out)["corpus"]["sources"][0]["documents"] == 8
    t0 = time.perf_counter()
    assert prepare.main(args) == 0
    print(f"prepare, up to date: {time.perf_counter() - t0:.2f} s")  # measured, not asserted
    assert "up to date" in capsys.readouterr().out
    # The tokenizer came from the cache under SCALEFORGE_HOME and is stored in the store.
    assert list((tmp_path / "home" / "tokenizers").glob("*/tokenizer.json"))
    assert open_store(out).tokenizer().to_str() == store.tokenizer().to_str()


def test_prepare_errors_are_one_line(user_text, tmp_path, capsys):
    assert prepare.main(["--input", str(user_text)]) == 2
    assert "--input needs --out" in capsys.readouterr().err
    out = tmp_path / "store"
    assert prepare.main(["--input", str(user_text), "--out", str(out), "--vocab-size", "300"]) == 0
    capsys.readouterr()
    assert prepare.main(["--input", str(user_text), "--out", str(out), "--vocab-size", "400"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vocabulary 300" in err and err.count("\n") == 1


def test_bundled_store_when_built():
    """The set-up builds `bundled` once; check it when it is there (never rebuilt here)."""
    path = store_path("bundled")
    if read_metadata(path) is None:
        pytest.skip(f"bundled store not built at {path}: run `python -m scaleforge.data_pipeline.prepare`")
    store = open_store("bundled")
    assert store.vocab_size == 8192 and store.dtype == np.uint16
    assert 4.5e6 < store.num_tokens("train") < 6.5e6
    assert store.num_documents("validation") >= 4
    sampler = TokenSampler([store], None, 256, seed=0)
    batch = sampler.samples(0, 64)
    assert batch.shape == (64, 257) and batch.max() < store.vocab_size
    # A unigram model of this text costs a little over 6 nats per token; uniform would be ln 8192.
    assert 5.0 < unigram_entropy_nats(store) < np.log(8192)
