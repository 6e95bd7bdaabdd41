"""DetectAndMeasure gives the same catalog for any chunking of the difference."""

from __future__ import annotations

import pandas as pd
import pytest

from daskdiff.detect import detect_and_measure
from daskdiff.exposure import rechunk

from .test_detect import _dipole_scene, base_config, make_scene


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
    from daskdiff.detect import detect_and_measure

    science, template, difference, _ = _dipole_scene()
    config = base_config()
    whole = detect_and_measure(science, template, difference, config=config)
    tiled = detect_and_measure(science, template, difference,
                               config=config.replace(tile_size=64))
    pd.testing.assert_frame_equal(whole.to_pandas(), tiled.to_pandas(), check_exact=True)
