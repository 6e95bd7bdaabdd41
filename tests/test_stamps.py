"""Postage stamps: cut-outs, clipping at the edges, FITS, PNG triplets, gallery, CLI."""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from click.testing import CliRunner

from daskdiff.cli import main
from daskdiff.detect import detect_and_measure, write_dia_sources
from daskdiff.exposure import exposure_box
from daskdiff.io import write_exposure
from daskdiff.masks import DEFAULT_MASK_PLANES
from daskdiff.stamps import cut_stamps, make_stamps, stamp_limits

from .test_detect import base_config, make_scene


def _scene():
    science, matched, difference, _, truth = make_scene(n_transients=5)
    catalog = detect_and_measure(science, matched, difference,
                                 config=base_config(do_sky_sources=False))
    return science, matched, difference, catalog, truth


def test_cut_stamps_centred_and_clipped():
    science, matched, difference, catalog, _ = _scene()
    stamps = cut_stamps(science, matched, difference, catalog, size=100)
    assert len(stamps) == catalog.num_rows >= 4
    box = exposure_box(difference)
    no_data = DEFAULT_MASK_PLANES.bitmask("NO_DATA")
    for stamp in stamps:
        assert stamp.box.shape == (100, 100)
        for name, image in stamp.images.items():
            assert image["image"].shape == (100, 100), name
            # the stamp holds the exposure's own pixels where they overlap
            overlap = stamp.box.intersection(box)
            ys, xs = overlap.slices(origin=(box.x0, box.y0))
            sys_, sxs = overlap.slices(origin=(stamp.box.x0, stamp.box.y0))
        np.testing.assert_array_equal(stamp.images["difference"]["image"].values[sys_, sxs],
                                      difference["image"].values[ys, xs])
        outside = np.isnan(stamp.images["difference"]["image"].values)
        flagged = (stamp.images["difference"]["mask"].values & no_data) != 0
        np.testing.assert_array_equal(outside, flagged)
        expected_missing = 1 - overlap.area / stamp.box.area
        assert stamp.clipped == (expected_missing > 0)
        assert np.isclose(stamp.missing_fraction, expected_missing)
    # a 256 px image and 100 px stamps: some stamps reach the edge
    assert any(s.clipped for s in stamps)


def test_one_stretch_for_three_panels():
    science, matched, difference, catalog, _ = _scene()
    stamp = cut_stamps(science, matched, difference, catalog, size=40)[0]
    vmin, vmax = stamp_limits(stamp)
    assert vmin < vmax
    diff = stamp.images["difference"]["image"].values
    assert vmin <= np.nanmedian(diff) <= vmax


def test_make_stamps_and_cli(tmp_path):
    science, matched, difference, catalog, _ = _scene()
    catalog = catalog.slice(0, 3)
    page = make_stamps(science, matched, difference, catalog, tmp_path / "lib", size=50)
    text = page.read_text()
    for source_id in catalog["id"].to_pylist():
        assert f"{source_id}.png" in text
        with fits.open(tmp_path / "lib" / f"{source_id}.fits") as hdus:
            assert [h.name for h in hdus[1:4:2]] == ["SCIENCE", "SCIENCE_VARIANCE"]
            assert hdus["DIFFERENCE"].data.shape == (50, 50)
            assert hdus[0].header["SRCID"] == source_id
        assert (tmp_path / "lib" / f"{source_id}.png").read_bytes()[:4] == b"\x89PNG"
    make_stamps(science, matched, difference, catalog, tmp_path / "stack", size=50,
                stack=True)
    with fits.open(tmp_path / "stack" / "stamps.fits") as hdus:
        assert hdus["TEMPLATE"].data.shape == (catalog.num_rows, 50, 50)
        assert list(hdus["SOURCES"].data["id"]) == catalog["id"].to_pylist()

    paths = {}
    for name, exposure in (("science", science), ("template", matched),
                           ("difference", difference)):
        paths[name] = tmp_path / f"{name}.fits"
        write_exposure(exposure, paths[name])
    catalog = catalog.slice(0, 2)
    write_dia_sources(catalog, tmp_path / "diaSrc.parquet")
    result = CliRunner().invoke(main, ["stamps", str(paths["science"]), str(paths["template"]),
                                       str(paths["difference"]), str(tmp_path / "diaSrc.parquet"),
                                       "-o", str(tmp_path / "cli"), "--size", "30"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "index.html").exists()
    assert len(list((tmp_path / "cli").glob("*.png"))) == catalog.num_rows
