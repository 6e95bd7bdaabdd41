"""Compiled (numba) inner loops of detection: smoothing, binning, growth, cosmic rays.

Every function here is a plain loop over pixels with a fixed order of floating-point operations
per output value, so the result at a pixel depends only on the input values it reads, never on
the array's extent: a tile computed with a sufficient halo is bit-identical to the same pixels
of the whole image. The functions are compiled on first use and cached on disk
(``cache=True``); they release the GIL, so tiles run in parallel under a threaded scheduler.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "bin_stats",
    "clipped_bin_means",
    "cosmic_ray_pixels",
    "dilate_disk",
    "interpolate_grid",
    "separable_smooth",
    "significance_map",
    "smoothed_variance",
]


@njit(cache=True, nogil=True)
def _correlate_rows(plane: np.ndarray, variance: np.ndarray, kernel: np.ndarray,
                    out: np.ndarray) -> None:
    """Correlate rows; pixels whose ``variance`` is not finite and positive count as 0."""
    ny, nx = plane.shape
    n = kernel.size
    half = n // 2
    padded = np.zeros(nx + 2 * half, np.float32)  # zeros outside the row
    acc = np.empty(nx, np.float32)
    for y in range(ny):
        for x in range(nx):
            d = plane[y, x]
            v = variance[y, x]
            usable = (v > 0) & (v < np.inf) & (abs(d) < np.inf)
            padded[half + x] = d if usable else np.float32(0.0)
        acc[:] = 0.0
        for j in range(n):
            k = kernel[j]
            source = padded[j:j + nx]
            for x in range(nx):
                acc[x] += k * source[x]
        out[y] = acc


@njit(cache=True, nogil=True)
def _correlate_columns(plane: np.ndarray, kernel: np.ndarray, out: np.ndarray) -> None:
    ny, nx = plane.shape
    half = kernel.size // 2
    for y in range(ny):
        dest = out[y]
        for x in range(nx):
            dest[x] = 0.0
        for j in range(kernel.size):
            source = y + j - half
            if source < 0 or source >= ny:
                continue
            k = kernel[j]
            row = plane[source]
            for x in range(nx):
                dest[x] += k * row[x]


@njit(cache=True, nogil=True)
def separable_smooth(plane: np.ndarray, variance: np.ndarray, kernel: np.ndarray
                     ) -> np.ndarray:
    """Correlate a float32 plane with ``kernel`` along both axes, zero outside the plane.

    Pixels whose value is not finite or whose ``variance`` is not finite and positive count
    as zero.
    """
    temp = np.empty(plane.shape, np.float32)
    out = np.empty(plane.shape, np.float32)
    _correlate_rows(plane, variance, kernel, temp)
    _correlate_columns(temp, kernel, out)
    return out


@njit(cache=True, nogil=True)
def smoothed_variance(variance: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Variance of the smoothed image: the usable variance correlated with ``kernel**2``.

    Non-finite or non-positive variances count as zero (unusable pixels).
    """
    square = (kernel * kernel).astype(np.float32)
    return separable_smooth(variance, variance, square)


@njit(cache=True, nogil=True)
def significance_map(image: np.ndarray, variance: np.ndarray, smooth_var: np.ndarray,
                     kernel: np.ndarray) -> np.ndarray:
    """Smoothed image over the square root of its smoothed variance (0 where that is 0).

    Pixels with a non-finite value or a non-positive variance count as zero signal.
    """
    ny, nx = image.shape
    temp = np.empty((ny, nx), np.float32)
    out = np.empty((ny, nx), np.float32)
    _correlate_rows(image, variance, kernel, temp)
    _correlate_columns(temp, kernel, out)
    for y in range(ny):
        var_row = smooth_var[y]
        dest = out[y]
        for x in range(nx):
            sv = var_row[x]
            dest[x] = dest[x] / np.sqrt(sv) if sv > 0 else np.float32(0.0)
    return out


@njit(cache=True, nogil=True)
def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by the disk ``dx**2 + dy**2 <= radius**2`` (zero outside the mask).

    Each horizontal run of set pixels paints, on every row within ``radius``, the run widened
    by that row's half-chord: the cost scales with the number of runs, not of pixels.
    """
    ny, nx = mask.shape
    out = np.zeros((ny, nx), np.bool_)
    if radius <= 0:
        out[:, :] = mask
        return out
    chord = np.empty(2 * radius + 1, np.int64)
    for i in range(2 * radius + 1):
        dy = i - radius
        chord[i] = int(np.floor(np.sqrt(radius * radius - dy * dy) + 1e-9))
    for y in range(ny):
        row = mask[y]
        x = 0
        while x < nx:
            if not row[x]:
                x += 1
                continue
            start = x
            while x < nx and row[x]:
                x += 1
            for i in range(2 * radius + 1):
                yy = y + i - radius
                if yy < 0 or yy >= ny:
                    continue
                lo = max(0, start - chord[i])
                hi = min(nx, x + chord[i])
                dest = out[yy]
                for xx in range(lo, hi):
                    dest[xx] = True
    return out


@njit(cache=True, nogil=True)
def bin_stats(image: np.ndarray, good: np.ndarray, row_bin: np.ndarray, col_edges: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell count, sum and sum of squares (float64) of the good pixels.

    ``row_bin[y]`` is the cell row of image row ``y``; cell column ``j`` spans image columns
    ``col_edges[j]:col_edges[j + 1]``.
    """
    n_rows = row_bin[-1] + 1
    n_cols = col_edges.size - 1
    count = np.zeros((n_rows, n_cols))
    total = np.zeros((n_rows, n_cols))
    square = np.zeros((n_rows, n_cols))
    for y in range(image.shape[0]):
        by = row_bin[y]
        for bx in range(n_cols):
            n = 0.0
            t = 0.0
            q = 0.0
            for x in range(col_edges[bx], col_edges[bx + 1]):
                if good[y, x]:
                    value = np.float64(image[y, x])
                    n += 1.0
                    t += value
                    q += value * value
            count[by, bx] += n
            total[by, bx] += t
            square[by, bx] += q
    return count, total, square


@njit(cache=True, nogil=True)
def clipped_bin_means(image: np.ndarray, good: np.ndarray, row_bin: np.ndarray,
                      col_edges: np.ndarray, mean: np.ndarray, std: np.ndarray,
                      n_clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell count and mean of the good pixels within ``n_clip`` std of the cell mean."""
    n_rows, n_cols = mean.shape
    count = np.zeros((n_rows, n_cols))
    total = np.zeros((n_rows, n_cols))
    mean32 = mean.astype(np.float32)
    limit32 = (n_clip * std).astype(np.float32)
    for y in range(image.shape[0]):
        by = row_bin[y]
        for bx in range(n_cols):
            centre = mean32[by, bx]
            limit = limit32[by, bx]
            n = 0.0
            t = 0.0
            for x in range(col_edges[bx], col_edges[bx + 1]):
                value = image[y, x]
                if good[y, x] and abs(value - centre) <= limit:
                    n += 1.0
                    t += np.float64(value)
            count[by, bx] += n
            total[by, bx] += t
    means = np.full((n_rows, n_cols), np.nan)
    for by in range(n_rows):
        for bx in range(n_cols):
            if count[by, bx] > 0:
                means[by, bx] = total[by, bx] / count[by, bx]
    return count, means


@njit(cache=True, nogil=True)
def interpolate_grid(grid: np.ndarray, row_index: np.ndarray, row_weight: np.ndarray,
                     col_index: np.ndarray, col_weight: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``grid`` at every pixel (float32 output).

    ``row_index[y]`` / ``row_weight[y]`` give the lower grid row and the weight of the upper
    one for image row ``y`` (likewise for columns); a single-row or -column grid is constant
    along that axis.
    """
    n_rows, n_cols = grid.shape
    ny = row_index.size
    nx = col_index.size
    rows = np.empty((n_rows, nx))
    for r in range(n_rows):
        for x in range(nx):
            if n_cols > 1:
                i = col_index[x]
                w = col_weight[x]
                rows[r, x] = grid[r, i] * (1 - w) + grid[r, i + 1] * w
            else:
                rows[r, x] = grid[r, 0]
    out = np.empty((ny, nx), np.float32)
    for y in range(ny):
        if n_rows > 1:
            i = row_index[y]
            w = row_weight[y]
            for x in range(nx):
                out[y, x] = rows[i, x] * (1 - w) + rows[i + 1, x] * w
        else:
            for x in range(nx):
                out[y, x] = rows[0, x]
    return out


@njit(cache=True, nogil=True)
def cosmic_ray_pixels(image: np.ndarray, variance: np.ndarray, usable: np.ndarray,
                      min_sigma: float, cond3_fac: float, ratio_axis: float,
                      ratio_diag: float) -> np.ndarray:
    """Pixels sharper than the PSF allows (see :func:`~.threshold.find_cosmic_rays`)."""
    ny, nx = image.shape
    out = np.zeros((ny, nx), np.bool_)
    dys = (0, 1, 1, 1)
    dxs = (1, 0, 1, -1)
    for y in range(1, ny - 1):
        for x in range(1, nx - 1):
            p = image[y, x]
            if not usable[y, x] or not np.isfinite(p):
                continue
            v = variance[y, x]
            if not np.isfinite(v):
                continue
            sigma_p = np.sqrt(v) if v > 0 else 0.0
            if not p > min_sigma * sigma_p:
                continue
            value = p - cond3_fac * sigma_p
            for d in range(4):
                dy = dys[d]
                dx = dxs[d]
                ratio = ratio_axis if d < 2 else ratio_diag
                a = image[y + dy, x + dx]
                b = image[y - dy, x - dx]
                noise = 0.5 * np.sqrt(variance[y + dy, x + dx] + variance[y - dy, x - dx])
                if 0.5 * (a + b) + cond3_fac * noise < ratio * value:
                    out[y, x] = True
                    break
    return out


@njit(cache=True, nogil=True)
def prepare_planes(image: np.ndarray, variance: np.ndarray, mask: np.ndarray,
                   clear_bits: int, unusable_bits: int, ignore_bits: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the difference's planes before detection.

    Returns
    -------
    image : numpy.ndarray
        float32 copy with non-finite pixels set to 0.
    mask : numpy.ndarray
        uint32 copy with ``clear_bits`` cleared.
    unusable : numpy.ndarray of bool
        Pixels with an ``unusable_bits`` bit, a non-finite value or a variance that is not
        finite and positive.
    ignore : numpy.ndarray of bool
        ``unusable`` or an ``ignore_bits`` bit (left out of the background).
    """
    ny, nx = image.shape
    out_image = np.empty((ny, nx), np.float32)
    out_mask = np.empty((ny, nx), np.uint32)
    unusable = np.empty((ny, nx), np.bool_)
    ignore = np.empty((ny, nx), np.bool_)
    keep = np.uint32(~np.uint32(clear_bits))
    bad = np.uint32(unusable_bits)
    skip = np.uint32(ignore_bits)
    for y in range(ny):
        for x in range(nx):
            d = image[y, x]
            v = variance[y, x]
            m = mask[y, x] & keep
            finite = abs(d) < np.inf
            out_image[y, x] = d if finite else np.float32(0.0)
            out_mask[y, x] = m
            bad_pixel = (m & bad) != 0 or not finite or not (v > 0 and v < np.inf)
            unusable[y, x] = bad_pixel
            ignore[y, x] = bad_pixel or (m & skip) != 0
    return out_image, out_mask, unusable, ignore
