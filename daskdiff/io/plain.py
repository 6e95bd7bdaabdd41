r"""Plain FITS images as people have them (a DECam or ZTF frame, a JWST mosaic, a TESS FFI).

:func:`read_plain_exposure` turns one 2-D image HDU into an exposure:

- **image**: the ``BSCALE``/``BZERO``-applied data as float32, read lazily tile by tile;
  non-finite pixels are set to 0;
- **mask**: ``NO_DATA`` where the data is non-finite; ``SAT`` where it is at or above the
  saturation level (``saturation=``, else the header's ``ESATUR`` (saturation after sky
  subtraction), ``SATURATE``, ``SATURAT`` or ``SATLEVEL``);
- **variance** (ADU²), unless the file has a same-shaped ``VARIANCE``/``VAR`` or
  ``ERR``/``ERROR``/``SIGMA``/``UNCERT``/``NOISE`` HDU (then that, squared for errors):

  .. math:: V = V_\mathrm{sky} + \max(I - B, 0) / g

  with gain :math:`g` (e-/ADU, ``gain=`` or ``GAIN``/``EGAIN``/``EFFGAIN``). Where the sky is
  present in the image (its background level exceeds :data:`SKY_PRESENT_THRESHOLD` times the
  background rms), :math:`B = 0` and :math:`V_\mathrm{sky} = (r/g)^2` with read noise
  :math:`r` (e-, ``read_noise=`` or ``RDNOISE``/``READNOIS``/``RON``), so
  :math:`V = (\mathrm{sky} + \mathrm{source})/g + (r/g)^2`. Where the image is
  sky-subtracted, :math:`B` is the measured background map and :math:`V_\mathrm{sky}` the
  square of the measured blank-sky rms map (``sep.Background``, which includes the read
  noise). Without a gain the source term is dropped and the measured sky variance is used.
  **No-data pixels have variance +inf** (weight 0) and image 0 and carry ``NO_DATA``;
- **WCS** from the header (TAN, TAN-SIP, TPV, ...); the parent frame is the file's array
  frame (``x0 = y0 = 0``; IRAF ``LTV`` cards of plain images are not an origin);
- **visit info** from the header (``VisitInfo.from_header``), **photo calib** from
  ``PC_NJY``/``FLUXMAG0``/``MAGZERO``, or from ``PIXAR_SR`` for images in MJy/sr.

Everything stays lazy: the sky is measured by one task on the whole image when a variance tile
is first computed.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import sep
import xarray as xr
from astropy.io import fits

from ..errors import InputError
from ..exposure import make_exposure
from ..masks import DEFAULT_MASK_PLANES
from ..metadata import PhotoCalib, VisitInfo
from ..wcs import wcs_from_header
from .fits_arrays import HduLayout, lazy_plane

__all__ = [
    "GAIN_KEYS",
    "READ_NOISE_KEYS",
    "SATURATION_KEYS",
    "SKY_PRESENT_THRESHOLD",
    "measure_sky",
    "plain_mask",
    "read_plain_exposure",
    "variance_from_sky",
]

GAIN_KEYS = ("GAIN", "EGAIN", "EFFGAIN")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON")
SATURATION_KEYS = ("ESATUR", "SATURATE", "SATURAT", "SATLEVEL")
_VARIANCE_NAMES = ("VARIANCE", "VAR")
_ERROR_NAMES = ("ERR", "ERROR", "SIGMA", "UNCERT", "NOISE")

#: The sky counts as present in an image when its median background exceeds this many times
#: the background rms; below, the image is treated as sky-subtracted.
SKY_PRESENT_THRESHOLD = 5.0

_SAT = np.uint32(DEFAULT_MASK_PLANES.bitmask("SAT"))
_NO_DATA = np.uint32(DEFAULT_MASK_PLANES.bitmask("NO_DATA"))


def read_plain_exposure(
    path: Path,
    hdul: fits.HDUList,
    layouts: dict[int, HduLayout],
    *,
    hdu: int | str | None = None,
    chunks: tuple[int, int],
    gain: float | None = None,
    read_noise: float | None = None,
    saturation: float | None = None,
    require_wcs: bool = True,
) -> xr.Dataset:
    """Open one 2-D image HDU of a FITS file as a lazy exposure (see the module docstring).

    Parameters
    ----------
    path : pathlib.Path
        The file.
    hdul : astropy.io.fits.HDUList
        The open file (headers only are used).
    layouts : dict of int to HduLayout
        Its image HDUs' layouts.
    hdu : int or str, optional
        HDU number or EXTNAME; the first 2-D image HDU if omitted.
    chunks : tuple of int
        Tile shape.
    gain, read_noise, saturation : float, optional
        Override the header's gain (e-/ADU), read noise (e-) and saturation level (ADU).
    require_wcs : bool, optional
        Whether a missing WCS is an error (the pipeline needs one).

    Returns
    -------
    xarray.Dataset
        The exposure, dask-backed.

    Raises
    ------
    InputError
        If there is no 2-D image HDU (or ``hdu`` is not one), the WCS is missing (with
        ``require_wcs``), or an override is not a positive number.
    """
    index = _select_hdu(hdul, layouts, hdu, path)
    layout = layouts[index]
    header = _merged_header(hdul, index)
    gain = _positive(gain, "gain") if gain is not None else _header_number(header, GAIN_KEYS)
    read_noise = (_non_negative(read_noise, "read_noise") if read_noise is not None
                  else _header_number(header, READ_NOISE_KEYS))
    saturation = (float(saturation) if saturation is not None
                  else _header_number(header, SATURATION_KEYS))
    wcs = _plain_wcs(hdul[index].header, path, require_wcs=require_wcs)

    raw = lazy_plane(path, layout, np.dtype(np.float32), chunks, name="fits-plain")
    mask = raw.map_blocks(plain_mask, saturation=saturation, dtype=np.uint32)
    image = raw.map_blocks(_zero_non_finite, dtype=np.float32)
    variance = _companion_variance(path, hdul, layouts, layout, chunks)
    if variance is None:
        variance = _derived_variance(raw, mask, gain=gain, read_noise=read_noise,
                                     path=path, chunks=chunks)
    else:
        variance = da.map_blocks(_mark_no_data_variance, variance, raw, dtype=np.float32)
        mask = da.map_blocks(_mask_bad_variance, mask, variance, dtype=np.uint32)
    return make_exposure(
        image, variance=variance, mask=mask, wcs=wcs,
        photo_calib=_photo_calib(header), visit_info=VisitInfo.from_header(header),
        mask_planes=DEFAULT_MASK_PLANES, chunks=None,
    )


# --------------------------------------------------------------------------------------------
# header helpers


def _select_hdu(hdul: fits.HDUList, layouts: dict[int, HduLayout], hdu: int | str | None,
                path: Path) -> int:
    images = [i for i, layout in layouts.items() if len(layout.shape) == 2]
    if hdu is None:
        if not images:
            raise InputError(f"{path} holds no 2-D image HDU; nothing to read as an exposure")
        return images[0]
    try:
        index = hdul.index_of(hdu)
    except (KeyError, IndexError):
        available = ", ".join(f"{i}:{h.name or '(primary)'}" for i, h in enumerate(hdul))
        raise InputError(f"{path} has no HDU {hdu!r}; it has {available}") from None
    if index not in images:
        raise InputError(f"HDU {hdu!r} of {path} is not a 2-D image; 2-D image HDUs: "
                         f"{images or 'none'}")
    return index


def _merged_header(hdul: fits.HDUList, index: int) -> fits.Header:
    """Return the primary header updated by the chosen HDU's (inherited keywords)."""
    if index == 0:
        return hdul[0].header
    header = hdul[0].header.copy()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND"):
        header.remove(key, ignore_missing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header.update(hdul[index].header)
    return header


def _header_number(header: fits.Header, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = header.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value) and value > 0:
                return float(value)
    return None


def _positive(value: float, name: str) -> float:
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise InputError(f"{name}={value!r} must be a positive finite number")
    return float(value)


def _non_negative(value: float, name: str) -> float:
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise InputError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def _plain_wcs(header: fits.Header, path: Path, *, require_wcs: bool) -> Any:
    if "CTYPE1" not in header or "CTYPE2" not in header:
        if not require_wcs:
            return None
        raise InputError(
            f"{path}: no WCS in the header (CTYPE1/CTYPE2 missing); add an astrometric "
            "solution (e.g. with astrometry.net) or, to read it without one, pass "
            "require_wcs=False"
        )
    return wcs_from_header(header, source=str(path))


def _photo_calib(header: fits.Header) -> PhotoCalib:
    calib = PhotoCalib.from_header(header)
    if calib is not None:
        return calib
    unit = str(header.get("BUNIT", "")).replace(" ", "").lower()
    area = header.get("PIXAR_SR")
    if unit == "mjy/sr" and isinstance(area, int | float) and area > 0:
        return PhotoCalib(1e15 * float(area))  # 1 MJy/sr over the pixel, in nJy
    return PhotoCalib()


# --------------------------------------------------------------------------------------------
# per-pixel (tile) functions


def plain_mask(raw: np.ndarray, *, saturation: float | None) -> np.ndarray:
    """Return the mask of a raw image tile: ``NO_DATA`` where non-finite, ``SAT`` if saturated."""
    mask = np.where(np.isfinite(raw), np.uint32(0), _NO_DATA).astype(np.uint32)
    if saturation is not None:
        with np.errstate(invalid="ignore"):
            mask[raw >= saturation] |= _SAT
    return mask


def _zero_non_finite(raw: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(raw), raw, np.float32(0)).astype(np.float32)


def variance_from_sky(raw: np.ndarray, background: np.ndarray, sky_variance: np.ndarray, *,
                      gain: float | None) -> np.ndarray:
    """Return the variance of an image tile: ``sky_variance + max(raw - background, 0) / gain``.

    Non-finite pixels get variance +inf. ``gain=None`` drops the source term.
    """
    finite = np.isfinite(raw)
    variance = np.array(sky_variance, dtype=np.float32, copy=True)
    if gain is not None:
        source = np.where(finite, raw - background, 0.0)
        variance += (np.maximum(source, 0.0) / gain).astype(np.float32)
    variance[~finite] = np.inf
    return variance


def _mark_no_data_variance(variance: np.ndarray, raw: np.ndarray) -> np.ndarray:
    variance = np.array(variance, dtype=np.float32, copy=True)
    variance[~np.isfinite(raw) | ~np.isfinite(variance) | (variance <= 0)] = np.inf
    return variance


def _mask_bad_variance(mask: np.ndarray, variance: np.ndarray) -> np.ndarray:
    return np.where(np.isinf(variance), mask | _NO_DATA, mask).astype(np.uint32)


# --------------------------------------------------------------------------------------------
# variance


def measure_sky(raw: np.ndarray, mask: np.ndarray, *, gain: float | None,
                read_noise: float | None, box: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """Return the background map and sky-variance map used by :func:`variance_from_sky`.

    Parameters
    ----------
    raw : numpy.ndarray
        The whole image (ADU), NaN where there is no data.
    mask : numpy.ndarray
        Its mask; ``SAT`` and ``NO_DATA`` pixels are ignored.
    gain : float or None
        Gain in e-/ADU.
    read_noise : float or None
        Read noise in e- (0 if unknown).
    box : int, optional
        Background mesh size in pixels.

    Returns
    -------
    background, sky_variance : numpy.ndarray
        float32 maps. With the sky present in the image and a known gain: zeros and
        ``(read_noise/gain)**2``; otherwise (sky-subtracted, or no gain) the ``sep`` background
        map and the square of its rms map.
    """
    bad = ((mask & (_SAT | _NO_DATA)) != 0) | ~np.isfinite(raw)
    data = np.ascontiguousarray(np.where(bad, 0.0, raw), dtype=np.float32)
    ny, nx = data.shape
    if bad.all():
        return np.zeros_like(data), np.full_like(data, np.inf)
    background = sep.Background(data, mask=bad, bw=min(box, nx), bh=min(box, ny), fw=3, fh=3)
    back = background.back()
    level = float(np.median(back[~bad]))
    if gain is not None and level > SKY_PRESENT_THRESHOLD * background.globalrms:
        noise = (read_noise or 0.0) / gain
        return np.zeros_like(data), np.full_like(data, noise * noise)
    rms = background.rms()
    return back.astype(np.float32), (rms * rms).astype(np.float32)


def _derived_variance(raw: da.Array, mask: da.Array, *, gain: float | None,
                      read_noise: float | None, path: Path, chunks: tuple[int, int]
                      ) -> da.Array:
    if gain is None:
        warnings.warn(
            f"{path}: no gain (GAIN/EGAIN/EFFGAIN) in the header; the variance is the measured "
            "sky variance only, without the sources' Poisson noise; pass gain= to add it",
            stacklevel=4,
        )
    sky = dask.delayed(measure_sky, pure=True, nout=2)(raw, mask, gain=gain,
                                                       read_noise=read_noise)
    shape, meta = raw.shape, np.empty((0, 0), np.float32)
    back = da.from_delayed(sky[0], shape=shape, dtype=np.float32, meta=meta).rechunk(chunks)
    sky_var = da.from_delayed(sky[1], shape=shape, dtype=np.float32, meta=meta).rechunk(chunks)
    return da.map_blocks(variance_from_sky, raw, back, sky_var, gain=gain, dtype=np.float32)


def _companion_variance(path: Path, hdul: fits.HDUList, layouts: dict[int, HduLayout],
                        image: HduLayout, chunks: tuple[int, int]) -> da.Array | None:
    """Return the variance from a same-shaped variance or error HDU of the file, if any."""
    for index, layout in layouts.items():
        name = hdul[index].name.upper()
        if index == image.index or layout.shape != image.shape:
            continue
        if name in _VARIANCE_NAMES:
            return lazy_plane(path, layout, np.dtype(np.float32), chunks, name="fits-var")
        if name in _ERROR_NAMES:
            error = lazy_plane(path, layout, np.dtype(np.float32), chunks, name="fits-err")
            return error * error
    return None
