"""GetTemplate on a repository made by the project's simulator (preset ``tiny``).

One visit, one detector centred on the boresight, which sits between the two tracts' centres:
the detector straddles the tract seam. The coadds are rendered by the simulator (GalSim Moffat
PSF, Poisson-scaled noise on the tract grid, NO_DATA outside the visit footprints); the truth is
the simulator's catalogue, rendered here with the template's own PSF model on the template grid.
Galaxies are left out of the truth (the PSF model is a pixel image), and so are the pixels
near them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from daskdiff import load, mask_of
from daskdiff.repository import Repository
from daskdiff.simulate import simulate
from daskdiff.simulate.presets import get_preset
from daskdiff.template import GetTemplateConfig, get_template
from daskdiff.wcs import sky_to_pixel

from .conftest import tract_one_nearer


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("template_sim") / "repo"
    config = get_preset("tiny", n_visits=1, n_detectors=1, n_transients=0, n_asteroids=0,
                        band="r")
    simulate(root, config, scheduler="sync", num_workers=1)
    repo = Repository.open(root)
    row = repo.get_table("truth_exposures").to_pandas().iloc[0]
    science = repo.get_exposure("calexp", visit=int(row.visit), detector=int(row.detector))
    template = load(get_template(science, repo))
    return repo, science, template


def _truth_and_galaxies(repo, template):
    """Stars and variables drawn with the template PSF; pixels near galaxies."""
    objects = repo.get_table("truth_objects").to_pandas()
    wcs, box, psf = template.attrs["wcs"], template.dd.box, template.attrs["psf"]
    counts = objects.flux_njy.values / template.attrs["photo_calib"].njy_per_count
    x, y = sky_to_pixel(wcs, objects.ra.values, objects.dec.values)
    truth = np.zeros(box.shape)
    near_galaxy = np.zeros(box.shape, bool)
    yy, xx = np.ogrid[box.y0:box.y1, box.x0:box.x1]
    scale = 0.2  # arcsec per pixel (the preset's)
    for xi, yi, flux, kind, hlr in zip(x, y, counts, objects.kind.values,
                                       objects.half_light_radius.values, strict=True):
        if not box.grow(30).contains(xi, yi):
            continue
        if kind == "galaxy":
            radius = 10.0 + 8.0 * hlr / scale
            near_galaxy |= (xx - xi) ** 2 + (yy - yi) ** 2 < radius**2
            continue
        stamp, sbox = psf.image(xi, yi, size=31)
        overlap = sbox.intersection(box)
        if not overlap.is_empty:
            truth[overlap.slices(origin=(box.x0, box.y0))] += (
                flux * stamp[overlap.slices(origin=(sbox.x0, sbox.y0))])
    return truth, near_galaxy


def _check_noise(residual, sigma):
    assert abs(residual.mean()) < 5 * sigma.mean() / math.sqrt(residual.size)
    assert residual.std() == pytest.approx(np.sqrt(np.mean(sigma**2)), rel=0.10)


def test_template_equals_truth_within_noise_across_the_seam(sim):
    repo, _, template = sim
    truth, near_galaxy = _truth_and_galaxies(repo, template)
    good = ~mask_of(template, "NO_DATA", "HIGH_VARIANCE").values
    assert good.mean() > 0.8
    use = good & ~near_galaxy
    assert use.sum() > 0.5 * use.size
    residual = (template["image"].values - truth)[use]
    sigma = np.sqrt(template["variance"].values[use])
    _check_noise(residual, sigma)
    # the detector straddles the seam between the tracts: both own a good part of it
    owner = tract_one_nearer(repo.get_skymap(), template)
    assert 0.1 < owner[use].mean() < 0.9
    seam = ndimage.binary_dilation(owner ^ ndimage.binary_erosion(owner), iterations=15)
    strip = seam[use]
    assert strip.sum() > 5000
    for part in (strip, ~strip):
        _check_noise(residual[part], sigma[part])


def test_chunking_does_not_change_the_simulated_template(sim):
    repo, science, template = sim
    tiled = load(get_template(science, repo, config=GetTemplateConfig(tile_size=256)))
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(tiled[name].values, template[name].values)
