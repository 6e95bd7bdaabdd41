"""A PSFEx-like spatially varying pixel PSF model.

The PSF at parent-frame position ``(x, y)`` is a sum of component images weighted by the
monomials of the position normalised to ``[-1, 1]`` over the model's box
(:func:`~daskdiff.psf.base.normalized_position`)::

    P(x, y) = sum_k m_k(X, Y) C_k,    m = [1, X, Y, X², XY, Y², X³, X²Y, ...]

(all ``X**i * Y**j`` with ``i + j <= degree``, ordered by total degree and then by decreasing
power of ``X``). The components are sampled at the native pixel scale; this needs a
well-sampled PSF (FWHM >= ~2.5 px), which holds for the survey data this pipeline targets.
Undersampled data would need PSFEx's oversampled basis, which this model does not implement.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..box import Box
from ..errors import AlgorithmError, ConfigError, InputError
from .base import Psf, normalized_position, register_psf, stamp_box
from .measure import lanczos_shift

__all__ = ["PixelPsf", "fit_components", "monomials", "n_terms"]


def n_terms(degree: int) -> int:
    """Return the number of monomials ``X**i * Y**j`` with ``i + j <= degree``."""
    return (degree + 1) * (degree + 2) // 2


def _degree_of(count: int) -> int:
    degree = 0
    while n_terms(degree) < count:
        degree += 1
    if n_terms(degree) != count:
        raise InputError(
            f"PixelPsf: {count} components is not a full 2-D polynomial basis "
            "(1, 3, 6, 10, ... components for degree 0, 1, 2, 3, ...)"
        )
    return degree


def monomials(
    box: Box, degree: int, x: float | np.ndarray, y: float | np.ndarray
) -> np.ndarray:
    """Return the monomials of the normalised position, shape ``(n_terms(degree), *x.shape)``.

    Parameters
    ----------
    box : Box
        Box over which positions are normalised to ``[-1, 1]``.
    degree : int
        Total polynomial degree.
    x, y : float or numpy.ndarray
        Parent-frame positions.
    """
    xn, yn = normalized_position(box, x, y)
    xn, yn = np.broadcast_arrays(xn, yn)
    terms = [xn ** (d - j) * yn**j for d in range(degree + 1) for j in range(d + 1)]
    return np.stack(terms).astype(float)


def fit_components(
    stamps: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    box: Box,
    *,
    degree: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Fit the component images to centred, unit-flux stamps by linear least squares.

    Each pixel is fitted independently: ``stamps[i, p] ~ sum_k m_k(x_i, y_i) C_k[p]``.

    Parameters
    ----------
    stamps : numpy.ndarray
        ``(n, S, S)`` stamps, each centred on its central pixel and normalised to unit flux.
    x, y : numpy.ndarray
        The ``n`` parent-frame positions of the stamps.
    box : Box
        Normalisation box of the model.
    degree : int
        Polynomial degree.
    weights : numpy.ndarray, optional
        ``(n, S, S)`` inverse variances (0 for pixels to ignore); uniform if omitted.

    Returns
    -------
    numpy.ndarray
        ``(n_terms(degree), S, S)`` components.

    Raises
    ------
    AlgorithmError
        If there are fewer stamps than terms or the system is singular (e.g. every stamp at
        the same position).
    """
    stamps = np.asarray(stamps, dtype=float)
    n, ny, nx = stamps.shape
    design = monomials(box, degree, np.asarray(x, float), np.asarray(y, float)).T  # (n, K)
    nk = design.shape[1]
    if n < nk:
        raise AlgorithmError(
            f"cannot fit a degree-{degree} PSF ({nk} terms) to {n} stars; lower the degree or "
            "use more stars",
            metadata={"n_stars": n, "n_terms": nk},
        )
    data = stamps.reshape(n, -1)
    if weights is None:
        if np.linalg.matrix_rank(design) < nk:
            raise AlgorithmError(
                f"the {n} star positions do not constrain a degree-{degree} PSF; lower the "
                "degree", metadata={"n_stars": n, "n_terms": nk})
        solution, *_ = np.linalg.lstsq(design, data, rcond=None)
        return solution.reshape(nk, ny, nx)
    w = np.asarray(weights, dtype=float).reshape(n, -1)
    normal = np.einsum("ip,ik,il->pkl", w, design, design)
    rhs = np.einsum("ip,ip,ik->pk", w, data, design)
    # a tiny ridge keeps pixels with (almost) no weighted data solvable; they come out ~0
    scale = np.trace(normal, axis1=1, axis2=2)[:, None, None] / nk
    ridge = 1e-10 * np.maximum(scale, np.max(scale) * 1e-6) * np.eye(nk)
    try:
        solution = np.linalg.solve(normal + ridge, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError as error:
        raise AlgorithmError(f"PSF component fit is singular ({error}); lower the degree",
                             metadata={"n_stars": n, "n_terms": nk}) from error
    return solution.T.reshape(nk, ny, nx)


@register_psf
class PixelPsf(Psf):
    """A spatially varying pixel PSF: component images times position monomials.

    Parameters
    ----------
    components : numpy.ndarray
        ``(n_terms, S, S)`` component images (``S`` odd), in the monomial order of
        :func:`monomials`; ``n_terms`` must be 1, 3, 6, 10, ... (degree 0, 1, 2, 3, ...).
    box : Box
        The region over which positions are normalised (usually the detector).

    Notes
    -----
    :meth:`kernel_image` evaluates the polynomial and normalises to unit sum; :meth:`image`
    shifts that kernel by the sub-pixel offset with a Lanczos-5 kernel, whose interpolation
    error is below 0.2 % of the peak for PSFs with FWHM >= 2.5 px (see the tests).
    """

    type_name = "pixel"

    def __init__(self, components: np.ndarray, box: Box) -> None:
        components = np.array(components, dtype=float)
        if components.ndim == 2:
            components = components[None]
        if components.ndim != 3 or components.shape[1] != components.shape[2]:
            raise InputError(f"PixelPsf components must be (n_terms, S, S), got "
                             f"{components.shape}")
        if components.shape[1] % 2 == 0:
            raise InputError(f"PixelPsf stamp size must be odd, got {components.shape[1]}")
        if not np.all(np.isfinite(components)):
            raise InputError("PixelPsf components hold non-finite values")
        if not isinstance(box, Box) or box.is_empty:
            raise InputError(f"PixelPsf needs a non-empty Box, got {box!r}")
        self._degree = _degree_of(components.shape[0])
        self._components = components
        self._components.setflags(write=False)
        self._box = box

    @classmethod
    def from_psf(
        cls,
        psf: Psf,
        box: Box,
        *,
        degree: int = 2,
        size: int | None = None,
        grid: int = 5,
    ) -> PixelPsf:
        """Sample another model on a ``grid x grid`` set of positions and fit the components.

        Parameters
        ----------
        psf : Psf
            The model to represent.
        box : Box
            The region covered (positions span its pixel centres edge to edge).
        degree : int, optional
            Polynomial degree of the spatial variation.
        size : int, optional
            Stamp edge; ``psf.default_size()`` if omitted.
        grid : int, optional
            Sample positions per axis.

        Returns
        -------
        PixelPsf
            The least-squares pixel model of ``psf``.
        """
        if degree < 0 or grid < 1 or grid * grid < n_terms(degree) or (degree > 0 and grid < 2):
            raise ConfigError(
                f"PixelPsf.from_psf: a {grid} x {grid} grid cannot constrain a degree-{degree} "
                f"model ({n_terms(degree)} terms); use grid >= {degree + 1}"
            )
        size = psf.default_size() if size is None else size
        xs = np.linspace(box.x0, box.x1 - 1, grid) if grid > 1 else np.array([box.center[0]])
        ys = np.linspace(box.y0, box.y1 - 1, grid) if grid > 1 else np.array([box.center[1]])
        gx, gy = (a.ravel() for a in np.meshgrid(xs, ys))
        stamps = np.stack([psf.kernel_image(x, y, size=size) for x, y in zip(gx, gy, strict=True)])
        return cls(fit_components(stamps, gx, gy, box, degree=degree), box)

    @property
    def components(self) -> np.ndarray:
        """The read-only component cube ``(n_terms, S, S)``."""
        return self._components

    @property
    def degree(self) -> int:
        """Polynomial degree of the spatial variation."""
        return self._degree

    @property
    def box(self) -> Box:
        """The normalisation box."""
        return self._box

    @property
    def center(self) -> tuple[float, float]:
        """The centre of the box."""
        return self._box.center

    def default_size(self) -> int:
        """Return the component stamp edge."""
        return int(self._components.shape[1])

    def evaluate(self, x: float, y: float) -> np.ndarray:
        """Return the raw (unnormalised) model ``sum_k m_k C_k`` at a position."""
        terms = monomials(self._box, self._degree, float(x), float(y))
        return np.tensordot(terms, self._components, axes=1)

    def kernel_image(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """Return the model at ``(x, y)`` on an odd stamp (cropped or zero-padded), sum 1.

        Raises
        ------
        AlgorithmError
            If the model has no positive flux at that position (far outside its box).
        """
        image = self.evaluate(x, y)
        image = _resize(image, self.default_size() if size is None else size)
        total = image.sum()
        if not total > 0:
            raise AlgorithmError(
                f"PixelPsf has no positive flux at ({x}, {y}); the position is probably far "
                f"outside the model's box {self._box}",
                metadata={"x": float(x), "y": float(y)},
            )
        return image / total

    def image(self, x: float, y: float, *, size: int | None = None) -> tuple[np.ndarray, Box]:
        """Return the model shifted (Lanczos-5) to be centred exactly on ``(x, y)``."""
        size = self.default_size() if size is None else size
        box = stamp_box(x, y, size)
        kernel = self.kernel_image(x, y, size=size)
        dx = float(x) - (box.x0 + size // 2)
        dy = float(y) - (box.y0 + size // 2)
        pad = 6
        shifted = lanczos_shift(np.pad(kernel, pad), dx, dy, order=5)
        return shifted[pad:-pad, pad:-pad], box

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return the box and degree as params and the component cube as ``components``."""
        params = {"type": self.type_name, "box": self._box.to_list(), "degree": self._degree,
                  "size": self.default_size()}
        return params, {"components": np.array(self._components)}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> PixelPsf:
        """Inverse of :meth:`to_state`."""
        if "components" not in arrays:
            raise InputError("PixelPsf state lacks its 'components' array")
        psf = cls(arrays["components"], Box.from_list(params["box"]))
        if "degree" in params and int(params["degree"]) != psf.degree:
            raise InputError(f"PixelPsf state says degree {params['degree']} but its "
                             f"components give degree {psf.degree}")
        return psf

    def __repr__(self) -> str:
        return (f"PixelPsf(degree={self._degree}, size={self.default_size()}, "
                f"box={self._box.to_list()})")


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad a centred odd stamp to ``size``."""
    if int(size) != size or size <= 0 or size % 2 == 0:
        raise ConfigError(f"PSF stamp size must be a positive odd integer, got {size!r}")
    current = image.shape[0]
    if size == current:
        return image.copy()
    if size < current:
        cut = (current - size) // 2
        return image[cut:cut + size, cut:cut + size].copy()
    pad = (size - current) // 2
    return np.pad(image, pad)
