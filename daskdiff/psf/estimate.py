"""Estimate a spatially varying :class:`~daskdiff.psf.pixel.PixelPsf` from the stars of an image.

The steps (PSFEx-like):

1. **Detection**, tile by tile (fixed 1024-pixel tiles with a halo, independent of the dask
   chunking): SEP background, extraction with the variance plane as the error, and a rough
   half-light radius. Each tile is a delayed task; only one tile per worker thread is in memory.
2. **Candidates**: detections that are unflagged by SEP (not merged with a neighbour), above the
   S/N threshold, away from masked pixels (SAT, BAD, NO_DATA, EDGE, CR, ...), unsaturated and
   isolated (no neighbour brighter than ``isolation_ratio`` times their flux within a stamp
   radius), brightest first.
3. **Stamps** of the candidates only are computed from the (possibly lazy) exposure; stamps
   touching a masked pixel or the image edge are dropped.
4. **Stellar locus**: adaptive moments of each stamp; stars are the mode of the size
   distribution (galaxies are larger, blends odd), refined by a polynomial fit of the size over
   the field with sigma clipping (the PSF size varies across a detector).
5. **Fit**: iterate (a) shift each star to its centroid (Lanczos-5) and divide by its flux,
   (b) fit the component images pixel by pixel by weighted least squares (inverse variance),
   (c) forward-model each star as ``flux * shift(P(x_i, y_i), dx, dy)``, refit its flux and
   centroid, and reject stars whose reduced chi² is an outlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import sep
import xarray as xr
from scipy import ndimage
from scipy.spatial import cKDTree

from ..box import Box
from ..errors import AlgorithmError, ConfigError
from ..exposure import exposure_box, get_mask_planes, validate_exposure
from .measure import adaptive_shape, lanczos_shift
from .pixel import PixelPsf, fit_components, monomials, n_terms

__all__ = ["DEFAULT_BAD_PLANES", "PsfEstimate", "estimate_psf", "estimate_psf_details"]

#: Mask planes that disqualify a star when set anywhere in its stamp.
DEFAULT_BAD_PLANES: tuple[str, ...] = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "SUSPECT",
                                       "INTRP")

_DETECT_TILE = 1024
_LANCZOS_ORDER = 5
_SHIFT_PAD = _LANCZOS_ORDER + 1
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

_CATALOG_DTYPE = np.dtype([
    ("x", "f8"), ("y", "f8"), ("flux", "f8"), ("snr", "f8"), ("r50", "f8"), ("peak", "f8"),
    ("background", "f8"), ("flags", "i4"), ("near_bad", "i4"),
])


@dataclass(frozen=True)
class PsfEstimate:
    """The estimated PSF and what went into it.

    Attributes
    ----------
    psf : PixelPsf
        The model.
    stars : numpy.ndarray
        Structured array of the stars used in the final fit: ``x``, ``y`` (parent frame),
        ``flux``, ``chi2`` (reduced chi² of the forward model).
    counts : dict
        How many sources survived each selection step (as in the error metadata).
    """

    psf: PixelPsf
    stars: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)


def estimate_psf(
    exposure: xr.Dataset,
    *,
    degree: int = 2,
    size: int | None = None,
    max_stars: int = 300,
    min_stars: int | None = None,
    min_snr: float = 50.0,
    detect_threshold: float = 5.0,
    isolation_ratio: float = 0.02,
    size_tolerance: float = 0.3,
    saturation: float | None = None,
    bad_planes: Sequence[str] = DEFAULT_BAD_PLANES,
    n_iter: int = 4,
    clip: float = 5.0,
    background_mesh: int = 64,
) -> PixelPsf:
    """Estimate a spatially varying pixel PSF from the stars of an exposure.

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure (numpy- or dask-backed); only detection tiles and star stamps are
        computed.
    degree : int, optional
        Polynomial degree of the spatial variation (2: six component images).
    size : int, optional
        Odd stamp edge of the model; by default ``2 * ceil(4 * FWHM) + 1`` (at least 21) from
        the measured star size.
    max_stars : int, optional
        At most this many (the brightest) stars are fitted.
    min_stars : int, optional
        Fewest usable stars accepted; ``max(3 * n_terms, 10)`` by default.
    min_snr : float, optional
        Minimum S/N of a star (isophotal flux over the sky noise in its footprint).
    detect_threshold : float, optional
        Detection threshold in units of the per-pixel noise.
    isolation_ratio : float, optional
        A star is rejected if a neighbour within its stamp radius has more than this fraction
        of its flux.
    size_tolerance : float, optional
        Fractional size range about the mode of the size distribution taken as the stellar
        locus before the spatial refinement.
    saturation : float, optional
        Pixel value (image units, background included) at and above which a star is
        saturated, in addition to the SAT mask plane.
    bad_planes : sequence of str, optional
        Mask planes that disqualify a star when set in its stamp (planes unknown to the
        exposure are ignored).
    n_iter : int, optional
        Fit iterations (component fit, then flux/centroid refit and outlier rejection).
    clip : float, optional
        Stars whose reduced chi² exceeds the median by more than ``clip`` robust sigmas are
        rejected.
    background_mesh : int, optional
        SEP background mesh size in pixels.

    Returns
    -------
    PixelPsf
        The model over the exposure's box.

    Raises
    ------
    AlgorithmError
        If fewer than ``min_stars`` stars are usable; ``metadata`` holds the count after every
        selection step.
    ConfigError
        If an option is out of range.
    """
    return estimate_psf_details(
        exposure, degree=degree, size=size, max_stars=max_stars, min_stars=min_stars,
        min_snr=min_snr, detect_threshold=detect_threshold, isolation_ratio=isolation_ratio,
        size_tolerance=size_tolerance, saturation=saturation, bad_planes=bad_planes,
        n_iter=n_iter, clip=clip, background_mesh=background_mesh,
    ).psf


def estimate_psf_details(
    exposure: xr.Dataset,
    *,
    degree: int = 2,
    size: int | None = None,
    max_stars: int = 300,
    min_stars: int | None = None,
    min_snr: float = 50.0,
    detect_threshold: float = 5.0,
    isolation_ratio: float = 0.02,
    size_tolerance: float = 0.3,
    saturation: float | None = None,
    bad_planes: Sequence[str] = DEFAULT_BAD_PLANES,
    n_iter: int = 4,
    clip: float = 5.0,
    background_mesh: int = 64,
) -> PsfEstimate:
    """Run :func:`estimate_psf` and return the model with the stars used and the counts.

    See :func:`estimate_psf` for the parameters.
    """
    validate_exposure(exposure, source="estimate_psf input")
    nk = n_terms(degree) if degree >= 0 else 0
    min_stars = max(3 * nk, 10) if min_stars is None else int(min_stars)
    _check_options(degree=degree, size=size, max_stars=max_stars, min_stars=min_stars,
                   min_snr=min_snr, detect_threshold=detect_threshold, n_iter=n_iter,
                   size_tolerance=size_tolerance, background_mesh=background_mesh)
    box = exposure_box(exposure)
    registry = get_mask_planes(exposure)
    bad_bits = registry.bitmask(*[p for p in bad_planes if p in registry])
    options = {"min_snr": min_snr, "min_stars": min_stars, "degree": degree,
               "isolation_ratio": isolation_ratio, "size_tolerance": size_tolerance}

    catalog = _detect(exposure, box, bad_bits=bad_bits, threshold=detect_threshold,
                      mesh=background_mesh)
    counts: dict[str, int] = {"detections": len(catalog)}
    bright = catalog[(catalog["snr"] >= min_snr) & (catalog["flags"] & sep.OBJ_MERGED == 0)]
    counts["above_snr"] = len(bright)
    if len(bright) < min_stars:
        _fail(counts, options, "above the S/N threshold")
    fwhm_guess = 2.0 * _mode(bright["r50"], width=0.1, log=True)
    cut_half = int(np.ceil(4.0 * fwhm_guess)) + 2 * _SHIFT_PAD + 2
    if size is not None:
        cut_half = max(cut_half, size // 2 + 2 * _SHIFT_PAD + 2)
    candidates = _select_candidates(catalog, bright, radius=cut_half, ratio=isolation_ratio,
                                    saturation=saturation)
    counts["isolated_unsaturated"] = len(candidates)
    candidates = candidates[np.argsort(-candidates["flux"])][: max(3 * max_stars, 100)]

    stamps = _cut_stamps(exposure, box, candidates, cut_half, bad_bits)
    counts["clean_stamps"] = len(stamps["x"])
    if counts["clean_stamps"] < min_stars:
        _fail(counts, options, "with clean stamps (no masked pixel, inside the image)")
    stars = _stellar_locus(stamps, box, degree=degree, tolerance=size_tolerance)
    counts["stellar_locus"] = int(stars.sum())
    if counts["stellar_locus"] < min_stars:
        _fail(counts, options, "in the stellar locus of the size distribution")
    order = np.flatnonzero(stars)
    order = order[np.argsort(-stamps["flux"][order])][:max_stars]
    stamps = {k: v[order] for k, v in stamps.items()}
    if size is None:
        fwhm = _FWHM_PER_SIGMA * np.median(stamps["radius"])
        size = max(2 * int(np.ceil(4.0 * fwhm)) + 1, 21)
    size = min(size, 2 * (cut_half - 2 * _SHIFT_PAD - 2) + 1)
    psf, used, chi2 = _fit(stamps, box, degree=degree, size=size, n_iter=n_iter, clip=clip,
                           min_stars=min_stars, counts=counts, options=options)
    counts["fitted"] = int(used.sum())
    table = np.zeros(int(used.sum()), dtype=[("x", "f8"), ("y", "f8"), ("flux", "f8"),
                                             ("chi2", "f8")])
    for name in ("x", "y", "flux"):
        table[name] = stamps[name][used]
    table["chi2"] = chi2[used]
    return PsfEstimate(psf=psf, stars=table, counts=counts)


def _check_options(**options: Any) -> None:
    checks = {
        "degree": lambda v: isinstance(v, int | np.integer) and 0 <= v <= 4,
        "size": lambda v: v is None or (int(v) == v and v >= 11 and v % 2 == 1),
        "max_stars": lambda v: v >= 1,
        "min_stars": lambda v: v >= 1,
        "min_snr": lambda v: v > 0,
        "detect_threshold": lambda v: v > 0,
        "n_iter": lambda v: v >= 1,
        "size_tolerance": lambda v: 0 < v < 1,
        "background_mesh": lambda v: v >= 8,
    }
    hints = {"degree": "an integer 0..4", "size": "an odd integer >= 11",
             "size_tolerance": "between 0 and 1", "background_mesh": ">= 8 pixels"}
    for name, check in checks.items():
        if not check(options[name]):
            raise ConfigError(f"estimate_psf: {name}={options[name]!r} is invalid; use "
                              f"{hints.get(name, 'a positive value')}")


def _fail(counts: dict[str, int], options: dict[str, Any], step: str) -> None:
    found = min(counts.values()) if counts else 0
    steps = ", ".join(f"{k}={v}" for k, v in counts.items())
    raise AlgorithmError(
        f"estimate_psf: only {found} stars {step}, {options['min_stars']} needed "
        f"(selection counts: {steps}). Relax the thresholds: lower min_snr (now "
        f"{options['min_snr']}), raise isolation_ratio (now {options['isolation_ratio']}) "
        f"or size_tolerance (now {options['size_tolerance']}), lower min_stars or the degree "
        f"(now {options['degree']}), or give the exposure a PSF model instead.",
        metadata={**counts, **options},
    )


# -- detection ------------------------------------------------------------------------------


def _tiles(box: Box, tile: int) -> list[Box]:
    return [Box.from_bounds(x, y, min(x + tile, box.x1), min(y + tile, box.y1))
            for y in range(box.y0, box.y1, tile) for x in range(box.x0, box.x1, tile)]


def _detect(exposure: xr.Dataset, box: Box, *, bad_bits: int, threshold: float,
            mesh: int) -> np.ndarray:
    """Run the per-tile detection (delayed tasks if the exposure is lazy) and merge."""
    halo = max(mesh, 32)
    planes = [exposure[name].data for name in ("image", "variance", "mask")]
    lazy = any(isinstance(p, da.Array) for p in planes)
    tasks = []
    for core in _tiles(box, _DETECT_TILE):
        grown = core.grow(halo).intersection(box)
        ys, xs = grown.slices(origin=(box.x0, box.y0))
        parts = [p[ys, xs] for p in planes]
        args = (grown, core, bad_bits, threshold, mesh)
        tasks.append(dask.delayed(_detect_tile)(*parts, *args) if lazy
                     else _detect_tile(*parts, *args))
    results = dask.compute(*tasks) if lazy else tasks
    return np.concatenate(results) if results else np.zeros(0, _CATALOG_DTYPE)


def _detect_tile(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, grown: Box,
                 core: Box, bad_bits: int, threshold: float, mesh: int) -> np.ndarray:
    """Detect sources in one tile (with halo); keep those whose centre lies in the core."""
    data = np.ascontiguousarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    bad = ((np.asarray(mask) & np.uint32(bad_bits)) != 0) | ~np.isfinite(data)
    bad |= ~(np.isfinite(var) & (var > 0))
    if bad.all():
        return np.zeros(0, _CATALOG_DTYPE)
    data = np.where(bad, np.float32(0), data)
    background = sep.Background(data, mask=bad, bw=mesh, bh=mesh)
    back = background.back()
    sub = np.ascontiguousarray(data - back, dtype=np.float32)
    err = np.where(bad, np.float32(1e30), np.sqrt(np.where(bad, 1, var))).astype(np.float32)
    sep.set_extract_pixstack(max(sep.get_extract_pixstack(), data.size))
    sep.set_sub_object_limit(max(sep.get_sub_object_limit(), 4096))
    try:
        objects, segmap = sep.extract(sub, threshold, err=err, mask=bad, minarea=5,
                                      deblend_cont=0.005, segmentation_map=True)
    except Exception as error:  # sep raises plain Exception on buffer overflows
        raise AlgorithmError(f"source detection failed in tile {core} ({error}); the tile may "
                             "be dominated by artefacts or a bad background",
                             metadata={"tile": core.to_list()}) from error
    n = len(objects)
    catalog = np.zeros(n, _CATALOG_DTYPE)
    if n == 0:
        return catalog
    x, y = objects["x"], objects["y"]
    sky_var = float(np.median(var[~bad]))
    snr = objects["flux"] / np.sqrt(np.maximum(objects["npix"], 1) * sky_var)
    rmax = np.clip(6.0 * objects["a"], 3.0, 50.0)
    r50, _ = sep.flux_radius(sub, x, y, rmax, 0.5, subpix=5, mask=bad)
    near = ndimage.binary_dilation(bad, iterations=2)
    near_counts = np.bincount(segmap[near].ravel(), minlength=n + 1)[1:]
    iy = np.clip(np.round(y).astype(int), 0, data.shape[0] - 1)
    ix = np.clip(np.round(x).astype(int), 0, data.shape[1] - 1)
    catalog["x"] = x + grown.x0
    catalog["y"] = y + grown.y0
    catalog["flux"] = objects["flux"]
    catalog["snr"] = snr
    catalog["r50"] = np.where(np.isfinite(r50) & (r50 > 0), r50, np.nan)
    catalog["peak"] = objects["peak"] + back[iy, ix]
    catalog["background"] = back[iy, ix]
    catalog["flags"] = objects["flag"]
    catalog["near_bad"] = near_counts
    keep = np.asarray(core.contains(catalog["x"], catalog["y"]), dtype=bool)
    return catalog[keep]


def _select_candidates(catalog: np.ndarray, bright: np.ndarray, *, radius: float,
                       ratio: float, saturation: float | None) -> np.ndarray:
    """Isolated, unsaturated, unmasked bright detections."""
    ok = (bright["near_bad"] == 0) & np.isfinite(bright["r50"])
    if saturation is not None:
        ok &= bright["peak"] < saturation
    bright = bright[ok]
    if len(bright) == 0:
        return bright
    tree = cKDTree(np.column_stack([catalog["x"], catalog["y"]]))
    neighbours = tree.query_ball_point(np.column_stack([bright["x"], bright["y"]]), r=radius)
    isolated = np.ones(len(bright), dtype=bool)
    for i, idx in enumerate(neighbours):
        fluxes = catalog["flux"][idx]
        dist = np.hypot(catalog["x"][idx] - bright["x"][i], catalog["y"][idx] - bright["y"][i])
        others = dist > 0.5
        isolated[i] = not np.any(fluxes[others] > ratio * bright["flux"][i])
    return bright[isolated]


# -- stamps and the stellar locus ------------------------------------------------------------


def _cut_stamps(exposure: xr.Dataset, box: Box, candidates: np.ndarray, half: int,
                bad_bits: int) -> dict[str, np.ndarray]:
    """Compute the candidates' stamps; drop those off the image or touching masked pixels."""
    size = 2 * half + 1
    boxes = []
    for x, y in zip(candidates["x"], candidates["y"], strict=True):
        cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        boxes.append(Box(cx - half, cy - half, size, size))
    inside = np.array([box.contains_box(b) for b in boxes], dtype=bool)
    candidates = candidates[inside]
    boxes = [b for b, ok in zip(boxes, inside, strict=True) if ok]
    planes = [exposure[name].data for name in ("image", "variance", "mask")]
    slices = [b.slices(origin=(box.x0, box.y0)) for b in boxes]
    cuts = [[p[s] for p in planes] for s in slices]
    if any(isinstance(p, da.Array) for p in planes):
        cuts = dask.compute(cuts)[0]
    empty = np.zeros((0, size, size))
    image = np.array([c[0] for c in cuts], dtype=np.float32).reshape(-1, size, size)
    var = np.array([c[1] for c in cuts], dtype=np.float32).reshape(-1, size, size)
    mask = np.array([c[2] for c in cuts], dtype=np.uint32).reshape(-1, size, size)
    clean = ((mask & np.uint32(bad_bits)) == 0).all(axis=(1, 2))
    clean &= np.isfinite(image).all(axis=(1, 2)) & np.isfinite(var).all(axis=(1, 2))
    clean &= (var > 0).all(axis=(1, 2))
    image = (image - candidates["background"][:, None, None]).astype(np.float32)
    var = var.astype(np.float32)
    result: dict[str, np.ndarray] = {
        "image": image[clean] if len(image) else empty,
        "variance": var[clean] if len(var) else empty,
        "x0": np.array([b.x0 for b in boxes], dtype=int)[clean] if boxes else np.zeros(0, int),
        "y0": np.array([b.y0 for b in boxes], dtype=int)[clean] if boxes else np.zeros(0, int),
        "flux": candidates["flux"][clean],
    }
    n = len(result["flux"])
    result["x"] = np.full(n, np.nan)
    result["y"] = np.full(n, np.nan)
    result["radius"] = np.full(n, np.nan)
    window = max(int(np.ceil(2.5 * np.median(candidates["r50"]) if n else 5)) + 4, 8)
    window = min(window, half)
    core = slice(half - window, half + window + 1)
    for i in range(n):
        try:
            shape = adaptive_shape(result["image"][i][core, core])
        except AlgorithmError:
            continue
        result["x"][i] = result["x0"][i] + half - window + shape.x
        result["y"][i] = result["y0"][i] + half - window + shape.y
        result["radius"][i] = shape.determinant_radius
        result["flux"][i] = shape.flux
    good = np.isfinite(result["radius"]) & (result["flux"] > 0)
    return {k: v[good] for k, v in result.items()}


def _mode(values: np.ndarray, *, width: float, log: bool = False) -> float:
    """Centre of the densest window of the given width (in log space if ``log``)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    if values.size == 0:
        raise AlgorithmError("estimate_psf: no source with a measurable size")
    v = np.sort(np.log(values) if log else values)
    right = np.searchsorted(v, v + width, side="right")
    best = int(np.argmax(right - np.arange(v.size)))
    centre = float(np.median(v[best:right[best]]))
    return float(np.exp(centre)) if log else centre


def _stellar_locus(stamps: dict[str, np.ndarray], box: Box, *, degree: int,
                   tolerance: float) -> np.ndarray:
    """Boolean selection of the stars: the size mode, refined by a spatial polynomial fit."""
    log_r = np.log(stamps["radius"])
    if log_r.size == 0:
        return np.zeros(0, dtype=bool)
    mode = np.log(_mode(stamps["radius"], width=0.05, log=True))
    selected = np.abs(log_r - mode) < np.log1p(tolerance)
    design = monomials(box, min(degree, 2), stamps["x"], stamps["y"]).T
    for _ in range(5):
        if selected.sum() <= design.shape[1] * 2:
            break
        coeffs, *_ = np.linalg.lstsq(design[selected], log_r[selected], rcond=None)
        resid = log_r - design @ coeffs
        sigma = 1.4826 * np.median(np.abs(resid[selected] - np.median(resid[selected])))
        new = np.abs(resid) < max(3.0 * sigma, 0.02)
        new &= np.abs(log_r - mode) < np.log1p(tolerance)
        if np.array_equal(new, selected):
            break
        selected = new
    return selected


# -- the fit ---------------------------------------------------------------------------------


def _centred(stamp: np.ndarray, cx: float, cy: float, size: int) -> np.ndarray:
    """Cut ``size x size`` centred on ``(cx, cy)`` (stamp coords), shifted to the centre."""
    ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    half = size // 2 + _SHIFT_PAD
    block = stamp[iy - half:iy + half + 1, ix - half:ix + half + 1]
    shifted = lanczos_shift(block, ix - cx, iy - cy, order=_LANCZOS_ORDER)
    return shifted[_SHIFT_PAD:-_SHIFT_PAD, _SHIFT_PAD:-_SHIFT_PAD]


def _block(stamp: np.ndarray, cx: float, cy: float, size: int) -> np.ndarray:
    """Cut ``size x size`` around the pixel containing ``(cx, cy)`` (no interpolation)."""
    ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    half = size // 2
    return stamp[iy - half:iy + half + 1, ix - half:ix + half + 1]


def _recentred(components: np.ndarray, box: Box) -> np.ndarray:
    """Shift the components so the model's adaptive centroid at the box centre is on a pixel.

    Star centroids refined against the model itself leave the overall position of the model
    free; this pins it to the (unbiased for symmetric PSFs) adaptive-moment centroid.
    """
    kernel = PixelPsf(components, box).kernel_image(*box.center)
    try:
        shape = adaptive_shape(kernel)
    except AlgorithmError:
        return components
    half = kernel.shape[0] // 2
    dx, dy = half - shape.x, half - shape.y
    if max(abs(dx), abs(dy)) < 1e-4 or max(abs(dx), abs(dy)) > 1.0:
        return components
    return np.stack([
        lanczos_shift(np.pad(c, _SHIFT_PAD), dx, dy, order=_LANCZOS_ORDER)[
            _SHIFT_PAD:-_SHIFT_PAD, _SHIFT_PAD:-_SHIFT_PAD]
        for c in components
    ])


def _placed(kernel: np.ndarray, cx: float, cy: float, shape: tuple[int, int]
            ) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Shift a centred kernel to ``(cx, cy)``; return it and its slices in the stamp."""
    ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    half = kernel.shape[0] // 2
    model = lanczos_shift(np.pad(kernel, _SHIFT_PAD), cx - ix, cy - iy, order=_LANCZOS_ORDER)
    model = model[_SHIFT_PAD:-_SHIFT_PAD, _SHIFT_PAD:-_SHIFT_PAD]
    return model, (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))


def _fit(stamps: dict[str, np.ndarray], box: Box, *, degree: int, size: int, n_iter: int,
         clip: float, min_stars: int, counts: dict[str, int], options: dict[str, Any]
         ) -> tuple[PixelPsf, np.ndarray, np.ndarray]:
    """Alternate component fits and per-star flux/centroid fits with outlier rejection."""
    n = len(stamps["flux"])
    cx = stamps["x"] - stamps["x0"]
    cy = stamps["y"] - stamps["y0"]
    flux = stamps["flux"].copy()
    used = np.ones(n, dtype=bool)
    chi2 = np.zeros(n)
    psf = None
    for iteration in range(n_iter):
        data = np.stack([_centred(stamps["image"][i], cx[i], cy[i], size) for i in range(n)])
        var = np.stack([_block(stamps["variance"][i], cx[i], cy[i], size) for i in range(n)])
        weights = (flux[:, None, None] ** 2) / var
        weights[~used] = 0.0
        x_parent, y_parent = cx + stamps["x0"], cy + stamps["y0"]
        components = fit_components(data[used] / flux[used, None, None], x_parent[used],
                                    y_parent[used], box, degree=degree,
                                    weights=weights[used])
        psf = PixelPsf(_recentred(components, box), box)
        for i in range(n):
            flux[i], cx[i], cy[i], chi2[i] = _refit_star(
                psf, stamps["image"][i], stamps["variance"][i], cx[i], cy[i],
                stamps["x0"][i], stamps["y0"][i], flux[i])
        if iteration < n_iter - 1:
            ok = np.isfinite(chi2) & (flux > 0)
            med = np.median(chi2[used & ok])
            spread = 1.4826 * np.median(np.abs(chi2[used & ok] - med))
            used = used & ok & (chi2 <= med + clip * max(spread, 0.05 * med))
            if used.sum() < min_stars:
                counts["after_outlier_rejection"] = int(used.sum())
                _fail(counts, options, "left after rejecting outliers of the PSF fit")
    assert psf is not None  # n_iter >= 1 is checked on entry
    stamps["x"] = cx + stamps["x0"]
    stamps["y"] = cy + stamps["y0"]
    stamps["flux"] = flux
    return psf, used, chi2


def _refit_star(psf: PixelPsf, image: np.ndarray, variance: np.ndarray, cx: float, cy: float,
                x0: int, y0: int, flux: float) -> tuple[float, float, float, float]:
    """Linearised weighted fit of flux and centroid offset of one star; returns chi²/dof."""
    size = psf.default_size()
    kernel = psf.kernel_image(cx + x0, cy + y0)
    for _ in range(2):
        model, (ys, xs) = _placed(kernel, cx, cy, image.shape)
        d = image[ys, xs]
        w = 1.0 / variance[ys, xs]
        gy, gx = np.gradient(model)
        basis = np.stack([model, -gx, -gy]).reshape(3, -1)
        a = (basis * w.ravel()) @ basis.T
        b = (basis * w.ravel()) @ d.ravel()
        try:
            f, fdx, fdy = np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            return flux, cx, cy, np.inf
        if not f > 0:
            return flux, cx, cy, np.inf
        step_x, step_y = np.clip(fdx / f, -0.5, 0.5), np.clip(fdy / f, -0.5, 0.5)
        flux, cx, cy = float(f), cx + step_x, cy + step_y
        half = size // 2 + _SHIFT_PAD
        ny, nx = image.shape
        if not (half <= cx < nx - half - 1 and half <= cy < ny - half - 1):
            return flux, cx - step_x, cy - step_y, np.inf
    model, (ys, xs) = _placed(kernel, cx, cy, image.shape)
    resid = image[ys, xs] - flux * model
    chi2 = float((resid**2 / variance[ys, xs]).sum() / (resid.size - 3))
    return flux, cx, cy, chi2
