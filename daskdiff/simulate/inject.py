"""Injection of point sources ("fakes") into existing exposures, simulated or real.

A fake is the exposure's own PSF model at the fake's position (:meth:`Psf.image`, centred
exactly on the sub-pixel position) times its flux in counts. Fakes are added to the image,
optionally with their photon noise (then their variance is added to the variance plane), and
the pixels where a fake exceeds :data:`MASK_FRACTION` of its peak get the ``INJECTED`` mask
plane (added to the registry if the exposure lacks it).

The truth table (schema :data:`FAKE_SCHEMA`) has one row per requested fake: ``id``, ``ra``,
``dec`` (deg, NaN without a WCS), ``x``, ``y`` (parent-frame pixels), ``flux_njy``,
``flux_counts``, ``mag`` (AB), ``injected`` (False when the position is off the image),
``visit`` and ``detector`` (-1 without visit info).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import xarray as xr

from ..errors import InputError
from ..exposure import (
    exposure_box,
    get_mask_planes,
    get_photo_calib,
    get_visit_info,
    get_wcs,
    require_psf,
    require_wcs,
)
from ..wcs import pixel_to_sky, sky_to_pixel
from .seeds import rng_for

__all__ = ["FAKE_SCHEMA", "MASK_FRACTION", "inject_point_sources", "random_fakes"]

#: Fraction of a fake's peak above which its pixels are flagged INJECTED.
MASK_FRACTION = 0.01

FAKE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("x", pa.float64()),
    ("y", pa.float64()),
    ("flux_njy", pa.float64()),
    ("flux_counts", pa.float64()),
    ("mag", pa.float64()),
    ("injected", pa.bool_()),
    ("visit", pa.int64()),
    ("detector", pa.int64()),
])


def _column(sources: Any, name: str) -> np.ndarray | None:
    if isinstance(sources, pa.Table):
        return (sources.column(name).to_numpy(zero_copy_only=False).astype(float)
                if name in sources.column_names else None)
    if isinstance(sources, Mapping) or hasattr(sources, "columns"):
        if name in sources:
            return np.asarray(sources[name], dtype=float)
        return None
    raise InputError(f"fakes must be a pyarrow Table, a pandas DataFrame or a dict of columns, "
                     f"got {type(sources).__name__}")


def _positions(exposure: xr.Dataset, sources: Any) -> tuple[np.ndarray, ...]:
    x, y = _column(sources, "x"), _column(sources, "y")
    ra, dec = _column(sources, "ra"), _column(sources, "dec")
    wcs = get_wcs(exposure)
    if x is not None and y is not None:
        if wcs is not None:
            ra, dec = pixel_to_sky(wcs, x, y)
        else:
            ra, dec = np.full(x.shape, np.nan), np.full(x.shape, np.nan)
        return x, y, ra, dec
    if ra is not None and dec is not None:
        wcs = require_wcs(exposure, what="exposure to inject fakes at (ra, dec) into")
        x, y = sky_to_pixel(wcs, ra, dec)
        return x, y, ra, dec
    raise InputError("fakes need positions: columns 'x' and 'y' (parent-frame pixels) or "
                     "'ra' and 'dec' (degrees)")


def _fluxes(exposure: xr.Dataset, sources: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    calib = get_photo_calib(exposure)
    counts, njy, mag = (_column(sources, k) for k in ("flux_counts", "flux_njy", "mag"))
    if njy is None and mag is not None:
        njy = 3631.0e9 * 10.0 ** (-0.4 * mag)
    if njy is not None:
        counts = calib.to_counts(njy)
    elif counts is not None:
        njy = calib.to_nanojansky(counts)
    else:
        raise InputError("fakes need a flux: a column 'flux_njy', 'mag' (AB) or 'flux_counts'")
    if len(counts) != n or not np.all(np.isfinite(counts)):
        raise InputError("fake fluxes must be finite, one per position")
    return np.asarray(njy, float), np.asarray(counts, float)


def inject_point_sources(
    exposure: xr.Dataset,
    sources: Any,
    *,
    add_noise: bool = True,
    gain: float = 1.0,
    seed: int = 0,
    stamp_size: int | None = None,
) -> tuple[xr.Dataset, pa.Table]:
    """Add point sources drawn with the exposure's PSF model; return it and the truth table.

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure (numpy- or dask-backed); it needs a PSF model, and a WCS if the fakes
        are given by ``ra``/``dec``.
    sources : pyarrow.Table, pandas.DataFrame or dict
        Columns ``x, y`` (parent-frame pixels) or ``ra, dec`` (degrees), and ``flux_njy``,
        ``mag`` (AB) or ``flux_counts``; an optional ``id``.
    add_noise : bool, optional
        Add the fakes' photon noise (Gaussian, variance ``counts / gain``) and that variance
        to the variance plane.
    gain : float, optional
        Electrons per count, for the photon noise.
    seed : int, optional
        Seed of the noise (with the exposure's visit and detector).
    stamp_size : int, optional
        Odd stamp edge; the PSF model's default if omitted.

    Returns
    -------
    tuple of (xarray.Dataset, pyarrow.Table)
        The exposure with the fakes (same metadata, mask registry with ``INJECTED``) and the
        truth table (:data:`FAKE_SCHEMA`).

    Raises
    ------
    InputError
        If the exposure has no PSF (or no WCS for sky positions), or the fakes lack positions
        or fluxes, or ``gain`` is not positive.
    """
    if not (np.isfinite(gain) and gain > 0):
        raise InputError(f"gain must be a positive number of electrons per count, got {gain!r}")
    psf = require_psf(exposure, what="exposure to inject fakes into")
    x, y, ra, dec = _positions(exposure, sources)
    n = len(x)
    njy, counts = _fluxes(exposure, sources, n)
    ids = _column(sources, "id")
    ids = np.arange(n, dtype=np.int64) if ids is None else ids.astype(np.int64)
    box = exposure_box(exposure)
    planes = get_mask_planes(exposure)
    if "INJECTED" not in planes:
        planes = planes.with_planes("INJECTED")
    injected_bit = np.uint32(planes.bitmask("INJECTED"))
    fake = np.zeros(box.shape, dtype=np.float64)
    flag = np.zeros(box.shape, dtype=bool)
    on_image = np.asarray(box.contains(x, y), dtype=bool)
    for i in np.nonzero(on_image)[0]:
        stamp, stamp_box = psf.image(float(x[i]), float(y[i]), size=stamp_size)
        part = stamp_box.intersection(box)
        if part.is_empty:
            on_image[i] = False
            continue
        values = stamp[part.slices(origin=(stamp_box.x0, stamp_box.y0))] * counts[i]
        target = part.slices(origin=(box.x0, box.y0))
        fake[target] += values
        flag[target] |= np.abs(values) > MASK_FRACTION * np.abs(stamp).max() * abs(counts[i])
    visit_info = get_visit_info(exposure)
    visit = visit_info.visit if visit_info is not None else -1
    detector = visit_info.detector if visit_info is not None else -1
    image = exposure["image"].data + fake.astype(np.float32)
    variance = exposure["variance"].data
    if add_noise:
        rng = rng_for(seed, "inject", max(visit, 0), max(detector, 0))
        fake_var = np.clip(fake, 0.0, None) / gain
        image = image + (rng.standard_normal(box.shape) * np.sqrt(fake_var)).astype(np.float32)
        variance = variance + fake_var.astype(np.float32)
    mask = exposure["mask"].data | np.where(flag, injected_bit, np.uint32(0)).astype(np.uint32)
    result = exposure.copy(deep=False)
    result["image"] = (("y", "x"), image)
    result["variance"] = (("y", "x"), variance)
    result["mask"] = (("y", "x"), mask)
    result.attrs = dict(exposure.attrs)
    result.attrs["mask_planes"] = planes
    mag = np.where(njy > 0, -2.5 * np.log10(np.where(njy > 0, njy, 1.0) / 3631.0e9), np.nan)
    truth = pa.table({
        "id": pa.array(ids, pa.int64()), "ra": pa.array(ra, pa.float64()),
        "dec": pa.array(dec, pa.float64()), "x": pa.array(x, pa.float64()),
        "y": pa.array(y, pa.float64()), "flux_njy": pa.array(njy, pa.float64()),
        "flux_counts": pa.array(counts, pa.float64()), "mag": pa.array(mag, pa.float64()),
        "injected": pa.array(on_image, pa.bool_()),
        "visit": pa.array(np.full(n, visit), pa.int64()),
        "detector": pa.array(np.full(n, detector), pa.int64()),
    }, schema=FAKE_SCHEMA)
    return result, truth


def random_fakes(exposure: xr.Dataset, n: int, *, mag_range: tuple[float, float] = (20.0, 25.0),
                 margin: int = 20, seed: int = 0) -> pa.Table:
    """Draw ``n`` fakes uniformly over an exposure (away from its edges), uniform in magnitude.

    Returns
    -------
    pyarrow.Table
        Columns ``id``, ``x``, ``y``, ``mag``, for :func:`inject_point_sources`.

    Raises
    ------
    InputError
        If ``n`` is negative, the range is reversed or the margin leaves no room.
    """
    if n < 0:
        raise InputError(f"the number of fakes must be >= 0, got {n}")
    if mag_range[0] > mag_range[1]:
        raise InputError(f"mag_range must be (bright, faint), got {mag_range}")
    box = exposure_box(exposure)
    if box.width <= 2 * margin or box.height <= 2 * margin:
        raise InputError(f"margin {margin} leaves no room on a {box.width} x {box.height} image")
    visit_info = get_visit_info(exposure)
    ids = (visit_info.visit, visit_info.detector) if visit_info is not None else (0, 0)
    rng = rng_for(seed, "fakes", *ids)
    x = rng.uniform(box.x0 + margin, box.x1 - 1 - margin, n)
    y = rng.uniform(box.y0 + margin, box.y1 - 1 - margin, n)
    mag = rng.uniform(mag_range[0], mag_range[1], n)
    return pa.table({"id": pa.array(np.arange(n), pa.int64()), "x": x, "y": y, "mag": mag})
