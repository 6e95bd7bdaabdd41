"""Shared fixtures: seeded factories for WCSs and small exposures.

Every random draw is seeded explicitly (``np.random.default_rng(seed)``); nothing uses a global
random state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.wcs import WCS

#: The project's shared data folder (real survey images), beside the checkout.
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_DATA = SHARED / "data" / "real"


def make_tan_wcs(
    *,
    ra: float = 55.0,
    dec: float = -30.0,
    crpix: tuple[float, float] = (1000.0, 1000.0),
    scale_arcsec: float = 0.2,
    rotation_deg: float = 0.0,
    sip: bool = False,
) -> WCS:
    """Return a TAN (optionally TAN-SIP) WCS in 0-based parent pixels."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]  # FITS CRPIX is 1-based
    theta = np.deg2rad(rotation_deg)
    scale = scale_arcsec / 3600.0
    wcs.wcs.cd = scale * np.array([[-np.cos(theta), np.sin(theta)],
                                   [np.sin(theta), np.cos(theta)]])
    if sip:
        from astropy.wcs import Sip

        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[1, 1] = 2e-7, -1e-7, 5e-8
        b[0, 2], b[2, 0], b[1, 1] = 1.5e-7, -8e-8, 3e-8
        a[3, 0], b[0, 3] = 1e-11, -1e-11
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


@pytest.fixture
def tan_wcs() -> WCS:
    return make_tan_wcs()


@pytest.fixture
def sip_wcs() -> WCS:
    return make_tan_wcs(sip=True, rotation_deg=31.0)


def requires_real_data(*parts: str) -> Path:
    """Return a path under the shared real-data folder, or skip the test if it is absent."""
    path = REAL_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def tract_one_nearer(skymap, template) -> np.ndarray:
    """True where a template pixel's sky position is nearer tract 1's centre than tract 0's."""
    from daskdiff.skymap import angular_separation
    from daskdiff.wcs import pixel_to_sky

    box = template.dd.box
    xs, ys = np.meshgrid(box.xs(), box.ys())
    ra, dec = pixel_to_sky(template.attrs["wcs"], xs.ravel(), ys.ravel())
    d0 = angular_separation(skymap[0].ra, skymap[0].dec, ra, dec)
    d1 = angular_separation(skymap[1].ra, skymap[1].dec, ra, dec)
    return (d1 < d0).reshape(box.shape)
