"""The ``daskdiff simulate`` command."""

from __future__ import annotations

import json

import click

from ..errors import ConfigError
from .campaign import check_target
from .campaign import simulate as run_simulation
from .presets import PRESETS, get_preset

__all__ = ["simulate"]


@click.command("simulate")
@click.argument("repo", type=click.Path(file_okay=True, dir_okay=True, writable=True))
@click.option("--preset", default="tiny", show_default=True,
              help=f"Survey preset: {', '.join(PRESETS)}.")
@click.option("--seed", type=int, default=None, help="Master random seed (default: 0).")
@click.option("--visits", "n_visits", type=int, default=None, help="Number of visits.")
@click.option("--detectors", "n_detectors", type=int, default=None,
              help="Detectors per visit.")
@click.option("--width", "detector_width", type=int, default=None,
              help="Detector width (pixels).")
@click.option("--height", "detector_height", type=int, default=None,
              help="Detector height (pixels).")
@click.option("--band", default=None, help="Band of every visit (u g r i z y).")
@click.option("--transients", "n_transients", type=int, default=None,
              help="Number of transients.")
@click.option("--asteroids", "n_asteroids", type=int, default=None,
              help="Number of asteroids.")
@click.option("--tracts", "n_tracts", type=int, default=None, help="1 or 2 tracts.")
@click.option("--patch-inner", type=int, default=None, help="Inner patch size (pixels).")
@click.option("--keep-sky/--subtract-sky", default=None,
              help="Keep the sky level in the calexps (default: subtracted).")
@click.option("--fakes", type=int, default=0, show_default=True,
              help="Point sources injected into every calexp (listed in truth_fakes).")
@click.option("--scheduler", default=None,
              help="sync, threads, processes (default with several cores) or a scheduler "
                   "address host:port.")
@click.option("--workers", type=int, default=None, help="Workers of the local scheduler.")
@click.option("--overwrite", is_flag=True, help="Replace an existing repository at REPO.")
@click.option("--quiet", is_flag=True, help="Print only the final summary.")
def simulate(repo: str, preset: str, seed: int | None, n_visits: int | None,
             n_detectors: int | None, detector_width: int | None, detector_height: int | None,
             band: str | None, n_transients: int | None, n_asteroids: int | None,
             n_tracts: int | None, patch_inner: int | None, keep_sky: bool | None,
             fakes: int, scheduler: str | None, workers: int | None, overwrite: bool,
             quiet: bool) -> None:
    """Write a DC2-like simulated survey with truth tables into the repository REPO.

    The repository gets calibrated exposures (calexp), deep coadds (goodSeeingCoadd),
    DCR sub-filter coadds (dcrCoadd, band g), the sky map and Parquet truth tables. The same
    seed gives identical bytes whatever the number of workers.
    """
    config = get_preset(
        preset, seed=seed, n_visits=n_visits, n_detectors=n_detectors,
        detector_width=detector_width, detector_height=detector_height, band=band,
        n_transients=n_transients, n_asteroids=n_asteroids, n_tracts=n_tracts,
        patch_inner=patch_inner, keep_sky=keep_sky,
    )
    if workers is not None and workers <= 0:
        raise ConfigError(f"--workers must be a positive number, got {workers}")
    if fakes < 0:
        raise ConfigError(f"--fakes must be >= 0, got {fakes}")
    check_target(repo, overwrite=overwrite)
    client = None
    target_scheduler: object = scheduler
    if scheduler is not None and scheduler not in ("sync", "synchronous", "threads",
                                                   "processes"):
        from distributed import Client

        client = Client(scheduler)
        target_scheduler = client
    say = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    try:
        summary = run_simulation(repo, config, overwrite=overwrite, scheduler=target_scheduler,
                                 num_workers=workers, fakes_per_exposure=fakes, log=say)
    finally:
        if client is not None:
            client.close()
    click.echo(json.dumps(summary.to_dict(), indent=1))
