"""Exposure I/O: zarr stores, LSST-style multi-extension FITS, plain FITS images, atomic writes.

:func:`read_exposure` and :func:`write_exposure` choose the format from the path's name
(``*.zarr``, ``.fits``/``.fit``/``.fts`` optionally gzipped, ``.fz``); every write is atomic
(:mod:`daskdiff.io.atomic`).
"""

from .api import FITS_SUFFIXES, exposure_format, read_exposure, write_exposure
from .atomic import atomic_path, cleanup_stale

__all__ = [
    "FITS_SUFFIXES",
    "atomic_path",
    "cleanup_stale",
    "exposure_format",
    "read_exposure",
    "write_exposure",
]
