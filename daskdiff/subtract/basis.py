"""Kernel bases: Alard-Lupton Gaussians times polynomials, and delta functions.

The Alard-Lupton basis (Alard & Lupton 1998) is a set of Gaussians times 2-D monomials
``x**j * y**k`` (``j + k <= degree``, with ``x`` and ``y`` scaled to ``[-1, 1]`` across the
kernel). It is renormalised so that the first basis sums to 1 and every other one sums to 0 with
unit L2 norm: the coefficient of the first basis is then the kernel sum (the photometric scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AlgorithmError
from .config import AlardLuptonConfig

__all__ = ["BasisPlan", "SeparableBasis", "alard_lupton_basis", "delta_function_basis",
           "laplacian_penalty", "make_basis", "plan_basis", "separable_alard_lupton",
           "renormalize"]


@dataclass(frozen=True)
class BasisPlan:
    """The basis sigmas, degrees and kernel size chosen for a pair of PSF sizes."""

    sigmas: tuple[float, ...]
    degrees: tuple[int, ...]
    size: int
    mode: str  # "config", "convolution" or "deconvolution"


def _odd(value: int) -> int:
    return value if value % 2 else value + 1


def plan_basis(target_sigma: float, reference_sigma: float, *, config: AlardLuptonConfig
               ) -> BasisPlan:
    """Choose the basis sigmas and kernel size (LSST ``_calculateBasisSigmas``).

    Parameters
    ----------
    target_sigma : float
        PSF sigma (px) of the image the kernel must reproduce (the unconvolved one).
    reference_sigma : float
        PSF sigma (px) of the image being convolved.
    config : AlardLuptonConfig
        The stage configuration.

    Raises
    ------
    AlgorithmError
        If the matching kernel needed is wider than the largest kernel allows.
    """
    degrees = tuple(config.deg_gauss)
    n = config.n_gauss
    if config.kernel_basis == "delta-function":
        return BasisPlan((), (), _odd(config.kernel_size), "delta-function")
    if not config.scale_by_fwhm or np.isclose(target_sigma, reference_sigma, rtol=1e-3):
        return BasisPlan(tuple(config.sig_gauss), degrees, _odd(config.kernel_size), "config")
    deconvolve = reference_sigma > target_sigma
    wide, narrow = max(target_sigma, reference_sigma), min(target_sigma, reference_sigma)
    floor = config.min_sigma_deconv if deconvolve else config.min_sigma
    sigma_k = max(float(np.sqrt(wide**2 - narrow**2)), floor)
    half_max = config.kernel_size_max // 2
    if 3.0 * sigma_k > half_max:
        raise AlgorithmError(
            f"the PSFs differ too much to match: the matching kernel needs sigma {sigma_k:.2f} px "
            f"(PSF sigmas {target_sigma:.2f} and {reference_sigma:.2f} px) but a "
            f"{config.kernel_size_max}-px kernel holds at most sigma {half_max / 3:.2f}; raise "
            "kernel_size_max or use a template of closer seeing",
            metadata={"sigma_kernel": sigma_k, "kernel_size_max": config.kernel_size_max})
    first = max(floor, sigma_k / config.gauss_beta)
    sigmas = tuple(first * config.gauss_beta**i for i in range(n))
    size = _odd(int(config.kernel_size_fwhm_scaling * sigmas[-1]))
    size = int(np.clip(size, _odd(config.kernel_size_min), _odd(config.kernel_size_max)))
    return BasisPlan(sigmas, degrees, size, "deconvolution" if deconvolve else "convolution")


def renormalize(basis: np.ndarray) -> np.ndarray:
    """Make the first basis sum to 1 and the others sum to 0 with unit L2 norm."""
    out = np.array(basis, dtype=np.float64)
    out[0] /= out[0].sum()
    for i in range(1, len(out)):
        out[i] -= out[i].sum() * out[0]
        norm = np.sqrt(np.sum(out[i] ** 2))
        if norm > 0:
            out[i] /= norm
    return out


@dataclass(frozen=True)
class SeparableBasis:
    """An AL basis as separable raw kernels and the renormalising linear map.

    Raw kernel ``r`` is ``outer(ky[gauss[r]][:, py[r]], kx[gauss[r]][:, px[r]])`` and the
    renormalised basis is ``transform @ raw`` (so convolutions can be done on the raw, separable
    kernels and mapped afterwards).
    """

    kx: tuple[np.ndarray, ...]     # per Gaussian: (size, degree + 1) 1-D kernels g(u) u**p
    gauss: np.ndarray              # (n,) Gaussian index of each raw kernel
    px: np.ndarray                 # (n,) power of x
    py: np.ndarray                 # (n,) power of y
    transform: np.ndarray          # (n, n)

    def raw(self) -> np.ndarray:
        """Return the raw (un-normalised) kernels ``(n, size, size)``."""
        return np.stack([np.outer(self.kx[g][:, b], self.kx[g][:, a])
                         for g, a, b in zip(self.gauss, self.px, self.py, strict=True)])

    def images(self) -> np.ndarray:
        """Return the renormalised basis images."""
        return np.tensordot(self.transform, self.raw(), axes=(1, 0))


def separable_alard_lupton(sigmas: tuple[float, ...], degrees: tuple[int, ...], size: int
                           ) -> SeparableBasis:
    """Return the AL basis in separable form (see :class:`SeparableBasis`)."""
    half = size // 2
    u = np.arange(-half, half + 1, dtype=np.float64)
    kx, gauss, px, py = [], [], [], []
    for g, (sigma, degree) in enumerate(zip(sigmas, degrees, strict=True)):
        base = np.exp(-(u**2) / (2.0 * sigma**2))
        kx.append(np.stack([base * (u / half) ** p for p in range(degree + 1)], axis=1))
        for total in range(degree + 1):
            for j in range(total, -1, -1):
                gauss.append(g)
                px.append(j)
                py.append(total - j)
    sep = SeparableBasis(tuple(kx), np.array(gauss), np.array(px), np.array(py),
                         np.eye(len(gauss)))
    raw = sep.raw()
    n = len(raw)
    sums = raw.sum(axis=(1, 2))
    transform = np.zeros((n, n))
    transform[0, 0] = 1.0 / sums[0]
    first = raw[0] / sums[0]
    for i in range(1, n):
        image = raw[i] - sums[i] * first
        vec = -sums[i] * transform[0]
        vec[i] += 1.0
        norm = np.sqrt(np.sum(image**2))
        transform[i] = vec / norm if norm > 0 else vec
    return SeparableBasis(sep.kx, sep.gauss, sep.px, sep.py, transform)


def alard_lupton_basis(sigmas: tuple[float, ...], degrees: tuple[int, ...], size: int
                       ) -> np.ndarray:
    """Return the renormalised AL basis, ``(n, size, size)`` with ``n = sum((d+1)(d+2)/2)``."""
    return separable_alard_lupton(sigmas, degrees, size).images()


def delta_function_basis(size: int) -> np.ndarray:
    """Return a delta-function basis: the central delta, then ``delta_i - delta_centre``."""
    n = size * size
    basis = np.zeros((n, size, size))
    centre = n // 2
    order = [centre, *[i for i in range(n) if i != centre]]
    for k, i in enumerate(order):
        basis.reshape(n, n)[k, i] = 1.0
    return renormalize(basis)


def laplacian_penalty(size: int) -> np.ndarray:
    """Return ``H^T H`` of a 5-point Laplacian on the delta-basis coefficients (first excluded).

    The coefficients of the renormalised delta basis are (up to a common factor) kernel pixel
    values relative to the centre, so a Laplacian on them penalises a rough kernel.
    """
    n = size * size
    centre = n // 2
    order = [centre, *[i for i in range(n) if i != centre]]
    where = {pix: k for k, pix in enumerate(order)}
    rows = []
    for iy in range(size):
        for ix in range(size):
            row = np.zeros(n)
            row[where[iy * size + ix]] += 4.0
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                jy, jx = iy + dy, ix + dx
                if 0 <= jy < size and 0 <= jx < size:
                    row[where[jy * size + jx]] -= 1.0
            rows.append(row)
    h = np.array(rows)
    h[:, 0] = 0.0
    return h.T @ h


def make_basis(plan: BasisPlan, *, config: AlardLuptonConfig) -> np.ndarray | SeparableBasis:
    """Return the basis for a plan: separable AL, or delta-function images."""
    if config.kernel_basis == "delta-function":
        return delta_function_basis(plan.size)
    return separable_alard_lupton(plan.sigmas, plan.degrees, plan.size)
