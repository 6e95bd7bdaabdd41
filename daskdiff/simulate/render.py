"""Rendering of calibrated exposures and deep coadds with GalSim.

Sources are drawn into postage stamps (sized by flux and size) with GalSim, each convolved with
the exposure's true PSF model *at its position* (``MoffatPsf.galsim_profile``, drawn with
``method="auto"`` so the pixel response is included exactly as in the stored model). Galaxies
are Sersic profiles defined on the sky and mapped to pixels by the local WCS Jacobian. With
DCR, an object is drawn as the flux-weighted sum of the PSF shifted by each sub-filter's
refraction (:func:`~daskdiff.simulate.observing.dcr_pixel_shifts`).

The sky (a level with a linear gradient), the noise and the defects are vectorised numpy. The
noise is Gaussian with the variance of photon plus read noise, ``(model + sky) / gain +
(read_noise / gain)**2`` counts², which is also the variance plane; the sky level is at least
300 counts, where Poisson and Gaussian noise are indistinguishable. The standard normal field is
drawn from its own seeded stream, independent of the model, so adding or removing one source
changes the image only where the source is.

Coadds are noiseless renders of the static sky (no transients or asteroids, variables at their
mean) with the coadd PSF, plus noise of a fixed depth drawn in 256-pixel blocks of the tract
grid, so overlapping patches of a tract agree pixel for pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import galsim
import numpy as np
import pyarrow as pa
import xarray as xr
from astropy.wcs import WCS
from scipy import ndimage

from ..box import Box
from ..exposure import make_exposure
from ..masks import DEFAULT_MASK_PLANES
from ..metadata import PhotoCalib, Weather
from ..psf.analytic import MoffatPsf
from ..wcs import local_jacobian, sky_to_pixel
from .config import SimulationConfig
from .defects import (
    add_cosmic_rays,
    apply_bad_columns,
    apply_saturation,
    bad_columns,
    mask_edges,
    repair_cosmic_rays,
)
from .observing import (
    DetectorGeometry,
    VisitPlan,
    dcr_pixel_shifts,
    dcr_shifts_arcsec,
    detector_wcs,
    exposure_psf,
    subfilter_weights,
    visit_info,
)
from .seeds import rng_for
from .sky import flux_at, position_at

__all__ = [
    "NOISE_BLOCK",
    "SourceList",
    "astrometric_error",
    "coadd_noise_sigma",
    "coadd_psf",
    "draw_sources",
    "render_coadd",
    "render_exposure",
    "sources_in_box",
]

#: Edge (pixels) of the blocks of the tract grid in which coadd noise is drawn.
NOISE_BLOCK = 256

#: Largest stamp half-width (pixels).
MAX_HALF = 160

_KIND_CODES = {"star": 0, "variable": 0, "transient": 0, "asteroid": 0, "galaxy": 1}


@dataclass
class SourceList:
    """Sources to draw on one image (parallel arrays)."""

    id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    is_galaxy: np.ndarray
    sersic_n: np.ndarray
    half_light_radius: np.ndarray
    ellipticity: np.ndarray
    position_angle: np.ndarray
    dcr_weights: np.ndarray

    def __len__(self) -> int:
        return len(self.id)


def sources_in_box(catalog: pa.Table, wcs: WCS, box: Box, *, mjd: float | None,
                   counts_per_njy: float, n_subfilters: int, margin: int = 60,
                   kinds: tuple[str, ...] | None = None) -> SourceList:
    """Return the catalogue objects that fall on (or near) a pixel box.

    Parameters
    ----------
    catalog : pyarrow.Table
        The object catalogue.
    wcs : astropy.wcs.WCS
        The true WCS of the image.
    box : Box
        The image's pixel box.
    mjd : float or None
        Time of the exposure (light curves, asteroid motion); ``None`` for a static coadd
        (variables at their mean flux).
    counts_per_njy : float
        Counts per nJy of the image.
    n_subfilters : int
        Number of DCR sub-filters (for the flux fractions).
    margin : int, optional
        Objects this far outside the box (plus their size) are kept (their wings land on it).
    kinds : tuple of str, optional
        Kinds to keep (all if omitted).
    """
    cols = {name: catalog.column(name).to_numpy(zero_copy_only=False)
            for name in catalog.column_names}
    if mjd is None:
        flux = np.asarray(cols["flux_njy"], dtype=float)
        ra, dec = cols["ra"], cols["dec"]
    else:
        flux = flux_at(cols, mjd)
        ra, dec = position_at(cols, mjd)
    keep = np.ones(len(flux), dtype=bool) if kinds is None else np.isin(cols["kind"], kinds)
    # cheap pre-selection on the sky before the (iterative) SIP inversion
    cra, cdec = wcs.all_pix2world([box.center[0]], [box.center[1]], 0)
    radius = 0.5 * math.hypot(box.width, box.height) + margin + 200
    radius_deg = radius * _scale_deg(wcs)
    cos_dec = math.cos(math.radians(float(cdec[0])))
    near = (np.abs(dec - cdec[0]) < radius_deg) & (
        np.abs(((ra - cra[0] + 180.0) % 360.0 - 180.0) * cos_dec) < radius_deg)
    keep &= near & (flux > 0)
    idx = np.nonzero(keep)[0]
    x, y = sky_to_pixel(wcs, ra[idx], dec[idx]) if idx.size else (np.empty(0), np.empty(0))
    hlr_px = np.nan_to_num(cols["half_light_radius"][idx]) / (_scale_deg(wcs) * 3600.0)
    pad = margin + 4 * hlr_px
    inside = ((x > box.x0 - pad) & (x < box.x1 + pad) & (y > box.y0 - pad) & (y < box.y1 + pad))
    idx, x, y = idx[inside], x[inside], y[inside]
    weights = (subfilter_weights(cols["dcr_color"][idx], n_subfilters) if n_subfilters > 0
               else np.ones((idx.size, 1)))
    return SourceList(
        id=cols["id"][idx], x=np.asarray(x, float), y=np.asarray(y, float),
        flux=flux[idx] * counts_per_njy,
        is_galaxy=cols["kind"][idx] == "galaxy",
        sersic_n=cols["sersic_n"][idx], half_light_radius=cols["half_light_radius"][idx],
        ellipticity=cols["ellipticity"][idx], position_angle=cols["position_angle"][idx],
        dcr_weights=weights,
    )


def _scale_deg(wcs: WCS) -> float:
    return float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))


def _stamp_half(flux: float, fwhm: float, hlr_px: float, sersic_n: float) -> int:
    """Half-width of a stamp: wider for brighter and larger sources."""
    k = float(np.clip(3.0 + 1.5 * math.log10(max(flux, 1.0) / 1000.0), 3.0, 8.0))
    half = k * fwhm
    if hlr_px > 0:
        half = max(half, hlr_px * (5.0 if sersic_n < 2.5 else 8.0) + 2.0 * fwhm)
    return int(min(math.ceil(half) + 1, MAX_HALF))


def _galaxy_profile(src: SourceList, i: int, flux: float, jacobian: np.ndarray,
                    gsparams: galsim.GSParams) -> galsim.GSObject:
    """Return the galaxy as a pixel-frame GalSim profile (before the PSF)."""
    ell = float(src.ellipticity[i])
    beta = (90.0 - float(src.position_angle[i])) * galsim.degrees
    galaxy = galsim.Sersic(n=float(src.sersic_n[i]),
                           half_light_radius=float(src.half_light_radius[i]),
                           flux=flux, gsparams=gsparams)
    if ell > 0:
        galaxy = galaxy.shear(g=ell, beta=beta)
    local = galsim.JacobianWCS(jacobian[0, 0], jacobian[0, 1], jacobian[1, 0], jacobian[1, 1])
    return local.toImage(galaxy)


def draw_sources(
    image: galsim.ImageD,
    sources: SourceList,
    psf: MoffatPsf,
    *,
    jacobian: np.ndarray,
    dcr_shifts: np.ndarray | None = None,
    extra_images: list[tuple[galsim.ImageD, int]] | None = None,
) -> None:
    """Add sources to a GalSim image (parent-frame bounds), each with the PSF at its position.

    Parameters
    ----------
    image : galsim.ImageD
        The image to add to (its bounds are the parent-frame pixel box).
    sources : SourceList
        Positions (pixels), fluxes (counts) and shapes.
    psf : MoffatPsf
        The PSF model; ``psf.galsim_profile(x, y)`` is drawn with ``method="auto"``.
    jacobian : numpy.ndarray
        Local ``d(xi, eta)/d(x, y)`` (arcsec per pixel) used for galaxy shapes.
    dcr_shifts : numpy.ndarray, optional
        ``(K, 2)`` sub-filter pixel offsets; objects are drawn as ``sum_k w_k PSF(x - s_k)``.
    extra_images : list of (galsim.ImageD, int), optional
        Further images that receive the sub-filter ``k`` share of each source (for the DCR
        coadds); the source is then drawn once and scaled.
    """
    gsparams = galsim.GSParams(folding_threshold=5e-3, maxk_threshold=2e-3)
    bounds = image.bounds
    for i in range(len(sources)):
        x, y, flux = float(sources.x[i]), float(sources.y[i]), float(sources.flux[i])
        psf_profile = psf.galsim_profile(x, y)
        fwhm = psf.profile_fwhm(x, y)
        weights = sources.dcr_weights[i]
        if dcr_shifts is not None and len(weights) == len(dcr_shifts) and len(weights) > 1:
            # the refraction kernel: one weighted delta function per sub-filter
            kernel = galsim.Sum([galsim.DeltaFunction(flux=float(w)).shift(float(dx), float(dy))
                                 for w, (dx, dy) in zip(weights, dcr_shifts, strict=True)])
            psf_profile = galsim.Convolve([psf_profile, kernel])
        hlr_px = 0.0
        if sources.is_galaxy[i]:
            hlr_px = float(sources.half_light_radius[i]) / float(
                math.sqrt(abs(np.linalg.det(jacobian))))
            profile = galsim.Convolve([
                _galaxy_profile(sources, i, flux, jacobian, gsparams), psf_profile])
        else:
            profile = psf_profile * flux
        half = _stamp_half(flux, fwhm, hlr_px, float(np.nan_to_num(sources.sersic_n[i])))
        cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
        stamp_bounds = galsim.BoundsI(cx - half, cx + half, cy - half, cy + half)
        overlap = stamp_bounds & bounds
        if not overlap.isDefined():
            continue
        stamp = galsim.ImageD(stamp_bounds, scale=1.0)
        profile.drawImage(image=stamp, center=galsim.PositionD(x, y), method="auto")
        image[overlap] += stamp[overlap]
        if extra_images:
            for target, k in extra_images:
                both = stamp_bounds & target.bounds
                if both.isDefined():
                    target[both] += stamp[both] * float(weights[k])


def astrometric_error(config: SimulationConfig, plan: VisitPlan, detector: int
                      ) -> tuple[float, float]:
    """Return the deliberate WCS error ``(dx, dy)`` (pixels) of an exposure.

    A random direction and a size uniform up to ``astrometric_error_arcsec``.
    """
    rng = rng_for(config.seed, "astrometry", plan.visit, detector)
    size = rng.uniform(0.0, config.astrometric_error_arcsec) / config.pixel_scale
    angle = rng.uniform(0.0, 2 * np.pi)
    return (float(size * math.cos(angle)), float(size * math.sin(angle)))


def sky_model(config: SimulationConfig, plan: VisitPlan, box: Box) -> np.ndarray:
    """Return the sky of an exposure: the visit level with a linear gradient (counts)."""
    xn = (box.xs() - box.center[0]) / max(box.width, 1) * 2.0
    yn = (box.ys() - box.center[1]) / max(box.height, 1) * 2.0
    return plan.sky * (1.0 + plan.sky_gradient_x * xn[None, :] + plan.sky_gradient_y * yn[:, None])


def render_exposure(
    config: SimulationConfig,
    plan: VisitPlan,
    detector: DetectorGeometry,
    catalog: pa.Table,
    *,
    include_transients: bool = True,
    noise: bool = True,
    defects: bool = True,
    chunks: int | None = None,
) -> xr.Dataset:
    """Render one calibrated exposure (one visit, one detector).

    Parameters
    ----------
    config : SimulationConfig
        The survey settings.
    plan : VisitPlan
        The visit (pointing, time, conditions).
    detector : DetectorGeometry
        The detector.
    catalog : pyarrow.Table
        The object catalogue (:func:`~daskdiff.simulate.sky.make_sky`).
    include_transients : bool, optional
        Draw the transients (switch off to get the exact "no transient" image of the same
        exposure: the noise field is the same).
    noise : bool, optional
        Add noise (switch off for the expected image).
    defects : bool, optional
        Add saturation, bleed trails, bad columns and cosmic rays (edges are always masked).
    chunks : int, optional
        Dask tile size of the planes; ``None`` (default) keeps numpy arrays.

    Returns
    -------
    xarray.Dataset
        The exposure, with the stored (slightly wrong) WCS, the true PSF model, the
        calibration (transparency folded in) and the visit info.
    """
    planes = DEFAULT_MASK_PLANES
    box = detector.box
    true_wcs = detector_wcs(config, plan, detector)
    error = astrometric_error(config, plan, detector.id)
    stored_wcs = detector_wcs(config, plan, detector, error=error)
    psf = exposure_psf(config, plan, detector)
    counts_per_njy = plan.transparency / config.njy_per_count
    n_sub = max(config.dcr_subfilters, 1)
    kinds = None if include_transients else ("star", "galaxy", "variable", "asteroid")
    sources = sources_in_box(catalog, true_wcs, box, mjd=plan.mjd, counts_per_njy=counts_per_njy,
                             n_subfilters=n_sub, kinds=kinds)
    jacobian = local_jacobian(true_wcs, *box.center)
    shifts = None
    if config.dcr_subfilters > 1:
        shifts = dcr_pixel_shifts(
            dcr_shifts_arcsec(config.band, config.dcr_subfilters, plan.airmass, Weather()),
            plan.parallactic_angle, jacobian)
    model = galsim.ImageD(galsim.BoundsI(box.x0, box.x1 - 1, box.y0, box.y1 - 1), init_value=0,
                         scale=1.0)
    draw_sources(model, sources, psf, jacobian=jacobian, dcr_shifts=shifts)
    signal = model.array
    sky = sky_model(config, plan, box)
    variance = (signal + sky) / config.gain + (config.read_noise / config.gain) ** 2
    image = signal + sky
    if noise:
        z = rng_for(config.seed, "noise", plan.visit, detector.id).standard_normal(box.shape)
        image = image + z * np.sqrt(variance)
    mask = np.zeros(box.shape, dtype=np.uint32)
    if defects:
        rng = rng_for(config.seed, "defects", plan.visit, detector.id)
        apply_saturation(image, mask, level=config.saturation, planes=planes)
        add_cosmic_rays(image, mask, rate_per_megapixel=config.cosmic_rays_per_megapixel,
                        planes=planes, rng=rng)
        if config.repair_cosmic_rays:
            repair_cosmic_rays(image, mask, planes=planes)
        columns = bad_columns(rng_for(config.seed, "bad-columns", detector.id),
                              config.bad_columns, box.width, box.height)
        apply_bad_columns(image, mask, columns, planes=planes, rng=rng)
    mask_edges(mask, config.edge_width, planes=planes)
    if not config.keep_sky:
        image = image - sky
    return make_exposure(
        image.astype(np.float32), variance=variance.astype(np.float32), mask=mask,
        x0=box.x0, y0=box.y0, wcs=stored_wcs, psf=psf,
        photo_calib=PhotoCalib(config.njy_per_count / plan.transparency),
        visit_info=visit_info(config, plan, detector.id), mask_planes=planes, chunks=chunks,
    )


# --------------------------------------------------------------------------------------------
# Coadds
# --------------------------------------------------------------------------------------------


def coadd_psf(config: SimulationConfig, tract_box: Box, pixel_scale: float) -> MoffatPsf:
    """Return the coadd PSF of a tract: good seeing, varying by at most 0.5 % over the tract."""
    fwhm = config.coadd_seeing_arcsec / pixel_scale
    coefficients = np.array([[fwhm, 0.002 * fwhm], [0.003 * fwhm, 0.0]])
    return MoffatPsf(coefficients, beta=config.psf_beta, g1=0.005, g2=-0.003, box=tract_box)


def coadd_noise_sigma(config: SimulationConfig, plans: list[VisitPlan]) -> tuple[float, float]:
    """Return ``(sigma, sky_ref)``: the coadd's background noise and reference sky (counts).

    ``sigma`` is the median visit's background noise (at transparency 1) divided by
    ``coadd_depth_factor``.
    """
    sky = float(np.median([p.sky / p.transparency for p in plans]))
    visit_sigma = math.sqrt(sky / config.gain + (config.read_noise / config.gain) ** 2)
    return visit_sigma / config.coadd_depth_factor, sky


def _block_noise(seed: int, purpose: str, tract: int, box: Box,
                 covered: np.ndarray | None = None) -> np.ndarray:
    """Return standard normal noise on a box of the tract grid, fixed per 256-pixel block.

    Blocks with no covered pixel (if ``covered`` is given) are left at zero.
    """
    out = np.zeros(box.shape)
    bx0, bx1 = box.x0 // NOISE_BLOCK, (box.x1 - 1) // NOISE_BLOCK
    by0, by1 = box.y0 // NOISE_BLOCK, (box.y1 - 1) // NOISE_BLOCK
    for by in range(by0, by1 + 1):
        for bx in range(bx0, bx1 + 1):
            block = Box(bx * NOISE_BLOCK, by * NOISE_BLOCK, NOISE_BLOCK, NOISE_BLOCK)
            part = block.intersection(box)
            if covered is not None and not covered[part.slices(origin=(box.x0, box.y0))].any():
                continue
            z = rng_for(seed, purpose, tract, bx, by).standard_normal((NOISE_BLOCK, NOISE_BLOCK))
            out[part.slices(origin=(box.x0, box.y0))] = z[part.slices(origin=(block.x0,
                                                                              block.y0))]
    return out


def coverage_mask(box: Box, polygons: list[np.ndarray]) -> np.ndarray:
    """Return the pixels of ``box`` inside any of the convex polygons (``(N, 2)`` x, y)."""
    covered = np.zeros(box.shape, dtype=bool)
    xs, ys = box.xs().astype(float), box.ys().astype(float)
    for poly in polygons:
        px, py = poly[:, 0], poly[:, 1]
        x0 = max(math.floor(px.min()), box.x0)
        x1 = min(math.ceil(px.max()) + 1, box.x1)
        y0 = max(math.floor(py.min()), box.y0)
        y1 = min(math.ceil(py.max()) + 1, box.y1)
        if x1 <= x0 or y1 <= y0:
            continue
        sub_x = xs[x0 - box.x0:x1 - box.x0]
        sub_y = ys[y0 - box.y0:y1 - box.y0]
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        area = 0.5 * np.sum(px * np.roll(py, -1) - py * np.roll(px, -1))
        sign = 1.0 if area > 0 else -1.0
        for k in range(len(px)):
            ax, ay = px[k], py[k]
            bx, by = px[(k + 1) % len(px)], py[(k + 1) % len(px)]
            # left of the edge a->b for a counter-clockwise polygon
            cross = ((bx - ax) * (sub_y[:, None] - ay) - (by - ay) * (sub_x[None, :] - ax))
            inside &= sign * cross >= 0
        covered[y0 - box.y0:y1 - box.y0, x0 - box.x0:x1 - box.x0] |= inside
    return covered


def _near_coverage(sources: SourceList, covered: np.ndarray, box: Box, *, block: int = 32,
                   grow: int = 3) -> SourceList:
    """Keep the sources within about ``grow * block`` pixels of a covered pixel."""
    ny, nx = covered.shape
    by, bx = -(-ny // block), -(-nx // block)
    padded = np.zeros((by * block, bx * block), dtype=bool)
    padded[:ny, :nx] = covered
    blocks = padded.reshape(by, block, bx, block).any(axis=(1, 3))
    if grow > 0:
        blocks = ndimage.binary_dilation(blocks, iterations=grow)
    ix = np.clip(np.floor((sources.x - box.x0) / block).astype(int), 0, bx - 1)
    iy = np.clip(np.floor((sources.y - box.y0) / block).astype(int), 0, by - 1)
    keep = blocks[iy, ix]
    return SourceList(**{name: getattr(sources, name)[keep]
                         for name in SourceList.__dataclass_fields__})


def render_coadd(
    config: SimulationConfig,
    *,
    tract_id: int,
    tract_wcs: WCS,
    tract_box: Box,
    patch_box: Box,
    catalog: pa.Table,
    footprints: list[np.ndarray],
    noise_sigma: float,
    sky_ref: float,
    n_subfilters: int = 0,
    chunks: int | None = None,
) -> tuple[xr.Dataset, list[xr.Dataset]]:
    """Render one deep coadd patch and, optionally, its DCR sub-filter coadds.

    Parameters
    ----------
    config : SimulationConfig
        The survey settings.
    tract_id : int
        The tract (seeds the noise blocks).
    tract_wcs : astropy.wcs.WCS
        The tract's WCS (0-based tract pixel frame = the coadd's parent frame).
    tract_box : Box
        The tract's pixel box (the coadd PSF's spatial normalisation).
    patch_box : Box
        The patch's outer box (the coadd's pixels).
    catalog : pyarrow.Table
        The object catalogue; stars, galaxies and variables (mean flux) are drawn.
    footprints : list of numpy.ndarray
        The visit-detector outlines in tract pixels (``(4, 2)``); pixels outside all of them
        are NO_DATA (NaN image and variance).
    noise_sigma, sky_ref : float
        Background noise of the coadd and the sky level its Poisson scaling refers to.
    n_subfilters : int, optional
        Number of DCR sub-filter coadds to make as well (0 for none).
    chunks : int, optional
        Dask tile size; ``None`` keeps numpy.

    Returns
    -------
    tuple
        The coadd exposure and the list of sub-filter coadds (empty without DCR). Each
        sub-filter coadd holds the sky in that sub-filter (no refraction) with noise
        ``noise_sigma / sqrt(K)``; their sum is the noiseless coadd sky.
    """
    planes = DEFAULT_MASK_PLANES
    scale = _scale_deg(tract_wcs) * 3600.0
    psf = coadd_psf(config, tract_box, scale)
    counts_per_njy = 1.0 / config.njy_per_count
    n_weights = max(n_subfilters, 1)
    sources = sources_in_box(catalog, tract_wcs, patch_box, mjd=None,
                             counts_per_njy=counts_per_njy, n_subfilters=n_weights,
                             kinds=("star", "galaxy", "variable"))
    covered = coverage_mask(patch_box, footprints)
    sources = _near_coverage(sources, covered, patch_box)
    bounds = galsim.BoundsI(patch_box.x0, patch_box.x1 - 1, patch_box.y0, patch_box.y1 - 1)
    model = galsim.ImageD(bounds, init_value=0, scale=1.0)
    subs = [galsim.ImageD(bounds, init_value=0, scale=1.0) for _ in range(n_subfilters)]
    jacobian = local_jacobian(tract_wcs, *patch_box.center)
    draw_sources(model, sources, psf, jacobian=jacobian,
                 extra_images=[(img, k) for k, img in enumerate(subs)] or None)
    no_data = np.uint32(planes.bitmask("NO_DATA"))
    mask = np.where(covered, np.uint32(0), no_data).astype(np.uint32)
    photo_calib = PhotoCalib(config.njy_per_count)

    def finish(signal: np.ndarray, sigma: float, purpose: str, scale_sky: float) -> xr.Dataset:
        variance = sigma**2 * (1.0 + np.clip(signal, 0.0, None) / (sky_ref * scale_sky))
        z = _block_noise(config.seed, purpose, tract_id, patch_box, covered)
        image = signal + z * np.sqrt(variance)
        image = np.where(covered, image, np.nan)
        variance = np.where(covered, variance, np.nan)
        return make_exposure(image.astype(np.float32), variance=variance.astype(np.float32),
                             mask=mask, x0=patch_box.x0, y0=patch_box.y0, wcs=tract_wcs,
                             psf=psf, photo_calib=photo_calib, mask_planes=planes, chunks=chunks)

    coadd = finish(model.array, noise_sigma, "coadd-noise", 1.0)
    k = max(n_subfilters, 1)
    dcr = [finish(sub.array, noise_sigma / math.sqrt(k), f"dcr-noise-{j}", 1.0 / k)
           for j, sub in enumerate(subs)]
    return coadd, dcr


