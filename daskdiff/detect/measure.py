"""Measurements on in-memory planes: centroid, PSF and aperture fluxes, shape, pixel flags.

All positions are parent-frame pixel coordinates (integer values at pixel centres). A
:class:`Planes` bundles the arrays of one exposure with its origin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sep

from ..box import Box
from ..psf.base import stamp_box
from ..psf.measure import adaptive_iterate

__all__ = [
    "Centroid",
    "Planes",
    "PsfFlux",
    "PsfImages",
    "aperture_fluxes",
    "gaussian_centroid",
    "mask_flags",
    "psf_flux",
    "second_moments",
]


@dataclass(frozen=True)
class Planes:
    """Image, variance and mask arrays of an exposure, with the parent frame of ``[0, 0]``."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    x0: int
    y0: int

    @property
    def box(self) -> Box:
        """The parent-frame box of the arrays."""
        return Box(self.x0, self.y0, self.image.shape[1], self.image.shape[0])

    def window(self, box: Box) -> tuple[Box, tuple[slice, slice]]:
        """Return the overlap of ``box`` with the arrays and its array slices."""
        overlap = self.box.intersection(box)
        return overlap, overlap.slices(origin=(self.x0, self.y0))


@dataclass(frozen=True, slots=True)
class Centroid:
    """A centroid, its 1-sigma errors and a failure flag (then ``x, y`` is the peak)."""

    x: float
    y: float
    x_err: float
    y_err: float
    flag: bool


@dataclass(frozen=True, slots=True)
class PsfFlux:
    """A PSF flux (linear fit of the PSF model at a fixed position) and its diagnostics."""

    flux: float
    flux_err: float
    area: float
    chi2: float
    npixels: int
    flag: bool
    flag_edge: bool
    flag_no_good_pixels: bool


def gaussian_centroid(planes: Planes, x: float, y: float, *, sigma: float, sign: float = 1.0,
                      bad_bits: int = 0, max_shift: float = 5.0,
                      max_iter: int = 20) -> Centroid:
    """Return the Gaussian-windowed centroid of a source near ``(x, y)``.

    The centre ``c`` of a round Gaussian window of ``sigma`` (the PSF's) is iterated to the
    windowed centroid of the (sign-corrected) image; the fixed point is the centre of any
    point-symmetric profile. With window ``sigma`` equal to the profile's the windowed
    centroid moves half as far as the window, so each step is doubled (converging in one or two
    steps for a PSF). The error propagates the pixel variance through the windowed centroid and
    the fixed point: ``err = sqrt(sum W^2 (x - c)^2 V) / sum W I / (1 - beta)`` with
    ``beta = 1/2``.

    Parameters
    ----------
    planes : Planes
        The arrays.
    x, y : float
        Starting position (the detection peak).
    sigma : float
        Window sigma (pixels), the PSF's.
    sign : float, optional
        -1 for a negative source.
    bad_bits : int, optional
        Mask bits of pixels to leave out.
    max_shift : float, optional
        A centroid further than this from the start is a failure (LSST's maxDistToPeak).
    max_iter : int, optional
        Iteration limit.

    Returns
    -------
    Centroid
        The centroid (the start and ``flag=True`` on failure).
    """
    half = int(np.ceil(4 * sigma)) + int(np.ceil(max_shift))
    box = Box(round(x) - half, round(y) - half, 2 * half + 1, 2 * half + 1)
    overlap, sl = planes.window(box)
    failed = Centroid(float(x), float(y), float("nan"), float("nan"), True)
    if overlap.is_empty:
        return failed
    data = sign * planes.image[sl].astype(float)
    var = planes.variance[sl].astype(float)
    good = np.isfinite(data) & np.isfinite(var)
    if bad_bits:
        good &= (planes.mask[sl] & bad_bits) == 0
    data = np.where(good, data, 0.0)
    var = np.where(good, var, 0.0)
    gx = np.arange(overlap.x0, overlap.x1, dtype=float)[None, :]
    gy = np.arange(overlap.y0, overlap.y1, dtype=float)[:, None]
    cx, cy = float(x), float(y)
    inv = 0.5 / sigma**2
    for _ in range(max_iter):
        w = np.exp(-inv * (gx - cx) ** 2) * np.exp(-inv * (gy - cy) ** 2)
        norm = float((w * data).sum())
        if not norm > 0:
            return failed
        mx = float((w * data * gx).sum()) / norm
        my = float((w * data * gy).sum()) / norm
        step_x = float(np.clip(2.0 * (mx - cx), -1.0, 1.0))
        step_y = float(np.clip(2.0 * (my - cy), -1.0, 1.0))
        cx, cy = cx + step_x, cy + step_y
        if (cx - x) ** 2 + (cy - y) ** 2 > max_shift**2:
            return failed
        if abs(step_x) < 1e-5 and abs(step_y) < 1e-5:
            break
    w = np.exp(-inv * (gx - cx) ** 2) * np.exp(-inv * (gy - cy) ** 2)
    norm = float((w * data).sum())
    if not norm > 0:
        return failed
    ex = 2.0 * np.sqrt(float((w * w * (gx - cx) ** 2 * var).sum())) / norm
    ey = 2.0 * np.sqrt(float((w * w * (gy - cy) ** 2 * var).sum())) / norm
    return Centroid(cx, cy, ex, ey, False)


class PsfImages:
    """PSF model images (:meth:`~daskdiff.psf.Psf.image`) drawn once per model and position.

    For a model that does not vary across the image (``is_varying`` false) the image depends
    only on the sub-pixel offset of the position, so positions with the same offset (all the
    integer positions of sky sources, say) share one drawing.
    """

    def __init__(self) -> None:
        self._images: dict[tuple[int, float, float], np.ndarray] = {}

    def image(self, psf: Any, x: float, y: float) -> tuple[np.ndarray, Box]:
        """Return the model image centred on ``(x, y)`` and its parent-frame box."""
        x, y = float(x), float(y)
        if getattr(psf, "is_varying", True) is False:
            size = psf.default_size()
            box = stamp_box(x, y, size)
            key = (id(psf), x - (box.x0 + size // 2), y - (box.y0 + size // 2))
            if key not in self._images:
                self._images[key] = psf.image(x, y)[0]
            return self._images[key], box
        key = (id(psf), x, y)
        if key not in self._images:
            self._images[key], box = psf.image(x, y)
        else:
            box = stamp_box(x, y, self._images[key].shape[0])
        return self._images[key], box


def psf_flux(planes: Planes, psf: Any, x: float, y: float, *, bad_bits: int = 0,
             images: PsfImages | None = None) -> PsfFlux:
    """Return the PSF flux at a fixed position.

    The flux is the unweighted linear fit of the PSF model image ``P`` (centred at ``(x, y)``,
    sum 1) to the pixels: ``F = sum P I / sum P^2`` with ``err = sqrt(sum P^2 V) / sum P^2``
    (LSST's base_PsfFlux); ``area = (sum P)^2 / sum P^2`` is the noise-equivalent area.

    Parameters
    ----------
    planes : Planes
        The arrays.
    psf : daskdiff.psf.Psf
        The PSF model of these planes.
    x, y : float
        Position (parent frame).
    bad_bits : int, optional
        Mask bits of pixels to leave out (NO_DATA, ...).
    images : PsfImages, optional
        A cache of model images shared by several calls.

    Returns
    -------
    PsfFlux
        NaN flux and ``flag`` when no good pixel is covered; ``flag_edge`` when the model
        stamp is clipped by the image edge or by bad pixels.
    """
    model, box = (images or PsfImages()).image(psf, x, y)
    overlap, sl = planes.window(box)
    nan = float("nan")
    if overlap.is_empty:
        return PsfFlux(nan, nan, nan, nan, 0, True, True, True)
    msl = overlap.slices(origin=(box.x0, box.y0))
    p = model[msl]
    data = planes.image[sl]
    var = planes.variance[sl]
    good = np.isfinite(data) & np.isfinite(var)
    if bad_bits:
        good &= (planes.mask[sl] & bad_bits) == 0
    clipped = overlap != box or not good.all()
    if not good.any():
        return PsfFlux(nan, nan, nan, nan, 0, True, True, True)
    p = p[good]
    d = data[good].astype(float)
    v = var[good].astype(float)
    pp = float(np.dot(p, p))
    flux = float(np.dot(p, d)) / pp
    err = float(np.sqrt(np.dot(p * p, v))) / pp
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = float(np.sum(np.where(v > 0, (d - flux * p) ** 2 / v, 0.0)))
    area = float(p.sum()) ** 2 / pp
    return PsfFlux(flux, err, area, chi2, int(p.size), bool(clipped), bool(clipped), False)


def aperture_fluxes(planes: Planes, x: np.ndarray, y: np.ndarray, radius: float, *,
                    bad_bits: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return circular-aperture fluxes, their errors and flags for many positions.

    Exact pixel/circle overlap (SEP); bad pixels are left out and flagged, as are apertures
    crossing the image edge.

    Returns
    -------
    flux, flux_err : numpy.ndarray
        Sums of the image and square roots of the sums of the variance.
    flag : numpy.ndarray of bool
        Apertures that are truncated or contain bad pixels.
    """
    x = np.asarray(x, float)
    if x.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool)
    data = np.ascontiguousarray(planes.image, dtype=np.float32)
    var = np.ascontiguousarray(planes.variance, dtype=np.float32)
    bad = ~np.isfinite(data) | ~np.isfinite(var)
    if bad_bits:
        bad |= (planes.mask & bad_bits) != 0
    if bad.any():
        data = np.where(bad, np.float32(0), data)
        var = np.where(bad, np.float32(0), var)
    bad = np.ascontiguousarray(bad)
    lx = x - planes.x0
    ly = np.asarray(y, float) - planes.y0
    flux, err, flags = sep.sum_circle(data, lx, ly, radius, var=var, mask=bad, subpix=5)
    return (np.asarray(flux, float), np.asarray(err, float),
            np.asarray(flags, int) != 0)


def second_moments(planes: Planes, x: float, y: float, *, sigma: float, sign: float = 1.0,
                   bad_bits: int = 0) -> tuple[float, float, float, bool]:
    """Return adaptive second moments ``(ixx, iyy, ixy, flag)`` of a source (pixels²).

    Gaussian-weighted adaptive moments (the SdssShape / HSM algorithm) on a stamp of
    ``±5 sigma`` around the source, sign-corrected; NaN and ``flag`` when they do not converge.
    """
    half = int(np.ceil(5 * sigma))
    box = Box(round(x) - half, round(y) - half, 2 * half + 1, 2 * half + 1)
    overlap, sl = planes.window(box)
    nan = float("nan")
    if overlap.width < 5 or overlap.height < 5:
        return nan, nan, nan, True
    stamp = sign * planes.image[sl].astype(float)
    good = np.isfinite(stamp)
    if bad_bits:
        good &= (planes.mask[sl] & bad_bits) == 0
    stamp = np.where(good, stamp, 0.0)
    _, _, ixx, iyy, ixy, converged = adaptive_iterate(stamp, float(sigma), 50, 1e-5)
    if not converged or not np.isfinite(ixx + iyy + ixy) or ixx <= 0 or iyy <= 0:
        return nan, nan, nan, True
    return float(ixx), float(iyy), float(ixy), False


def mask_flags(mask: np.ndarray, footprint: np.ndarray, center: np.ndarray,
               planes: dict[str, int]) -> dict[str, bool]:
    """Return pixel flags: for each named bit, set anywhere in the footprint / at the centre.

    Parameters
    ----------
    mask : numpy.ndarray
        Mask values over the footprint's box.
    footprint : numpy.ndarray of bool
        The footprint's pixels in that box.
    center : numpy.ndarray
        Mask values of the 3 x 3 pixels around the centre.
    planes : dict
        Flag name -> bit value (0 for a plane the mask does not have).

    Returns
    -------
    dict
        ``name`` and ``name_center`` for every flag.
    """
    anywhere = int(np.bitwise_or.reduce(mask[footprint])) if footprint.any() else 0
    at_center = int(np.bitwise_or.reduce(center.ravel())) if center.size else 0
    flags: dict[str, bool] = {}
    for name, bits in planes.items():
        flags[name] = bool(anywhere & bits)
        flags[f"{name}_center"] = bool(at_center & bits)
    return flags
