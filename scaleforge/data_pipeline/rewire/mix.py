"""Stage 4: the raw top fraction and the kept rewrites, at a token share, into a new token store.

The store is written by the project's resumable ingestion (`ingest.ingest`) with the pool store's
tokenizer, so a model trained on the pool reads it unchanged. No document repeats: when one side
has more tokens than the share allows, its lowest-scored documents are left out. So the store's
train tokens are its unique tokens, what `orchestrate plan` counts for epochs.

Provenance: beside each split's `tokens` and `doc_offsets` the store gets `provenance_rewritten`
(uint8, 1 for a rewrite) and `provenance_source` (int64, the pool document id), one entry per
document in store order; the document keys in the corpus manifest read `raw/<id>` or `rewrite/<id>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from scaleforge.errors import ConfigError

RAW, REWRITE = "raw", "rewrite"


def balance(raw: list[dict], rewrites: list[dict], share: float) -> tuple[list[dict], list[dict]]:
    """Cut the side with too many tokens (lowest scores first) so raw tokens / all ~= `share`.

    Each list is ordered best first and its entries carry `tokens`.
    """
    r_tok = sum(d["tokens"] for d in raw)
    w_tok = sum(d["tokens"] for d in rewrites)
    if share <= 0:
        return [], rewrites
    if share >= 1:
        return raw, []
    if r_tok * (1 - share) > w_tok * share:  # too much raw text: keep raw up to share/(1-share) * W
        return _prefix(raw, w_tok * share / (1 - share)), rewrites
    return raw, _prefix(rewrites, r_tok * (1 - share) / share)


def _prefix(docs: list[dict], budget: float) -> list[dict]:
    kept, total = [], 0
    for d in docs:
        if kept and total + d["tokens"] > budget:
            break
        kept.append(d)
        total += d["tokens"]
    return kept


def write_store(path: Path, entries: list[tuple[str, int]], texts: Callable[[], Iterator[str]], tokenizer,
                seed: int, validation_fraction: float):
    """Ingest the documents `entries` name ((kind, source id), in store order; each call of `texts`
    streams their texts in the same order: ingestion reads them twice) into the store at `path`;
    add the provenance arrays."""
    import zarr
    from zarr.codecs import ZstdCodec

    from scaleforge.data_pipeline import corpus, ingest, store

    if len(entries) < 2:
        raise ConfigError(
            f"mix: only {len(entries)} document(s) to mix, a store needs at least 2: raise "
            "mix.raw_fraction or filter.keep_fraction, or use a larger pool"
        )

    def documents():
        for (kind, source), text in zip(entries, texts()):
            yield f"{kind}/{source}", text

    # The origin names no path: equal mixes give equal stores, wherever they are written.
    source = corpus.Source(name="rewire", origin="rewire mix", documents=documents)
    split = store.SplitConfig(seed=seed, validation_fraction=validation_fraction)
    result = ingest.ingest(path, [source], tokenizer, split=split)
    mask = store.validation_mask(len(entries), split.seed, split.validation_fraction,
                                 split.min_validation_docs)
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="a")
    for name, want_val in (("train", False), ("validation", True)):
        rows = [e for e, v in zip(entries, mask) if bool(v) == want_val]
        for array, values in (
            ("provenance_rewritten", np.array([k == REWRITE for k, _ in rows], dtype=np.uint8)),
            ("provenance_source", np.array([i for _, i in rows], dtype=np.int64)),
        ):
            arr = root[name].create_array(array, shape=values.shape, chunks=(max(1, min(len(values), 1 << 16)),),
                                          dtype=values.dtype, fill_value=0, compressors=ZstdCodec(level=3),
                                          overwrite=True)
            arr = arr.with_config({"write_empty_chunks": True})
            if values.size:
                arr[:] = values
    return result.store


def read_provenance(path: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(rewritten uint8, source id int64) per document of a mixed store's split."""
    import zarr

    root = zarr.open_group(zarr.storage.LocalStore(path), mode="r")
    return (np.asarray(root[split]["provenance_rewritten"][:]),
            np.asarray(root[split]["provenance_source"][:]))
