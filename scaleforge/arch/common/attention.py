"""Core attention for megatron layer specs: the kernel each family's attention uses.

`core_attention()` picks, for a spec built without Transformer Engine: flash-attn's kernel where it
imports and a GPU is present (`FlashAttention`), else PyTorch SDPA (`SDPAttention`). With Transformer
Engine importable a family uses TE's spec, whose core attention is TE's own (`have_te()`). Every path
is compared with SDPA, the pure-PyTorch twin (tests/test_attention_kernels.py, GPU-marked).

`SDPAttention` runs `torch.nn.functional.scaled_dot_product_attention`, a drop-in for megatron's
DotProductAttention in a layer spec (`core_attention=SDPAttention`).

megatron's local DotProductAttention materialises the [b, heads, s, s] score matrix, repeats the
key/value heads for GQA and runs an unfused softmax; SDPA picks PyTorch's fused kernel (flash on CPU
and GPU) and handles GQA without copying keys and values. Numerically it equals DotProductAttention
(tests/test_train_attention.py). Shapes follow megatron: s = sequence, b = batch, np = query heads
on this rank, ng = key/value groups on this rank, hn = head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal (or masked) multi-head attention with grouped-query support, no parameters."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """[sq, b, np, hn] queries, [sk, b, ng, hn] keys/values -> [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, np_, hn = query.shape
        # [s, b, n, hn] -> [b, n, s, hn] (views; SDPA accepts the strides)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        causal = False
        if attention_mask is not None:
            # megatron masks are True where attention is NOT allowed; SDPA's are the opposite
            mask = ~attention_mask
        elif mask_type == AttnMaskType.causal and sq > 1:
            causal = True
        dropout_p = self.dropout if self.training else 0.0
        gqa = k.shape[1] != np_
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._sdpa(q, k, v, mask, causal, dropout_p, gqa)
        else:
            out = self._sdpa(q, k, v, mask, causal, dropout_p, gqa)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _sdpa(self, q, k, v, mask, causal, dropout_p, gqa):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=gqa,
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """No parameters, nothing to checkpoint."""
        return {}


class FlashAttention(SDPAttention):
    """The same interface on flash-attn's `flash_attn_func` (GPU, fp16/bf16; GQA without copies).

    Causal masks only (the families' attention is causal and unpadded); dropout forks megatron's
    tensor-parallel RNG as SDPA's path does.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[sq, b, np, hn] queries, [sk, b, ng, hn] keys/values -> [sq, b, np * hn]."""
        from flash_attn import flash_attn_func

        if packed_seq_params is not None or attention_bias is not None or attention_mask is not None:
            raise ValueError("FlashAttention supports causal attention without masks or biases only")
        sq, b, np_, hn = query.shape
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # flash-attn wants [b, s, heads, hn], contiguous in the last dimension
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        dropout_p = self.dropout if self.training else 0.0
        causal = mask_type == AttnMaskType.causal
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = flash_attn_func(q, k, v, dropout_p, softmax_scale=self.softmax_scale,
                                      causal=causal)
        else:
            out = flash_attn_func(q, k, v, dropout_p, softmax_scale=self.softmax_scale,
                                  causal=causal)
        return out.transpose(0, 1).reshape(sq, b, np_ * hn)


def _gpu_package(name: str) -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec(name) is not None


def have_te() -> bool:
    """Transformer Engine importable on a GPU (then families use TE's layer specs)."""
    return _gpu_package("transformer_engine")


def have_flash_attn() -> bool:
    """flash-attn importable on a GPU."""
    return _gpu_package("flash_attn")


def core_attention(params_dtype: torch.dtype) -> type:
    """The core-attention module of a local (non-TE) spec: flash-attn where it runs (a GPU, fp16 or
    bf16: its kernels have no fp32 path), else SDPA."""
    half = params_dtype in (torch.float16, torch.bfloat16)
    return FlashAttention if half and have_flash_attn() else SDPAttention
