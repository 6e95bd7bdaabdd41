"""Reading and writing diaSrc catalogs as Parquet (atomic writes, schema checked)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..io.atomic import atomic_path

__all__ = ["read_dia_sources", "write_dia_sources"]


def write_dia_sources(table: pa.Table, path: str | os.PathLike[str], *,
                      overwrite: bool = False) -> Path:
    """Write a diaSrc table to Parquet atomically (units and descriptions kept).

    Parameters
    ----------
    table : pyarrow.Table
        The catalog, e.g. from :func:`~daskdiff.detect.detect_and_measure`.
    path : path-like
        The Parquet file to create.
    overwrite : bool, optional
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if not isinstance(table, pa.Table):
        raise InputError(f"write_dia_sources needs a pyarrow.Table, got {type(table).__name__}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_dia_sources(path: str | os.PathLike[str]) -> pa.Table:
    """Read a diaSrc Parquet file.

    Raises
    ------
    InputError
        If the file is missing or is not a diaSrc catalog.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"diaSrc catalog {path} does not exist")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path} is not a readable Parquet file: {error}") from error
    required = {"id", "x", "y", "psf_flux"}
    if not required <= set(table.column_names):
        missing = sorted(required - set(table.column_names))
        raise InputError(f"{path} is not a diaSrc catalog: it lacks the columns {missing}")
    return table
