"""REWIRE: config and bad input, the filter's drop reasons, the report's statistics, the local and
HTTP backends (a real `transformers serve` process), kill-and-resume identity under datatrove's
local executor, the outputs' independence of the number of tasks and workers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from scaleforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# fixtures: a tiny pool (the conftest store of speeches), negatives from the King James Bible


@pytest.fixture(scope="module")
def kjv_jsonl(tmp_path_factory) -> Path:
    from scaleforge.data_pipeline import corpus

    kjv = corpus.bundled_sources()[2]
    path = tmp_path_factory.mktemp("kjv") / "kjv.jsonl"
    rows = []
    for _key, text in kjv.documents():
        rows.append(json.dumps({"text": text}))
        if len(rows) == 12:
            break
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_config(store: Path, negatives: Path, **rewrite) -> dict:
    """Four 150-character speech openings, 2 per batch, one shard of 4, at most 24 new tokens."""
    ft = {"dim": 16, "bucket": 4096, "epochs": 10, "lr": 0.5}
    return {
        "pool": {"store": str(store), "start": 0, "count": 4, "max_chars": 150},
        "classify": {
            "positives": [{"store": str(store), "start": 8, "count": 10, "max_chars": 300}],
            "negatives": [{"path": str(negatives), "max_chars": 300}],
            "fasttext": ft,
        },
        "rewrite": {"max_new_tokens": 24, "batch_size": 2, "shard_size": 4, "min_length_ratio": 0.3,
                    "threads": 1, **rewrite},
        # Replies this short often trip the Gopher top-n-gram rules (test_filter_drops_by_reason
        # covers them): without them some rewrites always survive to be mixed.
        "filter": {"keep_fraction": 0.5, "fasttext": ft, "repetition": False},
        "mix": {"raw_fraction": 0.5, "validation_fraction": 0.2},
    }


def write_config(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from scaleforge.data_pipeline.rewire.model_cache import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def local_gen(model_dir):
    """SmolLM2-135M-Instruct from its cached safetensors copy, loaded once per session."""
    from scaleforge.data_pipeline.rewire.backends import LocalGenerator

    return LocalGenerator(model_dir, threads=1)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`orchestrate ARGV` in this process: its exit code and stderr."""
    from scaleforge.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# config and bad input: one line, non-zero exit, nothing written


def test_config_refuses_bad_fields(tiny_store, kjv_jsonl, tmp_path):
    from scaleforge.data_pipeline.rewire.config import load_config

    base = tiny_config(tiny_store, kjv_jsonl)
    cases = [
        ({"rewrite": {**base["rewrite"], "batch_size": 3}}, "multiple of rewrite.batch_size"),
        ({"rewrite": {"backend": "http"}}, "rewrite.endpoint"),
        ({"rewrite": {"backend": "http", "endpoint": "http://x/v1", "server": "openai"}}, "repetition_penalty"),
        ({"filter": {"keep_fraction": 0}}, "filter.keep_fraction"),
        ({"rewrite": {**base["rewrite"], "concurrency": 0}}, "rewrite.concurrency must be >= 1"),
        ({"dedup": {"threshold": 0}}, "dedup.threshold must be in (0, 1]"),
        ({"executor": {"tasks": 0}}, "executor.tasks must be >= 1"),
        ({"mix": {"raw_shares": 0.5}}, "unknown config field 'mix.raw_shares'"),
        ({"pool": {"store": str(tiny_store), "path": "x"}}, "pool: a text set names exactly one of"),
        ({"pool": {"reader": "jsonl"}}, "pool: reader jsonl needs `paths`"),
        ({"classify": {**base["classify"], "negatives": [{"path": "x", "stride": 0}]}},
         "classify.negatives[0]: stride must be >= 1"),
    ]
    for patch, needle in cases:
        cfg = write_config(tmp_path / "c.yaml", {**base, **patch})
        with pytest.raises(ConfigError, match=re.escape(needle)) as err:
            load_config(cfg)
        assert "\n" not in str(err.value)
    assert load_config(write_config(tmp_path / "ok.yaml", base)).rewrite.batch_size == 2


def test_bad_input_one_line_nothing_written(tiny_store, kjv_jsonl, tmp_path, capsys):
    base = tiny_config(tiny_store, kjv_jsonl)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cases = {
        "model": ({**base, "rewrite": {**base["rewrite"], "model": str(tmp_path / "no-model")}},
                  "rewrite.model"),
        "endpoint": ({**base, "rewrite": {**base["rewrite"], "backend": "http", "server": "transformers",
                                          "endpoint": f"http://127.0.0.1:{dead}/v1"}},
                     "rewrite.endpoint: no OpenAI-compatible server answers"),
        "empty_pool": ({**base, "pool": {"store": str(tiny_store), "start": 10_000, "count": 4}},
                       "pool: store"),
        "one_class": ({**base, "classify": {**base["classify"],
                                            "negatives": base["classify"]["positives"]}}, "one class"),
        "missing_store": ({**base, "pool": {"store": str(tmp_path / "nostore")}}, "pool.store"),
    }
    for name, (body, needle) in cases.items():
        out = tmp_path / f"out-{name}"
        rc, err = run_cli(capsys, "rewire", str(write_config(tmp_path / f"{name}.yaml", body)), "--out", str(out))
        assert rc != 0, name
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], (name, err[-500:])
        assert not out.exists(), name
    # An existing directory that is not a REWIRE output is never written into.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    rc, err = run_cli(capsys, "rewire", str(write_config(tmp_path / "f.yaml", base)), "--out", str(foreign))
    assert rc != 0 and "not a REWIRE output" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_verb_module_imports_nothing_heavy():
    code = ("import sys, scaleforge.cli as c; c.build_parser('rewire'); "
            "heavy = [m for m in ('torch', 'transformers', 'fasttext', 'datatrove', 'zarr') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


# ----------------------------------------------------------------------------------------------
# filter and report statistics


def test_filter_drops_by_reason(tiny_store, kjv_jsonl, tmp_path):
    from scaleforge.data_pipeline.rewire import filter as filter_mod
    from scaleforge.data_pipeline.rewire.config import load_config

    body = tiny_config(tiny_store, kjv_jsonl)
    body["filter"]["repetition"] = True
    cfg = load_config(write_config(tmp_path / "c.yaml", body))
    source = ("The Congress met in December and heard the President report on the state of the Union, "
              "its finances, its army and navy, and its dealings with foreign nations.")
    good = ("In December the Congress gathered to hear the President describe the condition of the "
            "Union: the public finances, the army and the navy, and relations with other nations abroad.")
    loop = "The Union is strong and the army is strong. " * 8
    replies = [{"id": 0, "reply": good}, {"id": 1, "reply": loop}, {"id": 2, "reply": "Yes."},
               {"id": 3, "reply": "   "}]
    rows = filter_mod.screen(replies, {i: source for i in range(4)}, cfg)
    reasons = [r["dropped"] for r in rows]
    assert reasons[0] is None and rows[0]["text"] == good
    assert reasons[1].startswith("repetition:") and reasons[2] == "too_short" and reasons[3] == "empty"
    guided = dataclasses.replace(cfg, rewrite=dataclasses.replace(cfg.rewrite, prompt="guided"))
    tagged = f"<reasoning>plan</reasoning><improved_document>{good}</improved_document>"
    unclosed = f"<reasoning>plan</reasoning><improved_document>\n{good}"
    rows = filter_mod.screen([{"id": 0, "reply": tagged}, {"id": 1, "reply": unclosed}, {"id": 2, "reply": good}],
                             {0: source, 1: source, 2: source}, guided)
    assert rows[0]["text"] == good and rows[1]["text"] == good and rows[2]["dropped"] == "no_tags"


def test_report_statistics_match_independent_formulas():
    from scaleforge.data_pipeline.rewire import filter as filter_mod
    from scaleforge.data_pipeline.rewire import report

    raw = [0.9, 0.1, 0.5, 0.7, 0.3, 0.5]
    rew = [0.2, 0.4, 0.9, 0.8, 0.1, 0.6]

    def ranks(x):  # average ranks of ties, by hand
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return np.array(r)

    expected = float(np.corrcoef(ranks(raw), ranks(rew))[0, 1])  # Spearman = Pearson of ranks
    assert report.spearman(raw, rew) == pytest.approx(expected, abs=1e-6)
    assert report.spearman([1, 1, 1], [1, 2, 3]) is None
    ids = list(range(6))
    raw_top = filter_mod.top(list(zip(ids, raw)), 0.5)  # 0.9 (0), 0.7 (3), then 0.5: id 2 before 5
    assert raw_top == [0, 3, 2]
    ov = report.overlap(raw_top, [2, 3, 4, 1])
    assert ov == {"raw_top": 3, "rewrite_top": 4, "common_sources": 2, "fraction_of_rewrite_top": 0.5}


# ----------------------------------------------------------------------------------------------
# the whole pipeline with SmolLM2: kill mid-rewrite, rerun, identical report and store


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_kill_and_resume_gives_identical_report_and_store(tiny_store, kjv_jsonl, local_gen, tmp_path):
    from scaleforge.data_pipeline import store as store_mod
    from scaleforge.data_pipeline.rewire import files, mix, pipeline
    from scaleforge.data_pipeline.rewire.config import load_config
    from scaleforge.orchestrator.plan.ladder import pool_tokens

    cfg_path = write_config(tmp_path / "tiny.yaml", tiny_config(tiny_store, kjv_jsonl))
    cfg = load_config(cfg_path)
    ref = tmp_path / "ref"
    pipeline.run(cfg, ref, generator=local_gen, echo=lambda _m: None)

    # A separate process is killed (SIGKILL) as soon as its first batch is committed.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scaleforge.cli", "rewire", str(cfg_path), "--out",
                             str(killed)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = files.batch_path(killed, 0)
    deadline = time.time() + 240
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_file(), "the killed run committed no batch"
    assert not (killed / files.REPORT).exists() and not files.shard_path(killed, "rewrite", 0).exists()

    pipeline.run(cfg, killed, generator=local_gen, echo=lambda _m: None)
    assert (killed / files.REPORT).read_bytes() == (ref / files.REPORT).read_bytes()
    assert _tree_bytes(killed / files.MIXED) == _tree_bytes(ref / files.MIXED)
    # Every batch was generated exactly once over both attempts (none repeated, none skipped).
    logged = [ln.split(" batch ")[1].split(":")[0] for ln in (killed / files.LOG).read_text().splitlines()
              if " batch " in ln]
    assert sorted(logged, key=int) == ["0", "2"]

    # Two tasks on two worker processes (a shard each): the same report and the same store.
    body = tiny_config(tiny_store, kjv_jsonl, shard_size=2)
    body["executor"] = {"tasks": 2, "workers": 2}
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "scaleforge.cli", "rewire", str(write_config(tmp_path / "two.yaml", body)),
                    "--out", str(two)], cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=600)
    assert sorted(p.name for p in files.docs_dir(two, "rewrite").iterdir()) == ["00000.jsonl.gz", "00001.jsonl.gz"]
    strip = lambda r: {k: v for k, v in r.items() if k != "config_digest"}  # noqa: E731
    assert strip(json.loads((two / files.REPORT).read_text())) == strip(json.loads((ref / files.REPORT).read_text()))
    assert _tree_bytes(two / files.MIXED) == _tree_bytes(ref / files.MIXED)

    report = json.loads((ref / files.REPORT).read_text())
    replies = list(files.read_shards(ref, "rewrite"))
    assert [r["pos"] for r in replies] == [r["id"] for r in replies] == list(range(4))
    assert {r["prompt"] for r in replies} == {"direct"} and all("raw_score" in r for r in replies)
    assert report["rewrite"]["documents"] == 4
    assert report["rewrite"]["sampling"]["temperature"] == 0.0
    assert "{document}" in report["rewrite"]["prompt"]["template"]
    f = report["filter"]
    assert f["survived"] + f["dropped_total"] == 4 and f["kept"] >= 1
    # The mixed store: provenance per document, its texts are the pool's and the kept rewrites'.
    st = store_mod.open_store(ref / files.MIXED)
    st.verify()
    pool = {p["id"]: p["text"] for p in files.read_shards(ref, "classify")}
    kept = {r["pos"] for r in files.read_jsonl(ref / "filter" / "scores.jsonl") if r["kept"]}
    rewrites = {r["id"]: r["text"] for r in replies if r["pos"] in kept}
    tok = st.tokenizer()
    n_raw = n_rew = 0
    for split in ("train", "validation"):
        kinds, sources = mix.read_provenance(ref / files.MIXED, split)
        assert len(kinds) == st.num_documents(split)
        for i, (kind, src) in enumerate(zip(kinds, sources)):
            text = tok.decode(st.document(split, i)[:-1].tolist(), skip_special_tokens=False)
            assert text == (rewrites[int(src)] if kind else pool[int(src)])
            n_rew += int(kind)
            n_raw += 1 - int(kind)
    assert (n_raw, n_rew) == (report["mix"]["raw_documents"], report["mix"]["rewritten_documents"])
    # The planner takes the mixed store as data: its unique tokens are the train tokens (no repeats).
    assert pool_tokens((str(ref / files.MIXED),)) == st.num_tokens("train") == report["mix"]["train_tokens"]


# ----------------------------------------------------------------------------------------------
# the HTTP backend against a real OpenAI-compatible server: `transformers serve`


@pytest.fixture(scope="module")
def served(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail("transformers serve exited while starting")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("transformers serve did not become healthy in 180 s")
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_http_backend_matches_local_and_retries_failed_tasks(tiny_store, kjv_jsonl, model_dir, local_gen,
                                                              served, tmp_path):
    from scaleforge.data_pipeline.rewire import files, pipeline, prompts
    from scaleforge.data_pipeline.rewire.backends import HttpGenerator
    from scaleforge.data_pipeline.rewire.config import load_config

    body = tiny_config(tiny_store, kjv_jsonl, backend="http", server="transformers",
                       model=str(model_dir), endpoint=served, timeout_s=0.05, retries=1)
    cfg = load_config(write_config(tmp_path / "http.yaml", body))

    # Greedy replies through the server equal the local backend's (one request per batch).
    docs = [p["text"] for p in [{"text": "And God said, Let there be light: and there was light."},
                                {"text": "The state of the Union is strong; we have reduced the deficit."}]]
    one = dataclasses.replace(cfg.rewrite, timeout_s=120.0, batch_size=1, shard_size=1)
    reqs = [prompts.messages("direct", d) for d in docs]
    http = HttpGenerator(one).generate(reqs, one, 0)
    local = [local_gen.generate([r], one, 0)[0] for r in reqs]
    assert [(g.text, g.tokens, g.finish_reason) for g in http] == \
        [(g.text, g.tokens, g.finish_reason) for g in local]
    assert all(g.text for g in http)
    assert "stop" in [g.finish_reason for g in local]  # a reply that ended: its end token not counted

    # Documents per second against the real server at 1 and 4 requests in flight (printed, not asserted).
    eight = [prompts.messages("direct", p["text"]) for p in
             [{"text": f"Item {i}: the Congress shall assemble at least once in every year."} for i in range(8)]]
    for c in (1, 4):
        conc = dataclasses.replace(one, concurrency=c)
        t0 = time.perf_counter()
        got = HttpGenerator(conc).generate(eight, conc, 0)
        print(f"transformers serve, concurrency {c}: {len(eight) / (time.perf_counter() - t0):.2f} docs/s")
        assert all(g.finish_reason != "error" for g in got)

    # Requests that time out are retried, then their documents are marked (the task goes on): with
    # every request failed no rewrite survives, the filter says so, and no report is written.
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="request_failed"):
        pipeline.run(cfg, out, echo=lambda _m: None)
    assert not (out / files.REPORT).exists()
    marked = list(files.read_shards(out, "rewrite"))
    assert [r["dropped"] for r in marked] == ["request_failed"] * 4 and "failed after 1 retries" in \
        (out / files.LOG).read_text()
    # With a workable timeout the same config runs through.
    fixed = dataclasses.replace(cfg, rewrite=dataclasses.replace(cfg.rewrite, timeout_s=120.0))
    report = pipeline.run(fixed, tmp_path / "out2", echo=lambda _m: None)
    assert report["rewrite"]["documents"] == 4
    assert report["rewrite"]["generator"] == {"backend": "http", "model": str(model_dir)}
    assert json.loads((tmp_path / "out2" / files.REPORT).read_text()) == report


def test_classifier_metrics_are_on_held_out_texts(tmp_path):
    from scaleforge.data_pipeline.rewire import classify
    from scaleforge.data_pipeline.rewire.config import FastTextConfig

    good = [f"the committee reviewed the annual budget report number {i} in detail" for i in range(10)]
    bad = [f"buy cheap pills now click here offer {i} free free free" for i in range(10)]
    g_tr, g_ho = classify.split(good, 0.2, seed=3)
    assert len(g_ho) == 2 and set(g_tr) | set(g_ho) == set(good) and not set(g_tr) & set(g_ho)
    assert classify.split(good, 0.2, seed=3) == (g_tr, g_ho)  # a seeded draw
    b_tr, b_ho = classify.split(bad, 0.2, seed=4)
    model = classify.load(classify.train(g_tr, b_tr, FastTextConfig(dim=8, bucket=1024, epochs=25, lr=0.5), 0,
                                         tmp_path / "m.bin", "t"))
    m = classify.evaluate(model, g_ho, b_ho)
    assert (m["positives"], m["negatives"], m["precision"], m["recall"], m["auc"]) == (2, 2, 1.0, 1.0, 1.0)
    # AUC by its definition: a reversed model ranks every negative first.
    assert classify.evaluate(model, b_ho, g_ho)["auc"] == 0.0
    assert classify.split(["one"], 0.2, 0) == (["one"], []) and classify.evaluate(model, [], b_ho) is None


def test_vllm_job_example_is_valid():
    script = REPO / "examples" / "rewire-vllm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "vllm serve" in text and "/health" in text and "orchestrate rewire" in text and "trap" in text


def test_local_backend_takes_any_causal_lm_directory(tiny_store, tmp_path):
    """A base model without chat template, end token or pad token (as a scaleforge export)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from scaleforge.data_pipeline.rewire.backends import LocalGenerator
    from scaleforge.data_pipeline.rewire.config import RewriteConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "m")
    PreTrainedTokenizerFast(tokenizer_file=str(tiny_store / "tokenizer.json")).save_pretrained(tmp_path / "m")
    gen = LocalGenerator(tmp_path / "m", threads=1)
    assert gen.description == {"backend": "local", "model": "m", "chat_template": False}
    cfg = RewriteConfig(max_new_tokens=5, batch_size=2, shard_size=2)
    reqs = [[{"role": "user", "content": "the state of the union"}], [{"role": "user", "content": "peace"}]]
    first = gen.generate(reqs, cfg, 0)
    assert [(g.tokens, g.finish_reason) for g in first] == [(5, "length"), (5, "length")]
    assert gen.generate(reqs, cfg, 0) == first  # greedy: the same batch gives the same replies
