"""Footprints: connected above-threshold regions, grown, merged across signs, with peaks.

A footprint is a set of pixels stored as *spans* (row, first column, end column exclusive) in
the parent frame. Detection labels the positive and negative above-threshold pixels, grows
every footprint isotropically by a disk, and labels the union of the grown footprints, so
footprints that overlap after growth (of either sign) become one source; one with both
positive and negative peaks is a dipole candidate (LSST's FootprintMergeList with growth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from ._compiled import dilate_disk
from .tiles import assemble, map_tiles, tile_slices

__all__ = [
    "Footprint",
    "detect_footprints",
    "disk",
    "footprint_spans",
    "grow_mask",
    "label_tiles",
    "place_sky_sources",
]

_CONNECT = np.ones((3, 3), bool)  # 8-connected, as afw's FootprintSet


@dataclass(frozen=True, slots=True)
class Footprint:
    """One merged detection.

    Attributes
    ----------
    label : int
        Its value in the label image.
    slices : tuple of slice
        Its bounding box in array indices ``(rows, columns)``.
    pos_peaks, neg_peaks : tuple of (int, int, float)
        ``(row, column, significance)`` of its positive / negative peaks, most significant
        first (a peak is the extreme significance within ``peak_radius``).
    """

    label: int
    slices: tuple[slice, slice]
    pos_peaks: tuple[tuple[int, int, float], ...]
    neg_peaks: tuple[tuple[int, int, float], ...]

    @property
    def pos_peak(self) -> tuple[int, int, float] | None:
        """The most significant positive peak."""
        return self.pos_peaks[0] if self.pos_peaks else None

    @property
    def neg_peak(self) -> tuple[int, int, float] | None:
        """The most significant negative peak."""
        return self.neg_peaks[0] if self.neg_peaks else None

    @property
    def primary_peak(self) -> tuple[int, int, float]:
        """The peak of largest absolute significance (the positive one on ties)."""
        if self.neg_peak is None:
            return self.pos_peak  # type: ignore[return-value]
        if self.pos_peak is None or -self.neg_peak[2] > self.pos_peak[2]:
            return self.neg_peak
        return self.pos_peak

    @property
    def is_negative(self) -> bool:
        """Whether the footprint holds only negative peaks."""
        return not self.pos_peaks

    @property
    def is_dipole_candidate(self) -> bool:
        """Whether the footprint holds both a positive and a negative peak."""
        return bool(self.pos_peaks) and bool(self.neg_peaks)


def disk(radius: int) -> np.ndarray:
    """Return a boolean disk structuring element of integer ``radius``."""
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + 1e-9


def grow_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate ``mask`` by the disk of integer ``radius`` (zero outside the image)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if radius <= 0 or not mask.any():
        return mask.copy()
    return dilate_disk(mask, int(radius))


def _tile_footprints(sig: np.ndarray, *, crop: tuple[slice, slice], offset: tuple[int, int],
                     shape: tuple[int, int], threshold: float, grow: int, edge: int,
                     merge: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grown footprints of one tile (its window holds a halo of ``grow``) and local labels.

    Returns the tile's positive and negative masks, its labels (8-connected, 1..n within the
    tile) and the sign of each label (+1 positive or merged, -1 negative-only when not
    merging).
    """
    rows = np.arange(offset[0], offset[0] + sig.shape[0])
    cols = np.arange(offset[1], offset[1] + sig.shape[1])
    inner = (((rows >= edge) & (rows < shape[0] - edge))[:, None]
             & ((cols >= edge) & (cols < shape[1] - edge))[None, :])
    positive = grow_mask(inner & (sig >= threshold), grow)[crop]
    negative = grow_mask(inner & (sig <= -threshold), grow)[crop]
    if merge:
        labels, n = ndimage.label(positive | negative, structure=_CONNECT)
        kinds = np.ones(n, np.int8)
    else:
        pos_labels, n_pos = ndimage.label(positive, structure=_CONNECT)
        neg_labels, n_neg = ndimage.label(negative & ~positive, structure=_CONNECT)
        labels = np.where(neg_labels > 0, neg_labels + n_pos, pos_labels)
        kinds = np.concatenate([np.ones(n_pos, np.int8), -np.ones(n_neg, np.int8)])
    return positive, negative, labels.astype(np.int32, copy=False), kinds


def _seam_pairs(labels: np.ndarray, tiles: list[tuple[slice, slice]]) -> np.ndarray:
    """Pairs of labels of 8-connected pixels on the two sides of every tile seam."""
    row_seams = sorted({t[0].start for t in tiles} - {0})
    col_seams = sorted({t[1].start for t in tiles} - {0})
    pairs = []
    for c in col_seams:
        left, right = labels[:, c - 1], labels[:, c]
        pairs += [np.stack([left, right], 1), np.stack([left[:-1], right[1:]], 1),
                  np.stack([left[1:], right[:-1]], 1)]
    for r in row_seams:
        top, bottom = labels[r - 1], labels[r]
        pairs += [np.stack([top, bottom], 1), np.stack([top[:-1], bottom[1:]], 1),
                  np.stack([top[1:], bottom[:-1]], 1)]
    if not pairs:
        return np.zeros((0, 2), np.int64)
    both = np.concatenate(pairs)
    return both[(both[:, 0] > 0) & (both[:, 1] > 0)].astype(np.int64)


def label_tiles(sig: np.ndarray, tiles: list[tuple[slice, slice]], *, threshold: float,
                grow: int, edge: int, merge: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Threshold, grow and label a significance image tile by tile, stitching the seams.

    Each tile is thresholded and grown with a halo of ``grow`` pixels (so its masks are
    exact) and labelled on its own; labels of 8-connected pixels on the two sides of a seam
    (corners included) are joined, so a footprint crossing tiles gets one label, the same
    pixels as labelling the whole image.

    Returns
    -------
    labels : numpy.ndarray of int32
        Footprint label of every pixel (0 for none), numbered 1..n in raster order of the
        footprints' first pixels (independent of the tiling).
    positive, negative : numpy.ndarray of bool
        The grown positive and negative footprints.
    n : int
        Number of footprints.
    """
    shape = sig.shape
    parts = map_tiles(_tile_footprints, [sig], tiles, halo=grow, shape=shape,
                       threshold=threshold, grow=grow, edge=edge, merge=merge)
    positive = assemble(shape, bool, tiles, [p[0] for p in parts])
    negative = assemble(shape, bool, tiles, [p[1] for p in parts])
    counts = [int(p[3].size) for p in parts]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    if len(tiles) == 1:
        return parts[0][2], positive, negative, total
    labels = assemble(shape, np.int32, tiles, [np.where(p[2] > 0, p[2] + np.int32(off), 0)
                                                  for p, off in zip(parts, offsets, strict=False)])
    kinds = np.concatenate([np.zeros(1, np.int8), *(p[3] for p in parts)])
    pairs = _seam_pairs(labels, tiles)
    pairs = pairs[kinds[pairs[:, 0]] == kinds[pairs[:, 1]]]
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                              shape=(total + 1, total + 1))
    _, component = csgraph.connected_components(graph, directed=False)
    # renumber the components in raster order of their first pixel
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    first_comp = component[flat[where]]
    _, first_index = np.unique(first_comp, return_index=True)
    order = np.argsort(where[first_index], kind="stable")
    comps = np.unique(first_comp)[order]
    lut_comp = np.zeros(component.max() + 1, np.int32)
    lut_comp[comps] = np.arange(1, comps.size + 1, dtype=np.int32)
    lut = lut_comp[component]
    lut[0] = 0
    return lut[labels], positive, negative, int(comps.size)


def _peaks(labels: np.ndarray, slices: list, sig: np.ndarray, select: np.ndarray,
           sign: float, radius: int) -> list[tuple[tuple[int, int, float], ...]]:
    """Peaks of each label: selected pixels that are the extreme within ``radius``."""
    result: list[tuple[tuple[int, int, float], ...]] = []
    size = 2 * radius + 1
    for label, sl in enumerate(slices, start=1):
        if sl is None:
            result.append(())
            continue
        use = (labels[sl] == label) & select[sl]
        if not use.any():
            result.append(())
            continue
        local = np.where(use, sign * sig[sl], -np.inf)
        top = ndimage.maximum_filter(local, size=size, mode="constant", cval=-np.inf)
        rows, cols = np.nonzero(use & (local == top))
        values = local[rows, cols]
        order = np.lexsort((cols, rows, -values))  # most significant first, ties by position
        result.append(tuple((int(rows[i] + sl[0].start), int(cols[i] + sl[1].start),
                             float(sign * values[i])) for i in order))
    return result


def detect_footprints(sig: np.ndarray, *, threshold: float, grow: int, edge: int,
                      merge: bool = True, peak_radius: int = 3,
                      tiles: list[tuple[slice, slice]] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Footprint]]:
    """Threshold a significance image into grown, merged footprints with peaks.

    Parameters
    ----------
    sig : numpy.ndarray
        Significance per pixel (see :func:`~daskdiff.detect.threshold.significance`).
    threshold : float
        Detection threshold (sigma); positive pixels ``sig >= threshold``, negative
        ``sig <= -threshold``.
    grow : int
        Growth radius (pixels).
    edge : int
        Border width excluded from detection (EDGE).
    merge : bool, optional
        Merge overlapping positive and negative footprints; if ``False`` the two signs are
        labelled separately (a pixel in both belongs to the positive one).
    peak_radius : int, optional
        A peak is the most significant detected pixel within this radius (a square window);
        a footprint may hold several peaks of each sign.
    tiles : list of (slice, slice), optional
        Tiling of the thresholding and labelling (see :func:`label_tiles`); the whole image
        if omitted. The result does not depend on it.

    Returns
    -------
    labels : numpy.ndarray of int32
        Footprint label of every pixel (0 for none).
    positive, negative : numpy.ndarray of bool
        The grown positive and negative footprints (DETECTED and DETECTED_NEGATIVE).
    footprints : list of Footprint
        One per label, in label order.
    """
    tiles = tiles if tiles is not None else tile_slices(sig.shape)
    labels, positive, negative, n = label_tiles(sig, tiles, threshold=threshold, grow=grow,
                                                edge=edge, merge=merge)
    inner = np.zeros(sig.shape, bool)
    if sig.shape[0] > 2 * edge and sig.shape[1] > 2 * edge:
        inner[edge:sig.shape[0] - edge, edge:sig.shape[1] - edge] = True
    above = inner & (sig >= threshold)
    below = inner & (sig <= -threshold)
    if not merge:
        below &= ~positive
    labels = labels.astype(np.int32, copy=False)
    slices = ndimage.find_objects(labels, max_label=n)
    pos_peaks = _peaks(labels, slices, sig, above, 1.0, peak_radius)
    neg_peaks = _peaks(labels, slices, sig, below, -1.0, peak_radius)
    footprints = [
        Footprint(i + 1, sl, pos_peaks[i], neg_peaks[i])
        for i, sl in enumerate(slices)
        if sl is not None and (pos_peaks[i] or neg_peaks[i])
    ]
    return labels, positive, negative, footprints


def footprint_spans(pixels: np.ndarray, *, y0: int, x0: int) -> np.ndarray:
    """Return the spans ``(y, x_begin, x_end)`` (end exclusive) of a boolean pixel set.

    Parameters
    ----------
    pixels : numpy.ndarray of bool
        The footprint within its box.
    y0, x0 : int
        Parent-frame coordinates of ``pixels[0, 0]``.

    Returns
    -------
    numpy.ndarray
        int32 array of shape ``(n_spans, 3)``, ordered by row then column.
    """
    padded = np.zeros((pixels.shape[0], pixels.shape[1] + 2), np.int8)
    padded[:, 1:-1] = pixels
    change = np.diff(padded, axis=1)
    rows_start, cols_start = np.nonzero(change == 1)
    _, cols_end = np.nonzero(change == -1)
    spans = np.stack([rows_start + y0, cols_start + x0, cols_end + x0], axis=1)
    return spans.astype(np.int32)


def place_sky_sources(avoid: np.ndarray, *, n: int, radius: int,
                      rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pick up to ``n`` blank positions (row, column) for sky sources.

    A position is blank when no ``avoid`` pixel lies within ``radius`` of it and the disk fits
    in the image; chosen positions are at least ``2 * radius`` apart.

    Parameters
    ----------
    avoid : numpy.ndarray of bool
        Pixels to stay away from (detections, NO_DATA, BAD, EDGE).
    n : int
        Number wanted.
    radius : int
        Radius of the blank disk (pixels).
    rng : numpy.random.Generator
        Seeded generator.

    Returns
    -------
    list of (int, int)
        The positions (fewer than ``n`` if the image has no more room).
    """
    ny, nx = avoid.shape
    chosen: list[tuple[int, int]] = []
    if n <= 0 or ny <= 2 * radius or nx <= 2 * radius:
        return chosen
    element = disk(radius)
    min_d2 = (2 * radius) ** 2
    tries = max(50 * n, 1000)
    ys = rng.integers(radius, ny - radius, size=tries)
    xs = rng.integers(radius, nx - radius, size=tries)
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        window = avoid[y - radius:y + radius + 1, x - radius:x + radius + 1]
        if (window & element).any():
            continue
        if all((y - cy) ** 2 + (x - cx) ** 2 >= min_d2 for cy, cx in chosen):
            chosen.append((y, x))
            if len(chosen) == n:
                break
    return chosen
