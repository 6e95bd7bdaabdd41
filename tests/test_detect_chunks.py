"""DetectAndMeasure gives the same catalog for any chunking of the difference.

Detection runs tile by tile (the significance with a halo of the smoothing half-width, the
thresholding and growth with a halo of the growth radius, labelling per tile and stitching of
the labels across seams); these tests check that footprints crossing tile edges and corners
are found once, with the same pixels, and that the catalogs are identical.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from daskdiff.detect import DetectAndMeasureConfig, detect_and_measure
from daskdiff.detect.footprints import _CONNECT, grow_mask, label_tiles
from daskdiff.detect.tiles import tile_slices
from daskdiff.exposure import make_exposure, rechunk
from daskdiff.psf import GaussianPsf

from .test_detect import _dipole_scene, base_config, make_scene

SIZE = 256
NOISE = 3.0


def _raster_canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 1..n in raster order of their first pixel (a partition's normal form)."""
    flat = labels.ravel()
    values, first = np.unique(flat[flat > 0], return_index=True)
    where = np.flatnonzero(flat > 0)[first]
    lut = np.zeros(labels.max() + 1, np.int64)
    lut[values[np.argsort(where)]] = np.arange(1, values.size + 1)
    return lut[labels]


def _blobs(seed: int, size: int = 200) -> np.ndarray:
    """A significance-like field: smoothed noise with large +/- blobs crossing tiles."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), 3) * 20
    yy, xx = np.mgrid[0:size, 0:size]
    for y, x, amp, width in ((64, 64, 40, 6), (100, 37, -40, 4), (128, 130, 60, 25),
                             (70, 72, -30, 3)):
        field += amp * np.exp(-0.5 * ((yy - y) ** 2 + (xx - x) ** 2) / width**2)
    return field.astype(np.float32)


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("chunks", [64, (100, 37), (37, 100), 23, (200, 50)])
def test_label_tiles_match_whole_image(merge, chunks):
    sig = _blobs(3)
    kw = {"threshold": 5.0, "grow": 5, "edge": 7, "merge": merge}
    whole_labels, whole_pos, whole_neg, n_whole = label_tiles(sig, tile_slices(sig.shape), **kw)
    labels, pos, neg, n = label_tiles(sig, tile_slices(sig.shape, chunks), **kw)
    assert n == n_whole > 5
    np.testing.assert_array_equal(pos, whole_pos)
    np.testing.assert_array_equal(neg, whole_neg)
    np.testing.assert_array_equal(_raster_canonical(labels), _raster_canonical(whole_labels))
    if merge:  # the reference: scipy's labelling of the whole grown mask
        expected, n_expected = ndimage.label(whole_pos | whole_neg, structure=_CONNECT)
        assert n_expected == n
        np.testing.assert_array_equal(labels, expected)  # both in raster order


def test_grow_mask_is_a_disk_dilation():
    rng = np.random.default_rng(5)
    mask = rng.random((80, 90)) > 0.995
    mask[0, 0] = mask[79, 45] = True
    for radius in (1, 3, 5):
        r = np.arange(-radius, radius + 1)
        disk = r[:, None] ** 2 + r[None, :] ** 2 <= radius**2
        np.testing.assert_array_equal(grow_mask(mask, radius),
                                      ndimage.binary_dilation(mask, structure=disk))


def _corner_scene(seed: int = 7):
    """Point sources on tile corners and edges (tiles of 64), a dipole across a seam and an
    extended source covering four tiles, in white noise."""
    rng = np.random.default_rng(seed)
    psf = GaussianPsf(sigma=2.0)
    image = rng.standard_normal((SIZE, SIZE)) * NOISE
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    sources = [(63.5, 63.5, 3000), (64.0, 128.0, -2500), (127.6, 191.8, 1500),
               (191.5, 64.3, 800), (100.0, 63.7, 400), (30.0, 200.0, 2000)]
    for x, y, flux in sources:
        stamp, box = psf.image(x, y)
        image[box.y0:box.y1, box.x0:box.x1] += flux * stamp
    for x, y, flux in ((160.0, 127.0, 2000), (160.0, 129.0, -2000)):  # dipole on a seam
        stamp, box = psf.image(x, y)
        image[box.y0:box.y1, box.x0:box.x1] += flux * stamp
    image += 60 * np.exp(-0.5 * ((yy - 192) ** 2 + (xx - 192) ** 2) / 9.0**2)  # extended
    variance = np.full((SIZE, SIZE), NOISE**2, np.float32)
    return make_exposure(image.astype(np.float32), variance=variance, psf=psf, chunks=None,
                         x0=1000, y0=2000)


@pytest.mark.parametrize("chunks", [64, (100, 37), 50, (128, 256)])
def test_corner_sources_found_once_for_any_chunking(chunks):
    difference = _corner_scene()
    for background in (False, True):
        config = DetectAndMeasureConfig(n_sky_sources=10, do_subtract_background=background)
        whole = detect_and_measure(None, None, difference, config=config).to_pandas()
        tiled = detect_and_measure(None, None, rechunk(difference, chunks),
                                   config=config).to_pandas()
        if not background:  # (the background fit eats into the extended source)
            real = whole[~whole.sky_source]
            # every planted object once: 6 points, 1 dipole, 1 extended source
            assert len(real) == 8, real[["x", "y", "psf_flux"]]
            assert int(real.is_dipole_candidate.sum()) == 1
        pd.testing.assert_frame_equal(whole, tiled, check_exact=True)


def test_tile_size_config_matches_dask_chunks():
    difference = _corner_scene()
    config = DetectAndMeasureConfig(n_sky_sources=10)
    by_config = detect_and_measure(None, None, difference,
                                   config=config.replace(tile_size=64)).to_pandas()
    by_chunks = detect_and_measure(None, None, rechunk(difference, 64),
                                   config=config).to_pandas()
    pd.testing.assert_frame_equal(by_config, by_chunks, check_exact=True)


@pytest.mark.parametrize("chunks", [64, (100, 37), 256])
def test_catalog_identical_for_any_chunking(chunks):
    science, matched, difference, _, _ = make_scene(size=300, n_transients=15)
    config = base_config(do_subtract_background=True, n_sky_sources=10)
    whole = detect_and_measure(
        science, matched, difference, config=config)
    tiled = detect_and_measure(
        science, matched, rechunk(difference, chunks), config=config)
    assert whole.num_rows > 15
    pd.testing.assert_frame_equal(whole.to_pandas(), tiled.to_pandas(), check_exact=True)


def test_dipoles_identical_with_tile_size():
    science, template, difference, _ = _dipole_scene()
    config = base_config()
    whole = detect_and_measure(science, template, difference, config=config)
    tiled = detect_and_measure(science, template, difference,
                               config=config.replace(tile_size=64))
    pd.testing.assert_frame_equal(whole.to_pandas(), tiled.to_pandas(), check_exact=True)
