"""REWIRE's memory in the pool size: peak RSS of the whole process tree at 1x and 10x the pool.

    python benchmarks/rewire_memory.py [--mb 30] [--workers 1] [--tasks 1]

Writes a JSONL pool of about MB megabytes (1x) and of 10x that from the bundled corpus (documents
cycled, each with its copy number so no two are equal), then runs the REWIRE stages on each in a
fresh process with the generation replaced by an echo (the reply is the source text: no model, so
what is measured is the pipeline, not the generator): classify (train, stream, score, shard
files), rewrite (batches, screening with the Gopher rules, token counts), filter (rewrite
classifier, scores) and dedup (datatrove's four MinHash stages over the mix candidates). The parent samples the RSS of the
child and all its descendants (datatrove's workers and manager included) every 50 ms. It prints
per size the peak RSS and documents per second per stage (from OUT/rewire.log's stage times), and
last `rss_ratio_10x=<peak 10x / peak 1x>`.

Measured (2 cores, `--mb 20`: 20 and 200 MB, 1,010 and 13,415 documents, 12.8 min): peak RSS 2,080
and 2,157 MB, `rss_ratio_10x=1.037`; documents/s at 10x: classify 178, rewrite (screening only)
31, filter 900, dedup 80.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

def write_pool(path: Path, target_bytes: int) -> int:
    """JSONL of bundled documents cycled until `target_bytes`; returns the document count."""
    from scaleforge.data_pipeline import corpus

    texts = [t for s in corpus.bundled_sources() for _, t in s.documents() if t.strip()]
    n = size = 0
    with path.open("w", encoding="utf-8") as fh:
        while size < target_bytes:
            text = f"{texts[n % len(texts)]}\n\n(copy {n // len(texts)})"
            line = json.dumps({"id": f"d{n}", "text": text}) + "\n"
            fh.write(line)
            size += len(line.encode())
            n += 1
    return n


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_one(cfg: Path, out: Path) -> tuple[int, dict]:
    """Run the child; (peak tree RSS in bytes, seconds per stage)."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", STAGES_CHILD, str(cfg), str(out)], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, _ = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"the pipeline failed (rc {proc.returncode}); its logs are under {out}/logs")
    return peak[0], json.loads(stdout.strip().splitlines()[-1])


STAGES_CHILD = r"""
import json, os, sys, time
from pathlib import Path
from scaleforge.data_pipeline.rewire import engine, pipeline
from scaleforge.data_pipeline.rewire.backends import Generation, provide
from scaleforge.data_pipeline.rewire.config import load_config

class Echo:
    # The reply is the source text: the pipeline is measured, not a model.
    description = {"backend": "echo", "model": "none"}
    def generate(self, requests, cfg, seed):
        return [Generation(text=r[-1]["content"].split("\n\n", 1)[-1], finish_reason="stop", tokens=0)
                for r in requests]

cfg = load_config(sys.argv[1])
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
provide(Echo())
times = {}
for stage in ("classify", "rewrite", "filter", "dedup"):
    t0 = time.perf_counter()
    engine.run_local(cfg, out, stage)
    times[stage] = time.perf_counter() - t0
print(json.dumps(times))
"""


def config(pool: Path, workers: int, tasks: int) -> dict:
    ft = {"dim": 16, "bucket": 65536, "epochs": 5, "lr": 0.5}
    return {
        "pool": {"reader": "jsonl", "paths": [str(pool)]},
        "classify": {
            "positives": [{"store": "bundled", "start": 0, "count": 200, "max_chars": 2000}],
            "negatives": [{"store": "bundled", "start": 1000, "count": 200, "max_chars": 2000}],
            "fasttext": ft,
        },
        "rewrite": {"batch_size": 16, "shard_size": 1024, "min_length_ratio": 0.5},
        "filter": {"keep_fraction": 0.1, "fasttext": ft},
        "mix": {"tokenizer": "bundled"},
        "executor": {"tasks": tasks, "workers": workers},
    }


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30.0, help="size of the 1x pool in MB (10x: ten times)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=1)
    args = ap.parse_args()
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="rewire-mem-") as tmp:
        root = Path(tmp)
        for scale in (1, 10):
            pool = root / f"pool-{scale}x.jsonl"
            docs = write_pool(pool, int(args.mb * scale * 1e6))
            cfg = root / f"cfg-{scale}x.yaml"
            cfg.write_text(yaml.safe_dump(config(pool, args.workers, args.tasks)))
            peak, times = run_one(cfg, root / f"out-{scale}x")
            peaks[scale] = peak
            rates = " ".join(f"{s}_docs_per_s={docs / t:.0f}" for s, t in times.items())
            print(f"{scale}x: {docs} documents, {pool.stat().st_size / 1e6:.0f} MB, peak_rss_mb="
                  f"{peak / 2**20:.0f} {rates}", flush=True)
    print(f"rss_ratio_10x={peaks[10] / peaks[1]:.3f}")


if __name__ == "__main__":
    main()
