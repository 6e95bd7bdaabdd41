"""Templates: GetTemplate across patches and tracts, GetDcrTemplate, any exposure as template.

The scene: two tracts of a discrete sky map, coadd patches rendered from a known sky (a smooth
background plus Gaussian-PSF stars) with noise drawn once per tract on the tract grid (so that
overlapping patch borders share their pixels, as real coadd patches do), and a rotated, distorted
science detector that straddles the two tracts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from daskdiff import (
    Box,
    InputError,
    NoWorkError,
    PhotoCalib,
    VisitInfo,
    load,
    make_exposure,
    mask_of,
    replace_metadata,
)
from daskdiff.dcr import dcr_shifts, parallactic_angle
from daskdiff.errors import ConfigError
from daskdiff.psf import GaussianPsf
from daskdiff.repository import Repository
from daskdiff.skymap import SkyMap
from daskdiff.template import (
    GetDcrTemplateConfig,
    GetTemplateConfig,
    _coadd_patches,
    _mapped_box,
    _tract_owners,
    assemble_template,
    get_template,
    high_variance_mask,
    merge_exposures,
)
from daskdiff.warp import warp_exposure
from daskdiff.wcs import pixel_to_sky, sky_to_pixel

from .conftest import make_tan_wcs, tract_one_nearer

RA0, DEC0 = 55.0, -30.0
SEPARATION = 0.05  # deg between tract centres (along RA)
NOISE = 2.0
CALIB = PhotoCalib(njy_per_count=0.5)
COADD_PSF = GaussianPsf(sigma=1.6)
DETECTOR = Box(0, 0, 420, 360)


def _skymap():
    dra = SEPARATION / math.cos(math.radians(DEC0))
    return SkyMap.discrete([(RA0, DEC0), (RA0 + dra, DEC0)], radius_deg=0.03,
                           pixel_scale_arcsec=0.2, tract_overlap_deg=0.004, patch_inner=300,
                           patch_border=30)


def _stars(seed=3, n=60):
    rng = np.random.default_rng(seed)
    dra = SEPARATION / math.cos(math.radians(DEC0))
    ra = RA0 + dra / 2 + rng.uniform(-0.02, 0.02, n)
    dec = DEC0 + rng.uniform(-0.015, 0.015, n)
    flux = 10 ** rng.uniform(2.5, 4.0, n)
    return ra, dec, flux


def _background(ra, dec):
    return 40.0 + 8.0 * np.sin((ra - RA0) * 300.0) * np.cos((dec - DEC0) * 250.0)


def _science_wcs():
    dra = SEPARATION / math.cos(math.radians(DEC0))
    return make_tan_wcs(ra=RA0 + dra / 2, dec=DEC0 + 0.001, crpix=(210, 180),
                        rotation_deg=25.0, sip=True)


def _science(band="g"):
    info = VisitInfo(visit=7, detector=3, band=band, physical_filter=f"{band}_sim")
    return make_exposure(np.zeros(DETECTOR.shape), variance=np.ones(DETECTOR.shape),
                         wcs=_science_wcs(), visit_info=info, chunks=None)


def _render(tract, box, stars, psf, *, flux_scale=1.0):
    """Noiseless sky on a tract-frame box: background + stars drawn with ``psf``."""
    xs, ys = np.meshgrid(box.xs(), box.ys())
    ra, dec = tract.pixel_to_sky(xs.ravel(), ys.ravel())
    image = _background(ra, dec).reshape(box.shape)
    sx, sy = tract.sky_to_pixel(stars[0], stars[1])
    for x, y, flux in zip(sx, sy, stars[2], strict=True):
        stamp, sbox = psf.image(x, y, size=21)
        overlap = sbox.intersection(box)
        if overlap.is_empty:
            continue
        image[overlap.slices(origin=(box.x0, box.y0))] += (
            flux_scale * flux * stamp[overlap.slices(origin=(sbox.x0, sbox.y0))])
    return image


def _make_repo(path, *, skip=(), nan_blocks=False, calib_for=None, dcr=False, seed=11):
    repo = Repository.create(path)
    skymap = _skymap()
    repo.put_skymap(skymap)
    stars = _stars()
    science_box = DETECTOR.grow(20)
    wanted = skymap.find_patches(_science_wcs(), science_box)
    by_tract = {}
    for tract_id, patch_id in wanted:
        by_tract.setdefault(tract_id, []).append(patch_id)
    for tract_id, patch_ids in by_tract.items():
        tract = skymap[tract_id]
        union = Box(0, 0, 0, 0)
        for pid in patch_ids:
            union = union.union(tract.patch(pid).outer_box)
        noise = np.random.default_rng([seed, tract_id]).normal(0, NOISE, union.shape)
        for pid in patch_ids:
            if (tract_id, pid) in skip:
                continue
            box = tract.patch(pid).outer_box
            planes = box.slices(origin=(union.x0, union.y0))
            calib = (calib_for or {}).get((tract_id, pid), CALIB)
            info = VisitInfo(band="g", physical_filter="g_sim")
            if dcr:
                for sub in range(3):
                    flux_scale = 1.0 if sub == 0 else 0.0  # all starlight in the blue sub-filter
                    image = _render(tract, box, stars, COADD_PSF, flux_scale=flux_scale) / 3
                    exposure = make_exposure(image + noise[planes] / 3,
                                             variance=np.full(box.shape, (NOISE / 3) ** 2),
                                             x0=box.x0, y0=box.y0, wcs=tract.wcs,
                                             psf=COADD_PSF, photo_calib=calib, visit_info=info)
                    repo.put_exposure(exposure, "dcrCoadd", tract=tract_id, patch=pid,
                                      band="g", subfilter=sub)
                continue
            image = _render(tract, box, stars, COADD_PSF) + noise[planes]
            variance = np.full(box.shape, NOISE**2)
            if nan_blocks:
                cy, cx = box.height // 2, box.width // 2
                variance[cy - 3:cy + 4, cx - 3:cx + 4] = np.nan
            exposure = make_exposure(image, variance=variance, x0=box.x0, y0=box.y0,
                                     wcs=tract.wcs, psf=COADD_PSF, photo_calib=calib,
                                     visit_info=info)
            repo.put_exposure(exposure, "goodSeeingCoadd", tract=tract_id, patch=pid, band="g")
    return repo, wanted


@pytest.fixture(scope="module")
def repo_and_patches(tmp_path_factory):
    return _make_repo(tmp_path_factory.mktemp("template") / "repo")


@pytest.fixture(scope="module")
def template(repo_and_patches):
    repo, _ = repo_and_patches
    return load(get_template(_science(), repo, config=GetTemplateConfig(tile_size=200)))


def _truth(template):
    """The truth sky rendered with the template PSF on the template grid."""
    wcs = template.attrs["wcs"]
    box = template.dd.box
    xs, ys = np.meshgrid(box.xs(), box.ys())
    ra, dec = pixel_to_sky(wcs, xs.ravel(), ys.ravel())
    image = _background(ra, dec).reshape(box.shape)
    stars = _stars()
    sx, sy = sky_to_pixel(wcs, stars[0], stars[1])
    psf = template.attrs["psf"]
    for x, y, flux in zip(sx, sy, stars[2], strict=True):
        if not box.grow(10).contains(x, y):
            continue
        stamp, sbox = psf.image(x, y, size=21)
        overlap = sbox.intersection(box)
        image[overlap.slices(origin=(box.x0, box.y0))] += (
            flux * stamp[overlap.slices(origin=(sbox.x0, sbox.y0))])
    return image


def test_metadata(template, repo_and_patches):
    _, wanted = repo_and_patches
    assert template.dd.box == DETECTOR.grow(20)
    assert template.attrs["photo_calib"] == CALIB
    assert template.attrs["visit_info"].band == "g"
    assert template.attrs["visit_info"].visit == 7
    assert {t for t, _ in wanted} == {0, 1}, "the detector must straddle both tracts"
    assert len(template.attrs["psf"]) == len(wanted)
    assert np.isfinite(template["image"].values).all()


def test_equals_truth_within_noise_and_no_seam(template):
    good = ~mask_of(template, "NO_DATA", "HIGH_VARIANCE").values
    residual = (template["image"].values - _truth(template))[good]
    sigma = np.sqrt(template["variance"].values[good])
    n = residual.size
    assert n > 0.95 * good.size
    assert abs(residual.mean()) < 5 * sigma.mean() / math.sqrt(n)
    assert residual.std() == pytest.approx(np.sqrt(np.mean(sigma**2)), rel=0.10)
    owner = tract_one_nearer(_skymap(), template)[good]
    assert 0.1 < owner.mean() < 0.9
    # statistics in a strip along the seam equal those elsewhere
    from scipy import ndimage

    full_owner = tract_one_nearer(_skymap(), template)
    seam = ndimage.binary_dilation(full_owner ^ ndimage.binary_erosion(full_owner), iterations=15)
    strip = seam[good]
    for part in (strip, ~strip):
        r, s = residual[part], sigma[part]
        assert abs(r.mean()) < 5 * s.mean() / math.sqrt(r.size)
        assert r.std() == pytest.approx(np.sqrt(np.mean(s**2)), rel=0.10)


def test_chunking_does_not_change_the_template(repo_and_patches, template):
    repo, _ = repo_and_patches
    whole = load(get_template(_science(), repo, config=GetTemplateConfig(tile_size=2048)))
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(whole[name].values, template[name].values)


def _step_by_step(science, patches, config):
    """The template built stage by stage from the public pieces (merge, warp, merge, flag)."""
    wcs = science.attrs["wcs"]
    box = science.dd.box.grow(config.border)
    owner = (_tract_owners(wcs, box, patches)
             if config.tract_merge == "nearest" and len(patches) > 1 else None)
    warped = []
    for index, tract_id in enumerate(sorted(patches)):
        group = patches[tract_id]
        union = Box(0, 0, 0, 0)
        for patch in group:
            union = union.union(patch.dd.box)
        half = int(config.warp_kernel[-1]) if config.warp_kernel.startswith("lanczos") else 1
        region = _mapped_box(wcs, box, group[0].attrs["wcs"]).grow(half + 5).intersection(union)
        merged = merge_exposures(group, region, tile_size=config.tile_size)
        warped.append(warp_exposure(merged, wcs, box, kernel=config.warp_kernel,
                                    chunks=config.tile_size,
                                    select=None if owner is None else owner.selection(index)))
    merged = merge_exposures(warped, box, tile_size=config.tile_size, owner=owner)
    return load(high_variance_mask(merged))


@pytest.mark.parametrize("config", [GetTemplateConfig(tile_size=256),
                                    GetTemplateConfig(tile_size=200, tract_merge="weighted")])
def test_fused_assembly_equals_step_by_step(repo_and_patches, config):
    repo, _ = repo_and_patches
    science = _science()
    patches = _coadd_patches(science, repo, config)
    assert len(patches) > 1
    fused = load(assemble_template(science, patches, config=config))
    reference = _step_by_step(science, patches, config)
    np.testing.assert_array_equal(fused["mask"].values, reference["mask"].values)
    for name in ("image", "variance"):  # same kernels: equal to float32 rounding
        np.testing.assert_allclose(fused[name].values, reference[name].values, rtol=2e-7,
                                   atol=0)


def test_weighted_tract_merge(repo_and_patches, template):
    repo, _ = repo_and_patches
    weighted = load(get_template(_science(), repo,
                                 config=GetTemplateConfig(tract_merge="weighted")))
    good = ~mask_of(weighted, "NO_DATA").values
    residual = (weighted["image"].values - _truth(weighted))[good]
    sigma = np.sqrt(weighted["variance"].values[good])
    assert abs(residual.mean()) < 5 * sigma.mean() / math.sqrt(residual.size)


def _hole(template, wanted, missing):
    """Pixels whose sky position only the ``missing`` patch covers."""
    skymap = _skymap()
    box = template.dd.box
    xs, ys = np.meshgrid(box.xs(), box.ys())
    ra, dec = pixel_to_sky(template.attrs["wcs"], xs.ravel(), ys.ravel())
    inside = np.zeros(ra.shape, bool)
    others = np.zeros(ra.shape, bool)
    for t, p in wanted:
        u, v = skymap[t].sky_to_pixel(ra, dec)
        covered = np.asarray(skymap.patch(t, p).outer_box.contains(u, v))
        if (t, p) == missing:
            inside = covered
        else:
            others |= covered
    return (inside & ~others).reshape(box.shape)


def test_missing_patch_gives_no_data_over_its_footprint(tmp_path, repo_and_patches, template):
    _, wanted = repo_and_patches
    # tract 0 only (as the LSST test): remove tract 1 and the patch leaving the largest hole
    tract0 = [tp for tp in wanted if tp.tract_id == 0]
    missing = max(tract0, key=lambda tp: _hole(template, tract0, tp).sum())
    hole = _hole(template, tract0, missing)
    skip = {missing} | {tp for tp in wanted if tp.tract_id == 1}
    repo, _ = _make_repo(tmp_path / "repo", skip=skip)
    template = load(get_template(_science(), repo, config=GetTemplateConfig(tile_size=200)))
    no_data = mask_of(template, "NO_DATA").values
    assert hole.sum() > 100
    assert no_data[hole].all(), "every pixel of the hole is NO_DATA"
    from scipy import ndimage

    remaining = [tp for tp in tract0 if tp != missing]
    covered = np.zeros_like(hole)
    for tp in remaining:
        covered |= _hole(template, [tp], tp)
    uncovered = ~covered
    square = np.ones((3, 3), bool)  # the warping kernel's footprint is a square
    assert not no_data[~ndimage.binary_dilation(uncovered, square, iterations=4)].any(), (
        "NO_DATA only where no remaining patch covers the pixel (+ the warping kernel)")
    assert no_data[ndimage.binary_erosion(uncovered, iterations=1)].all()
    assert np.isfinite(template["image"].values).all()
    assert np.isfinite(template["variance"].values).all()


def test_nan_variance_blocks_give_finite_output(tmp_path):
    repo, _ = _make_repo(tmp_path / "repo", nan_blocks=True)
    template = load(get_template(_science(), repo))
    assert np.isfinite(template["image"].values).all()
    assert np.isfinite(template["variance"].values).all()


def test_bad_inputs(tmp_path, repo_and_patches):
    repo, wanted = repo_and_patches
    no_wcs = replace_metadata(_science(), wcs=None)
    with pytest.raises(InputError, match="no WCS"):
        get_template(no_wcs, repo)
    with pytest.raises(InputError, match="band mismatch"):
        get_template(_science(band="r"), repo)
    far = replace_metadata(_science(), wcs=make_tan_wcs(ra=200.0, dec=10.0))
    with pytest.raises(NoWorkError):
        get_template(far, repo)
    bad_calib = {wanted[0]: PhotoCalib(njy_per_count=0.7)}
    other, _ = _make_repo(tmp_path / "calib", calib_for=bad_calib)
    with pytest.raises(InputError, match="different photometric calibrations"):
        get_template(_science(), other)
    with pytest.raises(ConfigError, match="did you mean 'border'"):
        GetTemplateConfig.from_mapping({"boarder": 3})
    with pytest.raises(ConfigError, match="missing required value 'effectiveWavelength'"):
        GetDcrTemplateConfig.from_mapping({"bandwidth": 147.0})
    with pytest.raises(ConfigError, match="warpKernel"):
        GetTemplateConfig.from_mapping({"warpKernel": "cubic"})


def test_any_exposure_as_template(repo_and_patches, template):
    """A single coadd patch used directly as "any exposure" matches GetTemplate where it covers."""
    repo, wanted = repo_and_patches
    ref = repo.query("goodSeeingCoadd", tract=wanted[0].tract_id, patch=wanted[0].patch_id)[0]
    patch = repo.get_exposure(ref)
    direct = load(get_template(_science(), patch))
    assert direct.dd.box == template.dd.box
    good = ~mask_of(direct, "NO_DATA").values
    assert 0.01 < good.mean() < 1
    residual = (direct["image"].values - _truth(direct))[good]
    sigma = np.sqrt(direct["variance"].values[good])
    assert abs(residual.mean()) < 5 * sigma.mean() / math.sqrt(residual.size)


def test_merge_is_sigma_weighted():
    a = make_exposure(np.full((4, 4), 10.0), variance=np.full((4, 4), 4.0), chunks=None)
    b = make_exposure(np.full((4, 4), 20.0), variance=np.full((4, 4), 1.0), chunks=None)
    merged = load(merge_exposures([a, b], Box(0, 0, 4, 4)))
    # weights 1/2 and 1: image (5 + 20) / 1.5, variance (2 + 1) / 1.5
    np.testing.assert_allclose(merged["image"].values, 25 / 1.5, rtol=1e-6)
    np.testing.assert_allclose(merged["variance"].values, 2.0, rtol=1e-6)


def test_dcr_template_displaces_blue_light(tmp_path):
    repo, _ = _make_repo(tmp_path / "dcr", dcr=True)
    site_lat = -30.244639
    elevation, azimuth = 50.0, 40.0
    info = VisitInfo(visit=7, detector=3, band="g", physical_filter="g_sim",
                     elevation=elevation, azimuth=azimuth,
                     airmass=1 / math.sin(math.radians(elevation)),
                     parallactic_angle=parallactic_angle(azimuth, elevation, site_lat),
                     rotation_angle=0.0)
    science = replace_metadata(_science(), visit_info=info)
    config = GetDcrTemplateConfig(effective_wavelength=476.31, bandwidth=147.0)
    template = load(get_template(science, repo, config=config))
    zenith_info = info.replace(elevation=90.0, airmass=1.0)
    flat = load(get_template(replace_metadata(_science(), visit_info=zenith_info), repo,
                             config=config))
    expected_dy, expected_dx = dcr_shifts(info, pixel_scale=0.2, effective_wavelength=476.31,
                                          bandwidth=147.0)[0]
    # cross-correlate the two templates: the offset is the blue sub-filter's DCR shift
    from daskdiff.psf.measure import centroid

    wcs = template.attrs["wcs"]
    box = template.dd.box
    stars = _stars()
    sx, sy = sky_to_pixel(wcs, stars[0], stars[1])
    offsets = []
    for x, y, flux in zip(sx, sy, stars[2], strict=True):
        if flux < 3000 or not box.grow(-15).contains(x, y):
            continue
        ix, iy = round(x) - box.x0, round(y) - box.y0
        a = template["image"].values[iy - 7:iy + 8, ix - 7:ix + 8]
        b = flat["image"].values[iy - 7:iy + 8, ix - 7:ix + 8]
        ca, cb = centroid(a - np.median(a)), centroid(b - np.median(b))
        offsets.append((ca[1] - cb[1], ca[0] - cb[0]))
    assert len(offsets) >= 3
    dy, dx = np.median(offsets, axis=0)
    assert math.hypot(expected_dy, expected_dx) > 0.5
    assert dy == pytest.approx(expected_dy, abs=0.1)
    assert dx == pytest.approx(expected_dx, abs=0.1)
