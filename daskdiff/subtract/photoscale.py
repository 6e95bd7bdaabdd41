"""The photometric scale: the kernel sum corrected for the flux a finite kernel cannot move.

A matching kernel of finite support built from a few Gaussians cannot reproduce the extended
wings of a realistic PSF (a Moffat profile with beta = 3.5 keeps 1.5 % of its flux beyond
2.3 FWHM). Fitted to stars, such a kernel matches the cores and leaves the outer wings
unmatched, so its sum is *below* the ratio of the two images' calibrations, by the same
fraction for every star: 0.6-0.7 % for the DC2-like seeing of the simulator with the default
basis. The difference image is not affected (its residual is the faint unmatched wing), but
the sum is then a biased estimate of the photometric scale.

The bias is a property of the two PSFs and the basis, not of the data, so it is measured on the
PSF models: the same basis is fitted, with the same stamps and the same uniform weighting, to a
noise-free pair of unit-flux PSF images (normalised over a stamp large enough to hold their
wings). Its kernel sum ``kappa_model`` is the fraction of a star's flux the basis can move, and

    photometric_scale = kernel_sum / kappa_model.

``kappa_model`` is 1 when the basis can represent the true kernel, so nothing changes for
Gaussian PSFs; it is reported as ``kernel_sum_model`` in the subtraction QA.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .basis import SeparableBasis
from .config import AlardLuptonConfig
from .fit import build_systems, regularisation_penalty, solve_candidates

__all__ = ["model_kernel_sum", "unit_psf_image"]

#: The model PSFs are normalised over a stamp this many times wider than the fit needs.
_NORMALISATION_FACTOR = 3


def unit_psf_image(psf: Any, x: float, y: float, size: int) -> np.ndarray:
    """Return the PSF model at ``(x, y)`` on an odd ``size`` stamp, with unit total flux.

    The model is normalised over a stamp :data:`_NORMALISATION_FACTOR` times wider, so the
    wings beyond ``size`` count, then cut to ``size``.
    """
    wide = _NORMALISATION_FACTOR * size
    wide += 1 - wide % 2
    image = np.asarray(psf.kernel_image(x, y, size=wide), dtype=float)
    image = image / image.sum()
    cut = (wide - size) // 2
    return image[cut:cut + size, cut:cut + size]


def model_kernel_sum(target_psf: Any, reference_psf: Any, basis: np.ndarray | SeparableBasis,
                     *, position: tuple[float, float], config: AlardLuptonConfig) -> float:
    """Return the kernel sum of the basis fitted to the two unit-flux PSF models.

    Parameters
    ----------
    target_psf, reference_psf : Psf
        The PSF of the unconvolved ("target") image and of the convolved ("reference") image.
    basis : numpy.ndarray or SeparableBasis
        The basis of the data fit.
    position : tuple of float
        Parent ``(x, y)`` where both models are evaluated (the science box centre).
    config : AlardLuptonConfig
        The subtraction config (background term, regularisation).

    Returns
    -------
    float
        The model kernel sum: the fraction of a point source's flux the basis can match.
    """
    images = basis if isinstance(basis, np.ndarray) else basis.images()
    size = images.shape[-1]
    half = size // 2
    side_target = 2 * size + 1            # the fit's stamp (see build_systems)
    side_reference = 2 * (size + half) + 1
    x, y = position
    centre = side_reference // 2
    target = np.zeros((side_reference, side_reference))
    target[half:half + side_target, half:half + side_target] = unit_psf_image(
        target_psf, x, y, side_target)
    reference = unit_psf_image(reference_psf, x, y, side_reference)
    ones = np.ones_like(reference)
    systems = build_systems({"image": target, "variance": ones, "origin": (0, 0)},
                            {"image": reference, "variance": ones, "origin": (0, 0)},
                            np.array([centre]), np.array([centre]), basis,
                            fit_background=config.fit_for_background)
    penalty = regularisation_penalty(images, systems.normal.shape[1], config=config)
    coefficients = solve_candidates(systems, penalty)[0]
    return float(np.dot(coefficients[:images.shape[0]], images.sum(axis=(1, 2))))
