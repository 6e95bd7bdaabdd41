"""The fixed diaSrc schema: column names, types, units and descriptions.

The schema is a :class:`pyarrow.Schema` whose fields carry ``unit`` and ``description``
metadata (bytes, as Arrow requires); Parquet files keep them. The only configurable part is the
set of circular apertures (``ap_flux_<r>_<d>`` for each radius, ``ap_flux_12_0`` by default).
Positions are parent-frame pixels (integer values at pixel centres); fluxes are instrumental
(counts of the difference, ``*_flux``) and calibrated (``*_flux_njy``). A catalog with no source
is an empty table with the full schema, never ``None``.

Footprints are stored as spans, ``footprint`` being a list of ``(y, x_begin, x_end)`` rows with
``x_end`` exclusive, so stamps and QA can rebuild every source's pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .config import PIXEL_FLAG_PLANES

__all__ = ["aperture_column", "dia_source_schema", "empty_table", "make_table"]

_SPAN = pa.list_(pa.list_(pa.int32(), 3))

#: (name, type, unit, description) of every fixed column.
_BASE: list[tuple[str, pa.DataType, str, str]] = [
    ("id", pa.int64(), "", "unique source id: ((visit * 1000 + detector) << 20) + counter"),
    ("visit", pa.int64(), "", "visit of the science exposure"),
    ("detector", pa.int32(), "", "detector of the science exposure"),
    ("band", pa.string(), "", "filter band"),
    ("mjd", pa.float64(), "d", "MJD (TAI) at mid-exposure"),
    ("parent", pa.int64(), "", "parent id (0: no deblending)"),
    ("x", pa.float64(), "pixel", "centroid x (parent frame); the dipole centroid for dipoles"),
    ("y", pa.float64(), "pixel", "centroid y (parent frame); the dipole centroid for dipoles"),
    ("x_err", pa.float64(), "pixel", "1-sigma error of x"),
    ("y_err", pa.float64(), "pixel", "1-sigma error of y"),
    ("centroid_flag", pa.bool_(), "", "the windowed centroid failed; x, y is the peak"),
    ("coord_ra", pa.float64(), "deg", "right ascension of (x, y)"),
    ("coord_dec", pa.float64(), "deg", "declination of (x, y)"),
    ("peak_x", pa.int32(), "pixel", "most significant peak, x"),
    ("peak_y", pa.int32(), "pixel", "most significant peak, y"),
    ("peak_significance", pa.float64(), "sigma", "significance of that peak in the "
     "PSF-smoothed difference (negative for a negative peak)"),
    ("n_pos_peaks", pa.int16(), "", "number of positive peaks in the footprint"),
    ("n_neg_peaks", pa.int16(), "", "number of negative peaks in the footprint"),
    ("is_negative", pa.bool_(), "", "the footprint holds only negative peaks"),
    ("is_dipole_candidate", pa.bool_(), "", "the footprint holds positive and negative peaks"),
    ("sky_source", pa.bool_(), "", "a sky source placed on a blank position"),
    ("footprint_area", pa.int32(), "pixel^2", "number of pixels in the footprint"),
    ("footprint", _SPAN, "pixel", "footprint spans (y, x_begin, x_end exclusive)"),
    ("psf_flux", pa.float64(), "count", "PSF flux on the difference at (x, y)"),
    ("psf_flux_err", pa.float64(), "count", "1-sigma error of psf_flux"),
    ("psf_flux_njy", pa.float64(), "nJy", "psf_flux calibrated"),
    ("psf_flux_njy_err", pa.float64(), "nJy", "psf_flux_err calibrated"),
    ("psf_flux_area", pa.float64(), "pixel^2", "noise-equivalent area of the PSF model"),
    ("psf_flux_chi2", pa.float64(), "", "chi^2 of the PSF fit over the model stamp"),
    ("psf_flux_npixels", pa.int32(), "", "pixels used by the PSF fit"),
    ("psf_flux_flag", pa.bool_(), "", "the PSF flux is unreliable (clipped or no pixels)"),
    ("psf_flux_flag_edge", pa.bool_(), "", "the PSF stamp is clipped by the edge or bad "
     "pixels"),
    ("shape_xx", pa.float64(), "pixel^2", "adaptive second moment xx"),
    ("shape_yy", pa.float64(), "pixel^2", "adaptive second moment yy"),
    ("shape_xy", pa.float64(), "pixel^2", "adaptive second moment xy"),
    ("shape_flag", pa.bool_(), "", "the adaptive moments failed"),
    ("dipole_flux", pa.float64(), "count", "flux of each lobe of the dipole fit"),
    ("dipole_flux_err", pa.float64(), "count", "1-sigma error of dipole_flux"),
    ("dipole_pos_x", pa.float64(), "pixel", "positive lobe centroid x"),
    ("dipole_pos_y", pa.float64(), "pixel", "positive lobe centroid y"),
    ("dipole_pos_x_err", pa.float64(), "pixel", "1-sigma error of dipole_pos_x"),
    ("dipole_pos_y_err", pa.float64(), "pixel", "1-sigma error of dipole_pos_y"),
    ("dipole_neg_x", pa.float64(), "pixel", "negative lobe centroid x"),
    ("dipole_neg_y", pa.float64(), "pixel", "negative lobe centroid y"),
    ("dipole_neg_x_err", pa.float64(), "pixel", "1-sigma error of dipole_neg_x"),
    ("dipole_neg_y_err", pa.float64(), "pixel", "1-sigma error of dipole_neg_y"),
    ("dipole_x", pa.float64(), "pixel", "dipole centroid x (mean of the lobes)"),
    ("dipole_y", pa.float64(), "pixel", "dipole centroid y (mean of the lobes)"),
    ("dipole_orientation", pa.float64(), "rad", "atan2(y+ - y-, x+ - x-), counter-clockwise "
     "from +x"),
    ("dipole_separation", pa.float64(), "pixel", "distance between the lobes"),
    ("dipole_chi2dof", pa.float64(), "", "chi^2 per degree of freedom of the joint fit"),
    ("dipole_n_data", pa.int32(), "", "pixels in the joint fit (all images)"),
    ("dipole_signal_to_noise", pa.float64(), "", "sqrt((F/sqrt(sum V_sci))^2 + "
     "(F/sqrt(sum V_tmpl))^2) over the footprint box"),
    ("dipole_classification", pa.bool_(), "", "classified as a dipole"),
    ("dipole_classification_attempted", pa.bool_(), "", "a dipole fit was attempted"),
    ("dipole_flag", pa.bool_(), "", "the dipole fit failed or was not possible"),
    ("dipole_flag_edge", pa.bool_(), "", "the dipole fit region has missing pixels"),
    ("dipole_flag_too_large", pa.bool_(), "", "footprint larger than the dipole-fit limit"),
    ("pixel_flags_offimage", pa.bool_(), "", "the centroid is outside the image"),
]

_FORCED: list[tuple[str, pa.DataType, str, str]] = []
for _prefix, _what in (("forced_psf_flux", "science image"),
                       ("forced_template_psf_flux", "matched template")):
    _FORCED += [
        (_prefix, pa.float64(), "count", f"forced PSF flux on the {_what} at (x, y)"),
        (f"{_prefix}_err", pa.float64(), "count", f"1-sigma error of {_prefix}"),
        (f"{_prefix}_njy", pa.float64(), "nJy", f"{_prefix} calibrated"),
        (f"{_prefix}_njy_err", pa.float64(), "nJy", f"{_prefix}_err calibrated"),
        (f"{_prefix}_area", pa.float64(), "pixel^2", "noise-equivalent area of the PSF model"),
        (f"{_prefix}_flag", pa.bool_(), "", "the forced flux is unreliable or not measured"),
        (f"{_prefix}_flag_no_good_pixels", pa.bool_(), "", "no usable pixel under the PSF"),
        (f"{_prefix}_flag_edge", pa.bool_(), "", "the PSF stamp is clipped"),
    ]


def _flag_columns() -> list[tuple[str, pa.DataType, str, str]]:
    columns = []
    for name, plane in PIXEL_FLAG_PLANES.items():
        columns.append((f"pixel_flags_{name}", pa.bool_(), "",
                        f"{plane} set anywhere in the footprint"))
        columns.append((f"pixel_flags_{name}_center", pa.bool_(), "",
                        f"{plane} set in the 3x3 pixels around the centroid"))
    return columns


def aperture_column(radius: float) -> str:
    """Return the column name of the aperture flux of ``radius`` (``ap_flux_12_0``)."""
    whole, frac = f"{float(radius):.1f}".split(".")
    return f"ap_flux_{whole}_{frac}"


def _aperture_columns(radii: Iterable[float]) -> list[tuple[str, pa.DataType, str, str]]:
    columns = []
    for radius in radii:
        name = aperture_column(radius)
        columns += [
            (name, pa.float64(), "count", f"flux in a circular aperture of radius {radius} px"),
            (f"{name}_err", pa.float64(), "count", f"1-sigma error of {name}"),
            (f"{name}_flag", pa.bool_(), "", "aperture truncated by the edge or bad pixels"),
        ]
    return columns


def dia_source_schema(aperture_radii: Sequence[float] = (12.0,)) -> pa.Schema:
    """Return the diaSrc schema for the given aperture radii.

    Parameters
    ----------
    aperture_radii : sequence of float, optional
        Radii of the circular aperture fluxes (pixels).

    Returns
    -------
    pyarrow.Schema
        Every field has ``unit`` and ``description`` metadata.
    """
    columns = [*_BASE, *_aperture_columns(aperture_radii), *_flag_columns(), *_FORCED]
    fields = [pa.field(name, dtype, nullable=True,
                       metadata={b"unit": unit.encode(), b"description": text.encode()})
              for name, dtype, unit, text in columns]
    return pa.schema(fields, metadata={b"daskdiff": b"diaSrc", b"schema_version": b"1"})


def empty_table(aperture_radii: Sequence[float] = (12.0,)) -> pa.Table:
    """Return a diaSrc table with no rows and the full schema."""
    return dia_source_schema(aperture_radii).empty_table()


def _default(dtype: pa.DataType) -> Any:
    if pa.types.is_boolean(dtype):
        return False
    if pa.types.is_floating(dtype):
        return np.nan
    if pa.types.is_integer(dtype):
        return 0
    if pa.types.is_string(dtype):
        return ""
    return []


def make_table(rows: Sequence[Mapping[str, Any]], *,
               aperture_radii: Sequence[float] = (12.0,)) -> pa.Table:
    """Build a diaSrc table from per-source dictionaries.

    Missing values take the column's neutral value (NaN, ``False``, 0, empty); a key that is not
    a column is an error (the schema is fixed).
    """
    schema = dia_source_schema(aperture_radii)
    if not rows:
        return schema.empty_table()
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"not diaSrc columns: {sorted(extra)}")
    arrays = []
    for field in schema:
        default = _default(field.type)
        values = [row.get(field.name, default) for row in rows]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
