"""Detector defects: saturation with bleed trails, bad columns, cosmic rays and edges.

Each function takes the image (counts, float64, modified in place where it says so) and the mask
(uint32), sets the standard mask planes (SAT, BAD, CR, EDGE) and draws its randomness from the
generator it is given, so the defects of an exposure depend only on the seed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..masks import MaskPlanes

__all__ = [
    "add_cosmic_rays",
    "repair_cosmic_rays",
    "apply_bad_columns",
    "apply_saturation",
    "bad_columns",
    "mask_edges",
]


def apply_saturation(image: np.ndarray, mask: np.ndarray, *, level: float,
                     planes: MaskPlanes) -> int:
    """Clip pixels above ``level`` and bleed their excess charge along the column.

    The charge above the saturation level in each saturated run of a column spills into the
    pixels above and below the run (half each way), filling them to ``level``, so the total
    charge of the column is kept (except what bleeds off the detector). Saturated and bled
    pixels get the SAT plane.

    Parameters
    ----------
    image : numpy.ndarray
        Image in counts; modified in place.
    mask : numpy.ndarray
        Mask; modified in place.
    level : float
        Saturation level in counts.
    planes : MaskPlanes
        The mask-plane registry.

    Returns
    -------
    int
        The number of pixels flagged SAT.
    """
    sat_bit = np.uint32(planes.bitmask("SAT"))
    over = image > level
    if not np.any(over):
        return 0
    ny = image.shape[0]
    for col in np.nonzero(over.any(axis=0))[0]:
        column = image[:, col]
        rows = np.nonzero(column > level)[0]
        # split the saturated rows of this column into contiguous runs
        breaks = np.nonzero(np.diff(rows) > 1)[0]
        for run in np.split(rows, breaks + 1):
            lo, hi = int(run[0]), int(run[-1]) + 1
            excess = float(np.sum(column[lo:hi] - level))
            column[lo:hi] = level
            for direction, start in ((-1, lo - 1), (1, hi)):
                charge = excess / 2.0
                row = start
                while charge > 0 and 0 <= row < ny:
                    room = level - column[row]
                    if room <= 0:
                        row += direction
                        continue
                    take = min(room, charge)
                    column[row] += take
                    charge -= take
                    if column[row] >= level:
                        mask[row, col] |= sat_bit
                    row += direction
        image[:, col] = column
    mask[image >= level] |= sat_bit
    return int(np.count_nonzero(mask & sat_bit))


def bad_columns(rng: np.random.Generator, n: int, width: int, height: int
                ) -> list[tuple[int, int, int]]:
    """Draw ``n`` bad columns as ``(column, first_row, last_row_plus_one)``.

    Half of them span the whole detector, the others start at a random row and run to the top
    (as a charge trap would).
    """
    columns = []
    for i in range(n):
        col = int(rng.integers(0, width))
        start = 0 if i % 2 == 0 else int(rng.integers(0, height))
        columns.append((col, start, height))
    return columns


def apply_bad_columns(image: np.ndarray, mask: np.ndarray, columns: list[tuple[int, int, int]],
                      *, planes: MaskPlanes, rng: np.random.Generator) -> None:
    """Corrupt bad columns (a random offset of a few hundred counts) and flag them BAD."""
    bad = np.uint32(planes.bitmask("BAD"))
    for col, start, stop in columns:
        image[start:stop, col] += rng.uniform(-300.0, 300.0)
        mask[start:stop, col] |= bad


def add_cosmic_rays(image: np.ndarray, mask: np.ndarray, *, rate_per_megapixel: float,
                    planes: MaskPlanes, rng: np.random.Generator) -> int:
    """Add cosmic-ray tracks (1 to 12 pixels long, 300 to 5000 counts per pixel), flag CR.

    Returns
    -------
    int
        The number of cosmic rays added.
    """
    ny, nx = image.shape
    n = int(rng.poisson(rate_per_megapixel * nx * ny / 1e6))
    cr = np.uint32(planes.bitmask("CR"))
    for _ in range(n):
        length = int(rng.integers(1, 13))
        angle = rng.uniform(0.0, np.pi)
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        t = np.arange(length)
        xs = np.clip(np.floor(x0 + t * np.cos(angle)).astype(int), 0, nx - 1)
        ys = np.clip(np.floor(y0 + t * np.sin(angle)).astype(int), 0, ny - 1)
        image[ys, xs] += rng.uniform(300.0, 5000.0, length)
        mask[ys, xs] |= cr
    return n


def repair_cosmic_rays(image: np.ndarray, mask: np.ndarray, *, planes: MaskPlanes,
                       sigma: float = 1.5) -> int:
    """Interpolate over the CR-flagged pixels in place and flag them INTRP.

    Each cosmic-ray pixel gets the Gaussian-weighted mean (``sigma`` pixels) of the pixels around
    it that are not cosmic rays (normalised convolution), as single-frame processing repairs its
    calexps; the CR plane is kept.

    Returns
    -------
    int
        The number of pixels repaired.
    """
    hit = (mask & np.uint32(planes.bitmask("CR"))) != 0
    n = int(hit.sum())
    if n == 0:
        return 0
    good = (~hit).astype(np.float64)
    ys, xs = np.nonzero(hit)
    pad = int(np.ceil(4 * sigma)) + 12
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, image.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, image.shape[1])
    window = np.s_[y0:y1, x0:x1]
    values = np.where(hit[window], 0.0, image[window].astype(np.float64))
    weight = good[window]
    filled = np.zeros_like(values)
    todo = hit[window].copy()
    scale = sigma
    while todo.any():
        num = ndimage.gaussian_filter(values * weight, scale, mode="nearest")
        den = ndimage.gaussian_filter(weight, scale, mode="nearest")
        ok = todo & (den > 1e-3)
        filled[ok] = num[ok] / den[ok]
        todo &= ~ok
        scale *= 2.0
    block = image[window]
    block[hit[window]] = filled[hit[window]].astype(image.dtype)
    mask[hit] |= np.uint32(planes.bitmask("INTRP"))
    return n


def mask_edges(mask: np.ndarray, width: int, *, planes: MaskPlanes) -> None:
    """Flag a frame of ``width`` pixels around the detector EDGE."""
    if width <= 0:
        return
    edge = np.uint32(planes.bitmask("EDGE"))
    mask[:width, :] |= edge
    mask[-width:, :] |= edge
    mask[:, :width] |= edge
    mask[:, -width:] |= edge
