"""The Mixture-of-Recursions family (arch/mor): exact unique-parameter accounting, the FLOPs of the
effective block passes, the sharing patterns, bad input, and in-process megatron checks of the
routers: hierarchical filtering (a token dropped at step r never returns), causal order of the
selected tokens, the identity with the plain shared-layer stack, router gradients; 2-rank parity of
token choice under TP=2 with sequence parallelism.

The shared per-family checks (built params == accounting for the example, dry run, TP=2 of the
example, PP=2 skipped (no cut), exact resume, `plan --arch`, the example's loss) live in
tests/test_families.py. 2-rank tests are `distributed` and `slow`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scaleforge.arch.dense.config import DenseConfig
from scaleforge.arch.mor.config import MoRConfig
from scaleforge.config import RunSpec, apply_overrides, from_dict, load_yaml_file, spec_to_yaml
from scaleforge.errors import ConfigError, LayoutError

ROOT = Path(__file__).resolve().parents[1]
# SmolLM-360M (the paper's 360M base): 32 layers of 960, 15 heads, 5 KV heads, SwiGLU 2560, tied
SMOLLM = dict(hidden=960, heads=15, kv_heads=5, ffn_hidden=2560, vocab_size=49152,
              tied_embeddings=True)


# ------------------------------------------------------------------------------------------------
# torch-free: accounting, sharing, errors


def test_unique_parameter_count_of_the_360m_middle_cycle_shape():
    cfg = MoRConfig(layers=32, recursions=3, sharing="middle_cycle", **SMOLLM)
    # by hand: qkv 960 x (960 + 2 x 5 x 64), proj 960^2, fc1 960 x 2 x 2560, fc2 2560 x 960, 2 norms
    layer = 960 * 1600 + 960 * 960 + 960 * 5120 + 2560 * 960 + 2 * 960
    assert layer == 9_832_320
    # 2 unique edge layers + (32 - 2) / 3 = 10 shared; router 3 x 960; final norm; tied table
    assert cfg.unique_layers == 12
    assert cfg.num_params() == 49152 * 960 + 12 * layer + 3 * 960 + 960 == 165_177_600
    vanilla = DenseConfig(layers=32, **SMOLLM)
    # N_r = 2 keeps about half the unique non-embedding parameters (the paper's "~50%")
    half = MoRConfig(layers=32, recursions=2, **SMOLLM)
    assert half.non_embedding_params() / vanilla.non_embedding_params() == pytest.approx(17 / 32,
                                                                                         rel=1e-3)


def test_one_recursion_is_dense_plus_the_router():
    dense = DenseConfig(layers=4, hidden=128, heads=4, kv_heads=2, ffn_hidden=352)
    mor = MoRConfig(layers=4, hidden=128, heads=4, kv_heads=2, ffn_hidden=352, recursions=1,
                    sharing="cycle")
    assert mor.num_params() == dense.num_params() + 128
    assert mor.flops_per_token(256) == dense.flops_per_token(256) + 6 * 128


def test_flops_count_the_effective_block_passes():
    cfg = MoRConfig(layers=8, hidden=128, heads=4, kv_heads=2, ffn_hidden=352, recursions=3)
    s = 2048
    assert [cfg.capacity_tokens(r, s) for r in (1, 2, 3)] == [2048, 1365, 682]
    assert cfg.block_passes(s) == pytest.approx(4095 / 2048)
    assert cfg.block_passes() == 2.0  # (N_r + 1) / 2
    layer = cfg.layer_matmul_params()
    hq = cfg.heads * cfg.head_dim
    router = 128 * (1 + 2048 / s + 1365 / s)  # step r's row on the survivors of step r - 1
    expected = (6 * (2 * layer + 2 * layer * 4095 / s + router + 8192 * 128)
                + 12 * hq * (2 * s + 2 * (2048**2 + 1365**2 + 682**2) / s))
    assert cfg.flops_per_token(s) == pytest.approx(expected, rel=1e-12)
    # fewer FLOPs than the unshared 8-layer model, more parameters saved than FLOPs
    dense = DenseConfig(layers=8, hidden=128, heads=4, kv_heads=2, ffn_hidden=352)
    assert cfg.flops_per_token(s) < dense.flops_per_token(s)
    assert cfg.num_params() < dense.num_params()
    # token choice is planned at the balanced depth distribution: the same block passes
    token = dataclasses.replace(cfg, routing="token")
    assert token.flops_per_token(s) == pytest.approx(cfg.flops_per_token(s), rel=1e-3)


@pytest.mark.parametrize("sharing, layers, steps", [
    ("cycle", 6, [[0, 1], [0, 1], [0, 1]]),
    ("sequence", 6, [[0, 0], [0, 1], [1, 1]]),
    ("middle_cycle", 8, [[1, 2], [1, 2], [1, 2]]),
    ("middle_sequence", 8, [[1, 1], [1, 2], [2, 2]]),
])
def test_sharing_patterns(sharing, layers, steps):
    cfg = MoRConfig(layers=layers, recursions=3, sharing=sharing)
    assert cfg.step_layers() == steps
    kinds = cfg.layer_kinds()
    assert len(kinds) == layers  # every applied layer, once
    assert sum(k.params for k in kinds) == cfg.unique_layers * cfg.layer_params()
    assert cfg.pipeline_layers() == 1
    # a later recursion step keeps activations for fewer tokens
    last = [k for k in kinds if k.kind == "recursion_3"][0]
    first = [k for k in kinds if k.kind == "recursion_1"][0]
    assert cfg.activation_bytes(last, seq_len=2048, micro_batch=1) < \
        cfg.activation_bytes(first, seq_len=2048, micro_batch=1)


def test_law_sees_unique_parameters_and_the_plan_shapes_them():
    base = MoRConfig()
    cfg = MoRConfig.for_params(1e8, base)
    assert cfg.law_variables()["N"] == cfg.num_params()
    assert 0.8e8 < cfg.num_params() < 1.25e8
    assert cfg.recursions == base.recursions and (cfg.layers - 2) % cfg.recursions == 0


@pytest.mark.parametrize("overrides, field", [
    ({"recursions": 0}, "model.recursions"),
    ({"recursions": 4}, "model.recursions"),  # 8 - 2 = 6 shared layers
    ({"layers": 6, "sharing": "cycle", "recursions": 4}, "model.recursions"),
    ({"sharing": "middle"}, "model.sharing"),
    ({"routing": "random"}, "model.routing"),
    ({"router_aux_coeff": -1.0}, "model.router_aux_coeff"),
    ({"router_z_coeff": float("nan")}, "model.router_z_coeff"),
])
def test_bad_input_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        MoRConfig(**overrides)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_a_pipeline_cut_is_refused_with_the_reason():
    from scaleforge.parallel.checks import check_layout

    data = load_yaml_file(ROOT / "examples" / "mor-tiny.yaml")
    spec = apply_overrides(from_dict(RunSpec, data), ["parallel.pp=2"])
    with pytest.raises(LayoutError, match="parallel.pp=1"):
        check_layout(spec)


# ------------------------------------------------------------------------------------------------
# in-process megatron (one rank)


@pytest.fixture(scope="module")
def megatron_single():
    from scaleforge.parallel.setup import init_distributed, shutdown

    init_distributed(RunSpec())
    yield
    shutdown()


def _model(**kw):
    import torch

    from scaleforge.arch.mor import model as mor_model

    fields = dict(layers=8, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=512,
                  recursions=3)
    cfg = MoRConfig(**{**fields, **kw})
    runtime = dict(use_cpu_initialization=True, params_dtype=torch.float32)
    return cfg, mor_model.build_model(cfg, seq_len=32, seed=3, runtime=runtime)


def _batch(seed=0, b=2, s=32):
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (b, s), generator=gen)
    return tokens, torch.arange(s).expand(b, s)


def _record_steps(block):
    """Wrap the block's `_step` to record (positions, weights) per recursion step."""
    seen = []
    original = block._step

    def step(h, pos, weight, layer_ids, rope):
        seen.append((pos.clone(), weight.detach().clone()))
        return original(h, pos, weight, layer_ids, rope)

    block._step = step
    return seen


def test_expert_choice_filters_hierarchically_in_causal_order(megatron_single):
    import torch

    cfg, model = _model(routing="expert")
    tokens, positions = _batch()
    with torch.no_grad():  # a router with some spread, so that selections differ per step
        model.decoder.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    seen = _record_steps(model.decoder)
    model(tokens, positions, None)
    assert [p.shape[0] for p, _ in seen] == [32, 21, 10]  # floor(32 (3 - r + 1) / 3)
    previous = None
    for pos, weight in seen:
        assert bool((pos[1:] > pos[:-1]).all()), "selected positions leave causal order"
        assert bool(((weight > 0) & (weight < 0.1)).all())  # sigmoid x 0.1
        if previous is not None:
            for j in range(pos.shape[1]):  # a token dropped at step r never returns
                assert set(pos[:, j].tolist()) <= set(previous[:, j].tolist())
        previous = pos
    # and the routers really chose (not just the first k positions)
    assert seen[2][0][:, 0].tolist() != list(range(10))


def test_token_choice_runs_each_token_to_its_depth(megatron_single):
    import torch

    cfg, model = _model(routing="token", router_z_coeff=1e-5)
    tokens, positions = _batch()
    with torch.no_grad():
        model.decoder.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    seen = _record_steps(model.decoder)
    model(tokens, positions, None)
    active_prev = None
    for pos, weight in seen:
        for j in range(pos.shape[1]):
            real = pos[:, j][weight[:, j] > 0].tolist()
            assert real == sorted(real)  # causal order, padding after the real tokens
            assert (weight[len(real):, j] == 0).all()
            if active_prev is not None:
                assert set(real) <= active_prev[j]
        active_prev = [set(pos[:, j][weight[:, j] > 0].tolist()) for j in range(pos.shape[1])]


@pytest.mark.parametrize("routing", ["expert", "token"])
@pytest.mark.parametrize("sharing", ["middle_cycle", "sequence"])
def test_full_capacity_and_unit_gates_give_the_shared_layer_stack(routing, sharing, megatron_single):
    """x + g (block(x) - x) with every token routed and g = 1 is the plain stack of the applied
    layers (first, the shared block per step, last), with the weights shared."""
    import torch

    layers = 8 if sharing.startswith("middle") else 6
    cfg, model = _model(routing=routing, sharing=sharing, layers=layers)
    block = model.decoder
    block.route_all = block.gate_one = True
    tokens, positions = _batch(1)
    with torch.no_grad():
        got = model(tokens, positions, None)
        # the reference: megatron's own layers applied in the sharing order, as a TransformerBlock
        emb = model.embedding(input_ids=tokens, position_ids=positions)
        rope = model.rotary_pos_emb(tokens.shape[1])
        order = [i for step in cfg.step_layers() for i in step]
        if cfg.middle:
            order = [0, *order, cfg.unique_layers - 1]
        h = emb
        for i in order:
            h = block.layers[i](hidden_states=h, attention_mask=None, rotary_pos_emb=rope)[0]
        h = block.final_layernorm(h)
        want, _ = model.output_layer(h)  # untied
        want = want.transpose(0, 1)
    diff = (got - want).abs().max().item()
    print(f"{routing}/{sharing}: |MoR(all routed, g=1) - shared stack| = {diff:.2e}")
    assert diff < 1e-5


def test_router_losses_reach_the_gradient_and_the_metrics(megatron_single, monkeypatch):
    from scaleforge.arch.mor import model as mor_model

    cfg, model = _model(routing="expert", router_aux_coeff=1.0)
    tokens, positions = _batch()
    out, loss_func = mor_model.forward_step(model, tokens, positions, tokens)
    total, reported = loss_func(out)
    assert total.detach().item() > float(reported["loss"])  # the router loss is in what is optimised
    total.backward()
    grad = model.decoder.router.weight.grad
    assert grad is not None and bool((grad.abs().sum(dim=1) > 0).all())  # every step's row learns
    metrics = mor_model.step_metrics(model, num_microbatches=1)
    assert set(metrics) == {"mor/router_aux_loss", "mor/router_z_loss", "mor/mean_depth"}
    assert metrics["mor/mean_depth"] == pytest.approx((32 + 21 + 10) / 32)
    assert metrics["mor/router_aux_loss"] > 0
    # emptied: the next step starts from zero
    assert float(model.decoder.mor_sums.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------------------
# 2 ranks


@pytest.mark.slow
@pytest.mark.distributed
def test_token_choice_tp2_with_sequence_parallelism_equals_one_process(tiny_store, tmp_path):
    """Token choice (padded per-step batches) and sp (the recursion gathers the sequence, scatters
    each step's tokens) under TP=2 reproduce one process within 1e-5, with metrics logged."""
    from scaleforge.pretrain.metrics import read_metrics
    from test_resume import _finish

    data = load_yaml_file(ROOT / "examples" / "mor-tiny.yaml")
    data["data"]["stores"] = [str(tiny_store)]
    sets = ["model.vocab_size=512", "data.seq_len=64", "train.steps=6", "train.global_batch=4",
            "train.micro_batch=2", "train.warmup_steps=2", "eval.every=0", "checkpoint.every=0",
            "model.routing=token", "model.router_aux_coeff=0.1", "model.router_z_coeff=1e-5",
            "model.layers=5", "model.recursions=3"]
    spec = apply_overrides(from_dict(RunSpec, data), sets)
    path = tmp_path / "token.yaml"
    path.write_text(spec_to_yaml(spec))
    single = _finish(path, tmp_path / "one")
    parallel = _finish(path, tmp_path / "tp2", nproc=2, sets=["parallel.tp=2", "parallel.sp=true"])
    diffs = [abs(single[s] - parallel[s]) for s in single]
    print(f"token choice TP=2+SP vs 1: max |loss diff| = {max(diffs):.2e}")
    assert max(diffs) < 1e-5, diffs
    rows = [r for r in read_metrics(tmp_path / "tp2" / "metrics.jsonl") if "loss" in r]
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    for a, b in zip(rows, one):
        assert 1.0 <= a["mor/mean_depth"] <= 3.0
        assert a["mor/mean_depth"] == pytest.approx(b["mor/mean_depth"], abs=1e-9)
        assert a["mor/router_aux_loss"] == pytest.approx(b["mor/router_aux_loss"], rel=1e-4)


def test_full_recompute_gives_the_same_gradients(megatron_single):
    """parallel.recompute=full checkpoints each layer application (shared layers included)."""
    import torch

    from scaleforge.arch.mor import model as mor_model

    grads = []
    for extra in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1)):
        cfg = MoRConfig(layers=8, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=512,
                        recursions=3, routing="expert")
        runtime = dict(use_cpu_initialization=True, params_dtype=torch.float32, **extra)
        model = mor_model.build_model(cfg, seq_len=32, seed=3, runtime=runtime)
        tokens, positions = _batch()
        out, loss_func = mor_model.forward_step(model, tokens, positions, tokens)
        loss_func(out)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name
