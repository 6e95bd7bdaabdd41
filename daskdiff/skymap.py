"""Sky maps: tracts with tangent-plane WCSs, divided into overlapping patches (as LSST's).

A :class:`SkyMap` is a set of :class:`Tract` objects. Each tract has

- an *inner region* on the sky (:class:`CircleRegion` for a discrete sky map, :class:`BandRegion`
  for a declination ring or polar cap of a rings sky map): the part of the sky it is the home of;
- a gnomonic (``RA---TAN``/``DEC--TAN``) WCS, north up and east left, centred on its region, in
  its own 0-based pixel frame;
- a pixel :class:`~daskdiff.box.Box` starting at ``(0, 0)`` that holds the projected inner region
  grown by the tract overlap, rounded up to a whole number of patches;
- a grid of :class:`Patch` objects whose *inner* boxes partition the tract box and whose *outer*
  boxes are the inner boxes grown by the patch border and clipped to the tract box.

:meth:`SkyMap.find_patches` answers the question a template builder asks: which ``(tract, patch)``
outer boxes does a detector overlap? The detector outline (corners and points along its edges, so
that distortion is followed) goes through the detector WCS to the sky, then through each nearby
tract's projection into tract pixels, and is clipped against each candidate patch's outer box.

Tract projections are evaluated with closed-form numpy formulas (pure functions, safe to call from
many threads); :attr:`Tract.wcs` returns an equivalent :class:`astropy.wcs.WCS` for other code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
from astropy.wcs import WCS

from .box import Box
from .errors import ConfigError, InputError
from .wcs import pixel_to_sky

__all__ = [
    "BandRegion",
    "CircleRegion",
    "Patch",
    "SkyMap",
    "Tract",
    "TractPatch",
    "angular_separation",
    "clip_polygon_to_box",
    "polygon_area",
]

#: Format tag and version written by :meth:`SkyMap.to_dict`.
SKYMAP_FORMAT = "daskdiff-skymap"
SKYMAP_FORMAT_VERSION = 1

#: Largest angular radius (degrees) a tract may reach from its centre; beyond it the gnomonic
#: projection stretches pixels by more than a factor of four.
MAX_TRACT_RADIUS_DEG = 60.0

#: Largest angular radius (degrees) of a detector footprint accepted by :meth:`SkyMap.find_patches`.
MAX_FOOTPRINT_RADIUS_DEG = 20.0


# --------------------------------------------------------------------------------------------
# Spherical helpers
# --------------------------------------------------------------------------------------------


def angular_separation(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> np.ndarray:
    """Return the great-circle separation in degrees (broadcasting, Vincenty formula).

    Parameters
    ----------
    ra1, dec1, ra2, dec2 : float or array-like
        Positions in degrees.

    Returns
    -------
    numpy.ndarray
        Separations in degrees, in ``[0, 180]``.
    """
    a1, d1, a2, d2 = (np.deg2rad(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    dra = a2 - a1
    num = np.hypot(np.cos(d2) * np.sin(dra),
                   np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(dra))
    den = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(dra)
    return np.rad2deg(np.arctan2(num, den))


def _wrap_ra(ra: Any) -> np.ndarray:
    return np.mod(np.asarray(ra, dtype=float), 360.0)


def _gnomonic(ra0: float, dec0: float, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return standard coordinates ``(xi, eta)`` in degrees (NaN behind the tangent plane)."""
    a0, d0 = math.radians(ra0), math.radians(dec0)
    a = np.deg2rad(np.asarray(ra, dtype=float))
    d = np.deg2rad(np.asarray(dec, dtype=float))
    cos_c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.cos(d) * np.sin(a - a0) / cos_c
        eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cos_c
    behind = ~(cos_c > 1e-12)
    xi = np.where(behind, np.nan, xi)
    eta = np.where(behind, np.nan, eta)
    return np.rad2deg(xi), np.rad2deg(eta)


def _inverse_gnomonic(ra0: float, dec0: float, xi: Any, eta: Any) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_gnomonic` (standard coordinates in degrees)."""
    a0, d0 = math.radians(ra0), math.radians(dec0)
    x = np.deg2rad(np.asarray(xi, dtype=float))
    y = np.deg2rad(np.asarray(eta, dtype=float))
    den = math.cos(d0) - y * math.sin(d0)
    ra = a0 + np.arctan2(x, den)
    dec = np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, den))
    return _wrap_ra(np.rad2deg(ra)), np.rad2deg(dec)


# --------------------------------------------------------------------------------------------
# Polygon helpers
# --------------------------------------------------------------------------------------------


def polygon_area(x: np.ndarray, y: np.ndarray) -> float:
    """Return the absolute area of a simple polygon (shoelace formula)."""
    if len(x) < 3:
        return 0.0
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def clip_polygon_to_box(
    x: np.ndarray, y: np.ndarray, bounds: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Clip a polygon against an axis-aligned rectangle (Sutherland-Hodgman).

    The polygon may be concave; the rectangle is convex, which is all the algorithm needs.

    Parameters
    ----------
    x, y : numpy.ndarray
        Polygon vertices, in order (either orientation).
    bounds : tuple of float
        ``(xmin, ymin, xmax, ymax)`` of the rectangle.

    Returns
    -------
    tuple of numpy.ndarray
        The vertices of the clipped polygon (empty arrays if nothing is left).
    """
    xmin, ymin, xmax, ymax = bounds
    points = list(zip(np.asarray(x, float).tolist(), np.asarray(y, float).tolist(), strict=True))
    # Each edge: (axis, limit, keep_greater)
    for axis, limit, keep_greater in ((0, xmin, True), (0, xmax, False),
                                      (1, ymin, True), (1, ymax, False)):
        if not points:
            break
        points = _clip_half_plane(points, axis, limit, keep_greater)
    if not points:
        return np.empty(0), np.empty(0)
    arr = np.asarray(points)
    return arr[:, 0], arr[:, 1]


def _clip_half_plane(points: list[tuple[float, float]], axis: int, limit: float,
                     keep_greater: bool) -> list[tuple[float, float]]:
    def inside(p: tuple[float, float]) -> bool:
        return p[axis] >= limit if keep_greater else p[axis] <= limit

    def crossing(p: tuple[float, float], q: tuple[float, float]) -> tuple[float, float]:
        t = (limit - p[axis]) / (q[axis] - p[axis])
        other = 1 - axis
        value = p[other] + t * (q[other] - p[other])
        return (limit, value) if axis == 0 else (value, limit)

    out: list[tuple[float, float]] = []
    previous = points[-1]
    for current in points:
        if inside(current):
            if not inside(previous):
                out.append(crossing(previous, current))
            out.append(current)
        elif inside(previous):
            out.append(crossing(previous, current))
        previous = current
    return out


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CircleRegion:
    """A spherical cap: every position within ``radius`` degrees of ``(ra, dec)``."""

    ra: float
    dec: float
    radius: float

    def contains(self, ra: Any, dec: Any) -> np.ndarray:
        """Return whether positions (degrees) lie in the region."""
        return angular_separation(self.ra, self.dec, ra, dec) <= self.radius

    def boundary(self, n: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Return ``n`` points (degrees) along the region's outline."""
        theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        r = math.radians(self.radius)
        xi = np.rad2deg(np.tan(r) * np.cos(theta))
        eta = np.rad2deg(np.tan(r) * np.sin(theta))
        return _inverse_gnomonic(self.ra, self.dec, xi, eta)

    def bounding_radius(self) -> float:
        """Return the largest separation (degrees) of a region point from its centre."""
        return self.radius

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary."""
        return {"type": "circle", "ra": self.ra, "dec": self.dec, "radius": self.radius}


@dataclass(frozen=True)
class BandRegion:
    """A declination band ``dec_min <= dec < dec_max`` limited in RA to ``[ra_min, ra_min+width)``.

    A polar cap is a band reaching ``-90`` or ``+90`` with ``ra_width = 360``. The north pole
    itself (``dec = +90``) belongs to the band whose ``dec_max`` is 90.
    """

    dec_min: float
    dec_max: float
    ra_min: float
    ra_width: float

    @property
    def center(self) -> tuple[float, float]:
        """The projection centre ``(ra, dec)``: a pole for a cap, the middle otherwise."""
        if self.ra_width >= 360.0:
            if self.dec_min <= -90.0:
                return (0.0, -90.0)
            if self.dec_max >= 90.0:
                return (0.0, 90.0)
        return (float(_wrap_ra(self.ra_min + self.ra_width / 2.0)),
                (self.dec_min + self.dec_max) / 2.0)

    def contains(self, ra: Any, dec: Any) -> np.ndarray:
        """Return whether positions (degrees) lie in the region."""
        dec = np.asarray(dec, dtype=float)
        in_dec = (dec >= self.dec_min) & ((dec < self.dec_max) | (self.dec_max >= 90.0))
        if self.ra_width >= 360.0:
            return in_dec & np.isfinite(np.asarray(ra, dtype=float))
        offset = _wrap_ra(np.asarray(ra, dtype=float) - self.ra_min)
        return in_dec & (offset < self.ra_width)

    def boundary(self, n: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Return points (degrees) along the region's outline (about ``n`` in all)."""
        if self.ra_width >= 360.0:
            edge = self.dec_max if self.dec_min <= -90.0 else self.dec_min
            ra = np.linspace(0.0, 360.0, n, endpoint=False)
            return ra, np.full(n, edge)
        k = max(n // 4, 2)
        ra = np.linspace(self.ra_min, self.ra_min + self.ra_width, k)
        dec = np.linspace(self.dec_min, self.dec_max, k)
        ras = np.concatenate([ra, np.full(k, ra[-1]), ra[::-1], np.full(k, ra[0])])
        decs = np.concatenate([np.full(k, self.dec_min), dec, np.full(k, self.dec_max), dec[::-1]])
        return _wrap_ra(ras), decs

    def bounding_radius(self) -> float:
        """Return an upper bound (degrees) on the separation of a region point from its centre."""
        return _band_radius(self.dec_min, self.dec_max, self.ra_width)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary."""
        return {"type": "band", "dec_min": self.dec_min, "dec_max": self.dec_max,
                "ra_min": self.ra_min, "ra_width": self.ra_width}


Region = CircleRegion | BandRegion


@functools.lru_cache(maxsize=4096)
def _band_radius(dec_min: float, dec_max: float, ra_width: float) -> float:
    """Bounding radius of a band region (independent of its RA), with a 1 % margin."""
    band = BandRegion(dec_min, dec_max, 0.0, ra_width)
    ra, dec = band.boundary(64)
    ra0, dec0 = band.center
    return 1.01 * float(np.max(angular_separation(ra0, dec0, ra, dec)))


def _region_from_dict(data: dict[str, Any]) -> Region:
    kind = data.get("type")
    if kind == "circle":
        return CircleRegion(float(data["ra"]), float(data["dec"]), float(data["radius"]))
    if kind == "band":
        return BandRegion(float(data["dec_min"]), float(data["dec_max"]),
                          float(data["ra_min"]), float(data["ra_width"]))
    raise InputError(f"unknown tract region type {kind!r} in a sky map; expected 'circle' or "
                     "'band' (was the file written by daskdiff?)")


# --------------------------------------------------------------------------------------------
# Patches and tracts
# --------------------------------------------------------------------------------------------


class TractPatch(NamedTuple):
    """A ``(tract_id, patch_id)`` pair, as returned by :meth:`SkyMap.find_patches`."""

    tract_id: int
    patch_id: int


@dataclass(frozen=True)
class Patch:
    """One patch of a tract.

    Attributes
    ----------
    tract_id : int
        The tract it belongs to.
    index : tuple of int
        ``(ix, iy)`` position in the tract's patch grid.
    id : int
        The flat id ``iy * n_patches_x + ix``.
    inner_box : Box
        The pixels this patch is the home of (tract pixel frame).
    outer_box : Box
        ``inner_box`` grown by the patch border and clipped to the tract box.
    """

    tract_id: int
    index: tuple[int, int]
    id: int
    inner_box: Box
    outer_box: Box


@dataclass(frozen=True)
class Tract:
    """A tract: a tangent-plane pixel grid on the sky, divided into patches.

    Parameters
    ----------
    id : int
        Tract id (>= 0).
    ra, dec : float
        Projection centre (CRVAL) in degrees.
    pixel_scale_arcsec : float
        Pixel scale at the centre.
    box : Box
        The tract's pixels, starting at ``(0, 0)``; a whole number of patches on each axis.
    patch_inner : int
        Inner patch size in pixels.
    patch_border : int
        Patch border (overlap with neighbours) in pixels.
    region : CircleRegion or BandRegion
        The tract's inner region on the sky.
    """

    id: int
    ra: float
    dec: float
    pixel_scale_arcsec: float
    box: Box
    patch_inner: int
    patch_border: int
    region: Region

    def __post_init__(self) -> None:
        if self.box.x0 != 0 or self.box.y0 != 0:
            raise InputError(f"tract {self.id}: its box must start at (0, 0), got {self.box}")
        if self.patch_inner <= 0 or self.patch_border < 0:
            raise ConfigError(
                f"tract {self.id}: patch_inner must be > 0 and patch_border >= 0, got "
                f"{self.patch_inner} and {self.patch_border}")
        if self.box.width % self.patch_inner or self.box.height % self.patch_inner:
            raise InputError(
                f"tract {self.id}: box {self.box.shape} is not a whole number of "
                f"{self.patch_inner}-pixel patches")

    # --- projection -----------------------------------------------------------------------

    @property
    def center_pixel(self) -> tuple[float, float]:
        """Pixel position ``(x, y)`` of the projection centre (the centre of the box)."""
        return ((self.box.width - 1) / 2.0, (self.box.height - 1) / 2.0)

    @property
    def wcs(self) -> WCS:
        """A new :class:`astropy.wcs.WCS` equal to the tract projection (0-based pixel frame)."""
        wcs = WCS(naxis=2)
        cx, cy = self.center_pixel
        scale = self.pixel_scale_arcsec / 3600.0
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [self.ra, self.dec]
        wcs.wcs.crpix = [cx + 1.0, cy + 1.0]
        wcs.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
        wcs.wcs.cunit = ["deg", "deg"]
        wcs.wcs.lonpole = 180.0  # the FITS default except at the north pole, where it is 0
        wcs.pixel_shape = (self.box.width, self.box.height)
        return wcs

    def sky_to_pixel(self, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
        """Return tract pixel ``(x, y)`` of sky positions (NaN for the far hemisphere)."""
        xi, eta = _gnomonic(self.ra, self.dec, ra, dec)
        scale = self.pixel_scale_arcsec / 3600.0
        cx, cy = self.center_pixel
        return cx - xi / scale, cy + eta / scale

    def pixel_to_sky(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ra, dec)`` in degrees of tract pixel positions."""
        scale = self.pixel_scale_arcsec / 3600.0
        cx, cy = self.center_pixel
        xi = -(np.asarray(x, dtype=float) - cx) * scale
        eta = (np.asarray(y, dtype=float) - cy) * scale
        return _inverse_gnomonic(self.ra, self.dec, xi, eta)

    def bounding_radius(self) -> float:
        """Return the largest separation (degrees) of a tract-box corner from the centre."""
        cx, cy = self.center_pixel
        half = math.hypot(cx + 0.5, cy + 0.5) * self.pixel_scale_arcsec / 3600.0
        return math.degrees(math.atan(math.radians(half)))

    def contains(self, ra: Any, dec: Any) -> np.ndarray:
        """Return whether sky positions fall inside the tract box."""
        x, y = self.sky_to_pixel(ra, dec)
        return np.asarray(self.box.contains(np.nan_to_num(x, nan=-1e30),
                                            np.nan_to_num(y, nan=-1e30)))

    # --- patches --------------------------------------------------------------------------

    @property
    def n_patches(self) -> tuple[int, int]:
        """Number of patches ``(nx, ny)``."""
        return (self.box.width // self.patch_inner, self.box.height // self.patch_inner)

    def patch(self, patch: int | tuple[int, int]) -> Patch:
        """Return a patch by flat id or ``(ix, iy)`` index.

        Raises
        ------
        InputError
            If the patch is not in this tract.
        """
        nx, ny = self.n_patches
        if isinstance(patch, tuple | list):
            ix, iy = (int(v) for v in patch)
        else:
            if not isinstance(patch, int | np.integer) or isinstance(patch, bool):
                raise InputError(f"patch must be an int id or an (ix, iy) pair, got {patch!r}")
            ix, iy = int(patch) % nx, int(patch) // nx
            if patch < 0:
                iy = -1
        if not (0 <= ix < nx and 0 <= iy < ny):
            raise InputError(
                f"patch {patch!r} is not in tract {self.id}, which has {nx} x {ny} patches "
                f"(ids 0..{nx * ny - 1})")
        size = self.patch_inner
        inner = Box(ix * size, iy * size, size, size)
        outer = inner.grow(self.patch_border).intersection(self.box)
        return Patch(self.id, (ix, iy), iy * nx + ix, inner, outer)

    def patches(self) -> Iterator[Patch]:
        """Iterate over all patches, by increasing id."""
        nx, ny = self.n_patches
        for iy in range(ny):
            for ix in range(nx):
                yield self.patch((ix, iy))

    def patches_overlapping(self, x: np.ndarray, y: np.ndarray) -> list[int]:
        """Return ids of patches whose outer boxes overlap a polygon in tract pixels.

        Parameters
        ----------
        x, y : numpy.ndarray
            Polygon vertices in tract pixel coordinates (any finite values).

        Returns
        -------
        list of int
            Sorted patch ids whose outer box shares a non-zero area with the polygon.
        """
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        nx, ny = self.n_patches
        size, border = self.patch_inner, self.patch_border
        # candidate ranges from the polygon's bounding box (edges are at integer - 0.5)
        ix0 = max(math.floor((x.min() + 0.5 - border) / size) - 1, 0)
        ix1 = min(math.floor((x.max() + 0.5 + border) / size) + 1, nx - 1)
        iy0 = max(math.floor((y.min() + 0.5 - border) / size) - 1, 0)
        iy1 = min(math.floor((y.max() + 0.5 + border) / size) + 1, ny - 1)
        found = []
        for iy in range(iy0, iy1 + 1):
            for ix in range(ix0, ix1 + 1):
                outer = self.patch((ix, iy)).outer_box
                bounds = (outer.x0 - 0.5, outer.y0 - 0.5, outer.x1 - 0.5, outer.y1 - 0.5)
                cx, cy = clip_polygon_to_box(x, y, bounds)
                if polygon_area(cx, cy) > 1e-9:
                    found.append(iy * nx + ix)
        return found

    # --- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary."""
        return {
            "id": self.id, "ra": self.ra, "dec": self.dec,
            "pixel_scale_arcsec": self.pixel_scale_arcsec, "box": self.box.to_list(),
            "patch_inner": self.patch_inner, "patch_border": self.patch_border,
            "region": self.region.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tract:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                id=int(data["id"]), ra=float(data["ra"]), dec=float(data["dec"]),
                pixel_scale_arcsec=float(data["pixel_scale_arcsec"]),
                box=Box.from_list(data["box"]), patch_inner=int(data["patch_inner"]),
                patch_border=int(data["patch_border"]),
                region=_region_from_dict(data["region"]),
            )
        except KeyError as error:
            raise InputError(f"a tract in the sky map lacks the field {error}; the sky map "
                             "file is incomplete, write it again with SkyMap.to_dict()") from error


def _build_tract(tract_id: int, region: Region, *, center: tuple[float, float],
                 pixel_scale_arcsec: float, overlap_deg: float, patch_inner: int,
                 patch_border: int) -> Tract:
    """Build a tract whose box holds ``region`` grown by ``overlap_deg``, in whole patches."""
    ra0, dec0 = center
    scale = pixel_scale_arcsec / 3600.0
    ra_b, dec_b = region.boundary(256)
    xi, eta = _gnomonic(ra0, dec0, ra_b, dec_b)
    if not (np.all(np.isfinite(xi)) and np.all(np.isfinite(eta))):
        raise ConfigError(f"tract {tract_id}: its region reaches the far side of the sky; "
                          "use a smaller radius or more rings")
    overlap_px = math.degrees(math.tan(math.radians(overlap_deg))) / scale
    half_x = float(np.max(np.abs(xi))) / scale + overlap_px + 1.0
    half_y = float(np.max(np.abs(eta))) / scale + overlap_px + 1.0
    nx = max(math.ceil(2.0 * half_x / patch_inner), 1)
    ny = max(math.ceil(2.0 * half_y / patch_inner), 1)
    tract = Tract(
        id=tract_id, ra=float(ra0), dec=float(dec0), pixel_scale_arcsec=float(pixel_scale_arcsec),
        box=Box(0, 0, nx * patch_inner, ny * patch_inner), patch_inner=int(patch_inner),
        patch_border=int(patch_border), region=region,
    )
    if tract.bounding_radius() > MAX_TRACT_RADIUS_DEG:
        raise ConfigError(
            f"tract {tract_id} would reach {tract.bounding_radius():.1f} deg from its centre "
            f"(limit {MAX_TRACT_RADIUS_DEG} deg); use a smaller radius or more rings")
    return tract


# --------------------------------------------------------------------------------------------
# Sky maps
# --------------------------------------------------------------------------------------------


def _check_geometry(pixel_scale_arcsec: float, patch_inner: int, patch_border: int,
                    overlap_deg: float) -> None:
    if not pixel_scale_arcsec > 0:
        raise ConfigError(f"pixel_scale_arcsec must be > 0, got {pixel_scale_arcsec!r}")
    if not isinstance(patch_inner, int | np.integer) or patch_inner <= 0:
        raise ConfigError(f"patch_inner must be a positive integer, got {patch_inner!r}")
    if not isinstance(patch_border, int | np.integer) or patch_border < 0:
        raise ConfigError(f"patch_border must be an integer >= 0, got {patch_border!r}")
    if not overlap_deg >= 0:
        raise ConfigError(f"tract_overlap_deg must be >= 0, got {overlap_deg!r}")


class SkyMap:
    """A set of tracts covering (part of) the sky.

    Build one with :meth:`discrete` or :meth:`rings`; store it with :meth:`to_dict`.

    Parameters
    ----------
    tracts : sequence of Tract
        The tracts; their ids must be unique.
    kind : str, optional
        How it was built (``"discrete"``, ``"rings"`` or ``"custom"``).
    config : dict, optional
        The build parameters (kept for provenance).
    """

    def __init__(self, tracts: Sequence[Tract], *, kind: str = "custom",
                 config: dict[str, Any] | None = None) -> None:
        ids = [t.id for t in tracts]
        if len(set(ids)) != len(ids):
            raise InputError(f"tract ids must be unique, got {ids}")
        if not tracts:
            raise InputError("a sky map needs at least one tract")
        self._tracts = {t.id: t for t in tracts}
        self.kind = kind
        self.config = dict(config or {})
        self._centers = np.array([[t.ra, t.dec] for t in tracts])
        self._ids = np.array(ids)
        self._radii = np.array([t.bounding_radius() for t in tracts])
        self._region_radii = np.array([t.region.bounding_radius() for t in tracts])

    # --- constructors ---------------------------------------------------------------------

    @classmethod
    def discrete(
        cls,
        centers: Iterable[tuple[float, float]],
        *,
        radius_deg: float,
        pixel_scale_arcsec: float = 0.2,
        tract_overlap_deg: float = 1.0 / 60.0,
        patch_inner: int = 4000,
        patch_border: int = 100,
    ) -> SkyMap:
        """Build one tract per centre (LSST's DiscreteSkyMap).

        Parameters
        ----------
        centers : iterable of (float, float)
            Tract centres ``(ra, dec)`` in degrees; tract ``i`` is centred on ``centers[i]``.
        radius_deg : float
            Radius of each tract's inner region.
        pixel_scale_arcsec : float, optional
            Pixel scale of the tracts.
        tract_overlap_deg : float, optional
            Margin beyond the radius that each tract box also covers.
        patch_inner, patch_border : int, optional
            Patch inner size and border in pixels.

        Returns
        -------
        SkyMap
        """
        _check_geometry(pixel_scale_arcsec, patch_inner, patch_border, tract_overlap_deg)
        centers = [(float(ra), float(dec)) for ra, dec in centers]
        if not centers:
            raise ConfigError("SkyMap.discrete needs at least one centre (ra, dec)")
        if not 0 < radius_deg < MAX_TRACT_RADIUS_DEG:
            raise ConfigError(f"radius_deg must be in (0, {MAX_TRACT_RADIUS_DEG}), got "
                              f"{radius_deg!r}")
        for ra, dec in centers:
            if not -90.0 <= dec <= 90.0 or not np.isfinite(ra):
                raise ConfigError(f"tract centre ({ra}, {dec}) is not a valid (ra, dec) in degrees")
        tracts = [
            _build_tract(i, CircleRegion(float(_wrap_ra(ra)), dec, float(radius_deg)),
                         center=(float(_wrap_ra(ra)), dec), pixel_scale_arcsec=pixel_scale_arcsec,
                         overlap_deg=tract_overlap_deg, patch_inner=int(patch_inner),
                         patch_border=int(patch_border))
            for i, (ra, dec) in enumerate(centers)
        ]
        config = {"centers": [list(c) for c in centers], "radius_deg": radius_deg,
                  "pixel_scale_arcsec": pixel_scale_arcsec,
                  "tract_overlap_deg": tract_overlap_deg, "patch_inner": int(patch_inner),
                  "patch_border": int(patch_border)}
        return cls(tracts, kind="discrete", config=config)

    @classmethod
    def rings(
        cls,
        *,
        num_rings: int,
        ra_start: float = 0.0,
        pixel_scale_arcsec: float = 0.2,
        tract_overlap_deg: float = 1.0 / 60.0,
        patch_inner: int = 4000,
        patch_border: int = 100,
    ) -> SkyMap:
        """Tessellate the whole sky with declination rings of tracts (LSST's RingsSkyMap idea).

        The sky is cut into ``num_rings`` declination rings of height ``180 / (num_rings + 1)``
        degrees plus two polar caps of half that height. Each ring holds enough tracts, evenly
        spaced in RA, that a tract is no wider than the ring height at the ring edge nearer the
        equator. Every position belongs to exactly one tract's inner region; tract boxes hold
        their region grown by ``tract_overlap_deg``, so neighbouring tracts overlap.

        Parameters
        ----------
        num_rings : int
            Number of declination rings between the polar caps (>= 3).
        ra_start : float, optional
            RA (degrees) of the centre of the first tract of each ring.
        pixel_scale_arcsec, tract_overlap_deg, patch_inner, patch_border
            As in :meth:`discrete`.

        Returns
        -------
        SkyMap
            Tract 0 is the south cap, then the rings from south to north, then the north cap.
        """
        _check_geometry(pixel_scale_arcsec, patch_inner, patch_border, tract_overlap_deg)
        if not isinstance(num_rings, int | np.integer) or num_rings < 3:
            raise ConfigError(f"num_rings must be an integer >= 3, got {num_rings!r} (fewer rings "
                              "make tracts too large for a tangent-plane projection)")
        height = 180.0 / (num_rings + 1)
        regions: list[BandRegion] = [BandRegion(-90.0, -90.0 + height / 2.0, 0.0, 360.0)]
        edges = [-90.0 + height / 2.0 + i * height for i in range(num_rings + 1)]
        regions[0] = BandRegion(-90.0, edges[0], 0.0, 360.0)
        for i in range(num_rings):
            dec_min, dec_max = edges[i], edges[i + 1]
            widest = 1.0 if dec_min <= 0.0 <= dec_max else max(
                math.cos(math.radians(dec_min)), math.cos(math.radians(dec_max)))
            n = max(math.ceil(360.0 * widest / height - 1e-9), 1)
            width = 360.0 / n
            for j in range(n):
                ra_min = float(_wrap_ra(ra_start + j * width - width / 2.0))
                regions.append(BandRegion(dec_min, dec_max, ra_min, width))
        regions.append(BandRegion(edges[-1], 90.0, 0.0, 360.0))
        geometry = {"pixel_scale_arcsec": pixel_scale_arcsec, "overlap_deg": tract_overlap_deg,
                    "patch_inner": int(patch_inner), "patch_border": int(patch_border)}
        tracts: list[Tract] = []
        for i, region in enumerate(regions):
            previous = tracts[-1] if tracts else None
            if (previous is not None and isinstance(previous.region, BandRegion)
                    and (previous.region.dec_min, previous.region.dec_max,
                         previous.region.ra_width)
                    == (region.dec_min, region.dec_max, region.ra_width)):
                # same ring: the same box, rotated in RA
                ra0, dec0 = region.center
                tracts.append(replace(previous, id=i, ra=ra0, dec=dec0, region=region))
            else:
                tracts.append(_build_tract(i, region, center=region.center, **geometry))
        config = {"num_rings": int(num_rings), "ra_start": ra_start,
                  "pixel_scale_arcsec": pixel_scale_arcsec,
                  "tract_overlap_deg": tract_overlap_deg, "patch_inner": int(patch_inner),
                  "patch_border": int(patch_border)}
        return cls(tracts, kind="rings", config=config)

    # --- container protocol ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tracts)

    def __iter__(self) -> Iterator[Tract]:
        return iter(self._tracts.values())

    def __getitem__(self, tract_id: int) -> Tract:
        try:
            return self._tracts[int(tract_id)]
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"tract {tract_id!r} is not in this sky map; tract ids are "
                f"{min(self._tracts)}..{max(self._tracts)}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkyMap) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SkyMap(kind={self.kind!r}, tracts={len(self)})"

    @property
    def tract_ids(self) -> list[int]:
        """The tract ids, in order."""
        return list(self._tracts)

    def patch(self, tract_id: int, patch: int | tuple[int, int]) -> Patch:
        """Return patch ``patch`` (id or ``(ix, iy)``) of tract ``tract_id``."""
        return self[tract_id].patch(patch)

    # --- lookups --------------------------------------------------------------------------

    def find_tracts(self, ra: float, dec: float) -> list[Tract]:
        """Return the tracts whose inner region contains a position (nearest centre first)."""
        sep = angular_separation(self._centers[:, 0], self._centers[:, 1], ra, dec)
        order = np.argsort(sep, kind="stable")
        found = []
        for k in order:
            if sep[k] > self._region_radii[k] + 1e-9:
                continue
            tract = self._tracts[int(self._ids[k])]
            if bool(tract.region.contains(ra, dec)):
                found.append(tract)
        return found

    def find_tract(self, ra: float, dec: float) -> Tract:
        """Return the home tract of a position: the nearest-centred tract whose region holds it.

        Raises
        ------
        InputError
            If no tract's inner region contains the position.
        """
        found = self.find_tracts(ra, dec)
        if not found:
            raise InputError(
                f"position ({ra:.6f}, {dec:.6f}) is in no tract of this {self.kind} sky map; "
                "build a sky map that covers it")
        return found[0]

    def find_patches(self, wcs: WCS, box: Box, *, points_per_side: int = 16) -> list[TractPatch]:
        """Return the ``(tract_id, patch_id)`` whose outer boxes overlap a detector.

        Parameters
        ----------
        wcs : astropy.wcs.WCS
            The detector's parent-frame WCS (distortion is followed).
        box : Box
            The detector's pixel box (parent frame).
        points_per_side : int, optional
            Points traced along each detector edge.

        Returns
        -------
        list of TractPatch
            Sorted pairs; empty if the detector touches no tract.

        Raises
        ------
        InputError
            If the box is empty, the WCS gives non-finite positions, or the footprint is
            implausibly large.
        """
        if box.is_empty:
            raise InputError(f"cannot look up patches for an empty detector box {box}")
        if points_per_side < 1:
            raise InputError(f"points_per_side must be >= 1, got {points_per_side}")
        corners = box.corners()
        t = np.arange(points_per_side) / points_per_side
        px = np.concatenate([corners[i, 0] + (corners[(i + 1) % 4, 0] - corners[i, 0]) * t
                             for i in range(4)])
        py = np.concatenate([corners[i, 1] + (corners[(i + 1) % 4, 1] - corners[i, 1]) * t
                             for i in range(4)])
        ra, dec = pixel_to_sky(wcs, px, py)
        cra, cdec = pixel_to_sky(wcs, np.array([box.center[0]]), np.array([box.center[1]]))
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec)) and np.isfinite(cra[0])):
            raise InputError(f"the detector WCS gives non-finite sky positions for box {box}; "
                             "check the WCS (SIP terms, CRPIX) of this detector")
        radius = float(np.max(angular_separation(cra[0], cdec[0], ra, dec)))
        if radius > MAX_FOOTPRINT_RADIUS_DEG:
            raise InputError(
                f"detector footprint reaches {radius:.1f} deg from its centre (limit "
                f"{MAX_FOOTPRINT_RADIUS_DEG} deg); check the detector WCS and box {box}")
        sep = angular_separation(self._centers[:, 0], self._centers[:, 1], cra[0], cdec[0])
        near = np.nonzero(sep <= self._radii + radius + 1e-6)[0]
        found: list[TractPatch] = []
        for k in near:
            tract = self._tracts[int(self._ids[k])]
            x, y = tract.sky_to_pixel(ra, dec)
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                continue  # part of the outline is behind the tract's tangent plane: far away
            found.extend(TractPatch(tract.id, p) for p in tract.patches_overlapping(x, y))
        return sorted(found)

    # --- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary describing every tract exactly."""
        return {"format": SKYMAP_FORMAT, "version": SKYMAP_FORMAT_VERSION, "kind": self.kind,
                "config": self.config, "tracts": [t.to_dict() for t in self]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkyMap:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        InputError
            If ``data`` is not a daskdiff sky map of a known version.
        """
        if not isinstance(data, dict) or data.get("format") != SKYMAP_FORMAT:
            raise InputError("not a daskdiff sky map (no 'format': 'daskdiff-skymap' entry); "
                             "write sky maps with SkyMap.to_dict()")
        if data.get("version") != SKYMAP_FORMAT_VERSION:
            raise InputError(f"sky map format version {data.get('version')!r} is not supported "
                             f"(this daskdiff reads version {SKYMAP_FORMAT_VERSION})")
        tracts = [Tract.from_dict(t) for t in data.get("tracts", [])]
        return cls(tracts, kind=str(data.get("kind", "custom")), config=data.get("config"))
