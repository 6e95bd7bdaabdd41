"""Campaigns: `daskdiff run` over a tiny simulated repository, the ledger, resume, failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from daskdiff import ConfigError, Repository, load_pipeline
from daskdiff.cli import main
from daskdiff.simulate.campaign import simulate
from daskdiff.simulate.presets import get_preset
from daskdiff.workflow.campaign import parse_where, run_campaign

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign") / "repo"
    simulate(root, get_preset("tiny", seed=3), scheduler="sync")
    return root


def _copy(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "repo")
    return Repository.open(tmp_path / "repo")


def test_run_records_every_quantum_and_writes_products(tiny, tmp_path):
    repo = _copy(tiny, tmp_path)
    pipeline = load_pipeline(WORKFLOWS / "al.yaml")
    summary = run_campaign(pipeline, repo, cluster="sync")
    counts = summary.counts
    n_quanta = len(repo.query("calexp"))
    assert counts["pending"] == counts["running"] == 0
    assert counts["done"] + counts["no-work"] + counts["failed"] == n_quanta == summary.processed
    for quantum in repo.ledger.quanta(summary.run):
        data_id = {"visit": quantum.visit, "detector": quantum.detector}
        products = repo.query(pipeline.dataset_name("diaSrc"), run=summary.run, **data_id)
        if quantum.state == "done":
            assert len(products) == 1
            assert repo.exists(pipeline.dataset_name("difference"), run=summary.run, **data_id)
            table = repo.get_table(products[0])
            assert "sky_source" in table.column_names
        else:
            assert products == [] and quantum.reason
            assert quantum.error_kind in ("algorithm", "no-work", "input")
    # resuming runs nothing again (deterministic failures are not retried) and adds no rows
    again = run_campaign(pipeline, repo, cluster="sync")
    assert again.processed == 0 and again.skipped == n_quanta
    assert again.counts == counts
    assert len(repo.query(pipeline.dataset_name("diaSrc"), run=summary.run)) == counts["done"]


def test_corrupt_input_fails_only_that_quantum(tiny, tmp_path):
    repo = _copy(tiny, tmp_path)
    ref = repo.query("calexp")[0]
    victim = repo.path(ref)
    for chunk in victim.rglob("*"):
        if chunk.is_file() and "image" in str(chunk) and "zarr.json" not in chunk.name:
            chunk.write_bytes(b"not a zarr chunk")
    summary = run_campaign(load_pipeline(WORKFLOWS / "al.yaml"), repo, cluster="sync",
                           attempts=1)
    bad = repo.ledger.get(summary.run, visit=ref.data_id["visit"],
                          detector=ref.data_id["detector"])
    assert bad.state == "failed" and bad.reason
    others = [q for q in repo.ledger.quanta(summary.run) if (q.visit, q.detector) != (
        bad.visit, bad.detector)]
    assert all(q.state in ("done", "no-work", "failed") for q in others)


def test_where_selection_and_errors():
    select = parse_where("visit in (1000, 1001) and detector < 1")
    assert select(1000, 0) and not select(1000, 1) and not select(1002, 0)
    for bad in ("__import__('os')", "band == 'g'", "visit.real > 1", "visit in ("):
        with pytest.raises(ConfigError):
            parse_where(bad)


def test_cli_run_and_status(tiny, tmp_path):
    repo = _copy(tiny, tmp_path)
    result = CliRunner().invoke(main, ["run", str(WORKFLOWS / "al.yaml"), str(repo.root),
                                       "--cluster", "sync", "--where", "detector == 1"])
    assert result.exit_code == 0, result.output
    assert "DIA sources found" in result.output
    found = int(result.output.split("DIA sources found: ")[1].split()[0])
    assert ("stamps of the brightest" in result.output) == (found > 0)
    if found:
        page = repo.root / "runs" / "goodSeeingDiff" / "stamps" / "index.html"
        assert page.exists() and "brightest DIA sources" in page.read_text()
        assert list(page.parent.rglob("*.png"))
    status = CliRunner().invoke(main, ["status", str(repo.root), "--run", "goodSeeingDiff"])
    assert status.exit_code == 0, status.output
    assert "run goodSeeingDiff" in status.output
    missing = CliRunner().invoke(main, ["run", str(tmp_path / "none.yaml"), str(repo.root)])
    assert missing.exit_code == 2 and "does not exist" in missing.output


@pytest.mark.slow
def test_local_cluster_gives_the_same_products(tiny, tmp_path):
    import numpy as np

    serial = _copy(tiny, tmp_path / "a")
    parallel = _copy(tiny, tmp_path / "b")
    pipeline = load_pipeline(WORKFLOWS / "al.yaml")
    first = run_campaign(pipeline, serial, cluster="sync")
    second = run_campaign(pipeline, parallel, cluster="local", workers=2)
    assert first.counts == second.counts
    for ref in serial.query(pipeline.dataset_name("difference"), run=first.run):
        a = serial.get_exposure(ref, chunks=None)
        b = parallel.get_exposure(pipeline.dataset_name("difference"), run=second.run,
                                  **{k: ref.data_id[k] for k in ("visit", "detector")},
                                  chunks=None)
        np.testing.assert_array_equal(a["image"].values, b["image"].values)
