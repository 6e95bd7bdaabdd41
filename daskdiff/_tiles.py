"""Re-gridding dask arrays onto boxes with one task per output tile.

Slicing a tiled array to an arbitrary box, padding it and re-chunking it through dask's array
API creates several graph layers per tile; for the many small boxes of template assembly and
warping that graph dominates the run time. :func:`regrid` builds the equivalent graph directly:
each output tile is one task that copies the overlapping parts of the source chunks into a
filled array.
"""

from __future__ import annotations

from functools import partial
from itertools import pairwise
from operator import getitem
from typing import Any
from uuid import uuid4

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from .box import Box

__all__ = ["call3", "regrid", "tilewise3"]


def _fill_cell(chunks: list[np.ndarray], src: list[tuple[slice, slice]],
               dst: list[tuple[slice, slice]], shape: tuple[int, int], fill: Any,
               dtype: np.dtype) -> np.ndarray:
    out = np.full(shape, fill, dtype=dtype)
    for chunk, s, d in zip(chunks, src, dst, strict=True):
        out[d] = chunk[s]
    return out


def _edges(start: int, chunks: tuple[int, ...]) -> list[int]:
    return list(np.cumsum((start, *chunks)))


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
    ox, oy = origin
    ys = _edges(oy, array.chunks[0])
    xs = _edges(ox, array.chunks[1])
    x_edges = [*range(box.x0, box.x1, tx), box.x1]
    y_edges = [*range(box.y0, box.y1, ty), box.y1]
    name = f"regrid-{uuid4().hex}"
    dsk: dict[Any, Any] = {}
    for i, (ya, yb) in enumerate(pairwise(y_edges)):
        for j, (xa, xb) in enumerate(pairwise(x_edges)):
            keys, src, dst = [], [], []
            for ci, (ca, cb) in enumerate(pairwise(ys)):
                y0, y1 = max(ya, ca), min(yb, cb)
                if y0 >= y1:
                    continue
                for cj, (da_, db) in enumerate(pairwise(xs)):
                    x0, x1 = max(xa, da_), min(xb, db)
                    if x0 >= x1:
                        continue
                    keys.append((array.name, ci, cj))
                    src.append((slice(int(y0 - ca), int(y1 - ca)),
                                slice(int(x0 - da_), int(x1 - da_))))
                    dst.append((slice(int(y0 - ya), int(y1 - ya)),
                                slice(int(x0 - xa), int(x1 - xa))))
            dsk[(name, i, j)] = (_fill_cell, keys, src, dst, (yb - ya, xb - xa), fill, dtype)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[array])
    chunks = (tuple(b - a for a, b in pairwise(y_edges)),
              tuple(b - a for a, b in pairwise(x_edges)))
    return da.Array(graph, name, chunks, dtype=dtype)


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
    merged_name = f"tiles3-{token}"
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


def call3(func: Any, arrays: list[da.Array], shape: tuple[int, int],
          dtypes: tuple[Any, Any, Any], **kwargs: Any) -> tuple[da.Array, da.Array, da.Array]:
    """Run ``func`` once on single-chunk ``arrays``; it returns three ``shape`` planes.

    Unlike ``dask.delayed`` on dask arrays (which optimises and re-keys each argument's graph,
    so shared upstream tasks can run twice), the task here refers to the arrays' own keys.
    """
    for array in arrays:
        if array.npartitions != 1:
            raise ValueError("call3 needs single-chunk arrays; rechunk them first")
    token = uuid4().hex
    holder_name = f"call3-{token}"
    dsk = {(holder_name, 0, 0): (partial(func, **kwargs),
                                 *[(a.name, *(0,) * a.ndim) for a in arrays])}
    holder = da.Array(HighLevelGraph.from_collections(holder_name, dsk, dependencies=arrays),
                      holder_name, ((1,), (1,)), dtype=object, meta=np.empty((0, 0), object))
    outputs = []
    for k, dtype in enumerate(dtypes):
        name = f"call3-{k}-{token}"
        layer = {(name, 0, 0): (getitem, (holder_name, 0, 0), k)}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[holder])
        outputs.append(da.Array(graph, name, ((shape[0],), (shape[1],)), dtype=dtype))
    return outputs[0], outputs[1], outputs[2]
