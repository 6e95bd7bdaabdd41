"""Compiled (numba) single-pass helpers over whole planes for the subtraction stage.

Each replaces several full-image numpy passes (and their temporaries) by one loop.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["bad_pixels", "count_covered", "detection_planes"]


@numba.njit(cache=True, nogil=True)
def bad_pixels(image: np.ndarray, mask: np.ndarray, bits: np.uint32) -> np.ndarray:
    """Return ``(mask & bits) != 0 | ~isfinite(image)``."""
    ny, nx = image.shape
    out = np.empty((ny, nx), np.bool_)
    for y in range(ny):
        for x in range(nx):
            out[y, x] = (mask[y, x] & bits) != 0 or not np.isfinite(image[y, x])
    return out


@numba.njit(cache=True, nogil=True)
def count_covered(sci_image: np.ndarray, sci_mask: np.ndarray, tmpl_image: np.ndarray,
                  tmpl_mask: np.ndarray, dy: int, dx: int, no_data: np.uint32) -> int:
    """Count science pixels where both images are finite and neither is NO_DATA.

    The template pixel of science pixel ``(y, x)`` is ``(y + dy, x + dx)``; outside the
    template counts as not covered.
    """
    ny, nx = sci_image.shape
    ty, tx = tmpl_image.shape
    count = 0
    for y in range(ny):
        yt = y + dy
        if yt < 0 or yt >= ty:
            continue
        for x in range(nx):
            xt = x + dx
            if xt < 0 or xt >= tx:
                continue
            if ((sci_mask[y, x] | tmpl_mask[yt, xt]) & no_data) == 0 and \
                    np.isfinite(sci_image[y, x]) and np.isfinite(tmpl_image[yt, xt]):
                count += 1
    return count


@numba.njit(cache=True, nogil=True)
def detection_planes(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, factor: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the (``factor`` x ``factor`` summed) data, variance and good planes for SEP.

    A pixel is good if it is not ``bad``, finite, with a finite positive variance; bad pixels
    contribute 0. A binned pixel is good only if all its inputs are.
    """
    ny, nx = image.shape[0] // factor, image.shape[1] // factor
    data = np.zeros((ny, nx), np.float32)
    var = np.zeros((ny, nx), np.float32)
    good = np.zeros((ny, nx), np.bool_)
    for yb in range(ny):
        for xb in range(nx):
            total, total_var, ok = np.float32(0), np.float32(0), True
            for y in range(yb * factor, yb * factor + factor):
                for x in range(xb * factor, xb * factor + factor):
                    value, v = image[y, x], variance[y, x]
                    ok &= not bad[y, x] and np.isfinite(value) and np.isfinite(v) and v > 0
                    total += value
                    total_var += v
            if ok:
                data[yb, xb] = total
                var[yb, xb] = total_var
                good[yb, xb] = True
    return data, var, good


@numba.njit(cache=True, nogil=True)
def or_dilate(mask: np.ndarray, half: int) -> np.ndarray:
    """Return the bitwise OR of ``mask`` over a ``(2 half + 1)^2`` box around each pixel.

    Van Herk / Gil-Werman running OR (block prefix and suffix ORs): O(1) per pixel per axis,
    all 32 planes at once.
    """
    ny, nx = mask.shape
    size = 2 * half + 1
    my, mx = ny + 2 * half, nx + 2 * half
    pad = np.zeros((my, mx), np.uint32)
    pad[half:half + ny, half:half + nx] = mask
    fwd = np.empty(mx, np.uint32)
    bwd = np.empty(mx, np.uint32)
    rows = np.zeros((my, nx), np.uint32)
    for y in range(half, half + ny):
        line = pad[y]
        for i in range(mx):
            fwd[i] = line[i] if i % size == 0 else fwd[i - 1] | line[i]
        bwd[mx - 1] = line[mx - 1]
        for i in range(mx - 2, -1, -1):
            bwd[i] = line[i] if (i + 1) % size == 0 else bwd[i + 1] | line[i]
        for x in range(nx):
            rows[y, x] = bwd[x] | fwd[x + size - 1]
    fwd2 = np.empty((my, nx), np.uint32)
    bwd2 = np.empty((my, nx), np.uint32)
    fwd2[0] = rows[0]
    for i in range(1, my):
        if i % size == 0:
            fwd2[i] = rows[i]
        else:
            for x in range(nx):
                fwd2[i, x] = fwd2[i - 1, x] | rows[i, x]
    bwd2[my - 1] = rows[my - 1]
    for i in range(my - 2, -1, -1):
        if (i + 1) % size == 0:
            bwd2[i] = rows[i]
        else:
            for x in range(nx):
                bwd2[i, x] = bwd2[i + 1, x] | rows[i, x]
    out = np.empty((ny, nx), np.uint32)
    for y in range(ny):
        for x in range(nx):
            out[y, x] = bwd2[y, x] | fwd2[y + size - 1, x]
    return out
