"""Alard-Lupton subtraction on a simulated DC2-like exposure against its coadd template.

The simulator draws stars and bright galaxies with a spatially varying Moffat PSF; the template
is the warped deep coadd (GetTemplate). Truth gives the photometric scale (the ratio of the
calibrations) and the star positions.
"""

from __future__ import annotations

import numpy as np
import pytest

from daskdiff.repository import Repository
from daskdiff.simulate import simulate
from daskdiff.subtract import subtract
from daskdiff.subtract.qa import blank_sky
from daskdiff.template import get_template
from daskdiff.wcs import sky_to_pixel

from .simulate_helpers import micro_config

pytestmark = pytest.mark.slow


def _robust_std(values: np.ndarray) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(0.7413 * (q3 - q1))


@pytest.fixture(scope="module")
def sim_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("al_sim") / "repo"
    config = micro_config(n_visits=1, n_transients=0, n_asteroids=0, detector_width=1024,
                          detector_height=1024, patch_inner=1200)
    simulate(root, config, scheduler="sync", num_workers=1)
    repo = Repository.open(root)
    row = repo.get_table("truth_exposures").to_pandas().iloc[0]
    science = repo.get_exposure("calexp", visit=int(row.visit), detector=int(row.detector))
    template = get_template(science, repo)
    result = subtract(science, template)
    difference = result.difference.compute()
    return repo, science, template, result, difference


def test_photometric_scale_matches_truth(sim_result):
    _, science, template, result, _ = sim_result
    truth = (template.attrs["photo_calib"].njy_per_count
             / science.attrs["photo_calib"].njy_per_count)
    # the raw kernel sum misses the Moffat wings beyond the kernel (about -0.7 % here); the
    # photometric scale corrects it with the same fit on the PSF models (photoscale module)
    assert abs(result.metadata["photometric_scale"] / truth - 1.0) < 0.005
    assert result.metadata["kernel_sum_model"] < 1.0


def test_blank_sky_noise_matches_variance(sim_result):
    _, science, _, _, diff = sim_result
    planes = diff.attrs["mask_planes"]
    good = blank_sky(diff, science) & ((diff["mask"].values & planes.bitmask("CR")) == 0)
    z = diff["image"].values[good] / np.sqrt(diff["variance"].values[good])
    assert abs(_robust_std(z) - 1.0) < 0.05


def test_residuals_near_bright_stars(sim_result):
    repo, science, _, result, diff = sim_result
    objects = repo.get_table("truth_objects").to_pandas()
    stars = objects[objects.kind == "star"]
    x, y = sky_to_pixel(science.attrs["wcs"], stars.ra.values, stars.dec.values)
    counts = stars.flux_njy.values / science.attrs["photo_calib"].njy_per_count
    x0, y0 = int(diff.x[0]), int(diff.y[0])
    ny, nx = diff["image"].shape
    radius = 2 * result.metadata["science_psf_fwhm"]
    inside = (x > x0 + 30) & (x < x0 + nx - 30) & (y > y0 + 30) & (y < y0 + ny - 30)
    bright = inside & (counts > 1e4)
    # isolated: no other star within 4 FWHM
    d2 = (x[bright, None] - x[None, :]) ** 2 + (y[bright, None] - y[None, :]) ** 2
    isolated = np.sum(d2 < (2 * radius) ** 2, axis=1) == 1
    assert isolated.sum() >= 2
    yy, xx = np.mgrid[y0:y0 + ny, x0:x0 + nx]
    near = np.zeros((ny, nx), bool)
    for xi, yi in zip(x[bright][isolated], y[bright][isolated], strict=True):
        near |= (xx - xi) ** 2 + (yy - yi) ** 2 <= radius**2
    bad = diff.attrs["mask_planes"].bitmask("SAT", "SAT_TEMPLATE", "NO_DATA", "EDGE", "BAD",
                                            "CR")
    near &= (diff["mask"].values & bad) == 0
    z = diff["image"].values[near] / np.sqrt(diff["variance"].values[near])
    assert _robust_std(z) <= 1.10
