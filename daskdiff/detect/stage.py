"""DetectAndMeasure: find and measure the sources of a difference image.

The steps follow LSST's DetectAndMeasureTask (``reference/lsst_diffim.md`` §3.1):

1. check the inputs (a difference whose PSF is undefined is an upstream failure, a missing
   plane is an input error, a difference with no usable pixel has no work);
2. clear DETECTED / DETECTED_NEGATIVE; fit the background in two passes (``background_bin_first``
   on a copy with a detection pass to mask sources, then ``background_bin`` ignoring them) and
   subtract it;
3. mask cosmic rays (CR plane; pixels only, no interpolation);
4. detect positive and negative footprints at ``threshold`` sigma per pixel of the PSF-smoothed
   difference using its variance, set EDGE where the smoothing kernel does not fit, grow
   footprints by ``n_sigma_to_grow`` PSF sigmas and merge overlapping ones (a footprint with
   both signs is a dipole candidate). This runs tile by tile (the chunks of a dask difference,
   or ``tile_size``): the significance with a halo of the kernel half-width, thresholding and
   growth with a halo of the growth radius, labelling per tile with the labels of pixels
   touching across a seam joined afterwards, so a footprint crossing tiles is found once and
   the catalog is the same for any tiling;
5. drop detections with a peak on NO_DATA, BAD, SAT or EDGE; add sky sources;
6. measure every source (centroid, PSF flux, aperture fluxes, adaptive moments, the dipole fit,
   pixel flags, forced PSF fluxes on the science image and the matched template, RA/Dec) and
   drop those with a ``bad_source_flags`` flag;
7. assign ids from the visit, the detector and a counter over the sources ordered by peak
   position (so the catalog does not depend on the chunking).

The stage does no I/O; :func:`run_detect_and_measure` also returns the difference with the
detection masks set and the background subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa
import xarray as xr
from scipy import optimize

from ..box import Box
from ..errors import AlgorithmError, InputError, NoWorkError
from ..exposure import (
    exposure_box,
    get_mask_planes,
    get_photo_calib,
    get_psf,
    get_visit_info,
    get_wcs,
    make_exposure,
)
from ..masks import MaskPlanes
from ..wcs import pixel_to_sky
from ._compiled import prepare_planes
from .background import estimate_background
from .config import BAD_PEAK_PLANES, PIXEL_FLAG_PLANES, DetectAndMeasureConfig
from .dipole import DipoleResult, fit_dipole
from .footprints import (
    Footprint,
    detect_footprints,
    disk,
    footprint_spans,
    grow_mask,
    place_sky_sources,
)
from .measure import (
    Planes,
    PsfImages,
    aperture_fluxes,
    gaussian_centroid,
    mask_flags,
    psf_flux,
    second_moments,
)
from .schema import aperture_column, make_table
from .threshold import find_cosmic_rays, significance_tiles
from .tiles import tile_slices

__all__ = ["DetectionResult", "detect_and_measure", "make_source_id", "run_detect_and_measure"]

#: Planes ignored by the background fit (LSST's).
BACKGROUND_IGNORE = ("BAD", "EDGE", "NO_DATA", "DETECTED", "DETECTED_NEGATIVE")
#: Pixels left out of every measurement.
MEASURE_BAD = ("NO_DATA", "BAD")
#: Planes sky sources avoid.
SKY_AVOID = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA", "EDGE")

_COUNTER_BITS = 20


@dataclass(frozen=True)
class DetectionResult:
    """Output of :func:`run_detect_and_measure`.

    Attributes
    ----------
    catalog : pyarrow.Table
        The diaSrc table (schema :func:`~daskdiff.detect.schema.dia_source_schema`).
    difference : xarray.Dataset
        The difference with its background subtracted and DETECTED, DETECTED_NEGATIVE, EDGE
        and CR set (eager).
    background : numpy.ndarray
        The subtracted background (zeros if not fitted).
    """

    catalog: pa.Table
    difference: xr.Dataset
    background: np.ndarray


def make_source_id(visit: int, detector: int, counter: np.ndarray | int) -> np.ndarray:
    """Return 64-bit source ids ``((visit * 1000 + detector) << 20) + counter``.

    Raises
    ------
    InputError
        If the detector is >= 1000 or a counter does not fit in 20 bits.
    """
    counter = np.asarray(counter, np.int64)
    if not 0 <= detector < 1000:
        raise InputError(f"detector {detector} does not fit the id packer (0..999)")
    if counter.size and (counter.min() < 0 or counter.max() >= 1 << _COUNTER_BITS):
        raise InputError(f"more than {1 << _COUNTER_BITS} sources in one detector-visit; "
                         "the id packer cannot number them")
    return ((np.int64(visit) * 1000 + np.int64(detector)) << _COUNTER_BITS) + counter


def _bits(planes: MaskPlanes, *names: str) -> int:
    return planes.bitmask(*(name for name in names if name in planes))


def _check_exposure(exposure: Any, what: str) -> None:
    if not isinstance(exposure, xr.Dataset):
        raise InputError(f"the {what} must be an exposure (xarray.Dataset), got "
                         f"{type(exposure).__name__}")
    for plane in ("image", "variance", "mask"):
        if plane not in exposure:
            hint = (" (estimate one, e.g. read_exposure() derives it from GAIN/RDNOISE)"
                    if plane == "variance" else "")
            raise InputError(f"the {what} has no {plane!r} plane{hint}")


def _psf_sigma(psf: Any, box: Box) -> float:
    if psf is None:
        raise InputError("the difference has no PSF model; attach the science PSF (or the "
                         "subtraction's difference PSF) with replace_metadata(psf=...)")
    x, y = box.center
    try:
        kernel = np.asarray(psf.kernel_image(x, y))
        sigma = float(psf.sigma(x, y)) if np.all(np.isfinite(kernel)) else float("nan")
    except Exception as error:  # any failure of the model is upstream
        raise NoWorkError(f"the difference's PSF cannot be evaluated at the image centre "
                          f"({error}); the subtraction upstream failed") from error
    if not np.isfinite(sigma) or sigma <= 0:
        raise NoWorkError(f"the difference's PSF size is {sigma} (not a finite positive "
                          "radius); the subtraction upstream failed, nothing to detect on")
    return sigma


def _planes(exposure: xr.Dataset | None) -> Planes | None:
    if exposure is None:
        return None
    box = exposure_box(exposure)
    return Planes(np.asarray(exposure["image"].data, np.float32),
                  np.asarray(exposure["variance"].data, np.float32),
                  np.asarray(exposure["mask"].data, np.uint32), box.x0, box.y0)


def _set_border(mask: np.ndarray, edge: int, bit: np.uint32) -> None:
    """OR ``bit`` into the pixels within ``edge`` of the border (everything if too small)."""
    ny, nx = mask.shape
    if ny <= 2 * edge or nx <= 2 * edge:
        mask |= bit
        return
    for part in (mask[:edge], mask[ny - edge:], mask[edge:ny - edge, :edge],
                 mask[edge:ny - edge, nx - edge:]):
        part |= bit


def run_detect_and_measure(science: xr.Dataset | None, matched: xr.Dataset | None,
                           difference: xr.Dataset, *,
                           config: DetectAndMeasureConfig | None = None) -> DetectionResult:
    """Detect and measure DIA sources, returning the catalog and the masked difference.

    Parameters
    ----------
    science : xarray.Dataset or None
        The science exposure (forced photometry, dipole fit); ``None`` skips its use.
    matched : xarray.Dataset or None
        The PSF-matched template (forced photometry, dipole fit); ``None`` skips its use.
    difference : xarray.Dataset
        The difference image, with its PSF; numpy or dask planes (dask: tile-parallel
        detection on its chunks, or ``config.tile_size``).
    config : DetectAndMeasureConfig, optional
        Defaults if omitted.

    Returns
    -------
    DetectionResult
        The catalog, the background-subtracted and masked difference, and the background.

    Raises
    ------
    InputError
        A missing plane or PSF, or inputs that are not exposures.
    NoWorkError
        The difference's PSF is undefined (NaN), or no pixel is usable.
    AlgorithmError
        More cosmic-ray pixels than ``max_cosmic_ray_fraction``.
    """
    config = config or DetectAndMeasureConfig()
    _check_exposure(difference, "difference")
    for other, what in ((science, "science exposure"), (matched, "matched template")):
        if other is not None:
            _check_exposure(other, what)
    box = exposure_box(difference)
    psf = get_psf(difference)
    sigma = _psf_sigma(psf, box)
    planes_registry = get_mask_planes(difference).with_planes(
        *(p for p in ("DETECTED", "DETECTED_NEGATIVE", "EDGE", "CR") if p not in
          get_mask_planes(difference)))
    chunks: Any = None
    if isinstance(difference["image"].data, da.Array):
        chunks = difference["image"].data.chunks
    if config.tile_size is not None:
        chunks = (config.tile_size, config.tile_size)
    diff = _planes(difference)
    assert diff is not None
    tiles = tile_slices(diff.image.shape, chunks)
    variance = diff.variance
    image, mask, unusable, ignore = prepare_planes(
        diff.image, variance, diff.mask, _bits(planes_registry, "DETECTED", "DETECTED_NEGATIVE"),
        _bits(planes_registry, "NO_DATA", "BAD"), _bits(planes_registry, *BACKGROUND_IGNORE))
    if unusable.all():
        raise NoWorkError(f"the difference ({box}) has no usable pixel: every pixel is "
                          "NO_DATA, BAD, non-finite or has no positive variance")
    width = config.smoothing_width_sigma
    grow = int(config.n_sigma_to_grow * sigma + 0.5)

    background = np.zeros(image.shape, np.float32)
    smooth_var = None
    if config.do_subtract_background:
        first = estimate_background(image, ignore, bin_size=config.background_bin_first)
        sig1, smooth_var, _ = significance_tiles(image - first, variance, tiles, sigma=sigma,
                                                 width_sigma=width)
        detected = grow_mask(np.abs(sig1) >= config.threshold, grow)
        del sig1, first
        ignore |= detected
        background = estimate_background(image, ignore, bin_size=config.background_bin)
        image -= background

    bits = {name: np.uint32(_bits(planes_registry, name)) for name in
            ("DETECTED", "DETECTED_NEGATIVE", "EDGE", "CR")}
    if config.do_find_cosmic_rays:
        crs = find_cosmic_rays(image, variance, ~unusable, psf_sigma=sigma,
                               min_sigma=config.cr_min_sigma, cond3_fac=config.cr_cond3_fac)
        n_cr = int(crs.sum())
        if n_cr > config.max_cosmic_ray_fraction * crs.size:
            raise AlgorithmError(f"{n_cr} cosmic-ray pixels ({n_cr / crs.size:.2%}) exceed "
                                 f"max_cosmic_ray_fraction={config.max_cosmic_ray_fraction}; "
                                 "the difference is probably bad",
                                 metadata={"n_cosmic_ray_pixels": n_cr})
        np.bitwise_or(mask, bits["CR"], out=mask, where=crs)

    sig, _, edge = significance_tiles(image, variance, tiles, sigma=sigma, width_sigma=width,
                                      smooth_var=smooth_var)
    _set_border(mask, edge, bits["EDGE"])
    labels, positive, negative, footprints = detect_footprints(
        sig, threshold=config.threshold, grow=grow, edge=edge, merge=config.do_merge,
        peak_radius=max(2, int(np.ceil(1.5 * sigma))), tiles=tiles)
    np.bitwise_or(mask, bits["DETECTED"], out=mask, where=positive)
    np.bitwise_or(mask, bits["DETECTED_NEGATIVE"], out=mask, where=negative)

    sources = _sources(footprints,
                       pair_distance=2 * config.dipole_max_separation * sigma)
    if config.reject_bad_peaks:
        bad_peak = _bits(planes_registry, *BAD_PEAK_PLANES)
        sources = [src for src in sources if not any(
            mask[peak[0], peak[1]] & bad_peak for peak in src.peaks)]

    sky: list[tuple[int, int]] = []
    visit_info = get_visit_info(difference) or (get_visit_info(science)
                                                if science is not None else None)
    visit = visit_info.visit if visit_info else 0
    detector = visit_info.detector if visit_info else 0
    if config.do_sky_sources and config.n_sky_sources:
        avoid = ((mask & _bits(planes_registry, *SKY_AVOID)) != 0) | unusable
        rng = np.random.default_rng([config.sky_seed, visit, detector])
        sky = place_sky_sources(avoid, n=config.n_sky_sources,
                                radius=config.sky_source_radius, rng=rng)

    out_planes = Planes(image, variance, mask, diff.x0, diff.y0)
    context = _Context(config=config, diff=out_planes, science=_planes(science),
                       matched=_planes(matched), psf=psf, sigma=sigma,
                       science_psf=get_psf(science) if science is not None else None,
                       matched_psf=get_psf(matched) if matched is not None else None,
                       registry=planes_registry, labels=labels, images=PsfImages())
    rows = [_measure_source(context, src) for src in
            sorted(sources, key=lambda s: (s.primary[0], s.primary[1]))]
    rows += [_measure_sky(context, y, x) for y, x in sky]
    _add_apertures(context, rows)
    _finish_rows(rows, difference, visit_info, config)
    catalog = make_table(rows, aperture_radii=config.aperture_radii)

    image[(mask & np.uint32(_bits(planes_registry, "NO_DATA"))) != 0] = 0.0
    result_exposure = make_exposure(
        image, variance=variance, mask=mask, x0=diff.x0, y0=diff.y0, chunks=None,
        wcs=get_wcs(difference), psf=psf, photo_calib=get_photo_calib(difference),
        visit_info=get_visit_info(difference), mask_planes=planes_registry)
    return DetectionResult(catalog, result_exposure, background)


def detect_and_measure(science: xr.Dataset | None, matched: xr.Dataset | None,
                       difference: xr.Dataset, *,
                       config: DetectAndMeasureConfig | None = None) -> pa.Table:
    """Detect and measure the DIA sources of a difference image.

    See :func:`run_detect_and_measure` (which also returns the masked difference) for the
    parameters and errors, and :func:`~daskdiff.detect.schema.dia_source_schema` for the
    columns. A field with no source gives an empty table with the full schema.
    """
    return run_detect_and_measure(science, matched, difference, config=config).catalog


@dataclass(frozen=True)
class _Context:
    config: DetectAndMeasureConfig
    diff: Planes
    science: Planes | None
    matched: Planes | None
    psf: Any
    sigma: float
    science_psf: Any
    matched_psf: Any
    registry: MaskPlanes
    labels: np.ndarray
    images: PsfImages

    @property
    def bad_bits(self) -> int:
        return _bits(self.registry, *MEASURE_BAD)

    def flag_bits(self) -> dict[str, int]:
        return {name: _bits(self.registry, plane) for name, plane in PIXEL_FLAG_PLANES.items()}


def _forced(ctx: _Context, row: dict[str, Any], x: float, y: float) -> None:
    for prefix, planes, psf in (("forced_psf_flux", ctx.science, ctx.science_psf),
                                ("forced_template_psf_flux", ctx.matched, ctx.matched_psf)):
        if planes is None or not ctx.config.do_forced_measurement:
            row[f"{prefix}_flag"] = True
            continue
        result = psf_flux(planes, psf if psf is not None else ctx.psf, x, y, images=ctx.images,
                          bad_bits=ctx.bad_bits)
        row[prefix] = result.flux
        row[f"{prefix}_err"] = result.flux_err
        row[f"{prefix}_area"] = result.area
        row[f"{prefix}_flag"] = result.flag
        row[f"{prefix}_flag_no_good_pixels"] = result.flag_no_good_pixels
        row[f"{prefix}_flag_edge"] = result.flag_edge


def _common(ctx: _Context, row: dict[str, Any], x: float, y: float, sign: float,
            footprint: np.ndarray, fbox: Box) -> None:
    diff = ctx.diff
    flux = psf_flux(diff, ctx.psf, x, y, bad_bits=ctx.bad_bits, images=ctx.images)
    row.update(psf_flux=flux.flux, psf_flux_err=flux.flux_err, psf_flux_area=flux.area,
               psf_flux_chi2=flux.chi2, psf_flux_npixels=flux.npixels,
               psf_flux_flag=flux.flag, psf_flux_flag_edge=flux.flag_edge)
    ixx, iyy, ixy, failed = second_moments(diff, x, y, sigma=ctx.sigma, sign=sign,
                                           bad_bits=ctx.bad_bits)
    row.update(shape_xx=ixx, shape_yy=iyy, shape_xy=ixy, shape_flag=failed)
    _forced(ctx, row, x, y)
    _, fsl = diff.window(fbox)
    cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    _, csl = diff.window(Box(cx - 1, cy - 1, 3, 3))
    flags = mask_flags(diff.mask[fsl], footprint, diff.mask[csl], ctx.flag_bits())
    row.update({f"pixel_flags_{name}": value for name, value in flags.items()})
    row["pixel_flags_offimage"] = not bool(diff.box.contains(x, y))
    row["footprint"] = footprint_spans(footprint, y0=fbox.y0, x0=fbox.x0).tolist()
    row["footprint_area"] = int(footprint.sum())
    row["_sign"] = sign


@dataclass(frozen=True)
class _Source:
    """A source to measure: one peak of a footprint, or its dipole (a +/- peak pair)."""

    footprint: Footprint
    peaks: tuple[tuple[int, int, float], ...]

    @property
    def is_dipole(self) -> bool:
        return len(self.peaks) == 2

    @property
    def primary(self) -> tuple[int, int, float]:
        return max(self.peaks, key=lambda p: (abs(p[2]), p[2]))


def _sources(footprints: list[Footprint], *, pair_distance: float) -> list[_Source]:
    """Split footprints into sources: +/- peak pairs (dipoles) and single peaks.

    In a footprint holding both signs, positive and negative peaks are paired into dipoles by
    the assignment of least total distance (pairs at most ``pair_distance`` pixels apart);
    every other peak is a source.
    """
    sources = []
    for fp in footprints:
        pairs: list[tuple[int, int]] = []
        if fp.pos_peaks and fp.neg_peaks:
            pos = np.array([p[:2] for p in fp.pos_peaks], float)
            neg = np.array([p[:2] for p in fp.neg_peaks], float)
            dist = np.hypot(*(pos[:, None, :] - neg[None, :, :]).transpose(2, 0, 1))
            cost = np.where(dist <= pair_distance, dist, 1e6)
            rows, cols = optimize.linear_sum_assignment(cost)
            pairs = [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)
                     if dist[i, j] <= pair_distance]
        paired_pos = {i for i, _ in pairs}
        paired_neg = {j for _, j in pairs}
        sources.extend(_Source(fp, (fp.pos_peaks[i], fp.neg_peaks[j])) for i, j in pairs)
        sources.extend(_Source(fp, (p,)) for i, p in enumerate(fp.pos_peaks)
                       if i not in paired_pos)
        sources.extend(_Source(fp, (p,)) for j, p in enumerate(fp.neg_peaks)
                       if j not in paired_neg)
    return sources


def _measure_source(ctx: _Context, src: _Source) -> dict[str, Any]:
    diff = ctx.diff
    fp = src.footprint
    sl = fp.slices
    fbox = Box(sl[1].start + diff.x0, sl[0].start + diff.y0, sl[1].stop - sl[1].start,
               sl[0].stop - sl[0].start)
    footprint = ctx.labels[sl] == fp.label
    py, px, psig = src.primary
    sign = -1.0 if psig < 0 else 1.0
    centroid = gaussian_centroid(diff, px + diff.x0, py + diff.y0, sigma=ctx.sigma, sign=sign,
                                 bad_bits=ctx.bad_bits)
    x, y, x_err, y_err = centroid.x, centroid.y, centroid.x_err, centroid.y_err
    row: dict[str, Any] = {
        "peak_x": px + diff.x0, "peak_y": py + diff.y0, "peak_significance": psig,
        "n_pos_peaks": len(fp.pos_peaks), "n_neg_peaks": len(fp.neg_peaks),
        "is_negative": sign < 0 and not src.is_dipole, "is_dipole_candidate": src.is_dipole,
        "centroid_flag": centroid.flag,
    }
    if src.is_dipole and ctx.config.do_dipole_fit:
        dipole = _dipole(ctx, src, footprint, fbox)
        row.update(_dipole_columns(dipole))
        if not dipole.flag:
            x, y, x_err, y_err = dipole.x, dipole.y, dipole.x_err, dipole.y_err
    else:
        row["dipole_flag"] = True
    row.update(x=x, y=y, x_err=x_err, y_err=y_err)
    _common(ctx, row, x, y, sign, footprint, fbox)
    return row


def _dipole(ctx: _Context, src: _Source, footprint: np.ndarray, fbox: Box) -> DipoleResult:
    config = ctx.config
    if int(footprint.sum()) > config.dipole_max_footprint_area:
        return DipoleResult(attempted=False, flag=True)
    diff = ctx.diff
    pos_peak, neg_peak = src.peaks
    pos = (pos_peak[1] + diff.x0, pos_peak[0] + diff.y0)
    neg = (neg_peak[1] + diff.x0, neg_peak[0] + diff.y0)
    return fit_dipole(diff, ctx.science, ctx.matched, ctx.psf, footprint, fbox, pos, neg,
                      psf_sigma=ctx.sigma, bad_bits=ctx.bad_bits,
                      max_separation=config.dipole_max_separation,
                      rel_weight=config.dipole_rel_weight, min_sn=config.dipole_min_sn,
                      max_flux_ratio=config.dipole_max_flux_ratio)


def _dipole_columns(d: DipoleResult) -> dict[str, Any]:
    too_large = not d.attempted
    return {
        "dipole_flux": d.flux, "dipole_flux_err": d.flux_err,
        "dipole_pos_x": d.pos_x, "dipole_pos_y": d.pos_y, "dipole_pos_x_err": d.pos_x_err,
        "dipole_pos_y_err": d.pos_y_err, "dipole_neg_x": d.neg_x, "dipole_neg_y": d.neg_y,
        "dipole_neg_x_err": d.neg_x_err, "dipole_neg_y_err": d.neg_y_err,
        "dipole_x": d.x, "dipole_y": d.y, "dipole_orientation": d.orientation,
        "dipole_separation": d.separation, "dipole_chi2dof": d.chi2dof,
        "dipole_n_data": d.n_data, "dipole_signal_to_noise": d.signal_to_noise,
        "dipole_classification": d.classification,
        "dipole_classification_attempted": d.attempted, "dipole_flag": d.flag,
        "dipole_flag_edge": d.flag_edge, "dipole_flag_too_large": too_large,
    }


def _measure_sky(ctx: _Context, row_index: int, col_index: int) -> dict[str, Any]:
    diff = ctx.diff
    radius = ctx.config.sky_source_radius
    x, y = col_index + diff.x0, row_index + diff.y0
    fbox = Box(x - radius, y - radius, 2 * radius + 1, 2 * radius + 1)
    row: dict[str, Any] = {
        "peak_x": x, "peak_y": y, "peak_significance": float("nan"), "sky_source": True,
        "x": float(x), "y": float(y), "x_err": 0.0, "y_err": 0.0, "dipole_flag": True,
    }
    _common(ctx, row, float(x), float(y), 1.0, disk(radius), fbox)
    return row


def _add_apertures(ctx: _Context, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    xs = np.array([row["x"] for row in rows], float)
    ys = np.array([row["y"] for row in rows], float)
    for radius in ctx.config.aperture_radii:
        name = aperture_column(radius)
        flux, err, flag = aperture_fluxes(ctx.diff, xs, ys, radius, bad_bits=ctx.bad_bits)
        for row, f, e, g in zip(rows, flux, err, flag, strict=True):
            row[name], row[f"{name}_err"], row[f"{name}_flag"] = float(f), float(e), bool(g)


def _finish_rows(rows: list[dict[str, Any]], difference: xr.Dataset, visit_info: Any,
                 config: DetectAndMeasureConfig) -> None:
    kept = [row for row in rows if not any(row.get(f"pixel_flags_{flag}", False)
                                           for flag in config.bad_source_flags)]
    rows[:] = kept
    if not rows:
        return
    calib = get_photo_calib(difference)
    wcs = get_wcs(difference)
    xs = np.array([row["x"] for row in rows], float)
    ys = np.array([row["y"] for row in rows], float)
    if wcs is not None:
        ra, dec = pixel_to_sky(wcs, xs, ys)
    else:
        ra = dec = np.full(xs.size, np.nan)
    visit = visit_info.visit if visit_info else 0
    detector = visit_info.detector if visit_info else 0
    ids = make_source_id(visit, detector, np.arange(1, len(rows) + 1))
    for i, row in enumerate(rows):
        row.pop("_sign", None)
        row.update(id=int(ids[i]), visit=visit, detector=detector,
                   band=visit_info.band if visit_info else "",
                   mjd=visit_info.mjd if visit_info else float("nan"),
                   coord_ra=float(ra[i]), coord_dec=float(dec[i]))
        for prefix in ("psf_flux", "forced_psf_flux", "forced_template_psf_flux"):
            if prefix in row:
                row[f"{prefix}_njy"] = calib.to_nanojansky(row[prefix])
                row[f"{prefix}_njy_err"] = calib.to_nanojansky(row[f"{prefix}_err"])
