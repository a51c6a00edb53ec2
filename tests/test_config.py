"""RunSpec contract: validation, YAML round trip, overrides, identity."""

import dataclasses

import pytest

from scaleforge.config import (
    RunSpec,
    apply_overrides,
    from_dict,
    load_runspec,
    run_id,
    spec_to_yaml,
    to_dict,
)
from scaleforge.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    spec = apply_overrides(RunSpec(), ["model.layers=2", "train.lr=1e-3", "data.stores=[a, b]"])
    path = tmp_path / "run.yaml"
    path.write_text(spec_to_yaml(spec))
    again = load_runspec(path)
    assert again == spec
    assert again.data.stores == ("a", "b")
    assert run_id(again) == run_id(spec)


def test_overrides_last_wins_and_values_are_yaml_scalars():
    spec = apply_overrides(RunSpec(), ["train.steps=5", "train.steps=7", "parallel.sp=true",
                                       "parallel.tp=2"])
    assert spec.train.steps == 7 and spec.parallel.sp is True and spec.parallel.tp == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.nope=1", "no such field 'model.nope'"),
        ("train=3", "is a section"),
        ("model.arch=unknown", "unknown architecture"),
        ("train.steps=many", "train.steps must be an integer"),
        ("noequals", "expected key.path=value"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunSpec(), [override])


def test_unknown_field_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config field 'train\.stpes'"):
        load_runspec(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_runspec(path)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"heads": 3}}, "must divide model.hidden"),
        ({"model": {"kv_heads": 3}}, "must divide model.heads"),
        ({"train": {"global_batch": 6, "micro_batch": 4}}, "not divisible"),
        ({"train": {"global_batch": 8, "micro_batch": 4}, "parallel": {"dp": 4}}, "micro_batch x parallel.dp"),
        ({"parallel": {"sp": True}}, "needs parallel.tp > 1"),
        ({"name": "a b;rm -rf"}, "is not allowed"),
        ({"train": {"schedule": "linear"}}, "cosine, wsd or constant"),
    ],
)
def test_validation_on_construction(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunSpec, data)


def test_identity_ignores_layout_but_not_training():
    spec = RunSpec()
    relaid = dataclasses.replace(spec, parallel=dataclasses.replace(spec.parallel, tp=2))
    assert run_id(relaid) == run_id(spec)
    longer = apply_overrides(spec, ["train.steps=101"])
    assert run_id(longer) != run_id(spec)


def test_replace_never_mutates():
    spec = RunSpec()
    before = to_dict(spec)
    apply_overrides(spec, ["train.steps=3", "model.hidden=128"])
    assert to_dict(spec) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_runspec_is_refused(tmp_path, text, capsys):
    from scaleforge.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="the RunSpec is empty; write at least name, model and train"):
        load_runspec(path)
    out = tmp_path / "out"
    assert main(["train", str(path), "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is empty" in err and not out.exists()


def test_binary_file_is_a_one_line_error(tmp_path, capsys):
    from scaleforge.cli import main

    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a YAML text file"):
        load_runspec(path)
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("field, value, message", [
    ("precision", "fp16", "train.precision must be auto, fp32 or bf16"),
    ("device", "tpu", "train.device must be any, cpu or gpu"),
])
def test_precision_and_device_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunSpec, {"train": {field: value}})
