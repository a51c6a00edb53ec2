"""Stage 3: drop degenerate rewrites (counted by reason), then keep the best by a second classifier.

Drop reasons, checked in this order: `duplicate_prompt` and `request_failed` (no reply), `no_tags` (guided prompt: no opening improved-text tag; an
unclosed one runs to the end of the reply), `empty`, `too_short` (fewer words than `min_length_ratio` times the source's), then the Gopher
repetition rules as datatrove's GopherRepetitionFilter implements them (Rae et al. 2021, table A1:
duplicate lines/paragraphs, top 2-4-gram and duplicate 5-10-gram character fractions), each
counted under its rule (`repetition:top_2_gram`, ...). Loops of a small model end here.

The survivors are then scored by a fastText classifier whose positives are the user's and whose
negatives are surviving rewrites (as REWIRE trains its rewrite filter; `stages.filter_stage`); the
top `keep_fraction` are kept (`top`: ties broken by pool position).
"""

from __future__ import annotations

import math

from scaleforge.data_pipeline.rewire import prompts
from scaleforge.data_pipeline.rewire.config import RewireConfig


NOT_GENERATED = {"duplicate": "duplicate_prompt", "error": "request_failed"}
"""Replies that are not the model's: an exact duplicate of an earlier pool document (its prompt
is not sent again) and a request that failed after its retries, with their drop reasons."""


def _words(text: str) -> int:
    return len(text.split())


def screen(replies: list[dict], sources: dict[int, str], cfg: RewireConfig) -> list[dict]:
    """Every reply with its rewrite text or its drop reason."""
    repetition = None
    if cfg.filter.repetition:
        from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

        repetition = GopherRepetitionFilter()
    rows = []
    for r in replies:
        text, reason = prompts.extract(cfg.rewrite.prompt, r["reply"])
        if r.get("finish_reason") in NOT_GENERATED:
            text, reason = None, NOT_GENERATED[r["finish_reason"]]
        if reason is None and _words(text) < cfg.rewrite.min_length_ratio * _words(sources[r["id"]]):
            reason = "too_short"
        if reason is None and repetition is not None:
            from datatrove.data import Document

            verdict = repetition.filter(Document(text=text, id=str(r["id"])))
            if verdict is not True:
                reason = f"repetition:{verdict[1] if isinstance(verdict, tuple) else 'rejected'}"
        rows.append({"id": r["id"], "text": text if reason is None else None, "dropped": reason})
    return rows


def top(ids_scores: list[tuple[int, float]], fraction: float) -> list[int]:
    """The ids of the top `fraction` (at least one), highest score first, ties by id."""
    k = max(1, math.ceil(fraction * len(ids_scores) - 1e-9))
    ranked = sorted(ids_scores, key=lambda x: (-x[1], x[0]))
    return [i for i, _ in ranked[:k]]
