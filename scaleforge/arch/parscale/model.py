"""ParScale as a megatron-core GPTModel: P streams on the batch axis, prefix K/V per stream, aggregation.

The builder half of the family contract (docs/families.md, docs/parscale.md):
- `ParScaleGPT._preprocess`: the input is embedded once and the embedding is replicated P times along
  the batch, stream-major (`(P b)`, the reference code's `"(n_parscale b)"`); the rotary table depends
  on the sequence only, so the real tokens keep positions 0..s-1.
- `PrefixAttention` (the core attention of the layer spec): the layer's learnable prefix keys and
  values `(P, kv_heads, prefix, head_dim)` are put in front of the stream's keys and values after RoPE
  (the prefix carries no position, as the reference code's preloaded cache), and every real query
  sees all prefix entries plus the causal real keys. Under tensor parallelism the prefix is cut by KV
  heads like the attention's own heads (partition dim 1), so each rank holds its heads' prefixes.
- `Aggregator` (last stage): `(P b, s, h) -> (b, s, h P)` h-major (the reference's
  `"(n b) s h -> b s (h n)"`), `Linear(P h -> h) -> SiLU -> Linear(h -> P)`, softmax over P in fp32,
  `w (1 - eps) + eps / P`, weighted sum of the P hidden states; then one LM head and the loss.
At P = 1 nothing of this is built: the model is dense's (same spec, same names, same draws).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from scaleforge.arch.common.attention import SDPAttention
from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import Init, gpt_rule, init_params
from scaleforge.arch.common.mlp import SwiGLUMLP
from scaleforge.arch.common.norm import RMSNorm
from scaleforge.arch.common import transformer as decoder
from scaleforge.arch.common.transformer import gpt_model
from scaleforge.arch.parscale.config import ParScaleConfig

_PREFIX = ("core_attention.prefix_k", "core_attention.prefix_v")


class PrefixAttention(SDPAttention):
    """SDPA core attention with this layer's per-stream prefix keys/values in front of the keys."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, *args,
                 streams: int, prefix_tokens: int, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
        self.streams, self.prefix = streams, prefix_tokens
        tp = parallel_state.get_tensor_model_parallel_world_size()
        groups = config.num_query_groups // tp
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        shape = (streams, groups, prefix_tokens, config.kv_channels)
        self.prefix_k = torch.nn.Parameter(torch.empty(shape, dtype=config.params_dtype, device=device))
        self.prefix_v = torch.nn.Parameter(torch.empty(shape, dtype=config.params_dtype, device=device))
        for param in (self.prefix_k, self.prefix_v):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=1, stride=1)

    def _with_prefix(self, tensor: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """[s, P b, ng, hn] -> [n + s, P b, ng, hn]: stream p's rows get prefix[p] in front."""
        n, (_, pb, ng, hn), p = self.prefix, tensor.shape, self.streams
        rows = prefix.to(tensor.dtype).permute(2, 0, 1, 3).unsqueeze(2)  # [n, P, 1, ng, hn]
        rows = rows.expand(n, p, pb // p, ng, hn).reshape(n, pb, ng, hn)
        return torch.cat([rows, tensor], dim=0)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[sq, P b, np, hn] queries, [sk, P b, ng, hn] keys/values -> [sq, P b, np * hn]."""
        if attention_mask is not None or packed_seq_params is not None or attention_bias is not None:
            raise ValueError("ParScale's prefix attention is causal without masks, packing or bias")
        n = self.prefix
        sq, b, np_, hn = query.shape
        key, value = self._with_prefix(key, self.prefix_k), self._with_prefix(value, self.prefix_v)
        # True where allowed (SDPA): every prefix entry, then the causal real keys
        allowed = torch.ones(sq, n + sq, dtype=torch.bool, device=query.device)
        allowed[:, n:] = torch.tril(allowed[:, n:])
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout if self.training else 0.0
        out = self._sdpa(q, k, v, allowed, False, dropout_p, k.shape[1] != np_)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The prefix tensors with global shapes, cut by KV heads (dim 1) over tp."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state: dict = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"prefix_k": 1, "prefix_v": 1}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"])


class Aggregator(torch.nn.Module):
    """Dynamic weighted sum of the P streams' final hidden states (replicated over tp)."""

    def __init__(self, config: TransformerConfig, streams: int, smoothing: float, device,
                 stats: torch.Tensor):
        super().__init__()
        h, p = config.hidden_size, streams
        self.streams, self.smoothing = p, smoothing
        self.stats = stats  # [entropy sum, max-weight sum, tokens] of training forwards
        kw = dict(dtype=config.params_dtype, device=device)
        self.linear_in = torch.nn.Linear(p * h, h, **kw)
        self.linear_out = torch.nn.Linear(h, p, **kw)
        for param in self.parameters():
            # sequence parallel: each rank sees its slice of the sequence, so megatron's
            # finalize_model_grads all-reduces these grads over tp, as it does the norms'
            param.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, P b, h] (stream-major) -> [s, b, h]."""
        s, pb, h = hidden.shape
        p = self.streams
        streams = hidden.view(s, p, pb // p, h)  # [s, P, b, h]
        cat = streams.permute(0, 2, 3, 1).reshape(s, pb // p, h * p)  # h-major: index h P + p
        logits = self.linear_out(F.silu(self.linear_in(cat)))  # [s, b, P]
        weights = torch.softmax(logits.float(), dim=-1)
        weights = weights * (1.0 - self.smoothing) + self.smoothing / p
        if self.training:  # evaluation forwards do not reach the step's metrics
            with torch.no_grad():
                entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
                self.stats += torch.stack([entropy.sum(), weights.amax(-1).sum(),
                                           weights.new_tensor(entropy.numel())]).to(self.stats)
        mixed = torch.einsum("sbp,spbh->sbh", weights, streams.float())
        return mixed.to(hidden.dtype)


class ParScaleGPT(GPTModel):
    """GPTModel whose batch carries P streams between the embedding and the LM head."""

    def __init__(self, *args, streams: int, smoothing: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams = streams
        if streams > 1:
            device = next(self.decoder.parameters()).device
            # every stage holds one (step_metrics all-reduces it); only the last one fills it
            self.stream_stats = torch.zeros(3, dtype=torch.float64, device=device)
            if self.post_process:
                self.aggregate = Aggregator(self.config, streams, smoothing, device,
                                            self.stream_stats)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, **kwargs):
        embedded_here = decoder_input is None and self.pre_process
        out = super()._preprocess(input_ids, position_ids, decoder_input, **kwargs)
        if embedded_here and self.streams > 1:
            # [s, b, h] -> [s, P b, h], stream-major; an embedding gradient sums the P copies
            out = (torch.cat([out[0]] * self.streams, dim=1), *out[1:])
        return out

    def _postprocess(self, hidden_states, **kwargs):
        if self.post_process and self.streams > 1:
            hidden_states = self.aggregate(hidden_states)
        return super()._postprocess(hidden_states=hidden_states, **kwargs)


def transformer_config(cfg: ParScaleConfig, runtime: dict[str, Any]) -> TransformerConfig:
    """dense's TransformerConfig (arch/common/transformer.py); with P > 1 the stage-to-stage tensor
    is [s, P b, h], not the schedule's [s, b, h], so the pipeline exchanges shapes first (megatron's
    variable_seq_lengths)."""
    config = decoder.transformer_config(cfg, runtime)
    if cfg.streams > 1:
        config.variable_seq_lengths = True
    return config


def layer_spec(cfg: ParScaleConfig, config: TransformerConfig) -> ModuleSpec:
    """dense's spec (arch/common/transformer.py) at P = 1; else the local spec with
    `PrefixAttention` as core attention."""
    if cfg.streams == 1:
        return decoder.layer_spec(config)
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    attn = layer.submodules.self_attention
    # no prefix (prefix_tokens 0): the streams are identical copies through SDPA
    attn.submodules.core_attention = ModuleSpec(
        module=PrefixAttention, params=dict(streams=cfg.streams, prefix_tokens=cfg.prefix)
    ) if cfg.prefix else SDPAttention
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    layer.submodules.mlp.module = SwiGLUMLP
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm),
    )


def parscale_rule(cfg: ParScaleConfig):
    """GPT's rule for the backbone; prefixes and aggregator weights normal(init_std), biases 0."""
    backbone = gpt_rule(std=cfg.init_std, layers=cfg.layers, gated=True)

    def rule(name: str, param: torch.nn.Parameter) -> Init:
        if name.endswith(_PREFIX):
            return Init("normal", cfg.init_std)
        if name.startswith("aggregate."):
            return Init("zeros") if name.endswith(".bias") else Init("normal", cfg.init_std)
        return backbone(name, param)

    return rule


def build_model(cfg: ParScaleConfig, *, seq_len: int, seed: int, runtime: dict[str, Any]):
    """This rank's pipeline stage, initialised from `seed` independently of the layout."""
    config = transformer_config(cfg, runtime)
    model = gpt_model(cfg, config, layer_spec(cfg, config), seq_len=seq_len, cls=ParScaleGPT,
                      streams=cfg.streams, smoothing=float(cfg.smoothing))
    init_params(model, seed=seed, rule=parscale_rule(cfg), tied=cfg.tied_embeddings)
    return model



def step_metrics(model: Any, *, num_microbatches: int) -> dict[str, float]:
    """`parscale/weight_entropy` (nats; ln P: the streams weighed equally, 0: one stream takes all)
    and `parscale/weight_max` (the largest stream weight), means over the step's tokens, job-wide.

    Collective for P > 1: every rank calls it after every train step (one world all-reduce; tp ranks
    without sequence parallelism hold copies, which scale sums and counts alike). P = 1: none."""
    stats = getattr(model, "stream_stats", None)
    if stats is None:
        return {}
    flat = stats.clone()
    dist.all_reduce(flat)
    stats.zero_()
    entropy, top, tokens = flat.tolist()
    if not tokens:
        return {}
    return {"parscale/weight_entropy": entropy / tokens, "parscale/weight_max": top / tokens}


class ParScaleBuilder(FamilyBuilder):
    """The builder half (arch/common/builder.py): the language model's step, the stream metrics."""

    build_model = staticmethod(build_model)
    step_metrics = staticmethod(step_metrics)
