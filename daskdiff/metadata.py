"""Exposure metadata: photometric calibration and visit information.

Both are small frozen dataclasses that serialise to JSON-able dictionaries (for zarr attributes
and the repository registry) and to FITS header cards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError

__all__ = ["Observatory", "PhotoCalib", "VisitInfo", "Weather", "RUBIN_OBSERVATORY"]

#: AB zero point in nJy: 3631 Jy.
AB_ZERO_POINT_NJY = 3631.0e9


@dataclass(frozen=True, slots=True)
class PhotoCalib:
    """A photometric calibration: a constant scale from counts to nJy.

    Parameters
    ----------
    njy_per_count : float
        Flux in nJy of one count (instrumental flux unit); must be positive.
    error : float
        Its 1-sigma uncertainty (nJy per count), >= 0.
    """

    njy_per_count: float = 1.0
    error: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.njy_per_count) and self.njy_per_count > 0):
            raise InputError(
                f"PhotoCalib.njy_per_count must be finite and > 0, got {self.njy_per_count!r}"
            )
        if not (math.isfinite(self.error) and self.error >= 0):
            raise InputError(f"PhotoCalib.error must be finite and >= 0, got {self.error!r}")

    @property
    def zero_point(self) -> float:
        """The AB magnitude of one count per exposure."""
        return 2.5 * math.log10(AB_ZERO_POINT_NJY / self.njy_per_count)

    @classmethod
    def from_zero_point(cls, zero_point: float, *, error: float = 0.0) -> PhotoCalib:
        """Build from an AB zero point (mag of one count); ``error`` is in nJy per count."""
        return cls(AB_ZERO_POINT_NJY * 10 ** (-0.4 * zero_point), error)

    def to_nanojansky(self, counts: Any) -> Any:
        """Convert instrumental counts to nJy."""
        return counts * self.njy_per_count

    def to_counts(self, nanojansky: Any) -> Any:
        """Convert nJy to instrumental counts."""
        return nanojansky / self.njy_per_count

    def to_dict(self) -> dict[str, float]:
        """Return a JSON-able dictionary."""
        return {"njy_per_count": self.njy_per_count, "error": self.error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhotoCalib:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["njy_per_count"]), float(data.get("error", 0.0)))

    def to_header_cards(self) -> list[tuple[str, Any, str]]:
        """Return FITS header cards."""
        return [
            ("FLUXMAG0", AB_ZERO_POINT_NJY / self.njy_per_count, "counts of a 0-mag AB source"),
            ("PC_NJY", self.njy_per_count, "nJy per count"),
            ("PC_ERR", self.error, "error of nJy per count"),
            ("MAGZERO", self.zero_point, "AB magnitude of one count"),
        ]

    @classmethod
    def from_header(cls, header: Any) -> PhotoCalib | None:
        """Read from FITS cards written by :meth:`to_header_cards`, or ``MAGZERO``/``FLUXMAG0``."""
        if "PC_NJY" in header:
            return cls(float(header["PC_NJY"]), float(header.get("PC_ERR", 0.0)))
        if "FLUXMAG0" in header and float(header["FLUXMAG0"]) > 0:
            return cls(AB_ZERO_POINT_NJY / float(header["FLUXMAG0"]))
        for key in ("MAGZERO", "MAGZPT", "ZP", "MAGZP"):
            if key in header:
                return cls.from_zero_point(float(header[key]))
        return None


@dataclass(frozen=True, slots=True)
class Observatory:
    """An observing site.

    Parameters
    ----------
    name : str
        Site name.
    longitude, latitude : float
        Degrees, east-positive longitude.
    elevation : float
        Metres above sea level.
    """

    name: str = "Cerro Pachon"
    longitude: float = -70.749417
    latitude: float = -30.244639
    elevation: float = 2663.0


RUBIN_OBSERVATORY = Observatory()


@dataclass(frozen=True, slots=True)
class Weather:
    """Weather at the time of an observation (inputs to refraction).

    Parameters
    ----------
    temperature : float
        Air temperature in degrees Celsius.
    pressure : float
        Air pressure in hPa.
    humidity : float
        Relative humidity in percent.
    """

    temperature: float = 10.0
    pressure: float = 744.0
    humidity: float = 40.0


@dataclass(frozen=True, slots=True)
class VisitInfo:
    """What is known about one exposure of one detector.

    Angles are in degrees. ``mjd`` is the MJD (TAI) at the middle of the exposure.
    """

    visit: int = 0
    detector: int = 0
    band: str = ""
    physical_filter: str = ""
    mjd: float = math.nan
    exposure_time: float = math.nan
    airmass: float = math.nan
    elevation: float = math.nan
    azimuth: float = math.nan
    parallactic_angle: float = math.nan
    rotation_angle: float = math.nan
    observatory: Observatory = field(default_factory=Observatory)
    weather: Weather = field(default_factory=Weather)

    def __post_init__(self) -> None:
        for name in ("visit", "detector"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InputError(f"VisitInfo.{name} must be an integer >= 0, got {value!r}")
        if not math.isnan(self.airmass) and self.airmass < 1.0:
            raise InputError(f"VisitInfo.airmass must be >= 1, got {self.airmass}")

    @property
    def boresight_parallactic_minus_rotation(self) -> float:
        """``parallactic_angle - rotation_angle`` in degrees (the DCR projection angle)."""
        return self.parallactic_angle - self.rotation_angle

    def replace(self, **changes: Any) -> VisitInfo:
        """Return a copy with some fields changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return VisitInfo(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary (NaN is written as ``None``)."""
        data = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisitInfo:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown VisitInfo fields {sorted(unknown)}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "observatory":
                values[key] = Observatory(**value) if isinstance(value, dict) else value
            elif key == "weather":
                values[key] = Weather(**value) if isinstance(value, dict) else value
            elif key in ("visit", "detector"):
                values[key] = int(value)
            elif key in ("band", "physical_filter"):
                values[key] = str(value)
            else:
                values[key] = math.nan if value is None else float(value)
        return cls(**values)

    def to_header_cards(self) -> list[tuple[str, Any, str]]:
        """Return FITS header cards (standard keywords where they exist)."""
        def num(value: float) -> float | None:
            return None if math.isnan(value) else value

        cards: list[tuple[str, Any, str]] = [
            ("VISIT", self.visit, "visit id"),
            ("DETECTOR", self.detector, "detector id"),
            ("BAND", self.band, "abstract filter"),
            ("FILTER", self.physical_filter, "physical filter"),
            ("MJD-OBS", num(self.mjd), "MJD (TAI) at mid-exposure"),
            ("EXPTIME", num(self.exposure_time), "exposure time (s)"),
            ("AIRMASS", num(self.airmass), "boresight airmass"),
            ("ELEVATN", num(self.elevation), "boresight elevation (deg)"),
            ("AZIMUTH", num(self.azimuth), "boresight azimuth (deg)"),
            ("PARANGLE", num(self.parallactic_angle), "boresight parallactic angle (deg)"),
            ("ROTANGLE", num(self.rotation_angle), "boresight rotation angle (deg)"),
            ("OBSERVAT", self.observatory.name, "observatory"),
            ("OBS-LONG", self.observatory.longitude, "observatory east longitude (deg)"),
            ("OBS-LAT", self.observatory.latitude, "observatory latitude (deg)"),
            ("OBS-ELEV", self.observatory.elevation, "observatory elevation (m)"),
            ("AIRTEMP", self.weather.temperature, "air temperature (C)"),
            ("PRESSURE", self.weather.pressure, "air pressure (hPa)"),
            ("HUMIDITY", self.weather.humidity, "relative humidity (%)"),
        ]
        return cards

    @classmethod
    def from_header(cls, header: Any) -> VisitInfo:
        """Read from FITS cards (ours, or the common survey keywords where ours are absent)."""
        def get(*keys: str, default: Any = None) -> Any:
            for key in keys:
                value = header.get(key)
                if value is not None and value != "":
                    return value
            return default

        def num(*keys: str) -> float:
            value = get(*keys)
            try:
                return float(value)
            except (TypeError, ValueError):
                return math.nan

        def integer(*keys: str) -> int:
            value = get(*keys, default=0)
            try:
                return max(int(value), 0)
            except (TypeError, ValueError):
                return 0

        site = Observatory()
        observatory = Observatory(
            name=str(get("OBSERVAT", "OBSERVAT", default=site.name)),
            longitude=float(get("OBS-LONG", default=site.longitude)),
            latitude=float(get("OBS-LAT", default=site.latitude)),
            elevation=float(get("OBS-ELEV", default=site.elevation)),
        )
        default_weather = Weather()
        weather = Weather(
            temperature=float(get("AIRTEMP", "OUTTEMP", default=default_weather.temperature)),
            pressure=float(get("PRESSURE", default=default_weather.pressure)),
            humidity=float(get("HUMIDITY", default=default_weather.humidity)),
        )
        airmass = num("AIRMASS")
        physical = str(get("FILTER", "FILTNAME", default="")).strip()
        return cls(
            visit=integer("VISIT", "EXPNUM", "EXPID"),
            detector=integer("DETECTOR", "CCDNUM", "CCD_ID"),
            band=str(get("BAND", default=physical[:1].lower() if physical else "")).strip(),
            physical_filter=physical,
            mjd=num("MJD-OBS", "MJD_OBS", "OBSMJD"),
            exposure_time=num("EXPTIME", "EXPOSURE"),
            airmass=airmass if math.isnan(airmass) or airmass >= 1.0 else math.nan,
            elevation=num("ELEVATN", "ELEVAT", "ALT"),
            azimuth=num("AZIMUTH", "AZ"),
            parallactic_angle=num("PARANGLE", "PARALLAC"),
            rotation_angle=num("ROTANGLE", "ROTPA"),
            observatory=observatory,
            weather=weather,
        )
