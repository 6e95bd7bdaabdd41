"""World coordinate system helpers around :class:`astropy.wcs.WCS`.

Convention: an exposure's WCS maps **parent-frame** 0-based pixel coordinates ``(x, y)`` (the
exposure's ``x``/``y`` coordinate values) to the sky. A cutout therefore keeps its parent's WCS
unchanged. FITS headers instead describe the array written in the file, whose first pixel is the
parent pixel ``(x0, y0)``; :func:`wcs_to_header` and :func:`wcs_from_header` shift ``CRPIX`` by
the origin, which is exact for TAN, SIP and TPV (their distortions are relative to ``CRPIX``).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .box import Box
from .errors import InputError

__all__ = [
    "copy_wcs",
    "local_jacobian",
    "pixel_scale",
    "pixel_to_sky",
    "sky_polygon",
    "sky_to_pixel",
    "wcs_from_header",
    "wcs_from_string",
    "wcs_to_header",
    "wcs_to_string",
]


def _quiet_wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, relax=True)


def wcs_to_header(wcs: WCS, *, x0: int = 0, y0: int = 0) -> fits.Header:
    """Return FITS cards for ``wcs`` describing an array whose first pixel is ``(x0, y0)``.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        A parent-frame celestial WCS (TAN, TAN-SIP or TPV).
    x0, y0 : int, optional
        Parent-frame coordinates of the array's first pixel.

    Returns
    -------
    astropy.io.fits.Header
        The cards, SIP and PV distortion included, with ``CRPIX`` shifted by ``(-x0, -y0)``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        header = wcs.to_header(relax=True)
    header["CRPIX1"] = float(header["CRPIX1"]) - x0
    header["CRPIX2"] = float(header["CRPIX2"]) - y0
    return header


def wcs_from_header(header: fits.Header, *, x0: int = 0, y0: int = 0,
                    source: str = "header") -> WCS:
    """Return the parent-frame WCS of an array whose first pixel is ``(x0, y0)``.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header with a celestial WCS (TAN, TAN-SIP, TPV, ...).
    x0, y0 : int, optional
        Parent-frame coordinates of the array's first pixel.
    source : str, optional
        Where the header comes from, for error messages (e.g. a file name).

    Raises
    ------
    InputError
        If the header holds no celestial WCS.
    """
    if "CTYPE1" not in header or "CTYPE2" not in header:
        raise InputError(
            f"{source}: no WCS in the header (CTYPE1/CTYPE2 missing); add an astrometric "
            "solution (e.g. with astrometry.net) or pass a WCS explicitly"
        )
    shifted = header.copy(strip=False)
    for key in ("CRPIX1", "CRPIX2"):
        shifted[key] = float(header.get(key, 0.0))
    shifted["CRPIX1"] += x0
    shifted["CRPIX2"] += y0
    try:
        wcs = _quiet_wcs(shifted)
    except Exception as error:  # astropy raises several types for bad WCS cards
        raise InputError(f"{source}: unreadable WCS in the header: {error}") from error
    if not wcs.has_celestial:
        raise InputError(
            f"{source}: the header's WCS ({header.get('CTYPE1')}, {header.get('CTYPE2')}) is not "
            "celestial; daskdiff needs RA/Dec axes"
        )
    return wcs.celestial if wcs.naxis > 2 else wcs


def wcs_to_string(wcs: WCS) -> str:
    """Serialise a parent-frame WCS as a FITS header string (for zarr attributes)."""
    return wcs_to_header(wcs).tostring(sep="\n")


def wcs_from_string(text: str) -> WCS:
    """Inverse of :func:`wcs_to_string`."""
    return wcs_from_header(fits.Header.fromstring(text, sep="\n"), source="serialised WCS")


def copy_wcs(wcs: WCS) -> WCS:
    """Return an independent copy (astropy WCS objects are not thread-safe)."""
    return copy.deepcopy(wcs)


def pixel_to_sky(wcs: WCS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ra, dec)`` in degrees of parent-frame pixel positions."""
    ra, dec = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    return np.asarray(ra), np.asarray(dec)


def sky_to_pixel(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return parent-frame ``(x, y)`` of sky positions in degrees."""
    x, y = wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0, tolerance=1e-10,
                             maxiter=50, quiet=True)
    return np.asarray(x), np.asarray(y)


def local_jacobian(wcs: WCS, x: float, y: float, *, step: float = 0.5) -> np.ndarray:
    """Return the 2x2 Jacobian d(xi, eta)/d(x, y) in arcsec per pixel at a pixel position.

    ``xi`` and ``eta`` are the tangent-plane offsets (east, north) about the sky position of
    ``(x, y)``, so the result is the local linear approximation of the WCS.
    """
    ra0, dec0 = pixel_to_sky(wcs, np.array([x]), np.array([y]))
    px = np.array([x + step, x - step, x, x])
    py = np.array([y, y, y + step, y - step])
    ra, dec = pixel_to_sky(wcs, px, py)
    cosd = np.cos(np.deg2rad(dec0[0]))
    dra = ((ra - ra0[0] + 180.0) % 360.0 - 180.0) * cosd * 3600.0
    ddec = (dec - dec0[0]) * 3600.0
    return np.array([
        [(dra[0] - dra[1]) / (2 * step), (dra[2] - dra[3]) / (2 * step)],
        [(ddec[0] - ddec[1]) / (2 * step), (ddec[2] - ddec[3]) / (2 * step)],
    ])


def pixel_scale(wcs: WCS, x: float, y: float) -> float:
    """Return the local pixel scale in arcsec per pixel (square root of the Jacobian area)."""
    return float(np.sqrt(abs(np.linalg.det(local_jacobian(wcs, x, y)))))


def sky_polygon(wcs: WCS, box: Box, *, points_per_side: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ra, dec)`` of the outline of a pixel box, counter-clockwise in pixels.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Parent-frame WCS.
    box : Box
        Pixel box; its outer pixel edges are traced.
    points_per_side : int, optional
        Points per side (>1 follows distortion along the edges).
    """
    corners = box.corners()
    xs, ys = [], []
    for i in range(4):
        a, b = corners[i], corners[(i + 1) % 4]
        t = np.arange(points_per_side) / points_per_side
        xs.append(a[0] + (b[0] - a[0]) * t)
        ys.append(a[1] + (b[1] - a[1]) * t)
    return pixel_to_sky(wcs, np.concatenate(xs), np.concatenate(ys))
