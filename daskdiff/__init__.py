"""daskdiff: difference-image analysis for wide-field time-domain surveys, on Dask."""

from .box import Box
from .detect import DetectAndMeasureConfig, detect_and_measure
from .errors import AlgorithmError, ConfigError, DaskdiffError, InputError, NoWorkError
from .exposure import (
    DEFAULT_TILE_SIZE,
    cutout,
    exposure_box,
    get_mask_planes,
    get_photo_calib,
    get_psf,
    get_visit_info,
    get_wcs,
    load,
    make_exposure,
    mask_of,
    rechunk,
    replace_metadata,
)
from .io import read_exposure, write_exposure
from .masks import MaskPlanes
from .metadata import Observatory, PhotoCalib, VisitInfo, Weather
from .repository import Repository
from .skymap import SkyMap
from .subtract import AlardLuptonConfig, SubtractionResult, subtract
from .template import GetDcrTemplateConfig, GetTemplateConfig, get_template
from .workflow import load_pipeline

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TILE_SIZE",
    "AlardLuptonConfig",
    "AlgorithmError",
    "Box",
    "ConfigError",
    "DaskdiffError",
    "DetectAndMeasureConfig",
    "GetDcrTemplateConfig",
    "GetTemplateConfig",
    "InputError",
    "MaskPlanes",
    "NoWorkError",
    "Observatory",
    "PhotoCalib",
    "Repository",
    "SkyMap",
    "SubtractionResult",
    "VisitInfo",
    "Weather",
    "cutout",
    "detect_and_measure",
    "exposure_box",
    "get_mask_planes",
    "get_photo_calib",
    "get_psf",
    "get_template",
    "get_visit_info",
    "get_wcs",
    "load",
    "load_pipeline",
    "make_exposure",
    "mask_of",
    "read_exposure",
    "rechunk",
    "replace_metadata",
    "subtract",
    "write_exposure",
]
