"""Data IDs, dataset-type and run names: validation and the repository paths derived from them.

A *data ID* names one dataset among those of a dataset type: ``visit=123, detector=4`` for a
calibrated exposure, ``tract=9813, patch=42, band="r"`` for a coadd patch. Every value that
reaches a file name goes through this module first, so that

- only known keys are accepted (:data:`KEYS`), numeric keys are integers ``>= 0`` and names
  match a strict ASCII pattern (no ``/``, ``..``, spaces, or leading dots: no path traversal,
  no absolute paths);
- the path of a dataset is a one-to-one function of its dataset type, run and *dimensions*
  (zero-padded decimal integers are distinct for distinct values; ``key=value`` components
  cannot be confused with one another).

Dimensions are the keys that identify a dataset. ``band`` and ``physical_filter`` are *implied*
by a visit: for a dataset with a ``visit`` key they are recorded but are not part of its
identity or path (a calexp is ``visit, detector``, whatever its band).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "IMPLIED_BY_VISIT",
    "KEYS",
    "KEY_ORDER",
    "coadd_name",
    "data_id_key",
    "format_data_id",
    "format_value",
    "known_dimensions",
    "split_data_id",
    "validate_data_id",
    "validate_dataset_type",
    "validate_run",
    "validate_value",
]

#: Known data-ID keys and their value types.
KEYS: dict[str, type] = {
    "tract": int,
    "patch": int,
    "band": str,
    "subfilter": int,
    "physical_filter": str,
    "visit": int,
    "detector": int,
}

#: Order of keys in paths and listings.
KEY_ORDER: tuple[str, ...] = tuple(KEYS)

#: Minimum digits of each numeric key in paths (zero padded; larger values just get longer).
PADDING: dict[str, int] = {"tract": 4, "patch": 3, "subfilter": 2, "visit": 6, "detector": 3}

#: Keys recorded but not identifying when a data ID has a ``visit``.
IMPLIED_BY_VISIT: tuple[str, ...] = ("band", "physical_filter")

#: Dataset-type names that would collide with the repository's own entries.
RESERVED_NAMES = frozenset({"runs", "registry", "tmp"})

_VALUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", re.ASCII)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", re.ASCII)
_DATASET_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}", re.ASCII)
_COADD = re.compile(r"[a-z][A-Za-z0-9]*Coadd", re.ASCII)


def _check_name(value: Any, pattern: re.Pattern[str], *, what: str, example: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {value!r} ({type(value).__name__})")
    if pattern.fullmatch(value) is None or ".." in value:
        raise InputError(
            f"invalid {what} {value!r}: use letters, digits, '_', '-' and '.' only, starting "
            f"with a letter or digit, with no '/', '..' or spaces (e.g. {example!r})")
    return value


def validate_dataset_type(name: Any) -> str:
    """Return a dataset-type name after checking it (e.g. ``goodSeeingDiff_diaSrc``).

    Raises
    ------
    InputError
        If the name is not a letter followed by letters, digits and ``_``, or is reserved.
    """
    if not isinstance(name, str) or _DATASET_TYPE.fullmatch(name) is None:
        raise InputError(
            f"invalid dataset type {name!r}: use a letter followed by letters, digits and '_' "
            "(e.g. 'calexp', 'goodSeeingCoadd', 'goodSeeingDiff_differenceExp')")
    if name.lower() in RESERVED_NAMES:
        raise InputError(f"dataset type {name!r} is reserved by the repository layout; choose "
                         "another name")
    return name


def validate_run(run: Any) -> str:
    """Return a run name after checking it (e.g. ``dc2-y1-alardlupton``).

    Raises
    ------
    InputError
        If the name has characters other than letters, digits, ``_``, ``-`` and ``.``, starts
        with neither a letter nor a digit, or contains ``..``.
    """
    return _check_name(run, _RUN_NAME, what="run name", example="dc2-y1.v2")


def validate_value(key: str, value: Any) -> int | str:
    """Return one data-ID value after checking it against its key's rules.

    Parameters
    ----------
    key : str
        A key of :data:`KEYS`.
    value : Any
        The value (an integer ``>= 0`` for numeric keys, a safe name otherwise).

    Raises
    ------
    InputError
        If the key is unknown or the value invalid.
    """
    if key not in KEYS:
        raise InputError(
            f"unknown data-ID key {key!r}; known keys are {', '.join(KEY_ORDER)}")
    if KEYS[key] is int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InputError(f"data-ID {key} must be an integer >= 0, got {value!r} "
                             f"({type(value).__name__})")
        if value < 0:
            raise InputError(f"data-ID {key} must be >= 0, got {value}")
        return int(value)
    return _check_name(value, _VALUE_NAME, what=f"data-ID {key}", example="r")


def validate_data_id(data_id: Mapping[str, Any]) -> dict[str, int | str]:
    """Return a checked copy of a data ID, keys in :data:`KEY_ORDER`.

    Raises
    ------
    InputError
        For an unknown key or an invalid value (see :func:`validate_value`).
    """
    unknown = sorted(set(data_id) - set(KEYS))
    if unknown:
        raise InputError(
            f"unknown data-ID key(s) {unknown}; known keys are {', '.join(KEY_ORDER)}")
    return {key: validate_value(key, data_id[key]) for key in KEY_ORDER if key in data_id}


def known_dimensions(dataset_type: str) -> tuple[str, ...] | None:
    """Return the fixed dimensions of a standard dataset type, or ``None`` for other types.

    ``calexp`` is ``(visit, detector)``; ``dcrCoadd`` is ``(tract, patch, band, subfilter)``;
    any other ``<name>Coadd`` is ``(tract, patch, band)``.
    """
    if dataset_type == "calexp":
        return ("visit", "detector")
    if dataset_type == "dcrCoadd":
        return ("tract", "patch", "band", "subfilter")
    if _COADD.fullmatch(dataset_type):
        return ("tract", "patch", "band")
    return None


def coadd_name(dataset_type: str) -> str | None:
    """Return ``"goodSeeing"`` for ``"goodSeeingCoadd"`` (``None`` if not a coadd type)."""
    if _COADD.fullmatch(dataset_type):
        return dataset_type[: -len("Coadd")]
    return None


def split_data_id(data_id: Mapping[str, int | str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Split a validated data ID into its dimensions and its implied values.

    Returns
    -------
    dimensions : tuple of str
        The identifying keys, in :data:`KEY_ORDER`.
    implied : dict
        ``band``/``physical_filter`` of a data ID that has a ``visit``.
    """
    if "visit" in data_id:
        implied = {k: v for k, v in data_id.items() if k in IMPLIED_BY_VISIT}
    else:
        implied = {}
    dims = tuple(k for k in KEY_ORDER if k in data_id and k not in implied)
    return dims, implied


def format_value(key: str, value: int | str) -> str:
    """Return the path component ``key=value`` (integers zero padded)."""
    if KEYS[key] is int:
        return f"{key}={int(value):0{PADDING[key]}d}"
    return f"{key}={value}"


def data_id_key(data_id: Mapping[str, Any], dimensions: tuple[str, ...]) -> str:
    """Return the canonical identity string ``visit=000123/detector=004`` of a data ID."""
    return "/".join(format_value(k, data_id[k]) for k in dimensions)


def format_data_id(data_id: Mapping[str, Any]) -> str:
    """Return a readable ``visit=123, detector=4`` (``{}`` when empty), for messages."""
    if not data_id:
        return "{}"
    return ", ".join(f"{k}={data_id[k]!r}" if isinstance(data_id[k], str) else f"{k}={data_id[k]}"
                     for k in _DISPLAY_ORDER if k in data_id)


_DISPLAY_ORDER = ("visit", "detector", "tract", "patch", "band", "subfilter", "physical_filter")
