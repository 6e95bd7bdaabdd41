"""Subtraction QA figures computed on the (computed) products."""

from __future__ import annotations

import numpy as np
import xarray as xr
from astropy.table import Table

__all__ = ["blank_sky", "footprint_ratio"]

_BAD = ("NO_DATA", "BAD", "SAT", "SAT_TEMPLATE", "EDGE")


def _bits(planes, names) -> int:
    known = set(planes)
    return planes.bitmask(*[p for p in names if p in known])


def blank_sky(difference: xr.Dataset, science: xr.Dataset | None = None) -> np.ndarray:
    """Return the unmasked pixels of the difference away from sources.

    The subtraction clears DETECTED (LSST updateMasks), so the sources are taken from the
    science input's DETECTED plane when it is given, as well as from the difference's.
    """
    planes = difference.attrs["mask_planes"]
    mask = np.asarray(difference["mask"].values)
    blank = (mask & _bits(planes, (*_BAD, "DETECTED"))) == 0
    if science is not None:
        sci = science.sel(y=difference["y"], x=difference["x"])
        sci_planes = sci.attrs.get("mask_planes") or planes
        blank &= (np.asarray(sci["mask"].values) & _bits(sci_planes, ("DETECTED",))) == 0
    return blank & np.isfinite(np.asarray(difference["image"].values))


def footprint_ratio(difference: xr.Dataset, science: xr.Dataset, sources: Table, *,
                    radius: float) -> tuple[float, float]:
    """Return the mean and std of the residual footprint ratio over the kernel sources.

    Per source (LSST ``computeDifferenceImageMetrics``): ``|mean|diff| - sky| / mean|science|``
    within ``radius`` pixels (about the source footprint: one FWHM), where ``sky`` is the mean
    ``|diff|`` over the unmasked, undetected pixels. Small (< 0.02) for a good subtraction.
    """
    planes = difference.attrs["mask_planes"]
    diff = np.asarray(difference["image"].values, np.float64)
    good = ((np.asarray(difference["mask"].values) & _bits(planes, _BAD)) == 0) & \
        np.isfinite(diff)
    blank = blank_sky(difference, science)
    sky = float(np.mean(np.abs(diff[blank]))) if blank.any() else 0.0
    sci = science.sel(y=difference["y"], x=difference["x"])["image"].values
    x0, y0 = int(difference["x"][0]), int(difference["y"][0])
    r = int(np.ceil(radius))
    u = np.arange(-r, r + 1)
    disk = (u[:, None] ** 2 + u[None, :] ** 2) <= radius**2
    ratios = []
    for x, y in zip(np.asarray(sources["x"]), np.asarray(sources["y"]), strict=True):
        iy, ix = int(y) - y0, int(x) - x0
        if iy - r < 0 or ix - r < 0 or iy + r >= diff.shape[0] or ix + r >= diff.shape[1]:
            continue
        sl = (slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
        sel = disk & good[sl]
        if not sel.any():
            continue
        denominator = np.mean(np.abs(sci[sl][sel]))
        if denominator > 0:
            ratios.append(abs(np.mean(np.abs(diff[sl][sel])) - sky) / denominator)
    if not ratios:
        return float("nan"), float("nan")
    return float(np.mean(ratios)), float(np.std(ratios))
