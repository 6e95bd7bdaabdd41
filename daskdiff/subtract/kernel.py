"""The spatially varying PSF-matching kernel: a solution that can be evaluated anywhere.

``K(x, y) = a_0 B_0 + sum_{i>=1} a_i(x, y) B_i`` where the ``B_i`` are the basis images and
``a_i(x, y) = sum_t c_it T_t(x, y)`` are Chebyshev polynomials (products ``T_m(x') T_n(y')``,
``m + n <= order``, of positions scaled to ``[-1, 1]`` over the fit box). ``a_0`` is spatially
constant, so the kernel sum (the photometric scale) is the same everywhere. The differential
background is a Chebyshev polynomial of its own order over the same box.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..box import Box
from ..errors import InputError

__all__ = ["KernelSolution", "chebyshev_terms", "n_terms", "scaled_position"]


def n_terms(order: int) -> int:
    """Return the number of 2-D polynomial terms of total degree ``<= order``."""
    return (order + 1) * (order + 2) // 2


def scaled_position(box: Box, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Map parent positions to ``[-1, 1]`` across a box (pixel centres of the edges)."""
    sx = max(box.width - 1, 1) / 2.0
    sy = max(box.height - 1, 1) / 2.0
    return ((np.asarray(x, float) - (box.x0 + sx)) / sx,
            (np.asarray(y, float) - (box.y0 + sy)) / sy)


def chebyshev_terms(order: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Return ``T_m(xs) T_n(ys)`` for ``m + n <= order``, stacked on a new first axis."""
    tx = [np.ones_like(xs), xs]
    ty = [np.ones_like(ys), ys]
    for _ in range(2, order + 1):
        tx.append(2 * xs * tx[-1] - tx[-2])
        ty.append(2 * ys * ty[-1] - ty[-2])
    return np.stack([tx[total - n] * ty[n] for total in range(order + 1)
                     for n in range(total + 1)])


@dataclass(frozen=True)
class KernelSolution:
    """A fitted spatially varying matching kernel and differential background.

    Parameters
    ----------
    basis : numpy.ndarray
        ``(n_basis, size, size)`` basis images (first sums to 1, others to 0).
    constant : float
        Coefficient of the first basis: the kernel sum.
    spatial : numpy.ndarray
        ``(n_basis - 1, n_terms(kernel_order))`` Chebyshev coefficients of the other bases.
    background : numpy.ndarray
        ``(n_terms(bg_order),)`` Chebyshev coefficients of the differential background (counts
        of the unconvolved image); empty when no background was fitted.
    box : Box
        The box over which positions are scaled to ``[-1, 1]``.
    kernel_order, bg_order : int
        Chebyshev orders.
    convolved : str
        ``"template"`` or ``"science"``: the image the kernel is applied to.
    stats : dict
        Fit diagnostics (condition number, candidates used and rejected, ...).
    """

    basis: np.ndarray
    constant: float
    spatial: np.ndarray
    background: np.ndarray
    box: Box
    kernel_order: int
    bg_order: int
    convolved: str = "template"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Kernel edge (px, odd)."""
        return int(self.basis.shape[-1])

    @property
    def half_width(self) -> int:
        """Kernel half-width: the halo of the tile-parallel convolution."""
        return self.size // 2

    @property
    def kernel_sum(self) -> float:
        """The (spatially constant) kernel sum: the photometric scale."""
        return float(self.constant * self.basis[0].sum())

    def coefficients(self, x: Any, y: Any) -> np.ndarray:
        """Return the basis coefficients ``(n_basis, ...)`` at parent positions."""
        xs, ys = scaled_position(self.box, x, y)
        terms = chebyshev_terms(self.kernel_order, xs, ys)
        rest = np.tensordot(self.spatial, terms, axes=(1, 0))
        first = np.full((1, *np.shape(xs)), self.constant)
        return np.concatenate([first, rest])

    def kernel_image(self, x: float, y: float) -> np.ndarray:
        """Return the kernel image at a parent position."""
        coeffs = self.coefficients(float(x), float(y))
        return np.tensordot(coeffs, self.basis, axes=(0, 0))

    def term_kernels(self) -> np.ndarray:
        """Return ``K_t = sum_i c_it B_i`` per spatial term ``t`` (``K = sum_t T_t K_t``)."""
        kernels = np.tensordot(self.spatial.T, self.basis[1:], axes=(1, 0))
        kernels[0] += self.constant * self.basis[0]
        return kernels

    def background_at(self, x: Any, y: Any) -> np.ndarray:
        """Return the differential background at parent positions (0 if none was fitted)."""
        if self.background.size == 0:
            return np.zeros(np.shape(x))
        xs, ys = scaled_position(self.box, x, y)
        return np.tensordot(self.background, chebyshev_terms(self.bg_order, xs, ys),
                            axes=(0, 0))

    def report(self) -> dict[str, Any]:
        """Return the JSON-able diagnostics: kernel sum, condition number, candidate counts."""
        cx, cy = self.box.center
        return {"kernel_sum": self.kernel_sum, "kernel_size": self.size,
                "n_basis": int(self.basis.shape[0]), "kernel_order": self.kernel_order,
                "bg_order": self.bg_order, "convolved": self.convolved,
                "background_centre": float(self.background_at(cx, cy)), **self.stats}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict from which :meth:`from_dict` rebuilds the solution."""
        return {"type": "alard-lupton-spatial", "basis": self.basis.tolist(),
                "constant": self.constant, "spatial": self.spatial.tolist(),
                "background": self.background.tolist(), "box": self.box.to_list(),
                "kernel_order": self.kernel_order, "bg_order": self.bg_order,
                "convolved": self.convolved, "stats": self.stats}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelSolution:
        """Rebuild a solution written by :meth:`to_dict`."""
        if data.get("type") != "alard-lupton-spatial":
            raise InputError(f"not a kernel solution (type {data.get('type')!r}); expected a "
                             "dict written by KernelSolution.to_dict()")
        basis = np.asarray(data["basis"], dtype=np.float64)
        return cls(basis=basis, constant=float(data["constant"]),
                   spatial=np.asarray(data["spatial"], dtype=np.float64).reshape(
                       basis.shape[0] - 1, n_terms(int(data["kernel_order"]))),
                   background=np.asarray(data["background"], dtype=np.float64),
                   box=Box.from_list(data["box"]), kernel_order=int(data["kernel_order"]),
                   bg_order=int(data["bg_order"]), convolved=str(data["convolved"]),
                   stats=dict(data.get("stats", {})))
