"""Variance-plane rescaling (LSST ``ScaleVarianceTask``) and clipped statistics."""

from __future__ import annotations

import numpy as np
import sep

from ..errors import AlgorithmError

__all__ = ["clipped_mean", "variance_scale_factor"]


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

    Every row and every column of blocks is sampled, so the statistics see the whole field.
    """
    ny, nx = shape
    if ny * nx <= max_pixels:
        return [(slice(0, ny), slice(0, nx))]
    step = int(np.ceil(ny * nx / max_pixels))
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
