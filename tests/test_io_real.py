"""daskdiff.io on real survey images from ../shared/data/real (skipped where absent)."""

from __future__ import annotations

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS, FITSFixedWarning
from scipy.ndimage import binary_dilation

from daskdiff import InputError
from daskdiff.io import read_exposure, write_exposure

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not REAL.is_dir(), reason=f"real survey images not found at {REAL}"),
]

DECAM = REAL / "sfft-decam-i-series" / "input"
JWST = (REAL / "sfft-jwst-nircam-a2744" / "input"
        / "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits")
TESS = REAL / "sfft-tess-difference" / "sfft_diff4check.fits.fz"
UKIDSS = REAL / "pypi-test-images" / "astroquery_ukidss_wfcam_K_image.fits"
EYUMA = REAL / "pypi-test-images" / "astroquery_astrometrynet_EYUMa_thumbnail.fit.gz"
TOROS = REAL / "properimage-toros-pair" / "aligned_eso085-030-004.fit"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def blank_sky_noise(image: np.ndarray, good: np.ndarray) -> float:
    """Sigma-clipped std of source-free pixels (sources found by sep, dilated by 5 pixels)."""
    data = np.ascontiguousarray(np.where(good, image, 0.0), dtype=np.float32)
    background = sep.Background(data, mask=~good)
    residual = data - background.back()
    _, segmentation = sep.extract(residual, 3.0, err=background.globalrms, mask=~good,
                                  segmentation_map=True)
    sky = good & ~binary_dilation(segmentation > 0, iterations=5)
    _, _, std = sigma_clipped_stats(image[sky], sigma=3.0, maxiters=10)
    return float(std)


def astropy_wcs(path: Path, hdu: int) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.getheader(path, hdu))


def assert_wcs_matches_astropy(exposure, path: Path, hdu: int, *, seed: int = 1) -> float:
    reference = astropy_wcs(path, hdu)
    ny, nx = exposure.image.shape
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-0.5, nx - 0.5, 100), rng.uniform(-0.5, ny - 0.5, 100)
    ra, dec = exposure.attrs["wcs"].all_pix2world(x, y, 0)
    ra0, dec0 = reference.all_pix2world(x, y, 0)
    worst = float(max(np.max(np.abs(ra - ra0) * np.cos(np.deg2rad(dec0))),
                      np.max(np.abs(dec - dec0))))
    assert worst < 1e-9, f"WCS differs from astropy's by {worst} deg"
    return worst


@pytest.mark.parametrize("name", ["DEC-OBS04a.mini.fits", "DEC-OBS18c.mini.fits"])
def test_decam_frame_variance_matches_blank_sky_noise(name: str) -> None:
    path = need(DECAM / name)
    exposure = read_exposure(path, chunks=128)
    assert isinstance(exposure.image.data, da.Array)
    assert exposure.image.data.chunks == ((128, 128), (128, 128))
    image, variance = exposure.image.values, exposure.variance.values
    mask = exposure.mask.values
    with fits.open(path) as hdul:
        assert np.array_equal(image, hdul[0].data.astype(np.float32))
        header = hdul[0].header
    noise = blank_sky_noise(image, mask == 0)
    ratio = float(np.median(variance[mask == 0])) / noise**2
    # The frames are sky-subtracted: the sky term is sep's measured rms; the stars add
    # max(I, 0)/GAIN. Measured: 1.046 (OBS04a) and 1.022 (OBS18c).
    assert ratio == pytest.approx(1.0, abs=0.10), f"median variance / noise^2 = {ratio:.3f}"
    assert np.all(np.isfinite(variance)) and not np.any(mask)
    assert_wcs_matches_astropy(exposure, path, 0)
    assert "TPV" in exposure.attrs["wcs"].to_header(relax=True)["CTYPE1"]
    visit = exposure.attrs["visit_info"]
    assert visit.exposure_time == 330.0 and visit.band == "i"
    assert visit.airmass == pytest.approx(header["AIRMASS"])
    assert visit.mjd == pytest.approx(58334.39133794)


def test_decam_variance_is_higher_on_stars() -> None:
    """On a bright star the variance includes its Poisson term I/GAIN."""
    path = need(DECAM / "DEC-OBS04a.mini.fits")
    exposure = read_exposure(path, chunks=None)
    image, variance = exposure.image.values, exposure.variance.values
    gain = fits.getheader(path)["GAIN"]
    y, x = np.unravel_index(np.argmax(image), image.shape)
    sky_variance = np.median(variance)
    assert variance[y, x] == pytest.approx(sky_variance + image[y, x] / gain, rel=0.05)


def test_jwst_mosaic_variance_wcs_and_calibration() -> None:
    path = need(JWST)
    exposure = read_exposure(path, chunks=300)
    image, variance = exposure.image.values, exposure.variance.values
    mask = exposure.mask.values
    noise = blank_sky_noise(image, mask == 0)
    ratio = float(np.median(variance[mask == 0])) / noise**2
    assert ratio == pytest.approx(1.0, abs=0.10), f"median variance / noise^2 = {ratio:.3f}"
    assert_wcs_matches_astropy(exposure, path, 0)
    # MJy/sr images: 1 unit over a pixel of PIXAR_SR steradians is 1e15 * PIXAR_SR nJy.
    assert exposure.attrs["photo_calib"].njy_per_count == pytest.approx(1e15 * 2.25e-14)
    assert exposure.attrs["visit_info"].physical_filter == "F200W"


def test_tess_tile_compressed_difference_with_nan() -> None:
    path = need(TESS)
    exposure = read_exposure(path, chunks=512)
    assert exposure.image.data.chunks[0] == (512, 512, 512, 512)
    with fits.open(path) as hdul:
        truth = hdul[1].data.astype(np.float32)
    loaded = exposure.compute()  # one pass over the file for all planes
    image, variance = loaded.image.values, loaded.variance.values
    no_data = (loaded.mask.values & exposure.attrs["mask_planes"].bitmask("NO_DATA")) != 0
    assert no_data.sum() == np.count_nonzero(~np.isfinite(truth)) > 0
    assert np.array_equal(no_data, ~np.isfinite(truth))
    assert np.all(image[no_data] == 0) and np.all(np.isposinf(variance[no_data]))
    assert np.array_equal(image[~no_data], truth[~no_data])
    assert np.all(np.isfinite(variance[~no_data]) & (variance[~no_data] > 0))
    assert_wcs_matches_astropy(exposure, path, 1)


def test_scaled_integer_and_gzipped_images() -> None:
    path = need(UKIDSS)
    exposure = read_exposure(path, chunks=128)
    with fits.open(path) as hdul:
        assert hdul[1].header["BITPIX"] == 32 and hdul[1].header["BSCALE"] == 0.7071
        truth = hdul[1].data.astype(np.float32)  # astropy applies BSCALE
    assert np.array_equal(exposure.image.values, truth)
    assert_wcs_matches_astropy(exposure, path, 1)
    assert exposure.attrs["photo_calib"].zero_point == pytest.approx(24.053)

    path = need(EYUMA)
    with pytest.warns(UserWarning, match="no gain"):
        exposure = read_exposure(path, chunks=100)
    with fits.open(path) as hdul:
        assert np.array_equal(exposure.image.values, hdul[0].data.astype(np.float32))
    assert_wcs_matches_astropy(exposure, path, 0)
    assert exposure.attrs["wcs"].sip is not None


def test_frame_without_wcs_needs_require_wcs_false() -> None:
    path = need(TOROS)
    with pytest.raises(InputError, match=r"aligned_eso085-030-004\.fit: no WCS"):
        read_exposure(path)
    with pytest.warns(UserWarning, match="no gain"):
        exposure = read_exposure(path, require_wcs=False, chunks=256, saturation=65535)
    assert exposure.attrs["wcs"] is None
    with fits.open(path) as hdul:
        truth = hdul[0].data.astype(np.float32)
    assert np.array_equal(exposure.image.values, truth)
    sat = (exposure.mask.values & exposure.attrs["mask_planes"].bitmask("SAT")) != 0
    assert np.array_equal(sat, truth >= 65535) and sat.any()


@pytest.mark.parametrize("suffix", [".fits", ".zarr"])
def test_real_frame_round_trips_exactly(tmp_path: Path, suffix: str) -> None:
    path = need(DECAM / "DEC-OBS04a.mini.fits")
    original = read_exposure(path, chunks=128)
    written = write_exposure(original, tmp_path / f"obs04a{suffix}")
    result = read_exposure(written, chunks=128)
    for plane in ("image", "variance", "mask"):
        assert original[plane].values.tobytes() == result[plane].values.tobytes()
    assert result.attrs["visit_info"].to_dict() == original.attrs["visit_info"].to_dict()
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 255, 100), rng.uniform(0, 255, 100)
    a = np.array(original.attrs["wcs"].all_pix2world(x, y, 0))
    b = np.array(result.attrs["wcs"].all_pix2world(x, y, 0))
    assert np.max(np.abs(a - b)) < 1e-9
