"""LSST-style multi-extension FITS exposures.

Layout written by :func:`write_fits_exposure` (and read back by :func:`read_mef_exposure`):

====  ==========  ==========================================================================
HDU   EXTNAME     content
====  ==========  ==========================================================================
0     (primary)   no data; visit-info and photo-calib cards (``MJD-OBS``, ``FILTER``,
                  ``FLUXMAG0``, ...) and ``DDMETA``, the exact metadata as JSON
1     IMAGE       float32 image
2     MASK        uint32 mask (``BZERO = 2**31``) with ``MP_<NAME>`` plane cards
3     VARIANCE    float32 variance
4     PSF         no data; ``DDPSF``: the PSF parameters as JSON (only if there is a PSF)
5...  PSFARR      one HDU per PSF array (``EXTVER`` 1, 2, ...; ``ARRNAME``, ``ARRDTYPE``,
                  ``ARRSHAPE`` cards)
====  ==========  ==========================================================================

Each plane HDU carries the WCS of its array (``CRPIX`` shifted to the array origin), the
origin as ``LTV1 = -x0``, ``LTV2 = -y0`` and the physical "A" WCS (``CRVAL1A = x0``). Files
ending in ``.fz`` are tile-compressed losslessly (``GZIP_2``, no quantisation), files ending
in ``.gz`` are gzipped; both are read lazily too (``.fz`` tile by tile).

Uncompressed files are written tile-parallel: the headers and the data blocks are laid out
first, then every dask tile is written straight into its place with ``dask.array.store``.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

from ..errors import InputError
from ..exposure import PLANES, exposure_box, get_mask_planes, make_exposure
from ..masks import MaskPlanes
from ..metadata import PhotoCalib, VisitInfo
from ..wcs import wcs_from_header, wcs_to_header
from ._meta import (
    FORMAT_NAME,
    metadata_from_json,
    metadata_to_json,
    prepare_exposure,
    psf_from_parts,
    psf_to_parts,
)
from .fits_arrays import FitsPlaneWriter, HduLayout, file_size_after, lazy_plane

__all__ = ["card_json", "is_mef", "read_mef_exposure", "write_fits_exposure"]

_PLANE_HDUS = (("IMAGE", "image"), ("MASK", "mask"), ("VARIANCE", "variance"))
_BITPIX = {"image": -32, "variance": -32, "mask": 32}


# --------------------------------------------------------------------------------------------
# writing


def write_fits_exposure(exposure: xr.Dataset, path: Path, *, compression: str | None = None
                        ) -> None:
    """Write an exposure as an LSST-style multi-extension FITS file.

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure (numpy or dask planes).
    path : pathlib.Path
        Where to write (a new file; callers make the write atomic).
    compression : {None, "gzip", "tile"}, optional
        ``None`` writes a plain file tile-parallel; ``"gzip"`` a gzipped file; ``"tile"``
        lossless tile compression (``.fz``). The compressed kinds hold the planes in memory.
    """
    exposure = prepare_exposure(exposure, source=str(path))
    primary = _primary_header(exposure)
    planes = [(extname, name, _plane_header(exposure, extname, name))
              for extname, name in _PLANE_HDUS]
    psf_hdus = _psf_hdus(exposure.attrs.get("psf"))
    if compression is None:
        _write_laid_out(exposure, path, primary, planes, psf_hdus)
    else:
        _write_in_memory(exposure, path, primary, planes, psf_hdus, compression)


def card_json(value: Any) -> str:
    r"""Return compact JSON that survives FITS long-string (``CONTINUE``) cards unchanged.

    astropy's splitting of long string values mishandles quotes, ``&`` and spaces at segment
    boundaries, so those characters, which in compact JSON occur only inside strings, are
    written as JSON ``\u`` escapes; :func:`json.loads` reads the text back exactly.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    for char in (" ", "'", "&"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _quiet_header(cards: Any = None) -> fits.Header:
    header = fits.Header()
    if cards is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)  # HIERARCH for long keywords
            for card in cards:
                header.append(card, end=True)
    return header


def _primary_header(exposure: xr.Dataset) -> fits.Header:
    meta = metadata_to_json(exposure)
    cards: list[Any] = [("ORIGIN", "daskdiff", "file written by daskdiff"),
                        ("DDFORMAT", FORMAT_NAME, "daskdiff file format")]
    visit_info = exposure.attrs.get("visit_info")
    if visit_info is not None:
        cards += visit_info.to_header_cards()
    photo_calib = exposure.attrs.get("photo_calib")
    if photo_calib is not None:
        cards += photo_calib.to_header_cards()
    cards.append(("DDMETA", card_json(meta)))  # exact metadata (JSON); no comment: no room
    return _quiet_header(cards)


def _plane_header(exposure: xr.Dataset, extname: str, name: str) -> fits.Header:
    box = exposure_box(exposure)
    header = _quiet_header([("EXTNAME", extname, "plane"), ("EXTTYPE", extname, "plane"),
                            ("INHERIT", True, "inherit the primary header")])
    wcs = exposure.attrs.get("wcs")
    if wcs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            header.extend(wcs_to_header(wcs, x0=box.x0, y0=box.y0), update=True)
    header.extend(_quiet_header([
        ("LTV1", -box.x0, "parent x of the first pixel is -LTV1"),
        ("LTV2", -box.y0, "parent y of the first pixel is -LTV2"),
        ("WCSNAMEA", "PHYSICAL", "parent-frame pixel coordinates"),
        ("CTYPE1A", "LINEAR", ""), ("CTYPE2A", "LINEAR", ""),
        ("CRPIX1A", 1.0, ""), ("CRPIX2A", 1.0, ""),
        ("CRVAL1A", float(box.x0), "parent x of FITS pixel 1"),
        ("CRVAL2A", float(box.y0), "parent y of FITS pixel 1"),
        ("CUNIT1A", "PIXEL", ""), ("CUNIT2A", "PIXEL", ""),
    ]), update=True)
    if name == "mask":
        header.extend(_quiet_header(get_mask_planes(exposure).to_header_cards()), update=True)
    return header


def _structural_header(shape: tuple[int, int], bitpix: int, extra: fits.Header) -> fits.Header:
    cards: list[Any] = [("XTENSION", "IMAGE", "image extension"), ("BITPIX", bitpix, ""),
                        ("NAXIS", 2, ""), ("NAXIS1", shape[1], ""), ("NAXIS2", shape[0], ""),
                        ("PCOUNT", 0, ""), ("GCOUNT", 1, "")]
    if bitpix == 32:
        cards += [("BSCALE", 1, ""), ("BZERO", 2**31, "unsigned 32-bit integers")]
    header = _quiet_header(cards)
    header.extend(extra, update=True)
    return header


def _psf_hdus(psf: Any) -> list[fits.ImageHDU]:
    parts = psf_to_parts(psf)
    if parts is None:
        return []
    params, arrays = parts
    head = fits.ImageHDU(name="PSF")
    head.header["PSFTYPE"] = (str(params["type"]), "PSF model type")
    head.header["NARRAYS"] = (len(arrays), "number of PSFARR HDUs")
    head.header["DDPSF"] = card_json(params)  # the PSF parameters (JSON)
    hdus = [head]
    for version, (key, array) in enumerate(arrays.items(), start=1):
        stored = _storable(key, array)
        hdu = fits.ImageHDU(data=stored if stored.size else None, name="PSFARR", ver=version)
        hdu.header["ARRNAME"] = (key, "PSF array name")
        hdu.header["ARRDTYPE"] = (array.dtype.newbyteorder("=").str, "numpy dtype")
        hdu.header["ARRSHAPE"] = (json.dumps(list(array.shape)), "numpy shape")
        hdus.append(hdu)
    return hdus


def _storable(key: str, array: np.ndarray) -> np.ndarray:
    """Return an array FITS can hold that decodes back to ``array`` exactly."""
    array = np.ascontiguousarray(array)
    kind = array.dtype.kind
    if kind == "b":
        array = array.astype(np.uint8)
    elif kind == "c":
        array = array.view(array.real.dtype.newbyteorder("="))
    elif kind == "f" and array.itemsize < 4:
        array = array.astype(np.float32)
    elif kind not in "iuf":
        raise InputError(f"PSF array {key!r} has dtype {array.dtype}, which FITS cannot hold; "
                         "store numbers only")
    return array.reshape(-1) if array.ndim == 0 else array


def _decode_array(hdu: Any) -> tuple[str, np.ndarray]:
    header = hdu.header
    dtype = np.dtype(header["ARRDTYPE"])
    shape = tuple(json.loads(header["ARRSHAPE"]))
    data = hdu.data
    if data is None:
        return str(header["ARRNAME"]), np.zeros(shape, dtype)
    data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))
    if dtype.kind == "c":
        data = data.astype(dtype.type(0).real.dtype).view(dtype)
    return str(header["ARRNAME"]), data.astype(dtype).reshape(shape)


def _write_laid_out(exposure: xr.Dataset, path: Path, primary: fits.Header,
                    planes: list[tuple[str, str, fits.Header]], psf_hdus: list[Any]) -> None:
    shape = exposure["image"].shape
    writers: list[tuple[str, FitsPlaneWriter]] = []
    with open(path, "wb") as handle:
        handle.write(_primary_structural(primary).tostring().encode("ascii"))
        for _extname, name, extra in planes:
            bitpix = _BITPIX[name]
            handle.write(_structural_header(shape, bitpix, extra).tostring().encode("ascii"))
            offset = handle.tell()
            raw = ">f4" if bitpix == -32 else ">i4"
            writers.append((name, FitsPlaneWriter(path, offset, shape, raw,
                                                  unsigned=bitpix == 32)))
            handle.seek(file_size_after(offset, 4 * math.prod(shape)))
        if psf_hdus:
            handle.write(_extension_bytes(psf_hdus))
        handle.truncate()
    sources = [exposure[name].data for name, _ in writers]
    targets = [writer for _, writer in writers]
    lazy = [(s, t) for s, t in zip(sources, targets, strict=True) if isinstance(s, da.Array)]
    for source, target in zip(sources, targets, strict=True):
        if not isinstance(source, da.Array):
            target[...] = source
    if lazy:
        da.store([s for s, _ in lazy], [t for _, t in lazy], lock=False)


def _primary_structural(extra: fits.Header) -> fits.Header:
    header = _quiet_header([("SIMPLE", True, "conforms to FITS standard"), ("BITPIX", 8, ""),
                            ("NAXIS", 0, ""), ("EXTEND", True, "")])
    header.extend(extra, update=True)
    return header


def _extension_bytes(hdus: list[Any]) -> bytes:
    """Return the bytes of extension HDUs (written after an empty 2880-byte primary)."""
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), *hdus]).writeto(buffer)
    return buffer.getvalue()[2880:]


def _write_in_memory(exposure: xr.Dataset, path: Path, primary: fits.Header,
                     planes: list[tuple[str, str, fits.Header]], psf_hdus: list[Any],
                     compression: str) -> None:
    data = dask.compute(*(exposure[name].data for _, name, _ in planes))
    hdus: list[Any] = [fits.PrimaryHDU(header=_primary_structural(primary))]
    for (extname, _name, extra), array in zip(planes, data, strict=True):
        array = np.asarray(array)
        if compression == "tile":
            hdu = fits.CompImageHDU(data=array, header=extra, name=extname,
                                    compression_type="GZIP_2", quantize_level=0.0)
        else:
            hdu = fits.ImageHDU(data=array, header=extra, name=extname)
        hdus.append(hdu)
    hdul = fits.HDUList(hdus + psf_hdus)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        if compression == "gzip":
            with gzip.open(path, "wb", compresslevel=6) as handle:
                hdul.writeto(handle)
        else:
            hdul.writeto(path)


# --------------------------------------------------------------------------------------------
# reading


def is_mef(hdul: fits.HDUList) -> bool:
    """Return whether a FITS file is an LSST-style exposure (``IMAGE`` and ``VARIANCE`` HDUs)."""
    names = {hdu.name.upper() for hdu in hdul}
    return {"IMAGE", "VARIANCE"} <= names


def read_mef_exposure(path: Path, hdul: fits.HDUList, layouts: dict[int, HduLayout], *,
                      chunks: tuple[int, int], require_wcs: bool = True) -> xr.Dataset:
    """Open an LSST-style multi-extension FITS exposure lazily.

    Parameters
    ----------
    path : pathlib.Path
        The file (for the readers and for messages).
    hdul : astropy.io.fits.HDUList
        The open file (headers only are used).
    layouts : dict of int to HduLayout
        The image HDUs' layouts (:func:`~daskdiff.io.fits_arrays.hdu_layouts`).
    chunks : tuple of int
        Tile shape of the dask planes.
    require_wcs : bool, optional
        Whether a missing WCS is an error.

    Raises
    ------
    InputError
        If planes are missing or their shapes differ, the origin is not integral, or the
        WCS is missing (with ``require_wcs``).
    """
    indices = {hdu.name.upper(): i for i, hdu in reversed(list(enumerate(hdul)))}
    image_header = hdul[indices["IMAGE"]].header
    x0, y0 = _origin(image_header, path)
    arrays: dict[str, Any] = {}
    shape = None
    for extname, name in _PLANE_HDUS:
        if extname not in indices:
            continue
        layout = layouts.get(indices[extname])
        if layout is None or len(layout.shape) != 2:
            raise InputError(f"{path}: the {extname} HDU holds no 2-D image; the file is not a "
                             "valid exposure")
        if shape is not None and layout.shape != shape:
            raise InputError(
                f"{path}: the {extname} HDU has shape {layout.shape} but IMAGE has {shape}; "
                "all planes of an exposure must have the same shape: re-create the file"
            )
        shape = layout.shape
        arrays[name] = lazy_plane(path, layout, PLANES[name], chunks, name=f"fits-{name}")
    meta = _primary_metadata(hdul[0].header, path)
    mask_planes = meta["mask_planes"]
    if mask_planes is None:
        mask_planes = (MaskPlanes.from_header(hdul[indices["MASK"]].header)
                       if "MASK" in indices else None)
    wcs = _read_wcs(image_header, x0, y0, path, require_wcs=require_wcs)
    psf = _read_psf(hdul, path) if "PSF" in indices else None
    return make_exposure(
        arrays["image"], variance=arrays["variance"], mask=arrays.get("mask"), x0=x0, y0=y0,
        wcs=wcs, psf=psf, photo_calib=meta["photo_calib"], visit_info=meta["visit_info"],
        mask_planes=mask_planes, chunks=None,
    )


def _origin(header: fits.Header, path: Path) -> tuple[int, int]:
    origin = []
    for key in ("LTV1", "LTV2"):
        value = float(header.get(key, 0.0))
        if value != round(value):
            raise InputError(f"{path}: {key} = {value} is not an integer; daskdiff needs an "
                             "integer pixel origin")
        origin.append(-round(value))
    return origin[0], origin[1]


def _primary_metadata(header: fits.Header, path: Path) -> dict[str, Any]:
    """Return photo_calib, visit_info and mask_planes (None when the file does not say)."""
    text = header.get("DDMETA")
    if text:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: the DDMETA card is not valid JSON ({error}); the "
                             "primary header is damaged") from error
        return metadata_from_json(data, source=str(path))
    has_visit = any(key in header for key in ("MJD-OBS", "VISIT", "EXPTIME", "FILTER"))
    return {
        "photo_calib": PhotoCalib.from_header(header) or PhotoCalib(),
        "visit_info": VisitInfo.from_header(header) if has_visit else None,
        "mask_planes": None,
    }


def _read_wcs(header: fits.Header, x0: int, y0: int, path: Path, *, require_wcs: bool) -> Any:
    if "CTYPE1" not in header and not require_wcs:
        return None
    return wcs_from_header(header, x0=x0, y0=y0, source=str(path))


def _read_psf(hdul: fits.HDUList, path: Path) -> Any:
    header = hdul["PSF"].header
    text = header.get("DDPSF")
    if not text:
        return None  # a PSF HDU from another writer (e.g. an LSST archive): not readable here
    try:
        params = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: the PSF parameters (DDPSF card) are not valid JSON "
                         f"({error}); the PSF HDU is damaged") from error
    parts = sorted((hdu for hdu in hdul if hdu.name.upper() == "PSFARR"),
                   key=lambda hdu: int(hdu.header.get("EXTVER", 1)))
    if len(parts) != int(header.get("NARRAYS", len(parts))):
        raise InputError(f"{path}: the PSF HDU announces {header['NARRAYS']} arrays but "
                         f"{len(parts)} PSFARR HDUs are present; the file is truncated or "
                         "incomplete: re-create it")
    arrays = dict(_decode_array(hdu) for hdu in parts)
    return psf_from_parts(params, arrays, source=path)
