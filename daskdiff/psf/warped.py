"""PSFs of resampled images: :class:`WarpedPsf` and the template's :class:`CoaddPsf`.

When an image is resampled from a source grid onto a destination grid, its PSF at a destination
position is the source PSF at the mapped source position, seen through the local linear part of
the mapping (the Jacobian ``J = d(u, v)/d(x, y)``). :class:`WarpedPsf` evaluates exactly that:
the destination stamp pixel at offset ``p`` from the stamp centre takes the source PSF model's
value at ``J p`` (Lanczos-3 interpolation of the source kernel image), and the result is
normalised to unit sum.

A template assembled from several inputs (patches of several tracts) has a PSF that depends on
which inputs cover a position; :class:`CoaddPsf` holds one component per input with the
destination box where that input has data, and averages the components covering a position with
equal weights (as LSST's CoaddPsf does for templates).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.wcs import WCS

from ..box import Box
from ..errors import InputError
from ..wcs import copy_wcs, pixel_to_sky, sky_to_pixel, wcs_from_string, wcs_to_string
from .base import Psf, psf_from_state, register_psf, stamp_box

__all__ = ["CoaddPsf", "WarpedPsf", "pixel_jacobian"]


def pixel_jacobian(src_wcs: WCS, dst_wcs: WCS, x: float, y: float, *, step: float = 0.5
                   ) -> tuple[tuple[float, float], np.ndarray]:
    """Return the source position of destination ``(x, y)`` and ``d(u, v)/d(x, y)`` there."""
    px = np.array([x, x + step, x - step, x, x])
    py = np.array([y, y, y, y + step, y - step])
    ra, dec = pixel_to_sky(dst_wcs, px, py)
    u, v = sky_to_pixel(src_wcs, ra, dec)
    jac = np.array([[(u[1] - u[2]) / (2 * step), (u[3] - u[4]) / (2 * step)],
                    [(v[1] - v[2]) / (2 * step), (v[3] - v[4]) / (2 * step)]])
    return (float(u[0]), float(v[0])), jac


def _sample(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Lanczos-3 interpolation of ``image`` at positions (array index units); 0 outside."""
    from ..warp import kernel_weights

    ix = np.floor(xs).astype(int)
    iy = np.floor(ys).astype(int)
    wx = kernel_weights("lanczos3", xs - ix)
    wy = kernel_weights("lanczos3", ys - iy)
    padded = np.pad(image, 3)
    out = np.zeros(xs.shape)
    for j in range(6):
        for i in range(6):
            rows = np.clip(iy + j - 2 + 3, 0, padded.shape[0] - 1)
            cols = np.clip(ix + i - 2 + 3, 0, padded.shape[1] - 1)
            out += wy[j] * wx[i] * padded[rows, cols]
    return out


@register_psf
class WarpedPsf(Psf):
    """The PSF of an image resampled from ``src_wcs`` onto ``dst_wcs``.

    Parameters
    ----------
    psf : Psf
        The PSF model of the source image (source-frame positions).
    src_wcs, dst_wcs : astropy.wcs.WCS
        Parent-frame WCSs of the source and destination grids.
    box : Box
        The destination region where the model is meant to be used.
    """

    type_name = "warped"

    def __init__(self, psf: Psf, src_wcs: WCS, dst_wcs: WCS, box: Box) -> None:
        self.psf = psf
        self.src_wcs = copy_wcs(src_wcs)
        self.dst_wcs = copy_wcs(dst_wcs)
        self.box = box

    @property
    def center(self) -> tuple[float, float]:
        """The centre of the destination box."""
        return self.box.center

    def default_size(self) -> int:
        """Return the source model's stamp size, scaled by the local pixel-area ratio, odd."""
        _, jac = pixel_jacobian(self.src_wcs, self.dst_wcs, *self.center)
        scale = np.sqrt(abs(np.linalg.det(jac)))
        return int(np.ceil(self.psf.default_size() * max(scale, 1.0))) // 2 * 2 + 1

    def _render(self, x: float, y: float, size: int, fx: float, fy: float) -> np.ndarray:
        (u, v), jac = pixel_jacobian(self.src_wcs, self.dst_wcs, x, y)
        reach = np.abs(jac).sum(axis=1).max() * (size // 2 + 1)
        src_size = int(2 * np.ceil(reach) + 7) | 1
        kernel = self.psf.kernel_image(u, v, size=max(src_size, self.psf.default_size()))
        c = kernel.shape[0] // 2
        half = size // 2
        py, px = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
        px -= fx
        py -= fy
        src_x = c + jac[0, 0] * px + jac[0, 1] * py
        src_y = c + jac[1, 0] * px + jac[1, 1] * py
        image = _sample(kernel, src_x.ravel(), src_y.ravel()).reshape(size, size)
        total = image.sum()
        if not np.isfinite(total) or total <= 0:
            raise InputError(f"the warped PSF at ({x:.1f}, {y:.1f}) has no flux; the source PSF "
                             "or the WCS mapping is invalid there")
        return image / total

    def kernel_image(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """Return the PSF at ``(x, y)`` centred on the central pixel of an odd stamp, sum 1."""
        size = self.default_size() if size is None else int(size)
        stamp_box(x, y, size)  # validates the size
        return self._render(x, y, size, 0.0, 0.0)

    def image(self, x: float, y: float, *, size: int | None = None) -> tuple[np.ndarray, Box]:
        """Return the PSF centred exactly on ``(x, y)`` and its parent-frame box."""
        size = self.default_size() if size is None else int(size)
        box = stamp_box(x, y, size)
        cx, cy = box.center
        return self._render(x, y, size, x - cx, y - cy), box

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Serialise: the source model's state nested, the WCSs as header strings."""
        params, arrays = self.psf.to_state()
        return ({"type": self.type_name, "psf": params, "src_wcs": wcs_to_string(self.src_wcs),
                 "dst_wcs": wcs_to_string(self.dst_wcs), "box": self.box.to_list()},
                {f"psf/{k}": v for k, v in arrays.items()})

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> WarpedPsf:
        """Inverse of :meth:`to_state`."""
        inner = {k.removeprefix("psf/"): v for k, v in arrays.items() if k.startswith("psf/")}
        return cls(psf_from_state(params["psf"], inner), wcs_from_string(params["src_wcs"]),
                   wcs_from_string(params["dst_wcs"]), Box.from_list(params["box"]))


@register_psf
class CoaddPsf(Psf):
    """An equal-weight average of component PSFs, each valid inside its own box.

    Parameters
    ----------
    components : list of (Psf, Box)
        Each input's PSF (destination frame) and the destination box where it has data.
    box : Box
        The region of the whole image (for :attr:`center`).
    """

    type_name = "coadd"

    def __init__(self, components: list[tuple[Psf, Box]], box: Box) -> None:
        if not components:
            raise InputError("a CoaddPsf needs at least one component")
        self.components = list(components)
        self.box = box

    @property
    def center(self) -> tuple[float, float]:
        """The centre of the image box."""
        return self.box.center

    def __len__(self) -> int:
        return len(self.components)

    def default_size(self) -> int:
        """Return the largest component stamp size."""
        return max(psf.default_size() for psf, _ in self.components)

    def covering(self, x: float, y: float) -> list[Psf]:
        """Return the components whose box contains ``(x, y)`` (the nearest one if none does)."""
        found = [psf for psf, box in self.components if box.contains(x, y)]
        if found:
            return found
        distances = [np.hypot(x - box.center[0], y - box.center[1]) for _, box in self.components]
        return [self.components[int(np.argmin(distances))][0]]

    def kernel_image(self, x: float, y: float, *, size: int | None = None) -> np.ndarray:
        """Return the mean of the covering components' kernel images, sum 1."""
        size = self.default_size() if size is None else int(size)
        images = [psf.kernel_image(x, y, size=size) for psf in self.covering(x, y)]
        mean = np.mean(images, axis=0)
        return mean / mean.sum()

    def image(self, x: float, y: float, *, size: int | None = None) -> tuple[np.ndarray, Box]:
        """Return the mean of the covering components' sub-pixel-centred images."""
        size = self.default_size() if size is None else int(size)
        parts = [psf.image(x, y, size=size) for psf in self.covering(x, y)]
        mean = np.mean([p[0] for p in parts], axis=0)
        return mean / mean.sum(), parts[0][1]

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Serialise every component (arrays prefixed ``c<i>/``)."""
        params: dict[str, Any] = {"type": self.type_name, "box": self.box.to_list(),
                                  "components": []}
        arrays: dict[str, np.ndarray] = {}
        for i, (psf, box) in enumerate(self.components):
            p, a = psf.to_state()
            params["components"].append({"psf": p, "box": box.to_list()})
            arrays.update({f"c{i}/{k}": v for k, v in a.items()})
        return params, arrays

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> CoaddPsf:
        """Inverse of :meth:`to_state`."""
        components = []
        for i, item in enumerate(params["components"]):
            prefix = f"c{i}/"
            inner = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
            components.append((psf_from_state(item["psf"], inner), Box.from_list(item["box"])))
        return cls(components, Box.from_list(params["box"]))
