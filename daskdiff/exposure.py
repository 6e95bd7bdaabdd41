"""The exposure data model: an :class:`xarray.Dataset` with image, variance and mask planes.

An exposure is a Dataset with

- data variables ``image`` (float32), ``variance`` (float32) and ``mask`` (uint32 bit planes),
  all on dims ``(y, x)``;
- integer coordinates ``y`` and ``x`` in the **parent frame** (a template grown by a border has
  coordinates outside the science box, as LSST's ``xy0``);
- attributes holding the metadata objects: ``wcs`` (:class:`astropy.wcs.WCS`, parent frame),
  ``psf`` (:class:`daskdiff.psf.Psf`), ``photo_calib`` (:class:`~daskdiff.metadata.PhotoCalib`),
  ``visit_info`` (:class:`~daskdiff.metadata.VisitInfo`) and ``mask_planes``
  (:class:`~daskdiff.masks.MaskPlanes`).

Planes are dask arrays chunked in square tiles by default (:data:`DEFAULT_TILE_SIZE`), so an
exposure can be much larger than memory and every per-pixel operation runs tile-parallel.
The functions here are the supported way to build, inspect and cut exposures; an ``xarray``
accessor ``exposure.dd`` offers the same as properties for notebook use.
"""

from __future__ import annotations

from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr

from .box import Box
from .errors import InputError
from .masks import DEFAULT_MASK_PLANES, MaskPlanes
from .metadata import PhotoCalib, VisitInfo

__all__ = [
    "DEFAULT_TILE_SIZE",
    "PLANES",
    "exposure_box",
    "cutout",
    "get_mask_planes",
    "get_photo_calib",
    "get_psf",
    "get_visit_info",
    "get_wcs",
    "is_lazy",
    "load",
    "make_exposure",
    "mask_of",
    "rechunk",
    "replace_metadata",
    "require_psf",
    "require_wcs",
    "validate_exposure",
]

#: Default tile edge (pixels) of the dask chunks of an exposure's planes.
DEFAULT_TILE_SIZE = 1024

#: Data variables of an exposure and their dtypes.
PLANES: dict[str, np.dtype] = {
    "image": np.dtype("float32"),
    "variance": np.dtype("float32"),
    "mask": np.dtype("uint32"),
}

_METADATA_KEYS = ("wcs", "psf", "photo_calib", "visit_info", "mask_planes")

Chunks = int | tuple[int, int] | Literal["auto"] | None


def _as_plane(name: str, array: Any, chunks: Chunks) -> Any:
    dtype = PLANES[name]
    if isinstance(array, xr.DataArray):
        array = array.data
    if isinstance(array, da.Array):
        array = array.astype(dtype, copy=False)
        if chunks is not None:
            array = array.rechunk(_chunk_spec(chunks))
        return array
    array = np.asarray(array)
    if array.ndim != 2:
        raise InputError(f"the {name} plane must be 2-D (y, x); got shape {array.shape}")
    if name != "mask" and not np.issubdtype(array.dtype, np.floating) and array.dtype != bool:
        array = array.astype(np.float64)
    array = array.astype(dtype, copy=False)
    if chunks is None:
        return array
    return da.from_array(array, chunks=_chunk_spec(chunks), name=False)


def _chunk_spec(chunks: Chunks) -> Any:
    if isinstance(chunks, int):
        if chunks <= 0:
            raise InputError(f"tile size must be a positive number of pixels, got {chunks}")
        return (chunks, chunks)
    return chunks


def make_exposure(
    image: Any,
    *,
    variance: Any,
    mask: Any = None,
    x0: int = 0,
    y0: int = 0,
    wcs: Any = None,
    psf: Any = None,
    photo_calib: PhotoCalib | None = None,
    visit_info: VisitInfo | None = None,
    mask_planes: MaskPlanes | None = None,
    chunks: Chunks = DEFAULT_TILE_SIZE,
) -> xr.Dataset:
    """Build an exposure from its planes and metadata.

    Parameters
    ----------
    image : array-like
        The pixel values (counts), 2-D ``(y, x)``; numpy or dask.
    variance : array-like
        Per-pixel variance of ``image``, same shape.
    mask : array-like, optional
        Bit-plane mask, same shape; zeros if omitted.
    x0, y0 : int, optional
        Parent-frame coordinates of the first pixel.
    wcs : astropy.wcs.WCS, optional
        Parent-frame celestial WCS.
    psf : daskdiff.psf.Psf, optional
        PSF model (parent-frame positions).
    photo_calib : PhotoCalib, optional
        Photometric calibration; 1 nJy per count if omitted.
    visit_info : VisitInfo, optional
        Observation metadata.
    mask_planes : MaskPlanes, optional
        Mask-plane registry; the standard planes if omitted.
    chunks : int, tuple, "auto" or None, optional
        Tile size of the dask chunks; ``None`` keeps numpy arrays (eager).

    Returns
    -------
    xarray.Dataset
        The exposure.

    Raises
    ------
    InputError
        If the planes are not 2-D or their shapes differ.
    """
    image = _as_plane("image", image, chunks)
    if image.ndim != 2:
        raise InputError(f"the image plane must be 2-D (y, x); got shape {image.shape}")
    if variance is None:
        raise InputError(
            "an exposure needs a variance plane; estimate one (e.g. read_exposure() derives it "
            "from GAIN/RDNOISE and the sky for plain images)"
        )
    variance = _as_plane("variance", variance, chunks)
    if mask is None:
        mask = (da.zeros(image.shape, dtype=np.uint32, chunks=image.chunks)
                if isinstance(image, da.Array) else np.zeros(image.shape, np.uint32))
    else:
        mask = _as_plane("mask", mask, chunks)
    for name, plane in (("variance", variance), ("mask", mask)):
        if plane.shape != image.shape:
            raise InputError(
                f"the {name} plane has shape {plane.shape} but the image has {image.shape}; "
                "all planes of an exposure must have the same shape"
            )
    ny, nx = image.shape
    dims = ("y", "x")
    exposure = xr.Dataset(
        {"image": (dims, image), "variance": (dims, variance), "mask": (dims, mask)},
        coords={"y": np.arange(y0, y0 + ny, dtype=np.int64),
                "x": np.arange(x0, x0 + nx, dtype=np.int64)},
    )
    exposure.attrs.update(
        wcs=wcs,
        psf=psf,
        photo_calib=photo_calib if photo_calib is not None else PhotoCalib(),
        visit_info=visit_info,
        mask_planes=mask_planes if mask_planes is not None else DEFAULT_MASK_PLANES,
    )
    return exposure


def validate_exposure(exposure: xr.Dataset, *, source: str = "exposure") -> xr.Dataset:
    """Check that a Dataset is a well-formed exposure and return it.

    Raises
    ------
    InputError
        Naming ``source`` and what is missing or inconsistent.
    """
    if not isinstance(exposure, xr.Dataset):
        raise InputError(f"{source}: expected an xarray.Dataset exposure, got {type(exposure)}")
    for name in PLANES:
        if name not in exposure:
            raise InputError(f"{source}: missing the {name!r} plane")
        if exposure[name].dims != ("y", "x"):
            raise InputError(f"{source}: the {name} plane has dims {exposure[name].dims}, "
                             "expected ('y', 'x')")
    for axis in ("x", "y"):
        coord = exposure.coords.get(axis)
        if coord is None or (coord.size and not np.all(np.diff(coord.values) == 1)):
            raise InputError(f"{source}: the {axis} coordinate must be consecutive integers")
    return exposure


def exposure_box(exposure: xr.Dataset) -> Box:
    """Return the parent-frame pixel box of an exposure."""
    x = exposure.coords["x"].values
    y = exposure.coords["y"].values
    x0 = int(x[0]) if x.size else 0
    y0 = int(y[0]) if y.size else 0
    return Box(x0, y0, int(x.size), int(y.size))


def get_wcs(exposure: xr.Dataset) -> Any:
    """Return the exposure's WCS, or ``None``."""
    return exposure.attrs.get("wcs")


def require_wcs(exposure: xr.Dataset, *, what: str = "exposure") -> Any:
    """Return the exposure's WCS, or raise :class:`InputError` saying it is needed."""
    wcs = get_wcs(exposure)
    if wcs is None:
        raise InputError(f"the {what} has no WCS; one is needed here (attach it with "
                         "replace_metadata(exposure, wcs=...))")
    return wcs


def get_psf(exposure: xr.Dataset) -> Any:
    """Return the exposure's PSF model, or ``None``."""
    return exposure.attrs.get("psf")


def require_psf(exposure: xr.Dataset, *, what: str = "exposure") -> Any:
    """Return the PSF, or raise :class:`InputError` suggesting PSF estimation."""
    psf = get_psf(exposure)
    if psf is None:
        raise InputError(f"the {what} has no PSF model; estimate one with "
                         "daskdiff.psf.estimate_psf(exposure)")
    return psf


def get_photo_calib(exposure: xr.Dataset) -> PhotoCalib:
    """Return the photometric calibration (1 nJy per count if unset)."""
    return exposure.attrs.get("photo_calib") or PhotoCalib()


def get_visit_info(exposure: xr.Dataset) -> VisitInfo | None:
    """Return the visit information, or ``None``."""
    return exposure.attrs.get("visit_info")


def get_mask_planes(exposure: xr.Dataset) -> MaskPlanes:
    """Return the mask-plane registry (the standard one if unset)."""
    return exposure.attrs.get("mask_planes") or DEFAULT_MASK_PLANES


def mask_of(exposure: xr.Dataset, *planes: str) -> xr.DataArray:
    """Return a boolean DataArray: pixels where any of the named planes is set.

    Raises
    ------
    InputError
        If a plane name is unknown to the exposure's registry.
    """
    bits = get_mask_planes(exposure).bitmask(*planes)
    return (exposure["mask"] & np.uint32(bits)) != 0


def replace_metadata(exposure: xr.Dataset, **changes: Any) -> xr.Dataset:
    """Return a shallow copy with some metadata attributes replaced.

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure.
    **changes
        New values for ``wcs``, ``psf``, ``photo_calib``, ``visit_info`` or ``mask_planes``.
    """
    unknown = set(changes) - set(_METADATA_KEYS)
    if unknown:
        raise InputError(f"unknown exposure metadata {sorted(unknown)}; "
                         f"known: {list(_METADATA_KEYS)}")
    result = exposure.copy(deep=False)
    result.attrs = dict(exposure.attrs)
    result.attrs.update(changes)
    return result


def cutout(
    exposure: xr.Dataset,
    box: Box,
    *,
    mode: Literal["strict", "clip", "pad"] = "strict",
) -> xr.Dataset:
    """Return the part of an exposure inside a parent-frame box, keeping all metadata.

    Parameters
    ----------
    exposure : xarray.Dataset
        The exposure.
    box : Box
        The parent-frame box wanted.
    mode : {"strict", "clip", "pad"}, optional
        What to do where ``box`` extends beyond the exposure: ``"strict"`` raises,
        ``"clip"`` returns only the overlap, ``"pad"`` returns the full box with the missing
        pixels set to NaN image and variance and the NO_DATA mask plane.

    Returns
    -------
    xarray.Dataset
        The cutout (lazy if the exposure is), with the same WCS, PSF and metadata.
    """
    full = exposure_box(exposure)
    overlap = full.intersection(box)
    if mode == "strict" and overlap != box:
        raise InputError(f"cutout box {box} extends beyond the exposure {full}; "
                         "use mode='clip' or mode='pad'")
    if mode not in ("strict", "clip", "pad"):
        raise InputError(f"unknown cutout mode {mode!r}; use 'strict', 'clip' or 'pad'")
    ys, xs = overlap.slices(origin=(full.x0, full.y0))
    part = exposure.isel(y=ys, x=xs)
    if mode != "pad" or overlap == box:
        return part
    no_data = np.uint32(get_mask_planes(exposure).bitmask("NO_DATA"))
    pad = ((overlap.y0 - box.y0, box.y1 - overlap.y1), (overlap.x0 - box.x0, box.x1 - overlap.x1))
    if overlap.is_empty:
        pad = ((box.height, 0), (box.width, 0))
    fills = {"image": np.nan, "variance": np.nan, "mask": no_data}
    planes = {}
    for name, fill in fills.items():
        data = part[name].data
        lib = da if isinstance(data, da.Array) else np
        planes[name] = lib.pad(data, pad, mode="constant",
                               constant_values=np.asarray(fill, PLANES[name]))
    return make_exposure(planes["image"], variance=planes["variance"], mask=planes["mask"],
                         x0=box.x0, y0=box.y0, chunks=None,
                         **{key: exposure.attrs.get(key) for key in _METADATA_KEYS})


def rechunk(exposure: xr.Dataset, chunks: Chunks = DEFAULT_TILE_SIZE) -> xr.Dataset:
    """Return the exposure with its planes rechunked into tiles (or loaded if ``None``)."""
    if chunks is None:
        return load(exposure)
    spec = _chunk_spec(chunks)
    result = exposure.chunk({"y": spec[0], "x": spec[1]} if isinstance(spec, tuple) else spec)
    result.attrs = dict(exposure.attrs)
    return result


def load(exposure: xr.Dataset) -> xr.Dataset:
    """Return the exposure with every plane computed into memory (numpy)."""
    result = exposure.compute()
    result.attrs = dict(exposure.attrs)
    return result


def is_lazy(exposure: xr.Dataset) -> bool:
    """Return whether any plane is still a dask array (not loaded)."""
    return any(isinstance(exposure[name].data, da.Array) for name in PLANES if name in exposure)


@xr.register_dataset_accessor("dd")
class ExposureAccessor:
    """Notebook shortcuts: ``exposure.dd.box``, ``.wcs``, ``.psf``, ``.cutout(box)``, ..."""

    def __init__(self, dataset: xr.Dataset) -> None:
        self._ds = dataset

    @property
    def box(self) -> Box:
        """The parent-frame pixel box."""
        return exposure_box(self._ds)

    @property
    def wcs(self) -> Any:
        """The WCS (or ``None``)."""
        return get_wcs(self._ds)

    @property
    def psf(self) -> Any:
        """The PSF model (or ``None``)."""
        return get_psf(self._ds)

    @property
    def photo_calib(self) -> PhotoCalib:
        """The photometric calibration."""
        return get_photo_calib(self._ds)

    @property
    def visit_info(self) -> VisitInfo | None:
        """The visit information (or ``None``)."""
        return get_visit_info(self._ds)

    @property
    def mask_planes(self) -> MaskPlanes:
        """The mask-plane registry."""
        return get_mask_planes(self._ds)

    def cutout(self, box: Box, *, mode: Literal["strict", "clip", "pad"] = "strict"
               ) -> xr.Dataset:
        """See :func:`cutout`."""
        return cutout(self._ds, box, mode=mode)

    def mask_of(self, *planes: str) -> xr.DataArray:
        """See :func:`mask_of`."""
        return mask_of(self._ds, *planes)
