"""The sample stream: global sample index -> a window of tokens, a pure function of (seed, index).

A store's split is one token stream (documents joined by the separator); it is cut into fixed
windows of `seq_len + 1` tokens starting every `seq_len` tokens (the extra token is the last label).
Each epoch visits every window once, in a fresh keyed permutation; epoch e of store s begins at
that store's local index e * windows(s). Several stores are mixed by a fixed, seeded schedule over
blocks of `MIX_BLOCK` global indices in which store s owns exactly round(w_s * MIX_BLOCK) slots,
spread evenly (stratified positions with a seeded phase): so any run of consecutive samples holds
each store within about two samples of its weight, not only on average.

Because everything is indexed by the global sample number, data-parallel rank r of d takes rows
`rank_rows(global_batch, r, d)` of step t's global batch (indices t * global_batch + rows): a resume,
or a resume under another data-parallel size, continues the stream exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaleforge.data_pipeline import counter_hash
from scaleforge.data_pipeline.store import SPLITS, TokenStore
from scaleforge.errors import DataError

MIX_BLOCK = 4096
"""Global indices per mixture block: each weight is realised to 1/4096 in every block."""
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}


class TokenSampler:
    """Fixed-length token windows from one store or a weighted mixture, by global sample index."""

    def __init__(
        self,
        stores: list[TokenStore],
        weights: list[float] | None = None,
        seq_len: int = 256,
        seed: int = 0,
        split: str = "train",
    ):
        stores = list(stores)
        if not stores:
            raise DataError("the sampler needs at least one token store")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        seq_len, seed = _integer("seq_len", seq_len, 1), _integer("seed", seed, 0)
        tokenizers = {s.tokenizer_sha256 for s in stores}
        if len(tokenizers) > 1:
            raise DataError(
                "the stores were tokenized with different tokenizers: mix only stores that share one "
                f"({', '.join(f'{s.path}={s.tokenizer_sha256[:12]}' for s in stores)})"
            )
        self.stores = stores
        self.seq_len = seq_len
        self.seed = seed
        self.split = split
        self.weights = _normalise_weights(stores, weights, split)
        self._windows = []
        for store, w in zip(stores, self.weights):
            n = (store.num_tokens(split) - 1) // seq_len
            if w > 0 and n < 1:
                raise DataError(
                    f"data store {store.path} has {store.num_tokens(split)} {split} tokens, fewer than "
                    f"one sample of data.seq_len + 1 = {seq_len + 1}: lower data.seq_len or add text"
                )
            self._windows.append(max(n, 0))
        self._quota = _quotas(self.weights, MIX_BLOCK)
        self._slot_store, self._slot_rank = _block_layout(self._quota, seed)
        self._split_code = _SPLIT_CODE[split]

    # -- sizes ---------------------------------------------------------------------------------

    def windows(self, store_index: int = 0) -> int:
        """Windows (samples per epoch) of one store's split."""
        return self._windows[store_index]

    @property
    def samples_per_epoch(self) -> int:
        """Global samples until the store that runs out first has been seen once (whole epochs)."""
        per = [n / w for n, w in zip(self._windows, self.weights) if w > 0]
        return int(min(per))

    def epochs(self, index: int) -> list[float]:
        """Epochs of each store consumed by global samples [0, index)."""
        local = self._local_counts(index)
        return [c / n if n else 0.0 for c, n in zip(local, self._windows)]

    # -- the stream ----------------------------------------------------------------------------

    def samples(self, start: int, count: int) -> np.ndarray:
        """int64 [count, seq_len + 1]: global samples start .. start + count - 1."""
        if start < 0 or count < 0:
            raise DataError(f"sample range needs start >= 0 and count >= 0, got start={start}, count={count}")
        index = np.arange(start, start + count, dtype=np.int64)
        store_of, local = self._locate(index)
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        width = self.seq_len + 1
        for s in np.unique(store_of):
            rows = np.flatnonzero(store_of == s)
            starts = self._window_starts(int(s), local[rows])
            store = self.stores[int(s)]
            for row, begin in zip(rows.tolist(), starts.tolist()):
                out[row] = store.read(self.split, begin, begin + width)
        return out

    def batch(self, step: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> np.ndarray:
        """This data-parallel rank's rows of optimizer step `step`'s global batch."""
        rows = rank_rows(global_batch, dp_rank, dp_size)
        return self.samples(step * global_batch + rows.start, len(rows))

    def _locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(store, store-local sample index) of each global index."""
        if len(self.stores) == 1:
            return np.zeros(index.shape, dtype=np.int64), index
        block, slot = np.divmod(index, MIX_BLOCK)
        store_of = self._slot_store[slot]
        local = block * self._quota[store_of] + self._slot_rank[slot]
        return store_of, local

    def _local_counts(self, index: int) -> list[int]:
        """Samples each store has given to global indices [0, index)."""
        if len(self.stores) == 1:
            return [index]
        block, rest = divmod(index, MIX_BLOCK)
        head = np.bincount(self._slot_store[:rest], minlength=len(self.stores))
        return [int(block * q + h) for q, h in zip(self._quota, head)]

    def _window_starts(self, store_index: int, local: np.ndarray) -> np.ndarray:
        """Token offsets of the windows for store-local sample indices (epoch-aware permutation)."""
        n = self._windows[store_index]
        epoch, pos = np.divmod(local, n)
        window = np.empty_like(pos)
        for e in np.unique(epoch):
            sel = epoch == e
            k = counter_hash.key(self.seed, self._split_code, store_index, int(e))
            window[sel] = counter_hash.permute(k, pos[sel], n).astype(np.int64)
        return window * self.seq_len

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self, position: int | None = None) -> dict:
        """What defines the stream (and, given, the next global sample index): a checkpoint keeps it
        and `load_state_dict` checks it on resume. Each store is named by path and identified by its
        tokenizer hash and its content identity (sha256 over every chunk checksum)."""
        state = {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
            "stores": [
                {"path": str(s.path), "tokenizer_sha256": s.tokenizer_sha256, "identity": s.identity}
                for s in self.stores
            ],
            "weights": list(self.weights),
            "mix_block": MIX_BLOCK,
        }
        if position is not None:
            state["position"] = int(position)
        return state

    def load_state_dict(self, state: dict, position: int | None = None) -> None:
        """Raise DataError unless `state` describes this very stream, naming what changed: a store
        rebuilt or replaced under its path (tokenizer or content), the stores, weights, seed,
        seq_len, or the position the run resumes at."""
        mine = self.state_dict(position)
        theirs = list(state.get("stores", []))
        if len(theirs) != len(mine["stores"]):
            raise DataError(
                f"the checkpoint was made with {len(theirs)} data stores, the run has "
                f"{len(mine['stores'])}: resume with the same data.stores, or start a new run"
            )
        for old, new in zip(theirs, mine["stores"]):
            if isinstance(old, str):  # an identity alone (older checkpoints)
                old = {"path": "?", "tokenizer_sha256": "", "identity": old}
            if old.get("identity") == new["identity"]:
                continue
            if old.get("tokenizer_sha256") and old["tokenizer_sha256"] != new["tokenizer_sha256"]:
                what = (f"its tokenizer changed ({old['tokenizer_sha256'][:12]} -> "
                        f"{new['tokenizer_sha256'][:12]})")
            else:
                what = f"its content changed (identity {old['identity'][:12]} -> {new['identity'][:12]})"
            raise DataError(
                f"the data stores differ from the checkpoint's: data store {new['path']} was rebuilt or "
                f"replaced, {what}; restore the store the run trained on (checkpointed as "
                f"{old.get('path')}), or start a new run"
            )
        for key in ("seed", "seq_len", "split", "mix_block"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the checkpoint's sampler {key} is {state.get(key)!r}, the run's is {mine[key]!r}: "
                    "resume with the same settings, or start a new run"
                )
        old_w = [float(w) for w in state.get("weights", [])]
        ours = mine["weights"]
        if len(old_w) != len(ours) or not np.allclose(old_w, ours, rtol=0, atol=1e-12):
            raise DataError(
                f"the checkpoint's mixture weights {old_w} differ from the run's {mine['weights']}: "
                "resume with the same data.weights, or start a new run"
            )
        if position is not None and "position" in state and state["position"] != position:
            raise DataError(
                f"the checkpoint's sampler position is sample {state['position']}, the run resumes at "
                f"{position}: resume with the same train.global_batch, or start a new run"
            )


@dataclass(kw_only=True, frozen=True)
class DPShard:
    """One data-parallel rank's share of every global batch."""

    dp_rank: int
    """This rank's index among the data-parallel ranks."""
    dp_size: int
    """Number of data-parallel ranks."""

    def __post_init__(self) -> None:
        if not 0 <= self.dp_rank < self.dp_size:
            raise DataError(f"dp_rank must be in [0, dp_size={self.dp_size}), got {self.dp_rank}")

    def rows(self, global_batch: int) -> range:
        """Row indices of the global batch this rank trains on."""
        return rank_rows(global_batch, self.dp_rank, self.dp_size)


def rank_rows(global_batch: int, dp_rank: int, dp_size: int) -> range:
    """Rows of a global batch owned by data-parallel rank `dp_rank` of `dp_size`: a contiguous block.

    The union over ranks is range(global_batch), each row exactly once.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank must be in [0, dp_size) with dp_size >= 1, got {dp_rank} of {dp_size}")
    if global_batch % dp_size:
        raise DataError(f"global batch {global_batch} is not divisible by the data-parallel size {dp_size}")
    per = global_batch // dp_size
    return range(dp_rank * per, (dp_rank + 1) * per)


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _normalise_weights(stores: list[TokenStore], weights, split: str) -> list[float]:
    if weights is None or len(weights) == 0:
        # No weights: each store in proportion to its tokens, i.e. one pass over all text per epoch.
        weights = [float(s.num_tokens(split)) for s in stores]
    weights = [float(w) for w in weights]
    if len(weights) != len(stores):
        raise DataError(f"{len(weights)} mixture weights for {len(stores)} stores: give one weight per store")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"mixture weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _quotas(weights: list[float], block: int) -> np.ndarray:
    """Slots per block for each store: largest remainder of w * block, summing to block exactly."""
    target = np.array(weights) * block
    quota = np.floor(target).astype(np.int64)
    order = np.argsort(-(target - quota), kind="stable")
    quota[order[: block - int(quota.sum())]] += 1
    for w, q in zip(weights, quota):
        if w > 0 and q == 0:
            raise DataError(
                f"mixture weight {w:.2e} is below 1/{block}, the schedule's resolution: "
                "raise it or drop the store"
            )
    return quota


def _block_layout(quota: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each slot of a block: its store, and its rank among that store's slots in the block.

    Store s's slots sit at the stratified positions (j + u_s) / quota_s, j = 0..quota_s-1, with a
    seeded phase u_s in [0, 1); merging the stores by position spreads each one evenly.
    """
    phase = counter_hash.uniform(counter_hash.key(seed, 0x313C), np.arange(len(quota)))
    pos, store, rank = [], [], []
    for s, q in enumerate(quota.tolist()):
        j = np.arange(q)
        pos.append((j + phase[s]) / max(q, 1))
        store.append(np.full(q, s, dtype=np.int64))
        rank.append(j)
    pos, store, rank = np.concatenate(pos), np.concatenate(store), np.concatenate(rank)
    order = np.lexsort((store, pos))
    return store[order], rank[order].astype(np.int64)
