"""Resampling onto another WCS: mapping accuracy, interpolation, masks and chunk invariance."""

from __future__ import annotations

import numpy as np
import pytest

from daskdiff import Box, ConfigError, NoWorkError, load, make_exposure, mask_of
from daskdiff.warp import (
    PixelMapping,
    kernel_weights,
    mapping_error,
    resample_block,
    source_spans,
    warp_exposure,
)
from daskdiff.wcs import pixel_to_sky, sky_to_pixel

from .conftest import make_tan_wcs

SRC_WCS = make_tan_wcs(ra=55.0, dec=-30.0, crpix=(500, 500))
DST_WCS = make_tan_wcs(ra=55.0003, dec=-30.0002, crpix=(400, 400), rotation_deg=17.0,
                       sip=True, scale_arcsec=0.21)
DST_BOX = Box(100, 150, 600, 500)


def _smooth(u, v):
    return 100.0 + 50.0 * np.sin(u / 37.0) * np.cos(v / 53.0)


def _source(shape=(1000, 1000), *, chunks=256):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return make_exposure(_smooth(xx, yy), variance=np.full(shape, 4.0), wcs=SRC_WCS,
                         chunks=chunks)


def test_mapping_interpolation_error_below_a_hundredth_pixel():
    strong = make_tan_wcs(ra=55.0003, dec=-30.0002, crpix=(400, 400), rotation_deg=17.0,
                          sip=True)
    strong.sip.a[2, 0] *= 50  # a distortion of several pixels across the box
    strong.sip.b[0, 2] *= 50
    mapping = PixelMapping.from_wcs(strong, DST_BOX, SRC_WCS, interp_length=100)
    assert mapping_error(mapping, strong, SRC_WCS, n=2000) < 0.01


@pytest.mark.parametrize("name", ["bilinear", "lanczos3", "lanczos5"])
def test_kernel_weights_normalised_and_exact_at_integers(name):
    frac = np.linspace(0, 0.999, 50)
    weights = kernel_weights(name, frac)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, atol=1e-12)
    at_zero = kernel_weights(name, np.zeros(1))[:, 0]
    assert at_zero.max() == pytest.approx(1.0) and np.count_nonzero(at_zero) == 1


def test_unknown_kernel():
    with pytest.raises(ConfigError, match="unknown warping kernel"):
        warp_exposure(_source(), DST_WCS, DST_BOX, kernel="cubic-ish")


def test_smooth_field_is_interpolated_accurately():
    # a surface brightness: pixel values conserved
    warped = load(warp_exposure(_source(), DST_WCS, DST_BOX, chunks=256, conserve_flux=False))
    xx, yy = np.meshgrid(DST_BOX.xs(), DST_BOX.ys())
    ra, dec = pixel_to_sky(DST_WCS, xx.ravel(), yy.ravel())
    u, v = sky_to_pixel(SRC_WCS, ra, dec)
    truth = _smooth(u, v).reshape(xx.shape)
    good = warped["mask"].values == 0
    assert good.mean() > 0.99
    assert np.abs(warped["image"].values - truth)[good].max() < 0.05
    # white noise of variance 4 resampled by lanczos3: sum of squared weights < 1
    var = warped["variance"].values[good]
    assert 1.0 < np.median(var) < 4.0


def test_identity_warp_is_exact():
    src = _source((300, 300), chunks=100)
    box = Box(10, 20, 250, 260)
    warped = load(warp_exposure(src, SRC_WCS, box, chunks=64))
    expected = load(src)["image"].values[20:280, 10:260]
    inner = (slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(warped["image"].values[inner], expected[inner], rtol=0, atol=1e-3)
    np.testing.assert_allclose(warped["variance"].values[inner], 4.0, rtol=1e-5)


def test_chunking_does_not_change_the_result():
    source = _source(chunks=300)
    a = load(warp_exposure(source, DST_WCS, DST_BOX, chunks=128))
    b = load(warp_exposure(source, DST_WCS, DST_BOX, chunks=1000))
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_no_data_outside_and_nan_blocks_stay_finite():
    src = load(_source((400, 400), chunks=None))
    src["variance"].values[200:207, 200:207] = np.nan
    src["image"].values[100:103, 300:303] = np.nan
    warped = load(warp_exposure(src, DST_WCS, DST_BOX, chunks=200))
    assert np.isfinite(warped["image"].values).all()
    assert np.isfinite(warped["variance"].values).all()
    no_data = mask_of(warped, "NO_DATA").values
    assert 0 < no_data.mean() < 1
    # every destination pixel mapping outside the source is NO_DATA
    xx, yy = np.meshgrid(DST_BOX.xs(), DST_BOX.ys())
    ra, dec = pixel_to_sky(DST_WCS, xx.ravel(), yy.ravel())
    u, v = sky_to_pixel(SRC_WCS, ra, dec)
    outside = ((u < -0.5) | (u > 399.5) | (v < -0.5) | (v > 399.5)).reshape(xx.shape)
    assert no_data[outside].all()
    assert (warped["image"].values[no_data] == 0).all()


def test_no_overlap_is_no_work():
    far = make_tan_wcs(ra=120.0, dec=10.0)
    with pytest.raises(NoWorkError, match="does not overlap"):
        warp_exposure(_source((200, 200)), far, Box(0, 0, 100, 100))


def test_shift_matches_direct_lanczos_sum():
    """The compiled warp (tabulated weights, interpolated mapping) equals the exact sum."""
    src = _source((300, 300), chunks=100)
    dx, dy = 0.37, -0.81  # a pure sub-pixel shift: destination (x, y) -> source (x+dx, y+dy)
    dest = make_tan_wcs(ra=55.0, dec=-30.0, crpix=(500 - dx, 500 - dy))
    box = Box(20, 30, 200, 180)
    warped = load(warp_exposure(src, dest, box, chunks=64))
    image = load(src)["image"].values
    xx, yy = np.meshgrid(box.xs(), box.ys())
    ra, dec = pixel_to_sky(dest, xx.ravel(), yy.ravel())
    u, v = sky_to_pixel(SRC_WCS, ra, dec)
    ui, vi = np.floor(u).astype(int), np.floor(v).astype(int)
    wx = kernel_weights("lanczos3", u - ui)
    wy = kernel_weights("lanczos3", v - vi)
    expected = np.zeros(u.size)
    for j in range(6):
        for i in range(6):
            expected += wy[j] * wx[i] * image[vi + j - 2, ui + i - 2]
    np.testing.assert_allclose(warped["image"].values.ravel(), expected, rtol=0, atol=2e-4)


def test_selected_pixels_only():
    source = _source(chunks=300)
    full = load(warp_exposure(source, DST_WCS, DST_BOX, chunks=128))

    def left_half(box):
        return np.broadcast_to(box.xs() < DST_BOX.x0 + 250, box.shape)

    part = load(warp_exposure(source, DST_WCS, DST_BOX, chunks=128, select=left_half))
    chosen = left_half(DST_BOX)
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(part[name].values[chosen], full[name].values[chosen])
    assert mask_of(part, "NO_DATA").values[~chosen].all()


def _star_exposure(wcs, box, x, y, flux, *, sigma=2.0):
    yy, xx = np.mgrid[box.y0:box.y1, box.x0:box.x1]
    image = flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi
                                                                                * sigma**2)
    return make_exposure(image, variance=np.ones(box.shape), wcs=wcs, x0=box.x0, y0=box.y0,
                         chunks=None)


def test_conserve_flux_preserves_source_counts_across_pixel_scales():
    # the destination pixels are 5 % larger (0.21 vs 0.20 arcsec): a star keeps its counts
    # with conserve_flux (the default), and keeps its peak surface brightness without
    source = _star_exposure(SRC_WCS, Box(0, 0, 1000, 1000), 500.3, 499.6, 1.0e5, sigma=3.0)
    ra, dec = pixel_to_sky(SRC_WCS, np.array([500.3]), np.array([499.6]))
    x, y = sky_to_pixel(DST_WCS, ra, dec)
    box = Box(int(x[0]) - 40, int(y[0]) - 40, 80, 80)
    area = (0.21 / 0.20) ** 2
    kept = load(warp_exposure(source, DST_WCS, box, chunks=128))
    plain = load(warp_exposure(source, DST_WCS, box, chunks=128, conserve_flux=False))
    assert kept["image"].values.sum() == pytest.approx(1.0e5, rel=2e-4)
    assert plain["image"].values.sum() == pytest.approx(1.0e5 / area, rel=2e-4)
    np.testing.assert_allclose(kept["image"].values, plain["image"].values * area, rtol=2e-3,
                               atol=1e-6)
    np.testing.assert_allclose(kept["variance"].values, plain["variance"].values * area**2,
                               rtol=4e-3)


@pytest.mark.parametrize("kernel", ["nearest", "lanczos3", "lanczos5"])
def test_resampling_reads_only_the_source_spans(kernel):
    # a strongly distorted, rotated mapping; pixels outside the spans are poisoned
    strong = make_tan_wcs(ra=55.0003, dec=-30.0002, crpix=(400, 400), rotation_deg=33.0,
                          sip=True, scale_arcsec=0.23)
    strong.sip.a[2, 0] *= 50
    strong.sip.b[0, 2] *= 50
    mapping = PixelMapping.from_wcs(strong, DST_BOX, SRC_WCS, interp_length=60)
    box = Box(130, 170, 200, 150)  # a tile of the destination box
    grid = mapping.cells(box)
    src_box = mapping.source_box(box, margin=5)
    rng = np.random.default_rng(7)
    img = rng.normal(100.0, 1.0, src_box.shape)
    var = rng.uniform(1.0, 2.0, src_box.shape)
    mask = rng.choice(np.array([0, 1, 4, 16], np.uint32), src_box.shape, p=[0.97, 0.01, 0.01,
                                                                           0.01])
    expected = resample_block(img, var, mask, src_box, grid, mapping.step, box, kernel=kernel,
                              no_data_bit=5, selected=None,
                              spans=np.tile([0, src_box.width], (src_box.height, 1)))
    spans = source_spans(grid, mapping.step, box, src_box, kernel=kernel)
    first, stop = spans[:, 0], spans[:, 1]
    cols = np.arange(src_box.width)
    outside = (cols < first[:, None]) | (cols >= stop[:, None])
    assert 0.2 < outside.mean() < 0.8  # the rotated footprint leaves much of the box out
    got = resample_block(np.where(outside, np.nan, img), np.where(outside, -1.0, var),
                         np.where(outside, np.uint32(1 << 30), mask), src_box, grid,
                         mapping.step, box, kernel=kernel, no_data_bit=5, selected=None,
                         spans=spans)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (got[2] & (1 << 5)).mean() < 0.01
