"""Pipelines (YAML) and campaigns: what to run on which data, and where."""

from .pipeline import STAGE_VARIANTS, Pipeline, TaskSpec, load_pipeline, parse_pipeline

__all__ = ["STAGE_VARIANTS", "Pipeline", "TaskSpec", "load_pipeline", "parse_pipeline"]
