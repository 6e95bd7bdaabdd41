"""Alard-Lupton PSF-matched subtraction with decorrelation (the ``subtract`` stage).

:func:`subtract` fits a spatially varying matching kernel on kernel sources
(:mod:`~daskdiff.subtract.sources`, :mod:`~daskdiff.subtract.fit`), convolves the template (or
the science image) with it tile-parallel (:mod:`~daskdiff.subtract.convolve`), subtracts, and
decorrelates the difference (:mod:`~daskdiff.subtract.decorrelate`). The kernel fit is a small
global step computed eagerly; every per-pixel plane of the result stays lazy (dask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.table import Table

from ..errors import AlgorithmError, InputError, NoWorkError
from ..exposure import (
    cutout,
    exposure_box,
    get_mask_planes,
    get_photo_calib,
    get_visit_info,
    make_exposure,
    require_psf,
)
from .basis import make_basis, plan_basis
from .config import AlardLuptonConfig
from .convolve import convolve_exposure, convolve_plane
from .decorrelate import decorrelation_kernel
from .fit import build_systems, fit_kernel
from .kernel import KernelSolution
from .sources import select_kernel_sources
from .variance import clipped_mean, variance_scale_factor

__all__ = ["AlardLuptonConfig", "KernelSolution", "PsfSize", "SubtractionResult", "choose_mode",
           "subtract"]

_STATS_BAD = ("INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE")
_SCALE_BAD = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP", "EDGE")


@dataclass(frozen=True)
class SubtractionResult:
    """The products of a subtraction.

    Attributes
    ----------
    difference : xarray.Dataset
        The (decorrelated) difference, with the science image's metadata.
    matched : xarray.Dataset
        The convolved image on the science box (matched template or matched science).
    kernel : KernelSolution
        The spatially varying matching kernel.
    kernel_sources : astropy.table.Table
        The kernel sources, with a ``used`` column (kept by the clipping).
    score : xarray.Dataset or None
        The score image (``None`` for Alard-Lupton).
    metadata : dict
        QA figures (JSON-able).
    """

    difference: xr.Dataset
    matched: xr.Dataset
    kernel: KernelSolution
    kernel_sources: Table
    score: xr.Dataset | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _bits(exposure: xr.Dataset, names: tuple[str, ...]) -> np.uint32:
    planes = get_mask_planes(exposure)
    return np.uint32(planes.bitmask(*[n for n in names if n in planes]))


@dataclass(frozen=True)
class PsfSize:
    """Second moments (px^2) of a PSF at its average position, and derived sizes."""

    ixx: float
    iyy: float
    ixy: float
    fwhm: float

    @classmethod
    def of(cls, psf: Any) -> PsfSize:
        """Measure a PSF model at its centre."""
        ixx, iyy, ixy = psf.moments()
        if not all(np.isfinite((ixx, iyy, ixy))) or ixx <= 0 or iyy <= 0:
            raise InputError(f"the PSF model {psf!r} has undefined second moments at its "
                             "centre; re-estimate it (daskdiff.psf.estimate_psf)")
        return cls(float(ixx), float(iyy), float(ixy), float(psf.fwhm()))

    @property
    def sigma(self) -> float:
        """Determinant radius ``(ixx iyy - ixy^2)^(1/4)``."""
        return float((self.ixx * self.iyy - self.ixy**2) ** 0.25)


def choose_mode(science: PsfSize, template: PsfSize, mode: str) -> str:
    """Resolve ``auto``: convolve the template unless it is wider on both axes."""
    if mode != "auto":
        return mode
    narrower = template.ixx <= science.ixx or template.iyy <= science.iyy
    return "convolveTemplate" if narrower else "convolveScience"


def _check_inputs(science: xr.Dataset, template: xr.Dataset) -> None:
    sci_info, tmpl_info = get_visit_info(science), get_visit_info(template)
    sb = getattr(sci_info, "band", "") or ""
    tb = getattr(tmpl_info, "band", "") or ""
    if sb and tb and sb != tb:
        raise InputError(f"the science image is band {sb!r} but the template is band {tb!r}; "
                         "subtract a template of the same band")
    if not exposure_box(science).overlaps(exposure_box(template)):
        raise NoWorkError(f"the template box {exposure_box(template)} does not overlap the "
                          f"science box {exposure_box(science)}; warp the template onto the "
                          "science grid first (daskdiff.template.get_template)",
                          metadata={"template_coverage": 0.0})


def _load(exposure: xr.Dataset) -> dict[str, np.ndarray]:
    image, variance, mask = dask.compute(exposure["image"].data, exposure["variance"].data,
                                         exposure["mask"].data)
    box = exposure_box(exposure)
    return {"image": np.asarray(image), "variance": np.asarray(variance),
            "mask": np.asarray(mask), "origin": (box.x0, box.y0)}


def _from_loaded(exposure: xr.Dataset, arrays: dict[str, np.ndarray]) -> xr.Dataset:
    """Rebuild an exposure on its loaded planes, keeping its tiling (no recomputation)."""
    data = exposure["image"].data
    chunks = data.chunks if isinstance(data, da.Array) else None
    planes = {name: (da.from_array(arrays[name], chunks=chunks, name=False) if chunks
                     else arrays[name]) for name in ("image", "variance", "mask")}
    box = exposure_box(exposure)
    return make_exposure(planes["image"], variance=planes["variance"], mask=planes["mask"],
                         x0=box.x0, y0=box.y0, chunks=None,
                         **{k: exposure.attrs.get(k) for k in (
                             "wcs", "psf", "photo_calib", "visit_info", "mask_planes")})


def _tiled_like(exposure: xr.Dataset, reference: xr.Dataset) -> xr.Dataset:
    """Return the exposure with the tiling of ``reference`` (same box), when it is lazy."""
    chunks = getattr(reference["image"].data, "chunks", None)
    if chunks is None or not isinstance(exposure["image"].data, da.Array):
        return exposure
    result = exposure.copy(deep=False)
    for name in ("image", "variance", "mask"):
        result[name] = (("y", "x"), exposure[name].data.rechunk(chunks))
    result.attrs = dict(exposure.attrs)
    return result


def _coverage(science: dict, template_on_science: xr.Dataset, no_data: np.uint32) -> float:
    tmask = np.asarray(template_on_science["mask"].values)
    timage = np.asarray(template_on_science["image"].values)
    good = ((science["mask"] & no_data) == 0) & ((tmask & no_data) == 0) & np.isfinite(timage)
    good &= np.isfinite(science["image"])
    return float(good.mean())


def _scaled(exposure: xr.Dataset, factor: float) -> xr.Dataset:
    if factor == 1.0:
        return exposure
    result = exposure.copy(deep=False)
    result["variance"] = (exposure["variance"] * np.float32(factor)).astype(np.float32)
    result.attrs = dict(exposure.attrs)
    return result


def subtract(science: xr.Dataset, template: xr.Dataset, *,
             config: AlardLuptonConfig | None = None, sources: Table | None = None
             ) -> SubtractionResult:
    """PSF-match and subtract a template from a science exposure (Alard-Lupton).

    Parameters
    ----------
    science : xarray.Dataset
        The science exposure (needs a PSF).
    template : xarray.Dataset
        The template on the science pixel grid, usually grown by a border (needs a PSF).
    config : AlardLuptonConfig, optional
        Stage configuration; defaults if omitted.
    sources : astropy.table.Table, optional
        Kernel-source candidates (``x``, ``y``, optionally ``flux``/``flux_err``); detected on
        the science image if omitted.

    Returns
    -------
    SubtractionResult
        Lazy difference and matched image, the kernel, kernel sources and QA metadata.

    Raises
    ------
    NoWorkError
        Template coverage below ``required_template_fraction`` (or a failed fit below
        ``min_template_fraction_for_expected_success``), or no overlap.
    AlgorithmError
        Too few kernel sources, a failed fit, PSFs too different for the largest kernel.
    InputError
        Missing PSFs, different bands.
    """
    config = config or AlardLuptonConfig()
    _check_inputs(science, template)
    sci_psf = require_psf(science, what="science exposure")
    tmpl_psf = require_psf(template, what="template")
    sbox = exposure_box(science)
    no_data = _bits(science, ("NO_DATA",))
    sci = _load(science)
    science = _from_loaded(science, sci)
    tmpl = _load(template)
    template = _from_loaded(template, tmpl)
    tmpl_on_sci = cutout(template, sbox, mode="pad")
    coverage = _coverage(sci, tmpl_on_sci, no_data)
    metadata: dict[str, Any] = {"template_coverage": coverage}
    if coverage < config.required_template_fraction:
        raise NoWorkError(f"the template covers {coverage:.1%} of the science image, below "
                          f"required_template_fraction = {config.required_template_fraction}",
                          metadata=metadata)
    try:
        return _subtract(science, template, sci, tmpl, sci_psf, tmpl_psf, config, sources,
                         metadata)
    except AlgorithmError as error:
        if coverage < config.min_template_fraction_for_expected_success:
            raise NoWorkError(
                f"the kernel fit failed with only {coverage:.1%} template coverage (below "
                f"{config.min_template_fraction_for_expected_success}): {error}",
                metadata={**metadata, **error.metadata}) from error
        raise


def _subtract(science, template, sci, tmpl, sci_psf, tmpl_psf, config, sources, metadata):
    sbox, tbox = exposure_box(science), exposure_box(template)
    scale_bad_s, scale_bad_t = _bits(science, _SCALE_BAD), _bits(template, _SCALE_BAD)
    factors = {"science": 1.0, "template": 1.0}
    if config.do_scale_variance:
        for name, arrays, bits in (("science", sci, scale_bad_s), ("template", tmpl, scale_bad_t)):
            factors[name] = variance_scale_factor(
                arrays["image"], arrays["variance"], (arrays["mask"] & bits) != 0,
                limit=config.scale_variance_limit, what=name)
            arrays["variance"] = arrays["variance"] * np.float32(factors[name])
    science = _scaled(science, factors["science"])
    template = _scaled(template, factors["template"])
    metadata.update(scale_science_variance_factor=factors["science"],
                    scale_template_variance_factor=factors["template"])

    sci_size, tmpl_size = PsfSize.of(sci_psf), PsfSize.of(tmpl_psf)
    mode = choose_mode(sci_size, tmpl_size, config.mode)
    sci_sigma, tmpl_sigma = sci_size.sigma, tmpl_size.sigma
    if mode == "convolveTemplate":
        target, reference, target_exp, reference_exp = sci, tmpl, science, template
        plan = plan_basis(sci_sigma, tmpl_sigma, config=config)
    else:
        target, reference, target_exp, reference_exp = tmpl, sci, template, science
        plan = plan_basis(tmpl_sigma, sci_sigma, config=config)
    basis = make_basis(plan, config=config)
    half = plan.size // 2
    for arrays, exp in ((sci, science), (tmpl, template)):
        arrays["bad"] = ((arrays["mask"] & _bits(exp, config.exclude_mask_planes)) != 0) | \
            ~np.isfinite(arrays["image"])
    sci["cosmic"] = (sci["mask"] & _bits(science, ("CR",))) != 0
    region = sbox.intersection(tbox.grow(-half))
    kernel_sources = select_kernel_sources(
        sci, tmpl, box=region, psf_sigma=sci_sigma, kernel_size=plan.size, config=config,
        catalog=sources)
    systems = build_systems(target, reference, np.asarray(kernel_sources["x"]),
                            np.asarray(kernel_sources["y"]), basis,
                            fit_background=config.fit_for_background)
    convolved = "template" if mode == "convolveTemplate" else "science"
    images = basis if isinstance(basis, np.ndarray) else basis.images()
    solution, used = fit_kernel(systems, images, sbox, config=config, convolved=convolved)
    kernel_sources["used"] = used
    kappa = solution.kernel_sum

    matched_full = convolve_exposure(reference_exp, solution,
                                     scale=kappa if mode == "convolveScience" else 1.0)
    unconv = _tiled_like(cutout(target_exp, sbox, mode="pad"), science)
    matched = _tiled_like(cutout(matched_full, sbox, mode="pad"), science)
    if mode == "convolveTemplate":
        diff_image = unconv["image"].data - matched["image"].data
        diff_var = unconv["variance"].data + matched["variance"].data
        psf, other = sci_psf, template
        factor = 1.0
    else:
        diff_image = matched["image"].data - unconv["image"].data / np.float32(kappa)
        diff_var = matched["variance"].data + unconv["variance"].data / np.float32(kappa**2)
        psf, other = tmpl_psf, science
        factor = kappa
    if config.subtract_background:
        ys, xs = np.mgrid[sbox.y0:sbox.y1, sbox.x0:sbox.x1]
        background = solution.background_at(xs, ys)
        sign = 1.0 if mode == "convolveTemplate" else -1.0 / kappa
        diff_image = diff_image - da.from_array((sign * background).astype(np.float32),
                                                chunks=diff_image.chunks)
    mask = matched["mask"].data | unconv["mask"].data

    decor_meta: dict[str, Any] = {}
    if config.do_decorrelation:
        stats_bad_t = _bits(target_exp, _STATS_BAD)
        stats_bad_r = _bits(reference_exp, _STATS_BAD)
        v1 = clipped_mean(target["variance"][(target["mask"] & stats_bad_t) == 0])
        v2 = clipped_mean(reference["variance"][(reference["mask"] & stats_bad_r) == 0])
        cx, cy = sbox.center
        dk = decorrelation_kernel(solution.kernel_image(cx, cy), v1, v2)
        dhalf = dk.kernel.shape[0] // 2
        diff_image = convolve_plane(diff_image, dk.kernel[None], None, half=dhalf)
        ref_on_box = _tiled_like(cutout(reference_exp, sbox, mode="pad"), science)["variance"].data
        diff_var = (unconv["variance"].data * np.float32(dk.weight_unconvolved)
                    + ref_on_box * np.float32(dk.weight_convolved))
        if mode == "convolveScience":
            diff_var = diff_var / np.float32(kappa**2)
        decor_meta = {"decorrelation_var_unconvolved": v1, "decorrelation_var_convolved": v2,
                      "decorrelation_weights": [dk.weight_unconvolved, dk.weight_convolved]}
    attrs = {k: science.attrs.get(k) for k in ("wcs", "photo_calib", "visit_info",
                                                "mask_planes")}
    difference = make_exposure(diff_image, variance=diff_var, mask=mask, x0=sbox.x0,
                               y0=sbox.y0, psf=psf, chunks=None, **attrs)
    matched = make_exposure(matched["image"].data, variance=matched["variance"].data,
                            mask=matched["mask"].data, x0=sbox.x0, y0=sbox.y0,
                            psf=sci_psf if mode == "convolveTemplate" else tmpl_psf,
                            chunks=None, **{**attrs, "photo_calib": get_photo_calib(
                                science if mode == "convolveTemplate" else other)})
    metadata.update(
        mode=mode, convolved_exposure=convolved.capitalize(), basis_mode=plan.mode,
        basis_sigmas=list(plan.sigmas),
        science_psf_fwhm=sci_size.fwhm, template_psf_fwhm=tmpl_size.fwhm,
        science_psf_sigma=sci_sigma, template_psf_sigma=tmpl_sigma,
        n_kernel_sources=len(kernel_sources), n_kernel_sources_used=int(used.sum()),
        photometric_scale=kappa, flux_scale_factor=factor, **solution.report(), **decor_meta,
        **_limiting_magnitudes(science, template, sci, tmpl, sci_size, tmpl_size))
    return SubtractionResult(difference=difference, matched=matched, kernel=solution,
                             kernel_sources=kernel_sources, score=None, metadata=metadata)


def _limiting_magnitudes(science, template, sci, tmpl, sci_size, tmpl_size) -> dict[str, float]:
    """5-sigma point-source limits: zp - 2.5 log10(5 sigma sqrt(A)), A = 4 pi sqrt(Ixx Iyy)."""
    out = {}
    flux5 = []
    for name, exp, arrays, size in (("science", science, sci, sci_size),
                                    ("template", template, tmpl, tmpl_size)):
        area = 4.0 * np.pi * np.sqrt(size.ixx * size.iyy)
        sigma = np.sqrt(clipped_mean(arrays["variance"][
            (arrays["mask"] & _bits(exp, _STATS_BAD)) == 0]))
        calib = get_photo_calib(exp)
        f5 = 5.0 * sigma * np.sqrt(area) * calib.njy_per_count
        flux5.append(f5)
        out[f"{name}_limiting_magnitude"] = float(31.4 - 2.5 * np.log10(f5))
    out["difference_limiting_magnitude"] = float(31.4 - 2.5 * np.log10(np.hypot(*flux5)))
    return out
