"""DMTN-021 decorrelation of an Alard-Lupton difference (spatially constant, tile-parallel).

With sigma_1^2 the variance of the unconvolved image, sigma_2^2 that of the convolved one
(before convolution) and K the matching kernel at the image centre (sum kappa), the filter

    phi(k) = sqrt[(sigma_1^2 + sigma_2^2 kappa^2) / (sigma_1^2 + sigma_2^2 |K(k)|^2)]

whitens the difference noise. It is applied in image space (its inverse FFT, a compact kernel)
with :func:`dask.array.map_overlap`; the variance becomes ``V1 mean|phi|^2 + V2 mean|K phi|^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft

__all__ = ["DecorrelationKernel", "decorrelation_kernel"]


@dataclass(frozen=True)
class DecorrelationKernel:
    """The image-space decorrelation kernel and the variance weights."""

    kernel: np.ndarray
    weight_unconvolved: float
    weight_convolved: float
    var_unconvolved: float
    var_convolved: float


def decorrelation_kernel(matching: np.ndarray, var_unconvolved: float, var_convolved: float,
                         *, size: int | None = None) -> DecorrelationKernel:
    """Return the decorrelation kernel for a matching kernel and the two mean variances.

    Parameters
    ----------
    matching : numpy.ndarray
        The matching kernel image (odd square).
    var_unconvolved, var_convolved : float
        Mean (clipped) variances sigma_1^2 and sigma_2^2.
    size : int, optional
        Edge of the returned kernel (odd); twice the matching kernel size plus one by default.

    Returns
    -------
    DecorrelationKernel
        Kernel (sums to 1) and the variance weights ``mean|phi|^2`` and ``mean|K phi|^2``.
    """
    k = matching.shape[0]
    size = size or 2 * k + 1
    n = sfft.next_fast_len(4 * max(size, k))
    padded = np.zeros((n, n))
    padded[:k, :k] = matching
    padded = np.roll(padded, (-(k // 2), -(k // 2)), axis=(0, 1))
    kft = sfft.fft2(padded)
    kappa = matching.sum()
    phi = np.sqrt((var_unconvolved + var_convolved * kappa**2)
                  / (var_unconvolved + var_convolved * np.abs(kft) ** 2))
    image = np.real(sfft.ifft2(phi))
    half = size // 2
    image = np.roll(image, (half, half), axis=(0, 1))[:size, :size]
    image /= image.sum()
    # the weights from the truncated kernels, so that the variance plane matches the pixels
    w1 = float(np.sum(image**2))
    eff = np.real(sfft.ifft2(sfft.fft2(np.pad(image, ((0, n - size), (0, n - size))))
                             * kft))
    w2 = float(np.sum(eff**2))
    return DecorrelationKernel(image, w1, w2, float(var_unconvolved), float(var_convolved))
