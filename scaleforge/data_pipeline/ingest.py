"""Resumable ingestion: corpus documents -> token ids -> a zarr token store (see store.py).

Documents are tokenized and appended in batches. A batch's chunk files are written first and its
metadata (document count, token counts, chunk checksums) last; that one atomic file replace is the
commit. After a kill, a rerun with the same arguments truncates the arrays to the committed counts
and continues with the next document, so nothing is lost or duplicated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaleforge.data_pipeline import corpus as corpus_mod
from scaleforge.data_pipeline import tokenizer as tok_mod
from scaleforge.data_pipeline.store import (
    DEFAULT_CHUNK_TOKENS,
    FORMAT,
    FORMAT_VERSION,
    OFFSETS_CHUNK,
    SPLITS,
    TOKENIZER_FILE,
    SplitConfig,
    TokenStore,
    chunk_file,
    file_sha256,
    open_store,
    read_metadata,
    remove_partial_files,
    validation_mask,
)
from scaleforge.errors import DataError

# Text per commit: about 4 s of tokenizing at 1 M tokens/s and 3.9 bytes/token (measured on the
# bundled corpus), so a kill loses at most a few seconds of work.
DEFAULT_BATCH_BYTES = 4 << 20


@dataclass(kw_only=True, frozen=True)
class IngestResult:
    """What one call to `ingest` did."""

    store: TokenStore | None
    """The complete store (None when stopped early by `max_batches`)."""
    documents_before: int
    """Documents already committed when the call started (0 for a fresh store)."""
    documents_added: int
    """Documents this call committed."""
    complete: bool
    """True when every document of the corpus is in the store."""


def ingest(
    path: str | Path,
    sources: list[corpus_mod.Source],
    tokenizer,
    *,
    manifest: corpus_mod.Manifest | None = None,
    split: SplitConfig = SplitConfig(),
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    max_batches: int | None = None,
    log: Callable[[str], None] | None = None,
) -> IngestResult:
    """Tokenize `sources` into the store at `path`: create it, resume it, or (when complete) do nothing.

    An existing store made from another corpus, tokenizer or settings is an error, never overwritten.
    `max_batches` stops after that many commits (an interruption at a batch boundary).
    """
    import zarr

    path = Path(path)
    if chunk_tokens < 1 or batch_bytes < 1:
        raise DataError(f"chunk_tokens and batch_bytes must be positive, got {chunk_tokens}, {batch_bytes}")
    manifest = manifest or corpus_mod.manifest(sources)
    tok_json = tokenizer.to_str()
    wanted = _settings(manifest, tokenizer, split, chunk_tokens)

    # The split first: a corpus that cannot be split is refused before anything is written.
    mask = validation_mask(
        manifest.documents, split.seed, split.validation_fraction, split.min_validation_docs
    )
    meta = _start(path, sources, manifest, tok_json, wanted)
    if meta["ingest"]["complete"]:
        return IngestResult(store=open_store(path), documents_before=manifest.documents,
                            documents_added=0, complete=True)
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="a")
    arrays = _restore_arrays(path, root, meta)
    eot = tok_mod.eot_id(tokenizer)
    dtype = np.dtype(meta["dtype"])
    before = committed = int(meta["ingest"]["documents_committed"])
    if log and before:
        log(f"resuming {path} after {before} of {manifest.documents} documents")

    batches = 0
    batch: list[tuple[int, str]] = []
    size = 0
    for index, (_, _, text) in enumerate(corpus_mod.iter_documents(sources)):
        if index < committed:
            continue
        batch.append((index, text))
        size += len(text)
        if size >= batch_bytes:
            meta = _commit(path, root, arrays, meta, batch, mask, tokenizer, eot, dtype)
            committed += len(batch)
            batch, size = [], 0
            batches += 1
            if log:
                log(f"  {committed}/{manifest.documents} documents")
            if max_batches is not None and batches >= max_batches and committed < manifest.documents:
                return IngestResult(store=None, documents_before=before,
                                    documents_added=committed - before, complete=False)
    if batch:
        meta = _commit(path, root, arrays, meta, batch, mask, tokenizer, eot, dtype)
        committed += len(batch)
    if committed != manifest.documents:
        raise DataError(
            f"the corpus yielded {committed} documents but its manifest counted {manifest.documents}: "
            "the input changed during ingestion; rerun"
        )
    meta = copy.deepcopy(meta)
    meta["ingest"]["complete"] = True
    meta["ingest"]["fingerprint"] = corpus_mod.fingerprint(sources)
    meta["identity"] = _identity(meta)
    root.attrs.put(meta)
    return IngestResult(store=open_store(path), documents_before=before,
                        documents_added=committed - before, complete=True)


def _start(path: Path, sources, manifest, tok_json: str, wanted: dict) -> dict:
    """The store's metadata: a new store is created; an existing one must match `wanted`."""
    import zarr

    meta = read_metadata(path)
    if meta is None:
        _check_fresh(path)
        path.mkdir(parents=True, exist_ok=True)
        remove_partial_files(path)
        tok_mod.atomic_write_text(path / TOKENIZER_FILE, tok_json)
        meta = {
            **wanted,
            "chunks": {},
            "splits": {s: {"documents": 0, "tokens": 0} for s in SPLITS},
            "ingest": {"documents_total": manifest.documents, "documents_committed": 0, "complete": False},
        }
        zarr.open_group(zarr.storage.LocalStore(path), mode="a", attributes=meta)
        return meta
    _check_same(path, meta, wanted)
    if meta["ingest"]["complete"]:
        # Same content (checked above): remember the files' fingerprint so the next check is cheap.
        fingerprint = corpus_mod.fingerprint(sources)
        if meta["ingest"].get("fingerprint") != fingerprint:
            meta["ingest"]["fingerprint"] = fingerprint
            zarr.open_group(zarr.storage.LocalStore(path), mode="a").attrs.put(meta)
        return meta
    remove_partial_files(path)
    tok_file = path / TOKENIZER_FILE
    if not tok_file.is_file():
        tok_mod.atomic_write_text(tok_file, tok_json)  # same tokenizer (checked above): restore it
    else:
        stored = tok_mod.tokenizer_hash(tok_mod.from_json(tok_file.read_text("utf-8")))
        if stored != wanted["tokenizer"]["sha256"]:
            raise DataError(f"data store {path}: {TOKENIZER_FILE} was changed: delete the store and rerun")
    return meta


def _settings(manifest, tokenizer, split: SplitConfig, chunk_tokens: int) -> dict:
    vocab = tok_mod.vocab_size(tokenizer)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": {
            "sha256": tok_mod.tokenizer_hash(tokenizer),
            "vocab_size": vocab,
            "eot_id": tok_mod.eot_id(tokenizer),
            "file": TOKENIZER_FILE,
        },
        "corpus": manifest.to_json(),
        "split": {
            "seed": split.seed,
            "validation_fraction": split.validation_fraction,
            "min_validation_docs": split.min_validation_docs,
        },
        # uint16 holds ids up to 65535: half the bytes of uint32 for vocabularies up to that size.
        "dtype": "uint16" if vocab <= 65535 else "uint32",
        "chunk_tokens": chunk_tokens,
    }


def _check_fresh(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise DataError(f"{path} exists and is not a directory: choose another --out")
    leftovers = [
        p.name
        for p in path.iterdir()
        if p.name != TOKENIZER_FILE and not p.name.endswith((".tmp", ".partial"))
    ]
    if leftovers:
        raise DataError(
            f"{path} exists and is not a token store (it holds {leftovers[0]}): choose another --out"
        )


def _check_same(path: Path, meta: dict, wanted: dict) -> None:
    for key, what in (("corpus", "corpus"), ("tokenizer", "tokenizer"), ("split", "split settings"),
                      ("chunk_tokens", "chunk size"), ("dtype", "token dtype")):
        have, want = meta.get(key), wanted[key]
        if key == "corpus":
            have, want = (have or {}).get("sha256"), want["sha256"]
        if have != want:
            raise DataError(
                f"data store {path} was built with another {what} ({_short(have)} != {_short(want)}): "
                "pass another --out, or delete the store to rebuild it"
            )


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:16] if isinstance(value, str) else text[:60]


def _restore_arrays(path: Path, root, meta: dict) -> dict:
    """Open (or create) the arrays and cut them back to the committed counts."""
    from zarr.codecs import ZstdCodec

    arrays = {}
    chunks = meta["chunks"]
    for split in SPLITS:
        group = root.require_group(split)
        counts = meta["splits"][split]
        for name, dtype, chunk, length in (
            ("tokens", meta["dtype"], meta["chunk_tokens"], counts["tokens"]),
            ("doc_offsets", "int64", OFFSETS_CHUNK, counts["documents"] + 1),
        ):
            full = f"{split}/{name}"
            if name in group:
                array = group[name]
            else:
                array = group.create_array(
                    name, shape=(0,), chunks=(chunk,), dtype=dtype, fill_value=0,
                    compressors=ZstdCodec(level=3),
                )
            # A chunk of zeros is data here (id 0 is the separator; offsets start at 0): always write
            # it. This setting is not stored with the array, so it is applied on every open.
            array = array.with_config({"write_empty_chunks": True})
            array.resize((length,))
            nchunks = math.ceil(length / chunk)
            # Chunk files past the committed end (from an uncommitted batch) are removed.
            cdir = path / full / "c"
            if cdir.is_dir():
                for f in cdir.iterdir():
                    if not f.name.isdigit() or int(f.name) >= nchunks:
                        f.unlink()
            if name == "doc_offsets" and length == 1:
                array[0:1] = np.zeros(1, dtype=np.int64)
            # The last committed chunk may have been rewritten by the uncommitted batch (same ids
            # in the committed part): its checksum is taken again from the file.
            sums = list(chunks.get(full, []))[:nchunks]
            if nchunks:
                sums = sums[: nchunks - 1] + [file_sha256(chunk_file(path, full, nchunks - 1))]
            chunks[full] = sums
            arrays[full] = array
    return arrays


def _commit(path, root, arrays, meta, batch, mask, tokenizer, eot, dtype) -> dict:
    """Append one batch of documents to their splits, then record it in the metadata."""
    texts = [text for _, text in batch]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode(texts)
    meta = copy.deepcopy(meta)
    limit = np.iinfo(dtype).max
    for split in SPLITS:
        want_val = split == "validation"
        rows = [i for i, (doc, _) in enumerate(batch) if bool(mask[doc]) == want_val]
        if not rows:
            continue
        ids = [np.asarray(encodings[i].ids, dtype=np.int64) for i in rows]
        lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        sep = np.array([eot], dtype=np.int64)
        flat = np.concatenate([part for x in ids for part in (x, sep)])
        if flat.size and (flat.max() > limit or flat.min() < 0):
            raise DataError(
                f"token id {int(flat.max())} does not fit {dtype}: the tokenizer's ids exceed its vocabulary"
            )
        counts = meta["splits"][split]
        t0, d0 = counts["tokens"], counts["documents"]
        _append(path, arrays, meta, f"{split}/tokens", t0, flat.astype(dtype))
        _append(path, arrays, meta, f"{split}/doc_offsets", d0 + 1, t0 + np.cumsum(lengths))
        counts["tokens"] = t0 + int(flat.size)
        counts["documents"] = d0 + len(rows)
    meta["ingest"]["documents_committed"] += len(batch)
    root.attrs.put(meta)  # the commit: one atomic replace of zarr.json, after the data
    return meta


def _append(path: Path, arrays: dict, meta: dict, name: str, start: int, values: np.ndarray) -> None:
    array = arrays[name]
    stop = start + values.size
    array.resize((stop,))
    array[start:stop] = values
    size = array.chunks[0]
    sums = meta["chunks"].setdefault(name, [])
    for i in range(start // size, (stop - 1) // size + 1):
        digest = file_sha256(chunk_file(path, name, i))
        if i < len(sums):
            sums[i] = digest
        else:
            sums.append(digest)


def _identity(meta: dict) -> str:
    body = {k: meta[k] for k in ("tokenizer", "corpus", "split", "dtype", "chunk_tokens", "splits", "chunks")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def print_log(message: str) -> None:
    """Progress lines for the command line."""
    print(message, file=sys.stderr, flush=True)
