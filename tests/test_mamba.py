"""The Mamba-2 family: SSD against the recurrence, accounting, init, TP parity, errors, planning.

The checks every family shares (dry run, PP=2, SIGKILL + rerun, plan timing on the example) are in
tests/test_families.py; these are the Mamba-specific ones.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml

from scaleforge.arch.mamba.config import MambaConfig
from scaleforge.arch.mamba.ssd import have_kernel, mamba_chunk_scan, segsum, ssd_chunked
from scaleforge.config import RunSpec, apply_overrides
from scaleforge.errors import ConfigError, LayoutError

CLI = [sys.executable, "-m", "scaleforge.cli"]


# ----------------------------------------------------------------------------------------------
# SSD


def recurrence(x, dt, A, B, C):
    """The selective-state-space recurrence step by step: S_t = exp(dt A) S + dt x B^T, y = S C."""
    b, length, h, p = x.shape
    B = B.repeat_interleave(h // B.shape[2], dim=2)
    C = C.repeat_interleave(h // C.shape[2], dim=2)
    state = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None]
                                 * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1), state


def _inputs(dtype, length, groups, heads=4, p=8, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, heads, p, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(2, length, heads, generator=g, dtype=dtype) - 1)
    A = -torch.empty(heads, dtype=dtype).uniform_(1, 16, generator=g)  # the init range
    B = torch.randn(2, length, groups, n, generator=g, dtype=dtype)
    C = torch.randn(2, length, groups, n, generator=g, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk,length", [(4, 16), (8, 37), (16, 13), (64, 50), (1, 5)])
@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_equals_the_recurrence(dtype, tol, chunk, length, groups):
    # lengths not divisible by the chunk are padded with dt = 0 steps (no decay, no input)
    x, dt, A, B, C = _inputs(dtype, length, groups)
    y, final = ssd_chunked(x, dt, A, B, C, chunk, return_final_state=True)
    y_ref, final_ref = recurrence(x, dt, A, B, C)
    assert y.dtype == dtype
    # errors relative to the largest magnitude (states reach ~60 here, where fp32's spacing is
    # 4e-6): measured up to 1.9e-15 (fp64) and 6.1e-6 (fp32)
    for out, ref in ((y, y_ref), (final, final_ref)):
        err = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= tol, err


def test_ssd_groups_are_not_summed():
    # G = 2 with different B per group must differ from both groups' B averaged (the ssd_minimal
    # pitfall would silently sum over groups)
    x, dt, A, B, C = _inputs(torch.float64, 12, 2)
    y = ssd_chunked(x, dt, A, B, C, 4)
    y_mixed = ssd_chunked(x, dt, A, B.mean(2, keepdim=True).expand_as(B), C, 4)
    assert (y - y_mixed).abs().max() > 1e-3


def test_stable_segsum_with_large_decays():
    # cumulative log decay of -1e4 over a chunk: the difference of cumulative sums loses the
    # small terms (exp(c_i - c_j) for neighbours); the masked cumulative sum keeps them exact
    x = torch.full((64,), -157.0, dtype=torch.float32)
    x[::7] = -0.01
    stable = segsum(x)
    exact = segsum(x.double())
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(stable), finite)
    assert (stable.double()[finite] - exact[finite]).abs().max() < 1e-3
    assert stable[8, 7].item() == pytest.approx(-157.0)  # one step: the step itself


@pytest.mark.gpu
@pytest.mark.skipif(not have_kernel(), reason="mamba_ssm's Triton kernel needs a CUDA GPU and "
                    "`pip install mamba-ssm`; the PyTorch path is the reference")
@pytest.mark.parametrize("groups", [1, 2])
def test_triton_kernel_equals_pytorch(groups):
    # 300 steps: not a multiple of the chunk (64); per-group B, C go to the kernel as they are
    x, dt, A, B, C = (t.cuda() for t in _inputs(torch.float32, 300, groups, heads=8, p=64, n=16))
    ref = mamba_chunk_scan(x, dt, A, B, C, 64, use_kernel=False)
    out = mamba_chunk_scan(x, dt, A, B, C, 64, use_kernel=True)
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-3 * max(1.0, scale)  # TF32 matmuls in the kernel


# ----------------------------------------------------------------------------------------------
# accounting


MAMBA2_130M = dict(layers=24, hidden=768, d_state=128, headdim=64, expand=2, groups=1, d_conv=4,
                   tied_embeddings=True, vocab_size=50288)


def test_mamba2_130m_parameter_count():
    cfg = MambaConfig(**MAMBA2_130M)
    assert cfg.mamba_layer_params() == 3_765_320  # methods.md section 4
    assert cfg.num_params() == 128_989_632
    assert MambaConfig(**{**MAMBA2_130M, "vocab_size": 50280}).num_params() == 128_983_488
    assert cfg.non_embedding_params() == 128_989_632 - 50288 * 768


def test_flops_per_token_by_hand():
    cfg = MambaConfig(layers=2, hidden=64, d_state=8, headdim=16, pattern="M*", heads=4,
                      kv_heads=4, vocab_size=100, chunk_size=16)
    ed, h, gn = 128, 8, 8
    mamba_matmul = 64 * (2 * ed + 2 * gn + h) + ed * 64  # 26,112
    attn_matmul = 64 * 3 * 64 + 64 * 64  # 16,384
    matmul = mamba_matmul + attn_matmul + 100 * 64
    ssd = 2 * 16 * 1 * 8 + 16 * ed + 4 * 8 * ed + 2 * 4 * (ed + 2 * gn)  # Q = min(16, 32)
    attention = 12 * 4 * 16 * 32
    assert cfg.flops_per_token(32) == 6 * matmul + 3 * ssd + attention


def test_pattern_tiles_and_kinds():
    cfg = MambaConfig(layers=6, pattern="M*", hidden=64, headdim=16)
    assert cfg.layer_pattern == "M*M*M*"
    assert MambaConfig(layers=4, pattern="MM*").layer_pattern == "MM*M"
    kinds = [k.kind for k in cfg.layer_kinds()]
    assert kinds == ["mamba", "attention"] * 3
    assert cfg.layer_kinds()[0].kv_heads == 0 and cfg.layer_kinds()[1].kv_heads == cfg.kv_heads
    assert sum(k.params for k in cfg.layer_kinds()) + cfg.embedding_params() + cfg.hidden \
        == cfg.num_params()
    # the memory model knows each kind; a Mamba layer keeps no attention scores
    for kind in cfg.layer_kinds()[:2]:
        assert cfg.activation_bytes(kind, seq_len=128, micro_batch=2) > 0
        assert cfg.activation_bytes(kind, seq_len=128, micro_batch=2, tp=2) < \
            cfg.activation_bytes(kind, seq_len=128, micro_batch=2)


def test_for_params_hits_the_target_and_keeps_the_unit():
    base = MambaConfig(pattern="M*M-")
    for n in (1e6, 1e7, 1.3e8, 1e9):
        cfg = MambaConfig.for_params(n, base)
        assert abs(math.log(cfg.num_params() / n)) < math.log(1.05)
        assert cfg.pattern == "M*M-" and cfg.layers % 4 == 0
    pure = MambaConfig.for_params(1.3e8, MambaConfig(vocab_size=50288))
    assert pure.pattern == "" and 16 <= pure.layers <= 32  # mamba2-130m: 24 layers of 768


# ----------------------------------------------------------------------------------------------
# the built model


@pytest.fixture(scope="module")
def megatron_single():
    from scaleforge.parallel.setup import init_distributed, shutdown

    init_distributed(RunSpec())
    yield
    shutdown()


def _build(cfg: MambaConfig, seq_len: int = 40):
    from scaleforge.arch.mamba.model import build_model

    return build_model(cfg, seq_len=seq_len, seed=3,
                       runtime=dict(use_cpu_initialization=True, params_dtype=torch.float32))


SMALL = dict(layers=4, hidden=64, d_state=8, headdim=16, vocab_size=512, chunk_size=16)


@pytest.mark.parametrize("pattern,groups,tied", [("", 1, True), ("M*M-", 2, False), ("MM*", 1, True),
                                                 ("ME*E", 1, True)])
def test_built_parameters_equal_accounting_and_train(megatron_single, pattern, groups, tied):
    cfg = MambaConfig(**SMALL, pattern=pattern, groups=groups, tied_embeddings=tied)
    model = _build(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    kinds = [type(layer).__name__ for layer in model.decoder.layers]
    expected = {"M": "MambaLayer", "*": "TransformerLayer", "-": "MLPLayer", "E": "TransformerLayer"}
    assert kinds == [expected[c] for c in cfg.layer_pattern]
    tokens = torch.randint(0, 512, (2, 40))  # 40: not a multiple of the chunk (16)
    positions = torch.arange(40)[None].expand(2, 40)
    loss = model(tokens, positions, None, labels=tokens).mean()
    assert abs(loss.item() - math.log(512)) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_full_recompute_keeps_less_and_gives_the_same_gradients(megatron_single):
    # megatron's MambaStack has no full recomputation; the family's stack checkpoints each layer
    from scaleforge.arch.mamba.model import build_model

    cfg = MambaConfig(**SMALL, pattern="M*M-")
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40)[None].expand(2, 40)
    results = []
    for extra in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1)):
        model = build_model(cfg, seq_len=40, seed=3, runtime=dict(
            use_cpu_initialization=True, params_dtype=torch.float32, **extra))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = model(tokens, positions, None, labels=tokens).mean()
        loss.backward()
        results.append((loss.item(), sum(saved),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, bytes0, grads0), (loss1, bytes1, grads1) = results
    assert loss0 == loss1 and all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    assert bytes1 < bytes0 / 2, (bytes0, bytes1)


def test_init_values(megatron_single):
    cfg = MambaConfig(**SMALL, dt_min=2e-3, dt_max=0.05)
    model = _build(cfg)
    mixer = model.decoder.layers[0].mixer
    A = torch.exp(mixer.A_log.detach())
    assert (A >= 1.0).all() and (A <= 16.0).all() and A.std() > 0
    dt = F.softplus(mixer.dt_bias.detach().double())
    assert (dt >= 2e-3 * (1 - 1e-6)).all() and (dt <= 0.05 * (1 + 1e-6)).all()
    assert torch.equal(mixer.D.detach(), torch.ones_like(mixer.D))
    assert torch.equal(mixer.norm.weight.detach(), torch.ones_like(mixer.norm.weight))
    bound = 1 / math.sqrt(cfg.d_conv)  # torch Conv1d default: fan-in d_conv
    assert mixer.conv_x.weight.abs().max() <= bound and mixer.conv_bc.bias.abs().max() <= bound
    # megatron's optimizer gives 1-D parameters and biases no weight decay: A_log, D, dt_bias are
    assert mixer.A_log.dim() == mixer.D.dim() == mixer.dt_bias.dim() == 1
    # layers draw different values (global names differ)
    other = model.decoder.layers[1].mixer
    assert not torch.equal(mixer.A_log, other.A_log)


def test_no_weight_decay_on_ssm_parameters(megatron_single):
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    model = _build(MambaConfig(**SMALL))
    groups = _get_param_groups([model], OptimizerConfig(weight_decay=0.1), None)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["wd_mult"] > 0 for p in g["params"]}
    assert decayed and not any(n.endswith(("A_log", ".D", "dt_bias", "conv_x.bias"))
                               for n in decayed)
    assert any(n.endswith("in_proj.weight") for n in decayed)


# ----------------------------------------------------------------------------------------------
# bad input: one line each


@pytest.mark.parametrize("fields,message", [
    ({"pattern": "M*X"}, "model.pattern='M*X' has unknown letter(s) 'X'"),
    ({"pattern": "ME", "top_k": 5}, "model.top_k=5 exceeds model.experts=4"),
    ({"layers": 0}, "model.layers must be a positive integer"),
    ({"pattern": "*-"}, "has no Mamba layer (M)"),
    ({"headdim": 48}, "model.headdim=48 must divide model.expand x model.hidden = 256"),
    ({"groups": 3}, "model.groups=3 must divide the Mamba heads"),
    ({"pattern": "M*", "experts": 8}, "model.experts=8 has no effect: model.pattern='M*' has no E"),
])
def test_bad_config_is_one_line(fields, message):
    with pytest.raises(ConfigError) as err:
        MambaConfig(**fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tp_not_dividing_mamba_heads_is_one_line():
    from scaleforge.parallel.checks import check_shape

    # 2 x 96 / 64 = 3 Mamba heads
    spec = apply_overrides(RunSpec(), ["model.arch=mamba", "model.hidden=96", "model.headdim=64",
                                       "model.heads=3", "model.kv_heads=3", "parallel.tp=2",
                                       "model.vocab_size=512"])
    with pytest.raises(LayoutError) as err:
        check_shape(spec)
    text = str(err.value)
    assert "parallel.tp=2 does not divide" in text and "Mamba heads" in text and "\n" not in text


def test_moe_layers_accounting_and_ep_rows():
    from scaleforge.parallel.checks import check_shape

    cfg = MambaConfig(layers=4, hidden=64, headdim=16, pattern="ME", experts=4, top_k=2,
                      moe_ffn_hidden=96, shared_expert_ffn=32, vocab_size=512)
    moe = 64 + 4 * 64 + 4 * 3 * 64 * 96 + 3 * 64 * 32  # norm, router, experts, shared expert
    assert cfg.layer_params_of("moe") == moe
    assert cfg.num_params() - cfg.active_params() == 2 * 2 * 3 * 64 * 96  # 2 idle experts, 2 layers
    assert [k.kind for k in cfg.layer_kinds()] == ["mamba", "moe"] * 2
    assert cfg.layer_kinds()[1].expert_params == 4 * 3 * 64 * 96
    assert {"model.experts", "model.moe_ffn_hidden", "data.seq_len"} <= {
        r.field for r in cfg.divisibility(64)}
    spec = apply_overrides(RunSpec(), ["model.arch=mamba", "parallel.ep=2"])
    with pytest.raises(LayoutError, match="has no experts to shard"):
        check_shape(spec)  # no E in the pattern


def test_groups_need_not_divide_tp():
    from scaleforge.parallel.checks import check_shape

    spec = apply_overrides(RunSpec(), ["model.arch=mamba", "model.groups=1", "parallel.tp=2"])
    check_shape(spec)  # B and C are replicated


# ----------------------------------------------------------------------------------------------
# planning


def _plan(tmp_path, *extra):
    out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.yaml"
    start = time.perf_counter()
    proc = subprocess.run([*CLI, "plan", "--budget", "1e21", "--arch", "mamba", "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_text(), took


def test_plan_arch_mamba_fast_and_deterministic(tmp_path):
    first, took = _plan(tmp_path)
    second, _ = _plan(tmp_path)
    assert first == second
    print(f"orchestrate plan --budget 1e21 --arch mamba: {took:.2f} s")
    plan = yaml.safe_load(first)
    runs = plan["ladder"] + [plan["target"]]
    assert {r["spec"]["model"]["arch"] for r in runs} == {"mamba"}
    hybrid = yaml.safe_load(_plan(tmp_path, "--set", "model.pattern=M*M-")[0])
    models = [r["spec"]["model"] for r in hybrid["ladder"] + [hybrid["target"]]]
    assert {m["pattern"] for m in models} == {"M*M-"}
    assert all(m["layers"] % 4 == 0 for m in models)


def test_plan_is_torch_free():
    code = (
        "import sys, time\n"
        "sys.modules['torch'] = None\n"
        "t = time.perf_counter()\n"
        "from scaleforge.orchestrator.plan.plan import base_spec\n"
        "from scaleforge.arch.mamba.config import MambaConfig\n"
        "m = MambaConfig.for_params(1e9, base_spec('mamba', ['model.pattern=M*M-']).model)\n"
        "print(time.perf_counter() - t, m.num_params())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, params = proc.stdout.split()
    print(f"mamba for_params(1e9) torch-free: {float(seconds):.2f} s")  # measured, not asserted
    assert int(params) > 0


# ----------------------------------------------------------------------------------------------
# tensor parallelism (2 ranks)

STEPS = 10
TOL = 1e-5


def _spec_file(tmp_path, store, groups: int, pattern: str):
    spec = yaml.safe_load(open("examples/mamba-tiny.yaml"))
    spec["data"]["stores"] = [str(store)]
    spec["data"]["seq_len"] = 64
    spec["model"].update(vocab_size=512, groups=groups, chunk_size=24,  # 64 = 2 x 24 + 16: padded
                         pattern=pattern)
    spec["train"].update(steps=STEPS, global_batch=8, micro_batch=2, warmup_steps=2)
    spec["eval"] = {"every": 0}
    spec["checkpoint"] = {"every": 5, "keep": 3}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


_SINGLE: dict = {}


@pytest.fixture
def single(tiny_store, tmp_path_factory):
    from test_resume import _finish

    def get(groups: int, pattern: str = "M*M-"):
        key = (groups, pattern)
        if key not in _SINGLE:
            root = tmp_path_factory.mktemp(f"mamba_g{groups}")
            spec = _spec_file(root, tiny_store, groups, pattern)
            _SINGLE[key] = (spec, root / "run", _finish(spec, root / "run"))
        return _SINGLE[key]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("groups,pattern,sets", [
    (1, "M*M-", ["parallel.tp=2"]),
    (2, "M*M-", ["parallel.tp=2"]),
    (1, "M*M-", ["parallel.tp=2", "parallel.sp=true"]),  # replicated B, C from the gathered sequence
    (1, "ME*E", ["parallel.tp=2"]),  # MoE layers: sequence parallel forced, expert tp
    (1, "ME*E", ["parallel.ep=2"]),  # two experts a rank, dp=2
    (1, "ME*E", ["parallel.pp=2"]),  # ME | *E
])
def test_parallel_equals_one_process(groups, pattern, sets, single, tmp_path):
    # G = 1: B, C replicated and the gated norm's group spans both ranks; G = 2: one group a rank
    from test_resume import _finish

    from scaleforge.pretrain.metrics import read_metrics

    spec, ref_dir, ref = single(groups, pattern)
    losses = _finish(spec, tmp_path / "run", nproc=2, sets=sets)
    diffs = [abs(ref[s] - losses[s]) for s in ref]
    assert max(diffs) < TOL, diffs
    # the MoE metrics (aux and z losses, expert load) do not depend on the layout either
    a, b = (read_metrics(d / "metrics.jsonl") for d in (ref_dir, tmp_path / "run"))
    keys = [k for k in a[0] if k.startswith("moe/")]
    assert bool(keys) == ("E" in pattern)
    for ra, rb in zip(a, b):
        for key in keys:
            assert abs(ra[key] - rb[key]) < TOL, (key, ra[key], rb[key])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("pattern,sets", [("M*M-", ["parallel.tp=2"]), ("ME*E", ["parallel.ep=2"])])
def test_checkpoint_reshards(pattern, sets, single, tmp_path):
    # a 1-rank checkpoint resumed on 2 ranks: the fused in_proj and the (replicated at tp=2, G=1)
    # B, C tensors are saved by global part; experts by global index
    from test_resume import _finish, _rewind

    spec, ref_dir, ref = single(1, pattern)
    out = _rewind(ref_dir, tmp_path / "run", 5)
    losses = _finish(spec, out, nproc=2, sets=sets)
    diffs = [abs(ref[s] - losses[s]) for s in range(6, STEPS + 1)]
    assert max(diffs) < TOL, diffs
