"""The simulated campaign: repository contents, determinism, geometry, injection, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.time import Time
from astropy.utils import iers
from click.testing import CliRunner

from daskdiff.cli import main
from daskdiff.errors import ConfigError, InputError
from daskdiff.metadata import Weather
from daskdiff.psf.analytic import GaussianPsf
from daskdiff.repository import Repository
from daskdiff.simulate import (
    get_preset,
    inject_point_sources,
    plan_campaign,
    plan_visits,
    render_exposure,
    simulate,
)
from daskdiff.simulate.observing import dcr_shifts_arcsec, detector_wcs
from daskdiff.simulate.sky import flux_at, make_sky, position_at

from .simulate_helpers import micro_config, robust_std

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _campaign_config():
    return micro_config(n_detectors=2, detector_width=256, detector_height=256,
                        patch_inner=800, patch_border=30, n_transients=6)


@pytest.fixture(scope="module")
def sim_repo(tmp_path_factory):
    """A small two-tract g-band campaign (with DCR coadds), written with one worker."""
    root = tmp_path_factory.mktemp("sim") / "repo"
    summary = simulate(root, _campaign_config(), scheduler="sync", num_workers=1)
    return Repository.open(root), summary


@pytest.mark.slow
def test_same_seed_gives_identical_bytes_with_one_and_two_workers(tmp_path):
    config = _campaign_config().replace(band="r", n_tracts=1)
    simulate(tmp_path / "one", config, scheduler="sync", num_workers=1)
    simulate(tmp_path / "two", config, scheduler="processes", num_workers=2, batch_size=3)
    repo1, repo2 = Repository.open(tmp_path / "one"), Repository.open(tmp_path / "two")
    refs1, refs2 = repo1.query(), repo2.query()
    assert [(r.dataset_type, r.data_id) for r in refs1] == [
        (r.dataset_type, r.data_id) for r in refs2]
    n_exposures = 0
    for ref1, ref2 in zip(refs1, refs2, strict=True):
        if ref1.storage == "exposure":
            a, b = repo1.get_exposure(ref1, chunks=None), repo2.get_exposure(ref2, chunks=None)
            for plane in ("image", "variance", "mask"):
                assert a[plane].values.tobytes() == b[plane].values.tobytes(), ref1
            assert a.attrs["psf"] == b.attrs["psf"]
            n_exposures += 1
        elif ref1.storage == "table":
            assert repo1.get_table(ref1).to_pandas().equals(repo2.get_table(ref2).to_pandas())
    assert n_exposures == 5


def test_repository_holds_calexps_coadds_dcr_coadds_and_truth(sim_repo):
    repo, summary = sim_repo
    config = _campaign_config()
    assert len(repo.query("calexp")) == config.n_visits * config.n_detectors
    coadds = repo.query("goodSeeingCoadd")
    assert len(coadds) == summary.n_coadds > 0
    assert len({r.data_id["tract"] for r in coadds}) == 2
    assert len(repo.query("dcrCoadd")) == 3 * len(coadds)
    assert {r.data_id["subfilter"] for r in repo.query("dcrCoadd")} == {0, 1, 2}
    assert len(repo.get_skymap().tract_ids) == 2
    assert summary.straddling  # some detectors straddle a tract boundary
    for name in ("truth_objects", "truth_epochs", "truth_exposures", "truth_coadds"):
        assert repo.get_table(name).num_rows > 0
    objects = repo.get_table("truth_objects").to_pandas()
    assert set(objects.kind) == {"star", "galaxy", "variable", "transient", "asteroid"}
    galaxies = objects[objects.kind == "galaxy"]
    assert galaxies.sersic_n.between(1, 4).all()
    assert galaxies.half_light_radius.between(0.3, 3.0).all()
    assert galaxies.ellipticity.max() <= 0.6
    transients = objects[objects.kind == "transient"]
    assert set(transients.transient_class) <= {"host", "blank", "faint"}
    exposures = repo.get_table("truth_exposures").to_pandas()
    assert exposures.transparency.between(0.7, 1.0).all()
    assert exposures.sky.between(300, 2000).all()
    assert exposures.seeing_arcsec.between(0.55, 1.3).all()
    info = json.loads(json.dumps(repo.get_json("simulation")))
    assert info["config"]["seed"] == config.seed


def test_calexp_metadata_and_coadd_depth(sim_repo):
    repo, _ = sim_repo
    exposures = repo.get_table("truth_exposures").to_pandas()
    row = exposures.iloc[0]
    calexp = repo.get_exposure("calexp", visit=int(row.visit), detector=int(row.detector),
                               chunks=None)
    info = calexp.attrs["visit_info"]
    assert info.airmass == pytest.approx(row.airmass)
    assert info.band == "g" and info.observatory.name == "Cerro Pachon"
    calib = calexp.attrs["photo_calib"]
    config = _campaign_config()
    assert calib.njy_per_count == pytest.approx(config.njy_per_count / row.transparency)
    assert calexp.attrs["psf"].type_name == "moffat"
    assert "SIP" in calexp.attrs["wcs"].wcs.ctype[0]
    visit_sigma = math.sqrt(float(np.median(calexp["variance"].values)))
    coadd_ref = repo.query("goodSeeingCoadd")[0]
    coadd = repo.get_exposure(coadd_ref, chunks=None)
    planes = coadd.attrs["mask_planes"]
    no_data = (coadd["mask"].values & planes.bitmask("NO_DATA")) != 0
    covered = ~no_data
    assert np.isnan(coadd["image"].values[no_data]).all()
    coadd_sigma = robust_std(coadd["image"].values[covered])
    assert visit_sigma / coadd_sigma >= 5.0
    assert coadd.attrs["psf"].type_name == "moffat"


def test_transients_variables_and_asteroids_change_between_visits():
    config = micro_config(n_transients=5, n_asteroids=2)
    catalog = make_sky(config)
    kinds = catalog.column("kind").to_numpy(zero_copy_only=False)
    peak = catalog.column("peak_mjd").to_numpy()
    transient = np.nonzero(kinds == "transient")[0][0]
    at_peak = flux_at(catalog, peak[transient])[transient]
    assert at_peak == pytest.approx(catalog.column("flux_njy")[transient].as_py(), rel=1e-9)
    assert flux_at(catalog, peak[transient] + 30)[transient] < at_peak
    assert flux_at(catalog, peak[transient] - 20)[transient] < at_peak
    asteroid = kinds == "asteroid"
    ra1, dec1 = position_at(catalog, config.mjd_start)
    ra2, dec2 = position_at(catalog, config.mjd_start + 5)
    moved = np.hypot((ra2 - ra1) * math.cos(math.radians(config.dec)), dec2 - dec1) * 3600
    assert np.all(moved[asteroid] > 10.0) and np.all(moved[~asteroid] == 0)


def test_site_geometry_matches_astropy_altaz():
    config = micro_config(n_visits=4)
    location = EarthLocation.from_geodetic(-70.749417 * u.deg, -30.244639 * u.deg, 2663 * u.m)
    with iers.conf.set_temp("auto_download", False), \
            iers.conf.set_temp("iers_degraded_accuracy", "warn"):
        for visit in plan_visits(config):
            time = Time(visit.mjd, format="mjd", scale="tai")
            frame = AltAz(obstime=time, location=location, pressure=0 * u.hPa)
            target = SkyCoord(visit.ra * u.deg, visit.dec * u.deg)
            altaz = target.transform_to(frame)
            # (the simulator takes UT1 = UTC: 1 s of time is 0.004 deg at most)
            assert visit.elevation == pytest.approx(altaz.alt.deg, abs=0.005)
            assert visit.airmass == pytest.approx(1 / math.sin(altaz.alt.rad), rel=1e-3)
            # parallactic angle: position angle of a point slightly towards the zenith
            up = SkyCoord(alt=altaz.alt + 0.05 * u.deg, az=altaz.az, frame=frame).icrs
            assert ((target.position_angle(up).deg - visit.parallactic_angle + 180) % 360
                    - 180) == pytest.approx(0.0, abs=0.1)
            assert 1.0 <= visit.airmass < 2.0


def test_dcr_shifts_grow_with_airmass_and_put_blue_towards_the_zenith():
    flat = dcr_shifts_arcsec("g", 3, 1.0, Weather())
    assert np.allclose(flat, 0.0)
    low, high = (dcr_shifts_arcsec("g", 3, a, Weather()) for a in (1.2, 1.6))
    assert low[0] > 0 > low[-1] and np.all(np.abs(high) > np.abs(low))
    assert 0.1 < high[0] - high[-1] < 1.0  # arcsec across g at airmass 1.6


def test_sip_distortion_and_astrometric_error():
    config = micro_config(distortion_pixels=3.0)
    plan = plan_campaign(config)
    visit, det = plan.visits[0], plan.detectors[0]
    wcs = detector_wcs(config, visit, det)
    assert wcs.sip is not None
    ra, dec = wcs.all_pix2world([10.0], [10.0], 0)
    x_lin, _ = wcs.wcs_world2pix(ra, dec, 0)  # the linear (TAN only) inverse
    assert abs(x_lin[0] - 10.0) > 0.01  # the distortion moves the corner


def test_injection_adds_psf_fakes_with_mask_and_truth():
    config = micro_config()
    plan = plan_campaign(config)
    exposure = render_exposure(config, plan.visits[0], plan.detectors[0], plan.catalog)
    fakes = {"x": np.array([100.2, 250.7]), "y": np.array([120.4, 300.1]),
             "mag": np.array([19.0, 20.0])}
    result, truth = inject_point_sources(exposure, fakes, add_noise=False)
    diff = result["image"].values.astype(float) - exposure["image"].values
    calib = exposure.attrs["photo_calib"]
    expected = calib.to_counts(3631.0e9 * 10 ** (-0.4 * fakes["mag"]))
    assert truth.column("flux_counts").to_numpy() == pytest.approx(expected)
    assert diff.sum() == pytest.approx(expected.sum(), rel=2e-3)
    injected = (result["mask"].values & result.attrs["mask_planes"].bitmask("INJECTED")) != 0
    assert injected[120, 100] and injected[300, 251] and not injected[10, 10]
    assert truth.column("injected").to_pylist() == [True, True]
    noisy, _ = inject_point_sources(exposure, fakes, add_noise=True, gain=1.5, seed=1)
    extra = noisy["variance"].values.astype(float) - exposure["variance"].values
    assert extra.sum() == pytest.approx(expected.sum() / 1.5, rel=3e-3)


@pytest.mark.real
@pytest.mark.filterwarnings("ignore:.*no gain")
def test_injection_into_a_real_image():
    path = SHARED / "data" / "real" / "astropy-data" / "singles" / "HorseHead.fits"
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    from daskdiff.exposure import replace_metadata
    from daskdiff.io import read_exposure

    exposure = read_exposure(path, chunks=None)
    exposure = replace_metadata(exposure, psf=GaussianPsf(fwhm=3.0))
    ny, nx = exposure["image"].shape
    wcs = exposure.attrs["wcs"]
    ra, dec = wcs.all_pix2world([nx / 3.0, nx / 2.0], [ny / 3.0, ny / 2.0], 0)
    result, truth = inject_point_sources(exposure, {"ra": ra, "dec": dec,
                                                    "flux_counts": [5e4, 1e5]},
                                         add_noise=False)
    diff = result["image"].values.astype(float) - exposure["image"].values.astype(float)
    assert diff.sum() == pytest.approx(1.5e5, rel=1e-3)
    assert truth.column("x").to_numpy() == pytest.approx([nx / 3.0, nx / 2.0], abs=1e-3)


def test_bad_input_is_refused_with_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown simulation preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="detector_width must be a positive integer"):
        get_preset("tiny", detector_width=-5)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="not empty"):
        simulate(full, micro_config())
    runner = CliRunner()
    result = runner.invoke(main, ["simulate", str(full)])
    assert result.exit_code == 2 and "not empty" in result.output
    result = runner.invoke(main, ["simulate", str(full), "--overwrite"])
    assert result.exit_code == 2 and "not a daskdiff repository" in result.output
    assert (full / "keep.txt").read_text() == "precious"
    result = runner.invoke(main, ["simulate", str(tmp_path / "new"), "--preset", "nope"])
    assert result.exit_code == 2 and "unknown simulation preset" in result.output
    result = runner.invoke(main, ["simulate", str(tmp_path / "new"), "--width", "-3"])
    assert result.exit_code == 2 and "positive integer" in result.output
    assert not (tmp_path / "new").exists()


def test_cli_writes_a_small_repository(tmp_path):
    runner = CliRunner()
    args = ["simulate", str(tmp_path / "repo"), "--visits", "1", "--detectors", "1",
            "--width", "200", "--height", "200", "--patch-inner", "400", "--transients", "2",
            "--scheduler", "sync", "--quiet", "--fakes", "3", "--band", "r", "--tracts", "1"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["n_calexps"] == 1 and summary["truth_rows"]["truth_fakes"] == 3
    again = runner.invoke(main, args)
    assert again.exit_code == 2
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0
