"""A run's identity, the run id: the short hash of its canonical spec minus the fields that do not
change what is trained; and the device-dependent `train.precision: auto` the trainer resolves before
taking it."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from scaleforge.config.load import to_dict
from scaleforge.config.spec import RunSpec
from scaleforge.errors import ConfigError

PRECISION_OF_KIND = {"cpu": "fp32", "gpu": "bf16"}
"""What `train.precision: auto` resolves to on each kind of device (bf16 needs a GPU's tensor cores
to pay; CPU kernels run fp32)."""

# Layout and checkpoint cadence do not change what a run trains, so they are not part of its identity:
# the same run may be resumed under another layout and stays the same run.
IDENTITY_EXCLUDE = ("parallel", "checkpoint")


def resolve_precision(spec: RunSpec, kind: str) -> RunSpec:
    """`spec` with `train.precision: auto` resolved for a device of `kind` (`cpu` or `gpu`)."""
    if kind not in PRECISION_OF_KIND:
        raise ConfigError(f"device kind must be cpu or gpu, got {kind!r}")
    if spec.train.precision != "auto":
        return spec
    train = dataclasses.replace(spec.train, precision=PRECISION_OF_KIND[kind])
    return dataclasses.replace(spec, train=train)


def check_device(spec: RunSpec, kind: str) -> None:
    """Refuse a run planned for one kind of device (`train.device`) on the other."""
    if spec.train.device not in ("any", kind):
        raise ConfigError(
            f"train.device is {spec.train.device} (the plan's cluster) but this machine is {kind}: "
            f"train it on a {spec.train.device} machine, or re-plan with a {kind} cluster"
        )


def same_run(written: RunSpec, planned: RunSpec) -> bool:
    """Whether `written` (a run directory's run.yaml) is the run `planned` describes: the same run
    id, or the same once the trainer has resolved the planned spec's `precision: auto`."""
    if run_id(written) == run_id(planned):
        return True
    kinds = [k for k, p in PRECISION_OF_KIND.items() if p == written.train.precision]
    return any(run_id(resolve_precision(planned, k)) == run_id(written) for k in kinds)


def run_id(spec: RunSpec) -> str:
    """Short hash of the canonical spec without the fields in IDENTITY_EXCLUDE."""
    data = {k: v for k, v in to_dict(spec).items() if k not in IDENTITY_EXCLUDE}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
