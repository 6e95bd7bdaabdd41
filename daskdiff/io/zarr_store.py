"""Exposures as zarr (format 3) stores, written through xarray.

Layout of ``<name>.zarr``:

- arrays ``image`` (float32), ``mask`` (uint32), ``variance`` (float32) on dims ``(y, x)``,
  with zarr chunks equal to the exposure's dask tiles, and the integer coordinate arrays
  ``y``, ``x`` (the parent frame), so ``xarray.open_zarr(path, consolidated=False)`` opens a
  store as a plain Dataset;
- group attributes (JSON): ``format``, ``format_version``, ``x0``, ``y0``, ``photo_calib``,
  ``visit_info``, ``mask_planes`` (name -> bit), ``wcs`` (a FITS header string, parent
  frame) and ``psf`` (the PSF parameters, or null);
- a subgroup ``psf`` with one zarr array per PSF array; its attribute ``names`` maps each
  zarr array to the PSF's own array name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from ..errors import InputError
from ..exposure import DEFAULT_TILE_SIZE, PLANES, make_exposure
from ..wcs import wcs_from_string, wcs_to_string
from ._meta import (
    FORMAT_NAME,
    metadata_from_json,
    metadata_to_json,
    prepare_exposure,
    psf_from_parts,
    psf_to_parts,
)

__all__ = ["read_zarr_exposure", "write_zarr_exposure"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_zarr_exposure(exposure: xr.Dataset, path: Path) -> None:
    """Write an exposure as a zarr v3 store (see the module docstring).

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure. Dask planes keep their tiles (irregular tiles are made regular, with
        the first tile's shape); numpy planes are written in :data:`DEFAULT_TILE_SIZE` tiles.
    path : pathlib.Path
        Where to write (a new directory; callers make the write atomic).
    """
    exposure = prepare_exposure(exposure, source=str(path))
    tiles = _regular_tiles(exposure)
    data = xr.Dataset(
        {name: exposure[name].variable.chunk(tiles) for name in PLANES},
        coords={"y": exposure["y"].values, "x": exposure["x"].values},
    )
    parts = psf_to_parts(exposure.attrs.get("psf"))
    wcs = exposure.attrs.get("wcs")
    attrs = metadata_to_json(exposure)
    attrs["wcs"] = None if wcs is None else wcs_to_string(wcs)
    attrs["psf"] = None if parts is None else parts[0]
    data.attrs = attrs
    encoding = {name: {"chunks": tiles} for name in PLANES}
    encoding["mask"]["fill_value"] = 0
    data.to_zarr(path, mode="w-", zarr_format=3, consolidated=False, encoding=encoding)
    if parts is not None:
        _write_psf_arrays(zarr.open_group(path, mode="r+", zarr_format=3), parts[1])


def _regular_tiles(exposure: xr.Dataset) -> tuple[int, int]:
    data = exposure["image"].data
    shape = exposure["image"].shape
    chunks = getattr(data, "chunks", None)
    if chunks is None:
        tiles = (DEFAULT_TILE_SIZE, DEFAULT_TILE_SIZE)
    else:
        tiles = (chunks[0][0], chunks[1][0])
    return (max(min(tiles[0], shape[0]), 1), max(min(tiles[1], shape[1]), 1))


def _write_psf_arrays(root: zarr.Group, arrays: dict[str, np.ndarray]) -> None:
    group = root.create_group("psf")
    names: dict[str, str] = {}
    for number, (key, array) in enumerate(arrays.items()):
        node = key if _SAFE_NAME.match(key) else f"array{number}"
        while node in names:
            node = f"{node}_"
        names[node] = key
        array = np.array(array, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        stored = group.create_array(node, shape=array.shape, dtype=array.dtype,
                                    chunks=tuple(max(n, 1) for n in array.shape),
                                    fill_value=None)
        stored[...] = array
    group.attrs["names"] = names


def read_zarr_exposure(path: Path, *, chunks: tuple[int, int] | None,
                       require_wcs: bool = True) -> xr.Dataset:
    """Open a zarr exposure store lazily.

    Parameters
    ----------
    path : pathlib.Path
        The store.
    chunks : tuple of int or None
        Tile shape of the dask planes; ``None`` keeps the store's own tiles.
    require_wcs : bool, optional
        Whether a store without a WCS is an error.

    Raises
    ------
    InputError
        If the path is not a daskdiff exposure store, or has no WCS (with ``require_wcs``).
    """
    if not path.is_dir():
        raise InputError(f"{path} is not a zarr store (not a directory); check the path")
    try:
        data = xr.open_zarr(path, zarr_format=3, consolidated=False, chunks={},
                            mask_and_scale=False, decode_times=False)
    except Exception as error:  # zarr/xarray raise many types for a damaged store
        raise InputError(f"{path} is not a readable zarr v3 store ({type(error).__name__}: "
                         f"{error}); re-create it") from error
    attrs = dict(data.attrs)
    source = str(path)
    if attrs.get("format") != FORMAT_NAME or any(name not in data for name in PLANES):
        raise InputError(f"{path} is a zarr store but not a daskdiff exposure (no "
                         f"format={FORMAT_NAME!r} attribute or planes missing); write it with "
                         "daskdiff.io.write_exposure")
    meta = metadata_from_json(attrs, source=source)
    x = data["x"].values
    y = data["y"].values
    if (x.size and int(x[0]) != int(attrs.get("x0", x[0]))) or (
            y.size and int(y[0]) != int(attrs.get("y0", y[0]))):
        raise InputError(f"{path}: the x/y coordinates disagree with the stored origin "
                         f"({attrs.get('x0')}, {attrs.get('y0')}); the store is damaged")
    wcs_text = attrs.get("wcs")
    if wcs_text is None and require_wcs:
        raise InputError(f"{path} has no WCS; the pipeline needs one: attach it with "
                         "replace_metadata(exposure, wcs=...) and rewrite, or pass "
                         "require_wcs=False to read it without one")
    wcs = None if wcs_text is None else wcs_from_string(wcs_text)
    psf = _read_psf(path, attrs.get("psf"))
    planes = {name: data[name].data for name in PLANES}
    if chunks is not None:  # tiles other than the stored ones: rechunk the stored tiles
        planes = {name: plane.rechunk(chunks) for name, plane in planes.items()}
    return make_exposure(
        planes["image"], variance=planes["variance"], mask=planes["mask"],
        x0=int(x[0]) if x.size else 0, y0=int(y[0]) if y.size else 0, wcs=wcs, psf=psf,
        chunks=None, **meta,
    )


def _read_psf(path: Path, params: dict[str, Any] | None) -> Any:
    if params is None:
        return None
    arrays: dict[str, np.ndarray] = {}
    root = zarr.open_group(path, mode="r", zarr_format=3)
    if "psf" in root:
        group = root["psf"]
        names = dict(group.attrs.get("names", {}))
        for node, key in names.items():
            arrays[key] = np.asarray(group[node][...])
    return psf_from_parts(dict(params), arrays, source=path)
