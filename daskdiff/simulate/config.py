"""The simulation configuration: one frozen, validated dataclass.

Every size, density and range of the simulated survey is a field of :class:`SimulationConfig`;
the presets of :mod:`daskdiff.simulate.presets` are instances of it. Validation happens on
construction (:class:`~daskdiff.errors.ConfigError` naming the field, the value and the fix),
so an impossible configuration is rejected before anything is rendered or written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError

__all__ = ["BAND_WAVELENGTHS_NM", "SimulationConfig"]

#: Band edges (nm) of the LSST filters, used for differential chromatic refraction.
BAND_WAVELENGTHS_NM: dict[str, tuple[float, float]] = {
    "u": (320.0, 400.0),
    "g": (400.0, 552.0),
    "r": (552.0, 691.0),
    "i": (691.0, 818.0),
    "z": (818.0, 922.0),
    "y": (922.0, 1060.0),
}


def _range(low: float, high: float) -> tuple[float, float]:
    return (float(low), float(high))


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a simulated survey (with its seed, it fixes every byte).

    Sizes are in pixels, angles in degrees unless the name says ``arcsec``, fluxes in AB
    magnitudes or counts as named. Densities are per square arcminute of sky.

    Parameters
    ----------
    name : str
        Preset name (informational).
    seed : int
        Master seed; every random draw derives from it.
    n_visits, n_detectors : int
        Number of visits and of detectors per visit.
    detector_width, detector_height : int
        Detector size in pixels.
    detector_gap : int
        Gap between neighbouring detectors in the focal plane (pixels).
    pixel_scale : float
        Arcsec per pixel at the boresight.
    band : str
        The band of every visit (``u g r i z y``).
    ra, dec : float
        Field centre (degrees).
    mjd_start : float
        MJD of the first night.
    campaign_days : float
        Span of the campaign (visits are spread over it, one visit per night at most).
    exposure_time : float
        Seconds.
    zero_point : float
        AB magnitude of one count at transparency 1.
    gain : float
        Electrons per count.
    read_noise : float
        Read noise in electrons.
    saturation : float
        Saturation level in counts.
    seeing_range : tuple of float
        Range of the per-visit PSF FWHM (arcsec) at the detector centre.
    psf_beta : float
        Moffat index of every PSF.
    psf_fwhm_variation : float
        Largest fractional change of the FWHM across a detector.
    psf_max_shear : float
        Largest PSF reduced shear ``|g|`` anywhere.
    transparency_range : tuple of float
        Range of the per-visit flux scale.
    sky_range : tuple of float
        Range of the per-visit sky level (counts per pixel).
    sky_gradient : float
        Largest fractional change of the sky across a detector.
    keep_sky : bool
        Keep the sky in the calibrated images (default: it is subtracted exactly, as a
        background-subtracted LSST calexp; its photon noise is always kept).
    dither_arcsec : float
        Largest pointing offset of a visit from the field centre.
    max_rotation : float
        Largest camera rotation (degrees) either way.
    distortion_pixels : float
        Radial (cubic) optical distortion at the focal-plane corner, in pixels (SIP terms).
    astrometric_error_arcsec : float
        Largest error of a stored WCS (a shift), per exposure.
    star_density, galaxy_density : float
        Objects per square arcminute.
    star_mag_range, galaxy_mag_range : tuple of float
        Magnitude ranges of stars and galaxies.
    star_flux_slope, galaxy_flux_slope : float
        Power-law index ``a`` of the flux distribution ``dN/dF ~ F**-(1 + a)``.
    variable_density : float
        Periodic variable stars per square arcminute.
    n_transients, n_asteroids : int
        Number of transients and of moving objects over the whole field.
    transient_mag_range : tuple of float
        Peak magnitude range of the bright transients (the faint hostless ones are 2 mag
        fainter).
    bad_columns : int
        Bad columns per detector.
    cosmic_rays_per_megapixel : float
        Cosmic-ray hits per million pixels per exposure.
    repair_cosmic_rays : bool
        Interpolate over the cosmic-ray pixels of the calexps and flag them INTRP (keeping CR),
        as LSST's single-frame processing does before difference imaging. Off gives the raw
        hits, flagged CR only.
    edge_width : int
        Width of the EDGE-masked frame of every detector (pixels).
    coadd_seeing_arcsec : float
        FWHM of the coadd PSF.
    coadd_depth_factor : float
        Ratio of a typical visit's sky noise to the coadd noise (>= 5).
    dcr_subfilters : int
        Number of DCR sub-filter coadds (made in band ``g`` only; 0 disables them).
    patch_inner, patch_border : int
        Patch geometry of the sky map (pixels).
    n_tracts : int
        Number of tracts (1 or 2; with 2, detectors straddle the tract boundary).
    tile_size : int
        Chunk size of the written planes.
    """

    name: str = "custom"
    seed: int = 0
    n_visits: int = 2
    n_detectors: int = 2
    detector_width: int = 512
    detector_height: int = 512
    detector_gap: int = 40
    pixel_scale: float = 0.2
    band: str = "g"
    ra: float = 56.0
    dec: float = -32.0
    mjd_start: float = 60600.0
    campaign_days: float = 40.0
    exposure_time: float = 30.0
    zero_point: float = 28.3
    gain: float = 1.5
    read_noise: float = 6.0
    saturation: float = 60000.0
    seeing_range: tuple[float, float] = _range(0.55, 1.3)
    psf_beta: float = 3.5
    psf_fwhm_variation: float = 0.06
    psf_max_shear: float = 0.05
    transparency_range: tuple[float, float] = _range(0.7, 1.0)
    sky_range: tuple[float, float] = _range(300.0, 2000.0)
    sky_gradient: float = 0.05
    keep_sky: bool = False
    dither_arcsec: float = 20.0
    max_rotation: float = 20.0
    distortion_pixels: float = 2.0
    astrometric_error_arcsec: float = 0.02
    star_density: float = 3.0
    galaxy_density: float = 6.0
    star_mag_range: tuple[float, float] = _range(10.5, 24.0)
    galaxy_mag_range: tuple[float, float] = _range(18.0, 24.5)
    star_flux_slope: float = 0.5
    galaxy_flux_slope: float = 0.6
    variable_density: float = 0.3
    n_transients: int = 10
    n_asteroids: int = 2
    transient_mag_range: tuple[float, float] = _range(19.0, 22.0)
    bad_columns: int = 2
    cosmic_rays_per_megapixel: float = 20.0
    repair_cosmic_rays: bool = True
    edge_width: int = 10
    coadd_seeing_arcsec: float = 0.6
    coadd_depth_factor: float = 8.0
    dcr_subfilters: int = 3
    patch_inner: int = 400
    patch_border: int = 50
    n_tracts: int = 2
    tile_size: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in ("seeing_range", "transparency_range", "sky_range", "star_mag_range",
                          "galaxy_mag_range", "transient_mag_range"):
                value = getattr(self, f.name)
                try:
                    low, high = (float(v) for v in value)
                except (TypeError, ValueError):
                    raise ConfigError(f"simulation {f.name} must be a pair (low, high), "
                                      f"got {value!r}") from None
                object.__setattr__(self, f.name, (low, high))
        self._validate()

    # -- validation ------------------------------------------------------------------------

    def _validate(self) -> None:
        positive_ints = ("n_visits", "n_detectors", "detector_width", "detector_height",
                         "patch_inner", "tile_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"simulation {name} must be a positive integer, got {value!r}; "
                                  "give a size > 0")
        non_negative_ints = ("detector_gap", "n_transients", "n_asteroids", "bad_columns",
                             "edge_width", "dcr_subfilters", "patch_border", "seed")
        for name in non_negative_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"simulation {name} must be an integer >= 0, got {value!r}")
        positive = ("pixel_scale", "exposure_time", "gain", "saturation", "psf_beta",
                    "coadd_seeing_arcsec", "campaign_days")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"simulation {name} must be a finite number > 0, got {value!r}")
        non_negative = ("read_noise", "psf_fwhm_variation", "psf_max_shear", "sky_gradient",
                        "dither_arcsec", "max_rotation", "distortion_pixels",
                        "astrometric_error_arcsec", "star_density", "galaxy_density",
                        "variable_density", "cosmic_rays_per_megapixel", "star_flux_slope",
                        "galaxy_flux_slope")
        for name in non_negative:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"simulation {name} must be a finite number >= 0, "
                                  f"got {value!r}")
        for name in ("seeing_range", "transparency_range", "sky_range", "star_mag_range",
                     "galaxy_mag_range", "transient_mag_range"):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
                raise ConfigError(f"simulation {name} must satisfy 0 < low <= high, got "
                                  f"({low}, {high})")
        if self.transparency_range[1] > 1.0:
            raise ConfigError(f"transparency_range must lie in (0, 1], got "
                              f"{self.transparency_range}")
        if self.band not in BAND_WAVELENGTHS_NM:
            raise ConfigError(f"unknown band {self.band!r}; use one of "
                              f"{', '.join(BAND_WAVELENGTHS_NM)}")
        if not -80.0 <= self.dec <= 80.0:
            raise ConfigError(f"field dec {self.dec} must lie in [-80, 80] degrees")
        if self.psf_max_shear >= 0.5 or self.psf_fwhm_variation >= 0.5:
            raise ConfigError("psf_max_shear and psf_fwhm_variation must be < 0.5, got "
                              f"{self.psf_max_shear} and {self.psf_fwhm_variation}")
        if self.sky_gradient >= 1.0:
            raise ConfigError(f"sky_gradient must be < 1, got {self.sky_gradient}")
        if self.coadd_depth_factor < 5.0:
            raise ConfigError(f"coadd_depth_factor must be >= 5 (the coadd must be at least 5x "
                              f"less noisy than a visit), got {self.coadd_depth_factor}")
        if self.n_tracts not in (1, 2):
            raise ConfigError(f"n_tracts must be 1 or 2, got {self.n_tracts!r}")
        if 2 * self.edge_width >= min(self.detector_width, self.detector_height):
            raise ConfigError(f"edge_width {self.edge_width} leaves no pixel of a "
                              f"{self.detector_width} x {self.detector_height} detector")
        if self.patch_border >= self.patch_inner:
            raise ConfigError(f"patch_border ({self.patch_border}) must be smaller than "
                              f"patch_inner ({self.patch_inner})")
        if self.n_visits > 100000 or self.n_detectors > 1000:
            raise ConfigError("at most 100000 visits and 1000 detectors per visit, got "
                              f"{self.n_visits} and {self.n_detectors}")

    # -- derived values --------------------------------------------------------------------

    @property
    def njy_per_count(self) -> float:
        """NJy of one count at transparency 1 (the coadd calibration)."""
        return 3631.0e9 * 10.0 ** (-0.4 * self.zero_point)

    @property
    def detector_area_arcmin2(self) -> float:
        """Sky area of one detector (square arcminutes)."""
        return self.detector_width * self.detector_height * (self.pixel_scale / 60.0) ** 2

    def replace(self, **changes: Any) -> SimulationConfig:
        """Return a copy with some fields changed (validated again).

        Raises
        ------
        ConfigError
            If a field name is unknown or a new value is invalid.
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown simulation settings {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary (tuples become lists)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationConfig:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown simulation settings {unknown}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
