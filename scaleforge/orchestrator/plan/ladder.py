"""The whole plan: an IsoFLOP ladder of small runs around the target, for one compute budget.

Torch-free, numpy-free (part of `orchestrate plan`'s second).

Ladder: `budgets` compute budgets log-spaced from `ladder_min` x C to `ladder_max` x C (default C/1000
to C/30), and at each one `sizes` model sizes log-spaced over a factor `size_span` either side of the
law's compute-optimal N there, each planned as one run (`plan.py`'s `plan_run`); the target and, with
`growth_stages`, its growth ladder (`growth_ladder.py`) complete the plan.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan.cluster import DEFAULT_CLUSTER, Cluster
from scaleforge.orchestrator.plan.growth_ladder import check_stages, plan_growth
from scaleforge.orchestrator.plan.hparams import round_sig
from scaleforge.orchestrator.plan.plan import (
    DEFAULT_UNIQUE_TOKENS, _optimum, _variant, base_spec, check_budget, default_seq_len, for_cluster,
    override_keys, plan_run, plan_target, prior_law,
)
from scaleforge.orchestrator.plan.planfile import LawInfo, Plan, PlannedRun

MAX_EPOCHS = 4.0
"""Past 4 epochs repeated tokens are worth markedly less than fresh ones (Muennighoff et al. 2023)."""


def ladder_budgets(budget: float, lo: float, hi: float, count: int) -> list[float]:
    """`count` budgets log-spaced from lo x budget to hi x budget, 2 significant digits each."""
    if count == 1:
        return [round_sig(budget * math.sqrt(lo * hi), 2)]
    step = math.log(hi / lo) / (count - 1)
    return [round_sig(budget * lo * math.exp(i * step), 2) for i in range(count)]


def ladder_sizes(n_opt: float, count: int, span: float) -> list[float]:
    """`count` sizes log-spaced over a factor `span` either side of n_opt."""
    if count == 1:
        return [n_opt]
    half = (count - 1) / 2
    return [n_opt * span ** ((i - half) / half) for i in range(count)]


def make_plan(
    budget: float, *, arch: str = "dense", cluster: Cluster = DEFAULT_CLUSTER,
    law: LawInfo | None = None, samples: list[dict] | None = None,
    ladder_min: float = 1e-3, ladder_max: float = 1 / 30, budgets: int = 5, sizes: int = 7,
    size_span: float = 4.0, unique_tokens: float | None = None,
    seq_len: int | None = None, overrides: tuple[str, ...] = (), runs_dir: str = "runs",
    growth_stages: int = 0,
) -> Plan:
    """The whole plan (ladder + target); deterministic in its arguments."""
    check_budget(budget)
    _check_positive("--size-span", size_span)
    if not 0 < ladder_min <= ladder_max < 1:
        raise ConfigError(
            f"need 0 < --ladder-min <= --ladder-max < 1, got {ladder_min:g} and {ladder_max:g}"
        )
    if not (isinstance(budgets, int) and budgets >= 1):
        raise ConfigError(f"--budgets must be a positive integer, got {budgets!r}")
    if not (isinstance(sizes, int) and 1 <= sizes <= 15):
        raise ConfigError(f"--sizes must be an integer from 1 to 15 (5-9 is usual), got {sizes!r}")
    bad_seq = isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0
    if seq_len is not None and bad_seq:
        raise ConfigError(f"--seq-len must be a positive integer, got {seq_len!r}")
    if size_span <= 1 and sizes > 1:
        raise ConfigError(f"--size-span must be > 1 with several sizes, got {size_span:g}")
    law = law or prior_law(budget)
    base = base_spec(arch, overrides)
    seq_len = seq_len if seq_len is not None else default_seq_len(cluster, base)
    user_keys = override_keys(overrides)
    base = for_cluster(_variant(base, law.params, budget, user_keys), cluster)
    if growth_stages:
        check_stages(base.model, growth_stages)
    warnings: list[str] = []
    if unique_tokens is None:
        unique_tokens = pool_tokens(base.data.stores)
        if unique_tokens is None:
            unique_tokens = DEFAULT_UNIQUE_TOKENS
            warnings.append(
                f"data stores {', '.join(base.data.stores)} not readable here: assumed "
                f"{DEFAULT_UNIQUE_TOKENS:.3g} unique tokens; pass --unique-tokens"
            )
    _check_positive("--unique-tokens", unique_tokens)
    ladder: list[PlannedRun] = []
    skipped: list[float] = []
    for b in ladder_budgets(budget, ladder_min, ladder_max, budgets):
        n_opt, _ = _optimum(base.model, law.params, b)
        runs, notes, below = _budget_sizes(
            b, n_opt, sizes, size_span, cluster=cluster, base=base, seq_len=seq_len,
            unique_tokens=unique_tokens, user_keys=user_keys,
        )
        skipped.extend(below)
        ladder.extend(runs)
        warnings.extend(notes)
        want = min(sizes, MIN_PARABOLA_SIZES)
        under = sum(1 for r in runs if r.N < n_opt)
        if len(runs) < want or (sizes >= MIN_PARABOLA_SIZES and under < 2):
            floor = f"{min(below):.3g}" if below else "none"
            warnings.append(
                f"budget {b:.3g}: {len(runs)} sizes, {under} below its optimum N={n_opt:.3g} (a "
                f"parabola needs {want}, 2 or more on each side): the smallest shape for vocab_size="
                f"{base.model.vocab_size} floors the sizes (smallest size asked for: {floor}); "
                "raise --ladder-min, lower model.vocab_size or widen --size-span"
            )
    if not ladder:
        raise ConfigError(
            f"no ladder run fits budget {budget:.3g}: every size is below the smallest model; "
            "raise --budget or lower model.vocab_size"
        )
    target, notes = plan_target(
        law, budget, arch, cluster, seq_len=seq_len, unique_tokens=unique_tokens,
        overrides=overrides, samples=samples,
    )
    warnings.extend(notes)
    growth: tuple = ()
    if growth_stages:  # the target trained in stages, each from the previous one's checkpoint
        growth, notes = plan_growth(
            target, stages=growth_stages, base=base, cluster=cluster, seq_len=seq_len,
            unique_tokens=unique_tokens, user_keys=user_keys,
        )
        warnings.extend(notes)
    if skipped:
        warnings.append(
            f"{len(skipped)} ladder sizes below the smallest model for vocab_size="
            f"{base.model.vocab_size} skipped (the largest was {max(skipped):.3g} parameters); "
            "raise --ladder-min or lower model.vocab_size to keep them"
        )
    warnings.extend(_epoch_warnings([*ladder, target], unique_tokens))
    return Plan(
        budget=float(budget), arch=arch, law=law, cluster=cluster, seq_len=seq_len,
        unique_tokens=float(unique_tokens), runs_dir=runs_dir, overrides=tuple(overrides),
        ladder=tuple(ladder),
        target=target, growth=growth, history=(), warnings=tuple(warnings),
    )


MIN_PARABOLA_SIZES = 5
"""Sizes a ladder budget needs, around its minimum, for its IsoFLOP parabola to be trusted."""
NUDGE = 1.15
"""Factor by which a size whose shape another size already took is moved to find a free shape."""


def _budget_sizes(b, n_opt, sizes, span, **kw) -> tuple[list, list[str], list[float]]:
    """The runs of one ladder budget: `sizes` distinct shapes log-spaced over n_opt / span ..
    n_opt x span. At tiny widths two sizes can round to one shape; the second is then nudged (by
    NUDGE, up to 4 times either way, staying within the span) to the nearest free shape. Returns
    (runs, planning notes, sizes below the smallest shape)."""
    runs, notes, below = [], [], []
    seen: set[int] = set()
    lo, hi = n_opt / span * (1 - 1e-9), n_opt * span * (1 + 1e-9)
    for n in ladder_sizes(n_opt, sizes, span):
        tries = [n] + [n * NUDGE ** (s * k) for k in range(1, 5) for s in (1, -1)]
        for m in tries:
            if not lo <= m <= hi and m != n:
                continue
            try:
                run, more = plan_run(kind="ladder", budget=b, n_target=m, **kw)
            except ConfigError as exc:  # a size below the smallest shape: drop it, say so
                if "below the smallest" not in str(exc):
                    raise
                if m == n:
                    below.append(n)
                    break
                continue
            if run.N in seen:
                continue
            seen.add(run.N)
            runs.append(run)
            notes.extend(more)
            break
    return runs, notes, below


def pool_tokens(stores: tuple[str, ...]) -> float | None:
    """Training tokens in the data stores, or None when one of them is not readable here.

    Reads the store metadata (the root `zarr.json` attributes, `splits.train.tokens`, as
    `data_pipeline/store.py` documents it) directly: importing the data pipeline pulls in numpy,
    0.12-0.2 s of the one second `orchestrate plan` may take. tests/test_plan.py checks that this
    agrees with `open_store(...).num_tokens("train")`.
    """
    total = 0
    for name in stores:
        if name == "bundled":  # data_pipeline.store.store_path: $SCALEFORGE_HOME/stores/bundled
            home = os.environ.get("SCALEFORGE_HOME")
            root = Path(home).expanduser() if home else Path.home() / ".cache" / "scaleforge"
            path = root / "stores" / "bundled"
        else:
            path = Path(name).expanduser()
        try:
            meta = json.loads((path / "zarr.json").read_text())
            total += int(meta["attributes"]["splits"]["train"]["tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return float(total)


def _epoch_warnings(runs: list[PlannedRun], unique_tokens: float) -> list[str]:
    over = [r for r in runs if r.epochs > MAX_EPOCHS]
    if not over:
        return []
    worst = max(over, key=lambda r: r.epochs)
    return [
        f"{len(over)} of {len(runs)} runs repeat the {unique_tokens:.3g} unique tokens more than "
        f"{MAX_EPOCHS:g} times (up to {worst.epochs:.1f} epochs, {worst.name}): data-constrained, "
        "repeats are worth less than fresh tokens; add data or recycle it with REWIRE"
    ]


def _check_positive(flag: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag} must be a positive number, got {value!r}")
