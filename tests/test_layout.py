"""Memory model and layout search (torch-free) against Korthikanti's table and hand computations."""

import dataclasses
import math
from pathlib import Path

import pytest

from scaleforge.arch.dense.config import DenseConfig
from scaleforge.errors import LayoutError
from scaleforge.orchestrator.plan.cluster import DEFAULT_CLUSTER, cpu_cluster
from scaleforge.parallel import layout as L
from scaleforge.parallel import memory as M

MIB = 2**20
GPT3 = DenseConfig(layers=96, hidden=12288, heads=96, kv_heads=96, ffn_hidden=32768, vocab_size=51200)
SMALL = DenseConfig(layers=4, hidden=256, heads=4, kv_heads=4, ffn_hidden=704, vocab_size=1000)


def test_korthikanti_gpt3_per_layer_table():
    # methods 9: GPT-3 175B, s=2048, b=1, h=12288, a=96, t=8 -> MiB per layer
    kw = dict(seq_len=2048, micro_batch=1, hidden=12288, heads=96)
    assert M.activation_bytes_per_layer(**kw) / MIB == 2736.0
    assert M.activation_bytes_per_layer(**kw, tp=8) / MIB == 552.0
    assert M.activation_bytes_per_layer(**kw, tp=8, sp=True) / MIB == 342.0
    assert M.activation_bytes_per_layer(**kw, tp=8, sp=True, recompute="selective") / MIB == 102.0
    assert M.activation_bytes_per_layer(**kw, tp=8, sp=True, recompute="full") / MIB == 6.0
    # flash attention drops the 5as/h term exactly as selective recomputation does
    assert M.activation_bytes_per_layer(**kw, tp=8, sp=True, flash=True) / MIB == 102.0


def test_model_state_bytes():
    assert [M.zero_bytes_per_param(s, 8) for s in range(4)] == [16, 4 + 1.5, 2 + 14 / 8, 2.0]
    assert M.megatron_state_bytes(1) == 18.0  # fp32 gradient accumulation
    assert M.megatron_state_bytes(4) == 6 + 3.0
    assert M.megatron_state_bytes(4, distributed_optimizer=False) == 18.0


def test_memory_by_hand_single_stage():
    assert SMALL.num_params() == 3_725_568 and SMALL.non_embedding_params() == 3_213_568
    mem = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2)
    assert mem.states == 3_725_568 * 18
    # s b h = 65,536; 34 + 5 a s / h = 34 + 10 = 44 bytes each, 4 layers
    assert mem.activations == 65_536 * 44 * 4
    assert mem.logits == 4 * 128 * 2 * 1000
    # backward: one layer's gradients of its saved tensors + the bf16 output-weight gradient
    assert mem.working == 65_536 * 44 + 1000 * 256 * 2
    assert mem.total == 79_618_560 + 65_536 * 44 + 512_000
    sharded = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, dp=4)
    assert sharded.states == 3_725_568 * 9


def test_memory_first_pipeline_stage_holds_pp_microbatches():
    per_layer = 65_536 * 44
    mem = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, pp=2, microbatches=8)
    assert mem.states == (3_213_568 / 2 + 256_000) * 18
    assert mem.activations == per_layer * 2 * 2 and mem.logits == 0  # the first stage is fuller
    few = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, pp=2, microbatches=1)
    assert few.activations == per_layer * 2 and few.logits == 4 * 128 * 2 * 1000  # now the last


def test_bubble():
    assert L.bubble_fraction(1, 8) == 0
    assert L.bubble_fraction(8, 32) == 7 / 32


def test_search_gpt3_on_eight_nodes():
    cluster = dataclasses.replace(DEFAULT_CLUSTER, nodes=8)
    lay = L.search_layout(GPT3, seq_len=2048, batch_target=1536, cluster=cluster)
    assert (lay.tp, lay.pp, lay.sp) == (8, 8, True)
    assert lay.memory.total <= cluster.memory_bytes
    assert lay.microbatches >= 4 * lay.pp
    assert lay.global_batch % (lay.micro_batch * lay.dp) == 0
    assert lay.bubble == pytest.approx((lay.pp - 1) / lay.microbatches)
    ideal = GPT3.flops_per_token(2048) * 2048 * lay.global_batch / (lay.gpus * 989e12 * 0.4)
    assert lay.step_time_s == pytest.approx(ideal * (1 + lay.bubble))


def test_search_refuses_too_small_a_cluster():
    # 175e9 parameters on 8 GPUs: even sharded and offloaded, bf16 weights + bf16 gradients are
    # 4 bytes x 175e9 / 8 = 87.5 GB per GPU
    cluster = dataclasses.replace(DEFAULT_CLUSTER, nodes=1)
    with pytest.raises(LayoutError, match="does not fit on 8 GPUs of 80 GB.*with every memory lever"):
        L.search_layout(GPT3, seq_len=2048, batch_target=1536, cluster=cluster)


def test_search_small_model_is_pure_data_parallel_on_whole_nodes():
    for batch in (5, 26, 100, 1000):
        lay = L.search_layout(SMALL, seq_len=2048, batch_target=batch, cluster=DEFAULT_CLUSTER)
        assert (lay.tp, lay.pp, lay.recompute) == (1, 1, "none")
        assert lay.gpus in (1, 2, 4, 8) or lay.gpus % 8 == 0
        assert lay.micro_batch * lay.dp <= batch


def test_search_cpu_cluster_has_no_memory_check():
    lay = L.search_layout(GPT3, seq_len=128, batch_target=8, cluster=cpu_cluster(2))
    assert (lay.tp, lay.pp) == (1, 1) and math.isinf(lay.memory_limit)
    assert lay.gpus <= 2


def test_search_respects_megatron_divisibility():
    odd_vocab = dataclasses.replace(GPT3, vocab_size=50257)  # GPT-2's vocabulary: odd, tp must be 1
    with pytest.raises(LayoutError, match="tp stops at 1 because model.vocab_size=50257"):
        L.search_layout(odd_vocab, seq_len=2048, batch_target=1536,
                        cluster=dataclasses.replace(DEFAULT_CLUSTER, nodes=1))
    padded = dataclasses.replace(GPT3, vocab_size=50304)  # padded to a multiple of 128
    lay = L.search_layout(padded, seq_len=2048, batch_target=1536,
                          cluster=dataclasses.replace(DEFAULT_CLUSTER, nodes=8))
    assert lay.tp == 8


def test_offload_terms():
    base = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, dp=4)
    half = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, dp=4, optimizer_offload=0.5)
    assert base.states - half.states == 3_725_568 * 12 / 4 * 0.5
    assert half.host == 3_725_568 * 12 / 4 * 0.5
    swapped = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, activation_offload=0.5)
    assert swapped.activations == 65_536 * 44 * 2  # two of four layers stay resident
    # the other two go to the host: input (2 s b h) + attention output (2 s b h) + half the rest
    assert swapped.host == 2 * (4 * 65_536 + 0.5 * (44 - 4) * 65_536)
    megatron = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, offload_layers=3)
    assert megatron.activations == 65_536 * 44 and megatron.host == 3 * 65_536 * 44
    with pytest.raises(LayoutError, match="pp=1"):
        M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, pp=2, activation_offload=0.5)


def test_shard_levels_bytes_per_parameter():
    # bf16 weights 2, fp32 gradients 4, fp32 master + Adam 12; fp32 mode 4 / 4 / 8
    assert [M.state_bytes_per_param(s, 8) for s in M.SHARD_LEVELS] == [18, 2 + 4 + 1.5, 2 + 2, 2.25]
    assert [M.state_bytes_per_param(s, 8, fp32=True) for s in M.SHARD_LEVELS] == [16, 9, 5.5, 2]
    assert M.state_bytes_per_param("optimizer", 1) == 18 == M.megatron_state_bytes(1)
    assert M.state_bytes_per_param("optimizer", 4) == M.megatron_state_bytes(4)
    assert M.state_bytes_per_param("full", 8, optimizer_offload=1.0) == 6 / 8


def test_full_shard_memory_counts_gathered_layers():
    n = 3_725_568
    widest = max(layer.params for layer in SMALL.layer_kinds())
    full = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, dp=4, shard="full")
    assert full.states == n * 18 / 4 + 2 * widest * (2 + 4)
    grads = M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, dp=4, shard="grads")
    assert grads.states == n * (2 + 16 / 4) + 2 * widest * 4
    assert M.memory_per_gpu(SMALL, seq_len=128, micro_batch=2, dp=4,
                            shard="none").states == n * 18


def test_memo_alpha_by_hand():
    # fullest layer: input + attention output 4 s b h bytes, the rest (44 - 4) s b h
    sbh = 128 * 2 * 256
    io, other = 4 * sbh, 40 * sbh
    kw = dict(seq_len=128, micro_batch=2, host_bytes=1e30)
    alpha = M.memo_alpha(SMALL, link_bytes_per_s=1e9, layer_seconds=(io + 0.25 * other) / 1e9, **kw)
    assert alpha == pytest.approx(0.25)
    assert M.memo_alpha(SMALL, link_bytes_per_s=1e9, layer_seconds=1.0, **kw) == 1.0
    assert M.memo_alpha(SMALL, link_bytes_per_s=1e9, layer_seconds=io / 2e9, **kw) is None
    # host memory binds: (n - 2) = 2 layers of copies
    bound = M.memo_alpha(SMALL, seq_len=128, micro_batch=2, link_bytes_per_s=1e12, layer_seconds=1.0,
                         host_bytes=2 * (io + 0.5 * other))
    assert bound == pytest.approx(0.5)


def _levers_index(layout) -> int:
    names = [lever.name for lever in L.LEVERS]
    return names.index(layout.levers.split(" (")[0].split(":")[0]) if layout.levers else 0


def test_search_turns_levers_on_in_order_only_when_needed():
    model = DenseConfig(layers=36, hidden=4608, heads=36, kv_heads=36, ffn_hidden=12288,
                        vocab_size=50304)
    seen = []
    for gb in (80, 40, 32, 28, 24, 22):
        cluster = dataclasses.replace(DEFAULT_CLUSTER, nodes=1, gpu_memory_gb=gb)
        try:
            lay = L.search_layout(model, seq_len=2048, batch_target=512, cluster=cluster)
        except LayoutError:
            break
        assert lay.memory.total <= cluster.memory_bytes
        index = _levers_index(lay)
        lever = L.LEVERS[index]
        assert (lay.shard, lay.recompute in lever.recomputes) == (lever.shard, True)
        assert bool(lay.activation_offload) == lever.activation_offload
        assert lay.grad_reduce_fp32 != lever.bf16_grads
        # nothing cheaper fits: every earlier lever, at every tp, pp and micro-batch, is over
        if index:
            assert "at best without it" in lay.levers
        seen.append(index)
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] > 0, seen


def test_layout_summary_records_the_levers():
    lay = L.search_layout(SMALL, seq_len=2048, batch_target=64, cluster=DEFAULT_CLUSTER)
    summary = lay.summary()
    assert {k: summary[k] for k in ("shard", "recompute", "activation_offload",
                                    "optimizer_offload", "grad_reduce_fp32", "levers")} == {
        "shard": "optimizer", "recompute": "none", "activation_offload": 0.0,
        "optimizer_offload": 0.0, "grad_reduce_fp32": True, "levers": ""}


# ----------------------------------------------------------------------------------------------
# bf16 gradients (parallel.grad_reduce_fp32=false), the last lever


def test_bf16_gradients_bytes():
    # bf16 gradients: w 2, g 2, o 12 -> 16 unsharded; every level saves g's 2 bytes (/dp if sharded)
    assert M.state_parts(grad_reduce_fp32=False) == (2, 2, 12)
    assert [M.state_bytes_per_param(s, 8, grad_reduce_fp32=False) for s in M.SHARD_LEVELS] == [
        16, 2 + 2 + 1.5, 2 + 14 / 8, 2.0]
    # fp32 precision: the gradients are the parameters' fp32 either way
    assert [M.state_bytes_per_param(s, 8, fp32=True, grad_reduce_fp32=False)
            for s in M.SHARD_LEVELS] == [16, 9, 5.5, 2]
    n = 3_725_568
    kw = dict(seq_len=128, micro_batch=2)
    fp32_grads = M.memory_per_gpu(SMALL, **kw)
    bf16_grads = M.memory_per_gpu(SMALL, **kw, grad_reduce_fp32=False)
    assert fp32_grads.states - bf16_grads.states == n * 2
    assert (bf16_grads.activations, bf16_grads.working) == (fp32_grads.activations,
                                                            fp32_grads.working)
    # ZeRO-3 over 4 ranks: (2 + 2 + 12) / 4 a parameter, plus two gathered layers' weights and
    # bf16 gradients
    widest = max(layer.params for layer in SMALL.layer_kinds())
    full = M.memory_per_gpu(SMALL, **kw, dp=4, shard="full", grad_reduce_fp32=False)
    assert full.states == n * 16 / 4 + 2 * widest * (2 + 2)
    assert M.memory_per_gpu(SMALL, **kw, fp32=True, grad_reduce_fp32=False).states == n * 16


def _plan(budget: float, cluster):
    from scaleforge.orchestrator.plan.ladder import make_plan

    return make_plan(budget, cluster=cluster)


EIGHT_24GB = Path(__file__).parent.parent / "examples" / "cluster-8x24gb.yaml"


def test_1e23_on_eight_24gb_gpus_needs_bf16_gradients_last():
    from scaleforge.orchestrator.plan.cluster import load_cluster

    cluster = load_cluster(EIGHT_24GB)
    plan = _plan(1e23, cluster)
    target = plan.target
    # 2.99e10 parameters: bf16 weights + fp32 gradients alone are 6 x 2.99e10 / 8 = 22.4 GB > 21.6
    assert target.N == pytest.approx(2.99e10, rel=0.01)
    assert 6 * target.N / 8 > cluster.memory_bytes
    layout = target.layout
    assert layout["memory_gb"] <= layout["memory_limit_gb"] == 21.6
    assert (layout["shard"], layout["optimizer_offload"], layout["grad_reduce_fp32"]) == (
        "full", 1.0, False)
    assert layout["levers"].startswith("shard=full, recompute=full, optimizer offload, "
                                       "bf16 gradients")
    assert "at best without it > 21.6 GB usable" in layout["levers"]
    par = target.spec.parallel
    assert (par.shard, par.recompute, par.optimizer_offload, par.grad_reduce_fp32) == (
        "full", "full", 1.0, False)
    # the table names it (g16) and the lever line says why
    import io

    from rich.console import Console

    from scaleforge.orchestrator.plan.plan_table import print_plan

    out = io.StringIO()
    print_plan(plan, Console(file=out, width=250))
    text = out.getvalue()
    assert "full/full/o1/g16" in text
    assert f"{target.name}: shard=full, recompute=full, optimizer offload, bf16 gradients" in text
    # only the target needed it: the ladder's runs fit with fp32 gradients
    assert all(run.layout["grad_reduce_fp32"] for run in plan.ladder)


def test_1e22_on_eight_24gb_gpus_keeps_fp32_gradients():
    from scaleforge.orchestrator.plan.cluster import load_cluster

    plan = _plan(1e22, load_cluster(EIGHT_24GB))
    runs = [*plan.ladder, plan.target]
    assert all(run.layout["grad_reduce_fp32"] and run.spec.parallel.grad_reduce_fp32
               for run in runs)
    # it does need the cheaper levers: sharding, recomputation and part of the optimizer offloaded
    layout = plan.target.layout
    assert (layout["shard"], layout["recompute"]) == ("full", "full")
    assert 0 < layout["optimizer_offload"] < 1 and "bf16" not in layout["levers"]


@pytest.mark.parametrize("budget", [1e21, 1e23])
def test_default_cluster_plans_need_no_lever(budget):
    plan = _plan(budget, DEFAULT_CLUSTER)
    for run in [*plan.ladder, plan.target]:
        layout = run.layout
        assert (layout["shard"], layout["activation_offload"], layout["optimizer_offload"],
                layout["grad_reduce_fp32"], layout["levers"]) == ("optimizer", 0.0, 0.0, True, "")
        assert run.spec.parallel.grad_reduce_fp32
