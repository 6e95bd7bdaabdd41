"""Deterministic random streams: one independent generator per (seed, purpose, ids).

Every random draw of the simulator comes from :func:`rng_for`, whose stream depends only on the
master seed, a purpose name and integer ids (visit, detector, tract, ...), never on the order in
which Dask runs the tasks. So the same seed gives the same bytes with any number of workers.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["galsim_seed", "rng_for", "seed_sequence"]


def seed_sequence(seed: int, purpose: str, *ids: int) -> np.random.SeedSequence:
    """Return the seed sequence of a stream (``purpose`` is hashed with CRC-32)."""
    key = [int(seed), zlib.crc32(purpose.encode("utf-8"))] + [int(i) for i in ids]
    return np.random.SeedSequence(key)


def rng_for(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    """Return the numpy generator of a stream."""
    return np.random.default_rng(seed_sequence(seed, purpose, *ids))


def galsim_seed(seed: int, purpose: str, *ids: int) -> int:
    """Return a positive 31-bit integer seed for a GalSim ``BaseDeviate``."""
    state = seed_sequence(seed, purpose, *ids).generate_state(1, dtype=np.uint32)[0]
    return int(state % (2**31 - 2)) + 1
