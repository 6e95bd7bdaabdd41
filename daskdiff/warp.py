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

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy.interpolate import RectBivariateSpline

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
    taps = np.arange(-half + 1, half + 1, dtype=np.float64)
    dist = frac[None, ...] - taps.reshape((-1,) + (1,) * frac.ndim)
    if name == "nearest":
        weights = np.stack([(frac < 0.5), (frac >= 0.5)]).astype(np.float64)
    elif name == "bilinear":
        weights = np.clip(1.0 - np.abs(dist), 0.0, None)
    else:
        weights = np.sinc(dist) * np.sinc(dist / half)
        weights[np.abs(dist) >= half] = 0.0
        weights[:, frac == 0] = (taps == 0)[:, None]  # exact copy at integer offsets
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


def _warp_block(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, src_box: Box,
                mapping: PixelMapping, box: Box, kernel: str, bad_bits: int, no_data_bit: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample one destination block from a source sub-array covering ``src_box``."""
    half = KERNELS[kernel]
    u, v = mapping.evaluate(box)
    ui = np.floor(u).astype(np.int64)
    vi = np.floor(v).astype(np.int64)
    wx = kernel_weights(kernel, u - ui)
    wy = kernel_weights(kernel, v - vi)
    width = src_box.width
    col = ui - src_box.x0 - half + 1
    row = vi - src_box.y0 - half + 1
    inside = (col >= 0) & (row >= 0) & (col + 2 * half <= width)
    inside &= row + 2 * half <= src_box.height
    base = np.where(inside, row * width + col, 0)
    good = (np.isfinite(image) & np.isfinite(variance) & (variance >= 0)
            & ((mask & np.uint32(bad_bits)) == 0)).ravel()
    flat_img = np.where(good, image.ravel(), 0.0)
    flat_var = np.where(good, variance.ravel(), 0.0)
    flat_mask = mask.ravel()
    out_img = np.zeros(box.shape)
    out_var = np.zeros(box.shape)
    out_mask = np.zeros(box.shape, np.uint32)
    covered = inside.copy()
    for j in range(2 * half):
        row_img = np.zeros(box.shape)
        row_var = np.zeros(box.shape)
        for i in range(2 * half):
            index = base + (j * width + i)
            weight = wx[i]
            row_img += weight * np.take(flat_img, index)
            row_var += weight * weight * np.take(flat_var, index)
            out_mask |= np.take(flat_mask, index)
            covered &= np.take(good, index)
        out_img += wy[j] * row_img
        out_var += wy[j] * wy[j] * row_var
    out_img[~covered] = 0.0
    out_var[~covered] = 0.0
    out_mask[~inside] = 0
    out_mask[~covered] |= np.uint32(1 << no_data_bit)
    return out_img.astype(np.float32), out_var.astype(np.float32), out_mask


def warp_exposure(
    source: xr.Dataset,
    dest_wcs: Any,
    dest_box: Box,
    *,
    kernel: str = "lanczos3",
    interp_length: int = 50,
    chunks: int = DEFAULT_TILE_SIZE,
    bad_planes: tuple[str, ...] = ("NO_DATA",),
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
    x_edges = [*range(dest_box.x0, dest_box.x1, chunks), dest_box.x1]
    y_edges = [*range(dest_box.y0, dest_box.y1, chunks), dest_box.y1]
    rows: dict[str, list[list[da.Array]]] = {"image": [], "variance": [], "mask": []}
    any_overlap = False
    for ya, yb in pairwise(y_edges):
        row: dict[str, list[da.Array]] = {"image": [], "variance": [], "mask": []}
        for xa, xb in pairwise(x_edges):
            box = Box.from_bounds(xa, ya, xb, yb)
            need = mapping.source_box(box, margin=half).intersection(src_full)
            blocks = _warp_tile(source, src_full, need, mapping, box, kernel, bad_bits,
                                no_data_bit)
            any_overlap |= not need.is_empty
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


def _warp_tile(source: xr.Dataset, src_full: Box, need: Box, mapping: PixelMapping, box: Box,
               kernel: str, bad_bits: int, no_data_bit: int) -> dict[str, da.Array]:
    if need.is_empty:
        no_data = np.uint32(1 << no_data_bit)
        return {
            "image": da.zeros(box.shape, dtype=np.float32, chunks=box.shape),
            "variance": da.zeros(box.shape, dtype=np.float32, chunks=box.shape),
            "mask": da.full(box.shape, no_data, dtype=np.uint32, chunks=box.shape),
        }
    ys, xs = need.slices(origin=(src_full.x0, src_full.y0))
    parts = [_as_dask(source[name].data)[ys, xs] for name in ("image", "variance", "mask")]
    result = dask.delayed(_warp_block, nout=3, pure=True)(
        *parts, need, mapping, box, kernel, bad_bits, no_data_bit)
    return {
        "image": da.from_delayed(result[0], box.shape, dtype=np.float32),
        "variance": da.from_delayed(result[1], box.shape, dtype=np.float32),
        "mask": da.from_delayed(result[2], box.shape, dtype=np.uint32),
    }


def _as_dask(array: Any) -> da.Array:
    if isinstance(array, da.Array):
        return array
    if not isinstance(array, np.ndarray):
        raise InputError(f"exposure planes must be numpy or dask arrays, got {type(array)}")
    return da.from_array(array, chunks=array.shape, name=False)
