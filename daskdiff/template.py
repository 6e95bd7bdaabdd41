"""The template stage: a template on the science exposure's pixel grid.

Three variants (DESIGN §1), all returning a lazy exposure on the science box grown by
``border`` pixels, with the science WCS:

- **GetTemplate** (:func:`assemble_template`, or :func:`get_template` with a repository): the
  coadd patches whose outer boxes overlap the detector, in any number of tracts, are merged per
  tract on the tract grid, each tract's merge is warped onto the science grid, and the tracts are
  merged. The merge weights each good pixel by ``variance ** -0.5`` and averages the variances
  with the same weights (overlapping patches share their input data); masks are OR-ed over the
  good inputs; pixels with no good input are NO_DATA with finite (zero) image and variance.
  With ``tract_merge="nearest"`` (the default) each pixel takes the tract whose centre is
  nearest, and a tract is warped only where it owns pixels or is within one ownership sample
  (16 px) of them (its fallback band along the seam), so the warp costs about one detector.
  The merges, the warp and HIGH_VARIANCE run in compiled (numba) loops.
- **GetDcrTemplate** (:class:`GetDcrTemplateConfig`): each patch is built from its DCR
  sub-filter coadds, each shifted by its differential chromatic refraction for the science
  visit (see :mod:`daskdiff.dcr`) and summed; then the same merge and warp.
- **Any exposure as a template** (:func:`get_template` with an exposure): another visit or a
  plain image with a WCS, warped onto the science grid.

The template's PSF is a :class:`~daskdiff.psf.warped.CoaddPsf` of the inputs' PSFs seen through
the local WCS Jacobians; HIGH_VARIANCE flags pixels whose binned-median variance model exceeds
``high_variance_threshold`` times its median.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, Literal

import dask.array as da
import numba
import numpy as np
import xarray as xr
from pydantic import Field, model_validator
from scipy import ndimage

from ._tiles import regrid, tilewise3
from .box import Box
from .config import StageConfig
from .dcr import dcr_shifts, shift_image
from .errors import InputError, NoWorkError
from .exposure import (
    DEFAULT_TILE_SIZE,
    exposure_box,
    get_mask_planes,
    get_photo_calib,
    get_psf,
    get_visit_info,
    make_exposure,
    require_wcs,
)
from .masks import combine
from .metadata import PhotoCalib, VisitInfo
from .psf.warped import CoaddPsf, WarpedPsf
from .warp import KERNELS, warp_exposure
from .wcs import local_jacobian, pixel_scale, pixel_to_sky, sky_polygon, sky_to_pixel

__all__ = [
    "ExposureTemplateConfig",
    "GetDcrTemplateConfig",
    "GetTemplateConfig",
    "assemble_template",
    "build_dcr_patch",
    "get_template",
    "high_variance_mask",
    "merge_exposures",
    "template_coverage",
]

WarpKernel = Literal["nearest", "bilinear", "lanczos2", "lanczos3", "lanczos4", "lanczos5"]

#: Mask planes ignored when modelling the variance for HIGH_VARIANCE (as LSST's).
HIGH_VARIANCE_IGNORE = ("BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA")


class GetTemplateConfig(StageConfig):
    """Configuration of GetTemplate (and of "any exposure as a template")."""

    coadd_name: str = Field("goodSeeing", pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
                            description="coadd name: the dataset type is {coaddName}Coadd")
    border: int = Field(20, ge=0, description="pixels added around the science box")
    warp_kernel: WarpKernel = Field("lanczos3", description="resampling kernel")
    interp_length: int = Field(50, ge=1, le=1000,
                               description="spacing (px) of exact WCS evaluations when warping")
    conserve_flux: bool = Field(
        True, description="scale warped pixels by the pixel-area ratio so that source fluxes "
        "(and a constant photometric calibration) are preserved; false conserves surface "
        "brightness (LSST's warping, where the calibration carries the pixel area)")
    high_variance_threshold: float = Field(4.0, ge=1.0,
                                           description="HIGH_VARIANCE above this x median")
    high_variance_mask_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="skip HIGH_VARIANCE below this unmasked fraction")
    high_variance_bin_size: int = Field(32, ge=4, description="bin size (px) of the model")
    tract_merge: Literal["nearest", "weighted"] = Field(
        "nearest", description="where tracts overlap: take the tract whose centre is nearest "
        "(no seam in the noise) or average them with variance**-0.5 weights (LSST)")
    min_coverage: float = Field(0.01, ge=0.0, le=1.0,
                                description="no work below this covered fraction of the box")
    tile_size: int = Field(DEFAULT_TILE_SIZE, ge=16, description="dask tile edge (px)")


class GetDcrTemplateConfig(GetTemplateConfig):
    """Configuration of GetDcrTemplate: effective wavelength and bandwidth are required."""

    coadd_name: str = Field("dcr", pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    effective_wavelength: float = Field(gt=200.0, lt=2100.0,
                                        description="band effective wavelength (nm)")
    bandwidth: float = Field(gt=0.0, lt=2000.0, description="band width (nm)")
    num_subfilters: int = Field(3, ge=1, le=32, description="DCR sub-filters per band")


class ExposureTemplateConfig(GetTemplateConfig):
    """Configuration of "any exposure as a template" in a campaign.

    Exactly one of ``template_visit`` (the calexp of that visit, same detector, from the
    repository) and ``template_path`` (a FITS or zarr file) names the template.
    """

    template_visit: int | None = Field(None, ge=0, description="visit used as the template")
    template_path: str | None = Field(None, description="file used as the template")

    @model_validator(mode="after")
    def _one_source(self) -> ExposureTemplateConfig:
        if (self.template_visit is None) == (self.template_path is None):
            raise ValueError("give exactly one of templateVisit and templatePath")
        return self


# --------------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------------


def _aligned(exposure: xr.Dataset, box: Box, tile: int) -> tuple[da.Array, ...]:
    """Return the three planes of ``exposure`` on ``box`` in exact ``tile`` chunks.

    Pixels outside the exposure are NaN (image, variance) and NO_DATA (mask). Built tile by
    tile, so the graph stays proportional to the number of output tiles.
    """
    own = exposure_box(exposure)
    no_data = np.uint32(get_mask_planes(exposure).bitmask("NO_DATA"))
    fills = {"image": np.float32(np.nan), "variance": np.float32(np.nan), "mask": no_data}
    return tuple(regrid(exposure[name].data, (own.x0, own.y0), box, tile=tile, fill=fill)
                 for name, fill in fills.items())


@dataclass(frozen=True)
class OwnerMap:
    """Which input owns each pixel of a box, on a coarse grid (nearest sample per pixel).

    ``grid[r, c]`` is the index of the input owning the sample at pixel ``(x0 + c * step,
    y0 + r * step)`` of the box, or -1; a pixel takes the owner of its nearest sample. An
    input is *used* at the pixels whose sample lies within ``margin`` samples of one it owns
    (its fallback band along the seams).
    """

    grid: np.ndarray
    box: Box
    step: int
    margin: int = 1

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Return the grid row of each box row in ``[y0, y1)`` (box-relative offsets)."""
        return np.clip(np.floor(np.arange(y0, y1) / self.step + 0.5).astype(int), 0,
                       self.grid.shape[0] - 1)

    def cols(self, x0: int, x1: int) -> np.ndarray:
        """Return the grid column of each box column in ``[x0, x1)`` (box-relative)."""
        return np.clip(np.floor(np.arange(x0, x1) / self.step + 0.5).astype(int), 0,
                       self.grid.shape[1] - 1)

    def near(self, k: int) -> np.ndarray:
        """Return the samples where input ``k`` is used (owned or within ``margin``)."""
        own = self.grid == k
        return ndimage.binary_dilation(own, iterations=self.margin) if self.margin else own

    def uses_any(self, k: int, row: int, col: int, shape: tuple[int, int]) -> bool:
        """Return whether input ``k`` is used anywhere in the tile at offset ``(row, col)``."""
        rows = self.rows(row, row + shape[0])
        cols = self.cols(col, col + shape[1])
        return bool(self.near(k)[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].any())

    def selection(self, k: int) -> Any:
        """Return ``select(box) -> mask`` of the pixels where input ``k`` is used.

        For :func:`~daskdiff.warp.warp_exposure`; ``box`` is in the parent frame.
        """
        near = self.near(k)

        def select(tile: Box) -> np.ndarray:
            rows = self.rows(tile.y0 - self.box.y0, tile.y1 - self.box.y0)
            cols = self.cols(tile.x0 - self.box.x0, tile.x1 - self.box.x0)
            part = near[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            if part.all() or not part.any():
                return np.broadcast_to(bool(part.all()), tile.shape)
            return near[np.ix_(rows, cols)]

        return select


@numba.njit(cache=True, nogil=True)
def _merge_kernel(images: np.ndarray, variances: np.ndarray, masks: np.ndarray,
                  indices: np.ndarray, owner_grid: np.ndarray, owner_rows: np.ndarray,
                  owner_cols: np.ndarray, no_data: int, out_image: np.ndarray,
                  out_variance: np.ndarray, out_mask: np.ndarray) -> None:
    """Merge ``n`` stacked inputs pixel by pixel (see :func:`merge_exposures`).

    With an owner map (``owner_rows`` not empty) a pixel takes its owner input if that is
    good there, else the first good input; without, every good input.
    """
    n, ny, nx = images.shape
    use_owner = owner_rows.size > 0
    for r in range(ny):
        for c in range(nx):
            pick = -1
            if use_owner:
                owner = owner_grid[owner_rows[r], owner_cols[c]]
                for k in range(n):
                    value = variances[k, r, c]
                    if np.isfinite(images[k, r, c]) and np.isfinite(value) and value > 0:
                        if indices[k] == owner:
                            pick = k
                            break
                        if pick < 0:
                            pick = k
            sum_w = 0.0
            sum_wi = 0.0
            sum_wv = 0.0
            bits = 0
            for k in range(n):
                if use_owner and k != pick:
                    continue
                image = np.float64(images[k, r, c])
                variance = np.float64(variances[k, r, c])
                if not (np.isfinite(image) and np.isfinite(variance) and variance > 0):
                    continue
                weight = 1.0 / np.sqrt(variance)
                sum_w += weight
                sum_wi += weight * image
                sum_wv += weight * variance
                bits |= masks[k, r, c]
            if sum_w == 0:
                out_image[r, c] = 0.0
                out_variance[r, c] = 0.0
                out_mask[r, c] = no_data
            else:
                out_image[r, c] = sum_wi / sum_w
                out_variance[r, c] = sum_wv / sum_w
                out_mask[r, c] = bits


@numba.njit(cache=True, nogil=True)
def _single_kernel(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, no_data: int,
                   out_image: np.ndarray, out_variance: np.ndarray, out_mask: np.ndarray
                   ) -> None:
    """:func:`_merge_kernel` for one input, bit for bit, without branches (vectorised)."""
    ny, nx = image.shape
    for r in range(ny):
        for c in range(nx):
            value = np.float64(image[r, c])
            var = np.float64(variance[r, c])
            good = np.isfinite(value) & np.isfinite(var) & (var > 0)
            safe = var if good else 1.0
            weight = 1.0 / np.sqrt(safe)
            out_image[r, c] = (weight * value) / weight if good else 0.0
            out_variance[r, c] = (weight * safe) / weight if good else 0.0
            out_mask[r, c] = mask[r, c] if good else no_data


def _stack(planes: Sequence[np.ndarray], dtype: Any) -> np.ndarray:
    """Stack equal-shaped planes into a C-contiguous 3-D array (a view for one plane)."""
    if len(planes) == 1:
        return np.ascontiguousarray(planes[0], dtype=dtype)[None]
    return np.stack([np.asarray(p, dtype=dtype) for p in planes])


def _merge_block(*blocks: np.ndarray, indices: list[int], location: tuple[int, int],
                 no_data: int, owner: OwnerMap | None, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge one tile from the (image, variance, mask) tiles of the inputs ``indices``."""
    out_image = np.empty(shape, np.float32)
    out_variance = np.empty(shape, np.float32)
    out_mask = np.empty(shape, np.uint32)
    if len(indices) == 1:  # owner or not, a pixel takes the input where it is good
        _single_kernel(np.asarray(blocks[0], np.float32), np.asarray(blocks[1], np.float32),
                       np.asarray(blocks[2], np.uint32), no_data, out_image, out_variance,
                       out_mask)
        return out_image, out_variance, out_mask
    if owner is None:
        grid = np.zeros((1, 1), np.int64)
        rows = cols = np.zeros(0, np.int64)
    else:
        grid = owner.grid.astype(np.int64, copy=False)
        rows = owner.rows(location[0], location[0] + shape[0])
        cols = owner.cols(location[1], location[1] + shape[1])
    _merge_kernel(_stack(blocks[0::3], np.float32), _stack(blocks[1::3], np.float32),
                  _stack(blocks[2::3], np.uint32), np.asarray(indices, np.int64), grid,
                  rows.astype(np.int64, copy=False), cols.astype(np.int64, copy=False),
                  no_data, out_image, out_variance, out_mask)
    return out_image, out_variance, out_mask


def merge_exposures(exposures: Sequence[xr.Dataset], box: Box, *,
                    tile_size: int = DEFAULT_TILE_SIZE,
                    owner: OwnerMap | None = None) -> xr.Dataset:
    """Merge exposures on a common pixel grid (lazy, elementwise).

    A pixel of an input is good if its image and variance are finite and its variance is
    positive. Each good pixel has the weight ``w = variance ** -0.5``; the merged image and
    variance are the ``w``-weighted means of the inputs' images and variances; the mask is the
    OR of the good inputs' masks; pixels without any good input are NO_DATA with image and
    variance 0.

    Parameters
    ----------
    exposures : sequence of xarray.Dataset
        Inputs on the same pixel grid (same WCS); each may cover any part of ``box``.
    box : Box
        The output box.
    tile_size : int, optional
        Tile edge of the output.
    owner : OwnerMap, optional
        Where given, each pixel takes its owner input alone (or, where the owner has no good
        pixel, the first input that has one) instead of the weighted mean; tiles only read the
        inputs that overlap them and, with an owner map, that are used in them.

    Returns
    -------
    xarray.Dataset
        The merged exposure with the first input's metadata.
    """
    if not exposures:
        raise InputError("nothing to merge: no input exposures")
    planes = combine(get_mask_planes(e) for e in exposures)
    no_data = np.uint32(1 << planes["NO_DATA"])
    groups = [list(_aligned(exposure, box, tile_size)) for exposure in exposures]
    boxes = [exposure_box(exposure) for exposure in exposures]
    chunks = groups[0][0].chunks
    row_starts = np.cumsum((0, *chunks[0]))
    col_starts = np.cumsum((0, *chunks[1]))

    def select(i: int, j: int) -> list[int]:
        shape = (chunks[0][i], chunks[1][j])
        tile = Box(box.x0 + int(col_starts[j]), box.y0 + int(row_starts[i]), shape[1], shape[0])
        chosen = [k for k, b in enumerate(boxes) if b.overlaps(tile)]
        if owner is not None:
            owned = [k for k in chosen
                     if owner.uses_any(k, int(row_starts[i]), int(col_starts[j]), shape)]
            chosen = owned or chosen
        return chosen

    image, variance, mask = tilewise3(_merge_block, groups, (np.float32, np.float32, np.uint32),
                                      select=select, no_data=int(no_data), owner=owner)
    first = exposures[0]
    return make_exposure(image, variance=variance, mask=mask, x0=box.x0, y0=box.y0,
                         wcs=first.attrs.get("wcs"), psf=get_psf(first),
                         photo_calib=get_photo_calib(first), visit_info=get_visit_info(first),
                         mask_planes=planes, chunks=tile_size)


# --------------------------------------------------------------------------------------------
# HIGH_VARIANCE
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _bin_medians_kernel(variance: np.ndarray, mask: np.ndarray, ignore_bits: int, size: int,
                        medians: np.ndarray, counts: np.ndarray) -> None:
    ny, nx = variance.shape
    by, bx = medians.shape
    values = np.empty(size * size)
    for i in range(by):
        for j in range(bx):
            n = 0
            for r in range(i * size, min((i + 1) * size, ny)):
                for c in range(j * size, min((j + 1) * size, nx)):
                    value = variance[r, c]
                    if (mask[r, c] & ignore_bits) == 0 and np.isfinite(value) and value > 0:
                        values[n] = value
                        n += 1
            counts[i, j] = n
            medians[i, j] = np.median(values[:n]) if n > 0 else np.nan


def _bin_medians(variance: np.ndarray, mask: np.ndarray, ignore_bits: int, size: int
                 ) -> np.ndarray:
    """Median of the unmasked variances in each ``size`` x ``size`` bin of a block."""
    ny, nx = variance.shape
    shape = (-(-ny // size), -(-nx // size))
    medians = np.empty(shape)
    counts = np.empty(shape)
    _bin_medians_kernel(np.ascontiguousarray(variance, np.float32),
                        np.ascontiguousarray(mask, np.uint32), int(ignore_bits), size, medians,
                        counts)
    return np.stack([medians, counts])


def _variance_model(stats: np.ndarray, fraction_required: float, n_pixels: int
                    ) -> tuple[np.ndarray, float] | None:
    medians, counts = stats
    if counts.sum() < fraction_required * n_pixels or not np.isfinite(medians).any():
        return None
    missing = ~np.isfinite(medians)
    if missing.any():  # fill empty bins from their nearest non-empty bin
        index = ndimage.distance_transform_edt(missing, return_distances=False,
                                               return_indices=True)
        medians = medians[tuple(index)]
    return medians, float(np.median(medians))


def _linear_axis(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation indices and weights on ``n`` nodes, the edges extended."""
    p = np.clip(coords, 0.0, n - 1.0)
    low = np.minimum(np.floor(p).astype(np.int64), max(n - 2, 0))
    return low, np.minimum(low + 1, n - 1), p - low


@numba.njit(cache=True, nogil=True)
def _flag_kernel(mask: np.ndarray, row0: np.ndarray, row1: np.ndarray, ty: np.ndarray,
                 col0: np.ndarray, col1: np.ndarray, tx: np.ndarray, grid: np.ndarray,
                 limit: float, flag: int) -> np.ndarray:
    ny, nx = mask.shape
    out = np.empty((ny, nx), np.uint32)
    line = np.empty(grid.shape[1])
    for r in range(ny):
        for k in range(grid.shape[1]):  # the model along this row, at the bin columns
            line[k] = (1.0 - ty[r]) * grid[row0[r], k] + ty[r] * grid[row1[r], k]
        for c in range(nx):
            value = (1.0 - tx[c]) * line[col0[c]] + tx[c] * line[col1[c]]
            out[r, c] = mask[r, c] | flag if value > limit else mask[r, c]
    return out


def _flag_block(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, stats: np.ndarray, *,
                size: int, threshold: float, bit: int, fraction_required: float,
                n_pixels: int) -> np.ndarray:
    model = _variance_model(stats, fraction_required, n_pixels)
    if model is None:
        return mask
    grid, median = model
    rows = _linear_axis((ys + 0.5) / size - 0.5, grid.shape[0])
    cols = _linear_axis((xs + 0.5) / size - 0.5, grid.shape[1])
    return _flag_kernel(np.ascontiguousarray(mask, np.uint32), *rows, *cols,
                        np.ascontiguousarray(grid, np.float64), threshold * median, 1 << bit)


def high_variance_mask(exposure: xr.Dataset, *, threshold: float = 4.0,
                       mask_fraction: float = 0.1, bin_size: int = 32) -> xr.Dataset:
    """Return the exposure with HIGH_VARIANCE set where the variance model is high (lazy).

    The model is the median variance in ``bin_size`` bins (bins anchored at the exposure's
    first pixel; pixels in the BAD, EDGE, DETECTED, DETECTED_NEGATIVE and NO_DATA planes
    ignored), interpolated linearly between bin centres. Pixels where it exceeds ``threshold``
    times its median are flagged. Nothing is flagged when fewer than ``mask_fraction`` of the
    pixels are usable.
    """
    planes = get_mask_planes(exposure)
    ignore = planes.bitmask(*HIGH_VARIANCE_IGNORE)
    tile = max(exposure["image"].data.chunksize[0] // bin_size, 1) * bin_size
    variance = da.asarray(exposure["variance"].data).rechunk((tile, tile))
    mask = da.asarray(exposure["mask"].data).rechunk((tile, tile))
    out_chunks = ((2,), *[tuple(-(-c // bin_size) for c in axis) for axis in variance.chunks])
    stats = da.map_blocks(_bin_medians, variance, mask, ignore, bin_size, dtype=float,
                          chunks=out_chunks, new_axis=0)
    ys = da.arange(mask.shape[0], chunks=mask.chunks[0])
    xs = da.arange(mask.shape[1], chunks=mask.chunks[1])
    # every tile receives the whole (small) table of bin medians
    flagged = da.blockwise(_flag_block, "ij", mask, "ij", ys, "i", xs, "j",
                           stats.rechunk(-1), "kab",
                           concatenate=True, dtype=np.uint32, size=bin_size,
                           threshold=threshold, bit=planes["HIGH_VARIANCE"],
                           fraction_required=mask_fraction, n_pixels=variance.size)
    result = exposure.copy()
    result["mask"] = (("y", "x"), flagged.rechunk(exposure["mask"].data.chunks))
    result.attrs = dict(exposure.attrs)
    return result


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def _mapped_box(src_wcs: Any, src_box: Box, dst_wcs: Any) -> Box:
    """Bounding box in the destination frame of a source box's outline."""
    ra, dec = sky_polygon(src_wcs, src_box, points_per_side=16)
    u, v = sky_to_pixel(dst_wcs, ra, dec)
    return Box.bounding(u, v)


def template_coverage(wcs: Any, box: Box, inputs: Sequence[tuple[Any, Box]], *,
                      step: int = 8, max_samples: int = 40_000) -> float:
    """Return the fraction of ``box`` whose sky position falls inside any input's box.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        The science WCS.
    box : Box
        The science box.
    inputs : sequence of (WCS, Box)
        Each input's WCS and pixel box; inputs sharing a WCS (the patches of one tract) are
        mapped once.
    step : int, optional
        Smallest sampling step in pixels; larger boxes are sampled more coarsely, with at
        most about ``max_samples`` samples.
    max_samples : int, optional
        Sample budget.
    """
    step = max(step, int(np.ceil(np.sqrt(box.area / max_samples))))
    xs = np.arange(box.x0, box.x1, step) + 0.0
    ys = np.arange(box.y0, box.y1, step) + 0.0
    gx, gy = np.meshgrid(xs, ys)
    ra, dec = pixel_to_sky(wcs, gx.ravel(), gy.ravel())
    covered = np.zeros(gx.size, bool)
    mapped: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for in_wcs, in_box in inputs:
        key = in_wcs.to_header_string(relax=True)
        if key not in mapped:
            mapped[key] = sky_to_pixel(in_wcs, ra, dec)
        u, v = mapped[key]
        covered |= np.asarray(in_box.contains(u, v))
    return float(covered.mean()) if covered.size else 0.0


# --------------------------------------------------------------------------------------------
# assembly
# --------------------------------------------------------------------------------------------


def _check_calibrations(patches: Sequence[xr.Dataset], where: str) -> PhotoCalib:
    calibs = {get_photo_calib(p) for p in patches}
    values = {c.njy_per_count for c in calibs}
    if len(values) > 1:
        raise InputError(
            f"{where}: the template inputs have different photometric calibrations "
            f"({sorted(values)} nJy per count); coadd patches must share one calibration "
            "(recalibrate them to a common zero point)")
    return next(iter(calibs))


def _check_band(science_band: str, patches: Sequence[xr.Dataset], where: str) -> None:
    bands = {info.band for p in patches if (info := get_visit_info(p)) and info.band}
    if len(bands) > 1:
        raise InputError(f"{where}: the template inputs mix bands {sorted(bands)}")
    if science_band and bands and bands != {science_band}:
        raise InputError(f"{where}: band mismatch: the science exposure is {science_band!r} "
                         f"but the template inputs are {sorted(bands)}")


def assemble_template(
    science: xr.Dataset,
    patches: Mapping[int, Sequence[xr.Dataset]],
    *,
    config: GetTemplateConfig | None = None,
) -> xr.Dataset:
    """Build a template on the science grid from coadd patches grouped by tract (pure, lazy).

    Parameters
    ----------
    science : xarray.Dataset
        The science exposure (only its WCS, box and visit info are used).
    patches : mapping of int to sequence of xarray.Dataset
        Coadd patch exposures per tract id, in their tract's pixel frame with the tract WCS.
    config : GetTemplateConfig, optional
        Stage configuration.

    Returns
    -------
    xarray.Dataset
        The template on the science box grown by ``config.border``.

    Raises
    ------
    InputError
        Without a science WCS, with mixed calibrations or a band mismatch.
    NoWorkError
        If no patch is given or the inputs cover less than ``config.min_coverage`` of the box.
    """
    config = config or GetTemplateConfig()
    wcs = require_wcs(science, what="science exposure")
    science_box = exposure_box(science)
    box = science_box.grow(config.border)
    info = get_visit_info(science)
    everything = [p for group in patches.values() for p in group]
    if not everything:
        raise NoWorkError("No patches overlap the science exposure: no template inputs")
    where = f"template for visit {info.visit}, detector {info.detector}" if info else "template"
    _check_band(info.band if info else "", everything, where)
    calib = _check_calibrations(everything, where)
    inputs = [(require_wcs(p, what="coadd patch"), exposure_box(p)) for p in everything]
    coverage = template_coverage(wcs, science_box, inputs)
    if coverage <= 0 or coverage < config.min_coverage:
        raise NoWorkError(f"{where}: the template inputs cover {coverage:.1%} of the detector "
                          f"(minimum {config.min_coverage:.0%})",
                          metadata={"coverage": coverage})
    half = KERNELS[config.warp_kernel]
    nearest = config.tract_merge == "nearest" and len(patches) > 1
    owner = _tract_owners(wcs, box, patches) if nearest else None
    warped, components = [], []
    for tract_id in sorted(patches):
        group = list(patches[tract_id])
        tract_wcs = require_wcs(group[0], what=f"tract {tract_id} patch")
        union = Box(0, 0, 0, 0)
        for patch in group:
            union = union.union(exposure_box(patch))
        region = _mapped_box(wcs, box, tract_wcs).grow(half + 5).intersection(union)
        if region.is_empty:
            continue
        merged = merge_exposures(group, region, tile_size=config.tile_size)
        warped.append(warp_exposure(merged, wcs, box, kernel=config.warp_kernel,
                                    interp_length=config.interp_length,
                                    chunks=config.tile_size, conserve_flux=config.conserve_flux,
                                    select=None if owner is None else owner.selection(len(warped))))
        for patch in group:
            psf = get_psf(patch)
            if psf is None:
                raise InputError(f"{where}: a coadd patch of tract {tract_id} has no PSF model")
            valid = _mapped_box(tract_wcs, exposure_box(patch), wcs).intersection(box)
            if not valid.is_empty:
                components.append((WarpedPsf(psf, tract_wcs, wcs, box), valid))
    if not warped:
        raise NoWorkError(f"{where}: no patches found to overlap the science exposure")
    template = merge_exposures(warped, box, tile_size=config.tile_size, owner=owner)
    template = high_variance_mask(template, threshold=config.high_variance_threshold,
                                  mask_fraction=config.high_variance_mask_fraction,
                                  bin_size=config.high_variance_bin_size)
    template.attrs.update(
        wcs=wcs, psf=CoaddPsf(components, box), photo_calib=calib,
        visit_info=_template_visit_info(info, everything),
    )
    return template


def _tract_owners(wcs: Any, box: Box, patches: Mapping[int, Sequence[xr.Dataset]], *,
                  step: int = 16) -> OwnerMap:
    """Own each pixel by the tract whose centre is nearest among those whose patches cover it.

    Ownership is decided on samples every ``step`` pixels (each pixel follows its nearest
    sample); the inputs are numbered in sorted tract order.
    """
    xs = np.arange(box.x0, box.x1 + step, step, dtype=float)
    ys = np.arange(box.y0, box.y1 + step, step, dtype=float)
    gx, gy = np.meshgrid(xs, ys)
    ra, dec = pixel_to_sky(wcs, gx.ravel(), gy.ravel())
    ids = sorted(patches)
    distance = np.full((len(ids), ra.size), np.inf)
    for k, tract_id in enumerate(ids):
        group = patches[tract_id]
        tract_wcs = require_wcs(group[0], what=f"tract {tract_id} patch")
        u, v = sky_to_pixel(tract_wcs, ra, dec)
        covered = np.zeros(ra.size, bool)
        for patch in group:
            covered |= np.asarray(exposure_box(patch).contains(u, v))
        ra0, dec0 = np.deg2rad(tract_wcs.wcs.crval)
        cos_d = (np.sin(dec0) * np.sin(np.deg2rad(dec)) + np.cos(dec0)
                 * np.cos(np.deg2rad(dec)) * np.cos(np.deg2rad(ra) - ra0))
        distance[k] = np.where(covered, np.arccos(np.clip(cos_d, -1, 1)), np.inf)
    grid = np.where(np.isfinite(distance).any(axis=0), np.argmin(distance, axis=0), -1)
    return OwnerMap(grid.reshape(gx.shape), box, step)


def _template_visit_info(science_info: VisitInfo | None, inputs: Sequence[xr.Dataset]
                         ) -> VisitInfo:
    first = next((i for p in inputs if (i := get_visit_info(p)) is not None), None)
    band = (first.band if first else "") or (science_info.band if science_info else "")
    physical = first.physical_filter if first else ""
    if science_info is None:
        return VisitInfo(band=band, physical_filter=physical)
    return VisitInfo(visit=science_info.visit, detector=science_info.detector, band=band,
                     physical_filter=physical)


# --------------------------------------------------------------------------------------------
# DCR
# --------------------------------------------------------------------------------------------


def _sum_shifted(*images: np.ndarray, shifts: Sequence[tuple[float, float]]) -> np.ndarray:
    total = np.zeros(images[0].shape)
    for shift, image in zip(shifts, images, strict=True):
        total += shift_image(image.astype(np.float64), shift)
    return total.astype(np.float32)


def build_dcr_patch(subfilters: Sequence[xr.Dataset], science: xr.Dataset, *,
                    config: GetDcrTemplateConfig) -> xr.Dataset:
    """Build one patch of a DCR-matched template from its sub-filter coadds (lazy).

    Each sub-filter image is shifted by its differential chromatic refraction for the science
    visit and the images are summed. The shifts are computed on the science detector
    (:func:`daskdiff.dcr.dcr_shifts`, with the science pixel scale) and carried into the
    patch's pixel frame through the two local WCS Jacobians. The variance is the sum of the
    shifted sub-filter variances and the mask the OR of the sub-filter masks.

    Raises
    ------
    InputError
        If the number of sub-filters differs from ``config.num_subfilters`` or the visit info
        lacks what DCR needs.
    """
    if len(subfilters) != config.num_subfilters:
        raise InputError(f"a DCR patch needs {config.num_subfilters} sub-filter coadds, got "
                         f"{len(subfilters)}")
    info = get_visit_info(science)
    if info is None:
        raise InputError("GetDcrTemplate needs the science visit info (elevation, parallactic "
                         "and rotation angles, weather)")
    sci_wcs = require_wcs(science, what="science exposure")
    cx, cy = exposure_box(science).center
    shifts_sci = dcr_shifts(info, pixel_scale=pixel_scale(sci_wcs, cx, cy),
                            effective_wavelength=config.effective_wavelength,
                            bandwidth=config.bandwidth, num_subfilters=config.num_subfilters)
    first = subfilters[0]
    patch_wcs = require_wcs(first, what="DCR sub-filter coadd")
    ra, dec = pixel_to_sky(sci_wcs, np.array([cx]), np.array([cy]))
    px, py = sky_to_pixel(patch_wcs, ra, dec)
    to_patch = np.linalg.inv(local_jacobian(patch_wcs, float(px[0]), float(py[0])))
    to_sky = local_jacobian(sci_wcs, cx, cy)
    shifts = []
    for dy, dx in shifts_sci:
        du, dv = to_patch @ to_sky @ np.array([dx, dy])
        shifts.append((float(dv), float(du)))
    box = exposure_box(first)
    for sub in subfilters[1:]:
        if exposure_box(sub) != box:
            raise InputError(f"DCR sub-filter coadds of one patch must share a box; got {box} "
                             f"and {exposure_box(sub)}")
    def summed(plane: str) -> da.Array:
        whole = [da.asarray(s[plane].data).rechunk(-1) for s in subfilters]
        return da.map_blocks(_sum_shifted, *whole, shifts=shifts, dtype=np.float32)

    image, variance = summed("image"), summed("variance")
    mask = subfilters[0]["mask"].data
    for sub in subfilters[1:]:
        mask = mask | sub["mask"].data
    return make_exposure(image, variance=variance, mask=mask, x0=box.x0, y0=box.y0,
                         wcs=patch_wcs, psf=get_psf(first), photo_calib=get_photo_calib(first),
                         visit_info=get_visit_info(first), mask_planes=get_mask_planes(first),
                         chunks=config.tile_size)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def _coadd_patches(science: xr.Dataset, repository: Any, config: GetTemplateConfig
                   ) -> dict[int, list[xr.Dataset]]:
    wcs = require_wcs(science, what="science exposure")
    info = get_visit_info(science)
    box = exposure_box(science).grow(config.border)
    skymap = repository.get_skymap()
    wanted = skymap.find_patches(wcs, box)
    if not wanted:
        raise NoWorkError("No patches overlap the science exposure (none in the sky map)")
    dcr = isinstance(config, GetDcrTemplateConfig)
    dataset_type = f"{config.coadd_name}Coadd"
    band = info.band if info and info.band else None
    where: dict[str, Any] = {"band": band} if band else {}
    refs = repository.query(dataset_type, run=None, **where)
    if not refs:
        others = repository.query(dataset_type, run=None)
        if others:
            bands = sorted({r.data_id.get("band") for r in others})
            raise InputError(f"band mismatch: the science exposure is in band {band!r} but the "
                             f"{dataset_type} coadds are in {bands}")
        raise InputError(f"the repository has no {dataset_type} coadds; make them or choose "
                         "another coaddName")
    available: dict[tuple[int, int], list[Any]] = {}
    for ref in refs:
        key = (int(ref.data_id["tract"]), int(ref.data_id["patch"]))
        available.setdefault(key, []).append(ref)
    chunks = (config.tile_size, config.tile_size)
    patches: dict[int, list[xr.Dataset]] = {}
    for tract_id, patch_id in wanted:
        found = available.get((tract_id, patch_id))
        if not found:
            continue
        if dcr:
            subs = sorted(found, key=lambda r: int(r.data_id.get("subfilter", 0)))
            exposures = [repository.get_exposure(r, chunks=chunks) for r in subs]
            patch = build_dcr_patch(exposures, science, config=config)
        else:
            patch = repository.get_exposure(found[0], chunks=chunks)
        patches.setdefault(tract_id, []).append(patch)
    if not patches:
        raise NoWorkError(f"none of the {len(wanted)} patches overlapping the science exposure "
                          f"has a {dataset_type} coadd")
    return patches


def exposure_template(science: xr.Dataset, template: xr.Dataset, *,
                      config: GetTemplateConfig | None = None) -> xr.Dataset:
    """Use any exposure (another visit, a plain image with a WCS) as the template (lazy).

    The exposure is warped onto the science box grown by ``config.border``; its PSF (estimated
    from its stars if it has none) is carried through the WCS mapping.
    """
    config = config or GetTemplateConfig()
    wcs = require_wcs(science, what="science exposure")
    template_wcs = require_wcs(template, what="template exposure")
    science_box = exposure_box(science)
    box = science_box.grow(config.border)
    info = get_visit_info(science)
    _check_band(info.band if info else "", [template], "template")
    coverage = template_coverage(wcs, science_box, [(template_wcs, exposure_box(template))])
    if coverage <= 0 or coverage < config.min_coverage:
        raise NoWorkError(f"the template covers {coverage:.1%} of the science exposure "
                          f"(minimum {config.min_coverage:.0%})", metadata={"coverage": coverage})
    psf = get_psf(template)
    if psf is None:
        from .psf import estimate_psf

        psf = estimate_psf(template)
    warped = warp_exposure(template, wcs, box, kernel=config.warp_kernel,
                           interp_length=config.interp_length, chunks=config.tile_size,
                           conserve_flux=config.conserve_flux)
    warped = high_variance_mask(warped, threshold=config.high_variance_threshold,
                                mask_fraction=config.high_variance_mask_fraction,
                                bin_size=config.high_variance_bin_size)
    warped.attrs["psf"] = CoaddPsf([(WarpedPsf(psf, template_wcs, wcs, box), box)], box)
    return warped


def get_template(
    science: xr.Dataset,
    source: Any,
    *,
    config: GetTemplateConfig | None = None,
) -> xr.Dataset:
    """Return a template on the science exposure's pixel grid (lazy).

    Parameters
    ----------
    science : xarray.Dataset
        The science exposure; it needs a WCS.
    source : Repository, xarray.Dataset or path
        A repository holding coadds and a sky map (GetTemplate, or GetDcrTemplate when
        ``config`` is a :class:`GetDcrTemplateConfig`), or any exposure (or a path to one)
        to use as the template.
    config : GetTemplateConfig or GetDcrTemplateConfig, optional
        Stage configuration; :class:`GetTemplateConfig` defaults if omitted.

    Returns
    -------
    xarray.Dataset
        The template on the science box grown by ``config.border``, with the science WCS, a
        :class:`~daskdiff.psf.warped.CoaddPsf`, the inputs' calibration and mask planes plus
        NO_DATA and HIGH_VARIANCE.

    Raises
    ------
    InputError
        A science exposure without a WCS, a band mismatch, inconsistent calibrations.
    NoWorkError
        Nothing overlaps, or the coverage is below ``config.min_coverage``.
    """
    config = config or GetTemplateConfig()
    require_wcs(science, what="science exposure")
    if isinstance(config, ExposureTemplateConfig) and not isinstance(source, xr.Dataset):
        if config.template_path is not None:
            source = config.template_path
        else:
            info = get_visit_info(science)
            detector = info.detector if info else 0
            source = source.get_exposure("calexp", visit=config.template_visit,
                                         detector=detector, chunks=(config.tile_size,) * 2)
    if isinstance(source, xr.Dataset):
        return exposure_template(science, source, config=config)
    if isinstance(source, str | PathLike):
        from .io import read_exposure

        return exposure_template(science, read_exposure(source), config=config)
    if hasattr(source, "get_skymap") and hasattr(source, "query"):
        return assemble_template(science, _coadd_patches(science, source, config),
                                 config=config)
    raise InputError(f"get_template: source must be a Repository, an exposure or a path, got "
                     f"{type(source).__name__}")
