"""Tile-parallel convolution of an exposure with a spatially varying kernel.

With ``K(x, y) = sum_t T_t(x, y) K_t`` (see :class:`~daskdiff.subtract.kernel.KernelSolution`),
the convolved image is exactly ``sum_t T_t(x, y) (I * K_t)(x, y)``: one FFT convolution per
spatial term, the polynomial evaluated at the output pixel. The variance is convolved with
``K(x, y)**2 = sum_{t<=u} (2 - [t==u]) T_t T_u (K_t K_u)``. Every plane runs in
:func:`dask.array.map_overlap` with a halo of the kernel half-width, so the result does not
depend on the chunking; mask planes are OR-dilated over the kernel footprint and pixels where
the kernel does not fit inside the image get EDGE (their values are copied from the input).
"""

from __future__ import annotations

import uuid
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from scipy import fft as sfft

from .._tiles import as_dask
from ..exposure import exposure_box, get_mask_planes, make_exposure
from ._compiled import or_dilate
from .kernel import KernelSolution, scaled_position

__all__ = ["convolve_exposure", "convolve_plane"]


def _edges(chunks: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(chunks)])


def _fit_chunks(array: da.Array, depth: int) -> da.Array:
    """Rechunk so that every chunk is at least ``depth`` pixels (map_overlap needs it)."""
    if all(min(c) >= depth for c in array.chunks):
        return array
    return array.rechunk({0: max(depth, max(array.chunks[0])),
                          1: max(depth, max(array.chunks[1]))})


class _SpectraCache:
    """FFTs of the (small) kernels, per padded tile shape (tiles mostly share one shape)."""

    def __init__(self, kernels: np.ndarray) -> None:
        self.kernels = kernels
        self._spectra: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, shape: tuple[int, int]) -> np.ndarray:
        spectra = self._spectra.get(shape)
        if spectra is None:
            spectra = sfft.rfft2(self.kernels.astype(np.float32), s=shape)
            self._spectra[shape] = spectra
        return spectra

    def __reduce__(self):  # ship only the kernels to other processes
        return (_SpectraCache, (self.kernels,))


def _copy_edge(out: np.ndarray, block: np.ndarray, half: int, y_start: int, x_start: int,
               shape: tuple[int, int]) -> None:
    """Copy the input into ``out`` where the kernel does not fit inside the array."""
    ny, nx = out.shape
    inner = block[half:half + ny, half:half + nx]
    for sl in _edge_slices(ny, nx, y_start, x_start, half, shape):
        out[sl] = inner[sl]


def _tile_conv(block: np.ndarray, spectra: _SpectraCache, terms_of: Any, half: int,
               block_id: tuple[int, int], edges: tuple[np.ndarray, np.ndarray],
               copy_edge: tuple[int, int] | None = None) -> np.ndarray:
    """Convolve one haloed tile (single-precision FFTs: errors far below float32 noise).

    With ``copy_edge`` (the array shape), pixels within ``half`` of the array edge keep their
    input values.
    """
    i, j = block_id
    ny, nx = block.shape[0] - 2 * half, block.shape[1] - 2 * half
    y_start, x_start = edges[0][i], edges[1][j]
    data = np.where(np.isfinite(block), block, np.float32(0)).astype(np.float32, copy=False)
    shape = (sfft.next_fast_len(block.shape[0], real=True),
             sfft.next_fast_len(block.shape[1], real=True))
    image_ft = sfft.rfft2(data, s=shape)
    kernel_ft = spectra(shape)
    factors = None if terms_of is None else terms_of(y_start, x_start, ny, nx)
    out = np.zeros((ny, nx), np.float32)
    crop = (slice(2 * half, 2 * half + ny), slice(2 * half, 2 * half + nx))
    for t in range(len(kernel_ft)):
        conv = sfft.irfft2(image_ft * kernel_ft[t], s=shape)[crop]
        if factors is None:
            out += conv
        else:
            fy, fx = factors[t]
            conv *= fy
            conv *= fx
            out += conv
    if copy_edge is not None:
        _copy_edge(out, block, half, y_start, x_start, copy_edge)
    return out


def convolve_plane(array: Any, kernels: np.ndarray, weights: Any, *, half: int,
                   copy_edge: bool = False) -> da.Array:
    """Convolve a 2-D array with ``sum_t weights_t(y, x) kernels_t``, tile-parallel.

    Parameters
    ----------
    array : numpy or dask array
        The plane (non-finite pixels count as 0).
    kernels : numpy.ndarray
        ``(n, size, size)`` kernels.
    weights : callable or None
        ``weights(y_start, x_start, ny, nx) -> (n, ny, nx)`` spatial weights of each kernel at
        the output pixels of a tile (array-relative indices); ``None`` sums the kernels'
        convolutions with unit weights.
    half : int
        Kernel half-width: the halo.
    copy_edge : bool, optional
        Keep the input values within ``half`` of the array edge (where the kernel does not fit).

    Returns
    -------
    dask.array.Array
        float32, same shape and chunks as ``array``; zero padding beyond the edges.
    """
    array = _fit_chunks(as_dask(array), half)
    edges = (_edges(array.chunks[0]), _edges(array.chunks[1]))
    return da.map_overlap(_tile_conv, array, depth=half, boundary=0, trim=False,
                          dtype=np.float32, meta=np.array((), np.float32), chunks=array.chunks,
                          spectra=_SpectraCache(np.asarray(kernels, np.float64)),
                          terms_of=weights, half=half, edges=edges,
                          copy_edge=array.shape if copy_edge else None,
                          name=f"convolve-{uuid.uuid4().hex}")  # no tokenizing of the closure


def _edge_slices(ny: int, nx: int, y_start: int, x_start: int, half: int,
                 shape: tuple[int, int]) -> tuple[tuple[slice, slice], ...]:
    """Return the slices of a tile that lie within ``half`` of the array edge."""
    top = int(np.clip(half - y_start, 0, ny))
    bottom = int(np.clip(y_start + ny - (shape[0] - half), 0, ny))
    left = int(np.clip(half - x_start, 0, nx))
    right = int(np.clip(x_start + nx - (shape[1] - half), 0, nx))
    return ((slice(0, top), slice(None)), (slice(ny - bottom, ny), slice(None)),
            (slice(None), slice(0, left)), (slice(None), slice(nx - right, nx)))


def _dilate_tile(block: np.ndarray, half: int, edge_bit: int, shape: tuple[int, int],
                 block_id: tuple[int, int], edges: tuple[np.ndarray, np.ndarray],
                 undilated: int = 0) -> np.ndarray:
    i, j = block_id
    ny, nx = block.shape[0] - 2 * half, block.shape[1] - 2 * half
    if block.any():
        grown = or_dilate(np.ascontiguousarray(block, dtype=np.uint32), half)
        out = np.ascontiguousarray(grown[half:half + ny, half:half + nx])
    else:  # nothing to dilate (most template tiles once its planes are housekept)
        out = np.zeros((ny, nx), np.uint32)
    if undilated:
        keep = np.uint32(undilated)
        out &= ~keep
        out |= block[half:half + ny, half:half + nx] & keep
    for sl in _edge_slices(ny, nx, int(edges[0][i]), int(edges[1][j]), half, shape):
        out[sl] |= np.uint32(edge_bit)
    return out


def _dilate_mask(mask: Any, half: int, edge_bit: int, undilated: int = 0) -> da.Array:
    mask = _fit_chunks(as_dask(mask), half)
    edges = (_edges(mask.chunks[0]), _edges(mask.chunks[1]))
    return da.map_overlap(_dilate_tile, mask, depth=half, boundary=0, trim=False,
                          dtype=np.uint32, meta=np.array((), np.uint32), chunks=mask.chunks,
                          half=half, edge_bit=edge_bit, shape=mask.shape, edges=edges,
                          undilated=undilated,
                          name=f"dilate-mask-{uuid.uuid4().hex}")


def _term_weights(solution: KernelSolution, x0: int, y0: int, *, squared: bool):
    """Return ``weights(y_start, x_start, ny, nx)``: per term, separable ``(fy, fx)`` factors.

    ``T_t(x, y) = T_m(x') T_n(y')`` is separable, so each weight is the product of a column
    and a row vector (no full-tile weight arrays are built).
    """
    order = solution.kernel_order
    index = [(total - n, n) for total in range(order + 1) for n in range(total + 1)]
    nt = len(index)
    pairs = [(t, u) for t in range(nt) for u in range(t, nt)]

    def weights(y_start: int, x_start: int, ny: int, nx: int) -> list[tuple[Any, Any]]:
        xs = np.arange(x0 + x_start, x0 + x_start + nx, dtype=np.float64)
        ys = np.arange(y0 + y_start, y0 + y_start + ny, dtype=np.float64)
        sx, sy = scaled_position(solution.box, xs, ys)
        cx = [np.polynomial.chebyshev.chebval(sx, [0] * m + [1]) for m in range(order + 1)]
        cy = [np.polynomial.chebyshev.chebval(sy, [0] * n + [1]) for n in range(order + 1)]
        terms = [(cy[n][:, None].astype(np.float32), cx[m][None, :].astype(np.float32))
                 for m, n in index]
        if not squared:
            return terms
        return [((1.0 if t == u else 2.0) * terms[t][0] * terms[u][0], terms[t][1] * terms[u][1])
                for t, u in pairs]

    return weights


def squared_kernels(solution: KernelSolution) -> np.ndarray:
    """Return ``K_t K_u`` for ``t <= u`` (the variance kernels)."""
    kt = solution.term_kernels()
    nt = len(kt)
    return np.stack([kt[t] * kt[u] for t in range(nt) for u in range(t, nt)])


def convolve_exposure(exposure: xr.Dataset, solution: KernelSolution, *,
                      scale: float = 1.0, undilated: int = 0) -> xr.Dataset:
    """Convolve an exposure with the spatially varying kernel (lazy, tile-parallel).

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure to convolve.
    solution : KernelSolution
        The kernel.
    scale : float, optional
        Divide the result by this (the kernel sum in convolveScience mode).
    undilated : int, optional
        Mask bits restored undilated after the dilation (LSST ``preserveMaskPlanes``).

    Returns
    -------
    xarray.Dataset
        Same box, metadata and chunks; EDGE where the kernel does not fit.
    """
    box = exposure_box(exposure)
    half = solution.half_width
    kernels = solution.term_kernels() / scale
    image = convolve_plane(exposure["image"].data, kernels,
                           _term_weights(solution, box.x0, box.y0, squared=False), half=half,
                           copy_edge=True)
    variance = convolve_plane(exposure["variance"].data, squared_kernels(solution) / scale**2,
                              _term_weights(solution, box.x0, box.y0, squared=True), half=half,
                              copy_edge=True)
    edge_bit = get_mask_planes(exposure).bitmask("EDGE")
    mask = _dilate_mask(exposure["mask"].data, half, edge_bit, undilated)
    return make_exposure(image, variance=variance, mask=mask, x0=box.x0, y0=box.y0,
                         chunks=None, **{k: exposure.attrs.get(k) for k in (
                             "wcs", "psf", "photo_calib", "visit_info", "mask_planes")})
