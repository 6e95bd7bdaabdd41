"""Alard-Lupton PSF-matched subtraction with decorrelation (the ``subtract`` stage).

:func:`subtract` fits a spatially varying matching kernel on kernel sources
(:mod:`~daskdiff.subtract.sources`, :mod:`~daskdiff.subtract.fit`), convolves the template (or
the science image) with it tile-parallel (:mod:`~daskdiff.subtract.convolve`), subtracts, and
decorrelates the difference (:mod:`~daskdiff.subtract.decorrelate`). The kernel fit is a small
global step computed eagerly; every per-pixel plane of the result stays lazy (dask).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.table import Table

from .._tiles import wrap
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
from ..masks import MaskPlanes
from ._compiled import bad_pixels, count_covered
from .basis import make_basis, plan_basis
from .config import AlardLuptonConfig
from .convolve import convolve_exposure, convolve_plane
from .decorrelate import decorrelation_kernel
from .fit import build_systems, fit_kernel
from .kernel import KernelSolution
from .photoscale import model_kernel_sum
from .sources import select_kernel_sources
from .variance import clipped_mean, noise_covariance, variance_scale_factor

__all__ = ["AlardLuptonConfig", "KernelSolution", "PsfSize", "SubtractionResult", "choose_mode",
           "subtract"]

_STATS_BAD = ("INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE")
_SCALE_BAD = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP", "EDGE")
_PRESERVE_TEMPLATE = ("NO_DATA", "BAD", "HIGH_VARIANCE")
_RENAME_TEMPLATE = ("SAT", "INJECTED", "INJECTED_CORE")
#: restored undilated on the convolved image (LSST preserveMaskPlanes, DM-55505)
_UNDILATED = ("INJECTED", "INJECTED_CORE", "INJECTED_TEMPLATE", "INJECTED_CORE_TEMPLATE")


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


def _bits(source: xr.Dataset | MaskPlanes, names: tuple[str, ...]) -> np.uint32:
    planes = source if isinstance(source, MaskPlanes) else get_mask_planes(source)
    return np.uint32(planes.bitmask(*[n for n in names if n in set(planes)]))


def _output_planes(science: MaskPlanes, template: MaskPlanes) -> MaskPlanes:
    """Return the science registry plus the ``*_TEMPLATE`` planes the template will fill."""
    renamed = [f"{name}_TEMPLATE" for name in _RENAME_TEMPLATE if name in set(template)]
    if "FAKE" in set(template):
        renamed.append("INJECTED_TEMPLATE")
    extra = [name for name in _PRESERVE_TEMPLATE if name in set(template)]
    if "FAKE" in set(science):
        extra.append("INJECTED")
    return science.with_planes(*renamed, *extra)


_BitMoves = tuple[int, tuple[tuple[int, int], ...]]


def _science_moves(planes: MaskPlanes, out_planes: MaskPlanes) -> _BitMoves:
    """Clear DETECTED and DETECTED_NEGATIVE; legacy FAKE becomes INJECTED (LSST updateMasks).

    Returns ``(keep, moves)`` for :func:`_move_bits`; ``out_planes`` extends the science
    registry, so every other plane keeps its bit.
    """
    keep = 0xFFFFFFFF & ~int(_bits(planes, ("DETECTED", "DETECTED_NEGATIVE", "FAKE")))
    moves = ((planes["FAKE"], out_planes["INJECTED"]),) if "FAKE" in set(planes) else ()
    return keep, moves


def _template_moves(planes: MaskPlanes, out_planes: MaskPlanes) -> _BitMoves:
    """Return the template's mask housekeeping (LSST updateMasks) for :func:`_move_bits`.

    NO_DATA, BAD and HIGH_VARIANCE are kept; SAT, INJECTED, INJECTED_CORE (and legacy FAKE)
    become ``*_TEMPLATE``; every other plane is cleared. Targets are bits of ``out_planes``.
    """
    names = set(planes)
    moves = [(name, name) for name in _PRESERVE_TEMPLATE if name in names]
    moves += [(name, f"{name}_TEMPLATE") for name in _RENAME_TEMPLATE if name in names]
    if "FAKE" in names:
        moves.append(("FAKE", "INJECTED_TEMPLATE"))
    return 0, tuple((planes[source], out_planes[target]) for source, target in moves)


def _move_bits(mask: np.ndarray, keep: int, moves: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Return ``mask & keep`` with each ``(source, target)`` bit copied to its target bit."""
    out = mask & np.uint32(keep)
    present = int(np.bitwise_or.reduce(mask, axis=None)) if mask.size else 0
    for source, target in moves:
        if present & (1 << source):  # shift the bit down to 0, then up to the target
            out |= ((mask >> np.uint32(source)) & np.uint32(1)) << np.uint32(target)
    return out.astype(np.uint32, copy=False)


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


def _aligned_chunks(science: xr.Dataset, box) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Return chunks for an image on ``box`` whose edges fall on the science tile edges.

    The template (usually the science box grown by a border) is then tiled so that its cutout
    on the science box has exactly the science tiling: no sliver tiles, no rechunking.
    """
    chunks = getattr(science["image"].data, "chunks", None)
    if chunks is None:
        return None
    sbox = exposure_box(science)
    out = []
    for sizes, s0, lo, hi in ((chunks[0], sbox.y0, box.y0, box.y1),
                              (chunks[1], sbox.x0, box.x0, box.x1)):
        inner = s0 + np.cumsum(sizes)[:-1]
        edges = [lo, *[int(e) for e in inner if lo < e < hi], hi]
        out.append(tuple(int(b - a) for a, b in itertools.pairwise(edges)))
    return out[0], out[1]


def _from_loaded(exposure: xr.Dataset, arrays: dict[str, np.ndarray],
                 chunks: Any = None, *, housekeeping: _BitMoves,
                 mask_planes: MaskPlanes) -> xr.Dataset:
    """Rebuild an exposure on its loaded planes, keeping its tiling (no recomputation).

    The mask planes are rewritten by ``housekeeping`` (:func:`_move_bits`), per tile when the
    exposure is tiled (no second whole-image mask is held).
    """
    if chunks is None:
        data = exposure["image"].data
        chunks = data.chunks if isinstance(data, da.Array) else None
    keep, moves = housekeeping
    if chunks:
        planes = {name: wrap(arrays[name], chunks) for name in ("image", "variance", "mask")}
        planes["mask"] = planes["mask"].map_blocks(_move_bits, keep, moves, dtype=np.uint32)
    else:
        planes = {"image": arrays["image"], "variance": arrays["variance"],
                  "mask": _move_bits(arrays["mask"], keep, moves)}
    box = exposure_box(exposure)
    attrs = {k: exposure.attrs.get(k) for k in ("wcs", "psf", "photo_calib", "visit_info")}
    return make_exposure(planes["image"], variance=planes["variance"], mask=planes["mask"],
                         x0=box.x0, y0=box.y0, chunks=None, mask_planes=mask_planes, **attrs)


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


def _coverage(science: dict, template: dict, no_data: np.uint32) -> float:
    """Fraction of science pixels where both images are finite and neither is NO_DATA."""
    dx = science["origin"][0] - template["origin"][0]
    dy = science["origin"][1] - template["origin"][1]
    covered = count_covered(science["image"], science["mask"], template["image"],
                            template["mask"], dy, dx, no_data)
    return float(covered / max(science["image"].size, 1))


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
    no_data = _bits(science, ("NO_DATA",))
    sci = _load(science)
    tmpl = _load(template)
    # statistics and kernel-source cuts read the original masks (``planes``); the products
    # carry the housekept ones (LSST updateMasks) in the science registry plus *_TEMPLATE
    sci["planes"], tmpl["planes"] = get_mask_planes(science), get_mask_planes(template)
    coverage = _coverage(sci, tmpl, no_data)
    metadata: dict[str, Any] = {"template_coverage": coverage}
    if coverage < config.required_template_fraction:
        raise NoWorkError(f"the template covers {coverage:.1%} of the science image, below "
                          f"required_template_fraction = {config.required_template_fraction}",
                          metadata=metadata)
    try:
        metadata.update(_scale_variances(sci, tmpl, config))
        out_planes = _output_planes(sci["planes"], tmpl["planes"])
        science = _from_loaded(science, sci, housekeeping=_science_moves(sci["planes"], out_planes),
                               mask_planes=out_planes)
        template = _from_loaded(template, tmpl, _aligned_chunks(science, exposure_box(template)),
                                housekeeping=_template_moves(tmpl["planes"], out_planes),
                                mask_planes=out_planes)
        return _subtract(science, template, sci, tmpl, sci_psf, tmpl_psf, config, sources,
                         metadata)
    except AlgorithmError as error:
        if coverage < config.min_template_fraction_for_expected_success:
            raise NoWorkError(
                f"the kernel fit failed with only {coverage:.1%} template coverage (below "
                f"{config.min_template_fraction_for_expected_success}): {error}",
                metadata={**metadata, **error.metadata}) from error
        raise


def _scale_variances(sci: dict[str, Any], tmpl: dict[str, Any],
                     config: AlardLuptonConfig) -> dict[str, float]:
    """Rescale both loaded variance planes to their pixel noise (reference §2.1 item 4).

    The scaled plane replaces the loaded one before any lazy plane is built on it, so only one
    copy of each variance plane is ever held.
    """
    factors = {"science": 1.0, "template": 1.0}
    if config.do_scale_variance:
        for name, arrays in (("science", sci), ("template", tmpl)):
            factors[name] = variance_scale_factor(
                arrays["image"], arrays["variance"],
                (arrays["mask"], _bits(arrays["planes"], _SCALE_BAD)),
                limit=config.scale_variance_limit, what=name)
            if factors[name] != 1.0:
                arrays["variance"] = arrays["variance"] * np.float32(factors[name])
    return {"scale_science_variance_factor": factors["science"],
            "scale_template_variance_factor": factors["template"]}


def _subtract(science, template, sci, tmpl, sci_psf, tmpl_psf, config, sources, metadata):
    sbox, tbox = exposure_box(science), exposure_box(template)
    sci_size, tmpl_size = PsfSize.of(sci_psf), PsfSize.of(tmpl_psf)
    mode = choose_mode(sci_size, tmpl_size, config.mode)
    sci_sigma, tmpl_sigma = sci_size.sigma, tmpl_size.sigma
    if mode == "convolveTemplate":
        target, reference, target_exp, reference_exp = sci, tmpl, science, template
        target_psf, reference_psf = sci_psf, tmpl_psf
        plan = plan_basis(sci_sigma, tmpl_sigma, config=config)
    else:
        target, reference, target_exp, reference_exp = tmpl, sci, template, science
        target_psf, reference_psf = tmpl_psf, sci_psf
        plan = plan_basis(tmpl_sigma, sci_sigma, config=config)
    basis = make_basis(plan, config=config)
    half = plan.size // 2
    for arrays in (sci, tmpl):
        arrays["bad"] = bad_pixels(arrays["image"], arrays["mask"],
                                   _bits(arrays["planes"], config.exclude_mask_planes))
    sci["cosmic"] = (sci["mask"] & _bits(sci["planes"], ("CR",))) != 0
    region = sbox.intersection(tbox.grow(-half))
    kernel_sources = select_kernel_sources(
        sci, tmpl, box=region, psf_sigma=sci_sigma, kernel_size=plan.size, config=config,
        catalog=sources)
    noise = (noise_covariance(reference["image"], reference["variance"], reference["bad"])
             if config.correct_reference_noise else None)
    systems = build_systems(target, reference, np.asarray(kernel_sources["x"]),
                            np.asarray(kernel_sources["y"]), basis,
                            fit_background=config.fit_for_background, reference_noise=noise)
    convolved = "template" if mode == "convolveTemplate" else "science"
    images = basis if isinstance(basis, np.ndarray) else basis.images()
    solution, used = fit_kernel(systems, images, sbox, config=config, convolved=convolved)
    kernel_sources["used"] = used
    kappa = solution.kernel_sum
    kappa_model = model_kernel_sum(target_psf, reference_psf, basis, position=sbox.center,
                                   config=config)

    matched_full = convolve_exposure(reference_exp, solution,
                                     scale=kappa if mode == "convolveScience" else 1.0,
                                     undilated=int(_bits(reference_exp, _UNDILATED)))
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
        sign = 1.0 if mode == "convolveTemplate" else -1.0 / kappa
        diff_image = diff_image.map_blocks(_minus_background, solution=solution, sign=sign,
                                           origin=(sbox.x0, sbox.y0), dtype=np.float32)
    mask = matched["mask"].data | unconv["mask"].data

    decor_meta: dict[str, Any] = {}
    if config.do_decorrelation:
        v1, v2 = _mean_variance(target, target_exp), _mean_variance(reference, reference_exp)
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
        photometric_scale=kappa / kappa_model, kernel_sum_model=kappa_model,
        flux_scale_factor=factor, **solution.report(), **decor_meta,
        **_limiting_magnitudes(science, template, sci, tmpl, sci_size, tmpl_size))
    return SubtractionResult(difference=difference, matched=matched, kernel=solution,
                             kernel_sources=kernel_sources, score=None, metadata=metadata)


def _minus_background(block: np.ndarray, *, solution: KernelSolution, sign: float,
                      origin: tuple[int, int], block_info: dict | None = None) -> np.ndarray:
    """Subtract ``sign`` times the fitted differential background from one tile."""
    (y0, y1), (x0, x1) = block_info[0]["array-location"] if block_info else (
        (0, block.shape[0]), (0, block.shape[1]))
    xs, ys = np.meshgrid(np.arange(origin[0] + x0, origin[0] + x1),
                         np.arange(origin[1] + y0, origin[1] + y1))
    return block - (sign * solution.background_at(xs, ys)).astype(np.float32)


def _mean_variance(arrays: dict[str, Any], exposure: xr.Dataset) -> float:
    """Return the clipped mean variance of the good pixels (cached in ``arrays``)."""
    if "mean_variance" not in arrays:
        arrays["mean_variance"] = clipped_mean(
            arrays["variance"], good=(arrays["mask"], _bits(arrays["planes"], _STATS_BAD)))
    return arrays["mean_variance"]


def _limiting_magnitudes(science, template, sci, tmpl, sci_size, tmpl_size) -> dict[str, float]:
    """5-sigma point-source limits: zp - 2.5 log10(5 sigma sqrt(A)), A = 4 pi sqrt(Ixx Iyy)."""
    out = {}
    flux5 = []
    for name, exp, arrays, size in (("science", science, sci, sci_size),
                                    ("template", template, tmpl, tmpl_size)):
        area = 4.0 * np.pi * np.sqrt(size.ixx * size.iyy)
        sigma = np.sqrt(_mean_variance(arrays, exp))
        calib = get_photo_calib(exp)
        f5 = 5.0 * sigma * np.sqrt(area) * calib.njy_per_count
        flux5.append(f5)
        out[f"{name}_limiting_magnitude"] = float(31.4 - 2.5 * np.log10(f5))
    out["difference_limiting_magnitude"] = float(31.4 - 2.5 * np.log10(np.hypot(*flux5)))
    return out
