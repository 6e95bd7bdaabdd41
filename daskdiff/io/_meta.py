"""JSON-able (de)serialisation of an exposure's metadata, shared by the FITS and zarr formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InputError
from ..exposure import PLANES, exposure_box, get_mask_planes, get_photo_calib, validate_exposure
from ..masks import MaskPlanes
from ..metadata import PhotoCalib, VisitInfo
from ..psf import psf_from_state

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "metadata_from_json", "metadata_to_json",
           "prepare_exposure", "psf_from_parts", "psf_to_parts"]

#: Written into every file, so readers can tell a daskdiff exposure from other data.
FORMAT_NAME = "daskdiff.exposure"
#: Bumped whenever the on-disk layout changes incompatibly.
FORMAT_VERSION = 1


def prepare_exposure(exposure: xr.Dataset, *, source: str = "exposure") -> xr.Dataset:
    """Validate an exposure before writing it and cast its planes to their dtypes.

    Raises
    ------
    InputError
        If ``exposure`` is not a well-formed exposure.
    """
    exposure = validate_exposure(exposure, source=source)
    casts = {name: exposure[name].astype(dtype) for name, dtype in PLANES.items()
             if exposure[name].dtype != dtype}
    if casts:
        attrs = dict(exposure.attrs)
        exposure = exposure.assign(casts)
        exposure.attrs = attrs
    return exposure


def metadata_to_json(exposure: xr.Dataset) -> dict[str, Any]:
    """Return the origin, calibration, visit info and mask planes as a JSON-able dict.

    The WCS and the PSF are not included: each format stores them in its own way.
    """
    box = exposure_box(exposure)
    visit_info = exposure.attrs.get("visit_info")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "x0": box.x0,
        "y0": box.y0,
        "photo_calib": get_photo_calib(exposure).to_dict(),
        "visit_info": None if visit_info is None else visit_info.to_dict(),
        "mask_planes": dict(get_mask_planes(exposure).items()),
    }


def metadata_from_json(data: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Inverse of :func:`metadata_to_json`: return ``photo_calib``, ``visit_info``, ``mask_planes``.

    Raises
    ------
    InputError
        If the metadata is from a newer format version or malformed.
    """
    version = int(data.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise InputError(f"{source} was written in daskdiff exposure format version {version}, "
                         f"newer than this reader ({FORMAT_VERSION}); upgrade daskdiff")
    try:
        visit = data.get("visit_info")
        return {
            "photo_calib": PhotoCalib.from_dict(data.get("photo_calib") or {"njy_per_count": 1}),
            "visit_info": None if visit is None else VisitInfo.from_dict(visit),
            "mask_planes": MaskPlanes({str(k): int(v) for k, v in
                                       (data.get("mask_planes") or {}).items()} or None),
        }
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{source}: malformed exposure metadata ({error}); the file was not "
                         "written by daskdiff or is damaged") from error


def psf_to_parts(psf: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Return ``psf.to_state()`` checked to be serialisable (``None`` for no PSF).

    Raises
    ------
    InputError
        If the parameters are not JSON-able or lack the model ``type``.
    """
    if psf is None:
        return None
    params, arrays = psf.to_state()
    if "type" not in params:
        raise InputError(f"{type(psf).__name__}.to_state() returned params without 'type'; "
                         "a PSF model must name its registered type")
    try:
        json.dumps(params)
    except (TypeError, ValueError) as error:
        raise InputError(f"the parameters of the {params['type']} PSF are not JSON-able "
                         f"({error}); to_state() must return plain numbers, strings and "
                         "lists and put arrays in the arrays dict") from error
    return dict(params), {str(k): np.asarray(v) for k, v in arrays.items()}


def psf_from_parts(params: dict[str, Any], arrays: dict[str, np.ndarray], *,
                   source: str | Path) -> Any:
    """Rebuild a PSF model, naming ``source`` in the error if its type is unknown."""
    try:
        return psf_from_state(params, arrays)
    except InputError as error:
        raise InputError(f"{source}: cannot rebuild its PSF: {error}. Import the module that "
                         "registers this PSF model before reading") from error
