"""Tests of the sky map: tract and patch geometry, lookups against brute force, serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.wcs import WCS

from daskdiff.box import Box
from daskdiff.errors import ConfigError, InputError
from daskdiff.skymap import (
    SkyMap,
    Tract,
    TractPatch,
    angular_separation,
    clip_polygon_to_box,
    polygon_area,
)
from daskdiff.wcs import pixel_scale, wcs_from_header, wcs_to_header

# Two overlapping discrete tracts with small patches (8 x 8 patches of 100 px each).
CENTERS = [(150.0, 2.0), (150.16, 2.08)]


@pytest.fixture(scope="module")
def discrete() -> SkyMap:
    return SkyMap.discrete(CENTERS, radius_deg=0.1, pixel_scale_arcsec=1.0,
                           tract_overlap_deg=0.02, patch_inner=100, patch_border=10)


@pytest.fixture(scope="module")
def rings() -> SkyMap:
    return SkyMap.rings(num_rings=3, pixel_scale_arcsec=120.0, tract_overlap_deg=1.0,
                        patch_inner=100, patch_border=5)


def make_detector_wcs(rng: np.random.Generator, ra: float, dec: float, *, width: int,
                      height: int, scale_arcsec: float, sip: bool) -> WCS:
    """A detector WCS centred on (ra, dec), randomly rotated, optionally with SIP distortion."""
    theta = rng.uniform(0, 2 * np.pi)
    scale = scale_arcsec / 3600.0
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(width + 1) / 2.0, (height + 1) / 2.0]
    wcs.wcs.cd = scale * np.array([[-np.cos(theta), np.sin(theta)],
                                   [np.sin(theta), np.cos(theta)]])
    if sip:
        from astropy.wcs import Sip
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        # a few pixels of distortion at the detector edges
        size = max(width, height)
        a[2, 0], a[1, 1], a[0, 2] = rng.normal(0, 1.0, 3) * 12.0 / size**2
        b[2, 0], b[1, 1], b[0, 2] = rng.normal(0, 1.0, 3) * 12.0 / size**2
        a[3, 0], b[0, 3] = rng.normal(0, 1.0, 2) * 24.0 / size**3
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def sample_detector(box: Box, *, step: float = 1.0, edge_step: float = 0.25) -> tuple:
    """Dense pixel positions over a detector box: a grid plus finely sampled edges."""
    xa, xb, ya, yb = box.x0 - 0.5, box.x1 - 0.5, box.y0 - 0.5, box.y1 - 0.5
    gx, gy = np.meshgrid(np.arange(xa, xb + 1e-9, step), np.arange(ya, yb + 1e-9, step))
    ex = np.arange(xa, xb + 1e-9, edge_step)
    ey = np.arange(ya, yb + 1e-9, edge_step)
    x = np.concatenate([gx.ravel(), ex, ex, np.full(ey.size, xa), np.full(ey.size, xb)])
    y = np.concatenate([gy.ravel(), np.full(ex.size, ya), np.full(ex.size, yb), ey, ey])
    return x, y


def brute_force(skymap: SkyMap, wcs: WCS, box: Box) -> dict[tuple[int, int], float]:
    """Depth of the detector in every patch outer box it comes near, by dense sampling.

    Points go to the sky through the detector WCS and into every tract through astropy's WCS
    of the tract (an implementation independent of the sky map's own projection). For each
    ``(tract, patch)`` the result is ``min over points of (distance outside the outer box)``
    in tract pixels, negative when points fall inside: the pair overlaps the detector with a
    tolerance ``m`` if its value is ``< m``.
    """
    x, y = sample_detector(box)
    ra, dec = wcs.all_pix2world(x, y, 0)
    depth: dict[tuple[int, int], float] = {}
    for tract in skymap:
        near = angular_separation(tract.ra, tract.dec, ra, dec) < 80.0
        if not near.any():
            continue
        tx, ty = tract.wcs.all_world2pix(ra[near], dec[near], 0)
        keep = ((tx > -20) & (tx < tract.box.width + 20) & (ty > -20)
                & (ty < tract.box.height + 20))
        tx, ty = tx[keep], ty[keep]
        if tx.size == 0:
            continue
        for patch in tract.patches():
            ob = patch.outer_box
            outside = np.maximum.reduce([ob.x0 - 0.5 - tx, tx - (ob.x1 - 0.5),
                                         ob.y0 - 0.5 - ty, ty - (ob.y1 - 0.5)])
            value = float(outside.min())
            if value < 5.0:
                depth[(tract.id, patch.id)] = value
    return depth


def within(depth: dict[tuple[int, int], float], margin: float) -> set[tuple[int, int]]:
    """The pairs whose outer box, grown by ``margin`` pixels, holds a sampled point."""
    return {key for key, value in depth.items() if value < margin}


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def test_polygon_clipper():
    # a diamond of area 2 centred on (0, 0), clipped to x >= 0: area 1
    x = np.array([1.0, 0.0, -1.0, 0.0])
    y = np.array([0.0, 1.0, 0.0, -1.0])
    assert polygon_area(x, y) == pytest.approx(2.0)
    cx, cy = clip_polygon_to_box(x, y, (0.0, -5.0, 5.0, 5.0))
    assert polygon_area(cx, cy) == pytest.approx(1.0)
    # a concave "L" clipped by a box that only touches its notch
    lx = np.array([0, 4, 4, 1, 1, 0], float)
    ly = np.array([0, 0, 1, 1, 4, 4], float)
    assert polygon_area(lx, ly) == pytest.approx(7.0)
    cx, cy = clip_polygon_to_box(lx, ly, (2.0, 2.0, 3.0, 3.0))
    assert polygon_area(cx, cy) == pytest.approx(0.0)
    cx, cy = clip_polygon_to_box(lx, ly, (0.5, 0.5, 2.0, 2.0))
    assert polygon_area(cx, cy) == pytest.approx(0.5 * 1.5 + 0.5 * 1.0)


@pytest.mark.parametrize("which", ["discrete", "rings"])
def test_tract_projection_matches_astropy(which, discrete, rings):
    rng = np.random.default_rng(3)
    for tract in (discrete if which == "discrete" else rings):
        x = rng.uniform(-0.5, tract.box.width - 0.5, 2000)
        y = rng.uniform(-0.5, tract.box.height - 0.5, 2000)
        ra, dec = tract.pixel_to_sky(x, y)
        ra_ap, dec_ap = tract.wcs.all_pix2world(x, y, 0)
        assert np.max(angular_separation(ra, dec, ra_ap, dec_ap)) * 3600 < 1e-6
        bx, by = tract.sky_to_pixel(ra, dec)
        assert np.max(np.hypot(bx - x, by - y)) < 1e-6
        # the centre of the box is the projection centre, pixel scale as requested
        cra, cdec = tract.pixel_to_sky(*tract.center_pixel)
        assert angular_separation(cra, cdec, tract.ra, tract.dec) * 3600 < 1e-8
        scale = tract.pixel_scale_arcsec
        if abs(tract.dec) < 89.0:  # daskdiff.wcs.local_jacobian divides by cos(dec)
            assert pixel_scale(tract.wcs, *tract.center_pixel) == pytest.approx(scale, rel=1e-6)
        # the WCS survives a FITS header round trip (LONPOLE kept: tracts on a pole)
        back = wcs_from_header(wcs_to_header(tract.wcs))
        ra_h, dec_h = back.all_pix2world(x, y, 0)
        assert np.max(angular_separation(ra, dec, ra_h, dec_h)) * 3600 < 1e-6


@pytest.mark.parametrize("which", ["discrete", "rings"])
def test_patches_tile_tract(which, discrete, rings):
    skymap = discrete if which == "discrete" else rings
    for tract in list(skymap)[:6]:
        nx, ny = tract.n_patches
        assert tract.box.x0 == tract.box.y0 == 0
        assert tract.box.width == nx * tract.patch_inner
        assert tract.box.height == ny * tract.patch_inner
        coverage = np.zeros(tract.box.shape, dtype=np.int32)
        patches = list(tract.patches())
        assert [p.id for p in patches] == list(range(nx * ny))
        for patch in patches:
            ix, iy = patch.index
            assert patch.id == iy * nx + ix
            assert tract.patch(patch.id) == patch == tract.patch((ix, iy))
            assert patch.inner_box.shape == (tract.patch_inner, tract.patch_inner)
            coverage[patch.inner_box.slices((0, 0))] += 1
            expected = patch.inner_box.grow(tract.patch_border).intersection(tract.box)
            assert patch.outer_box == expected
            assert tract.box.contains_box(patch.outer_box)
            # interior patches have the full border on every side
            if 0 < ix < nx - 1 and 0 < iy < ny - 1:
                assert patch.outer_box.width == tract.patch_inner + 2 * tract.patch_border
        # inner boxes partition the tract box: every pixel exactly once
        assert coverage.min() == 1 and coverage.max() == 1


def test_discrete_tracts_cover_their_regions(discrete):
    rng = np.random.default_rng(5)
    for tract in discrete:
        assert tract.id == CENTERS.index((tract.ra, tract.dec))
        # random points inside the inner region are well inside the tract box
        n = 4000
        r = 0.1 * np.sqrt(rng.uniform(0, 1, n))
        phi = rng.uniform(0, 2 * np.pi, n)
        ra = tract.ra + r * np.cos(phi) / np.cos(np.deg2rad(tract.dec))
        dec = tract.dec + r * np.sin(phi)
        inside = angular_separation(tract.ra, tract.dec, ra, dec) <= 0.1
        x, y = tract.sky_to_pixel(ra[inside], dec[inside])
        overlap_px = 0.02 * 3600.0
        assert x.min() > overlap_px - 1 and y.min() > overlap_px - 1
        assert x.max() < tract.box.width - overlap_px and y.max() < tract.box.height - overlap_px
        homes = [discrete.find_tract(a, d).id for a, d in zip(ra[:50], dec[:50], strict=True)]
        # the home tract is the nearest centre
        seps = angular_separation(np.array(CENTERS)[:, 0][None, :],
                                  np.array(CENTERS)[:, 1][None, :],
                                  ra[:50, None], dec[:50, None])
        assert homes == list(np.argmin(seps, axis=1))
    with pytest.raises(InputError, match="no tract"):
        discrete.find_tract(10.0, -40.0)


def test_rings_tessellate_the_sky(rings):
    rng = np.random.default_rng(11)
    n = 5000
    ra = rng.uniform(0, 360, n)
    dec = np.rad2deg(np.arcsin(rng.uniform(-1, 1, n)))
    # add the poles, ring edges and the RA wrap
    height = 180.0 / 4
    edges = -90 + height / 2 + height * np.arange(4)
    ra = np.concatenate([ra, [0.0, 123.0, 359.999999, 0.0, 180.0], np.full(4, 359.9999)])
    dec = np.concatenate([dec, [-90.0, 90.0, 0.0, 0.0, -89.9999], edges])
    overlap_px = 1.0 * 3600 / 120.0
    for a, d in zip(ra, dec, strict=True):
        homes = [t for t in rings.find_tracts(a, d)]
        assert len(homes) == 1, (a, d, [t.id for t in homes])
        tract = homes[0]
        x, y = tract.sky_to_pixel(a, d)
        # inside the tract box with at least the tract overlap to spare
        assert overlap_px - 1 <= x <= tract.box.width - overlap_px
        assert overlap_px - 1 <= y <= tract.box.height - overlap_px
    # neighbouring tracts overlap: a point just across a tract's RA edge is in both boxes
    tract = rings[5]
    region = tract.region
    a, d = region.ra_min - 0.2, (region.dec_min + region.dec_max) / 2
    assert rings.find_tract(a, d).id != tract.id and bool(tract.contains(a, d))


def test_rings_size_like_lsst():
    skymap = SkyMap.rings(num_rings=120, pixel_scale_arcsec=0.2)
    assert len(skymap) == 18936  # LSST's rings map with 120 rings has 18938 (different rounding)
    tract = skymap[9000]
    assert tract.n_patches == (7, 7)  # ~1.5 deg tracts of 4000 px patches at 0.2"/px


# --------------------------------------------------------------------------------------------
# lookups against brute force
# --------------------------------------------------------------------------------------------


def test_find_patches_matches_brute_force(discrete):
    rng = np.random.default_rng(2024)
    mid_ra = (CENTERS[0][0] + CENTERS[1][0]) / 2
    mid_dec = (CENTERS[0][1] + CENTERS[1][1]) / 2
    exact = straddle = empty = 0
    n_cases = 50
    for case in range(n_cases):
        width, height = (int(v) for v in rng.integers(40, 220, 2))
        if case < 10:  # straddling the two tracts
            ra, dec = mid_ra + rng.normal(0, 0.01), mid_dec + rng.normal(0, 0.01)
        else:
            ra = mid_ra + rng.uniform(-0.2, 0.2)
            dec = mid_dec + rng.uniform(-0.16, 0.16)
        wcs = make_detector_wcs(rng, ra, dec, width=width, height=height,
                                scale_arcsec=rng.uniform(0.6, 1.2), sip=case % 2 == 0)
        box = Box(0, 0, width, height)
        found = set(discrete.find_patches(wcs, box))
        depth = brute_force(discrete, wcs, box)
        strict, loose = within(depth, -1.0), within(depth, 2.0)
        assert strict <= found <= loose, (case, strict - found, found - loose)
        exact += found == within(depth, 0.0)
        straddle += len({t for t, _ in found}) == 2
        empty += not found
    assert straddle >= 10 and empty <= 10
    # sub-pixel slivers aside, the answers are identical
    assert exact >= 0.9 * n_cases


def test_find_patches_parent_frame_box(discrete):
    """A detector box not starting at (0, 0) is traced in its parent frame."""
    rng = np.random.default_rng(8)
    wcs = make_detector_wcs(rng, 150.08, 2.04, width=150, height=90, scale_arcsec=1.0, sip=False)
    wcs.wcs.crpix = wcs.wcs.crpix + np.array([1000.0, -200.0])
    box = Box(1000, -200, 150, 90)
    found = set(discrete.find_patches(wcs, box))
    assert len(found) >= 2
    assert found == within(brute_force(discrete, wcs, box), 0.0)
    # the same detector at origin (0, 0) with an unshifted WCS gives the same answer
    wcs0 = wcs.deepcopy()
    wcs0.wcs.crpix = wcs.wcs.crpix - np.array([1000.0, -200.0])
    assert set(discrete.find_patches(wcs0, Box(0, 0, 150, 90))) == found


def test_find_patches_outside_sky_map(discrete):
    rng = np.random.default_rng(9)
    wcs = make_detector_wcs(rng, 200.0, -30.0, width=100, height=100, scale_arcsec=1.0, sip=False)
    assert discrete.find_patches(wcs, Box(0, 0, 100, 100)) == []
    with pytest.raises(InputError, match="empty"):
        discrete.find_patches(wcs, Box(0, 0, 0, 10))


def test_find_patches_rings_brute_force(rings):
    rng = np.random.default_rng(77)
    # at the RA wrap, at the poles, on ring edges and random places
    height = 180.0 / 4
    places = [(0.0, 0.0), (359.5, 1.0), (10.0, 89.0), (200.0, -88.5),
              (0.0, -90 + height / 2), (45.0, -90 + 1.5 * height), (30.0 * 0.5, 22.5)]
    places += [(rng.uniform(0, 360), np.rad2deg(np.arcsin(rng.uniform(-1, 1)))) for _ in range(5)]
    multi = 0
    for ra, dec in places:
        size = int(rng.integers(40, 120))
        wcs = make_detector_wcs(rng, ra, dec, width=size, height=size + 10,
                                scale_arcsec=rng.uniform(60.0, 110.0), sip=True)
        box = Box(0, 0, size, size + 10)
        found = set(rings.find_patches(wcs, box))
        depth = brute_force(rings, wcs, box)
        strict, loose = within(depth, -1.0), within(depth, 2.0)
        assert found and strict <= found <= loose, ((ra, dec), strict - found, found - loose)
        multi += len({t for t, _ in found}) > 1
    assert multi >= 4  # edges, wrap and poles straddle tracts


# --------------------------------------------------------------------------------------------
# serialisation and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["discrete", "rings"])
def test_round_trip(which, discrete, rings):
    skymap = discrete if which == "discrete" else rings
    text = json.dumps(skymap.to_dict())
    back = SkyMap.from_dict(json.loads(text))
    assert back == skymap
    assert back.kind == skymap.kind and back.config == skymap.config
    for tract in skymap:
        assert back[tract.id] == tract
    rng = np.random.default_rng(1)
    wcs = make_detector_wcs(rng, 150.08, 2.04, width=120, height=100, scale_arcsec=1.0,
                            sip=True)
    assert back.find_patches(wcs, Box(0, 0, 120, 100)) == skymap.find_patches(
        wcs, Box(0, 0, 120, 100))
    assert all(isinstance(tp, TractPatch) for tp in skymap.find_patches(wcs, Box(0, 0, 120, 100)))


def test_bad_inputs(discrete):
    with pytest.raises(ConfigError, match="radius_deg"):
        SkyMap.discrete([(0, 0)], radius_deg=-1)
    with pytest.raises(ConfigError, match="patch_inner"):
        SkyMap.discrete([(0, 0)], radius_deg=0.1, patch_inner=0)
    with pytest.raises(ConfigError, match="centre"):
        SkyMap.discrete([(0, 95)], radius_deg=0.1)
    with pytest.raises(ConfigError, match="num_rings"):
        SkyMap.rings(num_rings=1)
    with pytest.raises(InputError, match="not a daskdiff sky map"):
        SkyMap.from_dict({"tracts": []})
    with pytest.raises(InputError, match="version"):
        SkyMap.from_dict({"format": "daskdiff-skymap", "version": 99})
    with pytest.raises(InputError, match="tract 7"):
        discrete[7]
    tract = discrete[0]
    nx, ny = tract.n_patches
    for bad in (nx * ny, -1, (nx, 0), (0, -1)):
        with pytest.raises(InputError, match="not in tract 0"):
            tract.patch(bad)
    with pytest.raises(InputError, match="whole number"):
        Tract(id=0, ra=0, dec=0, pixel_scale_arcsec=1, box=Box(0, 0, 150, 100),
              patch_inner=100, patch_border=0, region=tract.region)
