"""The zarr v3 token store: tokenized documents split by document into train and validation.

Layout of a store directory:
```
zarr.json                  root group; its attributes are the store's metadata (below)
tokenizer.json             the tokenizer that made the ids (its sha256 is in the metadata)
train/tokens               1-D uint16 (uint32 when vocab > 65535), zstd chunks of `chunk_tokens`;
                           each document's ids followed by the separator id
train/doc_offsets          1-D int64, documents + 1 entries: where each document starts in tokens
validation/tokens, validation/doc_offsets
```
Metadata: format and version, tokenizer (sha256, vocab size, separator id), corpus manifest
(sources with sha256), split (seed, fraction, validation documents), per split the document and
token counts, a sha256 of every chunk file, ingestion progress, and the store identity.

Ingestion commits documents in batches: the batch's chunks are written first, then the metadata,
whose write (one atomic file replace) is the commit. A restart truncates the arrays to the
committed counts and continues with the next document, so a killed ingestion loses and
duplicates nothing; the result equals an uninterrupted one byte for byte.

Reading verifies each chunk file against its sha256 the first time it is read (2.5 ms for a
1 Mi-token chunk of 1.3 MB, less than decoding it) and `verify()` checks them all; a mismatch
raises a DataError naming the chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaleforge.data_pipeline import counter_hash
from scaleforge.data_pipeline import tokenizer as tok_mod
from scaleforge.errors import DataError

FORMAT = "scaleforge-token-store"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
BUNDLED = "bundled"
DEFAULT_CHUNK_TOKENS = 1 << 20
OFFSETS_CHUNK = 1 << 16
TOKENIZER_FILE = "tokenizer.json"
# Decoded chunks kept per store; 256 MiB of uint16 at the default chunk size.
CACHE_BYTES = 256 << 20


def store_path(path_or_name: str | Path) -> Path:
    """`bundled` -> $SCALEFORGE_HOME/stores/bundled; anything else is a directory path."""
    if str(path_or_name) == BUNDLED:
        return tok_mod.scaleforge_home() / "stores" / BUNDLED
    return Path(path_or_name).expanduser()


def read_metadata(path: Path) -> dict | None:
    """The store metadata at `path`, or None when there is no scaleforge store there."""
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        return None
    try:
        node = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"data store {path}: unreadable zarr.json ({exc})") from None
    attrs = node.get("attributes", {}) if isinstance(node, dict) else {}
    if attrs.get("format") != FORMAT:
        raise DataError(
            f"{path} is a zarr node but not a scaleforge token store: point data.stores at a store"
        )
    if attrs.get("version") != FORMAT_VERSION:
        raise DataError(
            f"data store {path} has format version {attrs.get('version')}, this scaleforge reads "
            f"{FORMAT_VERSION}: rebuild it with `python -m scaleforge.data_pipeline.prepare`"
        )
    return attrs


def open_store(path_or_name: str | Path) -> TokenStore:
    """Open a complete token store (a path, or `bundled`)."""
    path = store_path(path_or_name)
    meta = read_metadata(path)
    if meta is None:
        raise DataError(
            f"data store {path} not found: run `python -m scaleforge.data_pipeline.prepare` "
            "or point data.stores at a store"
        )
    ingest = meta["ingest"]
    if not ingest["complete"]:
        raise DataError(
            f"data store {path} is incomplete ({ingest['documents_committed']} of "
            f"{ingest['documents_total']} documents ingested): rerun "
            "`python -m scaleforge.data_pipeline.prepare` with the same arguments to finish it"
        )
    return TokenStore(path, meta)


def chunk_file(path: Path, array: str, index: int) -> Path:
    """The file holding chunk `index` of a 1-D array (zarr v3 default key encoding `c/<i>`)."""
    return path / array / "c" / str(index)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TokenStore:
    """Read access to a complete store: token windows, documents, tokenizer, verification."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self._arrays: dict[str, object] = {}
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._offsets: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_tokens(s):,}" for s in SPLITS)
        return f"TokenStore({str(self.path)!r}, vocab={self.vocab_size}, tokens: {counts})"

    # -- identity and counts -------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """sha256 over the tokenizer, corpus, split and every chunk checksum: changes with any id."""
        return self.meta["identity"]

    @property
    def tokenizer_sha256(self) -> str:
        """The tokenizer's identity (sha256 of its canonical JSON)."""
        return self.meta["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, special tokens included."""
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        """The document separator id."""
        return int(self.meta["tokenizer"]["eot_id"])

    @property
    def dtype(self) -> np.dtype:
        """Token dtype on disk."""
        return np.dtype(self.meta["dtype"])

    @property
    def chunk_tokens(self) -> int:
        """Tokens per chunk of the tokens arrays."""
        return int(self.meta["chunk_tokens"])

    def num_tokens(self, split: str = "train") -> int:
        """Tokens in a split, separators included."""
        return int(self.meta["splits"][_check_split(split)]["tokens"])

    def num_documents(self, split: str = "train") -> int:
        """Documents in a split."""
        return int(self.meta["splits"][_check_split(split)]["documents"])

    def tokenizer(self):
        """The `tokenizers.Tokenizer` that made this store's ids (checked against its sha256)."""
        file = self.path / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(f"data store {self.path}: {TOKENIZER_FILE} is missing: rebuild the store")
        tok = tok_mod.from_json(file.read_text(encoding="utf-8"))
        if tok_mod.tokenizer_hash(tok) != self.tokenizer_sha256:
            raise DataError(
                f"data store {self.path}: {TOKENIZER_FILE} does not match the tokenizer sha256 "
                "recorded in the store (the file was changed): rebuild the store"
            )
        return tok

    # -- reading -------------------------------------------------------------------------------

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of a split's stream (a copy when it spans chunks)."""
        n = self.num_tokens(split)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"token range [{start}, {stop}) outside {split} split of {n} tokens")
        if stop == start:
            return np.empty(0, dtype=self.dtype)
        c = self.chunk_tokens
        first, last = start // c, (stop - 1) // c
        if first == last:
            base = first * c
            return self._chunk(f"{split}/tokens", first)[start - base : stop - base]
        parts = []
        for i in range(first, last + 1):
            base = i * c
            chunk = self._chunk(f"{split}/tokens", i)
            parts.append(chunk[max(start - base, 0) : min(stop - base, c)])
        return np.concatenate(parts)

    def doc_offsets(self, split: str = "train") -> np.ndarray:
        """int64 [documents + 1]: where each document starts in the split's tokens (verified)."""
        split = _check_split(split)
        if split not in self._offsets:
            name = f"{split}/doc_offsets"
            nchunks = len(self.meta["chunks"][name])
            parts = [self._chunk(name, i, cache=False) for i in range(nchunks)]
            offsets = np.concatenate(parts)[: self.num_documents(split) + 1].astype(np.int64)
            self._offsets[split] = offsets
        return self._offsets[split]

    def document(self, split: str, index: int) -> np.ndarray:
        """The ids of one document, its trailing separator included."""
        offsets = self.doc_offsets(split)
        return self.read(split, int(offsets[index]), int(offsets[index + 1]))

    def iter_chunks(self, split: str) -> Iterator[np.ndarray]:
        """The split's tokens chunk by chunk (verified), without filling the cache."""
        n = self.num_tokens(split)
        c = self.chunk_tokens
        for i in range(len(self.meta["chunks"][f"{split}/tokens"])):
            yield self._chunk(f"{split}/tokens", i, cache=False)[: max(0, min(c, n - i * c))]

    def verify(self) -> None:
        """Check every chunk file against its sha256, the tokenizer, and the document offsets."""
        self.tokenizer()
        for name, sums in self.meta["chunks"].items():
            for i in range(len(sums)):
                self._chunk(name, i, cache=False)
        for split in SPLITS:
            offsets = self.doc_offsets(split)
            if offsets[0] != 0 or offsets[-1] != self.num_tokens(split) or np.any(np.diff(offsets) < 1):
                raise DataError(
                    f"data store {self.path}: {split}/doc_offsets are inconsistent: rebuild the store"
                )
            ends = offsets[1:] - 1
            c = self.chunk_tokens
            for i, chunk in enumerate(self.iter_chunks(split)):
                local = ends[(ends >= i * c) & (ends < (i + 1) * c)] - i * c
                if np.any(chunk[local] != self.eot_id):
                    raise DataError(
                        f"data store {self.path}: a {split} document in chunk {i} does not end with the "
                        "separator: rebuild the store"
                    )

    def _array(self, name: str):
        if name not in self._arrays:
            import zarr

            self._arrays[name] = zarr.open_array(self.path / name, mode="r")
        return self._arrays[name]

    def _chunk(self, name: str, index: int, cache: bool = True) -> np.ndarray:
        key = (name, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        sums = self.meta["chunks"].get(name)
        if sums is None or not 0 <= index < len(sums):
            raise DataError(f"data store {self.path}: no chunk {index} in array {name}")
        file = chunk_file(self.path, name, index)
        where = f"data store {self.path}: chunk {index} of array {name} ({name}/c/{index})"
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{where} is missing: rebuild the store") from None
        if hashlib.sha256(raw).hexdigest() != sums[index]:
            raise DataError(f"{where} is corrupt (sha256 mismatch, {len(raw)} bytes): rebuild the store")
        array = self._array(name)
        size = array.chunks[0]
        try:
            data = np.asarray(array[index * size : min((index + 1) * size, array.shape[0])])
        except Exception as exc:  # a checksum-valid chunk that zarr cannot decode: wrong codec
            raise DataError(f"{where} cannot be decoded ({type(exc).__name__}): rebuild the store") from None
        data.setflags(write=False)  # callers get views of cached chunks: keep them intact
        if cache:
            self._cache[key] = data
            self._cache_bytes += data.nbytes
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return data


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


# ----------------------------------------------------------------------------------------------
# the validation split


def validation_mask(n_docs: int, seed: int, fraction: float, min_docs: int) -> np.ndarray:
    """bool [n_docs]: which documents go to validation. A pure function of its arguments.

    round(fraction * n_docs) documents, at least `min_docs`, at most half of them; the documents
    with the smallest keyed hashes of their index are chosen.
    """
    if n_docs < 2:
        raise DataError(
            f"the corpus has {n_docs} document(s); a split by document needs at least 2: "
            "pass more files (or a JSONL file with one document per line)"
        )
    n_val = min(max(int(round(fraction * n_docs)), min_docs), n_docs // 2)
    scores = counter_hash.hash_u64(counter_hash.key(seed, 0x5B117), np.arange(n_docs))
    chosen = np.argsort(scores, kind="stable")[:n_val]
    mask = np.zeros(n_docs, dtype=bool)
    mask[chosen] = True
    return mask


# ----------------------------------------------------------------------------------------------
# stats


def unigram_entropy_nats(store: TokenStore, split: str = "validation") -> float:
    """Entropy of the split's token distribution, in nats per token (from the token counts).

    A model that learned only token frequencies reaches this loss; a trained model should beat it.
    """
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for chunk in store.iter_chunks(split):
        counts += np.bincount(chunk, minlength=store.vocab_size)[: store.vocab_size]
    total = counts.sum()
    if total == 0:
        raise DataError(f"data store {store.path}: the {split} split is empty")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def remove_partial_files(path: Path) -> int:
    """Delete temporary files an interrupted atomic write left behind (zarr's `*.partial`)."""
    removed = 0
    for f in path.rglob("*.partial"):
        f.unlink(missing_ok=True)
        removed += 1
    for f in path.glob(f"{TOKENIZER_FILE}.*.tmp"):
        f.unlink(missing_ok=True)
        removed += 1
    return removed


@dataclass(kw_only=True, frozen=True)
class SplitConfig:
    """How documents are divided between train and validation."""

    seed: int = 0
    """Seed of the document split."""
    validation_fraction: float = 0.01
    """Fraction of documents held out for validation."""
    min_validation_docs: int = 4
    """At least this many validation documents (but never more than half of all documents)."""

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise DataError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.min_validation_docs < 1:
            raise DataError(f"min_validation_docs must be >= 1, got {self.min_validation_docs}")
        if self.seed < 0:
            raise DataError(f"split seed must be >= 0, got {self.seed}")
