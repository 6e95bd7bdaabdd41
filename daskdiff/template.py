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
  The stages are fused: one task per output tile merges, for each tract it uses, the patch
  pixels its warp needs straight into the warper's source buffers (the tract-level merge is
  never materialised), warps them, merges the tracts and computes the tile's HIGH_VARIANCE
  bin medians; a light second pass flags HIGH_VARIANCE. The result is the same as running
  :func:`merge_exposures`, :func:`~daskdiff.warp.warp_exposure`, :func:`merge_exposures`
  and :func:`high_variance_mask` in turn. All per-pixel loops are compiled (numba).
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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from os import PathLike
from typing import Any, Literal

import dask.array as da
import numba
import numpy as np
import xarray as xr
from pydantic import Field, model_validator
from scipy import ndimage

from ._tiles import chunk_pieces, regrid, tile_tasks, tilewise3
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
from .warp import (
    KERNELS,
    PixelMapping,
    resample_block,
    scratch,
    selected_part,
    source_planes,
    source_spans,
    warp_exposure,
)
from .wcs import copy_wcs, local_jacobian, pixel_scale, pixel_to_sky, sky_polygon, sky_to_pixel

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
            # rows and cols are runs of consecutive grid indices: repeat the samples
            part = np.repeat(part, np.bincount(rows - rows[0]), axis=0)
            return np.repeat(part, np.bincount(cols - cols[0]), axis=1)

        return select


@numba.njit(cache=True, nogil=True)
def _merge_kernel(images: np.ndarray, variances: np.ndarray, masks: np.ndarray,
                  indices: np.ndarray, owner_grid: np.ndarray, owner_rows: np.ndarray,
                  owner_cols: np.ndarray, no_data: int, out_image: np.ndarray,
                  out_variance: np.ndarray, out_mask: np.ndarray) -> None:
    """Merge ``n`` stacked inputs pixel by pixel (see :func:`merge_exposures`).

    With an owner map (``owner_rows`` not empty) a pixel takes its owner input if that is
    good there, else the first good input; without, every good input. A pixel taken from
    one input is that input's pixel (the weighted mean ``(w * x) / w`` of one value rounds
    back to ``x`` in float32).
    """
    n, ny, nx = images.shape
    use_owner = owner_rows.size > 0
    for r in range(ny):
        for c in range(nx):
            if use_owner:
                owner = owner_grid[owner_rows[r], owner_cols[c]]
                pick = -1
                for k in range(n):
                    value = variances[k, r, c]
                    if np.isfinite(images[k, r, c]) and np.isfinite(value) and value > 0:
                        if indices[k] == owner:
                            pick = k
                            break
                        if pick < 0:
                            pick = k
                if pick < 0:
                    out_image[r, c] = 0.0
                    out_variance[r, c] = 0.0
                    out_mask[r, c] = no_data
                else:
                    out_image[r, c] = images[pick, r, c]
                    out_variance[r, c] = variances[pick, r, c]
                    out_mask[r, c] = masks[pick, r, c]
                continue
            sum_w = 0.0
            sum_wi = 0.0
            sum_wv = 0.0
            bits = 0
            for k in range(n):
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _single_kernel(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, no_data: int,
                   out_image: np.ndarray, out_variance: np.ndarray, out_mask: np.ndarray
                   ) -> None:
    """:func:`_merge_kernel` for one input, bit for bit, without branches (vectorised).

    With one good input the weighted mean ``(w * x) / w`` is ``x`` to within 2**-52, which
    rounds back to ``x`` in float32: good pixels are copied.
    """
    ny, nx = image.shape
    for r in range(ny):
        for c in range(nx):
            value = image[r, c]
            var = variance[r, c]
            good = np.isfinite(value) & np.isfinite(var) & (var > 0)
            out_image[r, c] = value if good else np.float32(0.0)
            out_variance[r, c] = var if good else np.float32(0.0)
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
    _merge_stacked(_stack(blocks[0::3], np.float32), _stack(blocks[1::3], np.float32),
                   _stack(blocks[2::3], np.uint32), indices=indices, location=location,
                   no_data=no_data, owner=owner, out=(out_image, out_variance, out_mask))
    return out_image, out_variance, out_mask


def _merge_stacked(images: np.ndarray, variances: np.ndarray, masks: np.ndarray, *,
                   indices: list[int], location: tuple[int, int], no_data: int,
                   owner: OwnerMap | None, out: tuple[np.ndarray, np.ndarray, np.ndarray]
                   ) -> None:
    """:func:`_merge_kernel` on stacked tiles of several inputs (see :func:`_merge_block`)."""
    shape = images.shape[1:]
    if owner is None:
        grid = np.zeros((1, 1), np.int64)
        rows = cols = np.zeros(0, np.int64)
    else:
        grid = owner.grid.astype(np.int64, copy=False)
        rows = owner.rows(location[0], location[0] + shape[0])
        cols = owner.cols(location[1], location[1] + shape[1])
    _merge_kernel(images, variances, masks, np.asarray(indices, np.int64), grid,
                  rows.astype(np.int64, copy=False), cols.astype(np.int64, copy=False),
                  no_data, *out)


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
def _partition_below(values: np.ndarray, low: int, high: int, pivot: float,
                     or_equal: bool) -> int:
    """Move the entries of ``values[low:high]`` below ``pivot`` (or equal) to the front.

    Branch-free (Lomuto's scheme with an unconditional swap); returns where the rest starts.
    """
    store = low
    for t in range(low, high):
        value = values[t]
        below = (value <= pivot) if or_equal else (value < pivot)
        values[t] = values[store]
        values[store] = value
        store += below
    return store


@numba.njit(cache=True, nogil=True)
def _select(values: np.ndarray, n: int, k: int) -> float:
    """Return the ``k``-th smallest of ``values[:n]`` (reordering them); no NaNs."""
    low, high = 0, n
    while high - low > 1:
        a, b, c = values[low], values[(low + high) // 2], values[high - 1]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        split = _partition_below(values, low, high, pivot, False)
        if k < split:
            high = split
        elif split > low:
            low = split
        else:  # nothing below the pivot: pull its copies in front (progress with ties)
            equal = _partition_below(values, split, high, pivot, True)
            if k < equal:
                return pivot
            low = equal
    return values[low]


@numba.njit(cache=True, nogil=True)
def _median(values: np.ndarray, n: int) -> float:
    """``np.median(values[:n])`` (the same value), by a branch-free quickselect."""
    half = n // 2
    upper = _select(values, n, half)
    if n % 2:
        return upper
    lower = values[0]  # after the selection values[:half] hold the half smallest
    for t in range(1, half):
        lower = max(lower, values[t])
    return (lower + upper) / 2


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
            medians[i, j] = _median(values, n) if n > 0 else np.nan


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
    limit = threshold * median
    if rows[0].size and cols[0].size:
        # the model is interpolated linearly between these nodes, so it stays below their
        # largest value (to within rounding, hence the margin): nothing to flag, no copy
        nodes = grid[rows[0].min():rows[1].max() + 1, cols[0].min():cols[1].max() + 1]
        if nodes.max() < limit * (1.0 - 1e-9):
            return mask
    return _flag_kernel(np.ascontiguousarray(mask, np.uint32), *rows, *cols,
                        np.ascontiguousarray(grid, np.float64), limit, 1 << bit)


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
    flagged = _flag_high_variance(mask, stats, planes["HIGH_VARIANCE"], threshold=threshold,
                                  mask_fraction=mask_fraction, bin_size=bin_size)
    result = exposure.copy()
    result["mask"] = (("y", "x"), flagged.rechunk(exposure["mask"].data.chunks))
    result.attrs = dict(exposure.attrs)
    return result


def _flag_high_variance(mask: da.Array, stats: da.Array, bit: int, *, threshold: float,
                        mask_fraction: float, bin_size: int) -> da.Array:
    """Flag HIGH_VARIANCE in ``mask`` from the bin statistics of its tiles (``stats``)."""
    ys = da.arange(mask.shape[0], chunks=mask.chunks[0])
    xs = da.arange(mask.shape[1], chunks=mask.chunks[1])
    # every tile receives the whole (small) table of bin medians
    return da.blockwise(_flag_block, "ij", mask, "ij", ys, "i", xs, "j",
                        stats.rechunk(-1), "kab",
                        concatenate=True, dtype=np.uint32, size=bin_size,
                        threshold=threshold, bit=bit,
                        fraction_required=mask_fraction, n_pixels=mask.size)


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
    nearest = config.tract_merge == "nearest" and len(patches) > 1
    owner = _tract_owners(wcs, box, patches) if nearest else None
    template, components = _fused_template(wcs, box, patches, owner, config, where)
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


# --------------------------------------------------------------------------------------------
# fused assembly: patch merge, warp, tract merge and HIGH_VARIANCE statistics per output tile
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _accumulate_kernel(image: np.ndarray, variance: np.ndarray, mask: np.ndarray,
                       strides: tuple[int, int, int], row0: int, col0: int, ny: int, nx: int,
                       count: np.ndarray, spans: np.ndarray, bad_bits: int, no_data: int,
                       sum_w: np.ndarray, sum_wi: np.ndarray, sum_wv: np.ndarray,
                       bits: np.ndarray) -> None:
    """Merge one input into the warper's source buffers (see :func:`_finalise_kernel`).

    The input is ``ny`` rows of ``nx`` pixels, ``strides`` apart in the flat arrays (see
    :func:`_flat_rows`), placed at ``[row0:, col0:]`` of the buffers; only its pixels inside
    the buffers' ``spans`` (:func:`daskdiff.warp.source_spans`) are used. Where it is the only
    input (``count == 1``) the merge is the input itself (with one input the weighted mean
    ``(w * x) / w`` rounds back to ``x`` in float32), prepared at once as
    :func:`daskdiff.warp._sanitise_into` does; elsewhere its good pixels are added to the
    weighted sums of :func:`_merge_kernel` (``sum_wi`` and ``sum_wv`` are the image and
    variance buffers).
    """
    for r in range(ny):
        out = row0 + r
        first = max(spans[out, 0] - col0, 0)  # the input's columns inside the span
        n = min(spans[out, 1] - col0, nx) - first
        if n <= 0:
            continue
        # row views from the first column: non-negative indices (no wraparound code)
        row_image = image[r * strides[0] + first:]
        row_variance = variance[r * strides[1] + first:]
        row_mask = mask[r * strides[2] + first:]
        place = col0 + first
        row_count = count[out, place:]
        row_w = sum_w[out, place:]
        row_wi = sum_wi[out, place:]
        row_wv = sum_wv[out, place:]
        row_bits = bits[out, place:]
        for c in range(n):
            value = np.float64(row_image[c])
            var = np.float64(row_variance[c])
            good = np.isfinite(value) & np.isfinite(var) & (var > 0)
            if row_count[c] == 1:
                bit = row_mask[c] if good else np.uint32(no_data)
                usable = good & ((bit & bad_bits) == 0)
                row_wi[c] = value if usable else np.nan
                row_wv[c] = var if usable else np.nan
                row_bits[c] = bit
            elif good:
                weight = 1.0 / np.sqrt(var)
                row_w[c] += weight
                row_wi[c] += weight * value
                row_wv[c] += weight * var
                row_bits[c] |= row_mask[c]


def _flat_rows(array: np.ndarray, dtype: Any) -> tuple[np.ndarray, int]:
    """Return a 2-D array's rows as one contiguous 1-D array and the row stride (elements).

    A view with contiguous rows (a chunk cut from a larger array) is not copied; rows that
    are all the same array (row stride 0, a broadcast plane) give one row and stride 0.
    """
    array = np.asarray(array, dtype)
    if array.shape[0] == 0 or array.shape[1] == 0:
        return np.zeros(0, dtype), 0
    if array.strides[0] == 0:  # every row the same (a broadcast plane): one row, stride 0
        return np.ascontiguousarray(array[0]), 0
    if array.strides[1] != array.itemsize or array.strides[0] % array.itemsize:
        array = np.ascontiguousarray(array)
    stride = array.strides[0] // array.itemsize
    span = (array.shape[0] - 1) * stride + array.shape[1]
    flat = np.lib.stride_tricks.as_strided(array, shape=(span,), strides=(array.itemsize,),
                                           writeable=False)
    return flat, stride


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _finalise_kernel(count: np.ndarray, spans: np.ndarray, sum_w: np.ndarray,
                     sum_wi: np.ndarray, sum_wv: np.ndarray, bits: np.ndarray, no_data: int,
                     bad_bits: int) -> None:
    """Turn the weighted sums into the warper's source buffers, in place.

    Only inside ``spans`` and where no input (NO_DATA) or several inputs (``count != 1``)
    cover a pixel (the weighted sums are defined only where several do): the merged pixel is
    rounded to float32 (the merged exposure's type), then prepared as
    :func:`daskdiff.warp._sanitise_into` does, NaN in ``sum_wi`` and ``sum_wv`` where it is
    not good.
    """
    for r in range(sum_w.shape[0]):
        first = spans[r, 0]
        row_count = count[r, first:]
        row_w = sum_w[r, first:]
        row_wi = sum_wi[r, first:]
        row_wv = sum_wv[r, first:]
        row_bits = bits[r, first:]
        for c in range(spans[r, 1] - first):
            count_here = row_count[c]
            if count_here == 1:
                continue
            weight = row_w[c] if count_here > 1 else 0.0  # the sums are zeroed under overlaps
            if weight == 0:
                row_bits[c] = no_data
                good = False
                image = np.float32(0.0)
                var = np.float32(0.0)
            else:
                image = np.float32(row_wi[c] / weight)
                var = np.float32(row_wv[c] / weight)
                good = (np.isfinite(image) and np.isfinite(var) and var >= 0
                        and (row_bits[c] & bad_bits) == 0)
            if good:
                row_wi[c] = image
                row_wv[c] = var
            else:
                row_wi[c] = np.nan
                row_wv[c] = np.nan


@dataclass(frozen=True, eq=False)
class _Tract:
    """One tract's inputs to the fused assembly (patches on the tract grid)."""

    index: int
    boxes: list[Box]
    planes: list[list[da.Array]]
    region: Box
    mapping: PixelMapping
    mask_planes: Any
    select: Any


@dataclass(frozen=True, eq=False)
class _TileSource:
    """What one tile needs from one tract: the merged source box and where its chunks go."""

    index: int
    need: Box
    boxes: list[Box]
    pieces: list[list[tuple[tuple[slice, slice], ...]]]
    grid: tuple[np.ndarray, np.ndarray, int, int]
    selected: np.ndarray | None
    part: Box


def _warp_tract(chunks: Sequence[np.ndarray], source: _TileSource, tract: dict[str, Any],
                box: Box, *, kernel: str, conserve_flux: bool,
                out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Merge the tract's patches on ``source.need`` and warp them onto ``box`` (into ``out``).

    Only the source pixels the warp reads (:func:`~daskdiff.warp.source_spans` of the part of
    ``box`` holding the selected pixels) are merged; the rest of the buffers stays undefined.
    """
    need = source.need
    step = tract["step"]
    spans = source_spans(source.grid, step, source.part, need, kernel=kernel)
    with scratch() as take:
        _merge_and_warp(chunks, source, tract, box, spans, take, kernel=kernel,
                        conserve_flux=conserve_flux, out=out)


def _merge_and_warp(chunks: Sequence[np.ndarray], source: _TileSource, tract: dict[str, Any],
                    box: Box, spans: np.ndarray, take: Callable[..., np.ndarray], *, kernel: str,
                    conserve_flux: bool, out: tuple[np.ndarray, np.ndarray, np.ndarray]
                    ) -> None:
    """:func:`_warp_tract` with its buffers from ``take(name, shape, dtype)`` (scratch)."""
    need = source.need
    step = tract["step"]
    count = take("count", need.shape, np.uint8)
    count[...] = 0
    for patch_box in source.boxes:
        part = patch_box.intersection(need)
        count[part.y0 - need.y0:part.y1 - need.y0, part.x0 - need.x0:part.x1 - need.x0] += 1
    sum_w = take("sum_w", need.shape, np.float64)
    image = take("image", need.shape, np.float64)
    variance = take("variance", need.shape, np.float64)
    bits = take("bits", need.shape, np.uint32)
    for first, second in combinations(source.boxes, 2):  # the weighted sums where they overlap
        both = first.intersection(second).intersection(need)
        if not both.is_empty:
            rows = slice(both.y0 - need.y0, both.y1 - need.y0)
            cols = slice(both.x0 - need.x0, both.x1 - need.x0)
            for buffer in (sum_w, image, variance, bits):
                buffer[rows, cols] = 0
    at = 0
    for pieces in source.pieces:
        n = len(pieces)
        for k, (src, dst) in enumerate(pieces):
            image_rows, image_stride = _flat_rows(chunks[at + k][src], np.float32)
            variance_rows, variance_stride = _flat_rows(chunks[at + n + k][src], np.float32)
            mask_rows, mask_stride = _flat_rows(chunks[at + 2 * n + k][src], np.uint32)
            _accumulate_kernel(image_rows, variance_rows, mask_rows,
                               (image_stride, variance_stride, mask_stride), dst[0].start,
                               dst[1].start, dst[0].stop - dst[0].start,
                               dst[1].stop - dst[1].start, count, spans, tract["bad_bits"],
                               tract["no_data"], sum_w, image, variance, bits)
        at += 3 * n
    _finalise_kernel(count, spans, sum_w, image, variance, bits, tract["no_data"],
                     tract["bad_bits"])
    resample_block(image, variance, bits, need, source.grid, step, box, kernel=kernel,
                   no_data_bit=tract["no_data_bit"], selected=source.selected,
                   conserve_flux=conserve_flux, spans=spans, out=out, take=take)


def _template_tile(*chunks: np.ndarray, sources: list[_TileSource],
                   tracts: dict[int, dict[str, Any]], box: Box, location: tuple[int, int],
                   kernel: str, conserve_flux: bool, no_data: int, owner: OwnerMap | None,
                   stats: tuple[int, int] | None) -> tuple[np.ndarray, ...]:
    """One output tile of the template: per tract merge and warp, then the tract merge.

    Returns the image, variance and (not yet HIGH_VARIANCE-flagged) mask, and the tile's
    HIGH_VARIANCE bin statistics (``stats = (ignore bits, bin size)``; empty without).
    """
    n = len(sources)
    images = np.empty((n, *box.shape), np.float32)
    variances = np.empty((n, *box.shape), np.float32)
    masks = np.empty((n, *box.shape), np.uint32)
    at = 0
    for k, source in enumerate(sources):
        if source.need.is_empty:
            images[k] = 0.0
            variances[k] = 0.0
            masks[k] = tracts[source.index]["no_data"]
            continue
        used = 3 * sum(len(p) for p in source.pieces)
        _warp_tract(chunks[at:at + used], source, tracts[source.index], box,
                    kernel=kernel, conserve_flux=conserve_flux,
                    out=(images[k], variances[k], masks[k]))
        at += used
    if n == 1:  # owner or not, a pixel takes the input where it is good (in place)
        image, variance, mask = images[0], variances[0], masks[0]
        _single_kernel(image, variance, mask, no_data, image, variance, mask)
    else:
        image = np.empty(box.shape, np.float32)
        variance = np.empty(box.shape, np.float32)
        mask = np.empty(box.shape, np.uint32)
        _merge_stacked(images, variances, masks, indices=[s.index for s in sources],
                       location=location, no_data=no_data, owner=owner,
                       out=(image, variance, mask))
    if stats is None:
        return image, variance, mask, np.empty((2, 0, 0))
    return image, variance, mask, _bin_medians(variance, mask, stats[0], stats[1])


def _fused_template(wcs: Any, box: Box, patches: Mapping[int, Sequence[xr.Dataset]],
                    owner: OwnerMap | None, config: GetTemplateConfig, where: str
                    ) -> tuple[xr.Dataset, list[tuple[WarpedPsf, Box]]]:
    """Build the template's planes, one task per output tile, and its PSF components.

    Equivalent to merging each tract's patches (:func:`merge_exposures` on the part of the
    tract grid the box needs), warping each merge (:func:`~daskdiff.warp.warp_exposure`),
    merging the tracts (with ``owner``) and :func:`high_variance_mask`, without materialising
    the intermediate exposures: each tile task merges the patch pixels it resamples straight
    into the warper's source buffers and warps only the tracts it uses.
    """
    half = KERNELS[config.warp_kernel]
    tracts: list[_Tract] = []
    components: list[tuple[WarpedPsf, Box]] = []
    for index, tract_id in enumerate(sorted(patches)):
        group = list(patches[tract_id])
        tract_wcs = require_wcs(group[0], what=f"tract {tract_id} patch")
        boxes = [exposure_box(patch) for patch in group]
        union = Box(0, 0, 0, 0)
        for patch_box in boxes:
            union = union.union(patch_box)
        region = _mapped_box(wcs, box, tract_wcs).grow(half + 5).intersection(union)
        if region.is_empty:
            continue
        mapping = PixelMapping.from_wcs(copy_wcs(wcs), box, copy_wcs(tract_wcs),
                                        interp_length=config.interp_length)
        tracts.append(_Tract(index, boxes, [source_planes(p) for p in group], region, mapping,
                             combine(get_mask_planes(p) for p in group),
                             None if owner is None else owner.selection(index)))
        for patch, patch_box in zip(group, boxes, strict=True):
            psf = get_psf(patch)
            if psf is None:
                raise InputError(f"{where}: a coadd patch of tract {tract_id} has no PSF model")
            valid = _mapped_box(tract_wcs, patch_box, wcs).intersection(box)
            if not valid.is_empty:
                components.append((WarpedPsf(psf, tract_wcs, wcs, box), valid))
    if not tracts:
        raise NoWorkError(f"{where}: no patches found to overlap the science exposure")
    planes = combine(t.mask_planes for t in tracts)
    constants = {t.index: {"no_data": int(1 << t.mask_planes["NO_DATA"]),
                           "bad_bits": int(t.mask_planes.bitmask("NO_DATA")),
                           "no_data_bit": t.mask_planes["NO_DATA"],
                           "step": t.mapping.step} for t in tracts}
    near = {t.index: owner.near(t.index) for t in tracts} if owner is not None else {}
    tile = config.tile_size
    bin_size = config.high_variance_bin_size
    fused_stats = tile % bin_size == 0
    stats = (int(planes.bitmask(*HIGH_VARIANCE_IGNORE)), bin_size) if fused_stats else None
    x_edges = [*range(box.x0, box.x1, tile), box.x1]
    y_edges = [*range(box.y0, box.y1, tile), box.y1]
    calls: dict[tuple[int, int], tuple[list[Any], dict[str, Any]]] = {}
    overlaps = dict.fromkeys(t.index for t in tracts if t.select is None)
    for i, (ya, yb) in enumerate(pairwise(y_edges)):
        for j, (xa, xb) in enumerate(pairwise(x_edges)):
            tile_box = Box.from_bounds(xa, ya, xb, yb)
            location = (ya - box.y0, xa - box.x0)
            used = tracts
            if owner is not None:
                rows = owner.rows(location[0], location[0] + tile_box.height)
                cols = owner.cols(location[1], location[1] + tile_box.width)
                used = [t for t in tracts if near[t.index][rows[0]:rows[-1] + 1,
                                                           cols[0]:cols[-1] + 1].any()] or tracts
            keys: list[Any] = []
            sources = []
            for tract in used:
                selected, part = selected_part(tract.select, tile_box)
                need = tract.mapping.source_box(part, margin=half).intersection(tract.region)
                if part.is_empty or need.is_empty:
                    sources.append(_TileSource(tract.index, Box(0, 0, 0, 0), [], [], (), None,
                                               part))
                    continue
                overlaps.pop(tract.index, None)
                pieces, boxes = [], []
                for patch_box, patch_planes in zip(tract.boxes, tract.planes, strict=True):
                    if not patch_box.overlaps(need):
                        continue
                    boxes.append(patch_box)
                    found, placed = chunk_pieces(patch_planes[0], (patch_box.x0, patch_box.y0),
                                                 need)
                    keys += [(plane.name, *key[1:]) for plane in patch_planes for key in found]
                    pieces.append(placed)
                sources.append(_TileSource(tract.index, need, boxes, pieces,
                                           tract.mapping.cells(tile_box), selected, part))
            calls[(i, j)] = (keys, {"sources": sources, "box": tile_box, "location": location})
    if overlaps:
        raise NoWorkError(f"{where}: the patches of a tract do not overlap the destination box "
                          f"{box}")
    chunks = (tuple(b - a for a, b in pairwise(y_edges)),
              tuple(b - a for a, b in pairwise(x_edges)))
    bins = tuple(tuple(-(-c // bin_size) for c in axis) for axis in chunks)
    no_data = int(1 << planes["NO_DATA"])
    for _keys, kwargs in calls.values():
        kwargs.update(tracts=constants, kernel=config.warp_kernel,
                      conserve_flux=config.conserve_flux, no_data=no_data, owner=owner,
                      stats=stats)
    image, variance, mask, tile_stats = tile_tasks(
        _template_tile, calls, [p for t in tracts for group in t.planes for p in group],
        [(chunks, np.float32), (chunks, np.float32), (chunks, np.uint32),
         (((2,), *bins), np.float64)])
    template = make_exposure(image, variance=variance, mask=mask, x0=box.x0, y0=box.y0,
                             wcs=wcs, mask_planes=planes, chunks=None)
    kwargs = {"threshold": config.high_variance_threshold,
              "mask_fraction": config.high_variance_mask_fraction, "bin_size": bin_size}
    if not fused_stats:
        return high_variance_mask(template, **kwargs), components
    template["mask"] = (("y", "x"), _flag_high_variance(mask, tile_stats,
                                                        planes["HIGH_VARIANCE"], **kwargs))
    return template, components


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
