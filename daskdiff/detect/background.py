"""Background of a difference image: binned clipped means, linearly interpolated.

The image is divided into ``round(n / bin_size)`` equal cells per axis (so no partial cell at
the edges). In each cell the level is the mean of the unmasked pixels after one 3-sigma clip
(close to LSST's clipped statistics); empty cells are filled from the nearest filled one, an
optional median filter over cells (LSST's super-pixel filter, off by default) is applied, and
the grid is interpolated bilinearly through the cell centres, extrapolated linearly beyond the
outer centres so that a gradient is followed to the image edge.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ._compiled import bin_stats, clipped_bin_means, interpolate_grid

__all__ = ["estimate_background"]


def _edges(n: int, bin_size: int) -> np.ndarray:
    n_bins = max(1, round(n / bin_size))
    return np.linspace(0, n, n_bins + 1).round().astype(int)


def _axis_weights(n: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index and linear weight of every pixel (extrapolating beyond the ends)."""
    centres = 0.5 * (edges[:-1] + edges[1:]) - 0.5
    pixels = np.arange(n, dtype=float)
    if centres.size == 1:
        return np.zeros(n, int), np.zeros(n)
    index = np.clip(np.searchsorted(centres, pixels) - 1, 0, centres.size - 2)
    weight = (pixels - centres[index]) / (centres[index + 1] - centres[index])
    return index, weight


def estimate_background(image: np.ndarray, ignore: np.ndarray, *, bin_size: int,
                        filter_size: int = 1) -> np.ndarray:
    """Return the background of ``image`` at every pixel.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image; non-finite pixels are ignored.
    ignore : numpy.ndarray of bool
        Pixels to ignore (masked, detected), same shape.
    bin_size : int
        Approximate edge of the cells (pixels).
    filter_size : int, optional
        Median filter over cells (odd; 1, the default, for none: at the image corners a
        median filter biases a curved background).

    Returns
    -------
    numpy.ndarray
        float32 background, same shape; zeros if every pixel is ignored.
    """
    if image.shape != ignore.shape:
        raise InputError(f"background: mask shape {ignore.shape} != image shape {image.shape}")
    ny, nx = image.shape
    good = ~ignore & np.isfinite(image)
    if not good.any():
        return np.zeros(image.shape, np.float32)
    y_edges, x_edges = _edges(ny, bin_size), _edges(nx, bin_size)
    row_bin = np.repeat(np.arange(y_edges.size - 1), np.diff(y_edges))
    values = np.ascontiguousarray(image, dtype=np.float32)
    good = np.ascontiguousarray(good)
    count, total, square = bin_stats(values, good, row_bin, x_edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum(square / count - mean * mean, 0))
    # one 3-sigma clip around each cell's mean
    count, grid = clipped_bin_means(values, good, row_bin, x_edges, mean, std, 3.0)
    empty = ~(count > 0)
    if empty.all():
        return np.zeros(image.shape, np.float32)
    if empty.any():
        _, (iy, ix) = ndimage.distance_transform_edt(empty, return_indices=True)
        grid = grid[iy, ix]
    if filter_size > 1 and min(grid.shape) >= filter_size:
        grid = ndimage.median_filter(grid, size=filter_size, mode="nearest")
    iy, wy = _axis_weights(ny, y_edges)
    ix, wx = _axis_weights(nx, x_edges)
    return interpolate_grid(np.ascontiguousarray(grid, dtype=np.float64), iy, wy, ix, wx)
