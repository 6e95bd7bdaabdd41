"""A DC2-like simulated survey with truth: sky, visits, exposures, coadds, fakes.

Entry points: :func:`simulate` (write a repository), :func:`plan_campaign` and
:func:`render_tasks` (render in memory), :func:`render_exposure` and :func:`render_coadd`
(single images), :func:`inject_point_sources` (fakes into any exposure, real ones too), and the
presets (:func:`get_preset`). The command line is ``daskdiff simulate``.
"""

from .campaign import (
    CampaignPlan,
    build_skymap,
    plan_campaign,
    render_tasks,
    simulate,
    truth_tables,
)
from .config import SimulationConfig
from .inject import FAKE_SCHEMA, inject_point_sources, random_fakes
from .observing import (
    DetectorGeometry,
    VisitPlan,
    dcr_shifts_arcsec,
    detector_wcs,
    exposure_psf,
    focal_plane,
    plan_visits,
    subfilter_weights,
)
from .presets import PRESETS, get_preset
from .render import render_coadd, render_exposure
from .sky import OBJECT_SCHEMA, flux_at, make_sky, position_at

__all__ = [
    "FAKE_SCHEMA",
    "OBJECT_SCHEMA",
    "PRESETS",
    "CampaignPlan",
    "DetectorGeometry",
    "SimulationConfig",
    "VisitPlan",
    "build_skymap",
    "dcr_shifts_arcsec",
    "detector_wcs",
    "exposure_psf",
    "flux_at",
    "focal_plane",
    "get_preset",
    "inject_point_sources",
    "make_sky",
    "plan_campaign",
    "plan_visits",
    "position_at",
    "random_fakes",
    "render_coadd",
    "render_exposure",
    "render_tasks",
    "simulate",
    "subfilter_weights",
    "truth_tables",
]
