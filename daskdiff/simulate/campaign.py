"""A whole simulated campaign: plan, render through Dask, write a repository with truth.

:func:`plan_campaign` fixes everything that is cheap to compute (catalogue, visits, WCSs, sky
map, the patches to make); :func:`render_tasks` turns the plan into one Dask task per
exposure and per coadd patch; :func:`simulate` runs them and writes the repository.

Repository contents
-------------------
- ``calexp`` (``visit, detector, band, physical_filter``): calibrated exposures.
- ``goodSeeingCoadd`` (``tract, patch, band``): deep coadds.
- ``dcrCoadd`` (``tract, patch, band, subfilter``): DCR sub-filter coadds (band ``g``).
- ``fakes`` exposures are not separate: with ``fakes_per_exposure > 0`` the calexps hold the
  injected point sources (``INJECTED`` mask plane) and ``truth_fakes`` lists them.
- the sky map, and the JSON ``simulation`` (the config and a summary).
- Parquet truth tables:

  ``truth_objects``
      every object (schema :data:`daskdiff.simulate.sky.OBJECT_SCHEMA`).
  ``truth_epochs``
      every variable, transient and asteroid on every exposure it falls on: ``id, kind,
      visit, detector, mjd, ra, dec, x, y`` (true pixel position), ``x_wcs, y_wcs`` (its
      position through the stored WCS, i.e. with the astrometric error), ``flux_njy,
      flux_counts`` (counts in that exposure, transparency included).
  ``truth_exposures``
      one row per exposure: ``visit, detector, band, mjd, boresight_ra, boresight_dec,
      rotation_angle, hour_angle, elevation, azimuth, airmass, parallactic_angle,
      seeing_arcsec, psf_fwhm_px`` (FWHM parameter at the detector centre), ``transparency,
      sky, sky_gradient_x, sky_gradient_y, njy_per_count, error_x, error_y`` (astrometric
      error of the stored WCS, pixels), ``tracts`` (number of tracts it overlaps),
      ``straddles`` (whether it crosses the edge of a tract box),
      ``dcr_shift_arcsec`` (list, per sub-filter, towards the zenith).
  ``truth_coadds``
      one row per coadd patch: ``tract, patch, x0, y0, width, height, noise_sigma, sky_ref,
      psf_fwhm_px, covered_fraction``.
  ``truth_fakes``
      the injected fakes (:data:`daskdiff.simulate.inject.FAKE_SCHEMA`), if any.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pyarrow as pa
import xarray as xr

from ..box import Box
from ..errors import ConfigError, InputError
from ..exposure import rechunk
from ..metadata import Weather
from ..skymap import SkyMap
from ..wcs import pixel_to_sky, sky_to_pixel
from .config import SimulationConfig
from .inject import inject_point_sources, random_fakes
from .observing import (
    DetectorGeometry,
    VisitPlan,
    dcr_shifts_arcsec,
    detector_wcs,
    exposure_psf,
    focal_plane,
    footprint_radius_deg,
    plan_visits,
)
from .render import (
    astrometric_error,
    coadd_noise_sigma,
    coadd_psf,
    render_coadd,
    render_exposure,
)
from .sky import flux_at, make_sky, position_at

__all__ = [
    "CampaignPlan",
    "build_skymap",
    "plan_campaign",
    "render_tasks",
    "simulate",
    "truth_tables",
]

COADD_NAME = "goodSeeing"


@dataclass
class CampaignPlan:
    """Everything needed to render a campaign (cheap to build, deterministic in the seed)."""

    config: SimulationConfig
    catalog: pa.Table
    visits: list[VisitPlan]
    detectors: list[DetectorGeometry]
    skymap: SkyMap
    #: ``(tract_id, patch_id) -> outer box`` of every patch touched by an exposure.
    patches: dict[tuple[int, int], Box] = field(default_factory=dict)
    #: ``tract_id -> list of (4, 2) exposure outlines in tract pixels``.
    footprints: dict[int, list[np.ndarray]] = field(default_factory=dict)
    #: ``(visit, detector) -> number of tracts whose patches it overlaps``.
    exposure_tracts: dict[tuple[int, int], int] = field(default_factory=dict)
    #: ``(visit, detector) -> whether it crosses the edge of a tract box``.
    straddling: dict[tuple[int, int], bool] = field(default_factory=dict)
    noise_sigma: float = 0.0
    sky_ref: float = 0.0

    @property
    def n_subfilters(self) -> int:
        """Number of DCR sub-filter coadds made (0 unless the band is ``g``)."""
        return self.config.dcr_subfilters if self.config.band == "g" else 0


def build_skymap(config: SimulationConfig) -> SkyMap:
    """Return the sky map: one tract on the field, or two whose boundary crosses it.

    With two tracts, their centres are 0.8 footprint radii either side of the field centre
    (in RA) and each has a radius of one footprint radius, so the field is covered twice in
    the middle and the outer detectors straddle a tract edge.
    """
    radius = footprint_radius_deg(config)
    overlap = 0.1 * radius
    if config.n_tracts == 1:
        centers = [(config.ra, config.dec)]
        tract_radius = radius * 1.05
    else:
        offset = 0.8 * radius / math.cos(math.radians(config.dec))
        centers = [(config.ra - offset, config.dec), (config.ra + offset, config.dec)]
        tract_radius = radius
    return SkyMap.discrete(centers, radius_deg=tract_radius, pixel_scale_arcsec=config.pixel_scale,
                           tract_overlap_deg=overlap, patch_inner=config.patch_inner,
                           patch_border=config.patch_border)


def plan_campaign(config: SimulationConfig) -> CampaignPlan:
    """Return the plan of a campaign: sky, visits, detectors, sky map, patches and footprints."""
    plan = CampaignPlan(config=config, catalog=make_sky(config), visits=plan_visits(config),
                        detectors=focal_plane(config), skymap=build_skymap(config))
    for visit in plan.visits:
        for det in plan.detectors:
            wcs = detector_wcs(config, visit, det)
            found = plan.skymap.find_patches(wcs, det.box, points_per_side=4)
            plan.exposure_tracts[(visit.visit, det.id)] = len({t for t, _ in found})
            plan.straddling[(visit.visit, det.id)] = _straddles(plan.skymap, wcs, det.box)
            for tract_id, patch_id in found:
                patch = plan.skymap.patch(tract_id, patch_id)
                plan.patches[(tract_id, patch_id)] = patch.outer_box
            ra, dec = pixel_to_sky(wcs, det.box.corners()[:, 0], det.box.corners()[:, 1])
            for tract_id in {t for t, _ in found}:
                tx, ty = plan.skymap[tract_id].sky_to_pixel(ra, dec)
                plan.footprints.setdefault(tract_id, []).append(np.column_stack([tx, ty]))
    plan.patches = dict(sorted(plan.patches.items()))
    plan.noise_sigma, plan.sky_ref = coadd_noise_sigma(config, plan.visits)
    return plan


def _straddles(skymap: SkyMap, wcs: Any, box: Box) -> bool:
    """Whether a detector lies partly inside and partly outside some tract's box."""
    corners = box.corners()
    ra, dec = pixel_to_sky(wcs, corners[:, 0], corners[:, 1])
    for tract in skymap:
        inside = np.asarray(tract.contains(ra, dec), dtype=bool)
        if inside.any() and not inside.all():
            return True
    return False


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def _exposure_task(plan: CampaignPlan, visit: VisitPlan, det: DetectorGeometry,
                   fakes_per_exposure: int) -> tuple[xr.Dataset, pa.Table | None]:
    """Render one calexp (and inject its fakes)."""
    exposure = render_exposure(plan.config, visit, det, plan.catalog)
    fakes = None
    if fakes_per_exposure > 0:
        wanted = random_fakes(exposure, fakes_per_exposure, seed=plan.config.seed,
                              margin=plan.config.edge_width + 10)
        exposure, fakes = inject_point_sources(exposure, wanted, gain=plan.config.gain,
                                               seed=plan.config.seed)
    return exposure, fakes


def _coadd_task(plan: CampaignPlan, tract_id: int, patch_id: int
                ) -> tuple[xr.Dataset, list[xr.Dataset]]:
    """Render one coadd patch and its DCR sub-filter coadds."""
    tract = plan.skymap[tract_id]
    return render_coadd(
        plan.config, tract_id=tract_id, tract_wcs=tract.wcs, tract_box=tract.box,
        patch_box=plan.patches[(tract_id, patch_id)], catalog=plan.catalog,
        footprints=plan.footprints.get(tract_id, []), noise_sigma=plan.noise_sigma,
        sky_ref=plan.sky_ref, n_subfilters=plan.n_subfilters,
    )


def _write_calexp(plan: CampaignPlan, repo: Any, visit: VisitPlan, det: DetectorGeometry,
                  fakes_per_exposure: int) -> dict[str, Any]:
    """Render one calexp and write it into the repository; return its fakes (if any)."""
    exposure, fakes = _exposure_task(plan, visit, det, fakes_per_exposure)
    config = plan.config
    with dask.config.set(scheduler="sync"):  # one task per core: no nested thread pools
        repo.put_exposure(rechunk(exposure, config.tile_size), "calexp", visit=visit.visit,
                          detector=det.id, band=config.band,
                          physical_filter=f"{config.band}_sim")
    return {"calexps": 1, "fakes": fakes}


def _write_coadd(plan: CampaignPlan, repo: Any, tract_id: int, patch_id: int
                 ) -> dict[str, Any]:
    """Render one coadd patch (and its DCR coadds) and write them into the repository."""
    coadd, dcr = _coadd_task(plan, tract_id, patch_id)
    config = plan.config
    with dask.config.set(scheduler="sync"):
        repo.put_exposure(rechunk(coadd, config.tile_size), f"{COADD_NAME}Coadd",
                          tract=tract_id, patch=patch_id, band=config.band)
        for k, sub in enumerate(dcr):
            repo.put_exposure(rechunk(sub, config.tile_size), "dcrCoadd", tract=tract_id,
                              patch=patch_id, band=config.band, subfilter=k)
    return {"coadds": 1, "dcr_coadds": len(dcr)}


def render_tasks(plan: CampaignPlan, *, fakes_per_exposure: int = 0, coadds: bool = True,
                 repo: Any = None) -> dict[tuple, Any]:
    """Return one :func:`dask.delayed` task per exposure and per coadd patch.

    Keys are ``("calexp", visit, detector)`` and ``("coadd", tract, patch)``. Without
    ``repo`` the tasks return the rendered exposures (``(exposure, fakes table or None)`` and
    ``(coadd, [dcr sub-filter coadds])``); with a repository they write them there and return
    a small dict of counts (and the fakes table). Every task draws its randomness from its own
    seeded streams, so the results do not depend on the scheduler or the number of workers.
    """
    tasks: dict[tuple, Any] = {}
    for visit in plan.visits:
        for det in plan.detectors:
            name = f"simulate-calexp-{visit.visit}-{det.id}"
            if repo is None:
                task = dask.delayed(_exposure_task)(plan, visit, det, fakes_per_exposure,
                                                    dask_key_name=name)
            else:
                task = dask.delayed(_write_calexp)(plan, repo, visit, det, fakes_per_exposure,
                                                   dask_key_name=name)
            tasks[("calexp", visit.visit, det.id)] = task
    if coadds:
        for tract_id, patch_id in plan.patches:
            name = f"simulate-coadd-{tract_id}-{patch_id}"
            function = _coadd_task if repo is None else _write_coadd
            args = (plan, tract_id, patch_id) if repo is None else (plan, repo, tract_id,
                                                                    patch_id)
            tasks[("coadd", tract_id, patch_id)] = dask.delayed(function)(
                *args, dask_key_name=name)
    return tasks


# --------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------


def truth_tables(plan: CampaignPlan) -> dict[str, pa.Table]:
    """Return the truth tables of a plan.

    They are ``truth_objects``, ``truth_epochs``, ``truth_exposures`` and ``truth_coadds``;
    see the module docstring for their columns.
    """
    config = plan.config
    cols = {name: plan.catalog.column(name).to_numpy(zero_copy_only=False)
            for name in plan.catalog.column_names}
    changing = np.isin(cols["kind"], ["variable", "transient", "asteroid"])
    epochs: dict[str, list] = {k: [] for k in (
        "id", "kind", "visit", "detector", "mjd", "ra", "dec", "x", "y", "x_wcs", "y_wcs",
        "flux_njy", "flux_counts")}
    exposures: dict[str, list] = {k: [] for k in (
        "visit", "detector", "band", "mjd", "boresight_ra", "boresight_dec", "rotation_angle",
        "hour_angle", "elevation", "azimuth", "airmass", "parallactic_angle", "seeing_arcsec",
        "psf_fwhm_px", "transparency", "sky", "sky_gradient_x", "sky_gradient_y",
        "njy_per_count", "error_x", "error_y", "tracts", "straddles", "dcr_shift_arcsec")}
    for visit in plan.visits:
        flux = flux_at(cols, visit.mjd)[changing]
        ra, dec = (c[changing] for c in position_at(cols, visit.mjd))
        shifts = dcr_shifts_arcsec(config.band, max(config.dcr_subfilters, 1), visit.airmass,
                                   Weather())
        for det in plan.detectors:
            wcs = detector_wcs(config, visit, det)
            error = astrometric_error(config, visit, det.id)
            x, y = sky_to_pixel(wcs, ra, dec)
            on = np.asarray(det.box.contains(x, y), dtype=bool)
            n = int(on.sum())
            epochs["id"].append(cols["id"][changing][on])
            epochs["kind"].append(cols["kind"][changing][on])
            epochs["visit"].append(np.full(n, visit.visit))
            epochs["detector"].append(np.full(n, det.id))
            epochs["mjd"].append(np.full(n, visit.mjd))
            epochs["ra"].append(ra[on])
            epochs["dec"].append(dec[on])
            epochs["x"].append(x[on])
            epochs["y"].append(y[on])
            epochs["x_wcs"].append(x[on] + error[0])
            epochs["y_wcs"].append(y[on] + error[1])
            epochs["flux_njy"].append(flux[on])
            epochs["flux_counts"].append(flux[on] * visit.transparency / config.njy_per_count)
            psf = exposure_psf(config, visit, det)
            row = {
                "visit": visit.visit, "detector": det.id, "band": config.band, "mjd": visit.mjd,
                "boresight_ra": visit.ra, "boresight_dec": visit.dec,
                "rotation_angle": visit.rotation_angle, "hour_angle": visit.hour_angle,
                "elevation": visit.elevation, "azimuth": visit.azimuth,
                "airmass": visit.airmass, "parallactic_angle": visit.parallactic_angle,
                "seeing_arcsec": visit.seeing_arcsec,
                "psf_fwhm_px": psf.profile_fwhm(*det.box.center),
                "transparency": visit.transparency, "sky": visit.sky,
                "sky_gradient_x": visit.sky_gradient_x, "sky_gradient_y": visit.sky_gradient_y,
                "njy_per_count": config.njy_per_count / visit.transparency,
                "error_x": error[0], "error_y": error[1],
                "tracts": plan.exposure_tracts.get((visit.visit, det.id), 0),
                "straddles": plan.straddling.get((visit.visit, det.id), False),
                "dcr_shift_arcsec": [float(s) for s in shifts],
            }
            for key, value in row.items():
                exposures[key].append(value)
    epoch_table = pa.table({
        "id": pa.array(np.concatenate(epochs["id"]).astype(np.int64)),
        "kind": pa.array(np.concatenate(epochs["kind"]).astype(str)),
        **{k: pa.array(np.concatenate(epochs[k]).astype(np.int64))
           for k in ("visit", "detector")},
        **{k: pa.array(np.concatenate(epochs[k]).astype(float))
           for k in ("mjd", "ra", "dec", "x", "y", "x_wcs", "y_wcs", "flux_njy",
                     "flux_counts")},
    })
    coadds: dict[str, list] = {k: [] for k in (
        "tract", "patch", "x0", "y0", "width", "height", "noise_sigma", "sky_ref",
        "psf_fwhm_px")}
    for (tract_id, patch_id), box in plan.patches.items():
        tract = plan.skymap[tract_id]
        psf = coadd_psf(config, tract.box, tract.pixel_scale_arcsec)
        for key, value in (("tract", tract_id), ("patch", patch_id), ("x0", box.x0),
                           ("y0", box.y0), ("width", box.width), ("height", box.height),
                           ("noise_sigma", plan.noise_sigma), ("sky_ref", plan.sky_ref),
                           ("psf_fwhm_px", psf.profile_fwhm(*box.center))):
            coadds[key].append(value)
    return {
        "truth_objects": plan.catalog,
        "truth_epochs": epoch_table,
        "truth_exposures": pa.table(exposures),
        "truth_coadds": pa.table(coadds),
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@dataclass
class SimulationSummary:
    """What :func:`simulate` wrote and how long it took."""

    root: Path
    config: SimulationConfig
    n_calexps: int
    n_coadds: int
    n_dcr_coadds: int
    tracts: list[int]
    straddling: list[tuple[int, int]]
    seconds: float
    truth_rows: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary."""
        return {
            "root": str(self.root), "preset": self.config.name, "seed": self.config.seed,
            "n_calexps": self.n_calexps, "n_coadds": self.n_coadds,
            "n_dcr_coadds": self.n_dcr_coadds, "tracts": self.tracts,
            "straddling_exposures": [list(k) for k in self.straddling],
            "seconds": round(self.seconds, 2), "truth_rows": self.truth_rows,
        }


def check_target(root: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse an existing non-empty directory (unless ``overwrite``) or a file at ``root``.

    Raises
    ------
    InputError
        Naming the path and what to do.
    """
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory; choose another repository path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"repository {path} already exists and is not empty; choose a new "
                         "path or pass --overwrite (overwrite=True) to replace its contents")
    return path


def _process_pool(num_workers: int | None) -> concurrent.futures.ProcessPoolExecutor:
    """Return a pool of worker processes forked from a clean server with daskdiff loaded.

    Forking the (possibly multi-threaded) driver could deadlock; spawning re-imports GalSim in
    every worker. A forkserver that has imported the simulator once is safe and fast.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["daskdiff.simulate"])
    return concurrent.futures.ProcessPoolExecutor(max_workers=num_workers or os.cpu_count(),
                                                  mp_context=context)


def _compute(tasks: list[Any], scheduler: Any, num_workers: int | None,
             pool: Any = None) -> list[Any]:
    if isinstance(scheduler, str):
        if scheduler not in ("sync", "synchronous", "threads", "processes"):
            raise ConfigError(f"unknown scheduler {scheduler!r}; use 'sync', 'threads', "
                              "'processes' or a dask.distributed Client")
        kwargs: dict[str, Any] = {}
        if pool is not None:
            kwargs["pool"] = pool
        elif num_workers is not None and not scheduler.startswith("sync"):
            kwargs["num_workers"] = num_workers
        return list(dask.compute(*tasks, scheduler=scheduler, **kwargs))
    # a dask.distributed Client
    futures = scheduler.compute(tasks)
    return scheduler.gather(futures)


def simulate(
    root: str | os.PathLike[str],
    config: SimulationConfig,
    *,
    overwrite: bool = False,
    scheduler: Any = None,
    num_workers: int | None = None,
    fakes_per_exposure: int = 0,
    batch_size: int | None = None,
    log: Any = None,
) -> SimulationSummary:
    """Simulate a campaign and write it as a repository.

    Parameters
    ----------
    root : path-like
        The repository directory (created; must be absent or empty unless ``overwrite``).
    config : SimulationConfig
        The survey (a preset from :func:`~daskdiff.simulate.presets.get_preset` or custom).
    overwrite : bool, optional
        Replace an existing repository's contents.
    scheduler : str or dask.distributed.Client, optional
        ``"sync"``, ``"threads"``, ``"processes"`` (default when several cores) or a client.
    num_workers : int, optional
        Workers of the local schedulers.
    fakes_per_exposure : int, optional
        Point sources injected into every calexp (listed in ``truth_fakes``).
    batch_size : int, optional
        Tasks computed at a time (bounds memory); ``2 * workers`` by default.
    log : callable, optional
        Called with progress messages.

    Returns
    -------
    SimulationSummary

    Raises
    ------
    InputError
        If ``root`` exists and is not empty (and ``overwrite`` is false).
    ConfigError
        If the scheduler or the number of fakes is invalid.
    """
    from ..repository import Repository

    start = time.perf_counter()
    if fakes_per_exposure < 0:
        raise ConfigError(f"fakes_per_exposure must be >= 0, got {fakes_per_exposure}")
    path = check_target(root, overwrite=overwrite)
    say = log or (lambda message: None)
    plan = plan_campaign(config)
    say(f"planned {len(plan.visits)} visits x {len(plan.detectors)} detectors, "
        f"{len(plan.patches)} coadd patches in tracts "
        f"{sorted({t for t, _ in plan.patches})}, {plan.catalog.num_rows} objects")
    repo = Repository.create(path, overwrite=overwrite)
    repo.put_skymap(plan.skymap)
    tasks = render_tasks(plan, fakes_per_exposure=fakes_per_exposure, repo=repo)
    workers = num_workers or os.cpu_count() or 1
    if scheduler is None:
        scheduler = "processes" if workers > 1 else "sync"
    batch = batch_size or max(4 * workers, 4)
    keys = list(tasks)
    fakes_tables: list[pa.Table] = []
    counts = {"calexps": 0, "coadds": 0, "dcr_coadds": 0}
    with contextlib.ExitStack() as stack:
        pool = (stack.enter_context(_process_pool(workers)) if scheduler == "processes"
                else None)
        for i in range(0, len(keys), batch):
            chunk = keys[i:i + batch]
            for result in _compute([tasks[k] for k in chunk], scheduler, num_workers, pool):
                for name in counts:
                    counts[name] += result.get(name, 0)
                if result.get("fakes") is not None:
                    fakes_tables.append(result["fakes"])
            say(f"rendered and wrote {min(i + batch, len(keys))}/{len(keys)} exposures and "
                f"coadds ({time.perf_counter() - start:.1f} s)")
    tables = truth_tables(plan)
    if fakes_tables:
        tables["truth_fakes"] = pa.concat_tables(fakes_tables)
    for name, table in tables.items():
        repo.put_table(table, name)
    summary = SimulationSummary(
        root=path, config=config, n_calexps=counts["calexps"], n_coadds=counts["coadds"],
        n_dcr_coadds=counts["dcr_coadds"],
        tracts=sorted({t for t, _ in plan.patches}),
        straddling=sorted(k for k, v in plan.straddling.items() if v),
        seconds=time.perf_counter() - start,
        truth_rows={name: table.num_rows for name, table in tables.items()},
    )
    repo.put_json({"config": config.to_dict(), "summary": summary.to_dict()}, "simulation")
    return summary
