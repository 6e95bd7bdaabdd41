"""Named simulation presets: ``tiny`` (unit tests), ``demo`` (the README job), ``dc2-detector``.

Every preset is a :class:`~daskdiff.simulate.config.SimulationConfig`; any field can be changed
afterwards with :func:`get_preset` keyword overrides or :meth:`SimulationConfig.replace`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .config import SimulationConfig

__all__ = ["PRESETS", "get_preset"]

#: The presets by name.
PRESETS: dict[str, SimulationConfig] = {
    # A few seconds: 2 visits x 2 detectors of 512^2, two tracts of one patch each; stars dense
    # enough (25 per arcmin^2) for the kernel fit of every detector-visit.
    "tiny": SimulationConfig(
        name="tiny", n_visits=2, n_detectors=2, detector_width=512, detector_height=512,
        detector_gap=40, star_density=25.0, galaxy_density=6.0, variable_density=0.5,
        n_transients=6, n_asteroids=2, patch_inner=1500, patch_border=50, dither_arcsec=10.0,
        max_rotation=10.0, campaign_days=20.0, tile_size=512,
    ),
    # The README's main job: 6 visits x 4 detectors of 2048^2 over 2 tracts.
    "demo": SimulationConfig(
        name="demo", n_visits=6, n_detectors=4, detector_width=2048, detector_height=2048,
        detector_gap=60, star_density=3.0, galaxy_density=5.0, variable_density=0.2,
        n_transients=40, n_asteroids=3, patch_inner=2000, patch_border=100, dither_arcsec=30.0,
        max_rotation=15.0, campaign_days=40.0, tile_size=1024,
    ),
    # LSST geometry (4072 x 4000 pixels of 0.2") for benchmarks.
    "dc2-detector": SimulationConfig(
        name="dc2-detector", n_visits=3, n_detectors=2, detector_width=4072,
        detector_height=4000, detector_gap=100, star_density=3.0, galaxy_density=5.0,
        variable_density=0.2, n_transients=30, n_asteroids=3, patch_inner=4000,
        patch_border=100, dither_arcsec=30.0, max_rotation=15.0, campaign_days=40.0,
        tile_size=1024,
    ),
}


def get_preset(name: str, **overrides: Any) -> SimulationConfig:
    """Return a preset, optionally with some settings changed.

    Parameters
    ----------
    name : str
        ``"tiny"``, ``"demo"`` or ``"dc2-detector"``.
    **overrides
        Settings to change (any :class:`SimulationConfig` field); ``None`` values are ignored.

    Raises
    ------
    ConfigError
        If the preset is unknown or an override is invalid.
    """
    try:
        config = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown simulation preset {name!r}; choose one of "
                          f"{', '.join(PRESETS)}") from None
    changes = {k: v for k, v in overrides.items() if v is not None}
    return config.replace(**changes) if changes else config
