"""Low-level FITS access: opening with clear errors, lazy tiled reads and parallel tiled writes.

A FITS image HDU is exposed to dask as a :class:`FitsPlaneReader`: a small picklable object
(path, HDU index, layout) whose ``__getitem__`` reads one tile. Each task opens the file on its
own, so tasks are thread- and process-safe and nothing is read until a tile is computed.

Three read strategies, chosen per HDU when the file is opened:

- ``"memmap"``: an uncompressed HDU without scaling (or with the unsigned-integer ``BZERO``
  convention): the tile is sliced out of a ``numpy.memmap`` of the data block;
- ``"section"``: a tile-compressed (``.fz``) or ``BSCALE``/``BZERO``-scaled HDU: astropy's
  ``.section`` decompresses only the tiles it needs and applies the scaling; full-width
  stripes of one tile height are read and cut into tiles;
- ``"full"``: a gzip/bzip2/zip-compressed file, which cannot be read piecewise: one task reads
  the whole HDU and the tiles are cut from it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from astropy.io import fits
from dask.base import tokenize

from ..errors import InputError

__all__ = [
    "FitsPlaneReader",
    "FitsPlaneWriter",
    "HduLayout",
    "hdu_layouts",
    "lazy_plane",
    "open_fits",
]

_UNSIGNED_BZERO = {16: 2**15, 32: 2**31, 64: 2**63}


def open_fits(path: Path) -> fits.HDUList:
    """Open a FITS file (memory-mapped, headers only) with errors that name the file.

    Raises
    ------
    InputError
        If the file does not exist, is not FITS, or is truncated.
    """
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a FITS file (zarr stores end in .zarr)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(path, memmap=True, lazy_load_hdus=True, mode="readonly")
            hdul.readall()  # parse every header now (data stays on disk)
    except Exception as error:  # astropy raises OSError, ValueError, VerifyError, ...
        raise InputError(
            f"{path} is not a readable FITS file ({type(error).__name__}: {error}); it may be "
            "truncated or corrupt: re-create or re-download it"
        ) from error
    for warning in caught:
        if "truncated" in str(warning.message).lower():
            hdul.close()
            raise InputError(f"{path} is truncated ({warning.message}); re-create or "
                             "re-download it")
    if len(hdul) == 0:
        hdul.close()
        raise InputError(f"{path} holds no HDU; it is empty or corrupt")
    return hdul


@dataclass(frozen=True, slots=True)
class HduLayout:
    """Where and how the data of one image HDU is stored.

    Attributes
    ----------
    index : int
        HDU number in the file.
    shape : tuple of int
        Array shape (numpy order).
    mode : {"memmap", "section", "full"}
        Read strategy (see the module docstring).
    offset : int
        Byte offset of the data block (``memmap`` mode).
    raw_dtype : str
        On-disk dtype, big-endian (``memmap`` mode).
    unsigned : bool
        Whether the unsigned-integer ``BZERO`` convention applies (``memmap`` mode).
    """

    index: int
    shape: tuple[int, ...]
    mode: str
    offset: int = 0
    raw_dtype: str = ""
    unsigned: bool = False


def hdu_layouts(hdul: fits.HDUList, path: Path) -> dict[int, HduLayout]:
    """Return the layout of every image HDU with data, checking the file is not truncated.

    Raises
    ------
    InputError
        If a data block extends beyond the end of the file.
    """
    stream_compressed = getattr(hdul._file, "compression", None) is not None
    size = path.stat().st_size
    layouts: dict[int, HduLayout] = {}
    for index, hdu in enumerate(hdul):
        if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
            continue
        shape = _hdu_shape(hdu)
        if not shape or 0 in shape:
            continue
        info = hdu.fileinfo()
        compressed = isinstance(hdu, fits.CompImageHDU)
        if not stream_compressed:
            nbytes = _stored_bytes(hdu, compressed)
            if info["datLoc"] + nbytes > size:
                raise InputError(
                    f"{path} is truncated: HDU {index} ({hdu.name}) needs "
                    f"{info['datLoc'] + nbytes} bytes but the file has {size}; re-create or "
                    "re-download it"
                )
        layouts[index] = _layout(index, hdu, shape, info["datLoc"], compressed,
                                 stream_compressed)
    return layouts


def _hdu_shape(hdu: Any) -> tuple[int, ...]:
    header = hdu.header
    if isinstance(hdu, fits.CompImageHDU):
        return tuple(int(n) for n in hdu.shape)
    naxis = int(header.get("NAXIS", 0))
    return tuple(int(header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))


def _stored_bytes(hdu: Any, compressed: bool) -> int:
    if compressed:
        header = hdu._bintable.header if hasattr(hdu, "_bintable") else hdu._header
        return int(header.get("NAXIS1", 0)) * int(header.get("NAXIS2", 0)) + int(
            header.get("PCOUNT", 0))
    return abs(int(hdu.header["BITPIX"])) // 8 * math.prod(_hdu_shape(hdu))


def _layout(index: int, hdu: Any, shape: tuple[int, ...], offset: int, compressed: bool,
            stream_compressed: bool) -> HduLayout:
    if stream_compressed:
        return HduLayout(index, shape, "full")
    if compressed:
        return HduLayout(index, shape, "section")
    header = hdu.header
    bitpix = int(header["BITPIX"])
    bscale = float(header.get("BSCALE", 1.0))
    bzero = float(header.get("BZERO", 0.0))
    raw = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}[bitpix]
    if bscale == 1.0 and bzero == 0.0:
        return HduLayout(index, shape, "memmap", offset, raw, False)
    if bscale == 1.0 and bitpix > 8 and bzero == _UNSIGNED_BZERO.get(bitpix):
        return HduLayout(index, shape, "memmap", offset, raw, True)
    return HduLayout(index, shape, "section")


class FitsPlaneReader:
    """A lazily read FITS image HDU, sliceable like an array (one file open per slice).

    Parameters
    ----------
    path : pathlib.Path
        The FITS file.
    layout : HduLayout
        Where the data lies (from :func:`hdu_layouts`).
    dtype : numpy.dtype
        The dtype of the returned values (e.g. float32 for image planes).
    """

    def __init__(self, path: Path, layout: HduLayout, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.shape = layout.shape
        self.ndim = len(layout.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return self._read(key)
        except InputError:
            raise
        except Exception as error:  # the file changed or vanished after it was opened
            raise InputError(
                f"cannot read HDU {self.layout.index} of {self.path} ({type(error).__name__}: "
                f"{error}); the file may have been truncated, moved or rewritten after opening"
            ) from error

    def _read(self, key: Any) -> np.ndarray:
        layout = self.layout
        if layout.mode == "memmap":
            raw = np.memmap(self.path, dtype=layout.raw_dtype, mode="r", offset=layout.offset,
                            shape=layout.shape)
            part = np.array(raw[key])
            del raw
            if layout.unsigned:
                unsigned = part.dtype.newbyteorder("=").str.replace("i", "u")
                part = part.astype(part.dtype.newbyteorder("=")).view(unsigned)
                part ^= np.array(1 << (8 * part.itemsize - 1), dtype=unsigned)
            return self._cast(part)
        with fits.open(self.path, memmap=False, lazy_load_hdus=True) as hdul:
            hdu = hdul[layout.index]
            part = hdu.data[key] if layout.mode == "full" else hdu.section[key]
            return self._cast(np.asarray(part))

    def read_all(self) -> np.ndarray:
        """Read the whole HDU."""
        return self[tuple(slice(None) for _ in self.shape)]

    def _cast(self, part: np.ndarray) -> np.ndarray:
        if part.dtype != self.dtype or not part.dtype.isnative:
            part = part.astype(self.dtype)
        return part


def lazy_plane(path: Path, layout: HduLayout, dtype: np.dtype, chunks: tuple[int, int],
               *, name: str) -> da.Array:
    """Return a dask array reading an image HDU tile by tile (see the module docstring).

    Parameters
    ----------
    path : pathlib.Path
        The FITS file.
    layout : HduLayout
        The HDU's layout.
    dtype : numpy.dtype
        The dtype of the plane.
    chunks : tuple of int
        Tile shape.
    name : str
        Prefix of the dask keys (the rest is a token of the file's identity).
    """
    reader = FitsPlaneReader(path, layout, dtype)
    stat = path.stat()
    token = tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size, layout, str(dtype))
    meta = np.empty((0,) * reader.ndim, dtype=reader.dtype)
    if layout.mode == "full":
        whole = dask.delayed(reader.read_all, pure=True)(dask_key_name=f"{name}-read-{token}")
        array = da.from_delayed(whole, shape=reader.shape, dtype=reader.dtype, meta=meta)
        return array.rechunk(chunks)
    if layout.mode == "section":
        # Compressed tiles are usually whole rows: read full-width stripes (each compressed
        # tile decompressed once) and cut them into tiles.
        stripes = da.from_array(reader, chunks=(chunks[0], reader.shape[1]),
                                name=f"{name}-{token}", lock=False, asarray=False, meta=meta)
        return stripes.rechunk(chunks)
    return da.from_array(reader, chunks=chunks, name=f"{name}-{token}", lock=False,
                         asarray=False, meta=meta)


class FitsPlaneWriter:
    """A writable view of the data block of one uncompressed image HDU, for ``dask.array.store``.

    ``writer[key] = block`` opens the file, writes the block into its place and closes it, so
    tiles can be written in parallel by threads or processes sharing the file system.

    Parameters
    ----------
    path : pathlib.Path
        The FITS file, already laid out (headers written, data blocks allocated).
    offset : int
        Byte offset of the data block.
    shape : tuple of int
        Array shape.
    raw_dtype : str
        Big-endian on-disk dtype (``">f4"``, ``">i4"``).
    unsigned : bool
        Whether to apply the unsigned-integer ``BZERO`` convention (flip the sign bit).
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], raw_dtype: str,
                 *, unsigned: bool = False) -> None:
        self.path = Path(path)
        self.offset = offset
        self.shape = shape
        self.raw_dtype = raw_dtype
        self.unsigned = unsigned

    def encode(self, block: np.ndarray) -> np.ndarray:
        """Return ``block`` as stored on disk."""
        block = np.asarray(block)
        if self.unsigned:
            unsigned = np.dtype(self.raw_dtype.replace("i", "u")).newbyteorder("=")
            flipped = block.astype(unsigned) ^ np.array(1 << (8 * unsigned.itemsize - 1),
                                                        dtype=unsigned)
            return flipped.astype(unsigned.newbyteorder(">")).view(self.raw_dtype)
        return block.astype(self.raw_dtype)

    def __setitem__(self, key: Any, block: np.ndarray) -> None:
        target = np.memmap(self.path, dtype=self.raw_dtype, mode="r+", offset=self.offset,
                           shape=self.shape)
        target[key] = self.encode(block)
        target.flush()
        del target


def file_size_after(offset: int, nbytes: int) -> int:
    """Return the end of a data block of ``nbytes`` at ``offset``, padded to 2880 bytes."""
    return offset + -(-nbytes // 2880) * 2880

