"""`orchestrate export RUN_DIR --to hf OUT`: transformers' logits equal scaleforge's (fp32, CPU).

Five tiny runs, each trained once per module (2 steps, seq 32, hidden 64), cover the targets and the
layouts a checkpoint is gathered from: dense at TP=2 -> Llama (untied output layer); MoE in one
process -> Mixtral; MoE with an ungated shared expert, a dense layer and top-1 (Switch) routing at
EP=2 -> Qwen2-MoE; pure Mamba-2 -> Mamba2; an `M*` hybrid at PP=2 -> NemotronH. Each export is compared two ways:
- logits on random tokens against the family's own single-process model loaded from the same
  checkpoint, within 1e-4;
- the validation loss transformers gives on the run's own validation rows against the `eval_loss`
  the run logged at its last step, computed by the run itself in its own layout (TP=2, EP=2, PP=2):
  a gather that mixed up shards would break this one even if it broke the first the same way.
ParScale at P=1 and top-1 MoE without a shared expert are checked on freshly initialised models.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing is fetched

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import train_records
from scaleforge.cli import main
from scaleforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
SHRINK = ["model.vocab_size=512", "data.seq_len=32", "train.steps=2", "train.global_batch=4",
          "train.micro_batch=2", "train.warmup_steps=1", "eval.every=2", "eval.batches=1",
          "checkpoint.every=0", "model.hidden=64"]
RUNS = {
    # name: (example, ranks, overrides, transformers class)
    "dense_tp2": ("dense", 2, ["parallel.tp=2", "model.ffn_hidden=128", "model.tied_embeddings=false"],
                  "LlamaForCausalLM"),
    "moe": ("moe", 1, ["model.ffn_hidden=64", "model.moe_ffn_hidden=64"], "MixtralForCausalLM"),
    "moe_shared_ep2": ("moe", 2, ["parallel.ep=2", "model.ffn_hidden=64", "model.moe_ffn_hidden=64",
                                  "model.shared_expert_ffn=64", "model.moe_every=2", "model.top_k=1"],
                       "Qwen2MoeForCausalLM"),
    "mamba": ("mamba", 1, ["model.pattern=M", "model.layers=2", "model.groups=2",
                           "model.headdim=16", "model.chunk_size=16"], "Mamba2ForCausalLM"),
    "hybrid_pp2": ("mamba", 2, ["parallel.pp=2", "model.pattern=M*", "model.layers=2",
                                "model.groups=2", "model.chunk_size=16"], "NemotronHForCausalLM"),
}


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    """name -> trained run directory (each trained on first use)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            example, ranks, sets, _ = RUNS[name]
            out = tmp_path_factory.mktemp(f"export_{name}") / "run"
            train_records(ROOT / "examples" / f"{example}-tiny.yaml", out, ranks,
                          [f"data.stores=[{tiny_store}]", *SHRINK, *sets])
            done[name] = out
        return done[name]

    return get


def load_hf(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out).eval()


def export(run: Path, out: Path) -> None:
    assert main(["export", str(run), "--to", "hf", str(out)]) == 0


def scaleforge_model(run: Path):
    """The run's last checkpoint in the family's own model (one process) and its RunSpec."""
    from scaleforge.config import load_runspec
    from scaleforge.export import gather
    from scaleforge.pretrain.grow import last_checkpoint

    path = last_checkpoint(run)
    spec = load_runspec(path / "run.yaml")
    stack = contextlib.ExitStack()
    stack.enter_context(gather.one_process(spec))
    return stack, spec, gather.load_model(spec, path)


def scaleforge_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


def logged_eval_loss(run: Path) -> float:
    from scaleforge.pretrain.metrics import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r][-1]["eval_loss"]


def hf_eval_loss(hf, spec) -> float:
    """Mean next-token loss over the run's validation rows (those its `evaluate` reads)."""
    from scaleforge.pretrain.loop import open_samplers

    _train, val = open_samplers(spec)
    total = 0.0
    for batch in range(spec.eval.batches):
        rows = torch.as_tensor(val.samples(batch * spec.train.global_batch,
                                           spec.train.global_batch), dtype=torch.long)
        with torch.no_grad():
            logits = hf(rows[:, :-1]).logits
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)))
    return total / spec.eval.batches


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_transformers_logits_equal_scaleforge(name, runs, tmp_path):
    run = runs(name)
    out = tmp_path / "hf"
    export(run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [RUNS[name][3]]
    hf = load_hf(out)
    assert type(hf).__name__ == RUNS[name][3]
    stack, spec, model = scaleforge_model(run)
    with stack:
        ids = torch.randint(0, spec.model.vocab_size, (2, spec.data.seq_len),
                            generator=torch.Generator().manual_seed(0))
        ours = scaleforge_logits(model, ids)
    with torch.no_grad():
        theirs = hf(ids).logits
    diff = float((ours - theirs).abs().max())
    print(f"{name}: {RUNS[name][3]} max |logit diff| = {diff:.3g}")
    assert diff < TOL, (name, diff)
    assert float(ours.abs().max()) > 0.1  # not trivially equal
    # the run's own evaluation, made in its own layout, against transformers'
    logged, got = logged_eval_loss(run), hf_eval_loss(hf, spec)
    print(f"{name}: eval_loss logged {logged:.7f}, transformers {got:.7f}")
    assert abs(logged - got) < 1e-5, (name, logged, got)


def greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """scaleforge's own greedy continuation: the full forward again for every token (no cache)."""
    for _ in range(new):
        ids = torch.cat([ids, scaleforge_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.slow
def test_tokenizer_and_generation(runs, tmp_path, tiny_store):
    """The run's tokenizer loads offline with AutoTokenizer and encodes as the store's; greedy
    `generate` (KV cache) continues a prompt exactly as scaleforge's model decodes it greedily; and
    the export serves as REWIRE's local generator, whose reply is that same continuation."""
    from transformers import AutoTokenizer

    from scaleforge.data_pipeline import open_store
    from scaleforge.data_pipeline.rewire.backends import LocalGenerator, resolve_model_dir
    from scaleforge.data_pipeline.rewire.config import RewriteConfig

    run = runs("dense_tp2")
    out = tmp_path / "hf"
    out.mkdir()  # an empty target directory is written into
    export(run, out)
    tok = AutoTokenizer.from_pretrained(out)
    text = "Fellow citizens of the Senate and the House"
    own = open_store(tiny_store).tokenizer()
    assert tok(text).input_ids == own.encode(text).ids
    eot = own.token_to_id("<|endoftext|>")
    assert tok.eos_token_id == eot
    new = 6
    prompt = torch.tensor([tok(text).input_ids])
    # REWIRE's local backend sends a base model's request text followed by a blank line
    request = torch.tensor([tok(text + "\n\n").input_ids])
    hf = load_hf(out)
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    stack, _spec, model = scaleforge_model(run)
    with stack:
        ours = greedy(model, prompt, new)
        reply = greedy(model, request, new)[0, request.shape[1]:].tolist()
    assert generated.tolist() == ours.tolist()
    assert tok.decode(generated[0, prompt.shape[1]:])  # decodes to text
    backend = LocalGenerator(resolve_model_dir(str(out)))
    [answer] = backend.generate([[{"role": "user", "content": text}]],
                                RewriteConfig(max_new_tokens=new, repetition_penalty=1.0), seed=0)
    kept = reply[:reply.index(eot)] if eot in reply else reply
    assert answer.tokens == len(kept)
    assert answer.text == tok.decode(kept, skip_special_tokens=True)
    print(f"REWIRE local backend on the export: {answer.text!r} ({answer.finish_reason})")


def test_device_context_still_works_after_the_cpu_redirection():
    """`with torch.device("meta")` (transformers' from_pretrained builds models under it) must still
    reach torch's factories once scaleforge.parallel.cpu has wrapped them."""
    from scaleforge.parallel import cpu

    cpu.install()
    with torch.device("meta"):
        assert torch.empty(2).is_meta and torch.arange(3).is_meta


# ----------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written


def _refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _with_model(run: Path, dst: Path, **model) -> Path:
    """A copy of `run` whose last checkpoint's run.yaml has `model` fields changed."""
    shutil.copytree(run, dst)
    latest = dst / "checkpoints" / (dst / "checkpoints" / "latest").read_text().strip()
    data = yaml.safe_load((latest / "run.yaml").read_text())
    data["model"].update(model)
    (latest / "run.yaml").write_text(yaml.safe_dump(data))
    return dst


def test_bad_input_is_refused_without_writing(runs, tmp_path, capsys):
    run = runs("moe")
    out = tmp_path / "out"
    # a target that exists and is not empty: untouched
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _refused(capsys, ["export", str(run), "--to", "hf", str(out)])
    assert "exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out = tmp_path / "new"
    # no complete checkpoint
    empty = tmp_path / "no_ckpt"
    (empty / "checkpoints").mkdir(parents=True)
    assert "no complete checkpoint" in _refused(capsys, ["export", str(empty), "--to", "hf", str(out)])
    # an unknown family
    err = _refused(capsys, ["export", str(_with_model(run, tmp_path / "unknown", arch="nosuch")),
                            "--to", "hf", str(out)])
    assert "nosuch" in err
    # router settings transformers cannot express
    for field, value in (("capacity_factor", 1.25), ("router_score", "sigmoid")):
        bad = _with_model(run, tmp_path / f"bad_{field}", **{field: value})
        err = _refused(capsys, ["export", str(bad), "--to", "hf", str(out)])
        assert f"model.{field}=" in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".new.*"))  # no temporary directory left


@pytest.mark.parametrize("example,sets,architecture", [
    # ParScale at P=1 has no prefixes and no aggregator: the dense model
    ("parscale", ["model.streams=1", "model.tied_embeddings=false", "model.ffn_hidden=128"],
     "LlamaForCausalLM"),
    # top-1 (Switch) routing, a dense layer, no shared expert: Qwen2-MoE with a zero-width one
    ("moe", ["model.top_k=1", "model.moe_every=2", "model.ffn_hidden=64", "model.moe_ffn_hidden=64"],
     "Qwen2MoeForCausalLM"),
])
def test_fresh_models_export_exactly(example, sets, architecture, tiny_store, tmp_path):
    """Mappings without a trained run of their own: a freshly initialised model (the tensor names,
    shapes and routing are what this checks) written by the writer and read back by transformers."""
    from scaleforge.arch.registry import builder_module
    from scaleforge.config import RunSpec, apply_overrides, from_dict, load_yaml_file
    from scaleforge.data_pipeline import open_store
    from scaleforge.export import gather, writer
    from scaleforge.pretrain.model_build import runtime_config

    spec = apply_overrides(
        from_dict(RunSpec, load_yaml_file(ROOT / "examples" / f"{example}-tiny.yaml")),
        [*(x for x in SHRINK if x.startswith(("model.", "data.seq"))), *sets])
    target = spec.model.hf_target(spec.data.seq_len)
    assert target.architecture == architecture
    ids = torch.randint(0, spec.model.vocab_size, (2, spec.data.seq_len),
                        generator=torch.Generator().manual_seed(0))
    with gather.one_process(spec):
        model = builder_module(example).build_model(
            spec.model, seq_len=spec.data.seq_len, seed=3,
            runtime=runtime_config(gather.single_layout(spec))).eval()
        ours = scaleforge_logits(model, ids)
        state = target.convert(gather.full_state(model))
    writer.write(tmp_path / "hf", target, state, open_store(tiny_store).tokenizer(),
                 max_length=spec.data.seq_len)
    with torch.no_grad():
        diff = float((load_hf(tmp_path / "hf")(ids).logits - ours).abs().max())
    print(f"{example} fresh: {architecture} max |logit diff| = {diff:.3g}")
    assert diff < TOL and float(ours.abs().max()) > 0.1, diff


@pytest.mark.parametrize("arch,fields,named", [
    ("moe", {"router_score": "sigmoid", "expert_bias": True}, "model.expert_bias"),
    ("moe", {"capacity_factor": 1.0}, "model.capacity_factor"),
    ("mamba", {"pattern": "M*M-"}, "model.pattern"),
    ("mamba", {"pattern": "ME"}, "model.pattern"),
    ("parscale", {"streams": 2}, "model.streams"),
    ("tokenformer", {}, "model.arch=tokenformer: transformers has no TokenFormer"),
    ("mor", {}, "model.arch=mor: transformers has no Mixture-of-Recursions"),
])
def test_targets_refuse_what_transformers_cannot_express(arch, fields, named):
    from scaleforge.arch.registry import config_class

    with pytest.raises(ConfigError, match=named) as info:
        config_class(arch)(**fields).hf_target(32)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch,fields,architecture", [
    ("parscale", {"streams": 1}, "LlamaForCausalLM"),
    ("moe", {"top_k": 1}, "Qwen2MoeForCausalLM"),
    ("moe", {"moe_every": 2, "layers": 4}, "Qwen2MoeForCausalLM"),
    ("mamba", {"pattern": "M*"}, "NemotronHForCausalLM"),
])
def test_targets_pick_the_architecture(arch, fields, architecture):
    from scaleforge.arch.registry import config_class

    assert config_class(arch)(**fields).hf_target(32).architecture == architecture
