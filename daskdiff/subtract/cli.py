"""The ``daskdiff subtract`` command: one-shot subtraction of any two FITS images."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml
from astropy.io import fits

from ..errors import ConfigError
from .config import AlardLuptonConfig
from .kernel import KernelSolution

__all__ = ["subtract_command", "write_kernel"]


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write key=value, e.g. --set spatialKernelOrder=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def write_kernel(solution: KernelSolution, path: Path) -> None:
    """Write the kernel: the image at the box centre, then basis, coefficients and background."""
    cx, cy = solution.box.center
    header = fits.Header()
    header["KSUM"] = (solution.kernel_sum, "kernel sum (see photometric_scale in summary)")
    header["KORDER"] = (solution.kernel_order, "Chebyshev order of the kernel")
    header["BGORDER"] = (solution.bg_order, "Chebyshev order of the background")
    header["KCONST"] = (solution.constant, "coefficient of the first basis")
    header["CONVOLVD"] = (solution.convolved, "image the kernel is applied to")
    header["BOX"] = (json.dumps(solution.box.to_list()), "x0 y0 width height of the fit box")
    hdus = [fits.PrimaryHDU(solution.kernel_image(cx, cy), header=header),
            fits.ImageHDU(solution.basis, name="BASIS"),
            fits.ImageHDU(solution.spatial, name="SPATIAL"),
            fits.ImageHDU(np.atleast_1d(solution.background), name="BACKGROUND")]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def _residual_figures(difference, science) -> dict[str, float]:
    from .qa import blank_sky

    good = blank_sky(difference, science) & (difference["variance"].values > 0)
    z = difference["image"].values[good] / np.sqrt(difference["variance"].values[good])
    if z.size == 0:
        return {}
    q1, q3 = np.percentile(z, [25, 75])
    return {"robust_std_normalized": float(0.7413 * (q3 - q1)),
            "median_normalized": float(np.median(z)), "n_good_pixels": int(z.size)}


@click.command("subtract")
@click.argument("science", type=click.Path(exists=True, dir_okay=True))
@click.argument("template", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Output directory (created).")
@click.option("--mode", type=click.Choice(["convolveTemplate", "convolveScience", "auto"]),
              default=None, help="Which image is convolved (default: convolveTemplate).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a subtraction config value (repeatable).")
@click.option("--no-detect", is_flag=True,
              help="Skip detection and measurement (no diaSrc.parquet).")
@click.option("--overwrite", is_flag=True, help="Replace existing products.")
def subtract_command(science: str, template: str, outdir: str, mode: str | None,
                     sets: tuple[str, ...], no_detect: bool, overwrite: bool) -> None:
    """Subtract TEMPLATE from SCIENCE (Alard-Lupton) and write the products to OUTDIR.

    Both images may be LSST-style multi-extension FITS or plain images (variance from
    GAIN/RDNOISE); a template on another pixel grid is warped onto the science grid, and PSFs
    are estimated where absent. Writes difference.fits, matched.fits, kernel.fits,
    diaSrc.parquet (unless --no-detect) and summary.json.
    """
    from ..exposure import exposure_box, get_wcs
    from ..io import read_exposure, write_exposure
    from ..template import get_template
    from . import subtract

    values = _parse_sets(sets)
    if mode:
        values["mode"] = mode
    config = AlardLuptonConfig.from_mapping(values, where="--set")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from .psfs import ensure_psfs

    sci, tmpl = ensure_psfs(read_exposure(science), read_exposure(template),
                            log=lambda message: click.echo(f"PSF: {message}"))
    same_grid = (exposure_box(tmpl).contains_box(exposure_box(sci))
                 and get_wcs(tmpl) is not None and get_wcs(sci) is not None
                 and np.allclose(get_wcs(tmpl).wcs.cd if get_wcs(tmpl).wcs.has_cd()
                                 else get_wcs(tmpl).pixel_scale_matrix,
                                 get_wcs(sci).wcs.cd if get_wcs(sci).wcs.has_cd()
                                 else get_wcs(sci).pixel_scale_matrix)
                 and np.allclose(get_wcs(tmpl).all_pix2world([[0, 0]], 0),
                                 get_wcs(sci).all_pix2world([[0, 0]], 0), atol=1e-9))
    if not same_grid:
        click.echo("warping the template onto the science grid ...")
        tmpl = get_template(sci, tmpl)
    from ..errors import AlgorithmError

    fallback = None
    try:
        result = subtract(sci, tmpl, config=config)
    except AlgorithmError as error:
        if "too few kernel sources" not in str(error):
            raise
        # small images: admit the bright (S/N > 500) stars and sources near the edge
        fallback = {"source_snr_max": 1e6, "restrict_kernel_edge_sources": False}
        click.echo(f"{error}; retrying with {fallback}")
        config = config.replace(**fallback)
        result = subtract(sci, tmpl, config=config)
    difference = result.difference.compute()
    difference.attrs = dict(result.difference.attrs)
    write_exposure(difference, out / "difference.fits", overwrite=overwrite)
    write_exposure(result.matched, out / "matched.fits", overwrite=overwrite)
    write_kernel(result.kernel, out / "kernel.fits")
    from .qa import footprint_ratio

    ratio_mean, ratio_std = footprint_ratio(difference, sci, result.kernel_sources,
                                            radius=result.metadata["science_psf_fwhm"])
    result.metadata.update(difference_footprint_ratio_mean=ratio_mean,
                           difference_footprint_ratio_stdev=ratio_std)
    n_dia_sources = None
    if not no_detect:
        from ..detect import detect_and_measure, write_dia_sources

        catalog = detect_and_measure(sci, result.matched, difference)
        write_dia_sources(catalog, out / "diaSrc.parquet", overwrite=overwrite)
        n_dia_sources = catalog.num_rows
    summary = {"science": str(science), "template": str(template), "config": config.to_dict(),
               "n_dia_sources": n_dia_sources,
               "metadata": result.metadata, "residuals": _residual_figures(difference, sci),
               "n_kernel_sources": len(result.kernel_sources), "fallback": fallback,
               "elapsed_s": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    products = "difference.fits, matched.fits, kernel.fits, " + (
        "" if no_detect else f"diaSrc.parquet ({n_dia_sources} DIA sources), ") + "summary.json"
    click.echo(f"wrote {out}/: {products} "
               f"(kernel sum {result.kernel.kernel_sum:.4f}, photometric scale "
               f"{result.metadata['photometric_scale']:.4f}, "
               f"{result.metadata['n_kernel_sources_used']} kernel sources)")
