"""One RNG discipline: a seed per run, and independent streams derived from it by name.

`derive(seed, "data", 3)` is the seed of worker 3's data stream; streams never share state, so adding
a worker or a feature does not shift another stream's numbers.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive(seed: int, stream: str, index: int = 0) -> int:
    """A 63-bit seed for stream `stream` (e.g. 'data', 'clock', 'augment', 'init') of item `index`."""
    key = (zlib.crc32(stream.encode()), index)
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(derive(seed, stream, index))


def torch_generator(seed: int, stream: str, index: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive(seed, stream, index))
    return g
