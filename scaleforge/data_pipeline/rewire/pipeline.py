"""The REWIRE pipeline: validate everything, then run the stages that are not done yet.

Every stage leaves its outputs and a `done.json` in its own folder of OUT (see files.py), so a
rerun after a kill skips what is finished and goes on where it stopped; the rewrite stage resumes
inside a shard, batch by batch. All checks that can fail on bad input (the config, OUT, the pool,
the classifier sets, the model directory or endpoint) run before the first write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from scaleforge.data_pipeline.rewire import classify, files, filter as filter_mod, mix, report, rewrite, texts
from scaleforge.data_pipeline.rewire.backends import BackendError, Generator, make_generator
from scaleforge.data_pipeline.rewire.config import RewireConfig
from scaleforge.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class Inputs:
    """What validation read: the pool and the classifier sets."""

    pool: list[texts.Doc]
    """The pool documents, in pool order."""
    positives: list[str]
    """Texts of classify.positives."""
    negatives: list[str]
    """Texts of classify.negatives."""
    filter_positives: list[str]
    """Texts of filter.positives (classify.positives when none are named)."""


def check_out(cfg: RewireConfig, out: Path) -> None:
    """OUT is new, empty, or an earlier run of this very config."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory: choose another --out")
    marker = out / files.MARKER
    if marker.is_file():
        digest = files.read_json(marker).get("digest")
        if digest != cfg.digest():
            raise ConfigError(
                f"--out {out} holds a REWIRE run of another config (digest {str(digest)[:12]} != "
                f"{cfg.digest()[:12]}): choose another --out, or delete it to start over"
            )
    elif any(out.iterdir()):
        raise ConfigError(f"--out {out} exists, is not empty and is not a REWIRE output: choose another --out")


def _read_sets(sets, where: str) -> list[str]:
    return [d.text for i, ts in enumerate(sets) for d in texts.read(ts, f"{where}[{i}]")]


def read_inputs(cfg: RewireConfig) -> Inputs:
    """Read the pool and the classifier sets; refuse an empty pool and one-class sets."""
    pool = texts.read(cfg.pool, "pool")
    pos = _read_sets(cfg.classify.positives, "classify.positives")
    neg = _read_sets(cfg.classify.negatives, "classify.negatives")
    norm = {" ".join(t.split()) for t in pos}
    if norm == {" ".join(t.split()) for t in neg}:
        raise ConfigError("classify: positives and negatives are the same documents, so the classifier "
                          "has one class: name different sets")
    fpos = _read_sets(cfg.filter.positives, "filter.positives") if cfg.filter.positives else pos
    return Inputs(pool=pool, positives=pos, negatives=neg, filter_positives=fpos)


def tokenizer_store(cfg: RewireConfig):
    """The store whose tokenizer counts tokens and writes the mix: mix.tokenizer, else the pool's."""
    from scaleforge.data_pipeline.rewire.config import TextSet

    if cfg.mix.tokenizer:
        return texts.open_store(TextSet(store=cfg.mix.tokenizer), "mix.tokenizer")
    return texts.open_store(cfg.pool, "pool")


def run(cfg: RewireConfig, out: str | Path, *, until: str = "report", shard: int | None = None,
        generator: Generator | None = None, echo=print) -> dict | None:
    """Run the stages up to `until` (or only rewrite shard `shard`); returns the report when made."""
    out = Path(out)
    if until not in files.STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(files.STAGES)}, got {until!r}")
    check_out(cfg, out)
    inputs = read_inputs(cfg)
    n_shards = rewrite.num_shards(len(inputs.pool), cfg.rewrite)
    if shard is not None and not 0 <= shard < n_shards:
        raise ConfigError(f"--shard {shard} is outside the pool's {n_shards} shards (0..{n_shards - 1})")
    if shard is not None and not files.done_path(out, "classify").is_file():
        # Array tasks start together: one classify run first, so they do not all write it at once.
        raise ConfigError(f"--shard {shard}: classify is not done in {out}: run `orchestrate rewire "
                          "CONFIG --out OUT --stage classify` before the array")
    needs_rewrite = until != "classify" and (
        (shard is not None and not files.shard_file(out, shard).is_file())
        or (shard is None and rewrite.missing_shards(out, len(inputs.pool), cfg.rewrite)))
    if needs_rewrite and generator is None:
        generator = make_generator(cfg.rewrite, log=echo)  # a missing model or endpoint stops here
    tokenizer = tokenizer_store(cfg).tokenizer()

    # Everything checked: from here on OUT is written.
    out.mkdir(parents=True, exist_ok=True)
    if not (out / files.MARKER).is_file():
        files.write_json(out / files.MARKER, {"digest": cfg.digest(), "config": cfg.to_dict()})
    files.log(out, f"start: until={until} shard={shard}")
    t0 = time.perf_counter()

    if not files.done_path(out, "classify").is_file():
        _classify(cfg, out, inputs, tokenizer)
    pool = files.read_jsonl(files.stage_dir(out, "classify") / "pool.jsonl")
    if until == "classify":
        echo(f"classified {len(pool)} documents; {n_shards} rewrite shard(s) (0..{n_shards - 1})")
        return None

    if needs_rewrite:
        sfile = files.stage_dir(out, "rewrite") / "settings.json"
        if not sfile.is_file():
            files.write_json(sfile, rewrite.settings(cfg.rewrite, generator.description))
        failures = rewrite.run(out, pool, cfg.rewrite, generator, only=shard)
        if failures:
            shards = ", ".join(str(s) for s, _ in failures)
            raise BackendError(f"rewrite: shard(s) {shards} failed, marked failed: {failures[0][1]}; "
                               "rerun to retry them")
    if shard is not None or until == "rewrite":
        echo(f"rewrite: {n_shards - len(rewrite.missing_shards(out, len(pool), cfg.rewrite))} of "
             f"{n_shards} shard(s) done")
        return None
    missing = rewrite.missing_shards(out, len(pool), cfg.rewrite)
    if missing:
        raise ConfigError(f"rewrite: shard(s) {', '.join(map(str, missing))} not done: rerun them")

    if not files.done_path(out, "filter").is_file():
        _filter(cfg, out, pool, inputs, tokenizer)
    if until == "filter":
        return None
    if not files.done_path(out, "mix").is_file():
        _mix(cfg, out, pool, tokenizer)
    if until == "mix":
        return None
    body = _report(cfg, out, pool, inputs)
    files.write_json(out / files.REPORT, body)
    files.log(out, f"report written ({time.perf_counter() - t0:.1f} s this attempt)")
    echo(report.table(body))
    return body


def _tokens(tokenizer, texts_: list[str]) -> list[int]:
    return [len(e.ids) for e in tokenizer.encode_batch(texts_)] if texts_ else []


def _classify(cfg: RewireConfig, out: Path, inputs: Inputs, tokenizer) -> None:
    d = files.stage_dir(out, "classify")
    model_path = classify.train(inputs.positives, inputs.negatives, cfg.classify.fasttext, cfg.seed,
                                d / "model.bin", "classify")
    model = classify.load(model_path)
    pool_texts = [doc.text for doc in inputs.pool]
    scores = classify.scores(model, pool_texts)
    counts = _tokens(tokenizer, pool_texts)
    files.write_jsonl(d / "pool.jsonl", [{"id": doc.id, "key": doc.key, "text": doc.text, "tokens": n}
                                         for doc, n in zip(inputs.pool, counts)])
    files.write_jsonl(d / "scores.jsonl", [{"id": doc.id, "score": s} for doc, s in zip(inputs.pool, scores)])
    files.write_json(files.done_path(out, "classify"), {
        "positives": len(inputs.positives), "negatives": len(inputs.negatives), "scored": len(scores)})


def _filter(cfg: RewireConfig, out: Path, pool: list[dict], inputs: Inputs, tokenizer) -> None:
    d = files.stage_dir(out, "filter")
    replies = rewrite.load(out, len(pool), cfg.rewrite)
    rows = filter_mod.screen(replies, {p["id"]: p["text"] for p in pool}, cfg)
    survivors = [r for r in rows if r["dropped"] is None]
    if not survivors:
        reasons = sorted({r["dropped"] for r in rows})
        raise ConfigError(
            f"filter: every rewrite was dropped ({', '.join(reasons)}), so the rewrite classifier has "
            "no negatives (one class): raise rewrite.max_new_tokens, lower rewrite.min_length_ratio, "
            "or use a larger model"
        )
    scores, n_neg = filter_mod.train_and_score(survivors, inputs.filter_positives, cfg, d / "model.bin")
    for s, score in zip(survivors, scores):
        s["score"] = score
    kept = set(filter_mod.top([(s["id"], s["score"]) for s in survivors], cfg.filter.keep_fraction))
    counts = _tokens(tokenizer, [s["text"] for s in survivors])
    for s, n in zip(survivors, counts):
        s["tokens"] = n
        s["kept"] = s["id"] in kept
    files.write_jsonl(d / "rewrites.jsonl", rows)
    files.write_json(files.done_path(out, "filter"), {
        "positives": len(inputs.filter_positives), "negatives": n_neg,
        "survived": len(survivors), "kept": len(kept)})


def _selection(cfg: RewireConfig, out: Path, pool: list[dict]):
    scores = {r["id"]: r["score"] for r in files.read_jsonl(files.stage_dir(out, "classify") / "scores.jsonl")}
    raw_top = filter_mod.top([(p["id"], scores[p["id"]]) for p in pool], cfg.mix.raw_fraction)
    rows = files.read_jsonl(files.stage_dir(out, "filter") / "rewrites.jsonl")
    kept = sorted((r for r in rows if r.get("kept")), key=lambda r: (-r["score"], r["id"]))
    return scores, raw_top, rows, kept


def _mix(cfg: RewireConfig, out: Path, pool: list[dict], tokenizer) -> None:
    _, raw_top, _, kept = _selection(cfg, out, pool)
    by_id = {p["id"]: p for p in pool}
    raw = [{"kind": mix.RAW, "id": i, "text": by_id[i]["text"], "tokens": by_id[i]["tokens"]} for i in raw_top]
    rew = [{"kind": mix.REWRITE, "id": r["id"], "text": r["text"], "tokens": r["tokens"]} for r in kept]
    raw, rew = mix.balance(raw, rew, cfg.mix.raw_share)
    # Store order: by source document, the raw text before its rewrite.
    docs = sorted(raw + rew, key=lambda x: (x["id"], x["kind"] != mix.RAW))
    st = mix.write_store(out / files.MIXED, docs, tokenizer, cfg.seed, cfg.mix.validation_fraction)
    files.write_json(files.done_path(out, "mix"), {
        "raw_documents": len(raw), "raw_tokens": sum(x["tokens"] for x in raw),
        "rewritten_documents": len(rew), "rewritten_tokens": sum(x["tokens"] for x in rew),
        "train_tokens": st.num_tokens("train"), "validation_tokens": st.num_tokens("validation"),
        "train_documents": st.num_documents("train"), "validation_documents": st.num_documents("validation"),
        "identity": st.identity})


def _report(cfg: RewireConfig, out: Path, pool: list[dict], inputs: Inputs) -> dict:
    scores, raw_top, rows, kept = _selection(cfg, out, pool)
    replies = rewrite.load(out, len(pool), cfg.rewrite)
    dropped: dict[str, int] = {}
    for r in rows:
        if r["dropped"]:
            dropped[r["dropped"]] = dropped.get(r["dropped"], 0) + 1
    survivors = [r for r in rows if r["dropped"] is None]
    finish: dict[str, int] = {}
    for r in replies:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    classify_done = files.read_json(files.done_path(out, "classify"))
    filter_done = files.read_json(files.done_path(out, "filter"))
    mix_done = files.read_json(files.done_path(out, "mix"))
    settings = files.read_json(files.stage_dir(out, "rewrite") / "settings.json")
    return {
        "pool": {"documents": len(pool), "tokens": sum(p["tokens"] for p in pool)},
        "classify": classify_done,
        "rewrite": {
            "documents": len(replies), "tokens": sum(r["tokens"] for r in replies),
            "finish_reasons": finish, **settings,
        },
        "filter": {
            "dropped": dropped, "dropped_total": sum(dropped.values()),
            "survived": len(survivors), "survived_tokens": sum(r["tokens"] for r in survivors),
            "kept": len(kept), "kept_tokens": sum(r["tokens"] for r in kept),
            "positives": filter_done["positives"], "negatives": filter_done["negatives"],
        },
        "mix": mix_done,
        "overlap": report.overlap(raw_top, [r["id"] for r in kept]),
        "spearman_raw_vs_rewrite": report.spearman([scores[r["id"]] for r in survivors],
                                                   [r["score"] for r in survivors]),
        "paper": report.PAPER,
        "config_digest": cfg.digest(),
    }
