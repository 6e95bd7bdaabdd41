"""Pipelines as YAML files, in the form of the LSST pipeline files.

A pipeline names a description, an instrument, shared ``parameters`` written once, and
``tasks``: one per stage (template, subtract, detect), each naming a stage variant ``class`` and
its ``config``::

    description: Alard-Lupton difference imaging of a DC2-like survey
    instrument: dc2-sim
    parameters:
      coaddName: goodSeeing
    tasks:
      getTemplate:
        class: GetTemplate
      subtract:
        class: AlardLupton
        config:
          mode: auto
      detectAndMeasure:
        class: DetectAndMeasure

Nothing in a pipeline file is executed or imported: ``class`` is looked up in
:data:`STAGE_VARIANTS`, and every config is validated by its variant's typed config model
before anything runs. A shared parameter reaches every task whose config has that field and
every dataset name (``{coaddName}Diff_differenceExp``, ...); setting it again inside a task is
an error, so each setting is written once.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import StageConfig
from ..errors import ConfigError

__all__ = ["STAGE_VARIANTS", "Pipeline", "TaskSpec", "load_pipeline", "parse_pipeline"]

#: Known stage variants: class name -> (stage, "module:ConfigClass").
STAGE_VARIANTS: dict[str, tuple[str, str]] = {
    "GetTemplate": ("template", "daskdiff.template:GetTemplateConfig"),
    "GetDcrTemplate": ("template", "daskdiff.template:GetDcrTemplateConfig"),
    "ExposureTemplate": ("template", "daskdiff.template:ExposureTemplateConfig"),
    "AlardLupton": ("subtract", "daskdiff.subtract.config:AlardLuptonConfig"),
    "DetectAndMeasure": ("detect", "daskdiff.detect.config:DetectAndMeasureConfig"),
}

#: The stages a pipeline must have, in execution order.
STAGES: tuple[str, ...] = ("template", "subtract", "detect")

#: Shared parameters and their defaults.
PARAMETERS: dict[str, Any] = {"coaddName": "goodSeeing"}

#: Dataset-name suffixes of the products, by kind.
PRODUCTS: dict[str, str] = {
    "template": "Diff_templateExp",
    "difference": "Diff_differenceExp",
    "matched": "Diff_matchedExp",
    "kernel": "Diff_psfMatchKernel",
    "score": "Diff_scoreExp",
    "diaSrc": "Diff_diaSrc",
}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a pipeline: its label, stage, variant class and validated config."""

    label: str
    stage: str
    class_name: str
    config: StageConfig


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline."""

    description: str
    instrument: str
    parameters: dict[str, Any]
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    source: str = "<pipeline>"

    def task(self, stage: str) -> TaskSpec:
        """Return the task of a stage (``"template"``, ``"subtract"`` or ``"detect"``)."""
        for spec in self.tasks.values():
            if spec.stage == stage:
                return spec
        raise ConfigError(f"{self.source}: the pipeline has no {stage} task")

    def dataset_name(self, kind: str) -> str:
        """Return a product's dataset name, e.g. ``goodSeeingDiff_differenceExp``."""
        if kind not in PRODUCTS:
            raise ConfigError(f"unknown product {kind!r}; known: {sorted(PRODUCTS)}")
        return f"{self.parameters['coaddName']}{PRODUCTS[kind]}"

    def to_dict(self) -> dict[str, Any]:
        """Return the fully resolved pipeline (every config value), JSON-able.

        Shared parameters appear once, under ``parameters``; the result parses back to an
        equal pipeline.
        """
        def task_config(spec: TaskSpec) -> dict[str, Any]:
            values = spec.config.to_dict()
            return {k: v for k, v in values.items() if k not in self.parameters}

        return {
            "description": self.description,
            "instrument": self.instrument,
            "parameters": dict(self.parameters),
            "tasks": {label: {"class": spec.class_name, "config": task_config(spec)}
                      for label, spec in self.tasks.items()},
        }


def _config_class(class_name: str) -> type[StageConfig]:
    module, name = STAGE_VARIANTS[class_name][1].split(":")
    return getattr(importlib.import_module(module), name)


def _suggest(value: str, known: list[str]) -> str:
    guess = difflib.get_close_matches(value, known, n=1)
    return f"; did you mean {guess[0]!r}?" if guess else f"; known: {known}"


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def parse_pipeline(data: Any, *, source: str = "<pipeline>") -> Pipeline:
    """Validate a parsed pipeline document and return a :class:`Pipeline`.

    Raises
    ------
    ConfigError
        Unknown keys, classes or parameters (with suggestions), wrong types, missing required
        values, a stage given twice or missing, a parameter set again inside a task.
    """
    data = _require_mapping(data, source)
    allowed = ["description", "instrument", "parameters", "tasks"]
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown top-level key {key!r}{_suggest(key, allowed)}")
    parameters = dict(PARAMETERS)
    for key, value in _require_mapping(data.get("parameters"), f"{source}: parameters").items():
        if key not in PARAMETERS:
            raise ConfigError(f"{source}: unknown parameter {key!r}"
                              f"{_suggest(key, sorted(PARAMETERS))}")
        if not isinstance(value, type(PARAMETERS[key])):
            raise ConfigError(f"{source}: parameter {key} must be a "
                              f"{type(PARAMETERS[key]).__name__}, got {value!r}")
        parameters[key] = value
    tasks: dict[str, TaskSpec] = {}
    seen: dict[str, str] = {}
    for label, body in _require_mapping(data.get("tasks"), f"{source}: tasks").items():
        where = f"{source}: tasks.{label}"
        body = _require_mapping(body, where)
        for key in body:
            if key not in ("class", "config"):
                raise ConfigError(f"{where}: unknown key {key!r}"
                                  f"{_suggest(key, ['class', 'config'])}")
        class_name = body.get("class")
        if class_name not in STAGE_VARIANTS:
            raise ConfigError(f"{where}: unknown class {class_name!r}"
                              f"{_suggest(str(class_name), sorted(STAGE_VARIANTS))}")
        stage = STAGE_VARIANTS[class_name][0]
        if stage in seen:
            raise ConfigError(f"{where}: a second {stage} task (already {seen[stage]!r})")
        seen[stage] = label
        config_class = _config_class(class_name)
        values = dict(_require_mapping(body.get("config"), f"{where}.config"))
        for key, value in parameters.items():
            field_name = _field_for(config_class, key)
            if field_name is None:
                continue
            if key in values or field_name in values:
                raise ConfigError(f"{where}: {key} is a pipeline parameter; set it once under "
                                  "'parameters', not in the task config")
            values[field_name] = value
        tasks[label] = TaskSpec(label, stage, class_name,
                                config_class.from_mapping(values, where=where))
    missing = [stage for stage in STAGES if stage not in seen]
    if missing:
        raise ConfigError(f"{source}: the pipeline needs a task for each stage; missing "
                          f"{missing} (e.g. class GetTemplate, AlardLupton, DetectAndMeasure)")
    return Pipeline(str(data.get("description", "")), str(data.get("instrument", "")),
                    parameters, tasks, source)


def _field_for(config_class: type[StageConfig], parameter: str) -> str | None:
    for name, info in config_class.model_fields.items():
        if parameter in (name, info.alias):
            return name
    return None


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline YAML file.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid YAML, or fails validation (see
        :func:`parse_pipeline`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist; the shipped pipelines are in "
                          "workflows/ (al.yaml, dcr.yaml, pair.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_pipeline(data, source=str(path))
