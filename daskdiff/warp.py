"""Resampling an exposure onto another pixel grid (another WCS), tile-parallel.

The pixel mapping destination (x, y) -> source (u, v) goes through the sky with the full WCSs
only on a coarse grid of nodes (every ``interp_length`` pixels) and is interpolated with a bicubic
spline elsewhere, so its cost is independent of the distortion model; :func:`mapping_error`
measures the interpolation error (well below 0.01 px for survey WCSs at the default spacing).

Pixels are resampled with a separable, normalised interpolation kernel (Lanczos of order 3 by
default). The variance is resampled with the squared kernel weights, the mask is the OR of every
source pixel under the kernel footprint (so masks grow by the footprint), and a destination pixel
whose footprint is not entirely covered by good source pixels gets NO_DATA, with image and
variance set to 0 (finite). Every destination pixel depends only on its own mapped position and
the source pixels under its footprint, so the result does not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from scipy.interpolate import RectBivariateSpline

from ._tiles import call3, regrid
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

__all__ = ["KERNELS", "PixelMapping", "kernel_weights", "mapping_error", "warp_exposure"]

#: Interpolation kernels by name: half-width in pixels (number of taps = 2 * half-width).
KERNELS: dict[str, int] = {
    "nearest": 1,
    "bilinear": 1,
    "lanczos2": 2,
    "lanczos3": 3,
    "lanczos4": 4,
    "lanczos5": 5,
}


def _check_kernel(name: str) -> int:
    if name not in KERNELS:
        raise ConfigError(f"unknown warping kernel {name!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[name]


def kernel_weights(name: str, frac: np.ndarray) -> np.ndarray:
    """Return normalised 1-D interpolation weights.

    Parameters
    ----------
    name : str
        Kernel name (see :data:`KERNELS`).
    frac : numpy.ndarray
        Fractional offsets in ``[0, 1)`` of the positions from their floor pixel.

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


@dataclass(frozen=True)
class PixelMapping:
    """The mapping from destination pixels to source pixels, interpolated from coarse nodes.

    Build it with :meth:`PixelMapping.from_wcs`; evaluate it with :meth:`evaluate`.
    """

    u_spline: RectBivariateSpline
    v_spline: RectBivariateSpline
    box: Box

    @classmethod
    def from_wcs(cls, dest_wcs: Any, dest_box: Box, src_wcs: Any, *,
                 interp_length: int = 50) -> PixelMapping:
        """Fit the mapping on nodes spaced at most ``interp_length`` pixels over ``dest_box``.

        Raises
        ------
        ConfigError
            If ``interp_length`` is not positive.
        """
        if interp_length < 1:
            raise ConfigError(f"interp_length must be >= 1 pixel, got {interp_length}")
        xs = _nodes(dest_box.x0, dest_box.x1 - 1, interp_length)
        ys = _nodes(dest_box.y0, dest_box.y1 - 1, interp_length)
        gx, gy = np.meshgrid(xs, ys)
        ra, dec = pixel_to_sky(dest_wcs, gx.ravel(), gy.ravel())
        u, v = sky_to_pixel(src_wcs, ra, dec)
        kx, ky = min(3, len(xs) - 1), min(3, len(ys) - 1)
        u_spline = RectBivariateSpline(ys, xs, u.reshape(gx.shape), kx=ky, ky=kx, s=0)
        v_spline = RectBivariateSpline(ys, xs, v.reshape(gx.shape), kx=ky, ky=kx, s=0)
        return cls(u_spline, v_spline, dest_box)

    def evaluate(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """Return source coordinates ``(u, v)``, each ``box.shape``, for the pixels of ``box``."""
        ys, xs = box.ys().astype(float), box.xs().astype(float)
        return self.u_spline(ys, xs, grid=True), self.v_spline(ys, xs, grid=True)

    def source_box(self, box: Box, *, margin: int) -> Box:
        """Return the source box needed for destination ``box`` with a kernel ``margin``."""
        sample = Box(box.x0, box.y0, box.width, box.height)
        step = 16
        xs = np.unique(np.r_[np.arange(sample.x0, sample.x1, step), sample.x1 - 1]).astype(float)
        ys = np.unique(np.r_[np.arange(sample.y0, sample.y1, step), sample.y1 - 1]).astype(float)
        u = self.u_spline(ys, xs, grid=True)
        v = self.v_spline(ys, xs, grid=True)
        pad = margin + 2  # slack for the curvature between samples
        return Box.from_bounds(int(np.floor(u.min())) - pad, int(np.floor(v.min())) - pad,
                               int(np.ceil(u.max())) + pad + 1, int(np.ceil(v.max())) + pad + 1)


def _nodes(start: int, stop: int, step: int) -> np.ndarray:
    count = max(int(np.ceil((stop - start) / step)), 3) + 1
    return np.linspace(start, stop, count) if stop > start else np.array([start - 1.0, start,
                                                                          start + 1.0])


def mapping_error(mapping: PixelMapping, dest_wcs: Any, src_wcs: Any, *, n: int = 1000,
                  seed: int = 0) -> float:
    """Return the largest interpolation error (pixels) at ``n`` random destination pixels."""
    rng = np.random.default_rng(seed)
    box = mapping.box
    x = rng.integers(box.x0, box.x1, n)
    y = rng.integers(box.y0, box.y1, n)
    ra, dec = pixel_to_sky(dest_wcs, x, y)
    u, v = sky_to_pixel(src_wcs, ra, dec)
    ui = mapping.u_spline.ev(y.astype(float), x.astype(float))
    vi = mapping.v_spline.ev(y.astype(float), x.astype(float))
    return float(np.max(np.hypot(ui - u, vi - v)))


def _window_reduce(array: np.ndarray, size: int, op: np.ufunc) -> np.ndarray:
    """Reduce ``array`` with ``op`` over the forward window ``[r, r+size) x [c, c+size)``.

    Positions whose window leaves the array are reduced over the part inside.
    """
    out = array.copy()
    for k in range(1, size):
        op(out[:, :-k], array[:, k:], out=out[:, :-k])
    cols = out.copy()
    for k in range(1, size):
        op(out[:-k, :], cols[k:, :], out=out[:-k, :])
    return out


_SUB_BLOCK = 128


def _sub_slices(length: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def _accumulate(flat_img: np.ndarray, flat_var: np.ndarray, base: np.ndarray, wx: np.ndarray,
                wy: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum the kernel-weighted source pixels (and variances, squared weights) at ``base``."""
    taps, n = wx.shape
    out_img = np.zeros(n, np.float32)
    out_var = np.zeros(n, np.float32)
    row_img = np.empty(n, np.float32)
    row_var = np.empty(n, np.float32)
    vals = np.empty(n, np.float32)
    wx2 = wx * wx
    for j in range(taps):
        row_img.fill(0.0)
        row_var.fill(0.0)
        for i in range(taps):
            offset = j * width + i
            np.take(flat_img[offset:], base, out=vals, mode="wrap")
            vals *= wx[i]
            row_img += vals
            np.take(flat_var[offset:], base, out=vals, mode="wrap")
            vals *= wx2[i]
            row_var += vals
        row_img *= wy[j]
        out_img += row_img
        row_var *= wy[j] * wy[j]
        out_var += row_var
    return out_img, out_var


def _warp_block(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, *, src_box: Box,
                mapping: PixelMapping, box: Box, kernel: str, bad_bits: int, no_data_bit: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample one destination block from a source sub-array covering ``src_box``."""
    half = KERNELS[kernel]
    taps = 2 * half
    u, v = mapping.evaluate(box)
    ui = np.floor(u)
    vi = np.floor(v)
    fu = (u - ui).astype(np.float32)
    fv = (v - vi).astype(np.float32)
    height, width = src_box.height, src_box.width
    col = ui.astype(np.int64) - (src_box.x0 + half - 1)
    row = vi.astype(np.int64) - (src_box.y0 + half - 1)
    inside = (col >= 0) & (row >= 0) & (col + taps <= width) & (row + taps <= height)
    base = np.where(inside, row * width + col, 0).ravel()

    good = np.isfinite(image) & np.isfinite(variance) & (variance >= 0)
    good &= (mask & np.uint32(bad_bits)) == 0
    covered = inside.ravel() & np.take(_window_reduce(good, taps, np.logical_and).ravel(), base)
    out_mask = np.take(_window_reduce(mask, taps, np.bitwise_or).ravel(), base)
    out_mask[~inside.ravel()] = 0

    flat_img = np.where(good, image, 0).astype(np.float32).ravel()
    flat_var = np.where(good, variance, 0).astype(np.float32).ravel()
    pad = np.zeros(taps * width + taps, np.float32)
    flat_img = np.concatenate([flat_img, pad])
    flat_var = np.concatenate([flat_var, pad])
    out_img = np.empty(box.shape, np.float32)
    out_var = np.empty(box.shape, np.float32)
    base2d = base.reshape(box.shape)
    # gather in sub-blocks whose source footprint stays in cache (5x faster than one pass)
    for ys in _sub_slices(box.height, _SUB_BLOCK):
        for xs in _sub_slices(box.width, _SUB_BLOCK):
            wx = kernel_weights(kernel, fu[ys, xs].ravel())
            wy = kernel_weights(kernel, fv[ys, xs].ravel())
            img, var = _accumulate(flat_img, flat_var, base2d[ys, xs].ravel(), wx, wy, width)
            out_img[ys, xs] = img.reshape(out_img[ys, xs].shape)
            out_var[ys, xs] = var.reshape(out_var[ys, xs].shape)
    out_img = out_img.ravel()
    out_var = out_var.ravel()
    out_img[~covered] = 0.0
    out_var[~covered] = 0.0
    out_mask[~covered] |= np.uint32(1 << no_data_bit)
    return (out_img.reshape(box.shape), out_var.reshape(box.shape),
            out_mask.reshape(box.shape))


def warp_exposure(
    source: xr.Dataset,
    dest_wcs: Any,
    dest_box: Box,
    *,
    kernel: str = "lanczos3",
    interp_length: int = 50,
    chunks: int = DEFAULT_TILE_SIZE,
    bad_planes: tuple[str, ...] = ("NO_DATA",),
    tiles: Callable[[Box], bool] | None = None,
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
    tiles : callable, optional
        ``tiles(box) -> bool`` says whether a destination tile is needed; tiles it rejects are
        not computed and come out NO_DATA (used when another input owns those pixels).

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
    src_planes = [_as_dask(source[name].data) for name in ("image", "variance", "mask")]
    x_edges = [*range(dest_box.x0, dest_box.x1, chunks), dest_box.x1]
    y_edges = [*range(dest_box.y0, dest_box.y1, chunks), dest_box.y1]
    rows: dict[str, list[list[da.Array]]] = {"image": [], "variance": [], "mask": []}
    any_overlap = False
    for ya, yb in pairwise(y_edges):
        row: dict[str, list[da.Array]] = {"image": [], "variance": [], "mask": []}
        for xa, xb in pairwise(x_edges):
            box = Box.from_bounds(xa, ya, xb, yb)
            need = mapping.source_box(box, margin=half).intersection(src_full)
            if tiles is not None and not tiles(box):
                need = Box(need.x0, need.y0, 0, 0)
            blocks = _warp_tile(src_planes, src_full, need, mapping, box, kernel, bad_bits,
                                no_data_bit)
            any_overlap |= not need.is_empty or tiles is not None
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


def _warp_tile(planes: list[da.Array], src_full: Box, need: Box, mapping: PixelMapping, box: Box,
               kernel: str, bad_bits: int, no_data_bit: int) -> dict[str, da.Array]:
    if need.is_empty:
        no_data = np.uint32(1 << no_data_bit)
        return {
            "image": da.zeros(box.shape, dtype=np.float32, chunks=box.shape),
            "variance": da.zeros(box.shape, dtype=np.float32, chunks=box.shape),
            "mask": da.full(box.shape, no_data, dtype=np.uint32, chunks=box.shape),
        }
    fills = (np.float32(np.nan), np.float32(np.nan), np.uint32(1 << no_data_bit))
    parts = [regrid(plane, (src_full.x0, src_full.y0), need, tile=need.shape, fill=fill)
             for plane, fill in zip(planes, fills, strict=True)]
    image, variance, mask = call3(_warp_block, parts, box.shape,
                                  (np.float32, np.float32, np.uint32), src_box=need,
                                  mapping=mapping, box=box, kernel=kernel, bad_bits=bad_bits,
                                  no_data_bit=no_data_bit)
    return {"image": image, "variance": variance, "mask": mask}


def _as_dask(array: Any) -> da.Array:
    if isinstance(array, da.Array):
        return array
    if not isinstance(array, np.ndarray):
        raise InputError(f"exposure planes must be numpy or dask arrays, got {type(array)}")
    return da.from_array(array, chunks=array.shape, name=False)
