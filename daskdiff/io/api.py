"""``read_exposure`` / ``write_exposure``: one entry point for every supported file kind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import xarray as xr

from ..errors import InputError
from ..exposure import DEFAULT_TILE_SIZE, Chunks, _chunk_spec, load
from .atomic import atomic_path
from .fits import is_mef, read_mef_exposure, write_fits_exposure
from .fits_arrays import hdu_layouts, open_fits
from .plain import read_plain_exposure
from .zarr_store import read_zarr_exposure, write_zarr_exposure

__all__ = ["FITS_SUFFIXES", "exposure_format", "read_exposure", "write_exposure"]

#: File-name endings read and written as FITS, and the compression each implies.
FITS_SUFFIXES: dict[str, str | None] = {
    ".fits": None, ".fit": None, ".fts": None,
    ".fits.gz": "gzip", ".fit.gz": "gzip", ".fts.gz": "gzip",
    ".fits.fz": "tile", ".fz": "tile",
}


def exposure_format(path: str | os.PathLike[str]) -> tuple[Literal["zarr", "fits"], str | None]:
    """Return the format of a path from its name: ``("zarr", None)`` or ``("fits", compression)``.

    Raises
    ------
    InputError
        If the name ends in none of ``.zarr`` and the FITS suffixes.
    """
    name = Path(path).name.lower().rstrip("/")
    if name.endswith(".zarr"):
        return "zarr", None
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return "fits", FITS_SUFFIXES[suffix]
    known = ", ".join([".zarr", *FITS_SUFFIXES])
    raise InputError(f"{path}: unknown file type; daskdiff reads and writes {known}. Rename the "
                     "file or convert it")


def read_exposure(
    path: str | os.PathLike[str],
    *,
    chunks: Chunks = DEFAULT_TILE_SIZE,
    hdu: int | str | None = None,
    gain: float | None = None,
    read_noise: float | None = None,
    saturation: float | None = None,
    require_wcs: bool = True,
) -> xr.Dataset:
    """Open an exposure lazily from a zarr store or a FITS file.

    The kind is chosen by the name: ``*.zarr`` is a zarr v3 store written by
    :func:`write_exposure`; ``.fits``, ``.fit``, ``.fts`` (optionally ``.gz``) and ``.fz`` are
    FITS. A FITS file with ``IMAGE`` and ``VARIANCE`` HDUs is read as an LSST-style
    multi-extension exposure (exactly as written); any other FITS file (or any file when
    ``hdu`` is given) is read as a plain image, whose mask and variance are derived from the
    header and the pixels (see :mod:`daskdiff.io.plain`).

    Parameters
    ----------
    path : path-like
        The file or store.
    chunks : int, tuple of int or None, optional
        Tile shape of the dask planes; ``None`` loads the planes into memory (numpy).
    hdu : int or str, optional
        Read this HDU (number or EXTNAME) of a FITS file as a plain image.
    gain : float, optional
        Gain in e-/ADU of a plain image (overrides the header).
    read_noise : float, optional
        Read noise in e- of a plain image (overrides the header).
    saturation : float, optional
        Saturation level (ADU) of a plain image (overrides the header).
    require_wcs : bool, optional
        Whether a missing WCS is an error (default, since the pipeline needs one); with
        ``False`` such an exposure is returned with ``wcs=None``.

    Returns
    -------
    xarray.Dataset
        The exposure; its planes are dask arrays (nothing is read until computed) unless
        ``chunks=None``.

    Raises
    ------
    InputError
        If the path does not exist, has an unknown suffix, is truncated or corrupt, has planes
        of different shapes, has no WCS (with ``require_wcs``), or its PSF type is unknown.
    """
    path = Path(path)
    kind, _compression = exposure_format(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    tiles = _tiles(chunks)
    if kind == "zarr":
        if hdu is not None:
            raise InputError(f"hdu={hdu!r} applies to FITS files only, not to the store {path}")
        exposure = read_zarr_exposure(path, chunks=tiles, require_wcs=require_wcs)
    else:
        with open_fits(path) as hdul:
            layouts = hdu_layouts(hdul, path)
            fallback = tiles or (DEFAULT_TILE_SIZE, DEFAULT_TILE_SIZE)
            if hdu is None and is_mef(hdul):
                exposure = read_mef_exposure(path, hdul, layouts, chunks=fallback,
                                             require_wcs=require_wcs)
            else:
                exposure = read_plain_exposure(
                    path, hdul, layouts, hdu=hdu, chunks=fallback, gain=gain,
                    read_noise=read_noise, saturation=saturation, require_wcs=require_wcs,
                )
    return load(exposure) if chunks is None else exposure


def _tiles(chunks: Chunks) -> tuple[int, int] | None:
    if chunks is None:
        return None
    if chunks == "auto":
        return (DEFAULT_TILE_SIZE, DEFAULT_TILE_SIZE)
    spec = _chunk_spec(chunks)
    if (not isinstance(spec, tuple) or len(spec) != 2
            or not all(isinstance(n, int) and n > 0 for n in spec)):
        raise InputError(f"chunks={chunks!r} must be a positive tile size, a (ny, nx) pair of "
                         "positive integers, 'auto' or None")
    return spec


def write_exposure(exposure: xr.Dataset, path: str | os.PathLike[str], *,
                   overwrite: bool = False) -> Path:
    """Write an exposure atomically as a zarr store or an LSST-style multi-extension FITS file.

    The kind is chosen by the name (see :func:`read_exposure`); ``.fits.gz`` is gzipped and
    ``.fz`` losslessly tile-compressed. The product is written under a hidden temporary name
    in the same directory and renamed into place when complete, so a crash never leaves a
    partial product at ``path``. Dask planes are written tile-parallel on the current
    scheduler (plain FITS and zarr), without holding the image in memory.

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure.
    path : path-like
        Destination.
    overwrite : bool, optional
        Whether an existing file or store at ``path`` may be replaced.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        If the suffix is unknown, ``path`` exists and ``overwrite`` is false, or the exposure
        is malformed.
    """
    path = Path(path)
    kind, compression = exposure_format(path)
    if not overwrite and os.path.lexists(path):
        raise InputError(f"{path} already exists; pass overwrite=True to replace it, or "
                         "choose another path")
    with atomic_path(path, overwrite=overwrite) as tmp:
        if kind == "zarr":
            write_zarr_exposure(exposure, tmp)
        else:
            write_fits_exposure(exposure, tmp, compression=compression)
    return path
