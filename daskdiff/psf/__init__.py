"""PSF models: the interface, analytic models, the pixel (PSFEx-like) model and estimation."""

from .base import Psf, psf_from_state, register_psf

__all__ = ["Psf", "psf_from_state", "register_psf"]
