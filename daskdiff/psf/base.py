"""The PSF interface shared by every model.

A PSF model is evaluated at parent-frame pixel positions. Two images are offered:

- :meth:`Psf.kernel_image`: the PSF centred on the central pixel of an odd square stamp
  (the fractional part of the position is ignored), normalised to sum 1. This is what
  convolution kernels and matched filters use.
- :meth:`Psf.image`: the PSF centred exactly on ``(x, y)`` (sub-pixel), on a stamp whose
  central pixel is the pixel containing ``(x, y)``, with that stamp's parent-frame box. This is
  what PSF photometry and source rendering use.

Models serialise to ``(params, arrays)``: a JSON-able dict that names the model type and a dict
of numpy arrays. :func:`psf_from_state` rebuilds any registered model, so FITS and zarr I/O
need no knowledge of the concrete models.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np

from ..box import Box
from ..errors import InputError

__all__ = ["Psf", "normalized_position", "psf_from_state", "register_psf", "stamp_box"]

_REGISTRY: dict[str, type[Psf]] = {}


def register_psf(cls: type[Psf]) -> type[Psf]:
    """Class decorator: make a PSF model type known to :func:`psf_from_state`."""
    _REGISTRY[cls.type_name] = cls
    return cls


def psf_from_state(params: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> Psf:
    """Rebuild a PSF model from :meth:`Psf.to_state` output.

    Raises
    ------
    InputError
        If the model type is unknown.
    """
    type_name = params.get("type")
    cls = _REGISTRY.get(str(type_name))
    if cls is None:
        raise InputError(f"unknown PSF model type {type_name!r}; known: {sorted(_REGISTRY)}")
    return cls.from_state(params, arrays or {})


class Psf(abc.ABC):
    """Abstract PSF model over a detector (positions in parent-frame pixels)."""

    #: Name under which the model is serialised.
    type_name: ClassVar[str] = ""

    @abc.abstractmethod
    def kernel_image(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """Return the PSF at ``(x, y)`` centred on the central pixel of an odd stamp.

        Parameters
        ----------
        x, y : float
            Parent-frame position at which the model is evaluated.
        size : int, optional
            Stamp edge (odd); :meth:`default_size` if omitted.

        Returns
        -------
        numpy.ndarray
            ``(size, size)`` float64 image summing to 1.
        """

    @abc.abstractmethod
    def image(self, x: float, y: float, *, size: int | None = None) -> tuple[np.ndarray, Box]:
        """Return the PSF centred exactly on ``(x, y)`` and its parent-frame box.

        The stamp's central pixel is ``(round(x), round(y))``; the image sums to 1 (up to the
        flux outside the stamp).
        """

    @abc.abstractmethod
    def default_size(self) -> int:
        """Return the default (odd) stamp edge in pixels."""

    @abc.abstractmethod
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return ``(params, arrays)``; ``params["type"]`` is :attr:`type_name`."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Psf:
        """Inverse of :meth:`to_state`."""

    @property
    @abc.abstractmethod
    def center(self) -> tuple[float, float]:
        """A representative position ``(x, y)`` (e.g. the centre of the detector)."""

    def moments(self, x: float | None = None, y: float | None = None) -> tuple[float, float, float]:
        """Return the second moments ``(ixx, iyy, ixy)`` in pixels² at a position.

        Gaussian-weighted adaptive moments (as HSM / LSST's SdssShape), so that they are finite
        for wide-winged models; for a Gaussian PSF they equal its covariance.
        """
        from .measure import adaptive_moments

        x, y = self._position(x, y)
        return adaptive_moments(self.kernel_image(x, y))

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Return the FWHM in pixels at a position, measured on the model image."""
        from .measure import measure_fwhm

        x, y = self._position(x, y)
        return measure_fwhm(self.kernel_image(x, y, size=_fwhm_stamp(self.default_size())))

    def sigma(self, x: float | None = None, y: float | None = None) -> float:
        """Return the determinant radius ``(ixx*iyy - ixy²)^(1/4)`` in pixels."""
        ixx, iyy, ixy = self.moments(x, y)
        return float((ixx * iyy - ixy * ixy) ** 0.25)

    def _position(self, x: float | None, y: float | None) -> tuple[float, float]:
        cx, cy = self.center
        return (cx if x is None else float(x), cy if y is None else float(y))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Psf) or type(other) is not type(self):
            return NotImplemented
        p1, a1 = self.to_state()
        p2, a2 = other.to_state()
        return p1 == p2 and a1.keys() == a2.keys() and all(
            np.array_equal(a1[k], a2[k]) for k in a1
        )

    __hash__ = None  # type: ignore[assignment]


def _fwhm_stamp(size: int) -> int:
    return max(size, 25) | 1


def stamp_box(x: float, y: float, size: int) -> Box:
    """Return the parent-frame box of an odd stamp centred on the pixel containing ``(x, y)``."""
    if size % 2 == 0 or size <= 0:
        raise InputError(f"PSF stamp size must be odd and positive, got {size}")
    half = size // 2
    cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    return Box(cx - half, cy - half, size, size)


def normalized_position(
    box: Box, x: float | np.ndarray, y: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Map parent-frame positions to ``[-1, 1]`` over a box (outer pixel edges map to ±1).

    Spatially varying models (the polynomial fields of the analytic models and the components
    of :class:`~daskdiff.psf.pixel.PixelPsf`) are polynomials in these coordinates; positions
    outside the box give values beyond ±1 (the polynomial is extrapolated).

    Parameters
    ----------
    box : Box
        The box over which the model is defined (usually the detector).
    x, y : float or numpy.ndarray
        Parent-frame positions.

    Returns
    -------
    tuple of numpy.ndarray
        ``(X, Y)`` normalised coordinates.
    """
    if box.is_empty:
        raise InputError(f"a spatially varying PSF needs a non-empty box, got {box}")
    xn = 2.0 * (np.asarray(x, dtype=float) - (box.x0 - 0.5)) / box.width - 1.0
    yn = 2.0 * (np.asarray(y, dtype=float) - (box.y0 - 0.5)) / box.height - 1.0
    return xn, yn
