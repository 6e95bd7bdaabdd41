"""Statistical tests of the simulated exposures and coadds against their truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daskdiff.masks import DEFAULT_MASK_PLANES
from daskdiff.psf.measure import centroid, measure_fwhm
from daskdiff.simulate import plan_campaign, render_exposure, truth_tables
from daskdiff.simulate.campaign import _coadd_task
from daskdiff.simulate.defects import apply_saturation
from daskdiff.simulate.observing import detector_wcs
from daskdiff.simulate.render import astrometric_error
from daskdiff.wcs import pixel_to_sky, sky_to_pixel

from .simulate_helpers import (
    aperture_sum,
    encircled_energy,
    micro_config,
    robust_std,
    star_catalog,
)


def _grid_catalog(config, plan, *, n=3, margin=60, mag=14.5):
    """Bright stars on an n x n grid of detector 0 of visit 0 (through the true WCS)."""
    det = plan.detectors[0]
    wcs = detector_wcs(config, plan.visits[0], det)
    g = np.linspace(margin, det.box.width - 1 - margin, n)
    gx, gy = np.meshgrid(g + 0.3, g + 0.6)  # off pixel centres
    ra, dec = pixel_to_sky(wcs, gx.ravel(), gy.ravel())
    return star_catalog(ra, dec, mag)


def test_blank_sky_noise_matches_variance_plane():
    config = micro_config(detector_width=512, detector_height=512)
    plan = plan_campaign(config)
    visit, det = plan.visits[0], plan.detectors[0]
    exposure = render_exposure(config, visit, det, plan.catalog)
    model = render_exposure(config, visit, det, plan.catalog, noise=False, defects=False)
    image = exposure["image"].values.astype(float)
    variance = exposure["variance"].values.astype(float)
    signal = model["image"].values
    sky_sigma = math.sqrt(visit.sky / config.gain)
    blank = (exposure["mask"].values == 0) & (np.abs(signal) < 0.01 * sky_sigma)
    n = int(blank.sum())
    assert n > 100_000
    normalised = image[blank] / np.sqrt(variance[blank])
    print(f"blank-sky noise / sqrt(variance): robust {robust_std(normalised):.4f}, "
          f"std {np.std(normalised):.4f}, N={n}")
    # robust noise equals sqrt(variance) within 3 %
    assert abs(robust_std(normalised) - 1.0) < 0.03
    assert abs(np.std(normalised) - 1.0) < 0.03
    # the sky is subtracted exactly: mean within 4 sigma / sqrt(N)
    assert abs(normalised.mean()) < 4.0 / math.sqrt(n)
    # the variance plane holds the sky photon noise and read noise (with the gradient)
    expected = visit.sky / config.gain + (config.read_noise / config.gain) ** 2
    assert np.median(variance[blank]) == pytest.approx(expected, rel=0.03)


def test_keep_sky_leaves_the_sky_level_in_the_image():
    config = micro_config(keep_sky=True)
    plan = plan_campaign(config)
    visit = plan.visits[1]
    exposure = render_exposure(config, visit, plan.detectors[0], plan.catalog)
    image = exposure["image"].values
    blank = exposure["mask"].values == 0
    assert np.median(image[blank]) == pytest.approx(visit.sky, rel=0.01)


def test_star_fwhm_matches_the_stored_psf_at_nine_positions():
    config = micro_config(detector_width=512, detector_height=512, dcr_subfilters=0,
                          psf_fwhm_variation=0.2, cosmic_rays_per_megapixel=0.0,
                          bad_columns=0)
    plan = plan_campaign(config)
    catalog = _grid_catalog(config, plan)
    visit, det = plan.visits[0], plan.detectors[0]
    exposure = render_exposure(config, visit, det, catalog)
    psf = exposure.attrs["psf"]
    wcs = detector_wcs(config, visit, det)
    x, y = sky_to_pixel(wcs, catalog.column("ra").to_numpy(), catalog.column("dec").to_numpy())
    image = exposure["image"].values.astype(float)
    measured, model = [], []
    for xi, yi in zip(x, y, strict=True):
        cx, cy = round(xi), round(yi)
        stamp = image[cy - 20:cy + 21, cx - 20:cx + 21]
        measured.append(measure_fwhm(stamp))
        model.append(psf.fwhm(xi, yi))
    measured, model = np.array(measured), np.array(model)
    print("star FWHM / model FWHM at 9 positions:", np.round(measured / model, 4))
    assert len(measured) == 9
    # every position within 3 %
    assert np.all(np.abs(measured / model - 1.0) < 0.03), measured / model
    # and the PSF does vary across the detector (the test is not trivially passed)
    assert np.ptp(model) / model.mean() > 0.03


def test_truth_positions_through_the_wcs_match_centroids():
    config = micro_config(detector_width=512, detector_height=512, dcr_subfilters=0,
                          cosmic_rays_per_megapixel=0.0, bad_columns=0,
                          astrometric_error_arcsec=0.02)
    plan = plan_campaign(config)
    catalog = _grid_catalog(config, plan, n=5, margin=40)
    visit, det = plan.visits[0], plan.detectors[0]
    exposure = render_exposure(config, visit, det, catalog)
    stored = exposure.attrs["wcs"]
    error = np.array(astrometric_error(config, visit, det.id))
    x, y = sky_to_pixel(stored, catalog.column("ra").to_numpy(),
                        catalog.column("dec").to_numpy())
    image = exposure["image"].values.astype(float)
    offsets = []
    for xi, yi in zip(x - error[0], y - error[1], strict=True):
        cx, cy = round(xi), round(yi)
        stamp = image[cy - 15:cy + 16, cx - 15:cx + 16]
        mx, my = centroid(stamp)
        offsets.append((mx + cx - 15 - xi, my + cy - 15 - yi))
    offsets = np.array(offsets)
    rms = float(np.sqrt(np.mean(np.sum(offsets**2, axis=1))))
    print(f"centroid - truth through WCS (error removed): rms {rms:.4f} px over {len(offsets)}")
    assert rms < 0.03, rms
    # the deliberate error is real: without removing it the positions are off by it
    assert np.hypot(*error) > 0.005
    raw = offsets - error  # offsets measured against the uncorrected stored-WCS positions
    assert np.allclose(raw.mean(axis=0), -error, atol=0.01)
    assert np.hypot(*error) * config.pixel_scale <= config.astrometric_error_arcsec


def _find_patch(plan, ra, dec):
    for (tract_id, patch_id), box in plan.patches.items():
        x, y = plan.skymap[tract_id].sky_to_pixel(ra, dec)
        inner = box.grow(-60)
        if np.all(inner.contains(x, y)):
            return tract_id, patch_id, x, y
    raise AssertionError("no patch holds all the test stars")


def test_visit_over_coadd_flux_equals_transparency():
    config = micro_config(cosmic_rays_per_megapixel=0.0, bad_columns=0, n_tracts=1,
                          patch_inner=800)
    plan = plan_campaign(config)
    catalog = _grid_catalog(config, plan, n=3, margin=70, mag=14.2)
    plan.catalog = catalog
    ra, dec = catalog.column("ra").to_numpy(), catalog.column("dec").to_numpy()
    tract_id, patch_id, cx, cy = _find_patch(plan, ra, dec)
    coadd, _ = _coadd_task(plan, tract_id, patch_id)
    coadd_image = coadd["image"].values.astype(float)
    origin = (int(coadd["x"][0]), int(coadd["y"][0]))
    coadd_psf = coadd.attrs["psf"]
    for visit in plan.visits:
        det = plan.detectors[0]
        exposure = render_exposure(config, visit, det, catalog)
        wcs = detector_wcs(config, visit, det)
        x, y = sky_to_pixel(wcs, ra, dec)
        psf = exposure.attrs["psf"]
        ratios, errors = [], []
        for i in range(len(ra)):
            r_v = 3.0 * psf.profile_fwhm(x[i], y[i])
            f_v, n_v = aperture_sum(exposure["image"].values.astype(float), x[i], y[i], r_v)
            f_v /= encircled_energy(psf, x[i], y[i], r_v)
            r_c = 3.0 * coadd_psf.profile_fwhm(cx[i], cy[i])
            f_c, _ = aperture_sum(coadd_image, cx[i], cy[i], r_c, origin=origin)
            f_c /= encircled_energy(coadd_psf, cx[i], cy[i], r_c)
            ratios.append(f_v / f_c)
            sigma_v = math.sqrt(n_v * (visit.sky / config.gain) + f_v / config.gain)
            errors.append(sigma_v / f_c)
        ratios, errors = np.array(ratios), np.array(errors)
        print(f"visit/coadd flux over transparency: mean {ratios.mean() / visit.transparency:.4f}"
              f", per star {np.round(ratios / visit.transparency, 4)}")
        assert np.all(np.abs(ratios - visit.transparency) < 5 * errors + 1e-3)
        assert abs(ratios.mean() / visit.transparency - 1.0) < 0.01, (ratios, visit.transparency)


def test_transient_fluxes_match_truth_in_every_visit():
    config = micro_config(n_transients=16, transient_mag_range=(19.0, 21.0), n_visits=3,
                          campaign_days=20.0)
    plan = plan_campaign(config)
    epochs = truth_tables(plan)["truth_epochs"].to_pandas()
    epochs = epochs[epochs.kind == "transient"]
    checked = 0
    ratios = []
    for visit in plan.visits:
        det = plan.detectors[0]
        with_t = render_exposure(config, visit, det, plan.catalog)
        without = render_exposure(config, visit, det, plan.catalog, include_transients=False)
        difference = with_t["image"].values.astype(float) - without["image"].values
        psf = with_t.attrs["psf"]
        rows = epochs[(epochs.visit == visit.visit) & (epochs.detector == det.id)]
        for row in rows.itertuples():
            radius = 3.0 * psf.profile_fwhm(row.x, row.y)
            if not (radius < row.x < det.box.width - 1 - radius
                    and radius < row.y < det.box.height - 1 - radius):
                continue
            others = rows[rows.id != row.id]
            if np.any(np.hypot(others.x - row.x, others.y - row.y) < 2 * radius):
                continue  # blended with another transient (e.g. two on one host)
            flux, _ = aperture_sum(difference, row.x, row.y, radius)
            flux /= encircled_energy(psf, row.x, row.y, radius)
            if row.flux_counts < 10:
                continue
            ratios.append(flux / row.flux_counts)
            assert flux == pytest.approx(row.flux_counts, rel=0.01), row
            checked += 1
    print(f"transient measured/truth flux: {checked} epochs, max |dev| "
          f"{np.max(np.abs(np.array(ratios) - 1)):.4f}")
    assert checked >= 10


def test_saturation_bleeds_along_columns_and_keeps_the_charge():
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 5.0, (200, 50))
    image[100, 25] = 1_000_000.0
    image[101, 25] = 500_000.0
    total = image[:, 25].sum()
    mask = np.zeros(image.shape, np.uint32)
    n = apply_saturation(image, mask, level=60_000.0, planes=DEFAULT_MASK_PLANES)
    sat = (mask & DEFAULT_MASK_PLANES.bitmask("SAT")) != 0
    assert n == sat.sum() > 20
    _rows, cols = np.nonzero(sat)
    assert set(cols.tolist()) == {25}  # a vertical trail
    assert image.max() <= 60_000.0
    assert image[:, 25].sum() == pytest.approx(total, rel=1e-12)


def test_cosmic_rays_are_repaired_and_flagged_interpolated():
    config = micro_config(detector_width=512, detector_height=512, cosmic_rays_per_megapixel=400.0,
                          bad_columns=0)
    plan = plan_campaign(config)
    visit, det = plan.visits[0], plan.detectors[0]
    exposure = render_exposure(config, visit, det, plan.catalog)
    raw = render_exposure(config.replace(repair_cosmic_rays=False), visit, det, plan.catalog)
    planes = DEFAULT_MASK_PLANES
    mask = exposure["mask"].values
    cr = (mask & planes.bitmask("CR")) != 0
    assert cr.sum() > 100
    # every CR pixel (and only those, beyond saturation) is flagged INTRP as well
    assert np.array_equal(cr, (mask & planes.bitmask("INTRP")) != 0)
    image = exposure["image"].values.astype(float)
    sigma = np.sqrt(exposure["variance"].values.astype(float))
    hits = (raw["image"].values.astype(float) - image)[cr] / sigma[cr]
    # the hits (>= 300 counts) are gone: repaired pixels sit within a few sigma of the
    # noiseless image, untouched pixels are bit-identical
    model = render_exposure(config, visit, det, plan.catalog, noise=False, defects=False)
    residual = (image - model["image"].values)[cr] / sigma[cr]
    print(f"{int(cr.sum())} CR pixels; removed {np.median(hits):.1f} sigma; repaired residual "
          f"median {np.median(residual):+.2f}, robust std {robust_std(residual):.2f}")
    assert np.median(hits) > 5.0
    assert abs(np.median(residual)) < 0.5 and robust_std(residual) < 1.5
    assert np.array_equal(image[~cr], raw["image"].values[~cr])
