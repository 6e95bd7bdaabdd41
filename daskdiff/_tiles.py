"""Re-gridding dask arrays onto boxes with one task per output tile.

Slicing a tiled array to an arbitrary box, padding it and re-chunking it through dask's array
API creates several graph layers per tile; for the many small boxes of template assembly and
warping that graph dominates the run time. :func:`regrid` builds the equivalent graph directly:
each output tile is one task that copies the overlapping parts of the source chunks into a
filled array, or the source chunk itself (no copy) where the tile is exactly one chunk.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from functools import partial
from itertools import pairwise
from operator import getitem
from typing import Any
from uuid import uuid4

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from .box import Box

__all__ = ["as_dask", "call3", "call_keys", "chunk_pieces", "constant", "regrid", "tile_tasks",
           "tilewise3", "wrap"]


def _fill_cell(chunks: list[np.ndarray], src: list[tuple[slice, slice]],
               dst: list[tuple[slice, slice]], shape: tuple[int, int], fill: Any,
               dtype: np.dtype) -> np.ndarray:
    out = np.full(shape, fill, dtype=dtype)
    for chunk, s, d in zip(chunks, src, dst, strict=True):
        out[d] = chunk[s]
    return out


def _chunk_shape(array: da.Array, key: tuple[Any, int, int]) -> tuple[int, int]:
    return array.chunks[0][key[1]], array.chunks[1][key[2]]


def _edges(start: int, chunks: tuple[int, ...]) -> list[int]:
    return [int(e) for e in np.cumsum((start, *chunks))]


def _overlapping(edges: list[int], start: int, stop: int) -> range:
    """Return the chunks (between consecutive ``edges``) overlapping ``[start, stop)``."""
    first = max(bisect_right(edges, start) - 1, 0)
    last = min(bisect_left(edges, stop), len(edges) - 1)
    return range(first, last) if start < stop else range(0)


def chunk_pieces(array: da.Array, origin: tuple[int, int], box: Box
                 ) -> tuple[list[tuple[Any, int, int]], list[tuple[tuple[slice, slice], ...]]]:
    """Return the keys of the chunks of ``array`` overlapping ``box`` and where they go.

    ``array[0, 0]`` is at parent ``origin = (x0, y0)``. Each piece is ``(source slices,
    destination slices)``: the part of the chunk inside ``box`` and its place in an array of
    ``box.shape``.
    """
    ox, oy = origin
    ys = _edges(oy, array.chunks[0])
    xs = _edges(ox, array.chunks[1])
    keys, pieces = [], []
    for ci in _overlapping(ys, box.y0, box.y1):
        ca, cb = ys[ci], ys[ci + 1]
        y0, y1 = max(box.y0, ca), min(box.y1, cb)
        for cj in _overlapping(xs, box.x0, box.x1):
            xa, xb = xs[cj], xs[cj + 1]
            x0, x1 = max(box.x0, xa), min(box.x1, xb)
            keys.append((array.name, ci, cj))
            pieces.append(((slice(y0 - ca, y1 - ca), slice(x0 - xa, x1 - xa)),
                           (slice(y0 - box.y0, y1 - box.y0), slice(x0 - box.x0, x1 - box.x0))))
    return keys, pieces


def regrid(array: da.Array | np.ndarray, origin: tuple[int, int], box: Box, *,
           tile: int | tuple[int, int], fill: Any) -> da.Array:
    """Return ``array`` (first pixel at parent ``origin = (x0, y0)``) on ``box``, tiled.

    Parameters
    ----------
    array : dask.array.Array or numpy.ndarray
        A 2-D array in the parent frame.
    origin : tuple of int
        Parent ``(x0, y0)`` of ``array[0, 0]``.
    box : Box
        The output box.
    tile : int or (int, int)
        Output tile edge (``(ty, tx)`` for unequal edges).
    fill : scalar
        Value of output pixels outside ``array``.

    Returns
    -------
    dask.array.Array
        ``box.shape`` with chunks of ``tile`` (the last ones smaller); one task per tile.
    """
    array = da.asarray(array)
    dtype = array.dtype
    ty, tx = (tile, tile) if np.isscalar(tile) else tile
    x_edges = [*range(box.x0, box.x1, tx), box.x1]
    y_edges = [*range(box.y0, box.y1, ty), box.y1]
    name = f"regrid-{uuid4().hex}"
    dsk: dict[Any, Any] = {}
    for i, (ya, yb) in enumerate(pairwise(y_edges)):
        for j, (xa, xb) in enumerate(pairwise(x_edges)):
            keys, pieces = chunk_pieces(array, origin, Box.from_bounds(xa, ya, xb, yb))
            src = [p[0] for p in pieces]
            dst = [p[1] for p in pieces]
            shape = (yb - ya, xb - xa)
            if len(keys) == 1 and dst[0] == (slice(0, shape[0]), slice(0, shape[1])) \
                    and src[0] == dst[0] and _chunk_shape(array, keys[0]) == shape:
                dsk[(name, i, j)] = keys[0]  # the tile is a whole source chunk: no copy
            else:
                dsk[(name, i, j)] = (_fill_cell, keys, src, dst, shape, fill, dtype)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[array])
    chunks = (tuple(b - a for a, b in pairwise(y_edges)),
              tuple(b - a for a, b in pairwise(x_edges)))
    return da.Array(graph, name, chunks, dtype=dtype)


def constant(shape: tuple[int, int], value: Any, dtype: Any) -> da.Array:
    """Return a one-chunk array filled with ``value`` (one task, nothing tokenised)."""
    name = f"constant-{uuid4().hex}"
    dsk = {(name, 0, 0): (partial(np.full, shape, value, dtype),)}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
    return da.Array(graph, name, ((shape[0],), (shape[1],)), dtype=dtype)


def _label(func: Any) -> str:
    """Task name prefix: the function's name (so profiles group tasks by function)."""
    name = getattr(func, "__name__", "") or "tiles3"
    return name.strip("_").replace("-", "_")


def tilewise3(func: Any, groups: list[list[da.Array]], dtypes: tuple[Any, Any, Any], *,
              select: Any = None, **kwargs: Any) -> tuple[da.Array, da.Array, da.Array]:
    """Apply ``func`` to aligned tiles of groups of arrays; it returns three planes per tile.

    Every tile is computed by exactly one task, whose three results feed three output arrays
    (``map_blocks`` with a stacked output would be fused into each plane's consumers and run
    three times).

    Parameters
    ----------
    func : callable
        ``func(*tiles, indices=, location=, shape=, **kwargs) -> (a, b, c)``: ``tiles`` are
        the tiles of the selected groups' arrays, in order; ``indices`` the selected group
        numbers; ``location`` the tile's ``(row, column)`` offset in the output array and
        ``shape`` its shape.
    groups : list of list of dask.array.Array
        Input groups (e.g. the planes of one exposure); all arrays have identical chunks.
    dtypes : tuple
        The dtypes of the three outputs.
    select : callable, optional
        ``select(i, j) -> list[int]``: the groups a tile needs (all by default).
    **kwargs
        Constant keyword arguments of ``func``.
    """
    first = groups[0][0]
    arrays = [a for group in groups for a in group]
    for other in arrays[1:]:
        if other.chunks != first.chunks:
            raise ValueError("tilewise3 needs inputs with identical chunks")
    token = uuid4().hex
    merged_name = f"{_label(func)}-{token}"
    ny, nx = first.numblocks
    row_starts = np.cumsum((0, *first.chunks[0]))
    col_starts = np.cumsum((0, *first.chunks[1]))
    dsk = {}
    for i in range(ny):
        for j in range(nx):
            chosen = list(range(len(groups))) if select is None else list(select(i, j))
            call = partial(func, indices=chosen,
                           location=(int(row_starts[i]), int(col_starts[j])),
                           shape=(first.chunks[0][i], first.chunks[1][j]), **kwargs)
            keys = [(a.name, i, j) for k in chosen for a in groups[k]]
            dsk[(merged_name, i, j)] = (call, *keys)
    holder = da.Array(HighLevelGraph.from_collections(merged_name, dsk, dependencies=arrays),
                      merged_name, first.chunks, dtype=object, meta=np.empty((0, 0), object))
    outputs = []
    for k, dtype in enumerate(dtypes):
        name = f"tiles3-{k}-{token}"
        layer = {(name, i, j): (getitem, (merged_name, i, j), k)
                 for i in range(ny) for j in range(nx)}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[holder])
        outputs.append(da.Array(graph, name, first.chunks, dtype=dtype))
    return outputs[0], outputs[1], outputs[2]


def call_keys(func: Any, keys: list[Any], dependencies: list[da.Array],
              shape: tuple[int, int], dtypes: tuple[Any, Any, Any], **kwargs: Any
              ) -> tuple[da.Array, da.Array, da.Array]:
    """Run ``func(*values of keys, **kwargs)`` in one task; it returns three ``shape`` planes.

    ``keys`` are chunk keys of the ``dependencies``. Unlike ``dask.delayed`` on dask arrays
    (which optimises and re-keys each argument's graph, so shared upstream tasks can run
    twice), the task refers to the arrays' own keys.
    """
    token = uuid4().hex
    holder_name = f"{_label(func)}-{token}"
    dsk = {(holder_name, 0, 0): (partial(func, **kwargs), *keys)}
    holder = da.Array(HighLevelGraph.from_collections(holder_name, dsk,
                                                      dependencies=dependencies),
                      holder_name, ((1,), (1,)), dtype=object, meta=np.empty((0, 0), object))
    outputs = []
    for k, dtype in enumerate(dtypes):
        name = f"call3-{k}-{token}"
        layer = {(name, 0, 0): (getitem, (holder_name, 0, 0), k)}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[holder])
        outputs.append(da.Array(graph, name, ((shape[0],), (shape[1],)), dtype=dtype))
    return outputs[0], outputs[1], outputs[2]


def call3(func: Any, arrays: list[da.Array], shape: tuple[int, int],
          dtypes: tuple[Any, Any, Any], **kwargs: Any) -> tuple[da.Array, da.Array, da.Array]:
    """Run ``func`` once on single-chunk ``arrays``; it returns three ``shape`` planes.

    See :func:`call_keys`.
    """
    for array in arrays:
        if array.npartitions != 1:
            raise ValueError("call3 needs single-chunk arrays; rechunk them first")
    return call_keys(func, [(a.name, *(0,) * a.ndim) for a in arrays], arrays, shape, dtypes,
                     **kwargs)


def tile_tasks(func: Any, calls: dict[tuple[int, int], tuple[list[Any], dict[str, Any]]],
               dependencies: list[da.Array], outputs: list[tuple[tuple[tuple[int, ...], ...],
                                                                 Any]]) -> list[da.Array]:
    """Run ``func`` once per tile; each call returns one block of every output array.

    Parameters
    ----------
    func : callable
        ``func(*values of keys, **kwargs) -> tuple``, one block per output.
    calls : dict
        ``(i, j) -> (keys, kwargs)`` for every tile of the output grid: the chunk keys of the
        ``dependencies`` whose values the call receives, and its keyword arguments.
    dependencies : list of dask.array.Array
        The arrays whose chunk keys the calls use.
    outputs : list of (chunks, dtype)
        The chunks and dtype of each output; output ``k`` has block ``(..., i, j)`` from item
        ``k`` of call ``(i, j)`` (a leading axis of one chunk is allowed).

    Returns
    -------
    list of dask.array.Array
        The outputs; all the calls are one graph layer, each output one more.
    """
    token = uuid4().hex
    holder_name = f"{_label(func)}-{token}"
    dsk = {(holder_name, i, j): (partial(func, **kwargs), *keys)
           for (i, j), (keys, kwargs) in calls.items()}
    rows = 1 + max(i for i, _ in calls)
    cols = 1 + max(j for _, j in calls)
    holder = da.Array(HighLevelGraph.from_collections(holder_name, dsk,
                                                      dependencies=dependencies),
                      holder_name, ((1,) * rows, (1,) * cols), dtype=object,
                      meta=np.empty((0, 0), object))
    arrays = []
    for k, (chunks, dtype) in enumerate(outputs):
        name = f"{_label(func)}-{k}-{token}"
        lead = (0,) * (len(chunks) - 2)
        layer = {(name, *lead, i, j): (getitem, (holder_name, i, j), k) for (i, j) in calls}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[holder])
        arrays.append(da.Array(graph, name, chunks, dtype=dtype))
    return arrays


def wrap(array: np.ndarray, chunks: Any) -> da.Array:
    """Return a dask array whose chunks are views of an in-memory 2-D array (no copy).

    :func:`dask.array.from_array` copies a numpy input (and hashes it unless given a name); for
    planes a stage has just loaded, that doubles their memory. Like an xarray variable, the
    result shares memory with ``array``: do not modify ``array`` while the result is in use.

    Parameters
    ----------
    array : numpy.ndarray
        A 2-D array.
    chunks : int, tuple or str
        Any chunk specification :func:`dask.array.core.normalize_chunks` accepts.

    Returns
    -------
    dask.array.Array
        The tiled array, one graph key per chunk and no tasks.
    """
    chunks = da.core.normalize_chunks(chunks, array.shape, dtype=array.dtype)
    name = f"wrap-{uuid4().hex}"  # no hashing of the data
    ys, xs = _edges(0, chunks[0]), _edges(0, chunks[1])
    graph = {(name, i, j): array[y0:y1, x0:x1]
             for i, (y0, y1) in enumerate(pairwise(ys)) for j, (x0, x1) in enumerate(pairwise(xs))}
    return da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name, chunks,
                    meta=array[:0, :0])


def as_dask(array: Any) -> da.Array:
    """Return a dask array as it is, anything else as one chunk wrapped without a copy."""
    if isinstance(array, da.Array):
        return array
    array = np.asarray(array)
    return wrap(array, array.shape)
