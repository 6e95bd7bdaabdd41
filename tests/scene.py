"""The seeded test-scene factory shared by the subtraction and detection tests.

:func:`make_test_image` mimics the harness of LSST's ip_diffim tests (``makeTestImage``; see
``reference/lsst_diffim.md`` §4.0): point sources with a Gaussian PSF of sigma ``psf_size`` on a
``x_size`` x ``y_size`` image at a non-zero parent origin, Gaussian noise of ``noise_level``
(mean subtracted), a variance plane ``sqrt(|model|) + noise_level**2`` (the reference's quirk),
DETECTED and EDGE masks from a 5-sigma PSF-smoothed detection, an optional smooth background
added after detection, and a photometric calibration dividing image and variance.

Star positions depend on ``seed`` only and cancel the template border, so a science image and a
template made with the same ``seed`` (and any ``template_border``) hold the same stars; the noise
depends on ``noise_seed`` only. Every draw uses ``np.random.default_rng`` (never a global RNG).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from daskdiff.exposure import make_exposure
from daskdiff.masks import DEFAULT_MASK_PLANES
from daskdiff.metadata import PhotoCalib, VisitInfo
from daskdiff.psf import GaussianPsf

__all__ = ["edge_width", "make_test_image", "make_test_wcs", "smoothing_kernel_width"]

#: The truth catalogue's flux error (counts), as the reference harness sets it.
TRUTH_FLUX_ERR = 20.0
#: Pixel scale (arcsec/px) of the test WCS.
PIXEL_SCALE = 0.187

Background = float | np.ndarray | Callable[[np.ndarray, np.ndarray], np.ndarray] | None


def make_test_wcs(*, x0: int = 12345, y0: int = 67890, x_size: int = 256, y_size: int = 256,
                  ra: float = 45.0, dec: float = 0.0) -> WCS:
    """Return the affine TAN WCS of a test image (0-based parent pixels, 0.187 arcsec/px).

    The reference pixel is the image centre, so templates grown by a border share it.
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [x0 + x_size / 2.0 + 1.0, y0 + y_size / 2.0 + 1.0]
    scale = PIXEL_SCALE / 3600.0
    wcs.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
    wcs.wcs.set()
    return wcs


def smoothing_kernel_width(psf_size: float) -> int:
    """Return the detection smoothing-kernel width ``(int(7 sigma + 0.5) // 2) * 2 + 1``."""
    return (int(7.0 * psf_size + 0.5) // 2) * 2 + 1


def edge_width(psf_size: float) -> int:
    """Return the EDGE border (half the smoothing kernel): 7, 8, 10 px for sigma 2.0, 2.4, 2.8."""
    return smoothing_kernel_width(psf_size) // 2


def _positions(rng: np.random.Generator, n_src: int, *, size: int, start: int, buffer: int
               ) -> np.ndarray:
    return rng.random(n_src) * (size - 2 * buffer) + buffer + start


def _render(psf: GaussianPsf, xs: np.ndarray, ys: np.ndarray, fluxes: np.ndarray,
            shape: tuple[int, int], x0: int, y0: int, stamp: int) -> np.ndarray:
    model = np.zeros(shape, dtype=np.float64)
    ny, nx = shape
    for x, y, flux in zip(xs, ys, fluxes, strict=True):
        image, box = psf.image(float(x), float(y), size=stamp)
        bx0, by0 = box.x0 - x0, box.y0 - y0
        ya, yb = max(by0, 0), min(by0 + stamp, ny)
        xa, xb = max(bx0, 0), min(bx0 + stamp, nx)
        if ya >= yb or xa >= xb:
            continue
        model[ya:yb, xa:xb] += flux * image[ya - by0:yb - by0, xa - bx0:xb - bx0]
    return model


def _detect(image: np.ndarray, variance: np.ndarray, psf_size: float) -> tuple[np.ndarray, int]:
    """Return the DETECTED mask (5 sigma, PSF-smoothed, grown 2.4 sigma) and the EDGE width."""
    width = smoothing_kernel_width(psf_size)
    half = width // 2
    grid = np.arange(width) - half
    kernel1d = np.exp(-0.5 * (grid / psf_size) ** 2)
    kernel1d /= kernel1d.sum()
    smooth = ndimage.convolve1d(ndimage.convolve1d(image, kernel1d, axis=0, mode="constant"),
                                kernel1d, axis=1, mode="constant")
    smooth_var = ndimage.convolve1d(
        ndimage.convolve1d(variance, kernel1d**2, axis=0, mode="constant"),
        kernel1d**2, axis=1, mode="constant")
    significance = smooth / np.sqrt(np.maximum(smooth_var, 1e-30))
    detected = significance > 5.0
    radius = 2.4 * psf_size
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = xx**2 + yy**2 <= radius**2
    detected = ndimage.binary_dilation(detected, structure=disk)
    return detected, half


def _background(background: Background, xx: np.ndarray, yy: np.ndarray) -> np.ndarray | float:
    if background is None:
        return 0.0
    if callable(background):
        return np.asarray(background(xx, yy), dtype=np.float64)
    return np.asarray(background, dtype=np.float64)


def make_test_image(
    *,
    seed: int = 5,
    n_src: int = 20,
    psf_size: float = 2.0,
    noise_level: float = 5.0,
    noise_seed: int = 6,
    flux_level: float = 500.0,
    flux_range: float = 2.0,
    kernel_size: int = 31,
    template_border: int = 0,
    x_size: int = 256,
    y_size: int = 256,
    x0: int = 12345,
    y0: int = 67890,
    calibration: float = 1.0,
    background: Background = None,
    chunks: Any = None,
) -> tuple[xr.Dataset, Table]:
    """Return a seeded test exposure and its truth table (the LSST test harness).

    Parameters
    ----------
    seed : int
        Seed of the star positions and fluxes.
    n_src : int
        Number of stars.
    psf_size : float
        Gaussian PSF sigma in pixels (sigma, not FWHM).
    noise_level : float
        Standard deviation of the added Gaussian noise (counts, before calibration).
    noise_seed : int
        Seed of the noise.
    flux_level, flux_range : float
        Fluxes are uniform in ``[flux_level, flux_level * flux_range]``.
    kernel_size : int
        Stamp edge of the rendered stars; stars stay ``kernel_size // 2 + 1`` px from the
        science box edge.
    template_border : int
        Pixels added on every side (a template grown by the border).
    x_size, y_size : int
        Science box size; the image is grown by ``template_border``.
    x0, y0 : int
        Parent-frame origin of the science box.
    calibration : float
        Image and variance are divided by it; the photometric calibration is set to it.
    background : float, array or callable, optional
        Added after detection: a constant, an array of the image shape, or ``f(x, y)`` of
        parent-frame pixel coordinate arrays.
    chunks : int, tuple or None
        Dask tile size of the planes; ``None`` keeps numpy arrays.

    Returns
    -------
    exposure : xarray.Dataset
        The exposure (GaussianPsf of sigma ``psf_size``, TAN WCS, band ``g``).
    truth : astropy.table.Table
        One row per star: ``id``, ``x``, ``y`` (parent frame), ``flux`` (counts before
        calibration), ``flux_err`` (20), ``snr`` and ``footprint_radius`` (5 sigma).
    """
    border = int(template_border)
    bx0, by0 = x0 - border, y0 - border
    width, height = x_size + 2 * border, y_size + 2 * border
    buffer = kernel_size // 2 + border + 1
    rng = np.random.default_rng(seed)
    xs = _positions(rng, n_src, size=width, start=bx0, buffer=buffer)
    ys = _positions(rng, n_src, size=height, start=by0, buffer=buffer)
    fluxes = (rng.random(n_src) * (flux_range - 1.0) + 1.0) * flux_level

    psf = GaussianPsf(sigma=psf_size, size=kernel_size | 1)
    model = _render(psf, xs, ys, fluxes, (height, width), bx0, by0, kernel_size | 1)
    noise = np.random.default_rng(noise_seed).standard_normal((height, width)) * noise_level
    noise -= noise.mean()
    image = model + noise
    variance = np.sqrt(np.abs(model)) + noise_level**2

    planes = DEFAULT_MASK_PLANES
    detected, edge = _detect(image, variance, psf_size)
    mask = np.where(detected, np.uint32(planes.bitmask("DETECTED")), np.uint32(0))
    edge_mask = np.ones((height, width), dtype=bool)
    edge_mask[edge:height - edge, edge:width - edge] = False
    mask |= np.where(edge_mask, np.uint32(planes.bitmask("EDGE")), np.uint32(0))

    yy, xx = np.mgrid[by0:by0 + height, bx0:bx0 + width]
    image = image + _background(background, xx, yy)
    image /= calibration
    variance /= calibration

    exposure = make_exposure(
        image.astype(np.float32), variance=variance.astype(np.float32), mask=mask,
        x0=bx0, y0=by0, wcs=make_test_wcs(x0=x0, y0=y0, x_size=x_size, y_size=y_size),
        psf=psf, photo_calib=PhotoCalib(float(calibration)),
        visit_info=VisitInfo(band="g", physical_filter="g"), mask_planes=planes, chunks=chunks,
    )
    truth = Table({
        "id": np.arange(1, n_src + 1, dtype=np.int64),
        "x": xs, "y": ys, "flux": fluxes,
        "flux_err": np.full(n_src, TRUTH_FLUX_ERR),
        "snr": fluxes / TRUTH_FLUX_ERR,
        "footprint_radius": np.full(n_src, 5.0 * psf_size),
    })
    return exposure, truth
