"""Helpers for the simulator tests: small configurations, controlled catalogues, photometry."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from daskdiff.simulate.config import SimulationConfig
from daskdiff.simulate.sky import OBJECT_SCHEMA, mag_to_njy


def micro_config(**changes) -> SimulationConfig:
    """A very small survey (2 visits x 1 detector of 384^2) for fast tests."""
    base = SimulationConfig(
        name="micro", seed=7, n_visits=2, n_detectors=1, detector_width=384,
        detector_height=384, patch_inner=600, patch_border=40, seeing_range=(0.7, 1.2),
        n_transients=4, n_asteroids=1, dither_arcsec=5.0, max_rotation=10.0, tile_size=256,
    )
    return base.replace(**changes) if changes else base


def star_catalog(ra: np.ndarray, dec: np.ndarray, mag: np.ndarray | float,
                 *, kind: str = "star") -> pa.Table:
    """A catalogue of point sources at given positions (flat spectra)."""
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    n = ra.size
    mag = np.broadcast_to(np.asarray(mag, float), (n,)).copy()
    cols = {}
    for f in OBJECT_SCHEMA:
        if f.type == pa.string():
            cols[f.name] = [""] * n
        elif f.type == pa.int64():
            cols[f.name] = np.full(n, -1, np.int64)
        else:
            cols[f.name] = np.full(n, np.nan)
    cols["id"] = np.arange(1, n + 1, dtype=np.int64)
    cols["kind"] = [kind] * n
    cols["ra"], cols["dec"], cols["mag"] = ra, dec, mag
    cols["flux_njy"] = mag_to_njy(mag)
    cols["dcr_color"] = np.zeros(n)
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in OBJECT_SCHEMA},
                    schema=OBJECT_SCHEMA)


def aperture_sum(image: np.ndarray, x: float, y: float, radius: float,
                 origin: tuple[int, int] = (0, 0)) -> tuple[float, int]:
    """Sum of the pixels whose centres lie within ``radius`` of ``(x, y)`` (parent frame)."""
    x0, y0 = origin
    ny, nx = image.shape
    ys, xs = np.mgrid[0:ny, 0:nx]
    inside = (xs + x0 - x) ** 2 + (ys + y0 - y) ** 2 <= radius**2
    return float(image[inside].sum()), int(inside.sum())


def encircled_energy(psf, x: float, y: float, radius: float) -> float:
    """Fraction of the PSF model's flux within ``radius`` of an exact position."""
    size = 2 * int(np.ceil(radius * 3)) + 1
    stamp, box = psf.image(x, y, size=size)
    total = float(stamp.sum())
    inside, _ = aperture_sum(stamp, x, y, radius, origin=(box.x0, box.y0))
    return inside / total


def robust_std(values: np.ndarray) -> float:
    """1.4826 times the median absolute deviation."""
    values = np.asarray(values, float)
    return float(1.4826 * np.median(np.abs(values - np.median(values))))
