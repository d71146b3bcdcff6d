"""Random-number streams: one independent stream per (seed, replication, component).

Common random numbers: every model component draws from its own named stream,
so two zap policies run with the same seed see the same guest behaviour (the
same access streams, the same think times) even though their event orders
differ. A stream is derived as::

    SeedSequence(entropy=seed, spawn_key=(replication, crc32(name)))

which is what ``SeedSequence(seed).spawn(n)[replication]`` would give for the
replication, extended by one more spawn-key word naming the component. The
derivation depends on nothing but (seed, replication, name): not on the order in
which components ask, nor on which worker process runs the replication.
"""
from __future__ import annotations

import zlib

import numpy as np


def stream_seed(seed: int, replication: int, name: str) -> np.random.SeedSequence:
    """The SeedSequence of component ``name`` in ``replication`` of ``seed``."""
    if seed < 0 or replication < 0:
        raise ValueError("seed and replication must be >= 0")
    return np.random.SeedSequence(entropy=seed, spawn_key=(replication, zlib.crc32(name.encode())))


def stream(seed: int, replication: int, name: str) -> np.random.Generator:
    """An independent ``numpy.random.Generator`` (PCG64) for one component."""
    return np.random.Generator(np.random.PCG64(stream_seed(seed, replication, name)))


def replication_seeds(seed: int, replications: int) -> list[np.random.SeedSequence]:
    """``SeedSequence(seed).spawn(replications)``: the per-replication roots."""
    return np.random.SeedSequence(seed).spawn(replications)
