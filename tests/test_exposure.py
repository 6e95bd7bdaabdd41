"""The exposure data model."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from daskdiff import (
    Box,
    InputError,
    VisitInfo,
    cutout,
    exposure_box,
    get_mask_planes,
    load,
    make_exposure,
    mask_of,
    rechunk,
    replace_metadata,
)
from daskdiff.exposure import is_lazy, validate_exposure


def _planes(rng, shape=(300, 400)):
    image = rng.normal(100.0, 5.0, shape)
    variance = np.full(shape, 25.0)
    mask = np.zeros(shape, np.uint32)
    mask[10, 20] = 1 << get_mask_planes(make_exposure(image, variance=variance)).get("SAT")
    return image, variance, mask


def test_make_exposure_is_lazy_tiled_and_typed(tan_wcs):
    rng = np.random.default_rng(1)
    image, variance, mask = _planes(rng)
    exp = make_exposure(image, variance=variance, mask=mask, x0=12345, y0=67890, wcs=tan_wcs,
                        chunks=128)
    assert is_lazy(exp)
    assert exp["image"].dtype == np.float32 and exp["mask"].dtype == np.uint32
    assert exp["image"].data.chunksize == (128, 128)
    assert exposure_box(exp) == Box(12345, 67890, 400, 300)
    assert exp.dd.wcs is tan_wcs
    np.testing.assert_array_equal(load(exp)["image"].values, image.astype(np.float32))


def test_eager_exposure_and_rechunk():
    rng = np.random.default_rng(2)
    image, variance, _ = _planes(rng)
    exp = make_exposure(image, variance=variance, chunks=None)
    assert not is_lazy(exp)
    tiled = rechunk(exp, 100)
    assert tiled["variance"].data.chunksize == (100, 100)
    assert tiled.attrs == exp.attrs


def test_shape_mismatch_and_missing_variance():
    with pytest.raises(InputError, match="variance plane has shape"):
        make_exposure(np.zeros((10, 10)), variance=np.zeros((10, 11)))
    with pytest.raises(InputError, match="needs a variance plane"):
        make_exposure(np.zeros((10, 10)), variance=None)
    with pytest.raises(InputError, match="2-D"):
        make_exposure(np.zeros((2, 10, 10)), variance=np.zeros((2, 10, 10)))


def test_cutout_keeps_metadata_and_parent_coords(tan_wcs):
    rng = np.random.default_rng(3)
    image, variance, mask = _planes(rng)
    info = VisitInfo(visit=5, detector=2, band="r")
    exp = make_exposure(image, variance=variance, mask=mask, x0=100, y0=50, wcs=tan_wcs,
                        visit_info=info, chunks=64)
    box = Box(150, 60, 40, 30)
    part = cutout(exp, box)
    assert exposure_box(part) == box
    assert part.attrs["visit_info"] == info and part.attrs["wcs"] is tan_wcs
    np.testing.assert_array_equal(part["image"].values, image[10:40, 50:90].astype(np.float32))
    assert is_lazy(part)


def test_cutout_modes():
    exp = make_exposure(np.ones((20, 20)), variance=np.ones((20, 20)), chunks=8)
    box = Box(-5, 15, 10, 10)
    with pytest.raises(InputError, match="extends beyond"):
        cutout(exp, box)
    assert exposure_box(cutout(exp, box, mode="clip")) == Box(0, 15, 5, 5)
    padded = cutout(exp, box, mode="pad")
    assert exposure_box(padded) == box
    missing = mask_of(padded, "NO_DATA").values
    assert missing.sum() == 100 - 25
    assert np.isnan(padded["image"].values[missing]).all()
    assert padded["image"].dtype == np.float32 and padded["mask"].dtype == np.uint32


def test_building_and_cutting_never_computes():
    image = da.random.default_rng(0).normal(size=(512, 512), chunks=128)
    with dask.config.set(scheduler=_fail_scheduler):
        exp = make_exposure(image, variance=da.ones((512, 512), chunks=128))
        part = cutout(exp, Box(100, 100, 200, 200))
        mask_of(part, "SAT", "BAD")
        replace_metadata(part, visit_info=VisitInfo(visit=1))


def _fail_scheduler(*args, **kwargs):
    raise AssertionError("a graph was computed while only building it")


def test_replace_metadata_and_validation():
    exp = make_exposure(np.zeros((4, 4)), variance=np.ones((4, 4)), chunks=None)
    new = replace_metadata(exp, visit_info=VisitInfo(visit=3))
    assert new.attrs["visit_info"].visit == 3 and exp.attrs["visit_info"] is None
    with pytest.raises(InputError, match="unknown exposure metadata"):
        replace_metadata(exp, wsc=None)
    assert validate_exposure(exp) is exp
    with pytest.raises(InputError, match="missing the 'mask' plane"):
        validate_exposure(exp.drop_vars("mask"))
