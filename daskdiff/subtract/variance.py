"""Variance-plane rescaling (LSST ``ScaleVarianceTask``) and clipped statistics."""

from __future__ import annotations

import numpy as np
import sep
from scipy import fft as sfft
from scipy import ndimage

from ..errors import AlgorithmError

__all__ = ["clipped_mean", "noise_covariance", "variance_scale_factor"]


_MAX_SAMPLE = 1 << 20


def _sample(values: np.ndarray) -> np.ndarray:
    """Return at most ~1M values, on a fixed stride (statistics of big planes stay cheap)."""
    values = np.ravel(values)
    step = max(1, values.size // _MAX_SAMPLE)
    return values[::step]


def clipped_mean(values: np.ndarray, *, nsigma: float = 3.0, n_iter: int = 3,
                 good: tuple[np.ndarray, int] | None = None) -> float:
    """Return the 3-sigma clipped mean (3 iterations, as afw MEANCLIP).

    Planes of more than ~1M pixels are subsampled on a fixed stride. ``good`` is an optional
    ``(mask, bits)`` pair: only pixels with none of ``bits`` set in ``mask`` count (the mask is
    applied after the subsampling, so no full-size boolean plane is built).
    """
    values = _sample(values)
    if good is not None:
        mask, bits = good
        values = values[(_sample(mask) & bits) == 0]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    keep = np.ones(values.size, bool)
    for _ in range(n_iter):
        centre = np.median(values[keep])
        std = np.std(values[keep])
        keep = np.abs(values - centre) <= nsigma * std
    return float(np.mean(values[keep]))


def _background(image: np.ndarray, good: np.ndarray, bin_size: int) -> np.ndarray:
    """Return a smooth background (SEP mesh of ``bin_size``, masked pixels ignored)."""
    data = np.ascontiguousarray(np.where(good, image, 0.0), dtype=np.float32)
    size = max(8, min(bin_size, *image.shape))
    return sep.Background(data, mask=~good, bw=size, bh=size).back()


def _blocks(shape: tuple[int, int], *, block: int = 512, max_pixels: int = 1 << 21
            ) -> list[tuple[slice, slice]]:
    """Return blocks on diagonal stripes covering about ``max_pixels`` (all if small).

    Every row and every column of blocks is sampled (the stripe spacing never exceeds the
    number of block rows or columns), so the statistics see the whole field.
    """
    ny, nx = shape
    if ny * nx <= max_pixels:
        return [(slice(0, ny), slice(0, nx))]
    step = min(int(np.ceil(ny * nx / max_pixels)), -(-max(ny, nx) // block))
    return [(slice(y, min(y + block, ny)), slice(x, min(x + block, nx)))
            for i, y in enumerate(range(0, ny, block)) for j, x in enumerate(range(0, nx, block))
            if (i + j) % step == 0]


def _iqr_sigma(values: np.ndarray) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(0.741301109 * (q3 - q1))


def variance_scale_factor(image: np.ndarray, variance: np.ndarray,
                          bad: np.ndarray | tuple[np.ndarray, int], *, bin_size: int = 32,
                          limit: float = 10.0, what: str = "image") -> float:
    """Return the factor by which the variance plane underestimates the pixel noise.

    The IQR sigma of ``(image - background) / sqrt(variance)`` over unmasked pixels, squared;
    if above ``limit``, the image-based ratio ``IQR-var(image) / median(variance)``. ``bad`` is
    a boolean plane or a ``(mask, bits)`` pair (pixels with any of ``bits`` set are ignored).

    Raises
    ------
    AlgorithmError
        If both estimates exceed ``limit`` (the variance plane is unusable).
    """
    resid_parts, var_parts = [], []
    for sl in _blocks(image.shape):
        img, v = image[sl], variance[sl]
        masked = (bad[0][sl] & bad[1]) != 0 if isinstance(bad, tuple) else bad[sl]
        good = ~masked & np.isfinite(img) & np.isfinite(v) & (v > 0)
        if good.sum() < 100:
            continue
        resid_parts.append((img - _background(img, good, bin_size))[good])
        var_parts.append(v[good])
    if not resid_parts:
        return 1.0
    resid, var = np.concatenate(resid_parts), np.concatenate(var_parts)
    factor = _iqr_sigma(resid / np.sqrt(var)) ** 2
    if factor > limit:
        factor = _iqr_sigma(resid) ** 2 / float(np.median(var))
        if factor > limit:
            raise AlgorithmError(
                f"the {what} variance plane underestimates the pixel noise by a factor "
                f"{factor:.1f} (> {limit}); fix the variance plane (gain, read noise) before "
                "subtracting", metadata={"variance_factor": factor})
    return float(factor)


#: Variance of a unit normal truncated at +-3 sigma (the sky pixels are selected by |z| < 3).
_TRUNCATED_VARIANCE = 0.97333


def _lag_sums(values: np.ndarray, reach: int) -> np.ndarray:
    """Return ``sum_p v(p) v(p + d)`` for all lags ``|d_y|, |d_x| <= reach`` (zero-padded FFT)."""
    ny, nx = values.shape
    shape = (sfft.next_fast_len(ny + reach), sfft.next_fast_len(nx + reach))
    spectrum = sfft.rfft2(values, s=shape)
    full = sfft.irfft2(spectrum * np.conj(spectrum), s=shape)
    rows = np.r_[shape[0] - reach:shape[0], 0:reach + 1]
    cols = np.r_[shape[1] - reach:shape[1], 0:reach + 1]
    return full[np.ix_(rows, cols)]


def noise_covariance(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *,
                     max_lag: int = 2, bin_size: int = 32) -> np.ndarray:
    """Return the short-range pixel-noise autocovariance in units of the variance plane.

    ``z = (image - background) / sqrt(variance)`` is formed on sky pixels (unmasked, with no
    pixel within 2 px at more than 3 sigma), and its autocovariance (mean of
    ``z(p) z(p + d)`` over pairs of sky pixels, corrected for the 3-sigma truncation) is
    measured out to ``max_lag + 3``. Pixel-noise correlations from resampling (warping,
    drizzling) are short range; the slowly varying floor beyond ``max_lag + 1`` comes from
    faint undetected sources and background structure (signal common to both images), so its
    median over lags ``max_lag + 2`` and ``max_lag + 3`` is subtracted. White noise with a
    correct variance plane gives the identity kernel; resampled images have positive
    neighbours.

    Parameters
    ----------
    image, variance : numpy.ndarray
        The planes.
    bad : numpy.ndarray
        Boolean plane of pixels to ignore.
    max_lag : int, optional
        Largest lag (pixels) per axis of the returned kernel.
    bin_size : int, optional
        Background mesh (pixels).

    Returns
    -------
    numpy.ndarray
        ``(2 max_lag + 1, 2 max_lag + 1)`` symmetric covariance kernel (entry
        ``[max_lag + dy, max_lag + dx]`` for lag ``(dy, dx)``); the identity kernel when fewer
        than 1000 sky pixels are found.
    """
    reach = max_lag + 3
    sums = np.zeros((2 * reach + 1,) * 2)
    counts = np.zeros_like(sums)
    for sl in _blocks(image.shape, block=256, max_pixels=1 << 20):
        img, v = image[sl], variance[sl]
        good = ~bad[sl] & np.isfinite(img) & np.isfinite(v) & (v > 0)
        if good.sum() < 100:
            continue
        z = np.where(good, (img - _background(img, good, bin_size)) / np.sqrt(np.where(
            good, v, 1.0)), 0.0)
        sky = good & ~ndimage.binary_dilation(np.abs(z) >= 3.0, iterations=2)
        sums += _lag_sums(np.where(sky, z, 0.0), reach)
        counts += _lag_sums(sky.astype(float), reach)
    identity = np.zeros((2 * max_lag + 1,) * 2)
    identity[max_lag, max_lag] = 1.0
    if counts[reach, reach] < 1000:
        return identity
    covariance = sums / np.maximum(np.rint(counts), 1.0) / _TRUNCATED_VARIANCE
    covariance = 0.5 * (covariance + covariance[::-1, ::-1])
    lag = np.maximum(*np.abs(np.mgrid[-reach:reach + 1, -reach:reach + 1]))
    floor = float(np.median(covariance[lag >= max_lag + 2]))
    inner = slice(reach - max_lag, reach + max_lag + 1)
    return covariance[inner, inner] - floor
