"""PSFs of resampled images and the template's CoaddPsf."""

from __future__ import annotations

import numpy as np
import pytest

from daskdiff import Box
from daskdiff.psf import GaussianPsf, adaptive_moments, psf_from_state
from daskdiff.psf.measure import centroid
from daskdiff.psf.warped import CoaddPsf, WarpedPsf, pixel_jacobian

from .conftest import make_tan_wcs

SRC = make_tan_wcs(ra=10.0, dec=-20.0, crpix=(500, 500), scale_arcsec=0.2)
DST = make_tan_wcs(ra=10.0, dec=-20.0, crpix=(400, 420), scale_arcsec=0.25, rotation_deg=30.0,
                   sip=True)
BOX = Box(0, 0, 800, 800)


def _cov(moments):
    ixx, iyy, ixy = moments
    return np.array([[ixx, ixy], [ixy, iyy]])


def test_covariance_transforms_with_the_jacobian():
    src_psf = GaussianPsf(sigma=2.5, g1=0.1, g2=-0.05)
    warped = WarpedPsf(src_psf, SRC, DST, BOX)
    for x, y in [(100.0, 100.0), (400.0, 400.0), (700.0, 650.0)]:
        (u, v), jac = pixel_jacobian(SRC, DST, x, y)
        c_src = _cov(adaptive_moments(src_psf.kernel_image(u, v, size=41)))
        inv = np.linalg.inv(jac)
        expected = inv @ c_src @ inv.T
        measured = _cov(adaptive_moments(warped.kernel_image(x, y, size=41)))
        np.testing.assert_allclose(measured, expected, rtol=0.01, atol=0.01 * expected[0, 0])


def test_image_is_centred_on_the_position():
    warped = WarpedPsf(GaussianPsf(sigma=2.0), SRC, DST, BOX)
    rng = np.random.default_rng(7)
    for x, y in rng.uniform(100, 700, (5, 2)):
        image, box = warped.image(x, y, size=31)
        assert image.sum() == pytest.approx(1.0)
        cx, cy = centroid(image)
        assert box.x0 + cx == pytest.approx(x, abs=0.02)
        assert box.y0 + cy == pytest.approx(y, abs=0.02)


def test_state_roundtrip_and_coadd_average():
    a = WarpedPsf(GaussianPsf(sigma=2.0), SRC, DST, BOX)
    b = WarpedPsf(GaussianPsf(sigma=3.0), SRC, DST, BOX)
    coadd = CoaddPsf([(a, Box(0, 0, 500, 800)), (b, Box(300, 0, 500, 800))], BOX)
    params, arrays = coadd.to_state()
    back = psf_from_state(params, arrays)
    np.testing.assert_array_equal(back.kernel_image(400, 400), coadd.kernel_image(400, 400))
    assert len(back) == 2
    # only a covers x=100; both cover x=400 (equal-weight average)
    np.testing.assert_allclose(coadd.kernel_image(100, 400, size=31),
                               a.kernel_image(100, 400, size=31))
    both = (a.kernel_image(400, 400, size=31) + b.kernel_image(400, 400, size=31)) / 2
    np.testing.assert_allclose(coadd.kernel_image(400, 400, size=31), both / both.sum())
