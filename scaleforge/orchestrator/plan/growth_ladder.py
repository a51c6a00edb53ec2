"""A planned growth ladder: the target trained in stages, each starting from the one before.

`orchestrate plan --budget C --arch tokenformer --growth-stages K` adds a `growth` section to the plan:
K runs whose last stage has the target's shape. The family's `growth_stages(K)` (torch-free, on its
config) gives each stage's shape and its share of the tokens; stage i > 0 has
`checkpoint.init_from: ../<stage i-1 name>-<run id>`, a path relative to its own run directory (so the
plan folder can move without changing a run id), and the trainer starts it from that run's last
checkpoint through the family's growth rule (pretrain/grow.py). `orchestrate submit PLAN --growth`
launches the stages, each after the one it starts from has completed.

Compute: the K stages together spend the budget C. With shares s_i of the tokens and FLOPs per token
f_i, the stages train D_i = s_i x C / sum_j(s_j f_j) tokens. TokenFormer: equal shares (the paper's 30B
tokens per stage), token counts doubling per stage. ParScale (K = 2): 1000/1020 of the tokens at P = 1,
then P > 1 (the paper's 1T + 20B). Each stage has its own Step-Law learning rate and batch, a fresh
optimizer and WSD schedule, and its own layout. Torch-free.
"""

from __future__ import annotations

import dataclasses

from scaleforge.config import run_id
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan.plan import plan_run

INIT_FROM_PREFIX = "../"
"""A stage names the run it starts from relative to its own run directory (a sibling under runs_dir)."""


def plan_growth(target, *, stages: int, base, cluster, seq_len: int, unique_tokens: float,
                user_keys: frozenset) -> tuple[tuple, list[str]]:
    """The growth stages (PlannedRuns) ending at `target`'s shape, and the planner's warnings."""
    check_stages(target.spec.model, stages)
    shapes = target.spec.model.growth_stages(stages)
    fpt = [shape.flops_per_token(seq_len) for shape, _ in shapes]
    tokens = target.budget / sum(share * f for (_, share), f in zip(shapes, fpt))
    runs, warnings = [], []
    previous = None
    for i, ((shape, share), f) in enumerate(zip(shapes, fpt)):
        run, notes = plan_run(
            kind=f"grow{i}", budget=share * tokens * f, n_target=0, model=shape, cluster=cluster,
            base=base, seq_len=seq_len, unique_tokens=unique_tokens, user_keys=user_keys,
        )
        warnings.extend(notes)
        if previous is not None:
            source = f"{INIT_FROM_PREFIX}{previous.name}-{previous.run_id}"
            spec = dataclasses.replace(
                run.spec, checkpoint=dataclasses.replace(run.spec.checkpoint, init_from=source))
            run = dataclasses.replace(run, spec=spec, run_id=run_id(spec))
        runs.append(run)
        previous = run
    return tuple(runs), warnings


def check_stages(model, stages: int) -> None:
    """The checks the planner makes before it plans anything (one-line ConfigErrors)."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 2:
        raise ConfigError(f"--growth-stages must be an integer of at least 2, got {stages!r}")
    if not model.plans_growth():
        model.growth_stages(stages)  # the contract's default: its one-line refusal


def source_name(run) -> str | None:
    """The name of the plan run a growth stage starts from (None for a run from its seed)."""
    source = run.spec.checkpoint.init_from
    if not source.startswith(INIT_FROM_PREFIX):
        return None
    return source[len(INIT_FROM_PREFIX):].rsplit("-", 1)[0]


def table_lines(runs) -> list[str]:
    """The growth section of the plan's table."""
    if not runs:
        return []
    lines = ["growth ladder (each stage starts from the previous one's last checkpoint):",
             f"  {'run':<36} {'shape':>10} {'N':>10} {'D':>10} {'FLOPs':>9} {'tp/pp/dp':>8} "
             f"{'steps':>6} {'lr':>8}  from"]
    for run in runs:
        p, t = run.spec.parallel, run.spec.train
        lines.append(
            f"  {run.name:<36} {run.spec.model.summary():>10} {run.N:>10.3g} {run.D:>10.3g} "
            f"{run.flops:>9.3g} {f'{p.tp}/{p.pp}/{p.dp}':>8} {t.steps:>6} {t.lr:>8.3g}  "
            f"{source_name(run) or '(seed)'}"
        )
    total = sum(run.flops for run in runs)
    lines.append(f"  total {total:.3g} FLOPs; `orchestrate submit PLAN --growth` trains the stages "
                 "in order")
    return lines
