"""Analytic PSF models rendered with GalSim: :class:`GaussianPsf` and :class:`MoffatPsf`.

Both models are a circular profile of a given FWHM, sheared by a reduced shear ``(g1, g2)``
(GalSim's ``shear``, which preserves area, so the FWHM is the geometric mean of the major and
minor axis FWHM), and drawn with GalSim's ``method="auto"``: convolved with the unit pixel
response. The images are therefore the *effective* (pixel-convolved) PSF, exactly what a
simulator that draws ``psf.galsim_profile(x, y)`` with ``method="auto"`` puts on an image.

Spatial variation
-----------------
Each of ``fwhm``, ``g1`` and ``g2`` is either a number (constant over the detector) or the
coefficient array ``c`` of a 2-D polynomial in the position normalised to ``[-1, 1]`` over a
``box`` (see :func:`~daskdiff.psf.base.normalized_position`)::

    value(x, y) = sum_ij c[i, j] * X**i * Y**j

(the convention of :func:`numpy.polynomial.polynomial.polyval2d`). For example
``fwhm=[[4.0, 0.2], [0.4, 0.0]]`` is a FWHM of 4 px at the centre of the box that grows by
0.4 px towards the right edge and by 0.2 px towards the top edge. Any order is accepted;
order <= 2 is typical. Positions outside the box extrapolate the polynomial.

Units: the FWHM is in pixels and is the FWHM of the profile *before* the pixel response; the
measured :meth:`~daskdiff.psf.base.Psf.fwhm` of the drawn (pixel-convolved) image is larger
(by about 3.5 % at 2.5 px for a Gaussian, 0.4 % at 8 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import galsim
import numpy as np
from numpy.polynomial import polynomial as npoly

from ..box import Box
from ..errors import ConfigError
from .base import Psf, normalized_position, register_psf, stamp_box

__all__ = ["DEFAULT_MOFFAT_BETA", "GaussianPsf", "MoffatPsf", "evaluate_field"]

#: Default Moffat index: a typical ground-based seeing profile (Kolmogorov is close to 4.8,
#: the wings of real PSFs are usually heavier; 3.5 is the common compromise).
DEFAULT_MOFFAT_BETA = 3.5

#: FWHM to Gaussian sigma.
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

#: Smallest default stamp edge (pixels).
MIN_STAMP_SIZE = 21

Field = float | Sequence[Sequence[float]] | np.ndarray


def _as_field(name: str, value: Any) -> float | np.ndarray:
    """Validate a scalar or a 2-D polynomial coefficient array."""
    array = np.asarray(value, dtype=float)
    if array.ndim == 0:
        if not np.isfinite(array):
            raise ConfigError(f"PSF parameter {name} must be finite, got {value!r}")
        return float(array)
    if array.ndim != 2 or array.size == 0:
        raise ConfigError(
            f"PSF parameter {name} must be a number or a 2-D array of polynomial coefficients "
            f"c[i, j] of X**i * Y**j; got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"PSF parameter {name} has non-finite coefficients: {array.tolist()}")
    return array.copy()


def _field_to_json(value: float | np.ndarray) -> float | list:
    return value if isinstance(value, float) else value.tolist()


def evaluate_field(
    value: float | np.ndarray, box: Box | None, x: float | np.ndarray, y: float | np.ndarray
) -> float | np.ndarray:
    """Evaluate a constant or polynomial parameter field at parent-frame positions.

    Parameters
    ----------
    value : float or numpy.ndarray
        A constant, or the coefficients ``c[i, j]`` of ``X**i * Y**j``.
    box : Box or None
        The box over which ``X, Y`` span ``[-1, 1]`` (needed for polynomial fields).
    x, y : float or numpy.ndarray
        Positions.

    Returns
    -------
    float or numpy.ndarray
        The field at the positions (a float for scalar positions).
    """
    if isinstance(value, float):
        shape = np.broadcast(np.asarray(x), np.asarray(y)).shape
        return value if shape == () else np.full(shape, value)
    xn, yn = normalized_position(box, x, y)  # type: ignore[arg-type]
    result = npoly.polyval2d(xn, yn, value)
    return float(result) if np.ndim(result) == 0 else result


class _GalSimPsf(Psf):
    """Shared machinery of the GalSim-rendered analytic models."""

    def __init__(
        self,
        fwhm: Field,
        *,
        g1: Field = 0.0,
        g2: Field = 0.0,
        box: Box | None = None,
        size: int | None = None,
    ) -> None:
        self._fwhm = _as_field("fwhm", fwhm)
        self._g1 = _as_field("g1", g1)
        self._g2 = _as_field("g2", g2)
        varying = any(not isinstance(v, float) for v in (self._fwhm, self._g1, self._g2))
        if varying and box is None:
            raise ConfigError(
                f"{type(self).__name__}: polynomial (spatially varying) parameters need the "
                "box over which they are defined; pass box=Box(x0, y0, width, height)"
            )
        if box is not None and (not isinstance(box, Box) or box.is_empty):
            raise ConfigError(f"{type(self).__name__}: box must be a non-empty Box, got {box!r}")
        self._box = box
        if size is not None and (int(size) != size or size <= 0 or size % 2 == 0):
            raise ConfigError(f"{type(self).__name__}: size must be a positive odd integer, "
                              f"got {size!r}")
        self._size = None if size is None else int(size)
        self._check_ranges()

    # -- parameters ------------------------------------------------------------------------

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        if self._box is None:
            return np.zeros(1), np.zeros(1)
        b = self._box
        gx, gy = np.meshgrid(np.linspace(b.x0, b.x1 - 1, 9), np.linspace(b.y0, b.y1 - 1, 9))
        return gx.ravel(), gy.ravel()

    def _check_ranges(self) -> None:
        gx, gy = self._grid()
        fwhm = np.atleast_1d(evaluate_field(self._fwhm, self._box, gx, gy))
        if np.any(fwhm <= 0):
            raise ConfigError(
                f"{type(self).__name__}: the FWHM must be positive everywhere in the box "
                f"{self._box}; its minimum there is {fwhm.min():.4g} px. Check the coefficients."
            )
        g1 = np.atleast_1d(evaluate_field(self._g1, self._box, gx, gy))
        g2 = np.atleast_1d(evaluate_field(self._g2, self._box, gx, gy))
        if np.any(np.hypot(g1, g2) >= 1):
            raise ConfigError(
                f"{type(self).__name__}: the reduced shear |g| must be < 1 everywhere in the "
                f"box; it reaches {np.hypot(g1, g2).max():.4g}. Check the g1/g2 coefficients."
            )

    @property
    def box(self) -> Box | None:
        """The box over which polynomial parameters are normalised (``None`` if constant)."""
        return self._box

    @property
    def is_varying(self) -> bool:
        """Whether any parameter varies across the box."""
        return any(not isinstance(v, float) for v in (self._fwhm, self._g1, self._g2))

    def profile_fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Return the FWHM parameter (pixels, before the pixel response) at a position."""
        x, y = self._position(x, y)
        return float(evaluate_field(self._fwhm, self._box, x, y))

    def shear(self, x: float | None = None, y: float | None = None) -> tuple[float, float]:
        """Return the reduced shear ``(g1, g2)`` at a position."""
        x, y = self._position(x, y)
        return (float(evaluate_field(self._g1, self._box, x, y)),
                float(evaluate_field(self._g2, self._box, x, y)))

    def _max_fwhm(self) -> float:
        gx, gy = self._grid()
        return float(np.max(evaluate_field(self._fwhm, self._box, gx, gy)))

    @property
    def center(self) -> tuple[float, float]:
        """The centre of the box (``(0, 0)`` for a constant model without a box)."""
        return self._box.center if self._box is not None else (0.0, 0.0)

    # -- rendering -------------------------------------------------------------------------

    def _round_profile(self, fwhm: float) -> galsim.GSObject:
        raise NotImplementedError

    def galsim_profile(self, x: float | None = None, y: float | None = None) -> galsim.GSObject:
        """Return the unit-flux GalSim profile (without the pixel) at a position.

        Drawing it with ``drawImage(..., scale=1, method="auto")`` gives exactly this model's
        images (before their normalisation to unit sum).
        """
        x, y = self._position(x, y)
        g1, g2 = self.shear(x, y)
        profile = self._round_profile(self.profile_fwhm(x, y))
        if g1 != 0.0 or g2 != 0.0:
            profile = profile.shear(g1=g1, g2=g2)
        return profile

    def _draw(self, x: float, y: float, size: int, offset: tuple[float, float]) -> np.ndarray:
        image = self.galsim_profile(x, y).drawImage(
            nx=size, ny=size, scale=1.0, method="auto", offset=offset, dtype=np.float64
        )
        array = image.array
        return array / array.sum()

    def kernel_image(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """Return the PSF at ``(x, y)`` centred on the central pixel, normalised to sum 1.

        Parameters
        ----------
        x, y : float
            Parent-frame position at which the parameters are evaluated.
        size : int, optional
            Odd stamp edge; :meth:`default_size` if omitted.

        Returns
        -------
        numpy.ndarray
            ``(size, size)`` float64 image summing to exactly 1.
        """
        size = self._stamp_size(size)
        return self._draw(x, y, size, (0.0, 0.0))

    def image(self, x: float, y: float, *, size: int | None = None) -> tuple[np.ndarray, Box]:
        """Return the PSF centred exactly on ``(x, y)`` and its parent-frame box.

        The profile is drawn with GalSim's sub-pixel ``offset`` (no interpolation) and the
        stamp is normalised to sum 1.
        """
        size = self._stamp_size(size)
        box = stamp_box(x, y, size)
        cx, cy = box.x0 + size // 2, box.y0 + size // 2
        return self._draw(x, y, size, (float(x) - cx, float(y) - cy)), box

    def _stamp_size(self, size: int | None) -> int:
        size = self.default_size() if size is None else size
        if int(size) != size or size <= 0 or size % 2 == 0:
            raise ConfigError(f"PSF stamp size must be a positive odd integer, got {size!r}")
        return int(size)

    def _size_per_fwhm(self) -> float:
        return 3.0

    def default_size(self) -> int:
        """Return the stamp edge: ``2 * ceil(k * max FWHM) + 1``, at least 21.

        ``k`` is 3 for the Gaussian and 4 for the Moffat (wider wings); the FWHM is the largest
        over the box, so every position of a varying model has the same default stamp.
        """
        if self._size is not None:
            return self._size
        half = int(np.ceil(self._size_per_fwhm() * self._max_fwhm()))
        return max(2 * half + 1, MIN_STAMP_SIZE)

    # -- state -----------------------------------------------------------------------------

    def _common_state(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "fwhm": _field_to_json(self._fwhm),
            "g1": _field_to_json(self._g1),
            "g2": _field_to_json(self._g2),
            "box": None if self._box is None else self._box.to_list(),
            "size": self._size,
        }

    @staticmethod
    def _common_kwargs(params: dict[str, Any]) -> dict[str, Any]:
        box = params.get("box")
        return {
            "g1": params.get("g1", 0.0),
            "g2": params.get("g2", 0.0),
            "box": None if box is None else Box.from_list(box),
            "size": params.get("size"),
        }

    def __repr__(self) -> str:
        params, _ = self.to_state()
        params.pop("type")
        inner = ", ".join(f"{k}={v!r}" for k, v in params.items() if v is not None)
        return f"{type(self).__name__}({inner})"


@register_psf
class GaussianPsf(_GalSimPsf):
    """An elliptical Gaussian PSF, optionally varying across a detector.

    Parameters
    ----------
    fwhm : float or array-like, optional
        FWHM in pixels (before the pixel response), or polynomial coefficients over ``box``.
    sigma : float or array-like, optional
        Alternatively the Gaussian sigma (pixels); give exactly one of ``fwhm`` and ``sigma``.
    g1, g2 : float or array-like, optional
        Reduced shear (constant or polynomial coefficients); 0 by default (round).
    box : Box, optional
        The region (usually the detector) over which polynomial coefficients are normalised;
        required when any parameter is an array.
    size : int, optional
        Default stamp edge (odd); ``2 * ceil(3 * max FWHM) + 1`` but at least 21 if omitted.

    Raises
    ------
    ConfigError
        If both or neither of ``fwhm`` and ``sigma`` are given, a parameter is not positive
        (FWHM) or not below 1 (|g|) somewhere in the box, or a polynomial lacks its box.

    Examples
    --------
    >>> psf = GaussianPsf(sigma=2.0, g1=0.05)
    >>> psf.kernel_image(100.0, 200.0).shape
    (21, 21)
    """

    type_name = "gaussian"

    def __init__(
        self,
        fwhm: Field | None = None,
        *,
        sigma: Field | None = None,
        g1: Field = 0.0,
        g2: Field = 0.0,
        box: Box | None = None,
        size: int | None = None,
    ) -> None:
        if (fwhm is None) == (sigma is None):
            raise ConfigError("GaussianPsf needs exactly one of fwhm= and sigma= (pixels)")
        if fwhm is None:
            fwhm = _as_field("sigma", sigma)
            fwhm = fwhm * FWHM_PER_SIGMA
        super().__init__(fwhm, g1=g1, g2=g2, box=box, size=size)

    def profile_sigma(self, x: float | None = None, y: float | None = None) -> float:
        """Return the Gaussian sigma parameter (pixels, before the pixel response)."""
        return self.profile_fwhm(x, y) / FWHM_PER_SIGMA

    def _round_profile(self, fwhm: float) -> galsim.GSObject:
        return galsim.Gaussian(fwhm=fwhm)

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return ``(params, {})``: the parameters are JSON lists/floats."""
        return self._common_state(), {}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> GaussianPsf:
        """Inverse of :meth:`to_state`."""
        return cls(params["fwhm"], **cls._common_kwargs(params))


@register_psf
class MoffatPsf(_GalSimPsf):
    """An elliptical Moffat PSF, optionally varying across a detector.

    The radial profile is ``(1 + (r / alpha)**2) ** -beta`` with ``alpha`` set by the FWHM.

    Parameters
    ----------
    fwhm : float or array-like
        FWHM in pixels (before the pixel response), or polynomial coefficients over ``box``.
    beta : float, optional
        Moffat index (> 1.1; constant), :data:`DEFAULT_MOFFAT_BETA` = 3.5 by default. Smaller
        values give heavier wings.
    g1, g2 : float or array-like, optional
        Reduced shear (constant or polynomial coefficients); 0 by default (round).
    box : Box, optional
        The region over which polynomial coefficients are normalised; required when any
        parameter is an array.
    size : int, optional
        Default stamp edge (odd); ``2 * ceil(4 * max FWHM) + 1`` but at least 21 if omitted.

    Raises
    ------
    ConfigError
        If ``beta <= 1.1`` (untruncated Moffat profiles need a finite flux), or as for
        :class:`GaussianPsf`.

    Examples
    --------
    >>> from daskdiff.box import Box
    >>> psf = MoffatPsf([[4.0, 0.2], [0.4, 0.0]], beta=3.0, g1=[[0.0], [0.05]],
    ...                 box=Box(0, 0, 2048, 2048))
    >>> round(psf.profile_fwhm(2047.0, 1023.5), 3)
    4.4
    """

    type_name = "moffat"

    def __init__(
        self,
        fwhm: Field,
        *,
        beta: float = DEFAULT_MOFFAT_BETA,
        g1: Field = 0.0,
        g2: Field = 0.0,
        box: Box | None = None,
        size: int | None = None,
    ) -> None:
        beta = float(beta)
        if not np.isfinite(beta) or beta <= 1.1:
            raise ConfigError(f"MoffatPsf beta must be > 1.1 (finite flux), got {beta!r}")
        self._beta = beta
        super().__init__(fwhm, g1=g1, g2=g2, box=box, size=size)

    @property
    def beta(self) -> float:
        """The Moffat index."""
        return self._beta

    def _size_per_fwhm(self) -> float:
        return 4.0

    def _round_profile(self, fwhm: float) -> galsim.GSObject:
        return galsim.Moffat(beta=self._beta, fwhm=fwhm)

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return ``(params, {})``: the parameters are JSON lists/floats."""
        params = self._common_state()
        params["beta"] = self._beta
        return params, {}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> MoffatPsf:
        """Inverse of :meth:`to_state`."""
        return cls(params["fwhm"], beta=params.get("beta", DEFAULT_MOFFAT_BETA),
                   **cls._common_kwargs(params))
