"""DetectAndMeasure: detection and measurement of DIA sources on a difference image.

The entry point is :func:`detect_and_measure`, returning the diaSrc table (a
:class:`pyarrow.Table` with the fixed schema of :func:`dia_source_schema`);
:func:`write_dia_sources` / :func:`read_dia_sources` store it as Parquet.
"""

from .catalog import read_dia_sources, write_dia_sources
from .config import DetectAndMeasureConfig
from .schema import aperture_column, dia_source_schema, empty_table
from .stage import DetectionResult, detect_and_measure, make_source_id, run_detect_and_measure

__all__ = [
    "DetectAndMeasureConfig",
    "DetectionResult",
    "aperture_column",
    "detect_and_measure",
    "dia_source_schema",
    "empty_table",
    "make_source_id",
    "read_dia_sources",
    "run_detect_and_measure",
    "write_dia_sources",
]
