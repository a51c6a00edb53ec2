"""fastText quality classifiers (as DCLM's): trained from two labelled sets, scoring documents.

Training runs on one thread with a fixed seed, so the same documents give the same model and the
same scores on every run (fastText's parallel SGD is not deterministic with several threads).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from scaleforge.data_pipeline.rewire.config import FastTextConfig
from scaleforge.errors import ConfigError

POSITIVE = "__label__hq"
NEGATIVE = "__label__cc"


def _line(text: str) -> str:
    # fastText reads one example per line: newlines inside a document become spaces.
    return " ".join(text.split())


def train(positives: list[str], negatives: list[str], settings: FastTextConfig, seed: int,
          out: Path, where: str) -> Path:
    """Train a two-label classifier and save it to `out`; a set with one class is refused."""
    import fasttext

    pos = [_line(t) for t in positives if _line(t)]
    neg = [_line(t) for t in negatives if _line(t)]
    if not pos or not neg:
        missing = "positives" if not pos else "negatives"
        raise ConfigError(f"{where}: the {missing} set is empty, so the classifier has one class: "
                          f"give {missing} with text")
    if set(pos) == set(neg):
        raise ConfigError(f"{where}: positives and negatives are the same documents, so the classifier "
                          "has one class: name different sets")
    # Interleaved by label so that SGD does not see one class, then the other.
    lines = []
    for i in range(max(len(pos), len(neg))):
        if i < len(pos):
            lines.append(f"{POSITIVE} {pos[i]}")
        if i < len(neg):
            lines.append(f"{NEGATIVE} {neg[i]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".train.", suffix=".txt", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        model = fasttext.train_supervised(
            input=tmp, epoch=settings.epochs, lr=settings.lr, wordNgrams=settings.word_ngrams,
            dim=settings.dim, minCount=settings.min_count, bucket=settings.bucket,
            thread=1, seed=seed, verbose=0,
        )
        part = out.with_name(f".{out.name}.tmp")
        model.save_model(str(part))
        os.replace(part, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def load(path: Path):
    """A saved classifier."""
    import fasttext

    return fasttext.load_model(str(path))


def scores(model, texts: list[str]) -> list[float]:
    """P(high quality) of each text, rounded to 6 digits (what the report and ranking use)."""
    out = []
    for text in texts:
        labels, probs = model.predict(_line(text), k=-1)
        p = dict(zip(labels, probs)).get(POSITIVE, 0.0)
        out.append(round(float(min(max(p, 0.0), 1.0)), 6))
    return out


def split(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded draw of round(fraction * n) texts held out, order kept; none
    held out when that would leave no text on either side."""
    import random

    k = round(fraction * len(texts))
    if k < 1 or k >= len(texts):
        return texts, []
    held = set(random.Random(seed).sample(range(len(texts)), k))
    return ([t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held])


def evaluate(model, positives: list[str], negatives: list[str]) -> dict | None:
    """Precision and recall (at P >= 0.5) and ROC AUC of `model` on texts it never saw; None
    without texts of both classes."""
    if not positives or not negatives:
        return None
    ps, ns = scores(model, positives), scores(model, negatives)
    tp = sum(s >= 0.5 for s in ps)
    fp = sum(s >= 0.5 for s in ns)
    # AUC: the probability that a positive outscores a negative (ties count half).
    wins = sum((p > n) + 0.5 * (p == n) for p in ps for n in ns)
    return {
        "positives": len(ps), "negatives": len(ns),
        "precision": round(tp / (tp + fp), 6) if tp + fp else None,
        "recall": round(tp / len(ps), 6),
        "auc": round(wins / (len(ps) * len(ns)), 6),
    }
