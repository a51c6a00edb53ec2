"""The loss law a plan starts from before any fit of its own, and the closed forms the planner needs.

Torch-free and numpy-free (the `plan` verb must answer in well under a second).

Prior: Epoch AI's refit of Chinchilla's Approach 3 (Besiroglu et al. 2024, arXiv 2404.10102),
L(N, D) = E + A / N^alpha + B / D^beta with A=482.01, B=2085.43, E=1.8169, alpha=0.3478, beta=0.3658
and the 95% intervals below. N counts all parameters (Chinchilla includes the embeddings), D tokens.

Its uncertainty: `prior_samples()` (400 bootstrap refits on Epoch's data, correlations kept).

The closed forms (the loss, the compute-optimal allocation under C = 6 N D) live in
`arch/common/law.py`, below the planner, where a family's planning rules reach them too; they are
re-exported here as `chinchilla_loss` and `compute_optimal`.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from scaleforge.arch.common.law import chinchilla_loss, compute_optimal  # noqa: F401  (the planner's names for them)
from scaleforge.errors import ConfigError

PARAM_NAMES = ("A", "B", "E", "alpha", "beta")

EPOCH_PARAMS = {"A": 482.01, "B": 2085.43, "E": 1.8169, "alpha": 0.3478, "beta": 0.3658}
"""Epoch AI's Huber-likelihood refit of Chinchilla (methods 8.1)."""

EPOCH_CI = {
    "A": (285.2, 743.6),
    "B": (1042.4, 5810.3),
    "E": (1.769, 1.871),
    "alpha": (0.317, 0.373),
    "beta": (0.331, 0.415),
}
"""Their 95% bootstrap intervals."""


SAMPLES_FILE = Path(__file__).with_name("prior_samples.yaml")
"""400 bootstrap refits of Approach 3 on Epoch's 240 points (written by `fit/prior_fit.py`'s
`write_samples`)."""

SMALL_BELOW = 1e14
"""Plans for budgets below this many FLOPs start from the small-model prior: about 50x the largest
budget of the ladders it was fitted to (6e11), where Chinchilla's law, fitted from 7e7 parameters up,
puts the compute-optimal model below the smallest shape of a 512-id vocabulary and predicts losses
4x too high."""
SMALL_DATA = Path(__file__).with_name("small_ladder.csv")
"""The small-model prior's data: final losses of scaleforge's own CPU ladders on the bundled corpus
(512-id BPE, 128-token samples, WSD), one row a run (`fit/prior_fit.py`'s `collect_small`)."""
SMALL_FILE = Path(__file__).with_name("small_prior.yaml")
"""Its fit: parameters, 95% intervals and bootstrap samples (`fit/prior_fit.py`'s `write_small`)."""
SMALL_PATH = "small"
"""`LawInfo.path` of the small-model prior (the Chinchilla one has an empty path)."""


def small_prior() -> dict:
    """The small-model prior: {params, ci, samples} fitted to `SMALL_DATA`."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(SMALL_FILE.read_text(), Loader=loader)
    return {
        "params": {k: float(data["params"][k]) for k in PARAM_NAMES},
        "ci": {k: tuple(float(v) for v in data["ci"][k]) for k in PARAM_NAMES},
        "samples": [dict(zip(PARAM_NAMES, (float(v) for v in row))) for row in data["samples"]],
    }


def prior_samples() -> list[dict]:
    """The prior's bootstrap samples as parameter dicts: its joint (correlated) uncertainty.

    Each is a Huber (delta 1e-3) Approach-3 refit of the 240 points Epoch digitised from Chinchilla's
    figure 4 (5 highest losses dropped), resampled with replacement. Their per-parameter 95% ranges
    (A 276-721, B 1151-6573, E 1.772-1.876, alpha 0.315-0.371, beta 0.336-0.421) are close to Epoch's
    published intervals; unlike the box of those intervals they keep the parameters' correlation, so
    at 1e21 FLOPs N_opt spans 2.4e9-3.3e9 instead of 5.3e7-1.3e11 over the box's corners.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(SAMPLES_FILE.read_text(), Loader=loader)
    return [dict(zip(PARAM_NAMES, (float(v) for v in row))) for row in data["samples"]]


def interval(fn, params: dict, ci: dict, samples: list[dict] | None = None) -> tuple[float, float]:
    """[lo, hi] of fn(params) under the law's uncertainty.

    With bootstrap samples: their 2.5% and 97.5% percentiles. Without: the range over the 32 corners of
    the box of per-parameter intervals, which ignores the (strong) correlation between the parameters
    and so is much wider than the joint interval.
    """
    if samples:
        values = sorted(fn({**params, **s}) for s in samples)
        lo = values[int(math.floor(0.025 * (len(values) - 1)))]
        hi = values[int(math.ceil(0.975 * (len(values) - 1)))]
        return lo, hi
    names = [k for k in PARAM_NAMES if k in ci]
    values = [fn(params)]
    for corner in itertools.product((0, 1), repeat=len(names)):
        values.append(fn({**params, **{k: ci[k][i] for k, i in zip(names, corner)}}))
    return min(values), max(values)


def load_fit(path: str | Path) -> dict:
    """Read a fit.json: {law, params {A,B,E,alpha,beta}, ci {name: [lo, hi]}, optional samples}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--law {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--law {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--law {path}: expected a JSON object with keys law, params, ci")
    for key in ("law", "params", "ci"):
        if key not in data:
            raise ConfigError(f"--law {path}: missing key '{key}' (expected law, params, ci)")
    if data["law"] != "chinchilla":
        raise ConfigError(
            f"--law {path}: law {data['law']!r} cannot plan sizes; the planner needs a chinchilla fit"
        )
    params, ci = data["params"], data["ci"]
    if not isinstance(params, dict) or not isinstance(ci, dict):
        raise ConfigError(f"--law {path}: params and ci must be objects")
    for name in PARAM_NAMES:
        value = params.get(name)
        if not _finite(value):
            raise ConfigError(f"--law {path}: params.{name} must be a finite number, got {value!r}")
    if not (params["alpha"] > 0 and params["beta"] > 0 and params["A"] > 0 and params["B"] > 0):
        raise ConfigError(f"--law {path}: A, B, alpha and beta must be > 0 to plan an allocation")
    clean_ci = {}
    for name, pair in ci.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(map(_finite, pair))):
            raise ConfigError(f"--law {path}: ci.{name} must be [lo, hi], got {pair!r}")
        clean_ci[name] = (float(pair[0]), float(pair[1]))
    samples = data.get("samples") or []
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise ConfigError(f"--law {path}: samples must be a list of parameter objects")
    return {
        "law": "chinchilla",
        "params": {k: float(params[k]) for k in PARAM_NAMES},
        "ci": clean_ci,
        "samples": [{k: float(s[k]) for k in PARAM_NAMES if k in s} for s in samples],
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
