"""Boxes, mask planes, metadata and the error hierarchy."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from daskdiff import Box, InputError, MaskPlanes, PhotoCalib, VisitInfo
from daskdiff.errors import AlgorithmError, ConfigError, NoWorkError, is_retryable
from daskdiff.masks import STANDARD_PLANES, combine


class TestBox:
    def test_bounds_and_shape(self):
        box = Box(10, 20, 30, 40)
        assert (box.x1, box.y1, box.shape, box.area) == (40, 60, (40, 30), 1200)
        assert box.center == (24.5, 39.5)

    def test_intersection_union_grow(self):
        a, b = Box(0, 0, 10, 10), Box(5, 7, 10, 10)
        assert a.intersection(b) == Box(5, 7, 5, 3)
        assert a.union(b) == Box(0, 0, 15, 17)
        assert a.intersection(Box(20, 20, 5, 5)).is_empty
        assert not a.overlaps(Box(10, 0, 5, 5))  # half-open: touching is not overlapping
        assert a.grow(2) == Box(-2, -2, 14, 14)
        assert a.grow((1, 3)) == Box(-1, -3, 12, 16)

    def test_slices_index_parent_frame(self):
        parent = np.arange(100).reshape(10, 10)  # first pixel is parent (100, 200)
        sub = Box(103, 204, 2, 3)
        ys, xs = sub.slices(origin=(100, 200))
        assert parent[ys, xs].tolist() == [[43, 44], [53, 54], [63, 64]]

    def test_contains_uses_pixel_edges(self):
        box = Box(0, 0, 4, 4)
        assert box.contains(-0.5, 3.49)
        assert not box.contains(3.5, 0)

    def test_bounding_and_list_roundtrip(self):
        box = Box.bounding(np.array([1.2, 4.6]), np.array([-0.4, 2.5]))
        assert box == Box(1, 0, 5, 4)
        assert Box.from_list(box.to_list()) == box

    @pytest.mark.parametrize("args", [(0, 0, -1, 3), (0.5, 0, 1, 1), ("a", 0, 1, 1)])
    def test_invalid(self, args):
        with pytest.raises(InputError):
            Box(*args)


class TestMaskPlanes:
    def test_standard_bits(self):
        planes = MaskPlanes()
        for name in ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP", "SUSPECT", "DETECTED",
                     "DETECTED_NEGATIVE", "HIGH_VARIANCE", "SAT_TEMPLATE", "INJECTED",
                     "INJECTED_TEMPLATE", "STREAK"):
            assert planes[name] == STANDARD_PLANES[name]
        assert planes.bitmask("BAD", "SAT") == 0b11
        assert planes.names_in(0b1010) == ["SAT", "CR"]

    def test_user_planes_take_free_bits_and_keep_existing(self):
        planes = MaskPlanes().with_planes("FAKE", "GHOST")
        assert planes["FAKE"] == len(STANDARD_PLANES)
        assert planes["GHOST"] == len(STANDARD_PLANES) + 1
        assert planes.with_planes("FAKE") == planes

    def test_unknown_plane_message(self):
        with pytest.raises(InputError, match=r"unknown mask plane 'NOPE'.*with_planes"):
            MaskPlanes().bitmask("NOPE")

    def test_header_roundtrip(self):
        planes = MaskPlanes().with_planes("FAKE")
        header = {key: value for key, value, _ in planes.to_header_cards()}
        assert MaskPlanes.from_header(header) == planes

    def test_combine_conflict(self):
        with pytest.raises(InputError, match="has bit"):
            combine([MaskPlanes({"A": 0}), MaskPlanes({"A": 1})])

    def test_invalid_registry(self):
        with pytest.raises(InputError):
            MaskPlanes({"A": 0, "B": 0})
        with pytest.raises(InputError):
            MaskPlanes({"A": 40})


class TestMetadata:
    def test_photocalib(self):
        calib = PhotoCalib.from_zero_point(31.4)
        assert math.isclose(calib.zero_point, 31.4, rel_tol=1e-12)
        assert math.isclose(calib.to_nanojansky(calib.to_counts(123.0)), 123.0)
        assert PhotoCalib.from_dict(calib.to_dict()) == calib
        header = {k: v for k, v, _ in calib.to_header_cards()}
        assert PhotoCalib.from_header(header) == calib
        with pytest.raises(InputError):
            PhotoCalib(-1.0)

    def test_visitinfo_roundtrips(self):
        info = VisitInfo(visit=12, detector=3, band="g", physical_filter="g_sim", mjd=60000.5,
                         exposure_time=30.0, airmass=1.2, elevation=56.4, azimuth=30.0,
                         parallactic_angle=-12.0, rotation_angle=5.0)
        assert VisitInfo.from_dict(info.to_dict()) == info
        header = {k: v for k, v, _ in info.to_header_cards()}
        assert VisitInfo.from_header(header) == info
        assert VisitInfo.from_dict(VisitInfo().to_dict()).visit == 0

    def test_visitinfo_validation(self):
        with pytest.raises(InputError):
            VisitInfo(visit=-1)
        with pytest.raises(InputError):
            VisitInfo(airmass=0.5)
        with pytest.raises(InputError, match="unknown VisitInfo"):
            VisitInfo.from_dict({"vist": 3})


class TestErrors:
    def test_kinds_and_retry(self):
        assert not is_retryable(NoWorkError("x"))
        assert not is_retryable(AlgorithmError("x"))
        assert is_retryable(OSError("disk"))
        assert isinstance(ConfigError("x"), ValueError)

    def test_pickle_keeps_metadata(self):
        error = AlgorithmError("too few kernel sources", metadata={"n": 2, "required": 3})
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is AlgorithmError
        assert copy.metadata == {"n": 2, "required": 3}
        assert str(copy) == "too few kernel sources"


def test_mask_planes_membership_and_get():
    from daskdiff.masks import MaskPlanes

    planes = MaskPlanes()
    assert "SAT" in planes and "NO_SUCH_PLANE" not in planes
    assert planes.get("NO_SUCH_PLANE") is None and planes.get("SAT") == planes["SAT"]
