"""PSF models and measurements against known truth (GalSim profiles, analytic Gaussians)."""

from __future__ import annotations

import json

import galsim
import numpy as np
import pytest
from scipy import integrate, optimize, special

from daskdiff.box import Box
from daskdiff.errors import ConfigError, InputError
from daskdiff.psf import (
    GaussianPsf,
    MoffatPsf,
    PixelPsf,
    adaptive_moments,
    adaptive_shape,
    lanczos_shift,
    measure_fwhm,
    psf_from_state,
)

BOX = Box(100, -50, 2048, 2048)


def varying_moffat() -> MoffatPsf:
    """FWHM 4.0 -> ~4.8 px across the box (20 %), |g| up to ~0.06, beta 3."""
    return MoffatPsf([[4.4, 0.15], [0.4, 0.0]], beta=3.0, g1=[[0.0, 0.01], [0.05, 0.0]],
                     g2=[[0.01, 0.04], [0.0, 0.0]], box=BOX)


def all_models() -> list:
    moffat = varying_moffat()
    return [
        GaussianPsf(sigma=1.8),
        GaussianPsf(fwhm=[[4.0, 0.3], [0.2, 0.0]], g1=0.03, g2=[[0.0], [0.02]], box=BOX),
        MoffatPsf(3.5),
        moffat,
        PixelPsf.from_psf(moffat, BOX, degree=2),
    ]


def shear_covariance(sigma: float, g1: float, g2: float) -> np.ndarray:
    matrix = galsim.Shear(g1=g1, g2=g2).getMatrix()
    return sigma**2 * matrix @ matrix.T


# -- measure.py --------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.5])
@pytest.mark.parametrize(("g1", "g2"), [(0.0, 0.0), (0.1, -0.05), (-0.2, 0.15)])
def test_adaptive_moments_equal_gaussian_covariance(sigma, g1, g2):
    rng = np.random.default_rng(11)
    offset = rng.uniform(-0.5, 0.5, 2)
    profile = galsim.Gaussian(sigma=sigma, flux=321.0).shear(g1=g1, g2=g2)
    image = profile.drawImage(nx=61, ny=61, scale=1.0, method="no_pixel",
                              offset=tuple(offset)).array
    truth = shear_covariance(sigma, g1, g2)
    ixx, iyy, ixy = adaptive_moments(image)
    assert ixx == pytest.approx(truth[0, 0], rel=1e-3)
    assert iyy == pytest.approx(truth[1, 1], rel=1e-3)
    assert ixy == pytest.approx(truth[0, 1], abs=1e-3 * sigma**2)
    shape = adaptive_shape(image)
    assert shape.x == pytest.approx(30 + offset[0], abs=1e-3)
    assert shape.y == pytest.approx(30 + offset[1], abs=1e-3)
    assert shape.flux == pytest.approx(321.0, rel=1e-3)


@pytest.mark.parametrize("fwhm", [2.5, 3.0, 4.0, 6.0, 8.0])
@pytest.mark.parametrize("kind", ["gaussian", "moffat2.5", "moffat3.5", "moffat_sheared"])
def test_measure_fwhm_of_sampled_profiles(fwhm, kind):
    profile = {
        "gaussian": galsim.Gaussian(fwhm=fwhm),
        "moffat2.5": galsim.Moffat(beta=2.5, fwhm=fwhm),
        "moffat3.5": galsim.Moffat(beta=3.5, fwhm=fwhm),
        "moffat_sheared": galsim.Moffat(beta=3.0, fwhm=fwhm).shear(g1=0.06, g2=-0.03),
    }[kind]
    # a sheared profile keeps its area above half maximum: the geometric-mean FWHM is fwhm
    centred = profile.drawImage(nx=81, ny=81, scale=1.0, method="no_pixel").array
    assert measure_fwhm(centred) == pytest.approx(fwhm, rel=5e-3)
    if fwhm >= 4.0:  # off-centre peaks are interpolated; barely sampled ones lose accuracy
        off = profile.drawImage(nx=81, ny=81, scale=1.0, method="no_pixel",
                                offset=(0.37, -0.29)).array
        assert measure_fwhm(off) == pytest.approx(fwhm, rel=5e-3)


def test_lanczos_shift_properties():
    rng = np.random.default_rng(3)
    image = galsim.Moffat(beta=3.0, fwhm=4.0).drawImage(nx=41, ny=41, scale=1.0).array
    # integer shifts are exact moves
    moved = lanczos_shift(image, 2.0, -1.0)
    assert np.array_equal(moved[1:-1, 2:], image[2:, :-2])
    # a sub-pixel shift matches GalSim's own offset rendering to 0.2 % of the peak
    for dx, dy in rng.uniform(-0.5, 0.5, (5, 2)):
        truth = galsim.Moffat(beta=3.0, fwhm=4.0).drawImage(
            nx=41, ny=41, scale=1.0, offset=(dx, dy)).array
        assert np.abs(lanczos_shift(image, dx, dy) - truth).max() < 2e-3 * image.max()
    # a constant is preserved away from the edges
    flat = lanczos_shift(np.ones((30, 30)), 0.3, 0.7)
    np.testing.assert_allclose(flat[6:-6, 6:-6], 1.0, rtol=1e-12)


# -- analytic models -------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_gaussian_model_moments_are_sigma_squared_plus_pixel(sigma):
    # the model is drawn with the pixel response, which adds 1/12 px² to the covariance
    psf = GaussianPsf(sigma=sigma)
    ixx, iyy, ixy = psf.moments()
    assert ixx == pytest.approx(sigma**2 + 1 / 12, rel=1e-3)
    assert iyy == pytest.approx(sigma**2 + 1 / 12, rel=1e-3)
    assert abs(ixy) < 1e-6
    sheared = GaussianPsf(sigma=sigma, g1=0.08, g2=-0.04)
    truth = shear_covariance(sigma, 0.08, -0.04) + np.eye(2) / 12
    ixx, iyy, ixy = sheared.moments()
    assert ixx == pytest.approx(truth[0, 0], rel=1e-3)
    assert iyy == pytest.approx(truth[1, 1], rel=1e-3)
    assert ixy == pytest.approx(truth[0, 1], abs=1e-3 * sigma**2)


def pixel_convolved_gaussian_fwhm(sigma: float) -> float:
    """Geometric-mean FWHM of a round Gaussian convolved with the unit pixel (quadrature)."""

    def line(u):  # 1-D pixel-integrated Gaussian profile
        return special.ndtr((u + 0.5) / sigma) - special.ndtr((u - 0.5) / sigma)

    a0 = line(0.0)
    x_half = optimize.brentq(lambda u: line(u) - 0.5 * a0, 0.0, 10 * sigma)

    def y_extent(x):
        target = 0.5 * a0 * a0 / line(x)
        return optimize.brentq(lambda u: line(u) - target, 0.0, 10 * sigma) if target < a0 else 0

    area = 4.0 * integrate.quad(y_extent, 0.0, x_half, epsabs=1e-10, limit=200)[0]
    return 2.0 * np.sqrt(area / np.pi)


def pixel_convolved_fwhm_fine(profile: galsim.GSObject, fwhm: float) -> float:
    """FWHM of profile * pixel drawn 10x oversampled (sampling errors vanish)."""
    fine = galsim.Convolve(profile, galsim.Pixel(1.0))
    n = int(8 * fwhm / 0.1) | 1
    image = fine.drawImage(nx=n, ny=n, scale=0.1, method="no_pixel").array
    return 0.1 * measure_fwhm(image)


@pytest.mark.parametrize("fwhm", [2.5, 4.0, 8.0])
def test_model_fwhm_matches_parameter_and_pixel_response(fwhm):
    gaussian = GaussianPsf(fwhm=fwhm)
    moffat = MoffatPsf(fwhm, beta=3.0)
    assert gaussian.profile_fwhm() == fwhm and moffat.profile_fwhm() == fwhm
    # measured on the model image = the FWHM of the pixel-convolved profile
    truth_g = pixel_convolved_gaussian_fwhm(fwhm / (2 * np.sqrt(2 * np.log(2))))
    assert gaussian.fwhm() == pytest.approx(truth_g, rel=5e-3)
    truth_m = pixel_convolved_fwhm_fine(galsim.Moffat(beta=3.0, fwhm=fwhm), fwhm)
    assert moffat.fwhm() == pytest.approx(truth_m, rel=5e-3)
    # ... which approaches the parameter once the pixel is small against the PSF (the
    # Moffat's sharper core is broadened more: +0.6 % at 8 px against +0.4 % for a Gaussian)
    if fwhm >= 8.0:
        assert gaussian.fwhm() == pytest.approx(fwhm, rel=5e-3)
        assert moffat.fwhm() == pytest.approx(fwhm, rel=1e-2)


def test_spatial_variation_follows_the_polynomials():
    psf = varying_moffat()
    right = (BOX.x1 - 0.5, BOX.center[1])
    top = (BOX.center[0], BOX.y1 - 0.5)
    assert psf.profile_fwhm(*BOX.center) == pytest.approx(4.4)
    assert psf.profile_fwhm(*right) == pytest.approx(4.8)
    assert psf.profile_fwhm(*top) == pytest.approx(4.55)
    assert psf.shear(*right) == pytest.approx((0.05, 0.01))
    assert psf.shear(*top) == pytest.approx((0.01, 0.05))
    # the measured ellipticity follows g1: distortion e1 = (ixx - iyy) / (ixx + iyy) > 0
    gaussian = GaussianPsf(sigma=2.0, g1=[[0.0], [0.05]], box=BOX)
    ixx, iyy, _ = gaussian.moments(*right)
    e1 = (ixx - iyy) / (ixx + iyy)
    expected = 2 * 0.05 / (1 + 0.05**2) * 4.0 / (4.0 + 1 / 12)  # pixel dilutes it
    assert e1 == pytest.approx(expected, rel=2e-3)
    ixx, iyy, _ = gaussian.moments(*BOX.center)
    assert abs(ixx - iyy) < 1e-9
    # FWHM grows 20 % across the box
    assert psf.fwhm(BOX.x1 - 1, BOX.y1 - 1) / psf.fwhm(BOX.x0, BOX.y0) > 1.18


def test_galsim_drawing_agrees_exactly_with_the_model():
    psf = varying_moffat()
    x, y = 1234.3, 567.8
    image, box = psf.image(x, y, size=31)
    drawn = galsim.ImageD(2200, 2100, scale=1.0)
    drawn.setOrigin(BOX.x0, BOX.y0)
    bounds = galsim.BoundsI(box.x0, box.x1 - 1, box.y0, box.y1 - 1)
    psf.galsim_profile(x, y).withFlux(1000.0).drawImage(
        image=drawn[bounds], method="auto", center=galsim.PositionD(x, y))
    stamp = drawn[bounds].array
    np.testing.assert_allclose(stamp / stamp.sum(), image, rtol=0, atol=1e-12)


def test_default_sizes():
    assert GaussianPsf(fwhm=2.0).default_size() == 21
    assert GaussianPsf(fwhm=5.0).default_size() == 31
    assert MoffatPsf(5.0).default_size() == 41
    assert varying_moffat().default_size() == 2 * int(np.ceil(4 * 4.95)) + 1
    assert MoffatPsf(3.0, size=25).kernel_image(0, 0).shape == (25, 25)


def test_invalid_parameters_are_rejected():
    with pytest.raises(ConfigError, match="exactly one"):
        GaussianPsf(fwhm=3.0, sigma=1.0)
    with pytest.raises(ConfigError, match="beta"):
        MoffatPsf(3.0, beta=1.0)
    with pytest.raises(ConfigError, match="box"):
        MoffatPsf([[3.0, 0.1]])
    with pytest.raises(ConfigError, match="positive"):
        MoffatPsf([[1.0], [2.0]], box=BOX)
    with pytest.raises(ConfigError, match="shear"):
        GaussianPsf(fwhm=3.0, g1=[[0.5], [0.6]], box=BOX)
    with pytest.raises(ConfigError, match="odd"):
        GaussianPsf(fwhm=3.0).kernel_image(0, 0, size=20)
    with pytest.raises(InputError, match="components"):
        PixelPsf(np.zeros((4, 21, 21)), BOX)
    with pytest.raises(InputError, match="unknown PSF model type"):
        psf_from_state({"type": "nonsense"}, {})


# -- every model -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(5))
def test_kernel_images_sum_to_one_and_images_are_centred(index):
    psf = all_models()[index]
    rng = np.random.default_rng(100 + index)
    for x, y in zip(rng.uniform(BOX.x0, BOX.x1 - 1, 8), rng.uniform(BOX.y0, BOX.y1 - 1, 8),
                    strict=True):
        kernel = psf.kernel_image(x, y)
        assert kernel.shape == (psf.default_size(),) * 2
        assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
        image, box = psf.image(x, y)
        assert box.shape == kernel.shape
        assert image.sum() == pytest.approx(1.0, abs=1e-3)
        shape = adaptive_shape(image)
        assert shape.x + box.x0 == pytest.approx(x, abs=0.01)
        assert shape.y + box.y0 == pytest.approx(y, abs=0.01)


def test_pixel_psf_from_psf_reproduces_a_varying_model():
    truth = varying_moffat()
    model = PixelPsf.from_psf(truth, BOX, degree=2, grid=5)
    assert model.components.shape == (6, truth.default_size(), truth.default_size())
    rng = np.random.default_rng(5)
    xs = np.concatenate([np.linspace(BOX.x0, BOX.x1 - 1, 3).repeat(3),
                         rng.uniform(BOX.x0, BOX.x1 - 1, 6)])
    ys = np.concatenate([np.tile(np.linspace(BOX.y0, BOX.y1 - 1, 3), 3),
                         rng.uniform(BOX.y0, BOX.y1 - 1, 6)])
    worst_kernel = worst_image = 0.0
    for x, y in zip(xs, ys, strict=True):
        k_true = truth.kernel_image(x, y)
        worst_kernel = max(worst_kernel,
                           np.abs(model.kernel_image(x, y) - k_true).max() / k_true.max())
        i_true, _ = truth.image(x, y)
        worst_image = max(worst_image,
                          np.abs(model.image(x, y)[0] - i_true).max() / i_true.max())
        assert model.fwhm(x, y) == pytest.approx(truth.fwhm(x, y), rel=5e-3)
    assert worst_kernel < 0.01  # measured ~0.3 %
    assert worst_image < 0.01  # includes the Lanczos-5 shift; measured ~0.4 %


@pytest.mark.parametrize("index", range(5))
def test_state_round_trips_exactly(index):
    psf = all_models()[index]
    params, arrays = psf.to_state()
    params = json.loads(json.dumps(params))  # must be JSON-able
    arrays = {k: np.array(v) for k, v in arrays.items()}
    rebuilt = psf_from_state(params, arrays)
    assert type(rebuilt) is type(psf)
    assert rebuilt == psf
    for x, y in [(BOX.x0, BOX.y0), (1500.5, 321.25)]:
        assert np.array_equal(rebuilt.kernel_image(x, y), psf.kernel_image(x, y))
        assert np.array_equal(rebuilt.image(x, y)[0], psf.image(x, y)[0])
