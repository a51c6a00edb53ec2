"""Stage 2's record: the prompt and sampling settings the rewrites were made with.

The rewriting itself (batches fixed by pool position, committed one file per batch, reused on a
rerun) is `stages.rewrite_stage`, run by datatrove's executors.
"""

from __future__ import annotations

from scaleforge.data_pipeline.rewire import prompts
from scaleforge.data_pipeline.rewire.config import RewriteConfig


def settings(cfg: RewriteConfig, generator: dict) -> dict:
    """The prompt and sampling settings, recorded with the output and in the report."""
    return {
        "prompt": {"variant": cfg.prompt, "template": prompts.TEMPLATES[cfg.prompt]},
        "sampling": cfg.sampling(),
        "generator": generator,
        "min_length_ratio": cfg.min_length_ratio,
    }
