"""Mixture-of-Recursions as a megatron-core GPTModel whose decoder applies shared layers recursively.

The builder half of the family contract (docs/families.md, docs/mor.md): `build_model`,
`forward_step`, `step_metrics`. The decoder's layers are megatron TransformerLayers of dense's local
spec (SDPA/flash core attention, RMSNorm, SwiGLU), one per UNIQUE layer; `MoRBlock` (a
TransformerBlock whose forward is replaced) applies them in the sharing pattern of the config and
routes tokens through the recursion steps:

- expert choice (per step r): router logits on the tokens that survived step r - 1 (hierarchical
  filtering: a token dropped at step r is never a candidate again), gates g = 0.1 sigmoid(logit),
  the top k_r = floor(s (N_r - r + 1) / N_r) per sequence, their positions sorted (causal order),
  gathered with their RoPE angles, the step's layers run on that shorter causal sequence, and the
  gated update scatter-added back; the auxiliary loss is the BCE of the candidates' logits against
  top-k membership, summed / (b s) (it teaches the router to predict the selection causally);
- token choice: one router to N_r logits on the hidden state entering the recursion, softmax, the
  top-1 is each token's depth, its probability the gate; step r runs the tokens of depth >= r
  (per sequence, causal order, padded after the last active token with weight 0); the balancing
  loss N_r sum_i frac_i P_i (Switch style) and the z-loss mean(logsumexp(logits)^2).

Residual form: a routed token's hidden state becomes x + g (block(x) - x), i.e. the gate scales the
block's update, not its output (the reference scatter-adds g block(x), which already holds x, onto x).
With every token routed and g = 1 this is exactly the shared-layer stack (tests/test_mor.py).

Router losses do not go through megatron's MoEAuxLossAutoScaler (the schedule sets its scale only
for models with `num_moe_experts`): `forward_step`'s loss function adds them to the loss megatron
back-propagates, and reports the language-model loss alone.

Sequence parallelism: the recursion gathers the sequence (routing is over the whole sequence),
and each step's gathered tokens are scattered over tp again for the layers (padded to a multiple of
tp with weight-0 tokens after the last real one), so a layout with sp runs unchanged.
No pipeline cut (config.divisibility): pp = 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor

from scaleforge.arch.common.builder import FamilyBuilder
from scaleforge.arch.common.init import gpt_rule, init_params
from scaleforge.arch.common.transformer import gpt_model, layer_spec, llama_fields
from scaleforge.arch.mor.config import GATE_SCALE, MoRConfig


def transformer_config(cfg: MoRConfig, runtime: dict[str, Any]) -> TransformerConfig:
    """megatron TransformerConfig: `num_layers` is the number of UNIQUE (built) layers."""
    if runtime.get("pipeline_model_parallel_size", 1) != 1:
        raise ValueError("model.arch=mor cannot be cut by a pipeline; set parallel.pp=1")
    return TransformerConfig(
        **llama_fields(layers=cfg.unique_layers, hidden=cfg.hidden, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, ffn_hidden=cfg.ffn_hidden,
                       norm_eps=cfg.norm_eps, init_std=cfg.init_std),
        **runtime,
    )


class MoRBlock(TransformerBlock):
    """A TransformerBlock of the unique layers whose forward applies them recursively (see the
    module docstring). `adopt` turns GPTModel's decoder into one (GPTModel builds a plain
    TransformerBlock whatever the spec's module says)."""

    @classmethod
    def adopt(cls, block: TransformerBlock, cfg: MoRConfig) -> "MoRBlock":
        block.__class__ = cls
        block.mor = cfg
        # one row per step (expert choice) or per depth (token choice); replicated over tp: it
        # sees the whole (gathered) sequence on every tp rank, so its gradients agree there
        device = next(block.parameters()).device
        block.router = torch.nn.Linear(cfg.hidden, cfg.recursions, bias=False, device=device,
                                       dtype=block.config.params_dtype)
        block.route_all = False
        """Test switch: every token takes every step (expert: capacity s; token: depth N_r)."""
        block.gate_one = False
        """Test switch: gates fixed at 1."""
        block.router_loss = None
        # training sums since the last step_metrics: [aux, z, depth x tokens, tokens]
        block.mor_sums = torch.zeros(4, dtype=torch.float64, device=device)
        return block

    # ------------------------------------------------------------------------------------------

    def forward(self, hidden_states, attention_mask, context=None, context_mask=None,
                rotary_pos_emb=None, **kwargs):
        """[s, b, h] (s / tp with sp) -> [s, b, h]: first layer, recursion, last layer, final norm."""
        if attention_mask is not None:
            raise ValueError("MoR runs causal attention without an explicit mask")
        if not self.pre_process:
            hidden_states = self.input_tensor
        cfg = self.mor
        h = hidden_states
        if cfg.middle:
            h = self._layer(self.layers[0], h, rotary_pos_emb)
        h = self._recurse(h, rotary_pos_emb)
        if cfg.middle:
            h = self._layer(self.layers[-1], h, rotary_pos_emb)
        if self.final_layernorm is not None:
            h = self.final_layernorm(h)
        return make_viewless_tensor(inp=h, requires_grad=True, keep_graph=True)

    def _layer(self, layer, x, rope):
        def run(hidden):
            return layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)[0]

        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(run, False, x)
        return run(x)

    def _step(self, h, pos, weight, layer_ids, rope):
        """Run unique layers `layer_ids` on the tokens at positions `pos` [k, b] (causal order) of
        the full sequence `h` [s, b, H]; return h + weight (block(x) - x) scattered at `pos`."""
        hidden = h.shape[-1]
        index = pos.unsqueeze(-1).expand(-1, -1, hidden)
        x = torch.gather(h, 0, index)
        sub_rope = None
        if rope is not None:  # [s, 1, 1, d] -> each token's own angle, [k, b, 1, d]
            sub_rope = rope[:, 0, 0][pos].unsqueeze(2)
        y = scatter_to_sequence_parallel_region(x) if self.config.sequence_parallel else x
        for i in layer_ids:
            y = self._layer(self.layers[i], y, sub_rope)
        if self.config.sequence_parallel:
            y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
        update = weight.unsqueeze(-1).to(y.dtype) * (y - x)
        return h.scatter_add(0, index, update)

    def _pad(self, k: int, s: int) -> int:
        """Gathered length: k, rounded up to a multiple of tp under sequence parallelism."""
        if not self.config.sequence_parallel:
            return k
        tp = self.config.tensor_model_parallel_size
        return min(s, -(-k // tp) * tp)

    def _recurse(self, h, rope):
        sp = self.config.sequence_parallel
        if sp:  # routing compares tokens over the whole sequence
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
        if self.mor.routing == "expert":
            h, aux, z, depth = self._expert(h, rope)
        else:
            h, aux, z, depth = self._token(h, rope)
        cfg = self.mor
        self.router_loss = cfg.router_aux_coeff * aux + cfg.router_z_coeff * z
        s, b = h.shape[0], h.shape[1]
        if self.training and torch.is_grad_enabled():
            self.mor_sums += torch.stack([aux.detach().double(), z.detach().double(),
                                          depth.double(), depth.new_tensor(float(s * b))]
                                         ).to(self.mor_sums)
        if sp:
            h = scatter_to_sequence_parallel_region(h)
        return h

    def _expert(self, h, rope):
        cfg = self.mor
        s, b, _ = h.shape
        pos = torch.arange(s, device=h.device).unsqueeze(1).expand(s, b)  # candidates, [k, b]
        aux = h.new_zeros((), dtype=torch.float32)
        z = h.new_zeros((), dtype=torch.float32)
        depth = torch.zeros((), dtype=torch.float64, device=h.device)
        for r, layer_ids in enumerate(cfg.step_layers(), start=1):
            candidates = torch.gather(h, 0, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            # router in fp32 even under bf16 (selection is a top-k over small differences)
            logits = F.linear(candidates.float(), self.router.weight[r - 1:r].float()).squeeze(-1)
            k = s if self.route_all else min(cfg.capacity_tokens(r, s), pos.shape[0])
            # top-k over the sequence among the survivors, back in causal order
            chosen = logits.topk(k, dim=0).indices.sort(dim=0).values  # [k, b]
            target = torch.zeros_like(logits).scatter_(0, chosen, 1.0)
            aux = aux + F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / (b * s)
            z = z + logits.square().mean()
            gate = GATE_SCALE * torch.sigmoid(logits.gather(0, chosen))
            if self.gate_one:
                gate = torch.ones_like(gate)
            pos = pos.gather(0, chosen)  # hierarchical: the next step's candidates
            run_pos, weight = pos, gate
            kp = self._pad(k, s)
            if kp > k:  # weight-0 tokens after the last real one (sp only)
                run_pos = torch.cat([pos, pos[-1:].expand(kp - k, b)])
                weight = torch.cat([gate, gate.new_zeros(kp - k, b)])
            h = self._step(h, run_pos, weight, layer_ids, rope)
            depth = depth + k * b
        return h, aux, z, depth

    def _token(self, h, rope):
        cfg = self.mor
        s, b, _ = h.shape
        n = cfg.recursions
        logits = F.linear(h.float(), self.router.weight.float())  # [s, b, N_r], fp32
        probs = torch.softmax(logits, dim=-1)
        chosen = probs.argmax(dim=-1)  # depth - 1
        if self.route_all:
            chosen = torch.full_like(chosen, n - 1)
        gate = probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # [s, b]
        if self.gate_one:
            gate = torch.ones_like(gate)
        frac = F.one_hot(chosen, n).float().mean(dim=(0, 1))
        aux = n * (frac * probs.mean(dim=(0, 1))).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        order = torch.arange(s, device=h.device).unsqueeze(1)
        depth = (chosen + 1).sum().double()
        for r, layer_ids in enumerate(cfg.step_layers()):
            active = chosen >= r  # [s, b]
            counts = active.sum(dim=0)  # [b]
            k = int(counts.max())
            if k == 0:
                break
            k = self._pad(k, s)
            # active positions first, in causal order (stable sort), then the inactive ones
            pos = torch.argsort((~active).to(torch.int8), dim=0, stable=True)[:k]
            valid = order[:k] < counts.unsqueeze(0)
            weight = gate.gather(0, pos) * valid
            h = self._step(h, pos, weight, layer_ids, rope)
        return h, aux, z, depth


def build_model(cfg: MoRConfig, *, seq_len: int, seed: int, runtime: dict[str, Any]) -> GPTModel:
    """This rank's model, initialised from `seed` independently of layout: the unique layers by
    their global names (layers.0 .. layers.U-1), residual output projections scaled by the APPLIED
    depth (std / sqrt(2 L)), the router normal(init_std)."""
    config = transformer_config(cfg, runtime)
    spec: ModuleSpec = layer_spec(config)
    model = gpt_model(cfg, config, spec, seq_len=seq_len)
    MoRBlock.adopt(model.decoder, cfg)
    rule = gpt_rule(std=cfg.init_std, layers=cfg.layers, gated=True)
    init_params(model, seed=seed, rule=rule, tied=cfg.tied_embeddings)
    return model


def _block(model: Any) -> MoRBlock:
    while not hasattr(model, "decoder"):
        model = model.module
    return model.decoder


def forward_step(model: Any, tokens: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor):
    """megatron's forward_step contract; the loss megatron back-propagates is the mean token loss
    plus the router losses (with their coefficients), the reported `loss` the token loss alone."""
    output = model(tokens, positions, None, labels=labels)
    router_loss = _block(model).router_loss

    def loss_func(output_tensor: torch.Tensor):
        loss = output_tensor.float().mean()
        total = loss + router_loss if router_loss is not None else loss
        return total, {"loss": loss.detach().clone()}

    return output, loss_func


def step_metrics(model: Any, *, num_microbatches: int) -> dict[str, float]:
    """`mor/router_aux_loss` (expert: the BCE; token: the balancing loss) and `mor/router_z_loss`
    without their coefficients, mean over micro-batches and data-parallel ranks; `mor/mean_depth`,
    the recursion steps a token took on average.

    Collective: every rank calls it after every train step (one world all-reduce). Every tp rank
    computes the same values (the router sees the whole sequence), so sums are divided by tp x dp.
    """
    block = _block(model)
    sums = block.mor_sums.clone()
    dist.all_reduce(sums)
    block.mor_sums.zero_()
    sums = sums.cpu()
    copies = (parallel_state.get_tensor_model_parallel_world_size()
              * parallel_state.get_data_parallel_world_size())
    out = {
        "mor/router_aux_loss": float(sums[0]) / copies / num_microbatches,
        "mor/router_z_loss": float(sums[1]) / copies / num_microbatches,
    }
    if float(sums[3]) > 0:
        out["mor/mean_depth"] = float(sums[2] / sums[3])
    return out


class MoRBuilder(FamilyBuilder):
    """The builder half (arch/common/builder.py): the loss with the router's, the MoR metrics."""

    build_model = staticmethod(build_model)
    forward_step = staticmethod(forward_step)
    step_metrics = staticmethod(step_metrics)
