"""Tiles of an image and per-tile computation with a halo.

A tiling is a list of ``(rows, columns)`` slices covering the image without overlap (the
chunks of a dask array, or one tile for the whole image). :func:`map_tiles` runs a function on
each tile grown by a halo (clipped at the image edges) and crops its outputs back to the tile:
when every output pixel depends only on inputs within the halo, the assembled result is the
same as the function applied to the whole image, for any tiling. With several tiles the calls
are dask tasks run by the current scheduler (the compiled kernels release the GIL, so a
threaded scheduler runs tiles in parallel).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dask
import numpy as np

__all__ = ["Tile", "assemble", "map_tiles", "tile_slices"]

Tile = tuple[slice, slice]


def _edges(n: int, chunks: Sequence[int] | int | None) -> list[int]:
    if chunks is None:
        return [0, n]
    if isinstance(chunks, int | np.integer):
        return [*range(0, n, int(chunks)), n]
    edges = np.concatenate([[0], np.cumsum(chunks)]).astype(int).tolist()
    if edges[-1] != n:
        raise ValueError(f"chunks {chunks} do not cover an axis of length {n}")
    return edges


def tile_slices(shape: tuple[int, int], chunks: Any = None) -> list[Tile]:
    """Return the tiles of an image of ``shape``.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, columns)``.
    chunks : None, int, pair of int or dask-style chunks, optional
        ``None`` for one tile; an int or a pair of ints for regular tiles of that edge; or
        ``((rows...), (columns...))`` as a dask array's ``chunks``.

    Returns
    -------
    list of (slice, slice)
        Row-major list of tiles.
    """
    if chunks is None:
        row_chunks: Any = None
        col_chunks: Any = None
    elif isinstance(chunks, int | np.integer):
        row_chunks = col_chunks = int(chunks)
    else:
        row_chunks, col_chunks = chunks
    rows = _edges(shape[0], row_chunks)
    cols = _edges(shape[1], col_chunks)
    return [(slice(r0, r1), slice(c0, c1)) for r0, r1 in itertools.pairwise(rows)
            for c0, c1 in itertools.pairwise(cols)]


def _grown(tile: Tile, halo: int, shape: tuple[int, int]) -> tuple[Tile, Tile]:
    """Return the tile grown by ``halo`` (clipped) and the tile's slices within it."""
    rows, cols = tile
    r0, c0 = max(rows.start - halo, 0), max(cols.start - halo, 0)
    r1, c1 = min(rows.stop + halo, shape[0]), min(cols.stop + halo, shape[1])
    window = (slice(r0, r1), slice(c0, c1))
    crop = (slice(rows.start - r0, rows.stop - r0), slice(cols.start - c0, cols.stop - c0))
    return window, crop


def _run_one(func: Callable[..., Any], window: Tile, crop: Tile, offset: tuple[int, int],
             arrays: Sequence[np.ndarray], kwargs: dict[str, Any]) -> Any:
    parts = [np.ascontiguousarray(a[window]) for a in arrays]
    return func(*parts, crop=crop, offset=offset, **kwargs)


def map_tiles(func: Callable[..., Any], arrays: Sequence[np.ndarray], tiles: list[Tile], *,
              halo: int, **kwargs: Any) -> list[Any]:
    """Call ``func`` on every tile grown by ``halo``; return the per-tile results in order.

    ``func(*windows, crop=crop, offset=(row0, col0), **kwargs)`` receives the arrays' windows
    (the tile plus its halo, clipped at the image edges), the tile's slices within them and
    the window's origin in the image; it must return its output for the tile only (use
    ``crop``).
    """
    shape = arrays[0].shape
    jobs = []
    for tile in tiles:
        window, crop = _grown(tile, halo, shape)
        jobs.append((window, crop, (window[0].start, window[1].start)))
    if len(jobs) == 1:
        window, crop, offset = jobs[0]
        return [_run_one(func, window, crop, offset, arrays, kwargs)]
    # one graph node per input, named rather than hashed (hashing large arrays is slow)
    shared = [dask.delayed(a, name=f"detect-tile-input-{uuid.uuid4().hex}") for a in arrays]
    run = dask.delayed(_run_one, pure=False)
    tasks = [run(func, window, crop, offset, shared, kwargs) for window, crop, offset in jobs]
    return list(dask.compute(*tasks, optimize_graph=False))  # (optimizing hashes the inputs)


def assemble(shape: tuple[int, int], dtype: Any, tiles: list[Tile],
             parts: Sequence[np.ndarray]) -> np.ndarray:
    """Place per-tile arrays into one image (a single whole-image tile is returned as is)."""
    if len(tiles) == 1 and parts[0].shape == tuple(shape):
        return np.asarray(parts[0], dtype=dtype)
    out = np.empty(shape, dtype)
    for tile, part in zip(tiles, parts, strict=True):
        out[tile] = part
    return out
