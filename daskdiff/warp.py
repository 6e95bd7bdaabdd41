"""Resampling an exposure onto another pixel grid (another WCS), tile-parallel.

The pixel mapping destination (x, y) -> source (u, v) goes through the sky with the full WCSs
only on coarse nodes (every ``interp_length`` pixels), is fitted there with a bicubic spline,
and the spline is sampled on a fine grid (every :data:`GRID_STEP` pixels) that the compiled
resampling loop interpolates bilinearly; the cost is independent of the distortion model and
:func:`mapping_error` measures the error of the whole chain (well below 0.01 px for survey WCSs
at the default spacing).

Pixels are resampled with a separable, normalised interpolation kernel (Lanczos of order 3 by
default) whose 1-D weights are interpolated linearly from a table of :data:`TABLE_SAMPLES`
samples per pixel (exact at integer offsets, within 1e-7 of the exact weights elsewhere). The
variance is resampled with the squared kernel weights, the mask is the OR of every source pixel
under the kernel footprint (so masks grow by the footprint), and a destination pixel whose
footprint is not entirely covered by good source pixels gets NO_DATA, with image and variance
set to 0 (finite). Every destination pixel depends only on its own absolute position and the
source pixels under its footprint, so the result does not depend on the chunking. The
per-pixel loop is compiled with numba (releasing the GIL, so threaded schedulers run tiles in
parallel); its float64 tap sums may be reassociated and fused (multiply-add) by the compiler,
which changes the float32 results by at most one rounding step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from typing import Any

import dask.array as da
import numba
import numpy as np
import xarray as xr
from scipy.interpolate import RectBivariateSpline

from ._tiles import as_dask, call_keys, chunk_pieces, constant
from .box import Box
from .errors import ConfigError, InputError, NoWorkError
from .exposure import (
    DEFAULT_TILE_SIZE,
    exposure_box,
    get_mask_planes,
    make_exposure,
    require_wcs,
)
from .wcs import copy_wcs, pixel_to_sky, sky_to_pixel

__all__ = [
    "GRID_STEP",
    "KERNELS",
    "TABLE_SAMPLES",
    "PixelMapping",
    "kernel_weights",
    "mapping_error",
    "resample_block",
    "scratch",
    "selected_part",
    "source_planes",
    "source_spans",
    "warp_exposure",
]

#: Interpolation kernels by name: half-width in pixels (number of taps = 2 * half-width).
KERNELS: dict[str, int] = {
    "nearest": 1,
    "bilinear": 1,
    "lanczos2": 2,
    "lanczos3": 3,
    "lanczos4": 4,
    "lanczos5": 5,
}

#: Spacing (pixels) of the fine grid on which the pixel mapping is interpolated bilinearly.
GRID_STEP = 8

#: Samples per pixel of the tabulated kernel weights.
TABLE_SAMPLES = 4096


def _check_kernel(name: str) -> int:
    if name not in KERNELS:
        raise ConfigError(f"unknown warping kernel {name!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[name]


def kernel_weights(name: str, frac: np.ndarray) -> np.ndarray:
    """Return exact normalised 1-D interpolation weights.

    The warper interpolates these weights linearly from a table of :data:`TABLE_SAMPLES`
    samples per pixel (the nearest-neighbour kernel takes the sample below).

    Parameters
    ----------
    name : str
        Kernel name (see :data:`KERNELS`).
    frac : numpy.ndarray
        Fractional offsets in ``[0, 1]`` of the positions from their floor pixel.

    Returns
    -------
    numpy.ndarray
        Weights of shape ``(2 * half_width, *frac.shape)`` for the taps
        ``floor - half_width + 1 ... floor + half_width``; they sum to 1 along axis 0.
    """
    half = _check_kernel(name)
    dtype = np.dtype(np.float32 if frac.dtype == np.float32 else np.float64)
    taps = np.arange(-half + 1, half + 1).astype(dtype)
    shape = (-1,) + (1,) * frac.ndim
    if name == "nearest":
        weights = np.stack([(frac < 0.5), (frac >= 0.5)]).astype(dtype)
    elif name == "bilinear":
        weights = np.clip(1.0 - np.abs(frac[None, ...] - taps.reshape(shape)), 0.0, None)
    else:
        # sin(pi (f - k)) = (-1)^k sin(pi f) and the angle-addition rule for sin(pi (f - k) / a)
        # need only three transcendental evaluations per position, whatever the tap count.
        dist = frac[None, ...] - taps.reshape(shape)
        sign = np.where(taps % 2 == 0, 1.0, -1.0).astype(dtype).reshape(shape)
        angle = (np.pi * taps.reshape(shape) / half).astype(dtype)
        sin_f = np.sin(np.pi * frac)[None, ...]
        sin_fa = np.sin(np.pi * frac / half)[None, ...]
        cos_fa = np.cos(np.pi * frac / half)[None, ...]
        numerator = half * sign * sin_f * (sin_fa * np.cos(angle) - cos_fa * np.sin(angle))
        with np.errstate(divide="ignore", invalid="ignore"):
            weights = numerator / (dtype.type(np.pi * np.pi) * dist * dist)
        weights[dist == 0] = 1.0  # L(0) = 1: an exact copy at integer offsets
    return weights / weights.sum(axis=0, keepdims=True)


@cache
def _weight_table(name: str) -> np.ndarray:
    """Return the weights at ``TABLE_SAMPLES + 1`` offsets in ``[0, 1]``, ``(samples, taps)``."""
    frac = np.arange(TABLE_SAMPLES + 1, dtype=np.float64) / TABLE_SAMPLES
    table = np.ascontiguousarray(kernel_weights(name, frac).T)
    table.setflags(write=False)
    return table


# --------------------------------------------------------------------------------------------
# compiled loops
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _grid_coordinate(offset: int, step: int, nodes: int) -> tuple[int, float]:
    """Grid cell and fraction of a pixel ``offset`` from the first node (exact arithmetic)."""
    cell = offset // step
    if cell > nodes - 2:
        cell = nodes - 2
    if cell < 0:
        cell = 0
    return cell, (offset - cell * step) / step


@numba.njit(cache=True, nogil=True, inline="always")
def _bilinear(grid: np.ndarray, row: int, ty: float, col: int, tx: float) -> float:
    top = (1.0 - tx) * grid[row, col] + tx * grid[row, col + 1]
    bottom = (1.0 - tx) * grid[row + 1, col] + tx * grid[row + 1, col + 1]
    return (1.0 - ty) * top + ty * bottom


@numba.njit(cache=True, nogil=True)
def _map_points(grid_u: np.ndarray, grid_v: np.ndarray, gx0: int, gy0: int, step: int,
                xs: np.ndarray, ys: np.ndarray, out_u: np.ndarray, out_v: np.ndarray) -> None:
    """Interpolate the mapping at integer pixels ``(xs[k], ys[k])``."""
    ny, nx = grid_u.shape
    for k in range(xs.size):
        row, ty = _grid_coordinate(ys[k] - gy0, step, ny)
        col, tx = _grid_coordinate(xs[k] - gx0, step, nx)
        out_u[k] = _bilinear(grid_u, row, ty, col, tx)
        out_v[k] = _bilinear(grid_v, row, ty, col, tx)


@numba.njit(cache=True, nogil=True)
def _sanitise_into(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, bad_bits: int,
                   img: np.ndarray, var: np.ndarray, bits: np.ndarray) -> None:
    """Copy a source piece into the float64 buffers (NaN where not good) and its mask."""
    ny, nx = image.shape
    for r in range(ny):
        for c in range(nx):
            i = image[r, c]
            v = variance[r, c]
            m = mask[r, c]
            bits[r, c] = m
            if np.isfinite(i) and np.isfinite(v) and v >= 0 and (m & bad_bits) == 0:
                img[r, c] = i
                var[r, c] = v
            else:
                img[r, c] = np.nan
                var[r, c] = np.nan


@numba.njit(cache=True, nogil=True)
def _window_run(spans: np.ndarray, r: int, nx: int, size: int) -> tuple[int, int]:
    """Return the first column and the number of ``size``-wide windows inside row ``r``'s span."""
    first = max(spans[r, 0], 0)
    return first, min(spans[r, 1], nx) - size + 1 - first


@numba.njit(cache=True, nogil=True)
def _window_or(mask: np.ndarray, size: int, spans: np.ndarray, rows: np.ndarray,
               out: np.ndarray) -> None:
    """OR of ``mask`` over the forward windows ``[r, r+size) x [c, c+size)`` into ``out``.

    Computed only for windows inside the filled ``spans`` (``spans[r] = (first, stop)``
    columns of row ``r``); other entries are undefined and not used. Separable (``rows``, of
    ``mask``'s shape, holds the row ORs), with contiguous inner loops over row views
    (vectorised: no negative-index checks).
    """
    ny, nx = mask.shape
    for r in range(ny):
        first, n = _window_run(spans, r, nx, size)
        if n <= 0:
            continue
        src = mask[r, first:]
        line = rows[r, first:]
        for c in range(n):
            line[c] = src[c]
        for k in range(1, size):
            for c in range(n):
                line[c] |= src[c + k]
    for r in range(ny - size + 1):
        first, n = _window_run(spans, r, nx, size)
        if n <= 0:
            continue
        line = out[r, first:]
        src = rows[r, first:]
        for c in range(n):
            line[c] = src[c]
        for k in range(1, size):
            src = rows[r + k, first:]
            for c in range(n):
                line[c] |= src[c]


@numba.njit(cache=True, nogil=True)
def _corner_bounds(grid: np.ndarray, row: int, ty0: float, ty1: float, col: int, tx0: float,
                   tx1: float) -> tuple[float, float]:
    """Least and greatest of the bilinear mapping over a rectangle of one cell (its corners)."""
    a = _bilinear(grid, row, ty0, col, tx0)
    b = _bilinear(grid, row, ty0, col, tx1)
    c = _bilinear(grid, row, ty1, col, tx0)
    d = _bilinear(grid, row, ty1, col, tx1)
    return min(min(a, b), min(c, d)), max(max(a, b), max(c, d))


@numba.njit(cache=True, nogil=True)
def _runs(start: int, count: int, origin: int, step: int, nodes: int) -> np.ndarray:
    """Return the runs of pixels sharing a grid cell: rows ``(cell, first, last fraction)``."""
    out = np.empty((count, 3))
    n = 0
    for k in range(count):
        cell, frac = _grid_coordinate(start + k - origin, step, nodes)
        if n > 0 and out[n - 1, 0] == cell:
            out[n - 1, 2] = frac
        else:
            out[n, 0] = cell
            out[n, 1] = frac
            out[n, 2] = frac
            n += 1
    return out[:n]


@numba.njit(cache=True, nogil=True)
def _source_spans(grid_u: np.ndarray, grid_v: np.ndarray, gx0: int, gy0: int, step: int,
                  dst_x0: int, dst_y0: int, dst_nx: int, dst_ny: int, src_x0: int, src_y0: int,
                  src_w: int, src_h: int, half: int) -> np.ndarray:
    """Columns ``[first, stop)`` of each source row that resampling the destination reads.

    The bilinear mapping over the pixels of one grid cell lies between its values at the
    corners of their fraction rectangle, so the union of those boxes, grown by the kernel
    footprint (and one pixel for rounding), covers every pixel read. Rows read by no pixel
    get an empty span.
    """
    spans = np.empty((src_h, 2), np.int64)
    spans[:, 0] = src_w
    spans[:, 1] = 0
    rows = _runs(dst_y0, dst_ny, gy0, step, grid_u.shape[0])
    cols = _runs(dst_x0, dst_nx, gx0, step, grid_u.shape[1])
    first_x = src_x0 + half - 1
    first_y = src_y0 + half - 1
    for i in range(rows.shape[0]):
        row = int(rows[i, 0])
        for j in range(cols.shape[0]):
            col = int(cols[j, 0])
            u0, u1 = _corner_bounds(grid_u, row, rows[i, 1], rows[i, 2], col, cols[j, 1],
                                    cols[j, 2])
            v0, v1 = _corner_bounds(grid_v, row, rows[i, 1], rows[i, 2], col, cols[j, 1],
                                    cols[j, 2])
            left = max(int(np.floor(u0)) - first_x - 1, 0)
            right = min(int(np.floor(u1)) - first_x + 2 * half + 1, src_w)
            bottom = max(int(np.floor(v0)) - first_y - 1, 0)
            top = min(int(np.floor(v1)) - first_y + 2 * half + 1, src_h)
            for r in range(bottom, top):
                spans[r, 0] = min(spans[r, 0], left)
                spans[r, 1] = max(spans[r, 1], right)
    return spans


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"},
            error_model="numpy")
def _warp_kernel(img: np.ndarray, var: np.ndarray, mask: np.ndarray, src_x0: int,
                 src_y0: int, grid_u: np.ndarray, grid_v: np.ndarray, gx0: int, gy0: int,
                 step: int, dst_x0: int, dst_y0: int, table: np.ndarray, half: int,
                 nearest: bool, no_data: int, selected: np.ndarray, conserve_flux: bool,
                 spans: np.ndarray, scratch: np.ndarray, footprint: np.ndarray,
                 out_image: np.ndarray, out_variance: np.ndarray, out_mask: np.ndarray) -> None:
    """Resample one destination block (see the module docstring for the rules).

    ``img`` and ``var`` are the source image and variance, NaN where a pixel is not good
    (:func:`_sanitise_into`). ``selected`` (the block's shape, or empty for all pixels) says
    which pixels to compute; the others come out NO_DATA. Only the source pixels inside
    ``spans`` (:func:`_source_spans`) need to be defined. ``scratch`` and ``footprint`` are
    uint32 work arrays of the source's shape.
    """
    taps = 2 * half
    _window_or(mask, taps, spans, scratch, footprint)
    src_h, src_w = img.shape
    flat_img = img.ravel()
    flat_var = var.ravel()
    utaps = np.uint64(taps)
    uwidth = np.uint64(src_w)
    ny, nx = out_image.shape
    grid_ny, grid_nx = grid_u.shape
    cols = np.empty(nx, np.int64)
    fx = np.empty(nx)
    for c in range(nx):
        cols[c], fx[c] = _grid_coordinate(dst_x0 + c - gx0, step, grid_nx)
    wx = np.empty(taps)
    wx2 = np.empty(taps)
    wy = np.empty(taps)
    first_x = src_x0 + half - 1
    first_y = src_y0 + half - 1
    samples = table.shape[0] - 1
    lerp = 0.0 if nearest else 1.0
    every = selected.size == 0
    for r in range(ny):
        row, ty = _grid_coordinate(dst_y0 + r - gy0, step, grid_ny)
        for c in range(nx):
            u = _bilinear(grid_u, row, ty, cols[c], fx[c])
            v = _bilinear(grid_v, row, ty, cols[c], fx[c])
            fu = np.floor(u)
            fv = np.floor(v)
            left = fu - first_x
            bottom = fv - first_y
            if not ((every or selected[r, c]) and left >= 0 and bottom >= 0
                    and left + taps <= src_w and bottom + taps <= src_h):
                out_image[r, c] = 0.0
                out_variance[r, c] = 0.0
                out_mask[r, c] = no_data
                continue
            i0 = int(left)
            j0 = int(bottom)
            # weights interpolated from the table (the nearest kernel takes the row below)
            px = (u - fu) * samples
            ix = min(int(px), samples - 1)
            sx = (px - ix) * lerp
            py = (v - fv) * samples
            iy = min(int(py), samples - 1)
            sy = (py - iy) * lerp
            for k in range(taps):
                low = table[ix, k]
                w = low + sx * (table[ix + 1, k] - low)
                wx[k] = w
                wx2[k] = w * w
                low = table[iy, k]
                wy[k] = low + sy * (table[iy + 1, k] - low)
            sum_i = 0.0
            sum_v = 0.0
            at = np.uint64(j0 * src_w + i0)  # unsigned flat offsets: no negative-index code
            for j in range(utaps):
                row_i = 0.0
                row_v = 0.0
                for i in range(utaps):
                    row_i += wx[i] * flat_img[at + i]
                    row_v += wx2[i] * flat_var[at + i]
                sum_i += wy[j] * row_i
                sum_v += wy[j] * wy[j] * row_v
                at += uwidth
            if conserve_flux:  # source pixels per destination pixel, from the mapping's cell
                col = cols[c]
                tx = fx[c]
                du_dx = ((1.0 - ty) * (grid_u[row, col + 1] - grid_u[row, col])
                         + ty * (grid_u[row + 1, col + 1] - grid_u[row + 1, col])) / step
                dv_dx = ((1.0 - ty) * (grid_v[row, col + 1] - grid_v[row, col])
                         + ty * (grid_v[row + 1, col + 1] - grid_v[row + 1, col])) / step
                du_dy = ((1.0 - tx) * (grid_u[row + 1, col] - grid_u[row, col])
                         + tx * (grid_u[row + 1, col + 1] - grid_u[row, col + 1])) / step
                dv_dy = ((1.0 - tx) * (grid_v[row + 1, col] - grid_v[row, col])
                         + tx * (grid_v[row + 1, col + 1] - grid_v[row, col + 1])) / step
                area = abs(du_dx * dv_dy - du_dy * dv_dx)
                sum_i *= area
                sum_v *= area * area
            bits = footprint[j0, i0]
            if np.isnan(sum_i) or np.isnan(sum_v):  # a bad pixel under the footprint
                out_image[r, c] = 0.0
                out_variance[r, c] = 0.0
                out_mask[r, c] = bits | no_data
            else:
                out_image[r, c] = sum_i
                out_variance[r, c] = sum_v
                out_mask[r, c] = bits


# --------------------------------------------------------------------------------------------
# pixel mapping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PixelMapping:
    """The mapping from destination pixels to source pixels on a fine grid.

    ``u[r, c]`` and ``v[r, c]`` are the source coordinates of destination pixel
    ``(x0 + c * step, y0 + r * step)``; pixels in between are interpolated bilinearly. Build it
    with :meth:`PixelMapping.from_wcs`; evaluate it with :meth:`at` or :meth:`evaluate`.
    """

    u: np.ndarray
    v: np.ndarray
    x0: int
    y0: int
    step: int
    box: Box

    @classmethod
    def from_wcs(cls, dest_wcs: Any, dest_box: Box, src_wcs: Any, *,
                 interp_length: int = 50, step: int = GRID_STEP) -> PixelMapping:
        """Sample the mapping every ``step`` pixels over ``dest_box``.

        The WCSs are evaluated on nodes spaced at most ``interp_length`` pixels; a bicubic
        spline through them gives the fine grid.

        Raises
        ------
        ConfigError
            If ``interp_length`` or ``step`` is not positive.
        """
        if interp_length < 1 or step < 1:
            raise ConfigError(f"interp_length and step must be >= 1 pixel, got {interp_length} "
                              f"and {step}")
        nx = max(-(-(dest_box.width - 1) // step), 1) + 1
        ny = max(-(-(dest_box.height - 1) // step), 1) + 1
        fine_x = dest_box.x0 + step * np.arange(nx, dtype=float)
        fine_y = dest_box.y0 + step * np.arange(ny, dtype=float)
        xs = _nodes(fine_x[0], fine_x[-1], interp_length)
        ys = _nodes(fine_y[0], fine_y[-1], interp_length)
        gx, gy = np.meshgrid(xs, ys)
        ra, dec = pixel_to_sky(dest_wcs, gx.ravel(), gy.ravel())
        u, v = sky_to_pixel(src_wcs, ra, dec)
        grids = []
        for values in (u, v):
            spline = RectBivariateSpline(ys, xs, values.reshape(gx.shape), kx=3, ky=3, s=0)
            grid = np.ascontiguousarray(spline(fine_y, fine_x, grid=True), dtype=np.float64)
            grid.setflags(write=False)
            grids.append(grid)
        return cls(grids[0], grids[1], dest_box.x0, dest_box.y0, step, dest_box)

    def at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the source coordinates ``(u, v)`` of integer destination pixels ``(x, y)``."""
        xs = np.ascontiguousarray(np.ravel(x), dtype=np.int64)
        ys = np.ascontiguousarray(np.ravel(y), dtype=np.int64)
        out_u = np.empty(xs.size)
        out_v = np.empty(xs.size)
        _map_points(self.u, self.v, self.x0, self.y0, self.step, xs, ys, out_u, out_v)
        return out_u.reshape(np.shape(x)), out_v.reshape(np.shape(x))

    def evaluate(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """Return source coordinates ``(u, v)``, each ``box.shape``, for the pixels of ``box``."""
        xs, ys = np.meshgrid(box.xs(), box.ys())
        return self.at(xs, ys)

    def cells(self, box: Box) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Return the part of the grid that interpolates ``box``: ``(u, v, x0, y0)``.

        Interpolating the part at a pixel of ``box`` gives bit for bit what the whole grid
        gives, so tiles can carry only their own part.
        """
        ny, nx = self.u.shape
        r0 = min(max((box.y0 - self.y0) // self.step, 0), ny - 2)
        c0 = min(max((box.x0 - self.x0) // self.step, 0), nx - 2)
        r1 = min(max((box.y1 - 1 - self.y0) // self.step + 2, r0 + 2), ny)
        c1 = min(max((box.x1 - 1 - self.x0) // self.step + 2, c0 + 2), nx)
        return (self.u[r0:r1, c0:c1], self.v[r0:r1, c0:c1], self.x0 + c0 * self.step,
                self.y0 + r0 * self.step)

    def source_box(self, box: Box, *, margin: int) -> Box:
        """Return the source box needed for destination ``box`` with a kernel ``margin``."""
        step = 16
        xs = np.unique(np.r_[np.arange(box.x0, box.x1, step), box.x1 - 1])
        ys = np.unique(np.r_[np.arange(box.y0, box.y1, step), box.y1 - 1])
        gx, gy = np.meshgrid(xs, ys)
        u, v = self.at(gx, gy)
        pad = margin + 2  # slack for the curvature between samples
        return Box.from_bounds(int(np.floor(u.min())) - pad, int(np.floor(v.min())) - pad,
                               int(np.ceil(u.max())) + pad + 1, int(np.ceil(v.max())) + pad + 1)


def _nodes(start: float, stop: float, step: int) -> np.ndarray:
    count = max(int(np.ceil((stop - start) / step)), 3) + 1
    return np.linspace(start, stop, count)


def mapping_error(mapping: PixelMapping, dest_wcs: Any, src_wcs: Any, *, n: int = 1000,
                  seed: int = 0) -> float:
    """Return the largest interpolation error (pixels) at ``n`` random destination pixels."""
    rng = np.random.default_rng(seed)
    box = mapping.box
    x = rng.integers(box.x0, box.x1, n)
    y = rng.integers(box.y0, box.y1, n)
    ra, dec = pixel_to_sky(dest_wcs, x, y)
    u, v = sky_to_pixel(src_wcs, ra, dec)
    ui, vi = mapping.at(x, y)
    return float(np.max(np.hypot(ui - u, vi - v)))


# --------------------------------------------------------------------------------------------
# warping
# --------------------------------------------------------------------------------------------


#: Scratch buffer sets kept for reuse by the tile tasks (reusing memory saves the page faults
#: of fresh allocations; each running task takes a set of its own), and the largest set kept.
_SCRATCH_KEPT = 2
_SCRATCH_KEPT_BYTES = 128 * 2**20
_scratch_sets: list[dict[str, np.ndarray]] = []
_scratch_lock = threading.Lock()


@contextmanager
def scratch() -> Iterator[Callable[..., np.ndarray]]:
    """Lend a set of scratch buffers: ``take(name, shape, dtype)`` returns an undefined array.

    The arrays must not outlive the ``with`` block. Afterwards the set is kept for the next
    task (at most :data:`_SCRATCH_KEPT` sets, of at most :data:`_SCRATCH_KEPT_BYTES` each).
    """
    with _scratch_lock:
        buffers = _scratch_sets.pop() if _scratch_sets else {}

    def take(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        buffer = buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = buffers[name] = np.empty(size, np.uint8)
        return buffer[:size].view(dtype).reshape(shape)

    try:
        yield take
    finally:
        kept = sum(b.nbytes for b in buffers.values()) <= _SCRATCH_KEPT_BYTES
        with _scratch_lock:
            if kept and len(_scratch_sets) < _SCRATCH_KEPT:
                _scratch_sets.append(buffers)


def _warp_block(*chunks: np.ndarray, pieces: list[tuple[tuple[slice, slice], ...]],
                src_box: Box, grid: tuple[np.ndarray, np.ndarray, int, int], step: int,
                box: Box, kernel: str, bad_bits: int, no_data_bit: int,
                selected: np.ndarray | None, conserve_flux: bool = True,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample one destination block from the source chunks covering ``src_box``.

    ``chunks`` are the image chunks, then the variance chunks, then the mask chunks;
    ``pieces[k] = (source slices, slices in src_box)`` places chunk ``k`` of each plane.
    """
    n = len(pieces)
    with scratch() as take:
        img = take("image", src_box.shape, np.float64)
        var = take("variance", src_box.shape, np.float64)
        mask = take("mask", src_box.shape, np.uint32)
        for k, (src, dst) in enumerate(pieces):
            _sanitise_into(np.asarray(chunks[k][src], np.float32),
                           np.asarray(chunks[n + k][src], np.float32),
                           np.asarray(chunks[2 * n + k][src], np.uint32), int(bad_bits),
                           img[dst], var[dst], mask[dst])
        return resample_block(img, var, mask, src_box, grid, step, box, kernel=kernel,
                              no_data_bit=no_data_bit, selected=selected,
                              conserve_flux=conserve_flux, take=take)


def resample_block(img: np.ndarray, var: np.ndarray, mask: np.ndarray, src_box: Box,
                   grid: tuple[np.ndarray, np.ndarray, int, int], step: int, box: Box, *,
                   kernel: str, no_data_bit: int, selected: np.ndarray | None,
                   conserve_flux: bool = True, spans: np.ndarray | None = None,
                   out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   take: Callable[..., np.ndarray] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample one destination ``box`` from prepared source buffers on ``src_box``.

    ``img`` and ``var`` are float64, NaN where a source pixel is not good, and ``mask`` the
    source mask (uint32), all C-contiguous of ``src_box.shape``; ``grid`` is
    :meth:`PixelMapping.cells` of ``box``. Only the pixels inside ``spans`` (from
    :func:`source_spans` for ``box`` or a part of it holding every selected pixel; computed
    here if not given) need to be defined. Returns the float32 image and variance and the
    uint32 mask of ``box`` (see the module docstring for the rules), in ``out`` if given
    (C-contiguous arrays of ``box.shape``). ``take(name, shape, dtype)``, if given, supplies
    the work arrays (e.g. reused scratch memory).
    """
    if take is None:
        def take(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            return np.empty(shape, dtype)

    if out is None:
        out = (np.empty(box.shape, np.float32), np.empty(box.shape, np.float32),
               np.empty(box.shape, np.uint32))
    if spans is None:
        spans = source_spans(grid, step, box, src_box, kernel=kernel)
    out_image, out_variance, out_mask = out
    grid_u, grid_v, gx0, gy0 = grid
    _warp_kernel(img, var, mask, src_box.x0, src_box.y0, grid_u, grid_v, gx0, gy0, step,
                 box.x0, box.y0, _weight_table(kernel), KERNELS[kernel], kernel == "nearest",
                 1 << no_data_bit, np.zeros((0, 0), np.bool_) if selected is None else selected,
                 conserve_flux, spans, take("rows_or", src_box.shape, np.uint32),
                 take("footprint", src_box.shape, np.uint32), out_image, out_variance, out_mask)
    return out_image, out_variance, out_mask


def source_spans(grid: tuple[np.ndarray, np.ndarray, int, int], step: int, box: Box,
                 src_box: Box, *, kernel: str) -> np.ndarray:
    """Return the source columns that resampling ``box`` reads, per row of ``src_box``.

    ``grid`` is :meth:`PixelMapping.cells` of ``box`` (or of a box containing it). Row ``r``
    of the result is ``(first, stop)``: the pixels of ``src_box`` row ``r`` in columns
    ``[first, stop)`` (box-relative; empty when ``stop <= first``) include every pixel the
    ``kernel`` footprints of ``box``'s pixels read there.
    """
    grid_u, grid_v, gx0, gy0 = grid
    return _source_spans(grid_u, grid_v, gx0, gy0, step, box.x0, box.y0, box.width, box.height,
                         src_box.x0, src_box.y0, src_box.width, src_box.height, KERNELS[kernel])


def warp_exposure(
    source: xr.Dataset,
    dest_wcs: Any,
    dest_box: Box,
    *,
    kernel: str = "lanczos3",
    interp_length: int = 50,
    chunks: int = DEFAULT_TILE_SIZE,
    bad_planes: tuple[str, ...] = ("NO_DATA",),
    select: Callable[[Box], np.ndarray] | None = None,
    conserve_flux: bool = True,
) -> xr.Dataset:
    """Resample an exposure onto a destination WCS and pixel box (lazy, tile-parallel).

    Parameters
    ----------
    source : xarray.Dataset
        The exposure to resample; it needs a WCS.
    dest_wcs : astropy.wcs.WCS
        The destination parent-frame WCS.
    dest_box : Box
        The destination pixel box.
    kernel : str, optional
        Interpolation kernel (:data:`KERNELS`); ``"lanczos3"`` by default.
    interp_length : int, optional
        Spacing in pixels of the nodes where the WCS mapping is computed exactly.
    chunks : int, optional
        Tile edge of the destination; the result is identical for any value.
    bad_planes : tuple of str, optional
        Source mask planes whose pixels are treated as missing.
    select : callable, optional
        ``select(box) -> numpy.ndarray`` (boolean, ``box.shape``) says which destination pixels
        are needed; the others are not computed and come out NO_DATA (used when another input
        owns those pixels). It must depend only on the pixels' positions, not on the box, so
        that the result stays independent of the chunking.
    conserve_flux : bool, optional
        Multiply the image by the pixel-area ratio (the determinant of the mapping's
        Jacobian, source pixels per destination pixel) and the variance by its square, so that
        a source's total counts, and hence a spatially constant photometric calibration, are
        preserved (default). ``False`` conserves surface brightness (pixel values), as LSST's
        warping does where the calibration carries the pixel-area variation.

    Returns
    -------
    xarray.Dataset
        The resampled exposure on ``dest_box`` with ``dest_wcs``; the PSF, calibration and visit
        information of the source are carried over unchanged (a PSF in the destination frame is
        the caller's business).

    Raises
    ------
    NoWorkError
        If the source does not overlap the destination box at all.
    """
    half = _check_kernel(kernel)
    src_wcs = require_wcs(source, what="exposure to warp")
    planes = get_mask_planes(source)
    bad_bits = planes.bitmask(*bad_planes)
    no_data_bit = planes["NO_DATA"]
    src_full = exposure_box(source)
    mapping = PixelMapping.from_wcs(copy_wcs(dest_wcs), dest_box, copy_wcs(src_wcs),
                                    interp_length=interp_length)
    src_planes = source_planes(source)
    x_edges = [*range(dest_box.x0, dest_box.x1, chunks), dest_box.x1]
    y_edges = [*range(dest_box.y0, dest_box.y1, chunks), dest_box.y1]
    rows: dict[str, list[list[da.Array]]] = {"image": [], "variance": [], "mask": []}
    any_overlap = False
    for ya, yb in pairwise(y_edges):
        row: dict[str, list[da.Array]] = {"image": [], "variance": [], "mask": []}
        for xa, xb in pairwise(x_edges):
            box = Box.from_bounds(xa, ya, xb, yb)
            selected, part = selected_part(select, box)
            need = mapping.source_box(part, margin=half).intersection(src_full)
            if part.is_empty:
                need = Box(need.x0, need.y0, 0, 0)
            blocks = _warp_tile(src_planes, src_full, need, mapping, box, kernel, bad_bits,
                                no_data_bit, selected, conserve_flux)
            any_overlap |= not need.is_empty or select is not None
            for name in row:
                row[name].append(blocks[name])
        for name in rows:
            rows[name].append(row[name])
    if not any_overlap:
        raise NoWorkError(f"the exposure to warp (box {src_full}) does not overlap the "
                          f"destination box {dest_box}")
    return make_exposure(
        da.block(rows["image"]), variance=da.block(rows["variance"]), mask=da.block(rows["mask"]),
        x0=dest_box.x0, y0=dest_box.y0, wcs=dest_wcs, psf=source.attrs.get("psf"),
        photo_calib=source.attrs.get("photo_calib"), visit_info=source.attrs.get("visit_info"),
        mask_planes=planes, chunks=None,
    )


def selected_part(select: Callable[[Box], np.ndarray] | None, box: Box
               ) -> tuple[np.ndarray | None, Box]:
    """Return the tile's selection mask (``None``: every pixel) and the box bounding it."""
    if select is None:
        return None, box
    selected = np.asarray(select(box), dtype=bool)
    if selected.shape != box.shape:
        raise ValueError(f"select returned shape {selected.shape} for a {box.shape} tile")
    if selected.all():
        return None, box
    rows = np.flatnonzero(selected.any(axis=1))
    if rows.size == 0:
        return None, Box(box.x0, box.y0, 0, 0)
    cols = np.flatnonzero(selected.any(axis=0))
    return selected, Box.from_bounds(box.x0 + int(cols[0]), box.y0 + int(rows[0]),
                                     box.x0 + int(cols[-1]) + 1, box.y0 + int(rows[-1]) + 1)


def _warp_tile(planes: list[da.Array], src_full: Box, need: Box, mapping: PixelMapping, box: Box,
               kernel: str, bad_bits: int, no_data_bit: int, selected: np.ndarray | None,
               conserve_flux: bool = True) -> dict[str, da.Array]:
    if need.is_empty:
        return {
            "image": constant(box.shape, 0.0, np.float32),
            "variance": constant(box.shape, 0.0, np.float32),
            "mask": constant(box.shape, 1 << no_data_bit, np.uint32),
        }
    keys, pieces = chunk_pieces(planes[0], (src_full.x0, src_full.y0), need)
    inputs = [(plane.name, *key[1:]) for plane in planes for key in keys]
    image, variance, mask = call_keys(_warp_block, inputs, planes, box.shape,
                                      (np.float32, np.float32, np.uint32), pieces=pieces,
                                      src_box=need, grid=mapping.cells(box), step=mapping.step,
                                      box=box, kernel=kernel, bad_bits=bad_bits,
                                      no_data_bit=no_data_bit, selected=selected,
                                      conserve_flux=conserve_flux)
    return {"image": image, "variance": variance, "mask": mask}


def source_planes(exposure: xr.Dataset) -> list[da.Array]:
    """Return an exposure's image, variance and mask as dask arrays with one tiling.

    A numpy plane becomes one chunk, wrapped without a copy (a source is only read).
    """
    planes = []
    for name in ("image", "variance", "mask"):
        array = exposure[name].data
        if not isinstance(array, da.Array | np.ndarray):
            raise InputError(f"exposure planes must be numpy or dask arrays, got {type(array)}")
        planes.append(as_dask(array))
    return [p if p.chunks == planes[0].chunks else p.rechunk(planes[0].chunks) for p in planes]
