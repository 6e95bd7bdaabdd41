"""Pipelines as YAML: the shipped files, shared parameters and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daskdiff import ConfigError
from daskdiff.workflow import load_pipeline, parse_pipeline

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
BASE = {
    "description": "test",
    "instrument": "dc2-sim",
    "parameters": {"coaddName": "goodSeeing"},
    "tasks": {
        "getTemplate": {"class": "GetTemplate"},
        "subtract": {"class": "AlardLupton", "config": {"mode": "auto"}},
        "detectAndMeasure": {"class": "DetectAndMeasure"},
    },
}


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return data


@pytest.mark.parametrize("name", ["al", "dcr", "pair"])
def test_shipped_pipelines_load(name):
    pipeline = load_pipeline(WORKFLOWS / f"{name}.yaml")
    assert [pipeline.task(s).stage for s in ("template", "subtract", "detect")] == [
        "template", "subtract", "detect"]
    coadd = pipeline.parameters["coaddName"]
    assert pipeline.dataset_name("difference") == f"{coadd}Diff_differenceExp"
    assert pipeline.task("template").config.coadd_name == coadd
    assert parse_pipeline(pipeline.to_dict()).to_dict() == pipeline.to_dict()


def test_dcr_pipeline_values():
    config = load_pipeline(WORKFLOWS / "dcr.yaml").task("template").config
    assert (config.effective_wavelength, config.bandwidth, config.num_subfilters) == (
        476.31, 147.0, 3)


@pytest.mark.parametrize(("data", "message"), [
    (_with(tasks__getTemplate__class="GetTemplat"), "did you mean 'GetTemplate'"),
    (_with(tasks__getTemplate__config={"boarder": 3}), "did you mean 'border'"),
    (_with(tasks__getTemplate__config={"border": "wide"}), "border"),
    (_with(tasks__getTemplate__class="GetDcrTemplate"), "missing required value"),
    (_with(tasks__getTemplate__config={"coaddName": "deep"}), "set it once"),
    (_with(parameters={"coadName": "x"}), "did you mean 'coaddName'"),
    (_with(extra=1), "unknown top-level key"),
    ({"tasks": {"getTemplate": {"class": "GetTemplate"}}}, "missing"),
])
def test_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_pipeline(data)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(bad)
