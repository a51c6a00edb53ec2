"""Counter-based randomness: pure functions of (key, counter), vectorised over numpy arrays.

Used instead of a stateful RNG wherever a random choice must be recomputable for any index in O(1)
(the validation split, the per-epoch window permutation, the mixture phases), and so it cannot
change with a numpy release.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective 64-bit mix (Steele et al. 2014), elementwise."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def key(*parts: int) -> np.uint64:
    """Fold integers (seed, stream ids, epoch...) into one 64-bit key."""
    h = 0
    for p in parts:
        h = _splitmix64_int(h ^ (int(p) & _MASK64))
    return np.uint64(h)


def _splitmix64_int(z: int) -> int:
    # The same finaliser on a Python int (cheaper than a one-element array for scalar keys).
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash_u64(k: np.uint64, counters: np.ndarray) -> np.ndarray:
    """64-bit pseudo-random values for each counter under key `k`."""
    return splitmix64(splitmix64(np.asarray(counters, dtype=np.uint64) ^ k) + k)


def uniform(k: np.uint64, counters: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) for each counter under key `k` (53 random bits each)."""
    return (hash_u64(k, counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permute(k: np.uint64, index: np.ndarray, n: int) -> np.ndarray:
    """The image of `index` under a keyed bijection of range(n) (a Feistel network with cycle walking).

    O(1) memory for any n: the sampler never materialises a permutation of all windows.
    """
    if n <= 0:
        raise ValueError(f"permute needs n > 0, got {n}")
    x = np.asarray(index, dtype=np.uint64).copy()
    if n == 1:
        return x
    # An unbalanced Feistel network over exactly bits = bit_length(n - 1) bits, so each cycle-walk
    # step lands inside range(n) with probability n / 2**bits > 1/2. Each round xors one half with a
    # keyed hash of the other, which is invertible, so the whole is a bijection of range(2**bits).
    bits = int(n - 1).bit_length()
    lo_bits = bits // 2
    hi_bits = bits - lo_bits
    lo_mask = np.uint64((1 << lo_bits) - 1)
    hi_mask = np.uint64((1 << hi_bits) - 1)
    shift = np.uint64(lo_bits)
    round_keys = [key(int(k), 0xFE1, r) for r in range(_ROUNDS)]
    todo = np.ones(x.shape, dtype=bool)
    while True:
        v = x[todo]
        hi, lo = v >> shift, v & lo_mask
        for r, rk in enumerate(round_keys):
            if r % 2 == 0:
                hi = hi ^ (splitmix64(lo ^ rk) & hi_mask)
            else:
                lo = lo ^ (splitmix64(hi ^ rk) & lo_mask)
        v = (hi << shift) | lo
        x[todo] = v
        todo[todo] = v >= np.uint64(n)
        if not todo.any():
            return x


_ROUNDS = 6
