"""Tests of daskdiff.io: exact FITS/zarr round trips, laziness, plain images, errors, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from astropy.io import fits
from astropy.wcs import WCS, Sip

from daskdiff import (
    DEFAULT_TILE_SIZE,
    InputError,
    MaskPlanes,
    Observatory,
    PhotoCalib,
    VisitInfo,
    Weather,
    make_exposure,
)
from daskdiff.box import Box
from daskdiff.io import atomic_path, cleanup_stale, fits_arrays, read_exposure, write_exposure
from daskdiff.psf.base import Psf, psf_from_state, register_psf, stamp_box
from daskdiff.wcs import wcs_from_header

X0, Y0 = 12345, 67890
NY, NX = 150, 230
FORMATS = ["a.fits", "a.fits.gz", "a.fz", "a.zarr"]


# --------------------------------------------------------------------------------------------
# fixtures: a PSF model with arrays, WCSs, an exposure


@register_psf
class GridPsf(Psf):
    """A test PSF: Gaussian basis images mixed by coefficients linear in position."""

    type_name = "test-grid"

    def __init__(self, basis: np.ndarray, coeffs: np.ndarray, *, center: tuple[float, float],
                 notes: dict[str, Any], flags: np.ndarray, scale: np.ndarray) -> None:
        self.basis = np.asarray(basis, float)
        self.coeffs = np.asarray(coeffs)
        self._center = (float(center[0]), float(center[1]))
        self.notes = notes
        self.flags = np.asarray(flags, bool)
        self.scale = np.asarray(scale)

    def weights(self, x: float, y: float) -> np.ndarray:
        dx, dy = (x - self._center[0]) / 1000.0, (y - self._center[1]) / 1000.0
        return self.coeffs @ np.array([1.0, dx, dy])

    def kernel_image(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        image = np.tensordot(self.weights(x, y), self.basis, axes=1) * float(self.scale)
        size = size or self.default_size()
        half, full = size // 2, self.basis.shape[1] // 2
        padded = np.pad(image, max(half - full, 0))
        centre = padded.shape[0] // 2
        image = padded[centre - half:centre + half + 1, centre - half:centre + half + 1]
        return image / image.sum()

    def image(self, x: float, y: float, *, size: int | None = None) -> tuple[np.ndarray, Box]:
        from scipy.ndimage import shift

        size = size or self.default_size()
        box = stamp_box(x, y, size)
        centre = box.center
        stamp = shift(self.kernel_image(x, y, size=size), (y - centre[1], x - centre[0]))
        return stamp / stamp.sum(), box

    def default_size(self) -> int:
        return self.basis.shape[1]

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {"type": self.type_name, "center": list(self._center), "notes": self.notes}
        return params, {"basis": self.basis, "coeffs": self.coeffs, "flags": self.flags,
                        "scale": self.scale}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> GridPsf:
        return cls(arrays["basis"], arrays["coeffs"], center=tuple(params["center"]),
                   notes=params["notes"], flags=arrays["flags"], scale=arrays["scale"])

    @property
    def center(self) -> tuple[float, float]:
        return self._center


def make_psf() -> GridPsf:
    yy, xx = np.mgrid[-10:11, -10:11]
    basis = np.stack([np.exp(-(xx**2 + yy**2) / (2 * s**2)) for s in (1.5, 2.5, 4.0)])
    coeffs = np.array([[1.0, 0.1, -0.05], [0.3, -0.02, 0.04], [0.05, 0.01, 0.0]])
    # A long parameter string forces CONTINUE cards in FITS; quotes and '&' test escaping.
    notes = {"fit": "it's a test & more " * 20, "values": [0.1 * i for i in range(120)],
             "nested": {"n": 3, "ok": True, "none": None}}
    return GridPsf(basis, coeffs, center=(X0 + NX / 2, Y0 + NY / 2), notes=notes,
                   flags=np.array([True, False, True]), scale=np.array(1.25, dtype=np.float32))


def make_sip_wcs(*, shift: tuple[float, float] = (0.0, 0.0)) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [150.1, 2.2]
    wcs.wcs.crpix = [X0 + NX / 2 + 0.37 + shift[0], Y0 + NY / 2 - 0.21 + shift[1]]
    wcs.wcs.cd = np.array([[-5.5e-5, 1.2e-7], [2.1e-7, 5.5e-5]])
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 1], a[3, 0] = 2e-6, -1.5e-6, 8e-7, 3e-9
    b[2, 0], b[0, 2], b[1, 1], b[0, 3] = -1e-6, 2.5e-6, 4e-7, -2e-9
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def tpv_header(*, crpix: tuple[float, float]) -> fits.Header:
    """A DECam-like TPV header (PV1_x/PV2_x polynomial distortion)."""
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TPV", "DEC--TPV"
    header["CRVAL1"], header["CRVAL2"] = 316.8366457274, -65.96615744051
    header["CRPIX1"], header["CRPIX2"] = crpix
    header["CD1_1"], header["CD1_2"] = -4.277769182710e-07, 7.288176943228e-05
    header["CD2_1"], header["CD2_2"] = -7.285243193483e-05, -4.178363776447e-07
    pv1 = [-2.198e-3, 1.009654718498, -3.758e-4, 0.0, -7.676e-3, 8.225e-4, -1.572e-3,
           1.267e-3, -5.465e-4, -9.358e-4, -2.536e-4]
    pv2 = [2.608e-4, 1.006207625861, -2.900e-4, 0.0, -1.053e-3, -2.504e-3, 4.978e-4,
           -6.291e-3, 6.295e-4, -1.208e-3, -2.426e-4]
    for i, (p1, p2) in enumerate(zip(pv1, pv2, strict=True)):
        header[f"PV1_{i}"], header[f"PV2_{i}"] = p1, p2
    return header


def make_tpv_wcs() -> WCS:
    wcs = wcs_from_header(tpv_header(crpix=(X0 - 581.2001, Y0 - 6954.667)))
    assert "TPV" in wcs.to_header(relax=True)["CTYPE1"]
    return wcs


def make_test_exposure(*, wcs: WCS | None, chunks: Any = 64, seed: int = 7) -> Any:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, (NY, NX)).astype(np.float32)
    image[3, 4] = np.nan
    image[5, 6] = np.float32(-0.0)
    variance = rng.uniform(50, 150, (NY, NX)).astype(np.float32)
    variance[7, 8] = np.inf
    mask = rng.integers(0, 2**32, (NY, NX), dtype=np.uint32)
    mask[0, 0] = 0xFFFFFFFF  # bit 31 set: exercises the unsigned convention
    visit = VisitInfo(visit=123456, detector=42, band="r", physical_filter="r_03",
                      mjd=60123.123456789012, exposure_time=30.0, airmass=1.2345678901234,
                      elevation=55.5, azimuth=123.25, parallactic_angle=-33.3,
                      rotation_angle=12.5,
                      observatory=Observatory("Mt. O'Neil & Sons  ''  ", 10.5, -20.25, 1234.0),
                      weather=Weather(5.0, 750.0, 20.0))
    return make_exposure(
        image, variance=variance, mask=mask, x0=X0, y0=Y0, wcs=wcs, psf=make_psf(),
        photo_calib=PhotoCalib(0.0123456789012345, 1.5e-4), visit_info=visit,
        mask_planes=MaskPlanes().with_planes("FAKE_STREAK", "MY_PLANE_9"), chunks=chunks,
    )


def assert_sky_agrees(wcs_a: WCS, wcs_b: WCS, box: Box, *, seed: int = 3,
                      tol_deg: float = 1e-9) -> float:
    rng = np.random.default_rng(seed)
    x = rng.uniform(box.x0 - 0.5, box.x1 - 0.5, 100)
    y = rng.uniform(box.y0 - 0.5, box.y1 - 0.5, 100)
    ra_a, dec_a = wcs_a.all_pix2world(x, y, 0)
    ra_b, dec_b = wcs_b.all_pix2world(x, y, 0)
    worst = float(max(np.max(np.abs(ra_a - ra_b) * np.cos(np.deg2rad(dec_a))),
                      np.max(np.abs(dec_a - dec_b))))
    assert worst < tol_deg, f"WCS differs by {worst} deg"
    return worst


class CountingScheduler:
    """A dask scheduler that counts how often anything is computed."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.count += 1
        return dask.get(dsk, keys, **kwargs)


# --------------------------------------------------------------------------------------------
# exact round trips


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("kind", ["sip", "tpv"])
def test_round_trip_is_exact(tmp_path: Path, name: str, kind: str) -> None:
    wcs = make_sip_wcs() if kind == "sip" else make_tpv_wcs()
    original = make_test_exposure(wcs=wcs)
    path = write_exposure(original, tmp_path / name)
    assert path == tmp_path / name and path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporaries left

    result = read_exposure(path, chunks=64)
    for plane in ("image", "variance", "mask"):
        a, b = original[plane].values, result[plane].values
        assert b.dtype == a.dtype and b.shape == a.shape
        assert a.tobytes() == b.tobytes(), f"{plane} differs"  # bit-identical, NaN/-0 included
    assert int(result.x[0]) == X0 and int(result.y[0]) == Y0
    assert np.array_equal(result.x.values, original.x.values)
    box = Box(X0, Y0, NX, NY)
    assert_sky_agrees(original.attrs["wcs"], result.attrs["wcs"], box)

    assert result.attrs["visit_info"].to_dict() == original.attrs["visit_info"].to_dict()
    assert result.attrs["photo_calib"] == original.attrs["photo_calib"]
    assert result.attrs["mask_planes"] == original.attrs["mask_planes"]
    assert result.attrs["mask_planes"]["MY_PLANE_9"] == original.attrs["mask_planes"]["MY_PLANE_9"]

    psf_a, psf_b = original.attrs["psf"], result.attrs["psf"]
    assert isinstance(psf_b, GridPsf) and psf_b == psf_a
    assert psf_b.notes == psf_a.notes and psf_b.scale.dtype == np.float32
    assert psf_b.scale.shape == () and psf_b.flags.dtype == bool
    for x, y in [(X0 + 3.3, Y0 + 7.9), (X0 + NX - 1, Y0 + NY / 2), psf_a.center]:
        assert np.array_equal(psf_a.kernel_image(x, y), psf_b.kernel_image(x, y))
        (img_a, box_a), (img_b, box_b) = psf_a.image(x, y), psf_b.image(x, y)
        assert box_a == box_b and np.array_equal(img_a, img_b)


@pytest.mark.parametrize("name", ["b.fits", "b.zarr"])
def test_round_trip_without_psf_wcs_or_visit_info(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(11)
    image = rng.normal(size=(40, 30)).astype(np.float32)
    original = make_exposure(image, variance=np.ones_like(image), chunks=None)
    path = write_exposure(original, tmp_path / name)
    with pytest.raises(InputError, match="WCS"):
        read_exposure(path)
    result = read_exposure(path, require_wcs=False, chunks=None)
    assert result.attrs["wcs"] is None and result.attrs["psf"] is None
    assert result.attrs["visit_info"] is None
    assert result.attrs["photo_calib"] == PhotoCalib()
    assert np.array_equal(result.image.values, image)
    assert not np.any(result.mask.values)
    assert isinstance(result.image.data, np.ndarray)  # chunks=None loads


def test_fits_layout_is_lsst_style(tmp_path: Path) -> None:
    original = make_test_exposure(wcs=make_sip_wcs())
    path = write_exposure(original, tmp_path / "lsst.fits")
    with fits.open(path) as hdul:
        assert [h.name for h in hdul][:5] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        hdul.verify("exception")  # standard-conforming
        primary = hdul[0].header
        assert primary["VISIT"] == 123456 and primary["FILTER"] == "r_03"
        assert primary["PC_NJY"] == pytest.approx(0.0123456789012345)
        for extname in ("IMAGE", "MASK", "VARIANCE"):
            header = hdul[extname].header
            assert header["LTV1"] == -X0 and header["LTV2"] == -Y0
            assert header["CRVAL1A"] == X0 and header["CRVAL2A"] == Y0
            # The WCS in the file describes the array: astropy reading it at array pixel
            # (i, j) gives the sky of parent pixel (X0 + i, Y0 + j).
            file_wcs = WCS(header)
            ra, dec = file_wcs.all_pix2world([0.0, 17.0], [0.0, 23.0], 0)
            ra0, dec0 = original.attrs["wcs"].all_pix2world([X0, X0 + 17.0], [Y0, Y0 + 23.0], 0)
            assert np.allclose(ra, ra0, rtol=0, atol=1e-10)
            assert np.allclose(dec, dec0, rtol=0, atol=1e-10)
        mask_header = hdul["MASK"].header
        assert mask_header["MP_FAKE_STREAK"] == original.attrs["mask_planes"]["FAKE_STREAK"]
        assert mask_header["MP_DETECTED_NEGATIVE"] == 6
        assert np.array_equal(hdul["MASK"].data, original.mask.values)  # astropy reads uint32
        assert len(hdul["PSF"].header["DDPSF"]) > 1000  # long JSON in CONTINUE cards
        assert json.loads(hdul["PSF"].header["DDPSF"])["type"] == "test-grid"


def test_lsst_mef_without_daskdiff_cards_is_read(tmp_path: Path) -> None:
    """A MEF from another writer: planes, LTV origin, MP_ cards and header metadata."""
    rng = np.random.default_rng(5)
    image = rng.normal(size=(20, 30)).astype(np.float32)
    header = make_tpv_wcs().to_header(relax=True)
    header["CRPIX1"] -= 100
    header["CRPIX2"] -= 200
    header["LTV1"], header["LTV2"] = -100, -200
    mask_header = header.copy()
    mask_header["MP_BAD"], mask_header["MP_SAT"], mask_header["HIERARCH MP_CUSTOM"] = 0, 1, 5
    primary = fits.PrimaryHDU()
    primary.header["MJD-OBS"], primary.header["FILTER"], primary.header["FLUXMAG0"] = (
        60000.5, "g_01", 1e11)
    path = tmp_path / "foreign.fits"
    fits.HDUList([primary, fits.ImageHDU(image, header, name="IMAGE"),
                  fits.ImageHDU(np.arange(600, dtype=np.int32).reshape(20, 30), mask_header,
                                name="MASK"),
                  fits.ImageHDU(np.ones((20, 30), np.float32), header, name="VARIANCE")]
                 ).writeto(path)
    result = read_exposure(path, chunks=None)
    assert int(result.x[0]) == 100 and int(result.y[0]) == 200
    assert np.array_equal(result.image.values, image)
    assert result.mask.dtype == np.uint32 and result.mask.values[1, 2] == 32
    assert dict(result.attrs["mask_planes"]) == {"BAD": 0, "SAT": 1, "CUSTOM": 5}
    assert result.attrs["visit_info"].mjd == 60000.5
    assert result.attrs["visit_info"].physical_filter == "g_01"
    assert result.attrs["photo_calib"].njy_per_count == pytest.approx(3631e9 / 1e11)
    assert_sky_agrees(make_tpv_wcs(), result.attrs["wcs"], Box(100, 200, 30, 20))


def test_zarr_store_is_plain_xarray_with_tile_chunks(tmp_path: Path) -> None:
    import xarray as xr

    original = make_test_exposure(wcs=make_sip_wcs(), chunks=(64, 96))
    path = write_exposure(original, tmp_path / "t.zarr")
    for plane in ("image", "variance", "mask"):
        stored = zarr.open_array(path / plane, mode="r")
        assert stored.metadata.zarr_format == 3
        assert stored.chunks == (64, 96)
    assert zarr.open_array(path / "psf" / "basis", mode="r").shape == (3, 21, 21)
    plain = xr.open_zarr(path, consolidated=False)
    assert plain.image.dims == ("y", "x") and int(plain.x[0]) == X0
    assert plain.attrs["format"] == "daskdiff.exposure" and "CTYPE1" in plain.attrs["wcs"]
    assert plain.image.data.chunks == original.image.data.chunks
    assert np.array_equal(plain.mask.values, original.mask.values)


def test_numpy_exposure_and_irregular_tiles_are_written_in_regular_tiles(tmp_path: Path
                                                                         ) -> None:
    numpy_backed = make_test_exposure(wcs=make_sip_wcs(), chunks=None)
    write_exposure(numpy_backed, tmp_path / "n.zarr")
    assert zarr.open_array(tmp_path / "n.zarr" / "image", mode="r").chunks == (NY, NX)
    irregular = make_test_exposure(wcs=make_sip_wcs(), chunks=64)
    irregular = irregular.isel(x=slice(5, None))  # first tile 59 wide, the rest 64
    write_exposure(irregular, tmp_path / "i.zarr")
    result = read_exposure(tmp_path / "i.zarr", chunks=59)
    assert np.array_equal(result.image.values, irregular.image.values, equal_nan=True)
    assert int(result.x[0]) == X0 + 5


# --------------------------------------------------------------------------------------------
# laziness and chunking


@pytest.mark.parametrize("name", FORMATS)
def test_reading_is_lazy_and_tiled(tmp_path: Path, name: str) -> None:
    path = write_exposure(make_test_exposure(wcs=make_sip_wcs(), chunks=None), tmp_path / name)
    counter = CountingScheduler()
    with dask.config.set(scheduler=counter):
        result = read_exposure(path, chunks=(64, 100))
    assert counter.count == 0
    for plane in ("image", "variance", "mask"):
        data = result[plane].data
        assert isinstance(data, da.Array)
        assert data.chunks == ((64, 64, 22), (100, 100, 30))
    default = read_exposure(path)
    assert default.image.data.chunksize == (min(NY, DEFAULT_TILE_SIZE), min(NX, DEFAULT_TILE_SIZE))


def test_fits_pixels_are_read_only_when_computed(tmp_path: Path, monkeypatch: Any) -> None:
    path = write_exposure(make_test_exposure(wcs=make_sip_wcs()), tmp_path / "lazy.fits")
    reads: list[Any] = []
    original = fits_arrays.FitsPlaneReader._read

    def counting_read(self: Any, key: Any) -> np.ndarray:
        reads.append((self.layout.index, key))
        return original(self, key)

    monkeypatch.setattr(fits_arrays.FitsPlaneReader, "_read", counting_read)
    result = read_exposure(path, chunks=50)
    assert reads == []
    tile = result.image.isel(y=slice(50, 100), x=slice(100, 150)).values
    assert len(reads) == 1 and reads[0][0] == 1  # one tile of the IMAGE HDU
    assert tile.shape == (50, 50)


# --------------------------------------------------------------------------------------------
# plain images


def _write_plain(path: Path, data: np.ndarray, **cards: Any) -> Path:
    header = tpv_header(crpix=(-581.2, -6954.7))
    for key, value in cards.items():
        header[key] = value
    fits.PrimaryHDU(data, header).writeto(path)
    return path


def _simulated_frame(seed: int, *, sky: float, gain: float, read_noise: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Return a noisy frame (ADU) with stars and its noise-free model."""
    rng = np.random.default_rng(seed)
    ny, nx = 256, 256
    yy, xx = np.mgrid[:ny, :nx]
    model = np.full((ny, nx), sky)
    for x, y, flux in zip(rng.uniform(20, 236, 15), rng.uniform(20, 236, 15),
                          rng.uniform(2e4, 2e5, 15), strict=True):
        model += flux / (2 * np.pi * 2.0**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)
    electrons = rng.poisson(model * gain) + rng.normal(0.0, read_noise, model.shape)
    return electrons / gain, model


def test_plain_variance_with_sky_follows_gain_and_read_noise(tmp_path: Path) -> None:
    sky, gain, read_noise = 1000.0, 2.0, 6.0
    frame, model = _simulated_frame(1, sky=sky, gain=gain, read_noise=read_noise)
    path = _write_plain(tmp_path / "sky.fits", frame, GAIN=gain, RDNOISE=read_noise,
                        MJD_OBS=60001.25, FILTER="i DECam", EXPTIME=90.0)
    counter = CountingScheduler()
    with dask.config.set(scheduler=counter):
        exposure = read_exposure(path, chunks=64)
    assert counter.count == 0 and isinstance(exposure.variance.data, da.Array)  # lazy
    variance = exposure.variance.values.astype(float)
    true_variance = model / gain + (read_noise / gain) ** 2
    blank = model < sky + 1.0
    # Blank sky: the variance plane is sky/g + (r/g)^2 (its median to 0.5 %).
    assert np.median(variance[blank]) == pytest.approx(sky / gain + (read_noise / gain) ** 2,
                                                       rel=5e-3)
    # Noise normalised by the variance plane is unit-variance on sky and on the stars.
    for region in (blank, model > sky + 200.0):
        z = (exposure.image.values[region] - model[region]) / np.sqrt(variance[region])
        assert region.sum() > 300
        assert np.std(z) == pytest.approx(1.0, abs=4 / np.sqrt(2 * region.sum()) + 0.01)
    assert np.allclose(np.median(variance / true_variance), 1.0, atol=0.01)
    assert exposure.attrs["visit_info"].exposure_time == 90.0
    assert exposure.image.dtype == np.float32


def test_plain_variance_of_sky_subtracted_frame_uses_measured_sky(tmp_path: Path) -> None:
    sky, gain, read_noise = 1000.0, 2.0, 6.0
    frame, model = _simulated_frame(2, sky=sky, gain=gain, read_noise=read_noise)
    path = _write_plain(tmp_path / "sub.fits", (frame - sky).astype(np.float32), GAIN=gain,
                        RDNOISE=read_noise)
    exposure = read_exposure(path, chunks=100)
    variance = exposure.variance.values.astype(float)
    blank = model < sky + 1.0
    true_sky = sky / gain + (read_noise / gain) ** 2
    assert np.median(variance[blank]) == pytest.approx(true_sky, rel=0.03)
    stars = model > sky + 200.0
    z = (exposure.image.values[stars] - (model[stars] - sky)) / np.sqrt(variance[stars])
    assert np.std(z) == pytest.approx(1.0, abs=0.05)  # the source Poisson term is included


def test_plain_mask_saturation_nan_and_scaled_integers(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    raw = rng.integers(-200, 200, (64, 80)).astype(np.int16)
    raw[10, 10] = 32000
    hdu = fits.PrimaryHDU(raw * 0.5 + 1000.0, tpv_header(crpix=(-581.2, -6954.7)))
    hdu.scale("int16", bscale=0.5, bzero=1000.0)
    hdu.header["SATURATE"] = 15000.0
    hdu.header["GAIN"] = 1.5
    fits.HDUList([hdu]).writeto(tmp_path / "scaled.fits")
    with fits.open(tmp_path / "scaled.fits", do_not_scale_image_data=True) as hdul:
        assert hdul[0].header["BITPIX"] == 16 and hdul[0].header["BZERO"] == 1000.0
        assert np.array_equal(hdul[0].data, raw)
    expected = (raw * 0.5 + 1000.0).astype(np.float32)
    exposure = read_exposure(tmp_path / "scaled.fits", chunks=32)
    assert np.array_equal(exposure.image.values, expected)
    sat = exposure.attrs["mask_planes"].bitmask("SAT")
    assert np.array_equal(np.argwhere(exposure.mask.values & sat), [[10, 10]])
    override = read_exposure(tmp_path / "scaled.fits", chunks=32, saturation=1090.0)
    assert np.array_equal(override.mask.values & sat != 0, expected >= 1090.0)

    data = rng.normal(0, 5, (64, 80)).astype(np.float32)
    data[20:25, 30:33] = np.nan
    path = _write_plain(tmp_path / "nan.fits", data, GAIN=2.0)
    exposure = read_exposure(path, chunks=32)
    no_data = exposure.mask.values & exposure.attrs["mask_planes"].bitmask("NO_DATA") != 0
    assert np.array_equal(no_data, np.isnan(data))
    assert np.all(exposure.image.values[no_data] == 0)
    assert np.all(np.isposinf(exposure.variance.values[no_data]))
    assert np.all(np.isfinite(exposure.variance.values[~no_data]))


def test_plain_hdu_selection_error_plane_and_wcs(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    data = rng.normal(0, 3, (40, 50)).astype(np.float32)
    error = np.full((40, 50), 3.0, np.float32)
    header = tpv_header(crpix=(-581.2, -6954.7))
    path = tmp_path / "multi.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("a", "E", array=np.arange(3.0))], name="TAB"),
        fits.ImageHDU(data, header, name="SCI"), fits.ImageHDU(error, name="ERR")]).writeto(path)
    exposure = read_exposure(path, chunks=None)  # first 2-D image HDU: SCI
    assert np.array_equal(exposure.image.values, data)
    assert np.array_equal(exposure.variance.values, error**2)  # the ERR HDU, squared
    assert_sky_agrees(exposure.attrs["wcs"], WCS(header), Box(0, 0, 50, 40))
    by_name = read_exposure(path, hdu="SCI", chunks=None)
    assert np.array_equal(by_name.image.values, data)
    with pytest.raises(InputError, match=r"no HDU 'NOPE'.*SCI"):
        read_exposure(path, hdu="NOPE")
    with pytest.raises(InputError, match="not a 2-D image"):
        read_exposure(path, hdu=1)
    with pytest.raises(InputError, match=r"multi\.fits: no WCS.*require_wcs=False"):
        read_exposure(path, hdu="ERR")
    with pytest.warns(UserWarning, match="no gain"):
        without = read_exposure(path, hdu="ERR", require_wcs=False, chunks=None)
    assert without.attrs["wcs"] is None


def test_plain_without_gain_warns_and_uses_measured_sky(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    data = rng.normal(0.0, 4.0, (128, 128)).astype(np.float32)
    path = _write_plain(tmp_path / "nogain.fits", data)
    with pytest.warns(UserWarning, match="no gain"):
        exposure = read_exposure(path, chunks=64)
    assert np.median(exposure.variance.values) == pytest.approx(16.0, rel=0.05)


# --------------------------------------------------------------------------------------------
# errors


def test_missing_path_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothere\.fits does not exist"):
        read_exposure(tmp_path / "nothere.fits")
    with pytest.raises(InputError, match=r"nothere\.zarr does not exist"):
        read_exposure(tmp_path / "nothere.zarr")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match=r"image\.png: unknown file type.*\.zarr"):
        read_exposure(tmp_path / "image.png")
    exposure = make_test_exposure(wcs=make_sip_wcs())
    with pytest.raises(InputError, match="unknown file type"):
        write_exposure(exposure, tmp_path / "out.hdf5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]


def test_truncated_and_corrupt_fits(tmp_path: Path) -> None:
    path = write_exposure(make_test_exposure(wcs=make_sip_wcs()), tmp_path / "t.fits")
    size = path.stat().st_size
    for keep in (size // 2, size - 5000, 1000):
        cut = tmp_path / f"cut{keep}.fits"
        cut.write_bytes(path.read_bytes()[:keep])
        with pytest.raises(InputError, match=rf"cut{keep}\.fits.*(truncated|corrupt)"):
            read_exposure(cut)
    junk = tmp_path / "junk.fits"
    junk.write_bytes(np.random.default_rng(0).bytes(10000))
    with pytest.raises(InputError, match=r"junk\.fits is not a readable FITS file"):
        read_exposure(junk)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.fits"):
        read_exposure(empty)


def test_mef_with_mismatched_planes(tmp_path: Path) -> None:
    header = make_tpv_wcs().to_header(relax=True)
    path = tmp_path / "bad.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((10, 12), np.float32), header,
                                                   name="IMAGE"),
                  fits.ImageHDU(np.zeros((10, 12), np.int32), name="MASK"),
                  fits.ImageHDU(np.zeros((10, 11), np.float32), name="VARIANCE")]
                 ).writeto(path)
    with pytest.raises(InputError, match=r"bad\.fits: the VARIANCE HDU has shape \(10, 11\).*"
                                         r"\(10, 12\)"):
        read_exposure(path)


def test_unknown_psf_type_is_named(tmp_path: Path) -> None:
    path = write_exposure(make_test_exposure(wcs=make_sip_wcs()), tmp_path / "p.fits")
    with fits.open(path, mode="update") as hdul:
        params = json.loads(hdul["PSF"].header["DDPSF"])
        params["type"] = "no-such-model"
        hdul["PSF"].header["DDPSF"] = json.dumps(params)
    with pytest.raises(InputError, match=r"p\.fits: cannot rebuild its PSF.*no-such-model"):
        read_exposure(path)


def test_not_a_daskdiff_zarr_store(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    with pytest.raises(InputError, match=r"other\.zarr is a zarr store but not a daskdiff"):
        read_exposure(tmp_path / "other.zarr")


@pytest.mark.parametrize("name", ["o.fits", "o.zarr"])
def test_overwrite_requires_flag_and_replaces(tmp_path: Path, name: str) -> None:
    first = make_test_exposure(wcs=make_sip_wcs(), seed=1)
    second = make_test_exposure(wcs=make_sip_wcs(), seed=2)
    path = write_exposure(first, tmp_path / name)
    with pytest.raises(InputError, match=rf"{name} already exists; pass overwrite=True"):
        write_exposure(second, path)
    assert np.array_equal(read_exposure(path).mask.values, first.mask.values)
    write_exposure(second, path, overwrite=True)
    assert np.array_equal(read_exposure(path).mask.values, second.mask.values)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# --------------------------------------------------------------------------------------------
# atomic writes


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_atomic_path_exception_leaves_nothing(tmp_path: Path, kind: str) -> None:
    final = tmp_path / "product"
    with pytest.raises(ZeroDivisionError), atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".product.tmp-")
        if kind == "file":
            tmp.write_bytes(b"partial")
        else:
            tmp.mkdir()
            (tmp / "chunk").write_bytes(b"partial")
        _ = 1 / 0
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_directory_and_file(tmp_path: Path) -> None:
    final = tmp_path / "store"
    for version in ("v1", "v2"):
        with atomic_path(final, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "content").write_text(version)
    assert (final / "content").read_text() == "v2"
    with pytest.raises(InputError, match="already exists"), atomic_path(final) as tmp:
        tmp.write_text("never")
    assert (final / "content").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    with pytest.raises(InputError, match="nothing was written"), atomic_path(tmp_path / "x"):
        pass


def test_cleanup_stale_removes_temporaries_and_restores_old(tmp_path: Path) -> None:
    (tmp_path / ".a.fits.tmp-" "0123456789abcdef0123456789abcdef").write_bytes(b"half")
    stale_dir = tmp_path / ".b.zarr.tmp-0123456789abcdef0123456789abcdef"
    stale_dir.mkdir()
    (stale_dir / "x").write_bytes(b"half")
    old = tmp_path / ".c.zarr.old-0123456789abcdef0123456789abcdef"
    old.mkdir()
    (old / "x").write_bytes(b"complete")
    (tmp_path / ".hidden-but-not-ours").write_bytes(b"keep")
    (tmp_path / "kept.fits").write_bytes(b"keep")
    assert cleanup_stale(tmp_path, min_age=3600) == []
    removed = cleanup_stale(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-not-ours", "c.zarr",
                                                          "kept.fits"]
    assert (tmp_path / "c.zarr" / "x").read_bytes() == b"complete"
    with pytest.raises(InputError, match="not a directory"):
        cleanup_stale(tmp_path / "kept.fits")


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import dask.array as da, numpy as np
    from daskdiff.io import write_exposure
    from daskdiff import make_exposure

    def slow(block):
        time.sleep(0.1)
        return block

    image = da.zeros((512, 512), chunks=64, dtype=np.float32).map_blocks(slow)
    exposure = make_exposure(image, variance=image + 1, chunks=None)
    print("start", flush=True)
    with __import__("dask").config.set(scheduler="synchronous"):
        write_exposure(exposure, sys.argv[1], overwrite=True)
    print("finished", flush=True)
""")


@pytest.mark.parametrize(("name", "existing"), [("k.zarr", True), ("k.fits", False)])
def test_sigkill_mid_write_leaves_no_partial_product(tmp_path: Path, name: str,
                                                     existing: bool) -> None:
    final = tmp_path / name
    if existing:
        rng = np.random.default_rng(0)
        old = make_exposure(rng.normal(size=(8, 8)).astype(np.float32),
                            variance=np.ones((8, 8), np.float32), chunks=None)
        write_exposure(old, final)
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(final)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 20
        temporaries: list[Path] = []
        while not temporaries and time.monotonic() < deadline:
            temporaries = list(tmp_path.glob(f".{name}.tmp-*"))
            time.sleep(0.02)
        assert temporaries, "the writer never started writing"
        time.sleep(0.3)  # well inside the 64 slow tiles (~6 s in all)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == sorted(["writer.py"] + ([name] if existing else []))
    if existing:
        assert read_exposure(final, require_wcs=False).image.shape == (8, 8)  # old, intact
    assert cleanup_stale(tmp_path) == temporaries
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def _project_psfs() -> list[Any]:
    """The project's registered models, as a pipeline would attach them."""
    from daskdiff.psf import GaussianPsf, MoffatPsf, PixelPsf
    from daskdiff.psf.warped import CoaddPsf, WarpedPsf

    box = Box(X0, Y0, NX, NY)
    moffat = MoffatPsf([[4.4, 0.15], [0.4, 0.0]], beta=3.0, g1=[[0.0, 0.01], [0.05, 0.0]],
                       box=box)
    basis = np.stack([GaussianPsf(sigma=s).kernel_image(0, 0, size=15) for s in (1.8, 2.4, 3.0)])
    pixel = PixelPsf(basis * np.array([1.0, 0.1, -0.05])[:, None, None], box)
    warped = WarpedPsf(pixel, make_sip_wcs(), make_sip_wcs(shift=(3.0, -2.0)), box)
    coadd = CoaddPsf([(warped, Box(X0, Y0, NX // 2, NY)),
                      (GaussianPsf(sigma=2.1), Box(X0 + NX // 2, Y0, NX - NX // 2, NY))], box)
    return [GaussianPsf(sigma=1.8), moffat, pixel, warped, coadd]


@pytest.mark.parametrize("name", ["m.fits", "m.zarr"])
def test_project_psf_models_round_trip(tmp_path: Path, name: str) -> None:
    from daskdiff import replace_metadata

    exposure = make_test_exposure(wcs=make_sip_wcs(), chunks=None)
    for number, psf in enumerate(_project_psfs()):
        path = write_exposure(replace_metadata(exposure, psf=psf), tmp_path / f"{number}{name}")
        result = read_exposure(path).attrs["psf"]
        assert type(result) is type(psf)
        assert result.to_state()[0] == psf.to_state()[0]
        # The I/O is exact with respect to the model's state (WarpedPsf's state holds its
        # WCSs as header strings, which rebuild them to ~1e-12 deg, hence the allclose).
        rebuilt = psf_from_state(*psf.to_state())
        for x, y in [(X0 + 10.3, Y0 + 20.7), (X0 + NX - 5.5, Y0 + NY - 3.2)]:
            assert np.array_equal(result.kernel_image(x, y), rebuilt.kernel_image(x, y))
            assert np.array_equal(result.image(x, y)[0], rebuilt.image(x, y)[0])
            assert np.allclose(result.kernel_image(x, y), psf.kernel_image(x, y), rtol=0,
                               atol=1e-10)
