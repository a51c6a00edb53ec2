"""ParScale (docs/parscale.md): counts against methods.md section 1, the builder's pieces against
hand-written references, P = 1 against dense, bad input. TP=2 / PP=2 parity, resume, the example's
loss and `plan --arch parscale` are tests/test_families.py's (parametrised over every family)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from scaleforge.arch.dense.config import DenseConfig
from scaleforge.arch.parscale.config import ParScaleConfig
from scaleforge.config import RunSpec, apply_overrides
from scaleforge.errors import ConfigError

# methods.md section 1: the 4.4B model of the ParScale fits (h 2560, L 36, n_kv 2, d_head 160)
SHAPE_4B = dict(layers=36, hidden=2560, heads=16, kv_heads=2, ffn_hidden=6912, vocab_size=151936,
                tied_embeddings=True)
DELTA_N = {2: 15_326_722, 4: 30_650_884, 8: 61_299_208}
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=512)


@pytest.mark.parametrize("p", sorted(DELTA_N))
def test_extra_parameters_reproduce_the_paper(p):
    cfg = ParScaleConfig(**SHAPE_4B, streams=p)
    assert cfg.head_dim == 160
    assert cfg.extra_params() == DELTA_N[p]
    dense = DenseConfig(**SHAPE_4B)
    assert cfg.num_params() - dense.num_params() == DELTA_N[p]
    assert cfg.non_embedding_params() - dense.non_embedding_params() == DELTA_N[p]


def test_p1_counts_are_dense_counts():
    cfg = ParScaleConfig(**SHAPE_4B, streams=1)
    dense = DenseConfig(**SHAPE_4B)
    assert cfg.extra_params() == 0
    assert cfg.num_params() == dense.num_params()
    assert cfg.flops_per_token(4096) == dense.flops_per_token(4096)
    assert cfg.layer_kinds() == dense.layer_kinds()


def test_flops_count_the_streams():
    s = 2048
    dense = DenseConfig(**SHAPE_4B)
    for p in (2, 4, 8):
        cfg = ParScaleConfig(**SHAPE_4B, streams=p)
        blocks = 6 * cfg.layers * cfg.layer_matmul_params()
        attn = 12 * cfg.layers * cfg.heads * cfg.head_dim * (s + cfg.prefix_tokens)
        head = 6 * cfg.vocab_size * cfg.hidden
        agg = 6 * (p * cfg.hidden ** 2 + cfg.hidden * p)
        assert cfg.flops_per_token(s) == p * (blocks + attn) + head + agg
        # about P x dense: the LM head is computed once, the prefix adds attention
        ratio = cfg.flops_per_token(s) / dense.flops_per_token(s)
        assert p * 0.85 < ratio < p * 1.05, (p, ratio)



@pytest.mark.parametrize("fp32", [False, True])
def test_activations_carry_the_streams_in_both_precisions(fp32):
    """The P streams ride the micro-batch: each layer keeps a dense layer's bytes at P x the
    micro-batch, in bf16 and in the fp32 CPU mode (the memory model asks the family in both)."""
    from scaleforge.parallel.memory import memory_per_gpu

    dense = DenseConfig(**TINY)
    for p in (1, 4):
        cfg = ParScaleConfig(**TINY, streams=p)
        layer = cfg.layer_kinds()[0]
        shape = dict(seq_len=64, tp=2, sp=True, recompute="none", flash=False, fp32=fp32)
        assert cfg.activation_bytes(layer, micro_batch=2, **shape) == dense.activation_bytes(
            dense.layer_kinds()[0], micro_batch=2 * p, **shape)
    one, four = (memory_per_gpu(ParScaleConfig(**TINY, streams=p), seq_len=64, micro_batch=2,
                                fp32=fp32).activations for p in (1, 4))
    assert 3 * one < four <= 4 * one  # (fp32 counts the RoPE tables once a micro-batch)

def test_law_sees_n_and_p():
    cfg = ParScaleConfig(**SHAPE_4B, streams=4)
    law = cfg.law_variables()
    assert law["P"] == 4.0
    assert law["N"] == cfg.num_params()
    assert law["N_non_embedding"] == cfg.non_embedding_params()


def test_for_params_keeps_p_and_lands_near_the_target():
    base = ParScaleConfig(vocab_size=8192, streams=4, prefix_tokens=48, smoothing=0.1)
    cfg = ParScaleConfig.for_params(5e7, base)
    assert (cfg.streams, cfg.prefix_tokens, cfg.smoothing) == (4, 48, 0.1)
    assert abs(math.log(cfg.num_params() / 5e7)) < math.log(1.06)
    assert "P4" in cfg.summary()


@pytest.mark.parametrize("key, value, needle", [
    ("model.streams", 0, "model.streams"),
    ("model.streams", -2, "model.streams"),
    ("model.prefix_tokens", -1, "model.prefix_tokens"),
    ("model.smoothing", 1.0, "model.smoothing"),
    ("model.smoothing", -0.1, "model.smoothing"),
])
def test_bad_input_is_one_line_naming_the_field(key, value, needle):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunSpec(), ["model.arch=parscale", f"{key}={value}"])
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_grow_rule_takes_a_p1_backbone_only():
    old = ParScaleConfig(**TINY, streams=1)
    new = ParScaleConfig(**TINY, streams=4)
    assert new.grow_from(old) is new
    with pytest.raises(ConfigError, match="model.hidden"):
        dataclasses.replace(new, hidden=128, heads=4).grow_from(old)
    with pytest.raises(ConfigError, match="model.streams"):
        new.grow_from(dataclasses.replace(old, streams=2))
    p4 = dataclasses.replace(new, smoothing=0.2)  # a P=4 run continued with other smoothing
    assert p4.grow_from(new) is p4
    with pytest.raises(ConfigError, match="model.prefix_tokens"):
        dataclasses.replace(new, prefix_tokens=8).grow_from(new)


def test_plan_with_a_fixed_p_is_torch_free_and_carries_it():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['megatron'] = None\n"
        "from scaleforge.orchestrator.plan.ladder import make_plan\n"
        "plan = make_plan(1e19, arch='parscale', unique_tokens=1e13, overrides=['model.streams=4'])\n"
        "print(sorted({r.spec.model.streams for r in (*plan.ladder, plan.target)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[4]"


@pytest.mark.parametrize("k, expected", [(0.3935, (1, 1.2728, 1.5455, 1.8183)),
                                         (0.3345, (1, 1.2319, 1.4637, 1.6956))])
def test_parameter_multiplier_is_the_papers(k, expected):
    from scaleforge.arch.parscale import planning

    got = tuple(round(planning.multiplier(p, k), 4) for p in (1, 2, 4, 8))
    assert got == pytest.approx(expected, abs=1e-4)


def test_planner_chooses_p_with_the_parscale_law():
    """At fixed training compute P costs P x the FLOPs for a (k ln P + 1) x parameter term, so the
    law picks P = 1; a fixed P plans a smaller N and predicts a higher loss; the table says why."""
    from scaleforge.arch.parscale import planning
    from scaleforge.orchestrator.plan.ladder import make_plan
    from scaleforge.orchestrator.plan.plan import prior_law

    params = prior_law().params
    options = planning.stream_options(params, 1e21)
    assert [o.p for o in options] == [1, 2, 4, 8]
    assert [o.loss for o in options] == sorted(o.loss for o in options)
    for o in options:
        assert o.dense_n == pytest.approx(o.n * planning.multiplier(o.p))
        assert o.weights_gb < o.dense_weights_gb or o.p == 1
    free = make_plan(1e19, arch="parscale", unique_tokens=1e13)
    fixed = make_plan(1e19, arch="parscale", unique_tokens=1e13, overrides=("model.streams=4",))
    assert free.target.spec.model.streams == 1
    assert {r.spec.model.streams for r in fixed.ladder} == {4}
    assert fixed.target.N < free.target.N and fixed.target.loss > free.target.loss
    notes = fixed.target.spec.model.plan_notes(params, 1e19)
    assert any("<- planned" in line and line.split()[0] == "4" for line in notes)
    assert "P acts on the parameter term only" in notes[0]


# ----------------------------------------------------------------------------------------------
# the builder (one process)


@pytest.fixture(scope="module")
def megatron_single():
    from scaleforge.parallel.setup import init_distributed, shutdown

    init_distributed(RunSpec())
    yield
    shutdown()


def _build(cfg, seed=3, seq_len=16):
    import torch

    from scaleforge.arch.registry import builder_module

    runtime = dict(use_cpu_initialization=True, params_dtype=torch.float32)
    return builder_module(cfg.arch).build_model(cfg, seq_len=seq_len, seed=seed, runtime=runtime)


def _batch(b=2, s=16, vocab=512):
    import torch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (b, s), generator=gen)
    return tokens, torch.arange(s).unsqueeze(0).expand(b, -1)


@pytest.mark.parametrize("overrides", [dict(streams=1), dict(streams=2), dict(streams=4, prefix_tokens=5),
                                       dict(streams=2, prefix_tokens=0),
                                       dict(streams=3, tied_embeddings=True)])
def test_built_parameters_equal_accounting(megatron_single, overrides):
    cfg = ParScaleConfig(**{**TINY, **overrides})
    model = _build(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_p1_logits_equal_dense_at_the_same_seed(megatron_single):
    import torch

    tokens, positions = _batch()
    dense = _build(DenseConfig(**TINY))
    p1 = _build(ParScaleConfig(**TINY, streams=1))
    with torch.no_grad():
        a, b = dense(tokens, positions, None), p1(tokens, positions, None)
    assert torch.equal(a, b)
    assert [n for n, _ in dense.named_parameters()] == [n for n, _ in p1.named_parameters()]


def test_real_tokens_keep_their_rope_positions(megatron_single):
    """Layer 0's keys (after RoPE) of every stream equal dense's: the prefix shifts no position."""
    import torch

    tokens, positions = _batch()
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["query"], args[1] if len(args) > 1 else kwargs["key"])
        return hook

    dense = _build(DenseConfig(**TINY))
    ps = _build(ParScaleConfig(**TINY, streams=3, prefix_tokens=7))
    for name, model in (("dense", dense), ("ps", ps)):
        attn = model.decoder.layers[0].self_attention.core_attention
        attn.register_forward_pre_hook(grab(name), with_kwargs=True)
        with torch.no_grad():
            model(tokens, positions, None)
    (qd, kd), (qp, kp) = seen["dense"], seen["ps"]
    b = tokens.shape[0]
    assert kp.shape[1] == 3 * b
    for stream in range(3):
        assert torch.equal(kp[:, stream * b:(stream + 1) * b], kd)
        assert torch.equal(qp[:, stream * b:(stream + 1) * b], qd)


def test_prefix_attention_matches_a_naive_reference(megatron_single):
    """Stream p's real queries see all of prefix p and the causal real keys (GQA, stream-major)."""
    import torch

    model = _build(ParScaleConfig(**TINY, streams=2, prefix_tokens=3))
    attn = model.decoder.layers[1].self_attention.core_attention
    s, b, p, nq, ng, hd, n = 5, 2, 2, 4, 2, 16, 3
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(s, p * b, nq, hd, generator=gen)
    k = torch.randn(s, p * b, ng, hd, generator=gen)
    v = torch.randn(s, p * b, ng, hd, generator=gen)
    with torch.no_grad():
        out = attn(q, k, v, None).view(s, p * b, nq, hd)
    ref = torch.empty_like(out)
    for stream in range(p):
        for j in range(b):
            row = stream * b + j
            for head in range(nq):
                g = head // (nq // ng)
                keys = torch.cat([attn.prefix_k[stream, g], k[:, row, g]])
                vals = torch.cat([attn.prefix_v[stream, g], v[:, row, g]])
                for i in range(s):
                    scores = keys[: n + i + 1] @ q[i, row, head] / math.sqrt(hd)
                    ref[i, row, head] = torch.softmax(scores, 0) @ vals[: n + i + 1]
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_aggregator_is_the_reference_weighted_sum(megatron_single):
    """h-major concat, Linear-SiLU-Linear, fp32 softmax over P, smoothing, weighted sum."""
    import torch
    import torch.nn.functional as F

    model = _build(ParScaleConfig(**TINY, streams=3, smoothing=0.2))
    agg = model.aggregate
    s, b, p, h = 4, 2, 3, TINY["hidden"]
    hidden = torch.randn(s, p * b, h, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = agg(hidden)
        ref = torch.empty(s, b, h)
        for i in range(s):
            for j in range(b):
                streams = [hidden[i, stream * b + j] for stream in range(p)]
                cat = torch.stack(streams, dim=1).reshape(h * p)  # "(n b) s h -> b s (h n)"
                logits = agg.linear_out(F.silu(agg.linear_in(cat)))
                w = torch.softmax(logits.double(), 0) * 0.8 + 0.2 / p
                assert w.min() >= 0.2 / p and abs(float(w.sum()) - 1) < 1e-12
                ref[i, j] = sum(float(w[k]) * streams[k] for k in range(p))
    assert torch.allclose(out, ref, atol=1e-5)


def test_streams_train_their_prefixes_and_the_aggregator(megatron_single):
    import torch

    model = _build(ParScaleConfig(**TINY, streams=2, prefix_tokens=4))
    tokens, positions = _batch()
    model(tokens, positions, None, labels=tokens.roll(-1, 1)).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "prefix" in n or "aggregate" in n}
    assert len(grads) == 2 * TINY["layers"] + 4
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # the two streams' prefixes get different gradients (the aggregator weighs them differently)
    g = grads["decoder.layers.0.self_attention.core_attention.prefix_v"]
    assert not torch.allclose(g[0], g[1])


# ----------------------------------------------------------------------------------------------
# two-stage training: P = 1, then P > 1 through the generic growth path (pretrain/grow.py)


@pytest.fixture(scope="module")
def p1_run(tmp_path_factory, tiny_store):
    """A 2-step P = 1 run with its final checkpoint (stage 1)."""
    import yaml

    from conftest import rank_env

    tmp = tmp_path_factory.mktemp("parscale_p1")
    spec = {
        "name": "parscale-p1", "seed": 7,
        "model": {"arch": "parscale", **TINY, "tied_embeddings": True, "streams": 1},
        "data": {"stores": [str(tiny_store)], "seq_len": 32},
        "train": {"steps": 2, "global_batch": 4, "micro_batch": 4, "lr": 0.003, "warmup_steps": 1},
        "eval": {"every": 0}, "checkpoint": {"every": 0},
    }
    path = tmp / "p1.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "scaleforge.cli", "train", str(path), "--out", str(out)],
                          env=rank_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_grow_refuses_a_changed_backbone_in_one_line(p1_run, tmp_path, capsys):
    from scaleforge.cli import main

    out = tmp_path / "new"
    code = main(["grow", str(p1_run), "--out", str(out), "--set", "model.streams=2",
                 "--set", "model.ffn_hidden=192"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.ffn_hidden" in err and err.count("\n") == 0
    assert not out.exists()


def test_p1_to_p4_starts_from_the_p1_backbone(p1_run, tmp_path, capsys, megatron_single):
    """Stage 2 at step 0: every backbone tensor is the P = 1 run's last, the prefixes and the
    aggregator are the seed's; then the grown run trains."""
    import torch

    from conftest import rank_env
    from scaleforge.cli import main
    from scaleforge.config import load_runspec
    from scaleforge.pretrain import grow, model_build

    out = tmp_path / "p4"
    assert main(["grow", str(p1_run), "--out", str(out), "--set", "model.streams=4",
                 "--set", "model.prefix_tokens=6"]) == 0
    capsys.readouterr()
    spec = load_runspec(out / "run.yaml")
    assert spec.model.streams == 4 and spec.checkpoint.init_from == str(p1_run.resolve())
    # one process, tp=1: megatron_single's parallel state is this spec's
    built = model_build.build(spec)
    fresh = {k: v.clone() for k, v in built.model.state_dict().items() if v is not None}
    loaded = set(grow.start_from(spec, built))
    old = grow.read_model_tensors(grow.last_checkpoint(p1_run))
    new_parts = ("prefix_k", "prefix_v", "aggregate.")
    backbone = set()  # layers are stacked under one key per tensor
    for leaf in grow.sharded_tensors(built.model.sharded_state_dict()):
        if any(part in leaf.key for part in new_parts):
            assert leaf.key not in loaded
            continue
        backbone.add(leaf.key)
        assert leaf.key in loaded, leaf.key
        assert torch.equal(leaf.data, grow._local_piece(old[leaf.key], leaf)), leaf.key
    assert backbone == loaded and len(backbone) > 0
    state = built.model.state_dict()
    news = [k for k in state if any(part in k for part in new_parts)]
    assert len(news) == 2 * TINY["layers"] + 4
    for key in news:  # the seed's initialisation, untouched by the load
        assert torch.equal(state[key], fresh[key]), key
    proc = subprocess.run([sys.executable, "-m", "scaleforge.cli", "train", str(out / "run.yaml"),
                           "--out", str(out)], env=rank_env(1), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest").is_file()
    from scaleforge.pretrain.metrics import read_metrics

    train = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert train and all("parscale/weight_entropy" in r for r in train)


# ----------------------------------------------------------------------------------------------
# two ranks: a P = 4 checkpoint re-sharded onto tp=2 with sequence parallelism
# (tests/test_families.py runs the example's TP=2 and PP=2 from scratch)


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_reshards_onto_tp2_with_sequence_parallel(tiny_store, tmp_path):
    """The prefix tensors are saved with global shapes (cut by KV heads), the aggregator replicated:
    a 1-rank checkpoint resumes at tp=2 + sp (the aggregator's grads all-reduced over tp) and
    continues the 1-rank losses within 1e-5."""
    import yaml

    from test_resume import _finish, _rewind

    spec = {
        "name": "parscale-reshard", "seed": 11,
        "model": {"arch": "parscale", **TINY, "tied_embeddings": True, "streams": 4,
                  "prefix_tokens": 6, "smoothing": 0.1},
        "data": {"stores": [str(tiny_store)], "seq_len": 64},
        "train": {"steps": 8, "global_batch": 8, "micro_batch": 4, "lr": 0.003, "warmup_steps": 2},
        "eval": {"every": 0}, "checkpoint": {"every": 4, "keep": 2},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    ref = _finish(path, tmp_path / "ref")
    assert ref[8] < ref[1] - 0.1
    out = _rewind(tmp_path / "ref", tmp_path / "run", 4)
    losses = _finish(path, out, nproc=2, sets=["parallel.tp=2", "parallel.sp=true"])
    diffs = [abs(ref[s] - losses[s]) for s in range(5, 9)]
    assert max(diffs) < 1e-5, diffs


def test_step_metrics_weigh_the_streams_and_ignore_evaluation(megatron_single):
    import torch

    from scaleforge.arch.parscale import model as builder

    model = _build(ParScaleConfig(**TINY, streams=4, smoothing=0.2))
    tokens, positions = _batch()
    model.eval()
    with torch.no_grad():
        model(tokens, positions, None)
    assert builder.step_metrics(model, num_microbatches=1) == {}  # evaluation is not counted
    model.train()
    model(tokens, positions, None, labels=tokens)
    got = builder.step_metrics(model, num_microbatches=1)
    assert 0 < got["parscale/weight_entropy"] <= math.log(4) + 1e-9
    assert 0.2 / 4 + 0.8 / 4 - 1e-9 <= got["parscale/weight_max"] <= 1
    # near-uniform at init (small aggregator weights, zero biases)
    assert got["parscale/weight_entropy"] > 0.99 * math.log(4)
    assert builder.step_metrics(model, num_microbatches=1) == {}  # emptied by the read
    assert builder.step_metrics(_build(ParScaleConfig(**TINY, streams=1)), num_microbatches=1) == {}
