"""Byte-level BPE tokenizers: trained on a corpus (cached by corpus hash) or brought as tokenizer.json.

A tokenizer's identity is the sha256 of its canonical JSON (`Tokenizer.to_str()`), so the same
vocabulary has the same identity whether it was trained here or loaded from a file. Stores keep
the JSON itself, so a run always decodes its own ids.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from scaleforge.errors import DataError

EOT = "<|endoftext|>"
"""The document separator added to every trained vocabulary (id 0)."""
# Separators looked for, in order, in a tokenizer a user brings.
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
# Bumped when the training recipe changes, so cached tokenizers from an older recipe are not reused.
RECIPE_VERSION = 1
DEFAULT_VOCAB_SIZE = 8192


def scaleforge_home() -> Path:
    """The cache directory: $SCALEFORGE_HOME, default ~/.cache/scaleforge."""
    env = os.environ.get("SCALEFORGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scaleforge"


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the canonical JSON: the tokenizer's identity."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def eot_id(tokenizer) -> int:
    """Id of the document separator: `<|endoftext|>` or another common end-of-text token."""
    for name in EOT_CANDIDATES:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return int(tid)
    raise DataError(
        f"the tokenizer has no document separator token (looked for {', '.join(EOT_CANDIDATES)}): "
        f"add {EOT} as a special token to its tokenizer.json"
    )


def vocab_size(tokenizer) -> int:
    """Ids the model must embed: the vocabulary including added/special tokens."""
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file; it must have a document separator."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} not found: pass an existing tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{path}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
    eot_id(tok)
    return tok


def from_json(text: str):
    """A `tokenizers.Tokenizer` from its JSON text."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(
            f"vocab size {vocab_size} is too small: byte-level BPE needs at least 258 "
            "(256 bytes, the separator and one merge)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@dataclass(kw_only=True, frozen=True)
class CachedTokenizer:
    """A tokenizer found in (or just added to) the cache."""

    tokenizer: object
    """The `tokenizers.Tokenizer`."""
    path: Path
    """Its tokenizer.json in the cache."""
    cache_hit: bool
    """True when it was loaded from the cache rather than trained."""


def cache_path(corpus_sha256: str, vocab_size: int, home: Path | None = None) -> Path:
    """Where the BPE trained on a corpus (by hash) with a vocabulary size is cached."""
    key = hashlib.sha256(f"bpe-v{RECIPE_VERSION}\0{corpus_sha256}\0{vocab_size}".encode()).hexdigest()[:20]
    return (home or scaleforge_home()) / "tokenizers" / key / "tokenizer.json"


def cached_bpe(
    corpus_sha256: str, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, home: Path | None = None
) -> CachedTokenizer:
    """The BPE for this corpus hash and vocabulary size: from the cache, else trained and cached.

    `texts` is consumed only on a cache miss.
    """
    path = cache_path(corpus_sha256, vocab_size, home)
    if path.is_file():
        return CachedTokenizer(tokenizer=load_tokenizer(path), path=path, cache_hit=True)
    tok = train_bpe(texts, vocab_size)
    atomic_write_text(path, tok.to_str())
    return CachedTokenizer(tokenizer=tok, path=path, cache_hit=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
