"""Differential chromatic refraction (DCR): refraction by wavelength and sub-filter shifts.

The refraction model is Stone (1996, PASP 108, 1051): the refractivity of moist air from its
temperature, pressure and humidity (his eqs. 14-20) and the refraction angle as a two-term series
in tan(z) with the Earth's oblateness and the site height (his eq. 10 and the surrounding text).
A DCR template splits a band into equal-width sub-filters; each sub-filter image is displaced on
the detector by the refraction at its wavelengths relative to the band's effective wavelength,
along the direction towards the zenith, which makes the angle ``parallactic - rotation`` with
the detector's +y axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from scipy import ndimage

from .errors import ConfigError, InputError
from .metadata import Observatory, VisitInfo, Weather

__all__ = [
    "dcr_shifts",
    "differential_refraction",
    "parallactic_angle",
    "refraction",
    "refractivity",
    "shift_image",
    "subfilter_edges",
]

_MIN_WAVELENGTH, _MAX_WAVELENGTH = 230.2, 2058.6  # validity of Stone's dispersion formula (nm)


def _water_vapour_pressure(weather: Weather) -> float:
    """Return the partial pressure of water vapour in hPa (Stone eqs. 18 and 20)."""
    if not 0 < weather.humidity <= 100:
        raise InputError(f"relative humidity must be in (0, 100] percent, got {weather.humidity}")
    t = weather.temperature
    log_h = math.log(weather.humidity / 100.0)
    dew = 238.3 * ((t + 238.3) * log_h + 17.2694 * t) / (
        (t + 238.3) * (17.2694 - log_h) - 17.2694 * t)
    coefficients = (4.50874, 0.341724, 0.0106778, 0.184889e-3, 0.238294e-5, 0.203447e-7)
    mm_hg = sum(c * dew**k for k, c in enumerate(coefficients))
    return mm_hg * 1.3332239  # mmHg -> hPa


def refractivity(wavelength: float, weather: Weather) -> float:
    """Return ``n - 1`` of moist air at a wavelength in nm (Stone eqs. 14-16)."""
    if not _MIN_WAVELENGTH <= wavelength <= _MAX_WAVELENGTH:
        raise InputError(f"refraction is modelled for {_MIN_WAVELENGTH}-{_MAX_WAVELENGTH} nm; "
                         f"got {wavelength} nm")
    kelvin = weather.temperature + 273.15
    p_water = _water_vapour_pressure(weather)
    p_dry = weather.pressure - p_water
    k2 = (1e3 / wavelength) ** 2  # squared wave number in 1/micron^2
    dry = 2371.34 + 683939.7 / (130.0 - k2) + 4547.3 / (38.9 - k2)
    wet = 6487.31 + 58.058 * k2 - 0.71150 * k2**2 + 0.08851 * k2**3
    density_dry = (1 + p_dry * (57.90e-8 - 9.3250e-4 / kelvin + 0.25844 / kelvin**2)) * (
        p_dry / kelvin)
    water_term = -2.37321e-3 + 2.23366 / kelvin - 710.792 / kelvin**2 + 7.75141e-4 / kelvin**3
    density_wet = (1 + p_water * (1 + 3.7e-4 * p_water) * water_term) * p_water / kelvin
    return (dry * density_dry + wet * density_wet) * 1e-8


def refraction(wavelength: float, elevation: float, observatory: Observatory,
               weather: Weather) -> float:
    """Return the refraction angle in arcsec at an elevation (deg) and wavelength (nm)."""
    if not 0 < elevation <= 90:
        raise InputError(f"elevation must be in (0, 90] degrees for refraction, got {elevation}")
    n_minus_1 = refractivity(wavelength, weather)
    beta = 4.5908e-6 * (weather.temperature + 273.15)  # scale height over Earth radius
    lat = math.radians(observatory.latitude)
    gravity = (1 + 0.005302 * math.sin(lat) ** 2 - 0.00000583 * math.sin(2 * lat) ** 2
               - 0.000000315 * observatory.elevation)
    tan_z = math.tan(math.radians(90.0 - elevation))
    radians = gravity * n_minus_1 * ((1 - beta) * tan_z - (beta - n_minus_1 / 2) * tan_z**3)
    return math.degrees(radians) * 3600.0


def differential_refraction(wavelength: float, reference_wavelength: float, elevation: float,
                            observatory: Observatory, weather: Weather) -> float:
    """Return refraction at ``wavelength`` minus that at ``reference_wavelength`` (arcsec)."""
    return (refraction(wavelength, elevation, observatory, weather)
            - refraction(reference_wavelength, elevation, observatory, weather))


def parallactic_angle(azimuth: float, elevation: float, latitude: float) -> float:
    """Return the parallactic angle (deg) of a direction given in horizon coordinates.

    Azimuth is measured from north through east; all angles in degrees.
    """
    a, h, phi = (math.radians(v) for v in (azimuth, elevation, latitude))
    sin_dec = math.sin(phi) * math.sin(h) + math.cos(phi) * math.cos(h) * math.cos(a)
    cos_dec = math.sqrt(max(1 - sin_dec * sin_dec, 0.0))
    sin_q = -math.sin(a) * math.cos(phi) / cos_dec
    cos_q = (math.sin(phi) - sin_dec * math.sin(h)) / (cos_dec * math.cos(h))
    return math.degrees(math.atan2(sin_q, cos_q))


def subfilter_edges(effective_wavelength: float, bandwidth: float,
                    num_subfilters: int) -> list[tuple[float, float]]:
    """Return the ``(start, end)`` wavelengths (nm) of equal-width sub-filters of a band."""
    if num_subfilters < 1 or bandwidth <= 0 or effective_wavelength <= 0:
        raise ConfigError(
            "DCR needs num_subfilters >= 1, bandwidth > 0 and effective_wavelength > 0; got "
            f"{num_subfilters}, {bandwidth}, {effective_wavelength}")
    edges = np.linspace(effective_wavelength - bandwidth / 2, effective_wavelength + bandwidth / 2,
                        num_subfilters + 1)
    return [(float(a), float(b)) for a, b in pairwise(edges)]


def dcr_shifts(
    visit_info: VisitInfo,
    *,
    pixel_scale: float,
    effective_wavelength: float,
    bandwidth: float,
    num_subfilters: int = 3,
) -> list[tuple[float, float]]:
    """Return the ``(dy, dx)`` pixel shift of each sub-filter for an observation.

    The shift of a sub-filter is the mean of the differential refraction at its two edge
    wavelengths relative to ``effective_wavelength``, converted to pixels with
    ``pixel_scale`` (arcsec/pixel) and projected on the detector axes with the angle
    ``parallactic_angle - rotation_angle``.

    Raises
    ------
    InputError
        If the visit information lacks the elevation or the parallactic angle.
    """
    elevation = visit_info.elevation
    if math.isnan(elevation) and not math.isnan(visit_info.airmass):
        elevation = 90.0 - math.degrees(math.acos(1.0 / visit_info.airmass))
    if math.isnan(elevation) or math.isnan(visit_info.parallactic_angle):
        raise InputError(
            f"visit {visit_info.visit}: DCR needs the elevation (or airmass) and the parallactic "
            "angle in the visit info")
    rotation = 0.0 if math.isnan(visit_info.rotation_angle) else visit_info.rotation_angle
    angle = math.radians(visit_info.parallactic_angle - rotation)
    shifts = []
    for start, end in subfilter_edges(effective_wavelength, bandwidth, num_subfilters):
        amplitude = 0.5 * sum(
            differential_refraction(w, effective_wavelength, elevation, visit_info.observatory,
                                    visit_info.weather)
            for w in (start, end)
        ) / pixel_scale
        shifts.append((amplitude * math.cos(angle), amplitude * math.sin(angle)))
    return shifts


def shift_image(image: np.ndarray, shift: Sequence[float], *, order: int = 3) -> np.ndarray:
    """Shift an image by ``(dy, dx)`` pixels with spline interpolation (exact for integers).

    Pixels shifted in from outside are 0; non-finite input pixels are treated as 0.
    """
    clean = np.where(np.isfinite(image), image, 0.0)
    dy, dx = float(shift[0]), float(shift[1])
    if dy.is_integer() and dx.is_integer():
        out = np.zeros_like(clean)
        iy, ix = int(dy), int(dx)
        ny, nx = clean.shape
        dst = (slice(max(iy, 0), ny + min(iy, 0)), slice(max(ix, 0), nx + min(ix, 0)))
        src = (slice(max(-iy, 0), ny + min(-iy, 0)), slice(max(-ix, 0), nx + min(-ix, 0)))
        out[dst] = clean[src]
        return out
    return ndimage.shift(clean, (dy, dx), order=order, mode="constant", cval=0.0,
                         prefilter=True)
