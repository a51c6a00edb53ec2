"""The dense megatron model: SDPA core attention equals megatron's DotProductAttention, the built
model's parameter count equals DenseConfig.num_params(), and initialisation is seed-determined."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaleforge.arch.dense.config import DenseConfig
from scaleforge.config import RunSpec


@pytest.fixture(scope="module")
def megatron_single():
    """megatron parallel state for one process (gloo, world size 1)."""
    from scaleforge.parallel.setup import init_distributed, shutdown

    init_distributed(RunSpec())
    yield
    shutdown()


def _runtime():
    return dict(use_cpu_initialization=True, params_dtype=torch.float32)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_sdpa_attention_equals_megatron_dot_product_attention(megatron_single, heads, kv_heads):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from scaleforge.arch.common.attention import SDPAttention
    from scaleforge.arch.common.transformer import transformer_config

    cfg = DenseConfig(layers=1, hidden=64, heads=heads, kv_heads=kv_heads, ffn_hidden=128,
                      vocab_size=128)
    config = transformer_config(cfg, _runtime())
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                  attention_type="self")
    ours, theirs = SDPAttention(**kwargs), DotProductAttention(**kwargs)
    s, b, hn = 24, 3, cfg.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, hn, generator=gen, requires_grad=True)
    k = torch.randn(s, b, kv_heads, hn, generator=gen, requires_grad=True)
    v = torch.randn(s, b, kv_heads, hn, generator=gen, requires_grad=True)
    out_ours = ours(q, k, v, None)
    grads_ours = torch.autograd.grad(out_ours.square().sum(), (q, k, v))
    out_theirs = theirs(q, k, v, None)
    grads_theirs = torch.autograd.grad(out_theirs.square().sum(), (q, k, v))
    assert out_ours.shape == out_theirs.shape == (s, b, heads * hn)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    # causal: the first query position sees only the first key, so it equals that value row
    first = v[0].repeat_interleave(heads // kv_heads, dim=1).reshape(b, heads * hn)
    torch.testing.assert_close(out_ours[0], first)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_config(megatron_single, tied):
    from scaleforge.arch.dense.model import build_model

    cfg = DenseConfig(layers=3, hidden=96, heads=6, kv_heads=2, ffn_hidden=256, vocab_size=320,
                      tied_embeddings=tied)
    model = build_model(cfg, seq_len=32, seed=1, runtime=_runtime())
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_init_is_seeded_and_scaled(megatron_single):
    from scaleforge.arch.dense.model import build_model

    cfg = DenseConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=256)
    a = dict(build_model(cfg, seq_len=16, seed=5, runtime=_runtime()).named_parameters())
    b = dict(build_model(cfg, seq_len=16, seed=5, runtime=_runtime()).named_parameters())
    c = dict(build_model(cfg, seq_len=16, seed=6, runtime=_runtime()).named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["decoder.layers.0.mlp.linear_fc1.weight"],
                           c["decoder.layers.0.mlp.linear_fc1.weight"])
    # residual output projections are drawn with std / sqrt(2 * layers)
    std = a["decoder.layers.1.mlp.linear_fc2.weight"].std().item()
    assert abs(std - cfg.init_std / 2.0) < 0.1 * cfg.init_std / 2.0
    assert abs(a["embedding.word_embeddings.weight"].std().item() - cfg.init_std) < 0.002
    assert torch.equal(a["decoder.final_layernorm.weight"], torch.ones(cfg.hidden))
    # layers are distinct draws
    assert not torch.equal(a["decoder.layers.0.self_attention.linear_qkv.weight"],
                           a["decoder.layers.1.self_attention.linear_qkv.weight"])


def test_model_trains_loss_goes_down(megatron_single):
    """A few AdamW steps on one batch drive the loss down (the model and its grads are wired)."""
    from scaleforge.arch.dense.model import build_model

    cfg = dataclasses.replace(DenseConfig(), layers=2, hidden=64, heads=4, kv_heads=2,
                              ffn_hidden=128, vocab_size=64)
    model = build_model(cfg, seq_len=16, seed=0, runtime=_runtime())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(4, -1)
    losses = []
    for _ in range(15):
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fused_swiglu_mlp_equals_megatron_mlp(megatron_single):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from scaleforge.arch.common.mlp import SwiGLUMLP
    from scaleforge.arch.common.transformer import transformer_config

    cfg = DenseConfig(layers=1, hidden=32, heads=4, kv_heads=2, ffn_hidden=48, vocab_size=64)
    config = transformer_config(cfg, _runtime())
    spec = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp
    # as megatron's TransformerLayer builds its own MLP (the arguments it otherwise defaults, warning)
    args = dict(tp_group=parallel_state.get_tensor_model_parallel_group(),
                ffn_hidden_size=config.ffn_hidden_size)
    theirs = build_module(spec, config=config, **args)
    spec.module = SwiGLUMLP
    ours = build_module(spec, config=config)
    assert type(ours) is SwiGLUMLP and type(theirs) is not SwiGLUMLP
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 3, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out_ours, _ = ours(x)
    out_theirs, _ = theirs(x)
    grads_ours = torch.autograd.grad(out_ours.pow(3).sum(), [x, *ours.parameters()])
    grads_theirs = torch.autograd.grad(out_theirs.pow(3).sum(), [x, *theirs.parameters()])
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
