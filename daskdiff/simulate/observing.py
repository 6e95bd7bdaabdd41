"""The observing plan: focal plane, visits, site geometry, WCSs, PSFs and refraction.

Conventions
-----------
- **Focal plane.** Detectors sit on a near-square grid separated by ``detector_gap`` pixels; the
  boresight is the centre of the grid. Detector pixel ``(x, y)`` has focal-plane position
  ``(x + u0, y + v0)`` (pixels from the boresight).
- **Rotation.** ``rotation_angle`` of a visit is the position angle (degrees, east of north) of
  the detectors' +y axis. With 0 the images have north up and east left (``CD = s [[-1, 0],
  [0, 1]]``).
- **WCS.** Each detector has a TAN-SIP WCS about the boresight (``CRPIX`` is the boresight in
  the detector's pixel frame) with a radial cubic distortion ``r -> r (1 + k r**2)`` reaching
  ``distortion_pixels`` at the focal-plane corner. The *true* WCS places objects when rendering;
  the *stored* WCS is the true one shifted by the exposure's astrometric error
  ``(error_x, error_y)`` pixels: ``stored.world_to_pixel(sky) = true.world_to_pixel(sky) +
  (error_x, error_y)``.
- **Site.** Cerro Pachon; elevation, azimuth and the airmass (``sec z``) come from
  :class:`astropy.coordinates.AltAz` (no refraction) at the visit MJD, with UT1 = UTC and no
  polar motion (errors far below 1 arcsec; no IERS table is read or downloaded); the
  parallactic angle ``q`` is the position angle (ICRS, east of north) of the zenith seen
  from the boresight.
- **Refraction.** ``R(lambda) = A tan z + B tan**3 z`` with ``A, B`` from ``erfa.refco`` for the
  site weather. The band is split into ``K`` equal sub-filters; an object whose sub-filter flux
  fractions are ``w_k`` is drawn as ``sum_k w_k PSF(x - s_k)`` with ``s_k = R(lambda_k) -
  mean_j R(lambda_j)`` towards the zenith, so an object with a flat spectrum (``w_k = 1/K``)
  sits at its catalogue position.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import erfa
import numpy as np
from astropy import units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.table import QTable
from astropy.time import Time
from astropy.utils import iers
from astropy.wcs import WCS, Sip

from ..box import Box
from ..metadata import RUBIN_OBSERVATORY, Observatory, VisitInfo, Weather
from ..psf.analytic import MoffatPsf
from .config import BAND_WAVELENGTHS_NM, SimulationConfig
from .seeds import rng_for

__all__ = [
    "DetectorGeometry",
    "VisitPlan",
    "dcr_pixel_shifts",
    "dcr_shifts_arcsec",
    "detector_wcs",
    "exposure_psf",
    "focal_plane",
    "footprint_radius_deg",
    "plan_visits",
    "subfilter_weights",
    "subfilter_wavelengths",
    "visit_info",
]

#: Sidereal days per solar day.
SIDEREAL_RATE = 1.00273790935


@dataclass(frozen=True)
class DetectorGeometry:
    """A detector in the focal plane.

    Attributes
    ----------
    id : int
        Detector id.
    box : Box
        Its pixel box (parent frame, starting at 0).
    u0, v0 : float
        Focal-plane position (pixels from the boresight) of its pixel ``(0, 0)``.
    """

    id: int
    box: Box
    u0: float
    v0: float


@dataclass(frozen=True)
class VisitPlan:
    """One visit: pointing, time, site geometry and observing conditions."""

    visit: int
    index: int
    mjd: float
    ra: float
    dec: float
    rotation_angle: float
    hour_angle: float
    elevation: float
    azimuth: float
    airmass: float
    parallactic_angle: float
    seeing_arcsec: float
    transparency: float
    sky: float
    sky_gradient_x: float
    sky_gradient_y: float

    def to_dict(self) -> dict[str, float]:
        """Return the plan as a flat dictionary (for truth tables)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def focal_plane(config: SimulationConfig) -> list[DetectorGeometry]:
    """Return the detectors of the focal plane, ids ``0 .. n_detectors - 1``.

    They fill a grid of ``ceil(sqrt(n))`` columns, row by row, centred on the boresight.
    """
    n = config.n_detectors
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    w, h, gap = config.detector_width, config.detector_height, config.detector_gap
    total_w = ncol * w + (ncol - 1) * gap
    total_h = nrow * h + (nrow - 1) * gap
    detectors = []
    for d in range(n):
        col, row = d % ncol, d // ncol
        u0 = col * (w + gap) - (total_w - 1) / 2.0
        v0 = row * (h + gap) - (total_h - 1) / 2.0
        detectors.append(DetectorGeometry(d, Box(0, 0, w, h), u0, v0))
    return detectors


def _focal_plane_radius_px(config: SimulationConfig) -> float:
    corners = []
    for det in focal_plane(config):
        for x, y in det.box.corners():
            corners.append(math.hypot(x + det.u0, y + det.v0))
    return max(corners)


def footprint_radius_deg(config: SimulationConfig) -> float:
    """Return the radius (degrees) around the field centre that every visit stays within."""
    radius_px = _focal_plane_radius_px(config) + config.distortion_pixels
    return radius_px * config.pixel_scale / 3600.0 + config.dither_arcsec / 3600.0


def subfilter_wavelengths(band: str, n: int) -> np.ndarray:
    """Return the central wavelengths (nm) of ``n`` equal sub-filters of a band."""
    low, high = BAND_WAVELENGTHS_NM[band]
    edges = np.linspace(low, high, n + 1)
    return 0.5 * (edges[:-1] + edges[1:])


def subfilter_weights(color: np.ndarray | float, n: int) -> np.ndarray:
    """Return the sub-filter flux fractions of objects of DCR colour ``color``.

    ``w_k ~ exp(color * t_k)`` with ``t_k`` spanning ``[-1, 1]`` from blue to red, normalised
    to sum 1: colour 0 is a flat spectrum, positive colours are red.

    Returns
    -------
    numpy.ndarray
        ``(len(color), n)`` (or ``(n,)`` for a scalar colour).
    """
    color = np.asarray(color, dtype=float)
    t = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    w = np.exp(color[..., None] * t)
    return w / w.sum(axis=-1, keepdims=True)


def dcr_shifts_arcsec(band: str, n: int, airmass: float, weather: Weather) -> np.ndarray:
    """Return the refraction of each sub-filter relative to their mean (arcsec, to the zenith).

    Parameters
    ----------
    band : str
        The band.
    n : int
        Number of sub-filters.
    airmass : float
        ``sec z``.
    weather : Weather
        Temperature, pressure and humidity at the site.
    """
    if n <= 1:
        return np.zeros(max(n, 1))
    tan_z = math.sqrt(max(airmass * airmass - 1.0, 0.0))
    refraction = []
    for wavelength in subfilter_wavelengths(band, n):
        a, b = erfa.refco(weather.pressure, weather.temperature, weather.humidity / 100.0,
                          wavelength / 1000.0)
        refraction.append((a * tan_z + b * tan_z**3) * 206264.80624709636)
    refraction = np.asarray(refraction)
    return refraction - refraction.mean()


def dcr_pixel_shifts(shifts_arcsec: np.ndarray, parallactic_angle: float,
                     jacobian: np.ndarray) -> np.ndarray:
    """Convert sub-filter refraction shifts (towards the zenith) into pixel offsets.

    Parameters
    ----------
    shifts_arcsec : numpy.ndarray
        ``(K,)`` shifts in arcsec.
    parallactic_angle : float
        Position angle of the zenith (degrees, east of north).
    jacobian : numpy.ndarray
        ``d(xi, eta)/d(x, y)`` in arcsec per pixel (``xi`` east, ``eta`` north).

    Returns
    -------
    numpy.ndarray
        ``(K, 2)`` pixel offsets ``(dx, dy)``.
    """
    q = math.radians(parallactic_angle)
    sky = np.outer(shifts_arcsec, [math.sin(q), math.cos(q)])  # (east, north)
    return np.linalg.solve(jacobian, sky.T).T


def _zero_eop() -> iers.IERS:
    """Return an Earth-orientation table with UT1 = UTC and no polar motion.

    Both are below 1 s of time and 0.5 arcsec, far below what airmass and parallactic angle
    need, and this avoids parsing the full IERS tables (seconds) or downloading them.
    """
    table = QTable({"MJD": [0.0, 100000.0] * u.d, "UT1_UTC": [0.0, 0.0] * u.s,
                    "PM_x": [0.0, 0.0] * u.arcsec, "PM_y": [0.0, 0.0] * u.arcsec})
    return iers.IERS(table)


def _earth_orientation() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(iers.earth_orientation_table.set(_zero_eop()))
    stack.enter_context(iers.conf.set_temp("auto_download", False))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _location(observatory: Observatory) -> EarthLocation:
    return EarthLocation.from_geodetic(observatory.longitude * u.deg,
                                       observatory.latitude * u.deg,
                                       observatory.elevation * u.m)


def _site_geometry(ra: np.ndarray, dec: np.ndarray, mjd: np.ndarray,
                   observatory: Observatory) -> dict[str, np.ndarray]:
    """Return hour angle, elevation, azimuth, airmass and parallactic angle (degrees)."""
    location = _location(observatory)
    with _earth_orientation():
        time = Time(mjd, format="mjd", scale="tai")
        lst = time.sidereal_time("apparent", longitude=location.lon).deg
        frame = AltAz(obstime=time, location=location, pressure=0 * u.hPa)
        target = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs")
        altaz = target.transform_to(frame)
        # the parallactic angle in the ICRS frame of the WCS: the position angle of a point
        # a little closer to the zenith (this includes precession, unlike the textbook formula)
        up = SkyCoord(alt=altaz.alt + 0.01 * u.deg, az=altaz.az, frame=frame).transform_to("icrs")
        parallactic = target.position_angle(up).wrap_at(180 * u.deg).deg
    hour_angle = (lst - ra + 180.0) % 360.0 - 180.0
    elevation = altaz.alt.deg
    return {
        "hour_angle": hour_angle,
        "elevation": elevation,
        "azimuth": altaz.az.deg,
        "airmass": 1.0 / np.sin(np.deg2rad(elevation)),
        "parallactic_angle": parallactic,
    }


def _mjd_at_hour_angle(night: float, ra: float, hour_angle_h: float,
                       observatory: Observatory) -> float:
    """Return the first MJD after ``night`` at which the field has the given hour angle."""
    with _earth_orientation():
        lst0 = Time(night, format="mjd", scale="tai").sidereal_time(
            "apparent", longitude=observatory.longitude * u.deg).hour
    wanted = (ra / 15.0 + hour_angle_h) % 24.0
    delta_h = (wanted - lst0) % 24.0
    return night + delta_h / 24.0 / SIDEREAL_RATE


def plan_visits(config: SimulationConfig, *,
                observatory: Observatory = RUBIN_OBSERVATORY) -> list[VisitPlan]:
    """Return the visit plan of a campaign (deterministic in ``config.seed``).

    Visits are spread over the campaign, one per night, observed within 3.5 hours of the
    meridian; each has its own dither, rotation, seeing, transparency and sky.
    """
    n = config.n_visits
    rng = rng_for(config.seed, "visits")
    spacing = config.campaign_days / max(n - 1, 1)
    nights = np.floor(config.mjd_start + spacing * np.arange(n)) + 0.0
    hour_angles = rng.uniform(-3.5, 3.5, n)
    mjd = np.array([_mjd_at_hour_angle(nights[i], config.ra, hour_angles[i], observatory)
                    for i in range(n)])
    radius = config.dither_arcsec / 3600.0 * np.sqrt(rng.uniform(0, 1, n))
    angle = rng.uniform(0, 2 * np.pi, n)
    cos_dec = math.cos(math.radians(config.dec))
    ra = config.ra + radius * np.cos(angle) / cos_dec
    dec = config.dec + radius * np.sin(angle)
    rotation = rng.uniform(-config.max_rotation, config.max_rotation, n)
    seeing = rng.uniform(*config.seeing_range, n)
    transparency = rng.uniform(*config.transparency_range, n)
    sky = rng.uniform(*config.sky_range, n)
    gradient = rng.uniform(-1.0, 1.0, (n, 2)) * config.sky_gradient / 2.0
    site = _site_geometry(ra, dec, mjd, observatory)
    return [
        VisitPlan(
            visit=1000 + i, index=i, mjd=float(mjd[i]), ra=float(ra[i]), dec=float(dec[i]),
            rotation_angle=float(rotation[i]), hour_angle=float(site["hour_angle"][i]),
            elevation=float(site["elevation"][i]), azimuth=float(site["azimuth"][i]),
            airmass=float(site["airmass"][i]),
            parallactic_angle=float(site["parallactic_angle"][i]),
            seeing_arcsec=float(seeing[i]), transparency=float(transparency[i]),
            sky=float(sky[i]), sky_gradient_x=float(gradient[i, 0]),
            sky_gradient_y=float(gradient[i, 1]),
        )
        for i in range(n)
    ]


def _sip_coefficients(k: float) -> tuple[np.ndarray, np.ndarray]:
    """SIP A, B arrays of the radial distortion ``f = k r**2 (u, v)`` (order 3)."""
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[3, 0], a[1, 2] = k, k  # k u (u^2 + v^2)
    b[2, 1], b[0, 3] = k, k  # k v (u^2 + v^2)
    return a, b


def detector_wcs(config: SimulationConfig, plan: VisitPlan, detector: DetectorGeometry, *,
                 error: tuple[float, float] = (0.0, 0.0)) -> WCS:
    """Return a detector's TAN-SIP WCS (parent-frame 0-based pixels).

    Parameters
    ----------
    config : SimulationConfig
        Pixel scale and distortion.
    plan : VisitPlan
        Pointing and rotation.
    detector : DetectorGeometry
        Position in the focal plane.
    error : tuple of float, optional
        Astrometric error ``(dx, dy)`` in pixels: the returned WCS maps the sky to the true
        pixel position plus this offset.
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [plan.ra, plan.dec]
    crpix = (-detector.u0 + error[0], -detector.v0 + error[1])
    wcs.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]
    theta = math.radians(plan.rotation_angle)
    scale = config.pixel_scale / 3600.0
    wcs.wcs.cd = scale * np.array([[-math.cos(theta), math.sin(theta)],
                                   [math.sin(theta), math.cos(theta)]])
    wcs.wcs.cunit = ["deg", "deg"]
    radius = _focal_plane_radius_px(config)
    k = config.distortion_pixels / radius**3 if radius > 0 else 0.0
    a, b = _sip_coefficients(k)
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.pixel_shape = (detector.box.width, detector.box.height)
    wcs.wcs.set()
    return wcs


def exposure_psf(config: SimulationConfig, plan: VisitPlan, detector: DetectorGeometry
                 ) -> MoffatPsf:
    """Return the true, spatially varying Moffat PSF of one exposure.

    The FWHM at the detector centre is the visit seeing (with a +-3 % detector-to-detector
    scatter); it changes linearly (plus a cross term) by up to ``psf_fwhm_variation`` across
    the detector, and the reduced shear varies linearly with ``|g| <= psf_max_shear``.
    """
    rng = rng_for(config.seed, "psf", plan.visit, detector.id)
    fwhm0 = plan.seeing_arcsec / config.pixel_scale * (1.0 + rng.uniform(-0.03, 0.03))
    v = config.psf_fwhm_variation
    terms = rng.uniform(-1.0, 1.0, 3) * v / 3.0
    fwhm = np.array([[fwhm0, fwhm0 * terms[1]], [fwhm0 * terms[0], fwhm0 * terms[2]]])
    m = config.psf_max_shear / math.sqrt(2.0) / 3.0
    g1c = rng.uniform(-1.0, 1.0, 3) * m
    g2c = rng.uniform(-1.0, 1.0, 3) * m
    g1 = np.array([[g1c[0], g1c[2]], [g1c[1], 0.0]])
    g2 = np.array([[g2c[0], g2c[2]], [g2c[1], 0.0]])
    return MoffatPsf(fwhm, beta=config.psf_beta, g1=g1, g2=g2, box=detector.box)


def visit_info(config: SimulationConfig, plan: VisitPlan, detector: int) -> VisitInfo:
    """Return the :class:`~daskdiff.metadata.VisitInfo` of one exposure."""
    return VisitInfo(
        visit=plan.visit, detector=int(detector), band=config.band,
        physical_filter=f"{config.band}_sim", mjd=plan.mjd, exposure_time=config.exposure_time,
        airmass=plan.airmass, elevation=plan.elevation, azimuth=plan.azimuth,
        parallactic_angle=plan.parallactic_angle, rotation_angle=plan.rotation_angle,
        observatory=RUBIN_OBSERVATORY, weather=Weather(),
    )
