"""Build a token store: corpus -> tokenizer -> zarr store. Idempotent and resumable.

    python -m scaleforge.data_pipeline.prepare                       # the bundled store
    python -m scaleforge.data_pipeline.prepare --input my_texts/ --out stores/mine
    python -m scaleforge.data_pipeline.prepare --input a.jsonl --tokenizer tokenizer.json --out s

With no --input it builds `bundled` ($SCALEFORGE_HOME/stores/bundled) from the public-domain prose
installed with the package (about 21 MB, 5.3 M tokens at the default 8,192 vocabulary). A second
run over a complete store only checks it matches and returns; a run after an interruption continues
where the last one committed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import sys
import time
from pathlib import Path

from scaleforge.errors import ScaleforgeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options."""
    parser.add_argument(
        "--out", help="store directory (default: the bundled store in $SCALEFORGE_HOME/stores)"
    )
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="text to ingest: files (.txt/.md, or .jsonl with a `text` field) or directories "
                             "(recursively); default: the bundled corpus")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary size to train (default 8192; an existing store keeps its own)")
    parser.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                        help="use this tokenizer.json instead of training a BPE")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation document split")
    parser.add_argument("--validation-fraction", type=float, default=0.01,
                        help="fraction of documents held out for validation (default 0.01, at least 4)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="tokens per zarr chunk (default 1 Mi)")
    parser.add_argument("--batch-bytes", type=int, default=None,
                        help="text per ingestion commit (default 4 MiB)")
    parser.add_argument("--verify", action="store_true", help="check every chunk of the finished store")


def run(args: argparse.Namespace) -> int:
    """Build (or finish, or confirm) the store; print a one-line summary."""
    from scaleforge.data_pipeline import corpus, ingest, store
    from scaleforge.data_pipeline import tokenizer as tok_mod
    from scaleforge.errors import DataError

    t0 = time.perf_counter()
    if args.input:
        if not args.out:
            raise DataError(
                "--input needs --out DIR: the bundled store is built from the bundled corpus only"
            )
        sources = corpus.path_sources(args.input)
    else:
        sources = corpus.bundled_sources()
    out = store.store_path(args.out or store.BUNDLED)
    split = store.SplitConfig(seed=args.seed, validation_fraction=args.validation_fraction)
    if args.vocab_size is not None and args.tokenizer:
        raise DataError(
            "--vocab-size and --tokenizer exclude each other: a given tokenizer has its own vocabulary"
        )

    with _lock(out):
        existing = store.read_metadata(out)
        if _unchanged(existing, args, split, corpus.fingerprint(sources)):
            st = store.open_store(out)
            print(f"{out}: up to date ({time.perf_counter() - t0:.2f} s); {_summary(st)}")
            return 0
        manifest = corpus.manifest(sources)
        tok_note = ""
        if args.tokenizer:
            tok = tok_mod.load_tokenizer(args.tokenizer)
            tok_note = f"tokenizer {args.tokenizer}"
        elif existing is not None:
            # An existing store keeps the tokenizer it was started with.
            tok = tok_mod.from_json((out / store.TOKENIZER_FILE).read_text(encoding="utf-8"))
            if args.vocab_size is not None and tok_mod.vocab_size(tok) != args.vocab_size:
                raise DataError(
                    f"data store {out} has vocabulary {tok_mod.vocab_size(tok)}, not --vocab-size "
                    f"{args.vocab_size}: pass another --out, or delete the store to rebuild it"
                )
            tok_note = "the store's tokenizer"
        else:
            vocab = args.vocab_size or tok_mod.DEFAULT_VOCAB_SIZE
            texts = (text for _, _, text in corpus.iter_documents(sources))
            t_tok = time.perf_counter()
            cached = tok_mod.cached_bpe(manifest.sha256, texts, vocab)
            tok = cached.tokenizer
            tok_note = (
                f"cached BPE {cached.path}" if cached.cache_hit
                else f"trained BPE ({vocab} ids) in {time.perf_counter() - t_tok:.1f} s"
            )
        kwargs = {}
        if args.chunk_tokens:
            kwargs["chunk_tokens"] = args.chunk_tokens
        if args.batch_bytes:
            kwargs["batch_bytes"] = args.batch_bytes
        result = ingest.ingest(
            out, sources, tok, manifest=manifest, split=split, log=ingest.print_log, **kwargs
        )
        st = result.store
        if args.verify:
            st.verify()
    elapsed = time.perf_counter() - t0
    what = "up to date" if result.documents_added == 0 else (
        "resumed and finished" if result.documents_before else "built")
    text_mb = manifest.bytes / 1e6
    print(f"{out}: {what} in {elapsed:.1f} s ({text_mb:.1f} MB of text, {tok_note}); {_summary(st)}")
    return 0


def _summary(st) -> str:
    return (
        f"train {st.num_tokens('train'):,} tokens / {st.num_documents('train')} docs, "
        f"validation {st.num_tokens('validation'):,} tokens / {st.num_documents('validation')} docs; "
        f"vocab {st.vocab_size}; identity {st.identity[:12]}"
    )


def _unchanged(meta: dict | None, args: argparse.Namespace, split, fingerprint: str) -> bool:
    """True when a complete store was built from these very files with these settings."""
    from scaleforge.data_pipeline import tokenizer as tok_mod

    if meta is None or not meta["ingest"]["complete"] or meta["ingest"].get("fingerprint") != fingerprint:
        return False
    if meta["split"] != {"seed": split.seed, "validation_fraction": split.validation_fraction,
                         "min_validation_docs": split.min_validation_docs}:
        return False
    if args.chunk_tokens and args.chunk_tokens != meta["chunk_tokens"]:
        return False
    if args.vocab_size is not None and args.vocab_size != meta["tokenizer"]["vocab_size"]:
        return False
    if args.tokenizer:
        return tok_mod.tokenizer_hash(tok_mod.load_tokenizer(args.tokenizer)) == meta["tokenizer"]["sha256"]
    return True


@contextlib.contextmanager
def _lock(out: Path):
    """One writer per store: a second prepare on the same store waits for the first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_file = out.parent / f".{out.name}.lock"
    with open(lock_file, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another prepare writing {out} ...", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m scaleforge.data_pipeline.prepare`."""
    parser = argparse.ArgumentParser(
        prog="python -m scaleforge.data_pipeline.prepare", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ScaleforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    from scaleforge import _warnings

    _warnings.install()
    sys.exit(main())
