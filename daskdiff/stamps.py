"""Postage stamps of DIA sources: science, template and difference cut-outs.

For each source of a diaSrc catalog a ``size`` x ``size`` box centred on the pixel holding its
centroid is cut from the three exposures. Where the box leaves an exposure the missing pixels
are NaN with the NO_DATA plane set, and the stamp is flagged ``clipped`` with the missing
fraction recorded. Stamps are written as one multi-extension FITS per source (SCIENCE, TEMPLATE,
DIFFERENCE images with their MASK and VARIANCE), or as one stack per quantum (cubes), plus PNG
triplets (science | template | difference, one zscale stretch over the three) and an HTML
gallery page.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import xarray as xr
from astropy.io import fits
from astropy.visualization import ZScaleInterval

from .box import Box
from .errors import InputError
from .exposure import cutout, exposure_box, load
from .io.atomic import atomic_path

__all__ = [
    "PANELS",
    "Stamp",
    "cut_stamps",
    "make_stamps",
    "stamp_limits",
    "write_gallery",
    "write_stamp_fits",
    "write_stamp_png",
    "write_stamp_stack",
]

#: The three panels of a stamp, in display order.
PANELS = ("science", "template", "difference")


@dataclass(frozen=True)
class Stamp:
    """The three cut-outs around one DIA source.

    Attributes
    ----------
    source_id : int
        The diaSrc id.
    x, y : float
        The source centroid (parent frame).
    box : Box
        The stamp's parent-frame box.
    images : dict of str to xarray.Dataset
        ``science``, ``template`` and ``difference`` cut-outs on ``box`` (eager).
    clipped : bool
        Part of the box lies outside at least one exposure.
    missing_fraction : float
        Largest fraction of the box outside an exposure.
    """

    source_id: int
    x: float
    y: float
    box: Box
    images: dict[str, xr.Dataset]
    clipped: bool
    missing_fraction: float


def stamp_box(x: float, y: float, size: int) -> Box:
    """Return the ``size`` x ``size`` box centred on the pixel containing ``(x, y)``."""
    if size < 3:
        raise InputError(f"stamp size must be at least 3 pixels, got {size}")
    cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    return Box(cx - size // 2, cy - size // 2, size, size)


def cut_stamps(science: xr.Dataset, template: xr.Dataset, difference: xr.Dataset,
               catalog: pa.Table, *, size: int = 100) -> list[Stamp]:
    """Cut science, template and difference stamps around every source of a catalog.

    Parameters
    ----------
    science, template, difference : xarray.Dataset
        The exposures (the template may be larger than the science box).
    catalog : pyarrow.Table
        A diaSrc catalog (``id``, ``x``, ``y``).
    size : int, optional
        Stamp edge in pixels.

    Returns
    -------
    list of Stamp
        One per catalog row, in catalog order.
    """
    for column in ("id", "x", "y"):
        if column not in catalog.column_names:
            raise InputError(f"the catalog has no {column!r} column; pass a diaSrc catalog")
    exposures = {"science": load(science), "template": load(template),
                 "difference": load(difference)}
    stamps = []
    ids = catalog["id"].to_pylist()
    xs = catalog["x"].to_pylist()
    ys = catalog["y"].to_pylist()
    for source_id, x, y in zip(ids, xs, ys, strict=True):
        box = stamp_box(float(x), float(y), size)
        images = {name: cutout(exp, box, mode="pad") for name, exp in exposures.items()}
        missing = max(1.0 - exposure_box(exp).intersection(box).area / box.area
                      for exp in exposures.values())
        stamps.append(Stamp(int(source_id), float(x), float(y), box, images, missing > 0,
                            float(missing)))
    return stamps


def _header(stamp: Stamp) -> fits.Header:
    header = fits.Header()
    header["SRCID"] = (stamp.source_id, "diaSrc id")
    header["SRC_X"] = (stamp.x, "source centroid x (parent frame)")
    header["SRC_Y"] = (stamp.y, "source centroid y (parent frame)")
    header["LTV1"] = (-stamp.box.x0, "parent x = array x - LTV1")
    header["LTV2"] = (-stamp.box.y0, "parent y = array y - LTV2")
    header["CRVAL1A"], header["CRVAL2A"] = stamp.box.x0, stamp.box.y0
    header["CLIPPED"] = (stamp.clipped, "part of the stamp is outside an exposure")
    header["MISSFRAC"] = (stamp.missing_fraction, "largest missing fraction")
    return header


def write_stamp_fits(stamp: Stamp, path: str | os.PathLike[str], *,
                     overwrite: bool = False) -> Path:
    """Write one stamp as a multi-extension FITS file (atomically).

    Extensions: ``SCIENCE``, ``TEMPLATE``, ``DIFFERENCE`` (images), then ``<NAME>_MASK`` and
    ``<NAME>_VARIANCE`` for each; the primary header holds the source id, position and clip
    flag.
    """
    hdus: list[fits.hdu.base.ExtensionHDU] = [fits.PrimaryHDU(header=_header(stamp))]
    for name in PANELS:
        image = stamp.images[name]
        for suffix, plane in (("", "image"), ("_MASK", "mask"), ("_VARIANCE", "variance")):
            hdus.append(fits.ImageHDU(np.asarray(image[plane].values),
                                      name=f"{name.upper()}{suffix}"))
    with atomic_path(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path)


def write_stamp_stack(stamps: Sequence[Stamp], path: str | os.PathLike[str], *,
                      overwrite: bool = False) -> Path:
    """Write all stamps of a quantum as cubes (one HDU per panel) plus a table of sources."""
    if not stamps:
        raise InputError("no stamps to write; the catalog is empty")
    sizes = {s.box.shape for s in stamps}
    if len(sizes) != 1:
        raise InputError(f"stamps of different sizes {sorted(sizes)} cannot be stacked")
    hdus: list[fits.hdu.base.ExtensionHDU] = [fits.PrimaryHDU()]
    for name in PANELS:
        cube = np.stack([np.asarray(s.images[name]["image"].values) for s in stamps])
        hdus.append(fits.ImageHDU(cube, name=name.upper()))
    columns = [
        fits.Column("id", "K", array=[s.source_id for s in stamps]),
        fits.Column("x", "D", array=[s.x for s in stamps]),
        fits.Column("y", "D", array=[s.y for s in stamps]),
        fits.Column("box_x0", "J", array=[s.box.x0 for s in stamps]),
        fits.Column("box_y0", "J", array=[s.box.y0 for s in stamps]),
        fits.Column("clipped", "L", array=[s.clipped for s in stamps]),
    ]
    hdus.append(fits.BinTableHDU.from_columns(columns, name="SOURCES"))
    with atomic_path(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path)


def stamp_limits(stamp: Stamp) -> tuple[float, float]:
    """Return one zscale ``(vmin, vmax)`` for the three panels of a stamp."""
    values = np.concatenate([np.asarray(stamp.images[name]["image"].values).ravel()
                             for name in PANELS])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    vmin, vmax = ZScaleInterval().get_limits(values)
    if not vmax > vmin:
        vmax = vmin + 1.0
    return float(vmin), float(vmax)


def write_stamp_png(stamp: Stamp, path: str | os.PathLike[str]) -> Path:
    """Write the science | template | difference triplet as a PNG (one zscale stretch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmin, vmax = stamp_limits(stamp)
    figure, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    for axis, name in zip(axes, PANELS, strict=True):
        data = np.asarray(stamp.images[name]["image"].values, float)
        axis.imshow(data, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                    interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    note = " (clipped)" if stamp.clipped else ""
    figure.suptitle(f"{stamp.source_id}  x={stamp.x:.1f} y={stamp.y:.1f}{note}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return path


def write_gallery(catalog: pa.Table, images: dict[int, str], path: str | os.PathLike[str],
                  *, title: str = "DIA sources") -> Path:
    """Write an HTML gallery: one row per source with its PNG triplet and key columns."""
    keys = [c for c in ("id", "x", "y", "psf_flux", "psf_flux_err", "is_negative",
                        "dipole_classification", "sky_source") if c in catalog.column_names]
    rows = []
    for record in catalog.select(keys).to_pylist():
        cells = "".join(f"<td>{_fmt(record[k])}</td>" for k in keys)
        image = images.get(int(record["id"]))
        picture = f'<img src="{html.escape(image)}" loading="lazy">' if image else ""
        rows.append(f"<tr>{cells}<td>{picture}</td></tr>")
    header = "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "<th>stamp</th>"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif}td,th{padding:2px 6px;"
            "font-size:12px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{catalog.num_rows} sources; science | template"
            " | difference, one zscale stretch per source.</p>"
            f"<table><tr>{header}</tr>{''.join(rows)}</table></body></html>\n")
    with atomic_path(path, overwrite=True) as tmp:
        Path(tmp).write_text(page)
    return Path(path)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return html.escape(str(value))


def make_stamps(science: xr.Dataset, template: xr.Dataset, difference: xr.Dataset,
                catalog: pa.Table, outdir: str | os.PathLike[str], *, size: int = 100,
                stack: bool = False, overwrite: bool = False) -> Path:
    """Write the stamps of every source: FITS (per source or one stack), PNGs, ``index.html``.

    Returns
    -------
    pathlib.Path
        The gallery page ``outdir/index.html``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stamps = cut_stamps(science, template, difference, catalog, size=size)
    images: dict[int, str] = {}
    if stack and stamps:
        write_stamp_stack(stamps, outdir / "stamps.fits", overwrite=overwrite)
    for stamp in stamps:
        if not stack:
            write_stamp_fits(stamp, outdir / f"{stamp.source_id}.fits", overwrite=overwrite)
        png = write_stamp_png(stamp, outdir / f"{stamp.source_id}.png")
        images[stamp.source_id] = png.name
    return write_gallery(catalog, images, outdir / "index.html")
