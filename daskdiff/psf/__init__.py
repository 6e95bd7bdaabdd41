"""PSF models: the interface, analytic models, the pixel (PSFEx-like) model and estimation."""

from .analytic import DEFAULT_MOFFAT_BETA, GaussianPsf, MoffatPsf
from .base import Psf, normalized_position, psf_from_state, register_psf, stamp_box
from .estimate import PsfEstimate, estimate_psf, estimate_psf_details
from .measure import adaptive_moments, adaptive_shape, centroid, lanczos_shift, measure_fwhm
from .pixel import PixelPsf

__all__ = [
    "DEFAULT_MOFFAT_BETA",
    "GaussianPsf",
    "MoffatPsf",
    "PixelPsf",
    "Psf",
    "PsfEstimate",
    "adaptive_moments",
    "adaptive_shape",
    "centroid",
    "estimate_psf",
    "estimate_psf_details",
    "lanczos_shift",
    "measure_fwhm",
    "normalized_position",
    "psf_from_state",
    "register_psf",
    "stamp_box",
]
