"""The RunSpec: one frozen value that the planner writes, the executors ship and the trainer reads.

Torch-free. Every field has a docstring; every part validates itself on construction; variants are
made with `dataclasses.replace` (or `apply_overrides`), never by mutation. A run's identity is the
short hash of its canonical spec minus the fields that do not change what is trained
(`IDENTITY_EXCLUDE`).

Three modules: `spec` (the dataclasses and their validation), `load` (dicts, YAML, `--set`
overrides) and `identity` (run id, precision and device resolution); this package exports their
public names, which the rest of scaleforge imports from `scaleforge.config`.
"""

from scaleforge.config.identity import (
    IDENTITY_EXCLUDE,
    PRECISION_OF_KIND,
    check_device,
    resolve_precision,
    run_id,
    same_run,
)
from scaleforge.config.load import (
    RENAMED_KEYS,
    apply_overrides,
    from_dict,
    load_runspec,
    load_yaml_file,
    model_from_dict,
    spec_to_yaml,
    to_dict,
)
from scaleforge.config.spec import (
    DEVICE_KINDS,
    RUN_NAME_RE,
    SHARD_LEVELS,
    CheckpointSpec,
    DataSpec,
    EvalSpec,
    ParallelSpec,
    RunSpec,
    TrainSpec,
)

__all__ = [
    "CheckpointSpec", "DataSpec", "EvalSpec", "ParallelSpec", "RunSpec", "TrainSpec",
    "DEVICE_KINDS", "IDENTITY_EXCLUDE", "PRECISION_OF_KIND", "RENAMED_KEYS", "RUN_NAME_RE",
    "SHARD_LEVELS", "apply_overrides", "check_device", "from_dict", "load_runspec",
    "load_yaml_file", "model_from_dict", "resolve_precision", "run_id", "same_run", "spec_to_yaml",
    "to_dict",
]
