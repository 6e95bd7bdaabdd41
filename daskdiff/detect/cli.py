"""``daskdiff stamps``: postage stamps of the DIA sources of one difference image."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["stamps"]


@click.command("stamps")
@click.argument("science", type=click.Path(exists=True, path_type=Path))
@click.argument("template", type=click.Path(exists=True, path_type=Path))
@click.argument("difference", type=click.Path(exists=True, path_type=Path))
@click.argument("diasrc", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path),
              help="output folder (per-source FITS, PNG triplets, index.html)")
@click.option("--size", default=100, show_default=True, type=click.IntRange(min=3),
              help="stamp edge in pixels")
@click.option("--stack", is_flag=True, help="one FITS stack (stamps.fits) instead of one file "
              "per source")
@click.option("--overwrite", is_flag=True, help="replace existing stamp files")
def stamps(science: Path, template: Path, difference: Path, diasrc: Path, outdir: Path,
           size: int, stack: bool, overwrite: bool) -> None:
    """Cut science / template / difference stamps around every source of DIASRC."""
    from ..io import read_exposure
    from ..stamps import make_stamps
    from .catalog import read_dia_sources

    catalog = read_dia_sources(diasrc)
    exposures = [read_exposure(path, require_wcs=False) for path in (science, template,
                                                                      difference)]
    page = make_stamps(*exposures, catalog, outdir, size=size, stack=stack,
                       overwrite=overwrite)
    click.echo(f"{catalog.num_rows} stamps; gallery: {page}")
