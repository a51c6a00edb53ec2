"""The memory model (scaleforge/parallel/memory.py, fp32 CPU mode) against what PyTorch holds.

    python benchmarks/memory_model.py [--peak-steps 2]

1. Activations: for several (seq, batch, hidden, heads) and TP in {1, 2} (TP=2 with and without
   sequence parallelism, two gloo ranks under torchrun), the bytes autograd saves for one of the
   project's dense transformer layers (megatron TransformerLayer, SDPA, RMSNorm, SwiGLU, RoPE, GQA;
   fp32, no dropout), summed through `saved_tensors_hooks` with each storage counted once and the
   parameters left out, against `memory.transformer_saved_bytes` for the same shapes.
2. Peak: a short training run (the trainer's build and steps: megatron DDP, AdamW) of a model the
   memory model puts at 2 GB or more; the peak resident set size minus the resident set before the
   model is built, against `memory.memory_per_gpu(..., fp32=True).total`.

Last line: `activation_model_error=<max relative error> peak_model_error=<relative error>`.

Measured (2 cores, defaults): every one of the 12 activation rows exact (0.00%); peak 4.091 GB
against the model's 4.160 GB (128,207,616 parameters, seq 512, batch 4): `activation_model_error=0.0000
peak_model_error=0.0169`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MMAP_THRESHOLD = "131072"
"""glibc's MALLOC_MMAP_THRESHOLD_ for the measurement (see main)."""
SHAPES = [  # (seq, batch, hidden, heads); kv heads = heads / 2, ffn = 8/3 hidden rounded to 64
    (128, 2, 64, 4),
    (256, 4, 128, 8),
    (512, 2, 256, 8),
    (1024, 1, 512, 16),
]


def _ffn(hidden: int) -> int:
    return (8 * hidden // 3 + 63) // 64 * 64


def _spec(seq: int, batch: int, hidden: int, heads: int, *, layers: int, vocab: int,
          tp: int = 1, sp: bool = False, steps: int = 1):
    from scaleforge.config import RunSpec, apply_overrides

    return apply_overrides(RunSpec(), [
        f"model.hidden={hidden}", f"model.heads={heads}", f"model.kv_heads={heads // 2}",
        f"model.ffn_hidden={_ffn(hidden)}", f"model.layers={layers}", f"model.vocab_size={vocab}",
        f"data.seq_len={seq}", f"train.micro_batch={batch}", f"train.global_batch={batch}",
        f"train.steps={steps}", f"parallel.tp={tp}", f"parallel.sp={str(sp).lower()}",
        "train.precision=fp32", "parallel.dp=1",
    ])


# ----------------------------------------------------------------------------------------------
# 1. saved activations of one layer


def layer_saved_bytes(seq: int, batch: int, hidden: int, heads: int, tp: int, sp: bool) -> int:
    """Bytes autograd saves in one forward of decoder layer 0 (this rank), storages counted once."""
    import torch

    from scaleforge.arch.registry import builder_module
    from scaleforge.pretrain import model_build

    spec = _spec(seq, batch, hidden, heads, layers=2, vocab=512, tp=tp, sp=sp)
    model = builder_module("dense").build_model(
        spec.model, seq_len=seq, seed=1, runtime=model_build.runtime_config(spec))
    layer = model.decoder.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    local_seq = seq // tp if sp else seq
    x = torch.randn(local_seq, batch, hidden, requires_grad=True)
    rope = model.rotary_pos_emb(seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, rotary_pos_emb=rope)
    return sum(storages.values())


def activation_rows(tp: int, sp: bool) -> list[dict]:
    from scaleforge.parallel import memory

    rows = []
    for seq, batch, hidden, heads in SHAPES:
        measured = layer_saved_bytes(seq, batch, hidden, heads, tp, sp)
        predicted = memory.transformer_saved_bytes(
            seq_len=seq, micro_batch=batch, hidden=hidden, heads=heads, kv_heads=heads // 2,
            ffn_hidden=_ffn(hidden), tp=tp, sp=sp)
        rows.append(dict(seq=seq, batch=batch, hidden=hidden, heads=heads, tp=tp, sp=sp,
                         measured=measured, predicted=predicted))
    return rows


def _worker(args) -> None:
    """Under torchrun: this rank's rows for TP=2 (rank 0 writes them)."""
    import torch.distributed as dist

    from scaleforge.parallel.setup import init_distributed, shutdown

    spec = _spec(*SHAPES[0], layers=2, vocab=512, tp=2, sp=args.sp)
    init_distributed(spec)
    rows = activation_rows(2, args.sp)
    if dist.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(rows))
    shutdown()


def tp2_rows(sp: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               __file__, "--worker", str(out)] + (["--sp"] if sp else [])
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------
# 2. peak resident memory of a short run


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_row(steps: int) -> dict:
    import torch

    from scaleforge.parallel import memory
    from scaleforge.parallel.setup import init_distributed, shutdown
    from scaleforge.pretrain import loop, model_build

    seq, batch, hidden, heads, layers, vocab = 512, 4, 768, 12, 12, 32768
    spec = _spec(seq, batch, hidden, heads, layers=layers, vocab=vocab, steps=steps)
    predicted = memory.memory_per_gpu(spec.model, seq_len=seq, micro_batch=batch, fp32=True,
                                      flash=True)
    assert predicted.total >= 2e9, predicted.total
    init_distributed(spec)
    rows = torch.randint(0, vocab, (batch, seq + 1))
    before = _rss()
    built = model_build.build(spec)
    for step in range(steps):
        loop.train_step(built, spec, rows, step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    shutdown()
    return dict(parameters=spec.model.num_params(), measured=peak - before,
                predicted=predicted.total, states=predicted.states,
                activations=predicted.activations, logits=predicted.logits,
                working=predicted.working)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-steps", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so the resident
        # set would count freed tensors too (measured: 5.2 GB peak against 4.5 GB with the fixed
        # threshold); a fixed 128 KiB threshold maps every tensor and unmaps it when freed
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
        env.setdefault("OMP_NUM_THREADS", "2")
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    from scaleforge.parallel.setup import init_distributed, shutdown

    init_distributed(_spec(*SHAPES[0], layers=2, vocab=512))
    rows = activation_rows(1, False)
    shutdown()
    rows += tp2_rows(False) + tp2_rows(True)
    errors = []
    print(f"{'seq':>5} {'b':>2} {'h':>4} {'a':>3} {'tp':>2} {'sp':>3} {'measured MB':>12} "
          f"{'model MB':>10} {'error':>8}")
    for r in rows:
        error = abs(r["predicted"] - r["measured"]) / r["measured"]
        errors.append(error)
        print(f"{r['seq']:>5} {r['batch']:>2} {r['hidden']:>4} {r['heads']:>3} {r['tp']:>2} "
              f"{str(r['sp'])[0]:>3} {r['measured'] / 1e6:>12.3f} {r['predicted'] / 1e6:>10.3f} "
              f"{error:>8.2%}")
    peak = peak_row(args.peak_steps)
    peak_error = abs(peak["predicted"] - peak["measured"]) / peak["measured"]
    print(f"peak: {peak['parameters']:,} parameters, measured {peak['measured'] / 1e9:.3f} GB, "
          f"model {peak['predicted'] / 1e9:.3f} GB (states {peak['states'] / 1e9:.3f}, "
          f"activations {peak['activations'] / 1e9:.3f}, logits {peak['logits'] / 1e9:.3f}, "
          f"backward working {peak['working'] / 1e9:.3f})")
    print(f"activation_model_error={max(errors):.4f} peak_model_error={peak_error:.4f}")


if __name__ == "__main__":
    main()
