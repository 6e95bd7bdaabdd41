"""PSFs for images that come without one (the one-shot ``daskdiff subtract``).

Subtraction needs PSF *sizes* (the basis sigmas, the mode, the QA figures), not a perfect
model. :func:`ensure_psf` tries, in order: the exposure's own PSF; a spatially varying
:func:`~daskdiff.psf.estimate_psf`; a constant one from fewer, fainter stars; and, for fields
with too few stars for a pixel model (a galaxy cluster), an elliptical Gaussian with the
adaptive moments of the most compact bright sources (the stellar locus is the small-size end
of the size distribution).
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr

from ..errors import AlgorithmError
from ..exposure import exposure_box, get_mask_planes, get_psf, replace_metadata
from ..psf import GaussianPsf, estimate_psf
from ..psf.measure import adaptive_moments
from .sources import detect_sources

__all__ = ["compact_source_psf", "ensure_psf", "ensure_psfs"]

_BAD = ("NO_DATA", "BAD", "SAT", "EDGE", "CR")


def compact_source_psf(exposure: xr.Dataset, *, n_bright: int = 60, half: int = 12,
                       quantile: float = 0.2) -> GaussianPsf:
    """Return a Gaussian PSF with the adaptive moments of the most compact bright sources.

    Raises
    ------
    AlgorithmError
        Fewer than 3 measurable sources.
    """
    image, variance, mask = dask.compute(exposure["image"].data, exposure["variance"].data,
                                         exposure["mask"].data)
    image, variance = np.asarray(image, np.float64), np.asarray(variance, np.float64)
    planes = get_mask_planes(exposure)
    bad = (np.asarray(mask) & planes.bitmask(*[p for p in _BAD if p in planes])) != 0
    box = exposure_box(exposure)
    found = detect_sources(image, variance, bad, origin=(box.x0, box.y0), psf_sigma=1.5,
                           threshold=10.0)
    xs = np.asarray(found["x"]) - box.x0
    ys = np.asarray(found["y"]) - box.y0
    ny, nx = image.shape
    keep = ((xs > half) & (xs < nx - half - 1) & (ys > half) & (ys < ny - half - 1)
            & ~np.asarray(found["blended"]))
    xs, ys = np.round(xs[keep]).astype(int), np.round(ys[keep]).astype(int)
    peaks = image[ys, xs]
    order = np.argsort(-peaks)
    moments = []
    for k in order[: 3 * n_bright]:
        sl = (slice(ys[k] - half, ys[k] + half + 1), slice(xs[k] - half, xs[k] + half + 1))
        if bad[sl].any():
            continue
        stamp = image[sl] - np.median(np.concatenate([image[sl][0], image[sl][-1]]))
        try:
            ixx, iyy, ixy = adaptive_moments(stamp, guess_sigma=2.0)
        except (AlgorithmError, ValueError):  # non-converging moments: skip the source
            continue
        if np.isfinite([ixx, iyy, ixy]).all() and ixx > 0.1 and iyy > 0.1:
            moments.append((ixx, iyy, ixy))
        if len(moments) >= n_bright:
            break
    if len(moments) < 3:
        raise AlgorithmError(f"cannot estimate a PSF: only {len(moments)} compact bright "
                             "sources could be measured; attach a PSF model to the exposure")
    moments_arr = np.array(moments)
    size = (moments_arr[:, 0] * moments_arr[:, 1] - moments_arr[:, 2] ** 2) ** 0.25
    cut = np.quantile(size, quantile)
    locus = moments_arr[size <= cut * 1.1]
    ixx, iyy, ixy = np.median(locus, axis=0)
    sigma = float((ixx * iyy - ixy**2) ** 0.25)
    # pixelisation adds 1/12 px^2; GaussianPsf models the profile before the pixel response
    sigma = float(np.sqrt(max(sigma**2 - 1.0 / 12.0, 0.25)))
    return GaussianPsf(sigma=sigma)


def _methods() -> list[tuple[str, Any]]:
    return [("a spatially varying PSF", estimate_psf),
            ("a constant PSF", lambda exp: estimate_psf(exp, degree=0, min_snr=20.0,
                                                       min_stars=3)),
            ("a Gaussian PSF from the most compact sources", compact_source_psf)]


def ensure_psfs(*exposures: xr.Dataset, log: Any = None) -> list[xr.Dataset]:
    """Return the exposures with PSF models, estimating the missing ones.

    The exposures without a PSF get models from the *same* estimator (the first that works
    for all of them), so that their sizes are comparable (the subtraction mode and basis
    depend on the ratio of the PSF sizes).

    Raises
    ------
    AlgorithmError
        If no estimator works for every exposure.
    """
    say = log or (lambda message: None)
    missing = [i for i, exp in enumerate(exposures) if get_psf(exp) is None]
    result = list(exposures)
    if not missing:
        return result
    errors = []
    for what, method in _methods():
        try:
            psfs = [method(exposures[i]) for i in missing]
        except AlgorithmError as error:
            errors.append(f"{what}: {str(error).split(';')[0]}")
            say(f"could not estimate {what}: {str(error).split(';')[0]}")
            continue
        for i, psf in zip(missing, psfs, strict=True):
            result[i] = replace_metadata(exposures[i], psf=psf)
            say(f"image {i + 1}: {what}, FWHM {psf.fwhm():.2f} px")
        return result
    raise AlgorithmError("no PSF could be estimated: " + "; ".join(errors)
                         + "; attach PSF models to the exposures")


def ensure_psf(exposure: xr.Dataset, *, log: Any = None) -> xr.Dataset:
    """Return the exposure with a PSF model, estimating one when it has none."""
    return ensure_psfs(exposure, log=log)[0]
