"""Differential chromatic refraction against the LSST reference values."""

from __future__ import annotations

import numpy as np
import pytest

from daskdiff import ConfigError, InputError, Observatory, VisitInfo, Weather
from daskdiff.dcr import (
    dcr_shifts,
    parallactic_angle,
    refraction,
    shift_image,
    subfilter_edges,
)

#: LSST test_dcrModel: g band, elevation 65 deg, azimuth 30 deg, 0.2"/px, rotation 0,
#: Cerro Pachon, 20 C, 73892 Pa, 40% humidity. Expected (dy, dx) per sub-filter.
EXPECTED = [(-0.58755, -0.28496), (-0.01916, -0.00929), (0.38856, 0.18845)]
SITE = Observatory()
WEATHER = Weather(temperature=20.0, pressure=738.92, humidity=40.0)


def _visit(azimuth=30.0, elevation=65.0, rotation=0.0):
    return VisitInfo(
        visit=1, band="g", elevation=elevation, azimuth=azimuth, airmass=1 / np.sin(
            np.deg2rad(elevation)),
        parallactic_angle=parallactic_angle(azimuth, elevation, SITE.latitude),
        rotation_angle=rotation, observatory=SITE, weather=WEATHER)


def test_reference_shifts_within_a_hundredth_pixel():
    shifts = dcr_shifts(_visit(), pixel_scale=0.2, effective_wavelength=476.31, bandwidth=147.0,
                        num_subfilters=3)
    np.testing.assert_allclose(shifts, EXPECTED, atol=0.01)


def test_blue_moves_more_than_red_and_in_opposite_directions():
    shifts = np.array(dcr_shifts(_visit(), pixel_scale=0.2, effective_wavelength=476.31,
                                 bandwidth=147.0))
    blue, red = np.hypot(*shifts[0]), np.hypot(*shifts[-1])
    assert blue > red
    assert np.dot(shifts[0], shifts[-1]) < 0


def test_refraction_agrees_with_astropy_altaz():
    """Total refraction vs astropy/ERFA's model (different formula: agree to ~1%)."""
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time

    site = EarthLocation(lat=SITE.latitude * u.deg, lon=SITE.longitude * u.deg,
                         height=SITE.elevation * u.m)
    frame = AltAz(obstime=Time("2025-01-01T03:00:00"), location=site,
                  pressure=WEATHER.pressure * u.hPa, temperature=WEATHER.temperature * u.deg_C,
                  relative_humidity=WEATHER.humidity / 100, obswl=0.55 * u.micron)
    rng = np.random.default_rng(10)
    for elevation in rng.uniform(45, 85, 10):
        vacuum = SkyCoord(alt=elevation * u.deg, az=100 * u.deg, frame=AltAz(
            obstime=frame.obstime, location=site))
        observed = vacuum.transform_to(frame)
        astropy_arcsec = (observed.alt - vacuum.alt).to_value(u.arcsec)
        ours = refraction(550.0, elevation, SITE, WEATHER)
        assert ours == pytest.approx(astropy_arcsec, rel=0.01)


def test_differential_refraction_agrees_with_astropy_within_a_hundredth_pixel():
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time

    from daskdiff.dcr import differential_refraction

    site = EarthLocation(lat=SITE.latitude * u.deg, lon=SITE.longitude * u.deg,
                         height=SITE.elevation * u.m)
    time = Time("2025-01-01T03:00:00")
    rng = np.random.default_rng(12)
    for elevation in rng.uniform(45, 85, 10):
        vacuum = SkyCoord(alt=elevation * u.deg, az=100 * u.deg,
                          frame=AltAz(obstime=time, location=site))
        def observed_alt(wavelength_nm, vacuum=vacuum):
            frame = AltAz(obstime=time, location=site, pressure=WEATHER.pressure * u.hPa,
                          temperature=WEATHER.temperature * u.deg_C,
                          relative_humidity=WEATHER.humidity / 100,
                          obswl=wavelength_nm / 1000 * u.micron)
            return vacuum.transform_to(frame).alt

        reference = observed_alt(476.31)
        for start, end in subfilter_edges(476.31, 147.0, 3):
            astropy_px = np.mean([(observed_alt(w) - reference).to_value(u.arcsec)
                                  for w in (start, end)]) / 0.2
            ours_px = np.mean([differential_refraction(w, 476.31, elevation, SITE, WEATHER)
                               for w in (start, end)]) / 0.2
            assert ours_px == pytest.approx(astropy_px, abs=0.01)


def test_integer_shift_is_exact():
    rng = np.random.default_rng(11)
    image = rng.normal(size=(40, 50))
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            out = shift_image(image, (dy, dx))
            np.testing.assert_allclose(out[5:-5, 5:-5], image[5 - dy:-5 - dy, 5 - dx:-5 - dx],
                                       rtol=0, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(ConfigError):
        subfilter_edges(476.31, -1.0, 3)
    with pytest.raises(InputError, match="elevation"):
        dcr_shifts(VisitInfo(visit=1), pixel_scale=0.2, effective_wavelength=476.31,
                   bandwidth=147.0)
    with pytest.raises(InputError, match="modelled"):
        refraction(100.0, 60.0, SITE, WEATHER)
