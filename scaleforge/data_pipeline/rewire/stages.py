"""The REWIRE stages as functions of (config, OUT, rank, world_size): what each datatrove step runs.

Documents stream through: the classify stage reads the pool once and writes it as shard files of
`rewrite.shard_size` documents (pool position p is in shard p // shard_size); a rewrite task takes
every world_size-th shard, so a document's shard and batch (positions [p - p % batch_size, +
batch_size)) never depend on the number of tasks or workers, and every output is ordered by pool
position. The global stages (filter, mix) hold two or three numbers per document, never the texts.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from pathlib import Path

from scaleforge.data_pipeline.rewire import classify, files, prompts, texts
from scaleforge.data_pipeline.rewire import filter as filter_mod
from scaleforge.data_pipeline.rewire.config import RewireConfig, TextSet


def tokenizer(cfg: RewireConfig):
    """The tokenizer that counts tokens and writes the mix: mix.tokenizer's store, else the pool's."""
    if cfg.mix.tokenizer:
        return texts.open_store(TextSet(store=cfg.mix.tokenizer), "mix.tokenizer").tokenizer()
    return texts.open_store(cfg.pool, "pool").tokenizer()


def token_counts(tok, texts_: list[str]) -> list[int]:
    """Tokens of each text (no separator)."""
    return [len(e.ids) for e in tok.encode_batch(texts_)] if texts_ else []


def set_texts(sets, where: str) -> list[str]:
    """Texts of a list of text sets (the classifier sets: small by nature, read whole)."""
    return [d.text for i, ts in enumerate(sets) for d in texts.iterate(ts, f"{where}[{i}]")]


def _text_hash(text: str) -> bytes:
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _chunks(docs: Iterator[texts.Doc], size: int) -> Iterator[tuple[int, list[tuple[int, texts.Doc]]]]:
    """(shard, [(pool position, doc), ...]) of `size` documents each, in pool order."""
    block: list[tuple[int, texts.Doc]] = []
    for pos, doc in enumerate(docs):
        block.append((pos, doc))
        if len(block) == size:
            yield pos // size, block
            block = []
    if block:
        yield block[0][0] // size, block


# ---------------------------------------------------------------------------------------------
# classify: train the quality classifier, score the pool shard by shard (one task)


def classify_stage(cfg: RewireConfig, out: Path, rank: int, world_size: int) -> None:
    """Train on the classifier sets, then stream the pool into scored shard files."""
    d = files.stage_dir(out, "classify")
    pos, pos_held = classify.split(set_texts(cfg.classify.positives, "classify.positives"),
                                   cfg.classify.held_out, cfg.seed)
    neg, neg_held = classify.split(set_texts(cfg.classify.negatives, "classify.negatives"),
                                   cfg.classify.held_out, cfg.seed + 1)
    model = classify.load(classify.train(pos, neg, cfg.classify.fasttext, cfg.seed, d / "model.bin", "classify"))
    tok = tokenizer(cfg)
    n = tokens = 0
    seen: dict[bytes, int] = {}  # 8-byte text hash -> first pool position: exact duplicates
    t0 = time.perf_counter()
    for shard, block in _chunks(texts.iterate(cfg.pool, "pool"), cfg.rewrite.shard_size):
        scores = classify.scores(model, [doc.text for _, doc in block])
        counts = token_counts(tok, [doc.text for _, doc in block])
        dups = [seen.setdefault(_text_hash(doc.text), p) for p, doc in block]
        files.write_shard(files.shard_path(out, "classify", shard), [
            {"pos": p, "id": doc.id, "key": doc.key, "text": doc.text, "score": s, "tokens": c,
             "dup_of": None if d == p else d}
            for (p, doc), s, c, d in zip(block, scores, counts, dups)])
        n += len(block)
        tokens += sum(counts)
    files.log(out, f"classify: {n} documents scored in {time.perf_counter() - t0:.1f} s")
    files.write_json(files.summary_path(out, "classify"), {
        "positives": len(pos), "negatives": len(neg), "documents": n, "tokens": tokens,
        "held_out": classify.evaluate(model, pos_held, neg_held)})


# ---------------------------------------------------------------------------------------------
# rewrite: the shards of this task, batch by batch (committed batches are reused on a rerun)


def _requests(rows: list[dict], cfg: RewireConfig) -> list[list[dict]]:
    # Exact duplicates of an earlier pool document are not sent (their prompt would be the same).
    return [prompts.messages(cfg.rewrite.prompt, r["text"]) for r in rows if r["dup_of"] is None]


def _queue(out: Path, rows: list[dict], cfg: RewireConfig, gen):
    """Send a batch's requests now when the backend takes them asynchronously (http); else None."""
    if files.batch_path(out, rows[0]["pos"]).is_file() or not hasattr(gen, "submit"):
        return None
    # The seed is the batch's first pool position: the same on every attempt and every executor.
    return gen.submit(_requests(rows, cfg), cfg.rewrite, cfg.rewrite.seed + rows[0]["pos"])


def _replies(out: Path, rows: list[dict], cfg: RewireConfig, gen, futures) -> list[dict]:
    """The replies of one batch: its committed file, else generated (or awaited) now and committed."""
    path = files.batch_path(out, rows[0]["pos"])
    if path.is_file():
        return files.read_jsonl(path)
    t0 = time.perf_counter()
    if futures is not None:
        gens = iter([f.result() for f in futures])
    else:
        gens = iter(gen.generate(_requests(rows, cfg), cfg.rewrite, cfg.rewrite.seed + rows[0]["pos"])
                    if any(r["dup_of"] is None for r in rows) else [])
    replies = []
    for r in rows:
        g = next(gens) if r["dup_of"] is None else None
        if g is None:
            replies.append({"pos": r["pos"], "reply": "", "finish_reason": "duplicate", "reply_tokens": 0})
            continue
        replies.append({"pos": r["pos"], "reply": g.text, "finish_reason": g.finish_reason, "reply_tokens": g.tokens})
        if g.error:
            files.log(out, f"rewrite document {r['pos']}: {g.error}")
    files.write_jsonl(path, replies)
    files.log(out, f"rewrite batch {rows[0]['pos']}: {len(rows)} documents, "
                   f"{sum(x['reply_tokens'] for x in replies)} tokens in {time.perf_counter() - t0:.1f} s")
    return replies


def rewrite_shard(cfg: RewireConfig, out: Path, shard: int, gen, tok, description: dict) -> None:
    """Rewrite and screen one shard; its file is written once every batch is committed. An http
    backend gets every batch of the shard queued at once (`rewrite.concurrency` in flight)."""
    rows = list(files.read_shard(files.shard_path(out, "classify", shard)))
    batches = [rows[lo : lo + cfg.rewrite.batch_size] for lo in range(0, len(rows), cfg.rewrite.batch_size)]
    queued = [(b, _queue(out, b, cfg, gen)) for b in batches]
    replies: list[dict] = []
    for b, futures in queued:
        replies += _replies(out, b, cfg, gen, futures)
    screened = filter_mod.screen([{"id": r["pos"], "reply": r["reply"], "finish_reason": r["finish_reason"]}
                                  for r in replies], {r["pos"]: r["text"] for r in rows}, cfg)
    counts = iter(token_counts(tok, [s["text"] for s in screened if s["dropped"] is None]))
    out_rows = []
    for src, rep, s in zip(rows, replies, screened):
        out_rows.append({
            "pos": src["pos"], "id": src["id"], "key": src["key"], "raw_score": src["score"],
            "reply": rep["reply"], "finish_reason": rep["finish_reason"], "reply_tokens": rep["reply_tokens"],
            "text": s["text"], "dropped": s["dropped"], "tokens": next(counts) if s["dropped"] is None else 0,
            "prompt": cfg.rewrite.prompt, "model": description.get("model", ""),
        })
    files.write_shard(files.shard_path(out, "rewrite", shard), out_rows)


def rewrite_stage(cfg: RewireConfig, out: Path, rank: int, world_size: int) -> None:
    """Rewrite the shards rank, rank + world_size, ... that have no output yet."""
    from scaleforge.data_pipeline.rewire import backends, rewrite

    shards = sorted(int(p.name[:5]) for p in files.docs_dir(out, "classify").glob(f"*{files.SHARD_SUFFIX}"))
    todo = [s for s in shards[rank::world_size] if not files.shard_path(out, "rewrite", s).is_file()]
    if not todo:
        return
    gen = backends.shared_generator(cfg.rewrite)
    files.write_json(files.stage_dir(out, "rewrite") / "settings.json", rewrite.settings(cfg.rewrite, gen.description))
    tok = tokenizer(cfg)
    for shard in todo:
        rewrite_shard(cfg, out, shard, gen, tok, gen.description)


# ---------------------------------------------------------------------------------------------
# filter: the rewrite classifier, trained on the user's positives and sampled survivors (one task)


def _neg_hash(seed: int, pos: int) -> int:
    """Minus a seeded 64-bit hash of a pool position: a min-heap of these keeps the smallest hashes."""
    import hashlib

    return -int.from_bytes(hashlib.blake2b(f"{seed}:{pos}".encode(), digest_size=8).digest(), "little")


def _parsed_share(docs: int, dropped: dict[str, int]) -> float | None:
    """The share of generated replies the prompt's parser turned into a text (not no_tags, not empty)."""
    generated = docs - sum(dropped.get(r, 0) for r in filter_mod.NOT_GENERATED.values())
    parsed = generated - dropped.get("no_tags", 0) - dropped.get("empty", 0)
    return round(parsed / generated, 6) if generated else None


def filter_stage(cfg: RewireConfig, out: Path, rank: int, world_size: int) -> None:
    """Count the rewrites, train the rewrite classifier, score and keep the top survivors."""
    from scaleforge.data_pipeline.rewire import report

    d = files.stage_dir(out, "filter")
    fpos = (set_texts(cfg.filter.positives, "filter.positives") if cfg.filter.positives
            else set_texts(cfg.classify.positives, "classify.positives"))
    finish: dict[str, int] = {}
    dropped: dict[str, int] = {}
    docs = reply_tokens = survived = survived_tokens = 0
    for r in files.read_shards(out, "rewrite"):
        docs += 1
        reply_tokens += r["reply_tokens"]
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
        if r["dropped"]:
            dropped[r["dropped"]] = dropped.get(r["dropped"], 0) + 1
        else:
            survived += 1
            survived_tokens += r["tokens"]
    if not survived:
        from scaleforge.errors import ConfigError

        raise ConfigError(
            f"filter: every rewrite was dropped ({', '.join(sorted(dropped))}), so the rewrite classifier "
            "has no negatives (one class): raise rewrite.max_new_tokens, lower rewrite.min_length_ratio, "
            "or use a larger model")
    # Two folds of the survivors (alternating in pool order): the classifier of one fold is
    # trained on negatives drawn from it and scores the other fold, so no survivor is scored by a
    # classifier that saw it. Negatives: the smallest seeded hashes of their positions in the fold.
    fpos, fpos_held = classify.split(fpos, cfg.filter.held_out, cfg.seed + 2)
    n_neg = cfg.filter.negatives or len(fpos)
    folds: list[list] = [[], []]  # bounded max-heaps (by negated hash) of n_neg texts each
    for i, r in enumerate(r for r in files.read_shards(out, "rewrite") if not r["dropped"]):
        heapq.heappush(folds[i % 2], (_neg_hash(cfg.seed, r["pos"]), r["pos"], r["text"]))
        if len(folds[i % 2]) > n_neg:
            heapq.heappop(folds[i % 2])
    negs = [[t for _, _, t in sorted(f, key=lambda x: x[1])] for f in folds]
    models = [classify.load(classify.train(fpos, negs[f], cfg.filter.fasttext, cfg.seed, d / f"model-{f}.bin",
                                           "filter")) if negs[f] else None for f in (0, 1)]
    held_out = [classify.evaluate(models[f], fpos_held, negs[1 - f]) if models[f] else None for f in (0, 1)]
    scored = []  # (pos, score, raw score, tokens): four numbers per survivor
    for i, r in enumerate(r for r in files.read_shards(out, "rewrite") if not r["dropped"]):
        model = models[1 - i % 2] or models[i % 2]  # one survivor: only its own fold has a classifier
        scored.append((r["pos"], classify.scores(model, [r["text"]])[0], r["raw_score"], r["tokens"]))
    kept_list = filter_mod.top([(p, s) for p, s, _, _ in scored], cfg.filter.keep_fraction)
    kept = set(kept_list)
    files.write_jsonl(d / "scores.jsonl", [{"pos": p, "score": s, "tokens": t, "kept": p in kept}
                                          for p, s, _, t in scored])
    # The mix candidates: the raw top fraction (by the quality score) and the kept rewrites.
    raw_top = filter_mod.top([(r["pos"], r["score"]) for r in files.read_shards(out, "classify")],
                             cfg.mix.raw_fraction)
    files.write_jsonl(files.stage_dir(out, "dedup") / "candidates.jsonl",
                      sorted([{"kind": "raw", "pos": p} for p in raw_top] + [{"kind": "rewrite", "pos": p} for p in kept],
                             key=lambda x: (x["pos"], x["kind"] != "raw")))
    files.write_json(files.summary_path(out, "filter"), {
        "rewrite": {"documents": docs, "tokens": reply_tokens, "finish_reasons": finish,
                    "parsed_share": _parsed_share(docs, dropped)},
        "dropped": dropped, "dropped_total": sum(dropped.values()),
        "survived": survived, "survived_tokens": survived_tokens,
        "kept": len(kept), "kept_tokens": sum(t for p, _, _, t in scored if p in kept),
        "positives": len(fpos), "negatives": [len(n) for n in negs], "held_out": held_out,
        "spearman_raw_vs_rewrite": report.spearman([x[2] for x in scored], [x[1] for x in scored]),
        "overlap": report.overlap(raw_top, kept_list),
    })


# ---------------------------------------------------------------------------------------------
# mix: the raw top fraction and the kept rewrites into the mixed store (one task)


def mix_stage(cfg: RewireConfig, out: Path, rank: int, world_size: int) -> None:
    """The candidates dedup kept, balanced by token share, streamed into OUT/mixed."""
    from scaleforge.data_pipeline.rewire import dedup, mix

    chosen = dedup.candidates(out)
    summary_dedup = {}
    if cfg.dedup.enabled:
        summary_dedup = dedup.summary(out)
        chosen &= {(r["kind"], r["pos"]) for r in files.read_jsonl(files.stage_dir(out, "dedup") / "kept.jsonl")}
    raw_info = {r["pos"]: (r["score"], r["tokens"], r["id"]) for r in files.read_shards(out, "classify")
                if ("raw", r["pos"]) in chosen or ("rewrite", r["pos"]) in chosen}
    raw = sorted(({"kind": mix.RAW, "pos": p, "tokens": raw_info[p][1], "score": raw_info[p][0]}
                  for k, p in chosen if k == mix.RAW), key=lambda x: (-x["score"], x["pos"]))
    scores = files.read_jsonl(files.stage_dir(out, "filter") / "scores.jsonl")
    rew = sorted(({"kind": mix.REWRITE, "pos": r["pos"], "tokens": r["tokens"], "score": r["score"]}
                  for r in scores if (mix.REWRITE, r["pos"]) in chosen), key=lambda x: (-x["score"], x["pos"]))
    raw, rew = mix.balance(raw, rew, cfg.mix.raw_share)
    mixed = {(x["kind"], x["pos"]) for x in raw + rew}
    # Store order: by pool position, the raw text before its rewrite.
    entries = sorted(mixed, key=lambda k: (k[1], k[0] != mix.RAW))

    def stream() -> Iterator[str]:
        rewrites = files.read_shards(out, "rewrite")
        for src in files.read_shards(out, "classify"):
            rw = next(rewrites)
            if (mix.RAW, src["pos"]) in mixed:
                yield src["text"]
            if (mix.REWRITE, src["pos"]) in mixed:
                yield rw["text"]

    st = mix.write_store(out / files.MIXED, [(k, raw_info[p][2]) for k, p in entries], stream, tokenizer(cfg),
                         cfg.seed, cfg.mix.validation_fraction)
    files.write_json(files.summary_path(out, "mix"), {
        "raw_documents": len(raw), "raw_tokens": sum(x["tokens"] for x in raw),
        "rewritten_documents": len(rew), "rewritten_tokens": sum(x["tokens"] for x in rew),
        "train_tokens": st.num_tokens("train"), "validation_tokens": st.num_tokens("validation"),
        "train_documents": st.num_documents("train"), "validation_documents": st.num_documents("validation"),
        "identity": st.identity,
        "dedup": summary_dedup,
    })
