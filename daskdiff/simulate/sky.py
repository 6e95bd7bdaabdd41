"""The simulated sky: a catalogue of objects and their light curves and motions.

The catalogue is one :class:`pyarrow.Table` (schema :data:`OBJECT_SCHEMA`), one row per object:

=================== ======= ================================================================
column              unit    meaning
=================== ======= ================================================================
id                          unique object id (> 0)
kind                        ``star``, ``galaxy``, ``variable``, ``transient`` or ``asteroid``
ra, dec             deg     position (asteroids: at ``epoch``)
mag                 AB      reference magnitude (variables: mean, transients: peak)
flux_njy            nJy     reference flux (same meaning as ``mag``)
dcr_color                   sub-filter colour (0 flat spectrum, > 0 red, see ``subfilter_weights``)
sersic_n                    Sersic index (galaxies, else NaN)
half_light_radius   arcsec  half-light radius (galaxies, else NaN)
ellipticity                 ``(1 - q) / (1 + q)``, the reduced shear of the shape (galaxies)
position_angle      deg     major-axis position angle, east of north (galaxies)
period              day     period (variables)
amplitude                   fractional amplitude (variables)
phase                       phase at MJD 0, in cycles (variables)
peak_mjd            MJD     time of peak (transients)
rise_time, fall_time day    Bazin rise and fall times (transients)
host_id                     id of the host galaxy (transients on galaxies), else -1
transient_class             ``host``, ``blank`` or ``faint`` (transients), else empty
epoch               MJD     reference time of the position (asteroids)
rate_ra, rate_dec   deg/day motion on the sky (``rate_ra`` is along RA times cos dec)
=================== ======= ================================================================

Light curves: a variable's flux is ``flux * (1 + amplitude * sin(2 pi (mjd / period + phase)))``;
a transient's is a Bazin curve ``exp(-(t - t0) / fall) / (1 + exp(-(t - t0) / rise))``
scaled to ``flux`` at ``peak_mjd``. Stars and galaxies are constant. :func:`flux_at` and
:func:`position_at` evaluate any object at any time.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from .config import SimulationConfig
from .observing import footprint_radius_deg
from .seeds import rng_for

__all__ = [
    "OBJECT_SCHEMA",
    "flux_at",
    "mag_to_njy",
    "make_sky",
    "position_at",
    "power_law_mags",
]

OBJECT_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("kind", pa.string()),
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("mag", pa.float64()),
    ("flux_njy", pa.float64()),
    ("dcr_color", pa.float64()),
    ("sersic_n", pa.float64()),
    ("half_light_radius", pa.float64()),
    ("ellipticity", pa.float64()),
    ("position_angle", pa.float64()),
    ("period", pa.float64()),
    ("amplitude", pa.float64()),
    ("phase", pa.float64()),
    ("peak_mjd", pa.float64()),
    ("rise_time", pa.float64()),
    ("fall_time", pa.float64()),
    ("host_id", pa.int64()),
    ("transient_class", pa.string()),
    ("epoch", pa.float64()),
    ("rate_ra", pa.float64()),
    ("rate_dec", pa.float64()),
])

#: Sersic indices used (GalSim caches one profile table per index, so a small set is fast).
SERSIC_INDICES = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])


def mag_to_njy(mag: np.ndarray | float) -> np.ndarray:
    """Return the flux in nJy of an AB magnitude."""
    return 3631.0e9 * 10.0 ** (-0.4 * np.asarray(mag, dtype=float))


def power_law_mags(rng: np.random.Generator, n: int, mag_range: tuple[float, float],
                   slope: float) -> np.ndarray:
    """Draw ``n`` magnitudes whose fluxes follow ``dN/dF ~ F**-(1 + slope)`` in the range."""
    f_min = 10.0 ** (-0.4 * mag_range[1])
    f_max = 10.0 ** (-0.4 * mag_range[0])
    u = rng.uniform(0.0, 1.0, n)
    if slope == 0:
        flux = f_min * (f_max / f_min) ** u
    else:
        flux = f_min * (1.0 - u * (1.0 - (f_min / f_max) ** slope)) ** (-1.0 / slope)
    return -2.5 * np.log10(flux)


def _uniform_disc(rng: np.random.Generator, n: int, ra0: float, dec0: float,
                  radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions in a small disc (tangent-plane approximation, degrees)."""
    r = radius * np.sqrt(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2 * np.pi, n)
    dec = dec0 + r * np.sin(phi)
    ra = ra0 + r * np.cos(phi) / np.cos(np.deg2rad(dec))
    return ra, dec


def _columns(n: int) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for f in OBJECT_SCHEMA:
        if f.type == pa.string():
            cols[f.name] = np.full(n, "", dtype=object)
        elif f.type == pa.int64():
            cols[f.name] = np.full(n, -1, dtype=np.int64)
        else:
            cols[f.name] = np.full(n, np.nan)
    return cols


def _stars(config: SimulationConfig, rng: np.random.Generator, n: int, radius: float,
           kind: str = "star") -> dict[str, np.ndarray]:
    cols = _columns(n)
    cols["kind"][:] = kind
    cols["ra"], cols["dec"] = _uniform_disc(rng, n, config.ra, config.dec, radius)
    cols["mag"] = power_law_mags(rng, n, config.star_mag_range, config.star_flux_slope)
    cols["dcr_color"] = rng.normal(0.0, 0.6, n)
    return cols


def _galaxies(config: SimulationConfig, rng: np.random.Generator, n: int,
              radius: float) -> dict[str, np.ndarray]:
    cols = _columns(n)
    cols["kind"][:] = "galaxy"
    cols["ra"], cols["dec"] = _uniform_disc(rng, n, config.ra, config.dec, radius)
    cols["mag"] = power_law_mags(rng, n, config.galaxy_mag_range, config.galaxy_flux_slope)
    cols["dcr_color"] = rng.normal(0.3, 0.4, n)
    cols["sersic_n"] = rng.choice(SERSIC_INDICES, n)
    # brighter galaxies are larger: log-uniform radius whose range shifts with magnitude
    bright = np.clip((config.galaxy_mag_range[1] - cols["mag"])
                     / max(np.ptp(config.galaxy_mag_range), 1e-9), 0.0, 1.0)
    log_r = np.log10(0.3) + (np.log10(3.0) - np.log10(0.3)) * np.clip(
        0.6 * bright + 0.4 * rng.uniform(0.0, 1.0, n), 0.0, 1.0)
    cols["half_light_radius"] = 10.0**log_r
    cols["ellipticity"] = rng.uniform(0.0, 0.6, n)
    cols["position_angle"] = rng.uniform(0.0, 180.0, n)
    return cols


def _variables(config: SimulationConfig, rng: np.random.Generator, n: int,
               radius: float) -> dict[str, np.ndarray]:
    cols = _stars(config, rng, n, radius, kind="variable")
    cols["mag"] = rng.uniform(17.0, 21.0, n)
    cols["period"] = 10.0 ** rng.uniform(math.log10(0.2), math.log10(20.0), n)
    cols["amplitude"] = rng.uniform(0.1, 0.5, n)
    cols["phase"] = rng.uniform(0.0, 1.0, n)
    return cols


def _transients(config: SimulationConfig, rng: np.random.Generator, n: int, radius: float,
                galaxies: dict[str, np.ndarray], occupied: tuple[np.ndarray, np.ndarray]
                ) -> dict[str, np.ndarray]:
    cols = _columns(n)
    cols["kind"][:] = "transient"
    n_host = round(0.5 * n)
    n_faint = round(0.2 * n)
    classes = np.array(["host"] * n_host + ["faint"] * n_faint + ["blank"] * (n - n_host - n_faint),
                       dtype=object)
    cols["transient_class"] = classes
    cols["dcr_color"] = rng.normal(0.0, 0.4, n)
    cols["mag"] = rng.uniform(*config.transient_mag_range, n)
    cols["mag"][classes == "faint"] += 2.0
    start, span = config.mjd_start, config.campaign_days
    cols["peak_mjd"] = rng.uniform(start - 0.1 * span, start + 0.9 * span, n)
    cols["rise_time"] = rng.uniform(3.0, 10.0, n)
    cols["fall_time"] = rng.uniform(15.0, 40.0, n)
    # hosts: galaxies well inside the footprint
    g_ra, g_dec = galaxies["ra"], galaxies["dec"]
    cos_dec = math.cos(math.radians(config.dec))
    g_sep = np.hypot((g_ra - config.ra) * cos_dec, g_dec - config.dec)
    candidates = np.nonzero(g_sep < radius)[0]
    for i in range(n):
        if classes[i] == "host" and candidates.size:
            host = int(rng.choice(candidates))
            offset = galaxies["half_light_radius"][host] / 3600.0 * rng.uniform(0.0, 1.0)
            angle = rng.uniform(0.0, 2 * np.pi)
            cols["host_id"][i] = int(galaxies["id"][host])
            cols["dec"][i] = g_dec[host] + offset * math.sin(angle)
            cols["ra"][i] = g_ra[host] + offset * math.cos(angle) / cos_dec
            continue
        if classes[i] == "host":
            cols["transient_class"][i] = "blank"
        cols["ra"][i], cols["dec"][i] = _blank_position(rng, config, radius, occupied)
    return cols


def _blank_position(rng: np.random.Generator, config: SimulationConfig, radius: float,
                    occupied: tuple[np.ndarray, np.ndarray], *, clearance: float = 4.0 / 3600.0
                    ) -> tuple[float, float]:
    """Return a position at least ``clearance`` degrees from every catalogued object."""
    cos_dec = math.cos(math.radians(config.dec))
    ra_o, dec_o = occupied
    for _ in range(1000):
        ra, dec = _uniform_disc(rng, 1, config.ra, config.dec, radius)
        sep = np.hypot((ra_o - ra[0]) * cos_dec, dec_o - dec[0])
        if sep.size == 0 or sep.min() > clearance:
            return float(ra[0]), float(dec[0])
    return float(ra[0]), float(dec[0])


def _asteroids(config: SimulationConfig, rng: np.random.Generator, n: int,
               radius: float) -> dict[str, np.ndarray]:
    """Asteroids crossing the footprint on straight tracks during the campaign."""
    cols = _columns(n)
    cols["kind"][:] = "asteroid"
    cols["mag"] = rng.uniform(19.0, 21.0, n)
    cols["dcr_color"] = np.full(n, 0.3)
    cos_dec = math.cos(math.radians(config.dec))
    # start and end points on opposite sides of the field
    a0 = rng.uniform(0.0, 2 * np.pi, n)
    a1 = a0 + np.pi + rng.uniform(-0.6, 0.6, n)
    x0, y0 = radius * np.cos(a0), radius * np.sin(a0)
    x1, y1 = radius * np.cos(a1), radius * np.sin(a1)
    cols["epoch"] = np.full(n, config.mjd_start)
    cols["ra"] = config.ra + x0 / cos_dec
    cols["dec"] = config.dec + y0
    cols["rate_ra"] = (x1 - x0) / config.campaign_days
    cols["rate_dec"] = (y1 - y0) / config.campaign_days
    return cols


def make_sky(config: SimulationConfig) -> pa.Table:
    """Return the object catalogue of a simulated field (deterministic in ``config.seed``).

    Objects fill a disc a little larger than every visit's footprint; transients and
    asteroids stay in the inner part so that most visits see them.

    Returns
    -------
    pyarrow.Table
        The catalogue, schema :data:`OBJECT_SCHEMA`.
    """
    radius = footprint_radius_deg(config) + 30.0 / 3600.0
    area = math.pi * (radius * 60.0) ** 2
    inner = max(footprint_radius_deg(config) - config.dither_arcsec / 3600.0, 1e-4) * 0.8
    rng = rng_for(config.seed, "sky")
    parts = {
        "star": _stars(config, rng, int(rng.poisson(config.star_density * area)), radius),
        "galaxy": _galaxies(config, rng, int(rng.poisson(config.galaxy_density * area)), radius),
        "variable": _variables(config, rng, int(rng.poisson(config.variable_density * area)),
                               radius),
    }
    next_id = 1
    for cols in parts.values():
        n = len(cols["ra"])
        cols["id"] = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
    occupied = (np.concatenate([p["ra"] for p in parts.values()]),
                np.concatenate([p["dec"] for p in parts.values()]))
    transients = _transients(config, rng, config.n_transients, inner, parts["galaxy"], occupied)
    asteroids = _asteroids(config, rng, config.n_asteroids, inner)
    for cols in (transients, asteroids):
        n = len(cols["ra"])
        cols["id"] = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
    everything = [parts["star"], parts["galaxy"], parts["variable"], transients, asteroids]
    merged = {f.name: np.concatenate([c[f.name] for c in everything]) for f in OBJECT_SCHEMA}
    merged["ra"] = np.mod(merged["ra"], 360.0)
    merged["flux_njy"] = mag_to_njy(merged["mag"])
    return pa.table({f.name: pa.array(merged[f.name], type=f.type) for f in OBJECT_SCHEMA},
                    schema=OBJECT_SCHEMA)


def _bazin(t: np.ndarray, t0: np.ndarray, rise: np.ndarray, fall: np.ndarray) -> np.ndarray:
    x = (t - t0)
    return np.exp(-x / fall) / (1.0 + np.exp(-x / rise))


def flux_at(catalog: pa.Table | dict[str, np.ndarray], mjd: float) -> np.ndarray:
    """Return every object's flux (nJy) at a time.

    Parameters
    ----------
    catalog : pyarrow.Table or dict of numpy.ndarray
        The catalogue (columns of :data:`OBJECT_SCHEMA`).
    mjd : float
        The time.
    """
    cols = _as_numpy(catalog)
    flux = np.array(cols["flux_njy"], dtype=float, copy=True)
    kind = cols["kind"]
    var = kind == "variable"
    if np.any(var):
        flux[var] *= 1.0 + cols["amplitude"][var] * np.sin(
            2 * np.pi * (mjd / cols["period"][var] + cols["phase"][var]))
    tr = kind == "transient"
    if np.any(tr):
        rise, fall, peak = cols["rise_time"][tr], cols["fall_time"][tr], cols["peak_mjd"][tr]
        t0 = peak - rise * np.log(fall / rise - 1.0)
        flux[tr] *= _bazin(np.full(peak.shape, mjd), t0, rise, fall) / _bazin(peak, t0, rise, fall)
    return flux


def position_at(catalog: pa.Table | dict[str, np.ndarray], mjd: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Return every object's ``(ra, dec)`` (degrees) at a time (only asteroids move)."""
    cols = _as_numpy(catalog)
    ra = np.array(cols["ra"], dtype=float, copy=True)
    dec = np.array(cols["dec"], dtype=float, copy=True)
    moving = cols["kind"] == "asteroid"
    if np.any(moving):
        dt = mjd - cols["epoch"][moving]
        dec_new = dec[moving] + cols["rate_dec"][moving] * dt
        ra[moving] = np.mod(ra[moving] + cols["rate_ra"][moving] * dt
                            / np.cos(np.deg2rad(dec_new)), 360.0)
        dec[moving] = dec_new
    return ra, dec


def _as_numpy(catalog: pa.Table | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(catalog, pa.Table):
        return {name: catalog.column(name).to_numpy(zero_copy_only=False)
                for name in catalog.column_names}
    return catalog
