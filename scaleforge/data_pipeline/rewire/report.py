"""Stage 5: `report.json` and a table. The report describes the data only (counts, tokens, the
overlap of the raw and rewrite top sets, the rank correlation of their scores, the prompt and
sampling settings), never the run's history, so a resumed run's report equals an uninterrupted one's.
"""

from __future__ import annotations

import math

PAPER = {"top_set_overlap": 0.183, "spearman_raw_vs_rewrite": 0.179}
"""REWIRE's figures (Nguyen et al. 2025): overlap of the rewritten-top-10% sources with the raw
top 10%, and the Spearman correlation of raw and rewrite quality scores."""


def overlap(raw_top: list[int], rewrite_top: list[int]) -> dict:
    """How many kept rewrites come from documents the raw top set keeps anyway."""
    common = len(set(raw_top) & set(rewrite_top))
    return {
        "raw_top": len(raw_top), "rewrite_top": len(rewrite_top), "common_sources": common,
        "fraction_of_rewrite_top": round(common / len(rewrite_top), 6) if rewrite_top else None,
    }


def spearman(raw_scores: list[float], rewrite_scores: list[float]) -> float | None:
    """Spearman's rho (scipy, ties averaged); None with fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    if len(raw_scores) < 3 or len(set(raw_scores)) < 2 or len(set(rewrite_scores)) < 2:
        return None
    rho = float(spearmanr(raw_scores, rewrite_scores).statistic)
    return None if math.isnan(rho) else round(rho, 6)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def table(report: dict) -> str:
    """The report as aligned `name  value` lines for the terminal."""
    rows = [
        ("pool documents / tokens", f"{report['pool']['documents']} / {report['pool']['tokens']:,}"),
        ("scored", f"{report['classify']['scored']}"),
        ("rewritten (replies) / tokens", f"{report['rewrite']['documents']} / {report['rewrite']['tokens']:,}"),
        (f"replies parsed ({report['rewrite']['prompt']['variant']} prompt)", _share(report["rewrite"]["parsed_share"])),
    ]
    for reason, n in sorted(report["filter"]["dropped"].items()):
        rows.append((f"  dropped: {reason}", str(n)))
    held = [report["classify"].get("held_out")] + list(report["filter"].get("held_out") or [])
    rows.append(("held-out AUC: classify / filter folds",
                 " / ".join("n/a" if h is None else str(h["auc"]) for h in held)))
    f = report["filter"]
    rows += [
        ("survived / kept rewrites", f"{f['survived']} / {f['kept']}"),
        ("raw top documents", str(report["overlap"]["raw_top"])),
        ("mixed: raw docs / tokens", f"{report['mix']['raw_documents']} / {report['mix']['raw_tokens']:,}"),
        ("mixed: rewritten docs / tokens",
         f"{report['mix']['rewritten_documents']} / {report['mix']['rewritten_tokens']:,}"),
        ("mixed store train tokens", f"{report['mix']['train_tokens']:,}"),
        ("top-set overlap (paper 0.183)", str(report["overlap"]["fraction_of_rewrite_top"])),
        ("spearman raw vs rewrite (paper 0.179)", str(report["spearman_raw_vs_rewrite"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
