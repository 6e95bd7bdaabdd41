"""Kernel-source selection: bright, unresolved, isolated, unmasked stars spread over cells.

Sources come from a catalogue (``x``, ``y`` and optionally ``flux``, ``flux_err`` columns, e.g.
a reference catalogue) or from a detection on the science image (SEP). They are cut on PSF-flux
S/N (10 to 500), size (unresolved), isolation (no blend or close neighbour) and masks (no
excluded plane in either image within the stamp), then spread over cells (at most 5 per
128-px cell) and capped (at most 1000, highest S/N first).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sep
from astropy.table import Table

from ..box import Box
from ..errors import AlgorithmError
from ._compiled import detection_planes
from .config import AlardLuptonConfig

__all__ = ["detect_sources", "select_kernel_sources"]


def _gaussian_stamp(sigma: float, half: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    u = np.arange(-half, half + 1, dtype=np.float64)
    gx = np.exp(-0.5 * ((u[None, :] - dx[:, None]) / sigma) ** 2)
    gy = np.exp(-0.5 * ((u[None, :] - dy[:, None]) / sigma) ** 2)
    return gy[:, :, None] * gx[:, None, :]


def _refine(image: np.ndarray, bad: np.ndarray, xs: np.ndarray, ys: np.ndarray, half: int = 2
            ) -> tuple[np.ndarray, np.ndarray]:
    """Refine positions with the first moment of the positive pixels in a small window."""
    ny, nx = image.shape
    ix = np.clip(np.round(xs).astype(int), half, nx - half - 1)
    iy = np.clip(np.round(ys).astype(int), half, ny - half - 1)
    offsets = np.arange(-half, half + 1)
    rows = iy[:, None, None] + offsets[None, :, None]
    cols = ix[:, None, None] + offsets[None, None, :]
    win = np.where(bad[rows, cols], 0.0, image[rows, cols])
    win = win - np.median(win.reshape(len(ix), -1), axis=1)[:, None, None]
    w = np.clip(np.nan_to_num(win), 0, None)
    total = np.maximum(w.sum(axis=(1, 2)), 1e-30)
    dx = (w * offsets[None, None, :]).sum(axis=(1, 2)) / total
    dy = (w * offsets[None, :, None]).sum(axis=(1, 2)) / total
    return ix + dx, iy + dy


def detect_sources(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *,
                   origin: tuple[int, int], psf_sigma: float, threshold: float = 5.0
                   ) -> Table:
    """Detect sources with SEP (background-subtracted, ``threshold`` sigma).

    Images larger than 2048 x 2048 are detected 2 x 2 binned (4 times fewer pixels; point
    sources gain S/N) and the positions refined at full resolution.

    Returns
    -------
    astropy.table.Table
        ``x``, ``y`` (parent frame) and ``blended`` per detection.
    """
    binned = image.size > (1 << 22) and psf_sigma > 1.0
    data_d, var_d, good_d = detection_planes(image, variance, bad, 2 if binned else 1)
    err = np.sqrt(np.where(good_d, var_d, np.float32(np.inf)))
    back = sep.Background(data_d, mask=~good_d, bw=64, bh=64)
    sep.set_extract_pixstack(max(300000, data_d.size // 4))
    sep.set_sub_object_limit(4096)
    try:  # SEP's default 3x3 filter: cheap, and the S/N cut is made later by PSF photometry
        objects = sep.extract(data_d - back.back(), threshold, err=err, mask=~good_d,
                              minarea=5, deblend_cont=0.005)
    except Exception as error:  # SEP raises bare Exceptions on buffer overflows
        raise AlgorithmError(f"source detection on the science image failed: {error}; the "
                             "image may be dominated by artefacts (check its masks)") from None
    xs, ys = objects["x"], objects["y"]
    if binned:
        xs, ys = _refine(image, bad, 2.0 * xs + 0.5, 2.0 * ys + 0.5)
    return Table({"x": xs + origin[0], "y": ys + origin[1],
                  "blended": (objects["flag"] & sep.OBJ_MERGED) != 0})


def _stamp_stack(image: np.ndarray, origin: tuple[int, int], xs: np.ndarray, ys: np.ndarray,
                 half: int) -> np.ndarray:
    side = 2 * half + 1
    out = np.zeros((len(xs), side, side))
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        r, c = int(y) - origin[1] - half, int(x) - origin[0] - half
        out[k] = image[r:r + side, c:c + side]
    return out


def _psf_photometry(image: np.ndarray, variance: np.ndarray, origin: tuple[int, int],
                    xs: np.ndarray, ys: np.ndarray, psf_sigma: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return PSF flux, its error and the weighted-size excess over the PSF, per source."""
    half = max(int(np.ceil(4 * psf_sigma)), 3)
    ix, iy = np.round(xs).astype(int), np.round(ys).astype(int)
    dx, dy = xs - ix, ys - iy
    d = _stamp_stack(image, origin, ix, iy, half)
    v = _stamp_stack(variance, origin, ix, iy, half)
    ring = np.ones(d.shape[1:], bool)
    ring[1:-1, 1:-1] = False
    d = d - np.median(d[:, ring], axis=1)[:, None, None]
    p = _gaussian_stamp(psf_sigma, half, dx, dy)
    p /= p.sum(axis=(1, 2), keepdims=True)
    pp = np.sum(p * p, axis=(1, 2))
    flux = np.sum(p * d, axis=(1, 2)) / pp
    err = np.sqrt(np.sum(p * p * v, axis=(1, 2))) / pp
    u = np.arange(-half, half + 1, dtype=np.float64)
    r2 = (u[None, None, :] - dx[:, None, None]) ** 2 + (u[None, :, None] - dy[:, None, None]) ** 2
    size = np.sum(p * d * r2, axis=(1, 2)) / np.maximum(np.sum(p * d, axis=(1, 2)), 1e-30)
    size_psf = np.sum(p * p * r2, axis=(1, 2)) / pp
    return flux, err, size / size_psf - 1.0


def _clean_stamps(masks: list[tuple[np.ndarray, tuple[int, int]]], xs: np.ndarray,
                  ys: np.ndarray, half: int) -> np.ndarray:
    ok = np.ones(len(xs), bool)
    side = 2 * half + 1
    for mask, (ox, oy) in masks:
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if ok[k]:
                r, c = int(y) - oy - half, int(x) - ox - half
                ok[k] = not mask[r:r + side, c:c + side].any()
    return ok


def _spread_over_cells(xs: np.ndarray, ys: np.ndarray, snr: np.ndarray, box: Box, *,
                       cell: int, per_cell: int) -> np.ndarray:
    cells = ((ys - box.y0) // cell).astype(int) * 100000 + ((xs - box.x0) // cell).astype(int)
    order = np.lexsort((-snr, cells))
    keep = np.zeros(len(xs), bool)
    rank = 0
    for k, idx in enumerate(order):
        rank = 0 if k == 0 or cells[idx] != cells[order[k - 1]] else rank + 1
        keep[idx] = rank < per_cell
    return keep


def select_kernel_sources(science: dict[str, Any], reference: dict[str, Any], *,
                          box: Box, psf_sigma: float, kernel_size: int,
                          config: AlardLuptonConfig, catalog: Table | None = None) -> Table:
    """Select the kernel sources.

    Parameters
    ----------
    science, reference : dict
        ``image``, ``variance`` (numpy), ``bad`` (boolean: an excluded plane is set) and
        ``origin`` ``(x0, y0)`` of the science image and of the other image; optionally
        ``cosmic`` (boolean: CR plane) for the science image.
    box : Box
        The region in which stamps must lie entirely (the science box within the other image).
    psf_sigma : float
        Science PSF sigma (px).
    kernel_size : int
        The kernel size; stamps are ``2 * kernel_size + 1`` wide.
    config : AlardLuptonConfig
        Cuts and limits.
    catalog : astropy.table.Table, optional
        Candidate positions (``x``, ``y``; ``flux`` and ``flux_err`` for the S/N cut).

    Returns
    -------
    astropy.table.Table
        The selected sources: ``x``, ``y`` (integer stamp centres), ``x_src``, ``y_src``,
        ``snr``, ``flux``.

    Raises
    ------
    AlgorithmError
        Fewer than ``config.min_kernel_sources`` sources pass the cuts.
    """
    origin = science["origin"]
    if catalog is None:
        found = detect_sources(science["image"], science["variance"], science["bad"],
                               origin=origin, psf_sigma=psf_sigma,
                               threshold=min(5.0, config.source_snr_min))
        xs, ys = np.asarray(found["x"], float), np.asarray(found["y"], float)
        blended = np.asarray(found["blended"], bool)
    else:
        xs, ys = np.asarray(catalog["x"], float), np.asarray(catalog["y"], float)
        blended = np.zeros(len(xs), bool)
    counts: dict[str, int] = {"n_detected": len(xs)}
    half = kernel_size
    inner = box.grow(-(half + (kernel_size if config.restrict_kernel_edge_sources else 0)))
    inside = np.asarray(inner.contains(np.round(xs), np.round(ys)), bool) if not inner.is_empty \
        else np.zeros(len(xs), bool)
    # phot stamps need 4 sigma of room; the stamp check above guarantees it
    xs_in, ys_in = xs[inside], ys[inside]
    flux, err, excess = _psf_photometry(science["image"], science["variance"], origin,
                                        xs_in, ys_in, psf_sigma)
    if catalog is not None and "flux" in catalog.colnames and "flux_err" in catalog.colnames:
        flux = np.asarray(catalog["flux"], float)[inside]
        err = np.asarray(catalog["flux_err"], float)[inside]
    snr = flux / np.where(err > 0, err, np.inf)
    sel = np.ones(len(xs_in), bool)
    sel &= (snr >= config.source_snr_min) & (snr <= config.source_snr_max)
    counts["n_snr"] = int(sel.sum())
    if catalog is None:  # unresolved: neither extended nor sharper than the PSF (cosmic rays)
        sel &= (excess < config.max_extendedness) & (excess > -0.5)
        counts["n_unresolved"] = int(sel.sum())
    fwhm = 2.3548 * psf_sigma
    dist2 = (xs_in[:, None] - xs[None, :]) ** 2 + (ys_in[:, None] - ys[None, :]) ** 2
    neighbours = np.sum(dist2 < (2 * fwhm) ** 2, axis=1) - 1
    sel &= (neighbours == 0) & ~blended[inside]
    counts["n_isolated"] = int(sel.sum())
    ix, iy = np.round(xs_in).astype(int), np.round(ys_in).astype(int)
    idx = np.flatnonzero(sel)
    clean = _clean_stamps([(science["bad"], origin), (reference["bad"], reference["origin"])],
                          ix[idx], iy[idx], half)
    if "cosmic" in science:  # a cosmic ray on the source itself: not a star
        core = max(1, int(np.ceil(fwhm / 2)))
        clean &= _clean_stamps([(science["cosmic"], origin)], ix[idx], iy[idx], core)
    sel[idx[~clean]] = False
    counts["n_unmasked"] = int(sel.sum())
    idx = np.flatnonzero(sel)
    spread = _spread_over_cells(ix[idx], iy[idx], snr[idx], box, cell=config.cell_size,
                                per_cell=config.n_star_per_cell)
    idx = idx[spread]
    idx = idx[np.argsort(-snr[idx], kind="stable")][:config.max_kernel_sources]
    counts["n_selected"] = len(idx)
    if len(idx) < config.min_kernel_sources:
        raise AlgorithmError(
            f"too few kernel sources: {len(idx)} pass the cuts, at least "
            f"{config.min_kernel_sources} are needed ({counts}); the image may have too few "
            "unsaturated stars, or the template may not cover it",
            metadata={"error": "InsufficientKernelSources", **counts})
    return Table({"x": ix[idx], "y": iy[idx], "x_src": xs_in[idx], "y_src": ys_in[idx],
                  "snr": snr[idx], "flux": flux[idx]}, meta={"counts": counts})
