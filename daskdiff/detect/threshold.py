"""Per-pixel detection significance of a difference image, tile-parallel.

The difference ``D`` (background subtracted) is smoothed with a round Gaussian ``g`` of the PSF's
determinant radius; its variance is ``V * g**2`` (convolution with the squared kernel), and the
significance is ``(D * g) / sqrt(V * g**2)`` (LSST's ``pixel_stdev`` threshold on the smoothed
image). For a point source of the PSF's size this is its matched-filter signal-to-noise. The
border where the kernel does not fit is EDGE. Each output pixel depends only on the pixels within
the kernel half-width, so :func:`significance_tiles` (per tile of a tiling, halo = that
half-width) and :func:`significance` with dask inputs (``map_overlap``) give bit-identical values
for any tiling. The inner loops are compiled (:mod:`._compiled`).
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from ._compiled import cosmic_ray_pixels, significance_map, smoothed_variance
from .tiles import Tile, assemble, map_tiles

__all__ = ["find_cosmic_rays", "significance", "significance_tiles", "smoothing_kernel"]


def smoothing_kernel(sigma: float, *, width_sigma: float = 7.0) -> np.ndarray:
    """Return the 1-D Gaussian smoothing kernel (odd length, sum 1).

    The length is ``(int(width_sigma * sigma + 0.5) // 2) * 2 + 1`` as LSST's detection.
    """
    width = (int(width_sigma * sigma + 0.5) // 2) * 2 + 1
    width = max(width, 3)
    half = width // 2
    x = np.arange(-half, half + 1, dtype=float)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _significance_block(image: np.ndarray, variance: np.ndarray, *,
                        kernel: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(image, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    kernel = kernel.astype(np.float32)
    smooth_var = smoothed_variance(variance, kernel)
    return significance_map(image, variance, smooth_var, kernel)


def significance(image: np.ndarray | da.Array, variance: np.ndarray | da.Array, *,
                 sigma: float, width_sigma: float = 7.0) -> tuple[np.ndarray | da.Array, int]:
    """Return the per-pixel significance of the PSF-smoothed image and the EDGE width.

    Parameters
    ----------
    image, variance : numpy.ndarray or dask.array.Array
        Background-subtracted image and its variance; non-finite or non-positive-variance
        pixels count as zero signal and zero variance.
    sigma : float
        Gaussian smoothing sigma (the PSF determinant radius), pixels.
    width_sigma : float, optional
        Kernel width in sigmas.

    Returns
    -------
    significance : numpy.ndarray or dask.array.Array
        float32 signal-to-noise per pixel (0 where the smoothed variance is 0), lazy for dask
        input (one ``map_overlap`` task per tile, halo = the kernel half-width).
    edge : int
        Half-width of the kernel: pixels this close to the border are EDGE.
    """
    kernel = smoothing_kernel(sigma, width_sigma=width_sigma)
    half = kernel.size // 2
    if isinstance(image, da.Array) or isinstance(variance, da.Array):
        image = da.asarray(image)
        variance = da.asarray(variance).rechunk(image.chunks)
        depth = min(half, *(min(c) for c in image.chunks))
        if depth < half:  # tiles smaller than the halo: merge them first
            image = image.rechunk(max(2 * half, 64))
            variance = variance.rechunk(image.chunks)
        result = da.map_overlap(_significance_block, image, variance, depth=half,
                                boundary="none", dtype=np.float32, kernel=kernel,
                                meta=np.array((), np.float32))
        return result, half
    return _significance_block(np.asarray(image), np.asarray(variance), kernel=kernel), half


def _tile_smoothed_variance(variance: np.ndarray, *, crop: Tile, offset: tuple[int, int],
                            kernel: np.ndarray) -> np.ndarray:
    return smoothed_variance(variance, kernel)[crop]


def _tile_significance(image: np.ndarray, variance: np.ndarray, smooth_var: np.ndarray, *,
                       crop: Tile, offset: tuple[int, int], kernel: np.ndarray) -> np.ndarray:
    return significance_map(image, variance, smooth_var, kernel)[crop]


def significance_tiles(image: np.ndarray, variance: np.ndarray, tiles: list[Tile], *,
                       sigma: float, width_sigma: float = 7.0,
                       smooth_var: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """Return the significance image computed tile by tile, the smoothed variance and EDGE.

    Each tile is computed with a halo of the kernel half-width, so the result is the same
    for any tiling. ``smooth_var`` (from an earlier call with the same variance and sigma)
    skips smoothing the variance again.

    Returns
    -------
    significance : numpy.ndarray
        float32 signal-to-noise per pixel.
    smooth_var : numpy.ndarray
        float32 variance of the smoothed image (reusable).
    edge : int
        Half-width of the kernel.
    """
    kernel = smoothing_kernel(sigma, width_sigma=width_sigma).astype(np.float32)
    half = kernel.size // 2
    image = np.asarray(image, np.float32)
    variance = np.asarray(variance, np.float32)
    if smooth_var is None:
        smooth_var = assemble(image.shape, np.float32, tiles, map_tiles(
            _tile_smoothed_variance, [variance], tiles, halo=half, kernel=kernel))
    sig = assemble(image.shape, np.float32, tiles, map_tiles(
        _tile_significance, [image, variance, smooth_var], tiles, halo=half, kernel=kernel))
    return sig, smooth_var, half


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, *,
                     psf_sigma: float, min_sigma: float = 6.0,
                     cond3_fac: float = 2.5) -> np.ndarray:
    """Return a mask of pixels sharper than the PSF allows (cosmic rays).

    A pixel ``p`` of the background-subtracted image is a cosmic ray when it is at least
    ``min_sigma`` sigma above zero and, along at least one of the four directions through it
    (two axes, two diagonals), even after lowering it by ``cond3_fac`` sigma and raising its two
    neighbours by ``cond3_fac`` of their sigma, the mean of the neighbours is below what the
    PSF allows: ``mean(a, b) + k sigma_ab < r_d (p - k sigma_p)`` with ``r_d`` the PSF's value
    at the neighbour distance over its central value. No pixel that is part of a PSF-shaped
    source passes; a cosmic-ray track does because of its sharp cross-track profile. Pixels are
    flagged individually (no growth), so the mask is exactly the sharp pixels.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Background-subtracted image and variance.
    usable : numpy.ndarray of bool
        Pixels that may be tested (e.g. not NO_DATA or BAD).
    psf_sigma : float
        PSF Gaussian sigma (pixels) setting the allowed sharpness.
    min_sigma, cond3_fac : float, optional
        Thresholds (sigma).

    Returns
    -------
    numpy.ndarray of bool
        The cosmic-ray pixels.
    """
    ratio_axis = float(np.exp(-0.5 / psf_sigma**2))
    ratio_diag = float(np.exp(-1.0 / psf_sigma**2))
    return cosmic_ray_pixels(np.ascontiguousarray(image, dtype=np.float32),
                             np.ascontiguousarray(variance, dtype=np.float32),
                             np.ascontiguousarray(usable, dtype=bool), float(min_sigma),
                             float(cond3_fac), ratio_axis, ratio_diag)
