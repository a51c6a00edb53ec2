"""Documents of a text set: a slice of a token store (decoded with its tokenizer), text files, or
files a datatrove reader reads (readers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from scaleforge.data_pipeline.rewire.config import TextSet
from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class Doc:
    """One document of a text set."""

    id: int
    """Its index in the store split (or in the files' document order, or in the reader's)."""
    key: str = ""
    """A reader's document id (its `id_key` field, else file path and index); empty otherwise."""
    text: str
    """The text, cut to the set's `max_chars`."""


def describe(ts: TextSet) -> str:
    """A short name for messages: `store bundled[train]` or `path docs.jsonl`."""
    if ts.reader:
        return f"{ts.reader} {', '.join(ts.paths)}"
    return f"store {ts.store}[{ts.split}]" if ts.store else f"path {ts.path}"


def iterate(ts: TextSet, where: str) -> Iterator[Doc]:
    """The non-empty documents of `ts`, streamed in order (bad input fails at the first document)."""
    if ts.store:
        docs = _from_store(ts, where)
    elif ts.reader:
        docs = _from_reader(ts, where)
    else:
        docs = _from_files(ts, where)
    return (d for d in docs if d.text.strip())


def check(ts: TextSet, where: str) -> None:
    """`ts` selects at least one non-empty document; else a ConfigError naming `where`."""
    if next(iterate(ts, where), None) is None:
        which = f"limit {ts.limit}" if ts.reader else f"start {ts.start}, count {ts.count}, stride {ts.stride}"
        raise ConfigError(f"{where}: {describe(ts)} selects no non-empty document ({which}): widen the selection")


def read(ts: TextSet, where: str) -> list[Doc]:
    """The documents of `ts` as a list; an empty selection is a ConfigError naming `where`."""
    check(ts, where)
    return list(iterate(ts, where))


def indices(ts: TextSet, available: int) -> range:
    """The document indices a set takes from `available` documents."""
    stop = available if ts.count == 0 else min(available, ts.start + ts.count * ts.stride)
    return range(ts.start, max(ts.start, stop), ts.stride)


def open_store(ts: TextSet, where: str):
    """The token store of a store set (a DataError from the store names what is wrong)."""
    from scaleforge.data_pipeline import store as store_mod

    try:
        return store_mod.open_store(ts.store)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where}.store: {exc}") from None


DECODE_BLOCK = 256
"""Store documents decoded per tokenizer call (a block at a time: the pool is never held)."""


def _from_store(ts: TextSet, where: str) -> Iterator[Doc]:
    st = open_store(ts, where)
    tok = st.tokenizer()
    idx = indices(ts, st.num_documents(ts.split))
    for lo in range(0, len(idx), DECODE_BLOCK):
        block = idx[lo : lo + DECODE_BLOCK]
        ids = [st.document(ts.split, i)[:-1].tolist() for i in block]  # drop the separator
        for i, t in zip(block, tok.decode_batch(ids, skip_special_tokens=False)):
            yield Doc(id=i, text=cut(t, ts.max_chars))


def _from_files(ts: TextSet, where: str) -> Iterator[Doc]:
    from scaleforge.data_pipeline import corpus

    try:
        sources = corpus.path_sources([ts.path])
        wanted = indices(ts, 1 << 62)
        for n, (_, _, text) in enumerate(corpus.iter_documents(sources)):
            if n >= wanted.stop:
                return
            if n in wanted:
                yield Doc(id=n, text=cut(text, ts.max_chars))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where}.path: {exc}") from None


def _from_reader(ts: TextSet, where: str) -> Iterator[Doc]:
    from scaleforge.data_pipeline.rewire import readers

    paths = readers.check(ts, where)
    for i, (key, text) in enumerate(readers.documents(ts, paths)):
        yield Doc(id=i, key=key, text=cut(text, ts.max_chars))


def cut(text: str, max_chars: int) -> str:
    """The first `max_chars` characters of `text`, back to the last whitespace; stripped."""
    text = text.strip()
    if max_chars == 0 or len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = max(head.rfind(" "), head.rfind("\n"))
    return (head[:space] if space > max_chars // 2 else head).strip()
