"""A plan's runs as entries to launch: spec, run directory, resources, and the runs each waits
for. Torch-free.

A run's identity is its run id (`scaleforge.config.run_id`); its directory is
`<runs_dir>/<name>-<run_id>` (names and files: `scaleforge.rundir`). A run whose
`checkpoint.init_from` names another run of the same plan (a growth stage) waits for that run: it is
launched only after its source completed (`RunEntry.after`, `runs.RunState.waits_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from scaleforge import rundir
from scaleforge.config import RunSpec, from_dict, load_yaml_file, run_id, same_run, spec_to_yaml
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan import planfile


@dataclass(kw_only=True, frozen=True)
class RunEntry:
    """One run to launch: its spec, its directory and the resources it asks for."""

    name: str
    """Run name (the RunSpec's name)."""
    spec: RunSpec
    """The full RunSpec the trainer reads."""
    run_dir: Path
    """`<runs_dir>/<name>-<run_id>`."""
    nodes: int = 1
    """Nodes the run spans (ranks are spread evenly over them)."""
    gpus_per_node: int = 0
    """Accelerators per node; 0 for CPU ranks."""
    time_min: int = 60
    """Wall-clock limit per job in minutes (a longer run continues in its continuation jobs)."""
    after: tuple[Path, ...] = ()
    """Run directories of the plan's runs this run starts from (`checkpoint.init_from`): it is
    launched only after they completed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "after", tuple(Path(p) for p in self.after))
        if self.nodes < 1 or self.ranks % self.nodes:
            raise ConfigError(
                f"run {self.name}: {self.ranks} ranks cannot be spread evenly over {self.nodes} nodes"
            )
        if self.gpus_per_node < 0 or self.time_min < 1:
            raise ConfigError(f"run {self.name}: gpus_per_node must be >= 0 and time_min >= 1")

    @property
    def run_id(self) -> str:
        """The run's identity: the short hash of its spec."""
        return run_id(self.spec)

    @property
    def ranks(self) -> int:
        """Processes the run needs: tp x pp x dp (one srun task or torchrun worker each)."""
        return self.spec.parallel.world_size

    @property
    def ranks_per_node(self) -> int:
        """Processes per node."""
        return self.ranks // self.nodes

    @property
    def spec_path(self) -> Path:
        """The RunSpec YAML the trainer is started with."""
        return rundir.spec_path(self.run_dir)

    @property
    def after_names(self) -> tuple[str, ...]:
        """The names of the runs in `after` (`<name>-<run_id>` directories)."""
        return tuple(run_name(p) for p in self.after)


def run_name(run_dir: str | Path) -> str:
    """The run name of a `<name>-<run_id>` directory."""
    return Path(run_dir).name.rsplit("-", 1)[0]


def run_dir_for(runs_dir: str | Path, name: str, rid: str) -> Path:
    """`<runs_dir>/<name>-<run_id>`."""
    return Path(runs_dir) / f"{name}-{rid}"


def entries_from_specs(
    pairs: Iterable[tuple[str, RunSpec]], runs_dir: str | Path, *, time_min: int = 60
) -> list[RunEntry]:
    """Entries for (name, RunSpec) pairs, one node each, CPU ranks."""
    out = []
    for name, spec in pairs:
        if spec.name != name:
            spec = replace(spec, name=name)
        out.append(RunEntry(name=name, spec=spec, run_dir=run_dir_for(runs_dir, name, run_id(spec)),
                            time_min=time_min))
    _check_unique(out)
    return out


def entries_from_plan(plan_path: str | Path, *, target: bool = False, time_min: int | None = None,
                      only: Iterable[str] = (), growth: bool = False, plan=None) -> list[RunEntry]:
    """Entries for a plan's ladder (and its target when `target`, its growth stages when `growth`),
    filtered to `only` names. A run whose checkpoint.init_from names another run directory of the
    plan waits for that run (`RunEntry.after`). `plan`: the plan already loaded from `plan_path`."""
    plan = planfile.load_plan(plan_path) if plan is None else plan
    growth_runs = list(plan.growth)
    runs = list(plan.ladder) + ([plan.target] if target else []) + (growth_runs if growth else [])
    every = {planfile.run_dir(plan, plan_path, r).resolve(): planfile.run_dir(plan, plan_path, r)
             for r in (*plan.ladder, plan.target, *growth_runs)}
    gpu = plan.cluster.kind == "gpu"
    out = []
    for run in runs:
        if run.run_id != run_id(run.spec):
            raise ConfigError(
                f"{plan_path}: run {run.name} has run_id {run.run_id} but its spec hashes to "
                f"{run_id(run.spec)}; re-plan instead of editing specs by hand"
            )
        ranks = run.spec.parallel.world_size
        nodes = max(1, int(run.nodes))
        limit = time_min if time_min is not None else _time_limit_min(run.gpu_hours, ranks)
        run_dir = planfile.run_dir(plan, plan_path, run)
        out.append(RunEntry(
            name=run.name, spec=run.spec, run_dir=run_dir, nodes=nodes,
            gpus_per_node=ranks // nodes if gpu else 0, time_min=limit,
            after=_sources(run.spec, run_dir, every),
        ))
    _check_unique(out)
    only = list(only)
    if only:
        known = {e.name for e in out}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ConfigError(
                f"--only {unknown[0]}: no such run in {plan_path}; runs: {', '.join(sorted(known))}"
                + ("" if target else " (add --target for the target run)")
            )
        out = [e for e in out if e.name in only]
    return out


def _sources(spec: RunSpec, run_dir: Path, plan_dirs: dict[Path, Path]) -> tuple[Path, ...]:
    """The plan run directory `checkpoint.init_from` names (relative to the run's own directory, as
    the trainer reads it there), if it names one."""
    source = spec.checkpoint.init_from
    if not source:
        return ()
    path = Path(source)
    path = (path if path.is_absolute() else run_dir / path).resolve()
    return (plan_dirs[path],) if path in plan_dirs else ()


def _time_limit_min(gpu_hours: float, ranks: int) -> int:
    # Twice the planned time plus 10 minutes: the plan's estimate assumes an MFU the run may not reach.
    # A run that still hits the limit saves on the warning signal and continues in its next job.
    per_rank_min = 60.0 * float(gpu_hours) / max(1, ranks)
    return max(10, math.ceil(2 * per_rank_min + 10))


def _check_unique(entries: list[RunEntry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise ConfigError(f"two runs are named {e.name!r}: run names must be unique in a plan")
        seen[e.name] = e.run_id


def prepare_run_dir(entry: RunEntry) -> None:
    """Create the run directory and write run.yaml (refusing a directory that holds another run)."""
    entry.run_dir.mkdir(parents=True, exist_ok=True)
    rundir.log_dir(entry.run_dir).mkdir(exist_ok=True)
    if entry.spec_path.exists():
        try:
            old = from_dict(RunSpec, load_yaml_file(entry.spec_path))
        except ConfigError as exc:
            raise ConfigError(f"{entry.spec_path} is not a valid RunSpec ({exc}); move it away") from None
        if not same_run(old, entry.spec):  # `precision: auto` is resolved by the trainer
            raise ConfigError(
                f"{entry.run_dir} holds run {run_id(old)}, not {entry.run_id}: move that directory away"
            )
    rundir.write_atomic(entry.spec_path, spec_to_yaml(entry.spec))
