"""Offline data: real text -> byte-level BPE -> zarr token store -> deterministic sample stream.

    python -m scaleforge.data_pipeline.prepare      # builds the `bundled` store once

    from scaleforge.data_pipeline import open_store, TokenSampler
    store = open_store("bundled")
    sampler = TokenSampler([store], None, seq_len=256, seed=1234)
    batch = sampler.samples(start=step * 64, count=64)   # int64 [64, 257]
"""

from scaleforge.data_pipeline.sampler import DPShard, TokenSampler, rank_rows
from scaleforge.data_pipeline.store import TokenStore, open_store, store_path, unigram_entropy_nats

__all__ = [
    "DPShard",
    "TokenSampler",
    "TokenStore",
    "open_store",
    "rank_rows",
    "store_path",
    "unigram_entropy_nats",
]
