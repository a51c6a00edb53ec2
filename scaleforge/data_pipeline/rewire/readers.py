"""Documents from files through datatrove's readers: JSONL (gzip too), Parquet, WARC, a saved HF dataset.

A text set `{reader: KIND, paths: [GLOB, ...], text_key, id_key, limit}` names files by glob; they
are read in sorted path order, each by the datatrove reader of its kind (`JsonlReader`,
`ParquetReader`, `WarcReader`, and `IpcReader` over the Arrow stream files a `save_to_disk`
directory lists in its `state.json`). `check` opens the first record of every file before anything
runs, so that a wrong glob, key, column or format is one line naming the file and what to change.
WARC: datatrove keeps `response` records of HTML and `conversion` (WET) records of plain text; the
text of a response record is its HTML (no extractor is installed), a WET file's is the page's text.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from scaleforge.data_pipeline.rewire.config import TextSet
from scaleforge.errors import ConfigError

HF_STATE = "state.json"
"""What `datasets.Dataset.save_to_disk` writes beside its Arrow files: their names, in order."""
WARC_MAGIC = b"WARC/"


def files(ts: TextSet, where: str) -> list[Path]:
    """The files (hf_disk: dataset directories) the globs name, sorted; none is a ConfigError."""
    found: set[Path] = set()
    for pattern in ts.paths:
        matches = [Path(m) for m in glob.glob(str(Path(pattern).expanduser()), recursive=True)]
        want_dir = ts.reader == "hf_disk"
        matches = [m for m in matches if (m.is_dir() if want_dir else m.is_file())]
        if not matches:
            kind = "dataset directory" if want_dir else "file"
            raise ConfigError(f"{where}.paths: {pattern!r} matches no readable {kind}: fix the glob")
        found.update(matches)
    return sorted(found)


def _hf_files(directory: Path, where: str) -> list[Path]:
    state = directory / HF_STATE
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{where}.paths: {directory} is not a dataset saved with save_to_disk "
                          f"(no readable {HF_STATE}): save it with Dataset.save_to_disk") from None
    return [directory / n for n in names]


def _first_jsonl(path: Path) -> dict:
    with path.open("rb") as fh:
        opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return json.loads(line)
    return {}


def _check_file(ts: TextSet, path: Path, where: str) -> None:
    """The first record of `path` holds `text_key` (Parquet/Arrow: the column exists)."""
    try:
        if ts.reader == "jsonl":
            first = _first_jsonl(path)
            if not first:
                raise ConfigError(f"{where}.paths: {path} holds no JSON line: remove it from the glob")
            keys = list(first)
        elif ts.reader == "parquet":
            import pyarrow.parquet as pq

            keys = pq.read_schema(path).names
        elif ts.reader == "hf_disk":
            import pyarrow as pa

            with pa.memory_map(str(path)) as fh:
                keys = pa.ipc.open_stream(fh).schema.names
        else:
            with path.open("rb") as fh:
                head = fh.read(2)
                fh.seek(0)
                head = gzip.open(fh).read(5) if head == b"\x1f\x8b" else fh.read(5)
            if head != WARC_MAGIC:
                raise ConfigError(f"{where}.paths: {path} is not a WARC file (it does not start with "
                                  "WARC/): name .warc or .warc.gz files")
            return
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where}.paths: {path} is not a readable {ts.reader} file "
                          f"({type(exc).__name__}): fix or remove it") from None
    if ts.text_key not in keys:
        field = "key" if ts.reader == "jsonl" else "column"
        raise ConfigError(f"{where}: {path} has no {field} {ts.text_key!r} (it has {', '.join(map(str, keys[:8]))}): "
                          "set text_key")


def check(ts: TextSet, where: str) -> list[Path]:
    """Every file of the set exists and is of its kind with the text field; returns the files read."""
    paths = files(ts, where)
    if ts.reader == "hf_disk":
        paths = [f for d in paths for f in _hf_files(d, where)]
    for p in paths:
        _check_file(ts, p, where)
    return paths


def _reader(ts: TextSet, folder: Path):
    kw = {"text_key": ts.text_key, "id_key": ts.id_key}
    if ts.reader == "jsonl":
        from datatrove.pipeline.readers import JsonlReader

        return JsonlReader(str(folder), **kw)
    if ts.reader == "parquet":
        from datatrove.pipeline.readers import ParquetReader

        # Reading every column lets a file without `id_key` fall back to path/index ids.
        return ParquetReader(str(folder), read_metadata=True, **kw)
    if ts.reader == "warc":
        from datatrove.pipeline.readers import WarcReader

        return WarcReader(str(folder), **kw)
    from datatrove.pipeline.readers.ipc import IpcReader

    return IpcReader(str(folder), stream=True, **kw)


def documents(ts: TextSet, paths: list[Path]) -> Iterator[tuple[str, str]]:
    """(id, text) of every non-empty document of `paths` in order, at most `ts.limit` (0: all)."""
    n = 0
    for path in paths:
        for doc in _reader(ts, path.parent).read_file(path.name):
            if ts.limit and n >= ts.limit:
                return
            if doc.text.strip():
                n += 1
                yield str(doc.id), doc.text
