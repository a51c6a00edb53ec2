"""`orchestrate plan`: a compute budget -> an IsoFLOP ladder of small runs and one target run.

Torch-free; the whole command answers in under a second (no numpy, scipy or torch on this path).

Ladder: `--budgets` compute budgets log-spaced from `--ladder-min` x C to `--ladder-max` x C (default
C/1000 to C/30), and at each one `--sizes` model sizes log-spaced over a factor `--size-span` either side
of the law's compute-optimal N there. Each size becomes a shape by the family's rule (its config's
`for_params`; the law's N is the family's `law_variables()["N"]`, active parameters for MoE), trains
D = budget / flops_per_token tokens (the architecture's exact FLOPs, not 6N), with the Step Law's lr and
batch and a WSD schedule (`hparams.py`) on the layout `parallel/layout.py` finds on the cluster.
Target: the law's compute-optimal N at C, shaped and planned the same way, with the predicted loss and
95% intervals over the law's bootstrap samples. The law is the Epoch refit of Chinchilla (`prior.py`,
with 400 bootstrap refits on Epoch's points) until `--law fit.json` (from `orchestrate refit`)
replaces it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from scaleforge.arch.registry import config_class, known_archs
from scaleforge.config import RunSpec, apply_overrides, resolve_precision, run_id
from scaleforge.errors import ConfigError
from scaleforge.orchestrator import prior
from scaleforge.orchestrator.cluster import DEFAULT_CLUSTER, Cluster, load_cluster
from scaleforge.orchestrator.hparams import plan_hparams, round_sig, step_law_batch_tokens
from scaleforge.orchestrator.planfile import (  # noqa: F401  (re-exported: the plan.yaml API)
    LawInfo, Plan, PlannedRun, TargetRun, load_plan, plan_from_dict, plan_to_dict, plan_to_yaml,
    run_dir, run_to_dict, save_plan, with_target,
)
from scaleforge.parallel.checks import check_layout
from scaleforge.parallel.layout import search_layout

DEFAULT_UNIQUE_TOKENS = 15e12
"""Unique tokens assumed when neither --unique-tokens nor built stores say: FineWeb's 15T tokens
(Penedo et al. 2024)."""
MAX_EPOCHS = 4.0
"""Past 4 epochs repeated tokens are worth markedly less than fresh ones (Muennighoff et al. 2023)."""
MIN_STEPS = 50
"""Fewer optimizer steps than this leave too little of a loss curve to fit: warn."""
PLANNED_KEYS = (
    "name", "data.seq_len", "train.steps", "train.global_batch", "train.micro_batch", "train.lr",
    "train.min_lr_ratio", "train.warmup_steps", "parallel.tp", "parallel.pp", "parallel.dp",
    "parallel.sp", "parallel.recompute", "train.device",
    # the memory levers: the layout search turns them on in order of cost, only when needed
    "parallel.shard", "parallel.activation_offload", "parallel.optimizer_offload",
    "parallel.grad_reduce_fp32",
)
"""RunSpec keys the planner decides; `--set` may not change them (use the flags instead). The
family's shape rule adds its own (`planned_fields` of its config: `model.layers`, ...)."""


# ----------------------------------------------------------------------------------------------
# the law


def prior_law(budget: float | None = None) -> LawInfo:
    """The documented prior for a budget: below `prior.SMALL_BELOW` FLOPs the small-model prior
    fitted to scaleforge's own CPU ladders, else Epoch's refit of Chinchilla; with 95% intervals."""
    if budget is not None and budget < prior.SMALL_BELOW:
        small = prior.small_prior()
        return LawInfo(
            name="chinchilla", params=small["params"], ci={k: list(v) for k, v in small["ci"].items()},
            source="prior", path=prior.SMALL_PATH,
        )
    return LawInfo(
        name="chinchilla", params=dict(prior.EPOCH_PARAMS),
        ci={k: list(v) for k, v in prior.EPOCH_CI.items()}, source="prior",
    )


def _prior_samples(law: LawInfo) -> list[dict]:
    return prior.small_prior()["samples"] if law.path == prior.SMALL_PATH else prior.prior_samples()


def law_from_fit(path: str | Path) -> tuple[LawInfo, list[dict]]:
    """A fit.json's law (and its bootstrap samples, when it has them)."""
    fit = prior.load_fit(path)
    law = LawInfo(
        name=fit["law"], params=fit["params"], ci={k: list(v) for k, v in fit["ci"].items()},
        source="fit", path=str(path),
    )
    return law, fit["samples"]


def _as_law(law: LawInfo | dict | None, budget: float | None = None) -> LawInfo:
    if law is None:
        return prior_law(budget)
    if isinstance(law, LawInfo):
        return law
    return LawInfo(name="chinchilla", params=dict(law), ci={}, source="fit")


# ----------------------------------------------------------------------------------------------
# one run


def base_spec(arch: str = "dense", overrides: tuple[str, ...] | list[str] = ()) -> RunSpec:
    """The RunSpec every planned run starts from: the family's defaults plus `--set` overrides."""
    family = config_class(arch)  # unknown arch: one-line error naming the known ones
    planned = PLANNED_KEYS + tuple(f"model.{name}" for name in family.planned_fields)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in planned:
            raise ConfigError(f"--set {key}: the planner decides it; use the plan flags instead")
        if key == "model.arch":
            raise ConfigError("--set model.arch: use --arch")
    spec = RunSpec(model=family())
    return apply_overrides(spec, [f"model.arch={arch}", *overrides])


def for_cluster(spec: RunSpec, cluster: Cluster) -> RunSpec:
    """`spec` bound to the cluster's kind of device: `train.device` set to it and a `precision: auto`
    resolved for it (bf16 on gpu, fp32 on cpu), so the run id names what will be trained and the
    trainer refuses the run on the other kind of machine."""
    spec = resolve_precision(spec, cluster.kind)
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, device=cluster.kind))


def _variant(base: RunSpec, params: dict, budget: float, user_keys: frozenset) -> RunSpec:
    """`base` with what the family plans besides the shape (ParScale: P), if it has such a rule."""
    rule = getattr(base.model, "plan_variant", None)
    return base if rule is None else dataclasses.replace(base, model=rule(params, budget, user_keys))


def _optimum(model, params: dict, budget: float) -> tuple[float, float]:
    """Compute-optimal (N, D): the family's own where its compute is not 6 N D (ParScale), else the
    law's."""
    rule = getattr(model, "compute_optimal", None)
    return rule(params, budget) if rule else prior.compute_optimal(params, budget)


def _loss(model, params: dict, n: float, d: float) -> float:
    """Predicted loss: the family's join with the law where it has one (ParScale), else the law's."""
    rule = getattr(model, "law_loss", None)
    return rule(params, n, d) if rule else prior.chinchilla_loss(params, n, d)


def plan_run(
    *, kind: str, budget: float, n_target: float, cluster: Cluster, base: RunSpec, seq_len: int,
    unique_tokens: float, user_keys: frozenset = frozenset(), model=None,
) -> tuple[PlannedRun, list[str]]:
    """Size, train and lay out one run of about `n_target` parameters for `budget` FLOPs (of the
    shape `model` when given: a growth stage)."""
    arch = base.model.arch
    if model is None:
        model = type(base.model).for_params(n_target, base.model)
    law_vars = model.law_variables()
    fpt = model.flops_per_token(seq_len)
    tokens = budget / fpt
    layout = search_layout(
        model, seq_len=seq_len, batch_target=step_law_batch_tokens(tokens) / seq_len, cluster=cluster
    )
    hp = plan_hparams(
        n_non_embedding=law_vars["N_non_embedding"], tokens=tokens, seq_len=seq_len,
        batch_multiple=layout.micro_batch * layout.dp,
    )
    assert hp.global_batch == layout.global_batch, (hp.global_batch, layout.global_batch)
    n = int(law_vars["N"])
    name = f"{arch}-{kind}-c{_short(budget)}-n{_short(n)}"
    train = dataclasses.replace(
        base.train, steps=hp.steps, global_batch=hp.global_batch, micro_batch=layout.micro_batch,
        lr=hp.lr, min_lr_ratio=hp.min_lr_ratio, warmup_steps=hp.warmup_steps,
        schedule=("wsd" if "train.schedule" not in user_keys else base.train.schedule),
        decay_fraction=(hp.decay_fraction if "train.decay_fraction" not in user_keys
                        else base.train.decay_fraction),
    )
    checkpoint = base.checkpoint
    if "checkpoint.every" not in user_keys:  # ten checkpoints a run
        checkpoint = dataclasses.replace(checkpoint, every=max(1, math.ceil(hp.steps / 10)))
    evaluation = base.eval
    if "eval.every" not in user_keys:  # twenty points on the eval-loss curve
        evaluation = dataclasses.replace(evaluation, every=max(1, math.ceil(hp.steps / 20)))
    parallel = layout.parallel_spec(base.parallel)  # layout, shard, recompute and offload
    spec = dataclasses.replace(
        base, name=name, model=model, data=dataclasses.replace(base.data, seq_len=seq_len),
        train=train, parallel=parallel, checkpoint=checkpoint, eval=evaluation,
    )
    check_layout(spec)  # the trainer's own checks: a planned spec must pass them
    d = hp.steps * hp.global_batch * seq_len
    epochs = d / unique_tokens
    warnings = []
    if hp.steps < MIN_STEPS:
        warnings.append(f"{name}: only {hp.steps} optimizer steps (< {MIN_STEPS}); raise the budget")
    run = PlannedRun(
        name=name, run_id=run_id(spec), budget=float(budget), N=n,
        N_non_embedding=int(law_vars["N_non_embedding"]), D=d, flops_per_token=fpt,
        flops=float(d * fpt), epochs=round_sig(epochs, 4), gpus=layout.gpus, nodes=layout.nodes,
        gpu_hours=round_sig(hp.steps * layout.step_time_s * layout.gpus / 3600, 4),
        layout=layout.summary(), spec=spec,
    )
    return run, warnings


def plan_target(
    law_params: LawInfo | dict | None, budget: float, arch: str = "dense",
    cluster: Cluster = DEFAULT_CLUSTER, *, seq_len: int | None = None,
    unique_tokens: float = DEFAULT_UNIQUE_TOKENS, overrides: tuple[str, ...] = (),
    samples: list[dict] | None = None,
) -> tuple[TargetRun, list[str]]:
    """The target run at `budget` from a law (a LawInfo, a params dict, or None for the prior)."""
    _check_budget(budget)
    law = _as_law(law_params, budget)
    if samples is None and law.source == "prior":
        samples = _prior_samples(law)
    base = _variant(base_spec(arch, overrides), law.params, budget, _keys(overrides))
    base = for_cluster(base, cluster)
    seq_len = seq_len or _default_seq_len(cluster, base)
    params = law.params
    n_opt, _ = _optimum(base.model, params, budget)
    run, warnings = plan_run(
        kind="target", budget=budget, n_target=n_opt, cluster=cluster, base=base, seq_len=seq_len,
        unique_tokens=unique_tokens, user_keys=_keys(overrides),
    )
    ci = {k: tuple(v) for k, v in law.ci.items()}
    model = base.model
    loss = _loss(model, params, run.N, run.D)
    loss_ci = prior.interval(lambda p: _loss(model, p, run.N, run.D), params, ci, samples)
    n_ci = prior.interval(lambda p: _optimum(model, p, budget)[0], params, ci, samples)
    # D in the tokens the run trains: budget / FLOPs per token of the shape at each sample's N (the
    # FLOPs per token scale with N), not the law's 6 N: MoR's recursions, ParScale's streams and the
    # attention term would otherwise leave the point D outside its own interval (MoR at 1e21: 2.9e10
    # against [5.1e10, 6.8e10]); a fit that cannot bound N from below (N_ci from 0) leaves D
    # unbounded above
    d_ci = tuple(sorted(budget * run.N / (run.flops_per_token * n) if n > 0 else math.inf
                        for n in n_ci))
    target = TargetRun(
        **{f.name: getattr(run, f.name) for f in dataclasses.fields(run)},
        loss=round_sig(loss, 5), loss_ci=tuple(round_sig(x, 5) for x in loss_ci),
        N_ci=tuple(round_sig(x, 4) for x in n_ci), D_ci=tuple(round_sig(x, 4) for x in d_ci),
    )
    return target, warnings


def replan_target(plan: Plan, law: LawInfo, samples: list[dict] | None = None) -> Plan:
    """`plan` with its target re-planned from `law` (the old target moves to `history`)."""
    target, _ = plan_target(
        law, plan.budget, plan.arch, plan.cluster, seq_len=plan.seq_len,
        unique_tokens=plan.unique_tokens, overrides=plan.overrides, samples=samples,
    )
    return with_target(plan, target, law)


# ----------------------------------------------------------------------------------------------
# the plan


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
    _check_budget(budget)
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
    seq_len = seq_len if seq_len is not None else _default_seq_len(cluster, base)
    user_keys = _keys(overrides)
    base = for_cluster(_variant(base, law.params, budget, user_keys), cluster)
    if growth_stages:
        from scaleforge.orchestrator.growth_ladder import check_stages

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
        from scaleforge.orchestrator.growth_ladder import plan_growth

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


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("plan_file", nargs="?", metavar="PLAN",
        help="with --extend: the refitted plan.yaml to add runs to (written in place)")
    add("--extend", default=None, metavar="K",
        help="add K runs chosen to shrink the target loss's interval most (needs PLAN, after refit)")
    add("--allowance", default=None, metavar="C",
        help="with --extend: FLOPs the added runs may spend (default: one more IsoFLOP budget)")
    add("--budget", metavar="C", help="target compute in FLOPs, e.g. 1e21")
    add("--arch", default="dense", help=f"architecture family (known: {', '.join(known_archs())})")
    add("--cluster", metavar="FILE", help="cluster YAML (default: 16 nodes of 8 x H100 80 GB)")
    add("--law", metavar="FILE", help="fit.json to plan from (default: the Chinchilla prior)")
    add("--out", default="plan.yaml", metavar="PLAN", help="plan file to write (plan.yaml)")
    add("--ladder-min", default="1e-3", metavar="F", help="smallest ladder budget / C (1e-3)")
    add("--ladder-max", default=str(1 / 30), metavar="F", help="largest ladder budget / C (1/30)")
    add("--budgets", default="5", metavar="K", help="ladder budgets (5)")
    add("--sizes", default="7", metavar="S", help="model sizes per ladder budget (7)")
    add("--size-span", default="4", metavar="X", help="sizes span N_opt/X .. N_opt*X (4)")
    add("--unique-tokens", default=None, metavar="T",
        help="unique tokens in the data pool (default: the stores' train tokens, "
        f"or {DEFAULT_UNIQUE_TOKENS:.3g} when they are not built here)")
    add("--seq-len", default=None, metavar="S", help="sequence length (2048 on GPUs)")
    add("--runs-dir", default="runs", metavar="DIR", help="run directories, beside the plan (runs)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="RunSpec override for every run, e.g. model.vocab_size=32000 (repeatable)")
    add("--growth-stages", default="0", metavar="K",
        help="also plan the target as a growth ladder of K stages, each starting from the "
        "previous one's checkpoint (families with a growth rule: tokenformer, parscale)")
    add("--quiet", action="store_true", help="do not print the table")


def run(args: argparse.Namespace) -> int:
    if args.extend is not None or args.plan_file is not None:
        return _run_extend(args)
    if args.budget is None:
        raise ConfigError("--budget is required (or PLAN --extend K to add runs to a refitted plan)")
    budget = _number("--budget", args.budget)
    _check_budget(budget)
    cluster = load_cluster(args.cluster) if args.cluster else DEFAULT_CLUSTER
    law, samples = law_from_fit(args.law) if args.law else (prior_law(budget), None)
    plan = make_plan(
        budget, arch=args.arch, cluster=cluster, law=law, samples=samples,
        ladder_min=_number("--ladder-min", args.ladder_min),
        ladder_max=_number("--ladder-max", args.ladder_max),
        budgets=_integer("--budgets", args.budgets), sizes=_integer("--sizes", args.sizes),
        size_span=_number("--size-span", args.size_span),
        unique_tokens=(_number("--unique-tokens", args.unique_tokens)
                       if args.unique_tokens is not None else None),
        seq_len=_integer("--seq-len", args.seq_len) if args.seq_len is not None else None,
        overrides=tuple(args.overrides), runs_dir=args.runs_dir,
        growth_stages=_integer("--growth-stages", args.growth_stages),
    )
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the plan file, e.g. {out / 'plan.yaml'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    if not args.quiet:
        from scaleforge.orchestrator.plan_table import print_plan

        print_plan(plan)
        from scaleforge.orchestrator.growth_ladder import table_lines

        for line in table_lines(plan.growth):
            print(line)
    save_plan(plan, out)
    sys.stdout.flush()
    for line in plan.warnings:
        print(f"warning: {line}", file=sys.stderr)
    sys.stderr.flush()
    print(f"wrote {out}")
    return 0


def _run_extend(args: argparse.Namespace) -> int:
    """`plan PLAN --extend K`: add the K runs that most shrink the target's interval, in place."""
    from scaleforge.orchestrator import extend

    if args.plan_file is None or args.extend is None:
        raise ConfigError("use `orchestrate plan PLAN --extend K` (both PLAN and --extend)")
    if args.budget is not None:
        raise ConfigError("--extend keeps the plan's budget: drop --budget")
    path = Path(args.plan_file)
    plan = load_plan(path)
    if plan.law.source != "fit" or not plan.law.path:
        raise ConfigError(f"{path}: planned from the prior; run `orchestrate refit {path}` before --extend")
    fit = prior.load_fit(plan.law.path)
    fit["residuals"] = json.loads(Path(plan.law.path).read_text()).get("residuals") or []
    allowance = _number("--allowance", args.allowance) if args.allowance is not None else None
    new, choice, _ = extend.extend_plan(plan, fit, k=_integer("--extend", args.extend), allowance=allowance)
    added = new.ladder[len(plan.ladder):]
    before = math.sqrt(choice.variance_before)
    print(f"target log-loss sd over the fit's bootstrap samples: {before:.4g}")
    for run, var in zip(added, choice.variance_after):
        print(f"  + {run.name}  N={run.N:.3g} D={run.D:.3g} FLOPs={run.flops:.3g}  "
              f"expected sd {math.sqrt(var):.4g}")
    print(f"{len(added)} runs, {choice.cost:.3g} FLOPs of the allowance")
    save_plan(new, path)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# helpers


def _short(x: float) -> str:
    """3.2e19 -> '3.2e19', 1.0e8 -> '1e8': compact, and legal in run names."""
    mantissa, exponent = f"{x:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _keys(overrides) -> frozenset:
    return frozenset(item.split("=", 1)[0].strip() for item in overrides)


def _default_seq_len(cluster: Cluster, base: RunSpec) -> int:
    return 2048 if cluster.kind == "gpu" else base.data.seq_len


def _number(flag: str, text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {text!r}")
    return value


def _integer(flag: str, text) -> int:
    value = _number(flag, text)
    if not value.is_integer():
        raise ConfigError(f"{flag} must be an integer, got {text!r}")
    return int(value)


def _check_budget(budget: float) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ConfigError(f"--budget must be a finite number of FLOPs, got {budget!r}")
    if budget <= 0:
        raise ConfigError(f"--budget must be > 0 FLOPs, got {budget:g}")


def _check_positive(flag: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag} must be a positive number, got {value!r}")
