"""Every attention kernel a family can use equals SDPA, its pure-PyTorch twin (GPU only).

`arch.common.attention.core_attention` picks flash-attn's kernel on a GPU where it imports; with
Transformer Engine importable the families use TE's spec and TE's core attention. Both are compared
here with `SDPAttention` on the same bf16 inputs, causal, with grouped-query heads. On a CPU there is
neither kernel: the tests skip with the reason.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def megatron_single():
    from scaleforge.config import RunSpec
    from scaleforge.parallel.setup import init_distributed, shutdown

    init_distributed(RunSpec())
    yield
    shutdown()


def _config(heads: int, kv_heads: int):
    from scaleforge.arch.dense.config import DenseConfig
    from scaleforge.arch.common.transformer import transformer_config

    cfg = DenseConfig(layers=1, hidden=64 * heads, heads=heads, kv_heads=kv_heads,
                      ffn_hidden=128, vocab_size=128)
    return transformer_config(cfg, dict(params_dtype=torch.bfloat16, bf16=True))


def _inputs(heads: int, kv_heads: int, s: int = 256, b: int = 2, hn: int = 64):
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda n: torch.randn(s, b, n, hn, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                 generator=gen).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def _compare(kernel, reference, q, k, v):
    out = kernel(q, k, v, None)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = reference(q, k, v, None)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    # bf16 kernels accumulate in fp32 in different orders: compare at bf16 resolution
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2)


@needs_gpu
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_flash_attention_equals_sdpa(megatron_single, heads, kv_heads):
    pytest.importorskip("flash_attn", reason="flash-attn not installed")
    from megatron.core.transformer.enums import AttnMaskType

    from scaleforge.arch.common.attention import FlashAttention, SDPAttention, core_attention

    config = _config(heads, kv_heads)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    assert core_attention(torch.bfloat16) is FlashAttention
    _compare(FlashAttention(**kwargs).cuda(), SDPAttention(**kwargs).cuda(),
             *_inputs(heads, kv_heads))


@needs_gpu
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_transformer_engine_attention_equals_sdpa(megatron_single, heads, kv_heads):
    pytest.importorskip("transformer_engine", reason="Transformer Engine not installed")
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from scaleforge.arch.common.attention import SDPAttention, have_te

    assert have_te()
    config = _config(heads, kv_heads)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    _compare(TEDotProductAttention(**kwargs, attention_type="self"),
             SDPAttention(**kwargs).cuda(), *_inputs(heads, kv_heads))
