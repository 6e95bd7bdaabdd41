"""The dipole fit (DMTN-007): a positive and a negative PSF fitted jointly to three images.

A footprint holding both a positive and a negative peak is modelled as a positive lobe
``F P(x - x+)`` and a negative lobe ``F P(x - x-)`` of the same flux. The model is fitted at
once to the difference (``F (P+ - P-)``), to the science image (``F P+``, the positive image)
and to the matched template (``F P-``, the negative image), the last two weighted by
``rel_weight``; each residual is scaled by the pixel's sigma. A linear background is first
fitted to the science and template pixels around the footprint (within its box grown by 3 px)
and subtracted. The lobes start at the peaks and may move ``max_separation`` PSF sigmas.

Classification (LSST's): signal-to-noise above ``min_sn`` and each lobe's share of the total
flux below ``max_flux_ratio`` (with equal lobe fluxes the share is 1/2, so the S/N decides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from ..box import Box
from .measure import Planes

__all__ = ["DipoleResult", "fit_dipole"]

_NAN = float("nan")


@dataclass(frozen=True, slots=True)
class DipoleResult:
    """Outcome of :func:`fit_dipole` (NaN values and ``flag`` on failure)."""

    flux: float = _NAN
    flux_err: float = _NAN
    pos_x: float = _NAN
    pos_y: float = _NAN
    pos_x_err: float = _NAN
    pos_y_err: float = _NAN
    neg_x: float = _NAN
    neg_y: float = _NAN
    neg_x_err: float = _NAN
    neg_y_err: float = _NAN
    x: float = _NAN
    y: float = _NAN
    x_err: float = _NAN
    y_err: float = _NAN
    orientation: float = _NAN
    separation: float = _NAN
    chi2dof: float = _NAN
    n_data: int = 0
    signal_to_noise: float = _NAN
    classification: bool = False
    attempted: bool = False
    flag: bool = True
    flag_edge: bool = False


class _LobeRenderer:
    """Render the PSF at sub-pixel positions by spline-shifting one kernel image."""

    def __init__(self, psf: Any, x: float, y: float) -> None:
        size = psf.default_size()
        self.kernel = np.asarray(psf.kernel_image(x, y, size=size), float)
        self.half = size // 2
        self.coeffs = ndimage.spline_filter(self.kernel, order=3)

    def render(self, xc: float, yc: float, box: Box) -> np.ndarray:
        ix, iy = int(np.floor(xc + 0.5)), int(np.floor(yc + 0.5))
        shifted = ndimage.shift(self.coeffs, (yc - iy, xc - ix), order=3, mode="constant",
                                prefilter=False)
        out = np.zeros(box.shape)
        stamp = Box(ix - self.half, iy - self.half, shifted.shape[1], shifted.shape[0])
        overlap = box.intersection(stamp)
        if not overlap.is_empty:
            out[overlap.slices(origin=(box.x0, box.y0))] = shifted[
                overlap.slices(origin=(stamp.x0, stamp.y0))]
        return out


def _plane_background(planes: Planes, box: Box, footprint_box: Box,
                      footprint: np.ndarray, bad_bits: int) -> np.ndarray:
    """Linear background fitted outside the footprint within ``box``, evaluated on ``box``."""
    overlap, sl = planes.window(box)
    out = np.zeros(box.shape)
    if overlap.is_empty:
        return out
    data = planes.image[sl].astype(float)
    use = np.isfinite(data) & ((planes.mask[sl] & bad_bits) == 0)
    inside = np.zeros(overlap.shape, bool)
    fo = overlap.intersection(footprint_box)
    if not fo.is_empty:
        inside[fo.slices(origin=(overlap.x0, overlap.y0))] = footprint[
            fo.slices(origin=(footprint_box.x0, footprint_box.y0))]
    use &= ~inside
    yy, xx = np.mgrid[overlap.y0:overlap.y1, overlap.x0:overlap.x1]
    if use.sum() < 10:
        return out
    design = np.stack([np.ones(use.sum()), xx[use] - box.x0, yy[use] - box.y0], axis=1)
    coef, *_ = np.linalg.lstsq(design, data[use], rcond=None)
    gy, gx = np.mgrid[0:box.height, 0:box.width]
    return coef[0] + coef[1] * gx + coef[2] * gy


def _stack(planes: Planes, box: Box, bad_bits: int) -> tuple[np.ndarray, np.ndarray,
                                                             np.ndarray]:
    """Image, sigma and good-pixel arrays of ``planes`` on ``box`` (outside: not good)."""
    image = np.zeros(box.shape)
    sigma = np.ones(box.shape)
    good = np.zeros(box.shape, bool)
    overlap, sl = planes.window(box)
    if overlap.is_empty:
        return image, sigma, good
    osl = overlap.slices(origin=(box.x0, box.y0))
    data = planes.image[sl].astype(float)
    var = planes.variance[sl].astype(float)
    ok = np.isfinite(data) & np.isfinite(var) & (var > 0) & ((planes.mask[sl] & bad_bits) == 0)
    image[osl] = np.where(ok, data, 0.0)
    sigma[osl] = np.sqrt(np.where(ok, var, 1.0))
    good[osl] = ok
    return image, sigma, good


def fit_dipole(difference: Planes, science: Planes | None, template: Planes | None, psf: Any,
               footprint: np.ndarray, footprint_box: Box, pos_peak: tuple[float, float],
               neg_peak: tuple[float, float], *, psf_sigma: float, bad_bits: int,
               max_separation: float = 5.0, rel_weight: float = 0.5,
               min_sn: float = 5.0 * 2**0.5, max_flux_ratio: float = 0.65) -> DipoleResult:
    """Fit a dipole to one footprint.

    Parameters
    ----------
    difference, science, template : Planes
        The difference and (optional) the science image and matched template.
    psf : daskdiff.psf.Psf
        The difference's PSF.
    footprint : numpy.ndarray of bool
        The footprint's pixels within ``footprint_box``.
    footprint_box : Box
        Its parent-frame box (the fit region).
    pos_peak, neg_peak : (float, float)
        ``(x, y)`` of the positive and negative peaks (the starting lobe positions).
    psf_sigma : float
        PSF sigma (pixels), the unit of ``max_separation``.
    bad_bits : int
        Mask bits of pixels left out of the fit.
    max_separation, rel_weight, min_sn, max_flux_ratio : float, optional
        See :class:`~daskdiff.detect.config.DetectAndMeasureConfig`.

    Returns
    -------
    DipoleResult
        The fitted lobes, classification and diagnostics.
    """
    box = footprint_box
    renderer = _LobeRenderer(psf, 0.5 * (pos_peak[0] + neg_peak[0]),
                             0.5 * (pos_peak[1] + neg_peak[1]))
    d_img, d_sig, d_good = _stack(difference, box, bad_bits)
    edge = not d_good.all()
    terms = [(d_img, d_sig, d_good, 1.0, "diff")]
    grown = box.grow(3)
    for planes, kind in ((science, "pos"), (template, "neg")):
        if planes is None or rel_weight <= 0:
            continue
        img, sig, good = _stack(planes, box, bad_bits)
        img = img - _plane_background(planes, grown, box, footprint, bad_bits)[3:-3, 3:-3]
        terms.append((img, sig, good, rel_weight, kind))
    n_data = int(sum(t[2].sum() for t in terms))
    if d_good.sum() < 6:
        return DipoleResult(attempted=True, flag=True, flag_edge=edge)

    # positions are fitted as offsets from the peaks (finite-difference steps are relative)
    origin = np.array([0.0, *pos_peak, *neg_peak], float)

    def models(q: np.ndarray) -> dict[str, np.ndarray]:
        flux, xp, yp, xn, yn = q + origin
        pos = flux * renderer.render(xp, yp, box)
        neg = flux * renderer.render(xn, yn, box)
        return {"diff": pos - neg, "pos": pos, "neg": neg}

    def residuals(p: np.ndarray) -> np.ndarray:
        m = models(p)
        parts = [np.sqrt(w) * ((img - m[kind]) / sig)[good]
                 for img, sig, good, w, kind in terms]
        return np.concatenate(parts)

    reach = max_separation * psf_sigma
    # starting flux: the science PSF flux at the positive peak, else a scaled diff amplitude
    unit = renderer.render(pos_peak[0], pos_peak[1], box)
    flux0 = 0.0
    for img, _, good, _, kind in terms:
        if kind == "pos" and good.any():
            flux0 = float((unit * img)[good].sum() / (unit * unit)[good].sum())
    if not flux0 > 1.0:
        flux0 = max(3.0 * float((unit * d_img)[d_good].sum() / (unit * unit)[d_good].sum()), 2.0)
    q0 = np.array([max(flux0, 0.2), 0.0, 0.0, 0.0, 0.0])
    lower = np.array([0.1, -reach, -reach, -reach, -reach])
    upper = np.array([np.inf, reach, reach, reach, reach])
    try:
        fit = optimize.least_squares(residuals, q0, bounds=(lower, upper), x_scale="jac",
                                     xtol=1e-8, ftol=1e-8, max_nfev=250, diff_step=1e-6)
    except (ValueError, np.linalg.LinAlgError):
        return DipoleResult(attempted=True, flag=True, flag_edge=edge, n_data=n_data)
    flux, xp, yp, xn, yn = (float(v) for v in fit.x + origin)
    try:
        cov = np.linalg.inv(fit.jac.T @ fit.jac)
        errs = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        cov = np.full((5, 5), np.nan)
        errs = np.full(5, np.nan)
    chi2 = float(np.sum(fit.fun**2))
    failed = not (fit.success and flux > 1.0 and np.all(np.isfinite(errs)))
    x_err = 0.5 * np.sqrt(max(cov[1, 1] + cov[3, 3] + 2 * cov[1, 3], 0.0))
    y_err = 0.5 * np.sqrt(max(cov[2, 2] + cov[4, 4] + 2 * cov[2, 4], 0.0))
    sn_terms = []
    for _img, sig, good, _, kind in terms:
        if kind in ("pos", "neg") and good.any():
            sn_terms.append(flux / np.sqrt(float((sig[good] ** 2).sum())))
    if not sn_terms:
        sn_terms = [flux / np.sqrt(float((d_sig[d_good] ** 2).sum()))]
    sn = float(np.sqrt(np.sum(np.square(sn_terms))))
    ratio = abs(flux) / (2.0 * abs(flux)) if flux else np.inf
    classified = (not failed) and sn > min_sn and ratio < max_flux_ratio and abs(flux) >= 1.0
    return DipoleResult(
        flux=flux, flux_err=float(errs[0]),
        pos_x=xp, pos_y=yp, pos_x_err=float(errs[1]), pos_y_err=float(errs[2]),
        neg_x=xn, neg_y=yn, neg_x_err=float(errs[3]), neg_y_err=float(errs[4]),
        x=0.5 * (xp + xn), y=0.5 * (yp + yn), x_err=float(x_err), y_err=float(y_err),
        orientation=float(np.arctan2(yp - yn, xp - xn)),
        separation=float(np.hypot(xp - xn, yp - yn)),
        chi2dof=chi2 / max(n_data - 5, 1), n_data=n_data, signal_to_noise=sn,
        classification=bool(classified), attempted=True, flag=bool(failed), flag_edge=edge,
    )
