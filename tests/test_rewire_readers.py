"""REWIRE's pool readers: one test per input kind (JSONL, gzipped JSONL, Parquet, WARC, a saved HF
dataset, the token store), each over small files built from the bundled corpus, and the one-line
errors of bad input, raised before anything is written."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
import yaml

from scaleforge.errors import ConfigError


@pytest.fixture(scope="module")
def speeches() -> list[str]:
    """Openings of six State of the Union speeches (real prose, no download)."""
    from scaleforge.data_pipeline import corpus

    texts = []
    for _key, text in corpus.bundled_sources()[0].documents():
        if text.strip():
            texts.append(text.strip()[:400])
        if len(texts) == 6:
            return texts
    return texts


def read(body: dict) -> list:
    from scaleforge.config import from_dict
    from scaleforge.data_pipeline.rewire import texts
    from scaleforge.data_pipeline.rewire.config import TextSet

    return texts.read(from_dict(TextSet, body), "pool")


def _jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(body) if gz else body)


def test_jsonl_reader_reads_plain_and_gzip_in_path_order(speeches, tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "content": t} for i, t in enumerate(speeches[:3])])
    _jsonl(tmp_path / "b.jsonl.gz", [{"id": f"b{i}", "content": t} for i, t in enumerate(speeches[3:])], gz=True)
    docs = read({"reader": "jsonl", "paths": [str(tmp_path / "*.jsonl*")], "text_key": "content"})
    assert [d.text for d in docs] == speeches
    assert [d.key for d in docs] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert [d.id for d in docs] == list(range(6))
    limited = read({"reader": "jsonl", "paths": [str(tmp_path / "*.jsonl*")], "text_key": "content",
                    "limit": 4, "max_chars": 100})
    assert len(limited) == 4 and all(len(d.text) <= 100 for d in limited)


def test_parquet_reader(speeches, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": speeches}), tmp_path / "part-0.parquet")
    docs = read({"reader": "parquet", "paths": [str(tmp_path / "*.parquet")], "text_key": "body"})
    assert [d.text for d in docs] == speeches
    # No id column: ids are the file and the row.
    assert docs[2].key.endswith("part-0.parquet/2")


def test_warc_reader_reads_wet_records(speeches, tmp_path):
    from warcio.warcwriter import WARCWriter

    with (tmp_path / "crawl.warc.gz").open("wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for i, text in enumerate(speeches):
            record = writer.create_warc_record(
                f"https://example.org/{i}", "conversion", payload=io.BytesIO(text.encode()),
                warc_headers_dict={"WARC-Identified-Payload-Type": "text/plain"})
            writer.write_record(record)
    docs = read({"reader": "warc", "paths": [str(tmp_path / "*.warc.gz")]})
    assert [d.text for d in docs] == speeches
    assert all(d.key.startswith("<urn:uuid:") for d in docs)  # the WARC-Record-ID


def test_hf_disk_reader_reads_a_saved_dataset(speeches, tmp_path):
    import pyarrow as pa

    # The layout Dataset.save_to_disk writes: Arrow stream files and the state.json that lists them.
    ds = tmp_path / "ds"
    ds.mkdir()
    table = pa.table({"text": speeches, "id": [f"s{i}" for i in range(6)]})
    names = []
    for j, part in enumerate((table.slice(0, 4), table.slice(4))):
        names.append(f"data-{j:05d}-of-00002.arrow")
        with pa.OSFile(str(ds / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(part)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (ds / "dataset_info.json").write_text("{}")
    docs = read({"reader": "hf_disk", "paths": [str(ds)]})
    assert [d.text for d in docs] == speeches and [d.key for d in docs] == [f"s{i}" for i in range(6)]


def test_store_form_stays(tiny_store):
    docs = read({"store": str(tiny_store), "start": 1, "stride": 2, "count": 3, "max_chars": 80})
    assert [d.id for d in docs] == [1, 3, 5] and all(0 < len(d.text) <= 80 for d in docs)


def test_bad_reader_input_is_one_line(speeches, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _jsonl(tmp_path / "ok.jsonl", [{"text": t} for t in speeches])
    pq.write_table(pa.table({"body": speeches}), tmp_path / "p.parquet")
    (tmp_path / "fake.warc").write_text("not a web archive\n")
    cases = [
        ({"reader": "jsonl", "paths": [str(tmp_path / "none-*.jsonl")]}, "matches no readable file"),
        ({"reader": "jsonl", "paths": [str(tmp_path / "ok.jsonl")], "text_key": "body"}, "no key 'body'"),
        ({"reader": "parquet", "paths": [str(tmp_path / "p.parquet")]}, "no column 'text'"),
        ({"reader": "warc", "paths": [str(tmp_path / "fake.warc")]}, "is not a WARC file"),
        ({"reader": "hf_disk", "paths": [str(tmp_path)]}, "not a dataset saved with save_to_disk"),
        ({"reader": "jsonl", "paths": [str(tmp_path / "ok.jsonl")], "limit": -1}, "limit must be >= 0"),
        ({"reader": "csv", "paths": ["x"]}, "reader must be one of"),
    ]
    for body, needle in cases:
        with pytest.raises(ConfigError, match=needle) as err:
            read(body)
        assert "\n" not in str(err.value)


def test_cli_refuses_a_missing_text_key_before_writing(tiny_store, speeches, tmp_path, capsys):
    from scaleforge.cli import main

    _jsonl(tmp_path / "pool.jsonl", [{"body": t} for t in speeches])
    body = {
        "pool": {"reader": "jsonl", "paths": [str(tmp_path / "pool.jsonl")]},
        "classify": {"positives": [{"store": str(tiny_store), "count": 4}],
                     "negatives": [{"store": str(tiny_store), "start": 10, "count": 4}]},
        "mix": {"tokenizer": str(tiny_store)},
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(body))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["rewire", str(cfg), "--out", str(out)]) != 0
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no key 'text'" in errors[0] and "set text_key" in errors[0]
    assert not out.exists()
    body["mix"] = {}
    cfg.write_text(yaml.safe_dump(body))
    assert main(["rewire", str(cfg), "--out", str(out)]) != 0
    assert "mix.tokenizer is empty" in capsys.readouterr().err
