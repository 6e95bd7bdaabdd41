"""Per-pixel detection significance of a difference image, tile-parallel.

The difference ``D`` (background subtracted) is smoothed with a round Gaussian ``g`` of the PSF's
determinant radius; its variance is ``V * g**2`` (convolution with the squared kernel), and the
significance is ``(D * g) / sqrt(V * g**2)`` (LSST's ``pixel_stdev`` threshold on the smoothed
image). For a point source of the PSF's size this is its matched-filter signal-to-noise. The
border where the kernel does not fit is EDGE. Each output pixel depends only on the pixels within
the kernel half-width, so :func:`significance` with dask inputs runs per tile with
``map_overlap`` (halo = that half-width) and gives bit-identical values for any chunking.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy import ndimage

__all__ = ["find_cosmic_rays", "smoothing_kernel", "significance"]


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


def _separable(plane: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    out = ndimage.correlate1d(plane, kernel, axis=0, mode="constant", cval=0.0)
    return ndimage.correlate1d(out, kernel, axis=1, mode="constant", cval=0.0)


def _significance_block(image: np.ndarray, variance: np.ndarray, *,
                        kernel: np.ndarray) -> np.ndarray:
    good = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    image = np.where(good, image, 0).astype(np.float32)
    variance = np.where(good, variance, 0).astype(np.float32)
    smooth = _separable(image, kernel)
    smooth_var = _separable(variance, kernel * kernel)
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(smooth_var > 0, smooth / np.sqrt(smooth_var), 0.0)
    return sig.astype(np.float32)


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
    ny, nx = image.shape
    result = np.zeros((ny, nx), bool)
    sigma_map = np.sqrt(np.clip(variance, 0, None))
    candidate = usable & np.isfinite(image) & (image > min_sigma * sigma_map)
    candidate[0, :] = candidate[-1, :] = candidate[:, 0] = candidate[:, -1] = False
    ys, xs = np.nonzero(candidate)
    if ys.size == 0:
        return result
    value = image[ys, xs] - cond3_fac * sigma_map[ys, xs]
    ratio_axis = np.exp(-0.5 / psf_sigma**2)
    ratio_diag = np.exp(-1.0 / psf_sigma**2)
    sharp = np.zeros(ys.size, bool)
    for dy, dx, ratio in ((0, 1, ratio_axis), (1, 0, ratio_axis), (1, 1, ratio_diag),
                          (1, -1, ratio_diag)):
        a = image[ys + dy, xs + dx]
        b = image[ys - dy, xs - dx]
        noise = 0.5 * np.sqrt(variance[ys + dy, xs + dx] + variance[ys - dy, xs - dx])
        neighbours = 0.5 * (a + b) + cond3_fac * noise
        sharp |= neighbours < ratio * value
    result[ys[sharp], xs[sharp]] = True
    return result
