"""Measurements on PSF and star stamps: adaptive moments, FWHM, centroid, sub-pixel shifts.

Stamp coordinates are 0-based pixel indices with integer values at pixel centres; ``x`` is the
column and ``y`` the row (``image[y, x]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ..errors import AlgorithmError, InputError

__all__ = [
    "AdaptiveMoments",
    "adaptive_iterate",
    "adaptive_moments",
    "adaptive_shape",
    "centroid",
    "lanczos_kernel",
    "lanczos_shift",
    "measure_fwhm",
]

#: Lanczos order of the interpolation used by :func:`measure_fwhm`.
_FWHM_ORDER = 6


@dataclass(frozen=True, slots=True)
class AdaptiveMoments:
    """Result of :func:`adaptive_shape`.

    Attributes
    ----------
    x, y : float
        Weighted centroid in stamp pixel coordinates.
    ixx, iyy, ixy : float
        Second moments (pixels²); the covariance for a Gaussian profile.
    flux : float
        Amplitude of the best-fitting elliptical Gaussian (its total flux).
    iterations : int
        Iterations used.
    """

    x: float
    y: float
    ixx: float
    iyy: float
    ixy: float
    flux: float
    iterations: int

    @property
    def trace_radius(self) -> float:
        """``sqrt((ixx + iyy) / 2)``, pixels."""
        return float(np.sqrt(0.5 * (self.ixx + self.iyy)))

    @property
    def determinant_radius(self) -> float:
        """``(ixx * iyy - ixy²) ** 0.25``, pixels."""
        return float((self.ixx * self.iyy - self.ixy**2) ** 0.25)


def _as_stamp(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=float)
    if image.ndim != 2 or min(image.shape) < 3:
        raise InputError(f"expected a 2-D stamp of at least 3 x 3 pixels, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise InputError("the stamp holds non-finite pixels; mask or replace them first")
    return image


def adaptive_shape(
    image: np.ndarray,
    *,
    guess_sigma: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> AdaptiveMoments:
    """Measure Gaussian-weighted adaptive moments (the HSM / SdssShape algorithm).

    The elliptical Gaussian weight is iterated to match the object: with weight covariance
    ``M``, the weighted covariance ``Q`` of the image is computed and ``M <- 2 Q`` (for a
    Gaussian object of covariance ``C``, ``Q = (C⁻¹ + M⁻¹)⁻¹`` and the fixed point is
    ``M = C``); the weight centre follows the weighted centroid.

    Parameters
    ----------
    image : numpy.ndarray
        The stamp (background subtracted), object near its centre.
    guess_sigma : float, optional
        Starting weight sigma in pixels (default: a quarter of the stamp, at most 3).
    max_iter : int, optional
        Maximum number of iterations.
    tol : float, optional
        Convergence tolerance on the moments (relative) and centroid (pixels).

    Returns
    -------
    AdaptiveMoments
        Centroid, moments and flux.

    Raises
    ------
    AlgorithmError
        If the moments diverge (e.g. a stamp of pure noise) or do not converge.
    """
    image = _as_stamp(image)
    ny, nx = image.shape
    s = guess_sigma if guess_sigma is not None else min(3.0, min(nx, ny) / 4.0)
    xc, yc, mxx, myy, mxy, iterations = adaptive_iterate(image, float(s), int(max_iter),
                                                         float(tol))
    if iterations:
        # weighted sum of a Gaussian of flux F, covariance C with weight covariance C:
        # sum(w I) = F / (2 pi sqrt(det(2C))) * 2 pi sqrt(det C) = F / 2
        yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
        dx, dy = xx - xc, yy - yc
        arg = (myy * dx * dx - 2.0 * mxy * dx * dy + mxx * dy * dy) / (mxx * myy - mxy * mxy)
        flux = 2.0 * float((np.exp(-0.5 * arg) * image).sum())
        return AdaptiveMoments(float(xc), float(yc), float(mxx), float(myy), float(mxy),
                               flux, iterations)
    raise AlgorithmError(
        f"adaptive moments did not converge on a {ny} x {nx} stamp (last moments "
        f"{mxx:.4g}, {myy:.4g}, {mxy:.4g}); the stamp may hold no object, too little signal, "
        "or an object larger than the stamp",
        metadata={"shape": [ny, nx]},
    )


def adaptive_moments(image: np.ndarray, **kwargs: float) -> tuple[float, float, float]:
    """Return the adaptive second moments ``(ixx, iyy, ixy)`` of a stamp in pixels².

    For an elliptical Gaussian these equal its covariance (to 1e-3 relative or better for
    sigma >= 1 px); see :func:`adaptive_shape` for the algorithm and the options.
    """
    result = adaptive_shape(image, **kwargs)  # type: ignore[arg-type]
    return result.ixx, result.iyy, result.ixy


def centroid(image: np.ndarray, **kwargs: float) -> tuple[float, float]:
    """Return the adaptive (Gaussian-windowed) centroid ``(x, y)`` of a stamp, in pixels.

    Unbiased for point-symmetric profiles at any sub-pixel phase when they are well sampled.
    """
    result = adaptive_shape(image, **kwargs)  # type: ignore[arg-type]
    return result.x, result.y


def measure_fwhm(image: np.ndarray, *, n_angles: int = 90) -> float:
    """Return the FWHM of a profile in pixels from the area above half maximum.

    The stamp is interpolated with a Lanczos-6 kernel (a windowed sinc, right for sampled
    band-limited profiles). The peak is located on a 1/16-pixel grid around the brightest
    pixel and refined with a parabola; along ``n_angles`` rays from the peak the radius
    ``r(theta)`` where the profile falls to half the peak is found (linear interpolation
    between 1/16-pixel steps); the area is ``A = 1/2 integral r² dtheta`` and the FWHM is
    ``2 sqrt(A / pi)``, the geometric mean of the major and minor FWHM for an elliptical
    profile. For Gaussian and Moffat profiles of FWHM 2.5 to 8 px with their peak on a pixel
    centre (PSF kernel images) the error is below 0.1 %; a peak between pixels of a barely
    sampled profile (FWHM 2.5 px, no pixel response) costs up to ~2 %, the aliasing limit of
    the samples.

    Parameters
    ----------
    image : numpy.ndarray
        The stamp (background subtracted), a single peaked object.
    n_angles : int, optional
        Number of rays.

    Returns
    -------
    float
        FWHM in pixels.

    Raises
    ------
    AlgorithmError
        If the stamp has no positive peak or the half maximum is not reached inside the stamp.
    """
    image = _as_stamp(image)
    ny, nx = image.shape
    iy, ix = np.unravel_index(np.argmax(image), image.shape)
    if not image[iy, ix] > 0:
        raise AlgorithmError("measure_fwhm: the stamp has no positive peak")
    step = 1.0 / 16.0
    fy = iy + np.arange(-16, 17) * step
    fx = ix + np.arange(-16, 17) * step
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    fine = _interpolate_at(image, gx.ravel(), gy.ravel()).reshape(gx.shape)
    jy, jx = np.unravel_index(np.argmax(fine), fine.shape)
    jy, jx = int(np.clip(jy, 1, fine.shape[0] - 2)), int(np.clip(jx, 1, fine.shape[1] - 2))
    py, _ = _parabola_peak(fine[jy - 1:jy + 2, jx])
    px, _ = _parabola_peak(fine[jy, jx - 1:jx + 2])
    yc, xc = fy[jy] + py * step, fx[jx] + px * step
    peak = _interpolate_at(image, np.array([xc]), np.array([yc]))[0]
    peak = max(peak, fine[jy, jx])
    rough = np.sqrt((image >= 0.5 * image[iy, ix]).sum() / np.pi)
    rmax = min(2.0 * rough + 3.0, 0.5 * min(nx, ny))
    radii = np.arange(0.0, rmax, step)
    theta = np.arange(n_angles) * (2.0 * np.pi / n_angles)
    xs = xc + np.outer(np.cos(theta), radii)
    ys = yc + np.outer(np.sin(theta), radii)
    values = _interpolate_at(image, xs.ravel(), ys.ravel()).reshape(xs.shape) / peak - 0.5
    below = values < 0
    if not np.all(below.any(axis=1)):
        raise AlgorithmError(
            "measure_fwhm: the profile does not fall to half its peak inside the stamp; "
            "use a larger stamp"
        )
    k = np.argmax(below, axis=1)
    v0 = values[np.arange(n_angles), k - 1]
    v1 = values[np.arange(n_angles), k]
    r = radii[k - 1] + step * v0 / (v0 - v1)
    area = 0.5 * np.mean(r * r) * 2.0 * np.pi
    return float(2.0 * np.sqrt(area / np.pi))


def _parabola_peak(values: np.ndarray) -> tuple[float, float]:
    """Vertex offset (in steps) and value of a parabola through three equally spaced values."""
    a, b, c = values
    denom = a - 2.0 * b + c
    if denom >= 0:
        return 0.0, float(b)
    offset = float(np.clip(0.5 * (a - c) / denom, -1.0, 1.0))
    return offset, float(b - 0.25 * (a - c) * offset)


def _interpolate_at(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Lanczos-interpolate a stamp at scattered points (stamp coordinates; 0 outside)."""
    ny, nx = image.shape
    order = _FWHM_ORDER
    taps = np.arange(2 * order)
    padded = np.pad(image, order + 1)
    ix0 = np.floor(xs).astype(int) - order + 1
    iy0 = np.floor(ys).astype(int) - order + 1
    tx = xs[:, None] - (ix0[:, None] + taps)
    ty = ys[:, None] - (iy0[:, None] + taps)
    wx = np.sinc(tx) * np.sinc(tx / order)
    wy = np.sinc(ty) * np.sinc(ty / order)
    wx /= wx.sum(axis=1, keepdims=True)
    wy /= wy.sum(axis=1, keepdims=True)
    cols = np.clip(ix0[:, None] + taps + order + 1, 0, nx + 2 * order + 1)
    rows = np.clip(iy0[:, None] + taps + order + 1, 0, ny + 2 * order + 1)
    block = padded[rows[:, :, None], cols[:, None, :]]
    return np.einsum("pi,pij,pj->p", wy, block, wx)



def lanczos_kernel(shift: float, *, order: int = 5) -> tuple[np.ndarray, int]:
    """Return the normalised 1-D Lanczos weights for a sub-pixel shift.

    Parameters
    ----------
    shift : float
        The fractional shift, ``-1 < shift < 1``; the content moves by ``+shift`` pixels.
    order : int, optional
        Lanczos order ``a`` (window half-width in pixels).

    Returns
    -------
    weights : numpy.ndarray
        ``2 * order`` weights ``w[m]`` such that ``out[i] = sum_m w[m] * in[i - lags[m]]``.
    first_lag : int
        The lag of ``weights[0]`` (lags run consecutively from it).
    """
    first = -order + 1 if shift >= 0 else -order
    lags = np.arange(first, first + 2 * order)
    t = lags - shift
    weights = np.sinc(t) * np.sinc(t / order)
    weights[np.abs(t) >= order] = 0.0
    return weights / weights.sum(), int(first)


def _shift_axis(array: np.ndarray, shift: float, axis: int, order: int) -> np.ndarray:
    whole = int(np.floor(shift + 0.5))
    frac = shift - whole
    out = np.zeros_like(array)
    if frac == 0.0:
        weights, first = np.ones(1), 0
    else:
        weights, first = lanczos_kernel(frac, order=order)
    n = array.shape[axis]
    for m, w in enumerate(weights):
        lag = first + m + whole  # out[i] += w * in[i - lag]
        lo, hi = max(0, lag), min(n, n + lag)
        if hi <= lo:
            continue
        dst = [slice(None)] * array.ndim
        src = [slice(None)] * array.ndim
        dst[axis] = slice(lo, hi)
        src[axis] = slice(lo - lag, hi - lag)
        out[tuple(dst)] += w * array[tuple(src)]
    return out


def lanczos_shift(image: np.ndarray, dx: float, dy: float, *, order: int = 5) -> np.ndarray:
    """Shift a stamp's content by ``(dx, dy)`` pixels with a separable Lanczos kernel.

    ``out(x, y) = in(x - dx, y - dy)``, interpolated; pixels that would come from outside the
    stamp are taken as 0, so keep the profile ``order`` pixels away from the edges. The
    weights are normalised (a constant is preserved). For well-sampled PSFs (FWHM >= 2.5 px)
    the Lanczos-5 interpolation error is below 0.2 % of the peak.

    Parameters
    ----------
    image : numpy.ndarray
        A 2-D stamp.
    dx, dy : float
        The shift along x (columns) and y (rows), any real values.
    order : int, optional
        Lanczos order (5 by default).

    Returns
    -------
    numpy.ndarray
        The shifted stamp, float64, same shape.
    """
    image = np.asarray(image, dtype=float)
    if image.ndim != 2:
        raise InputError(f"lanczos_shift needs a 2-D stamp, got shape {image.shape}")
    out = _shift_axis(image, float(dx), 1, order)
    return _shift_axis(out, float(dy), 0, order)


@numba.njit(cache=True, nogil=True)
def adaptive_iterate(image: np.ndarray, guess_sigma: float, max_iter: int, tol: float
                     ) -> tuple[float, float, float, float, float, int]:
    """Iterate Gaussian-weighted adaptive moments (see :func:`adaptive_shape`), compiled.

    Returns ``(xc, yc, mxx, myy, mxy, iterations)``, with ``iterations`` 0 when the moments
    diverge or do not converge in ``max_iter`` iterations.
    """
    ny, nx = image.shape
    xc = (nx - 1) / 2.0
    yc = (ny - 1) / 2.0
    mxx = guess_sigma * guess_sigma
    myy = mxx
    mxy = 0.0
    for iteration in range(1, max_iter + 1):
        det = mxx * myy - mxy * mxy
        if not np.isfinite(det) or det <= 0:
            break
        norm = 0.0
        sx = 0.0
        sy = 0.0
        sxx = 0.0
        syy = 0.0
        sxy = 0.0
        for y in range(ny):
            dy = y - yc
            for x in range(nx):
                dx = x - xc
                arg = (myy * dx * dx - 2.0 * mxy * dx * dy + mxx * dy * dy) / det
                w = np.exp(-0.5 * arg) * image[y, x]
                norm += w
                sx += w * dx
                sy += w * dy
                sxx += w * dx * dx
                syy += w * dy * dy
                sxy += w * dx * dy
        if not np.isfinite(norm) or norm <= 0:
            break
        xn = xc + sx / norm
        yn = yc + sy / norm
        nxx = 2.0 * sxx / norm
        nyy = 2.0 * syy / norm
        nxy = 2.0 * sxy / norm
        if nxx <= 0 or nyy <= 0 or nxx * nyy - nxy * nxy <= 0:
            break
        change = max(abs(nxx - mxx), abs(nyy - myy), abs(nxy - mxy)) / max(nxx, nyy)
        shift = max(abs(xn - xc), abs(yn - yc))
        mxx, myy, mxy, xc, yc = nxx, nyy, nxy, xn, yn
        if not (0 <= xc < nx and 0 <= yc < ny) or mxx > nx * nx or myy > ny * ny:
            break
        if change < tol and shift < tol:
            return xc, yc, mxx, myy, mxy, iteration
    return xc, yc, mxx, myy, mxy, 0
