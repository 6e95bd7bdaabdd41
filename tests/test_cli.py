"""The command line: help on every subcommand, `daskdiff info`, clear one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from daskdiff import Repository, VisitInfo, make_exposure
from daskdiff.cli import main

from .conftest import make_tan_wcs


def test_help_on_every_subcommand():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert main.commands, "subcommands are registered"
    for name in main.commands:
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage" in sub.output


def test_info_summarises_a_repository(tmp_path):
    repo = Repository.create(tmp_path / "repo")
    for visit in (3, 4):
        exposure = make_exposure(np.zeros((20, 30)), variance=np.ones((20, 30)),
                                 wcs=make_tan_wcs(),
                                 visit_info=VisitInfo(visit=visit, detector=1, band="r"))
        repo.put_exposure(exposure, "calexp", visit=visit, detector=1)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert "calexp" in result.output
    as_json = CliRunner().invoke(main, ["info", "--json", str(tmp_path / "repo")])
    assert as_json.exit_code == 0 and '"calexp"' in as_json.output


@pytest.mark.parametrize("args", [["info", "/nonexistent/repo"]])
def test_errors_are_one_clear_line_with_status_2(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "error (input)" in result.output
    assert "does not exist" in result.output
