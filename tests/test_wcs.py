"""WCS helpers: origin shifts, serialisation, local geometry."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from daskdiff import Box, InputError
from daskdiff.wcs import (
    local_jacobian,
    pixel_scale,
    pixel_to_sky,
    sky_polygon,
    sky_to_pixel,
    wcs_from_header,
    wcs_from_string,
    wcs_to_header,
    wcs_to_string,
)


@pytest.mark.parametrize("sip", [False, True])
def test_origin_shift_is_exact(sip, tan_wcs, sip_wcs):
    wcs = sip_wcs if sip else tan_wcs
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 2000, 100)
    y = rng.uniform(0, 2000, 100)
    x0, y0 = 12345, -678
    header = wcs_to_header(wcs, x0=x0, y0=y0)
    # the header describes the array whose first pixel is (x0, y0)
    from astropy.wcs import WCS
    plain = WCS(header, relax=True)
    ra1, dec1 = plain.all_pix2world(x - x0, y - y0, 0)
    ra0, dec0 = pixel_to_sky(wcs, x, y)
    np.testing.assert_allclose(ra1, ra0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(dec1, dec0, rtol=0, atol=1e-10)
    back = wcs_from_header(header, x0=x0, y0=y0)
    ra2, dec2 = pixel_to_sky(back, x, y)
    np.testing.assert_allclose(ra2, ra0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(dec2, dec0, rtol=0, atol=1e-10)


def test_string_roundtrip_and_inverse(sip_wcs):
    back = wcs_from_string(wcs_to_string(sip_wcs))
    x = np.array([0.0, 517.3, 1999.0])
    y = np.array([3.0, 1200.7, 44.0])
    ra, dec = pixel_to_sky(back, x, y)
    ra0, dec0 = pixel_to_sky(sip_wcs, x, y)
    np.testing.assert_allclose([ra, dec], [ra0, dec0], rtol=0, atol=1e-10)
    xb, yb = sky_to_pixel(sip_wcs, ra, dec)
    np.testing.assert_allclose([xb, yb], [x, y], atol=1e-6)


def test_local_geometry(tan_wcs):
    assert pixel_scale(tan_wcs, 1000, 1000) == pytest.approx(0.2, rel=1e-6)
    jac = local_jacobian(tan_wcs, 1000, 1000)
    np.testing.assert_allclose(jac, [[-0.2, 0.0], [0.0, 0.2]], atol=1e-6)
    ra, dec = sky_polygon(tan_wcs, Box(0, 0, 100, 100), points_per_side=3)
    assert ra.shape == dec.shape == (12,)


def test_missing_or_non_celestial_wcs():
    with pytest.raises(InputError, match="no WCS in the header"):
        wcs_from_header(fits.Header(), source="frame.fits")
    header = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"})
    with pytest.raises(InputError, match="not celestial"):
        wcs_from_header(header, source="frame.fits")
