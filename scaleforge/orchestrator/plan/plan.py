"""The planner's core: the law a plan starts from, and one planned run for a budget.

Torch-free; `orchestrate plan` answers in under a second (no numpy, scipy or torch on this path).

A run of about N parameters becomes a shape by the family's rule (its config's `for_params`; the law's
N is the family's `law_variables()["N"]`, active parameters for MoE), trains D = budget /
flops_per_token tokens (the architecture's exact FLOPs, not 6N), with the Step Law's lr and batch and
a WSD schedule (`hparams.py`) on the layout `parallel/layout.py` finds on the cluster. The target is
the law's compute-optimal N at the full budget, shaped and planned the same way, with the predicted
loss and 95% intervals over the law's bootstrap samples. The law is the Epoch refit of Chinchilla
(`prior.py`, with 400 bootstrap refits on Epoch's points) until `--law fit.json` (from `orchestrate
refit`) replaces it. The ladder around it is `ladder.py`'s; the verb, `plan_cli.py`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from scaleforge.arch.registry import config_class
from scaleforge.config import RunSpec, apply_overrides, resolve_precision, run_id
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan import prior
from scaleforge.orchestrator.plan.cluster import DEFAULT_CLUSTER, Cluster
from scaleforge.orchestrator.plan.hparams import plan_hparams, round_sig, step_law_batch_tokens
from scaleforge.orchestrator.plan.planfile import LawInfo, Plan, PlannedRun, TargetRun, with_target
from scaleforge.parallel.checks import check_layout
from scaleforge.parallel.layout import search_layout

DEFAULT_UNIQUE_TOKENS = 15e12
"""Unique tokens assumed when neither --unique-tokens nor built stores say: FineWeb's 15T tokens
(Penedo et al. 2024)."""
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
    """`base` with what the family plans besides the shape (ParScale: P)."""
    return dataclasses.replace(base, model=base.model.plan_variant(params, budget, user_keys))


def _optimum(model, params: dict, budget: float) -> tuple[float, float]:
    """Compute-optimal (N, D): the family's (the law's unless its compute is not 6 N D: ParScale)."""
    return model.compute_optimal(params, budget)


def _loss(model, params: dict, n: float, d: float) -> float:
    """Predicted loss: the family's (the law's unless it joins its own to it: ParScale)."""
    return model.law_loss(params, n, d)


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
    check_budget(budget)
    law = _as_law(law_params, budget)
    if samples is None and law.source == "prior":
        samples = _prior_samples(law)
    base = _variant(base_spec(arch, overrides), law.params, budget, override_keys(overrides))
    base = for_cluster(base, cluster)
    seq_len = seq_len or default_seq_len(cluster, base)
    params = law.params
    n_opt, _ = _optimum(base.model, params, budget)
    run, warnings = plan_run(
        kind="target", budget=budget, n_target=n_opt, cluster=cluster, base=base, seq_len=seq_len,
        unique_tokens=unique_tokens, user_keys=override_keys(overrides),
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
# helpers


def _short(x: float) -> str:
    """3.2e19 -> '3.2e19', 1.0e8 -> '1e8': compact, and legal in run names."""
    mantissa, exponent = f"{x:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def override_keys(overrides) -> frozenset:
    """The RunSpec keys the `--set key=value` items name (what the user decided, not the planner)."""
    return frozenset(item.split("=", 1)[0].strip() for item in overrides)


def default_seq_len(cluster: Cluster, base: RunSpec) -> int:
    """2048 tokens on GPUs, else the family's own default (the CPU ladders use short samples)."""
    return 2048 if cluster.kind == "gpu" else base.data.seq_len


def check_budget(budget: float) -> None:
    """A one-line ConfigError unless `budget` is a finite positive number of FLOPs."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ConfigError(f"--budget must be a finite number of FLOPs, got {budget!r}")
    if budget <= 0:
        raise ConfigError(f"--budget must be > 0 FLOPs, got {budget:g}")
