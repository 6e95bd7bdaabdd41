"""Campaigns: `daskdiff run` over a tiny simulated repository, the ledger, resume, failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from daskdiff import ConfigError, Repository, load_pipeline
from daskdiff.cli import main
from daskdiff.simulate.campaign import simulate
from daskdiff.simulate.presets import get_preset
from daskdiff.workflow.campaign import parse_where, run_campaign
from daskdiff.workflow.pipeline import parse_pipeline

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
    assert bad.state == "failed" and bad.error_kind == "input" and bad.attempts == 1
    assert "calexp" in bad.reason and "unreadable" in bad.reason and str(victim) in bad.reason
    others = [q for q in repo.ledger.quanta(summary.run) if (q.visit, q.detector) != (
        bad.visit, bad.detector)]
    # every other quantum ends as in a clean run
    assert all(q.state == "done" for q in others)


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


# --- rerun, status, report -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ran(tiny, tmp_path_factory):
    """A copy of the tiny repository after one synchronous AL campaign."""
    root = tmp_path_factory.mktemp("ran") / "repo"
    shutil.copytree(tiny, root)
    summary = run_campaign(load_pipeline(WORKFLOWS / "al.yaml"), Repository.open(root),
                           cluster="sync")
    return root, summary


def _copy_ran(ran, tmp_path):
    shutil.copytree(ran[0], tmp_path / "repo")
    return Repository.open(tmp_path / "repo"), ran[1]


def test_ledger_records_peak_memory_and_noise_ratio(ran):
    repo, summary = Repository.open(ran[0]), ran[1]
    done = list(repo.ledger.quanta(summary.run, state="done"))
    assert done
    for quantum in done:
        assert quantum.seconds > 0
        assert 50 * 2**20 < quantum.peak_memory < 8 * 2**30
        # the decorrelated difference's noise is what its variance plane says
        assert 0.9 < quantum.qa["noise_ratio"] < 1.1
    assert summary.peak_memory == max(q.peak_memory for q in done)


def test_rerun_failed_into_a_new_run_with_overrides(tiny, tmp_path):
    from daskdiff.workflow.campaign import apply_overrides, rerun_campaign
    from daskdiff.workflow.pipeline import parse_pipeline

    repo = _copy(tiny, tmp_path)
    # a deterministic failure: detector 1 is asked for more kernel sources than it has
    base = load_pipeline(WORKFLOWS / "al.yaml")
    strict = parse_pipeline(apply_overrides(base.to_dict(), ["subtract.minKernelSources=1000"]))
    summary = run_campaign(strict, repo, cluster="sync", where="detector == 1", run="strict")
    failed = {(q.visit, q.detector) for q in repo.ledger.quanta(summary.run, state="failed")}
    assert failed and all(q.error_kind == "algorithm"
                          for q in repo.ledger.quanta(summary.run, state="failed"))
    before = {(q.visit, q.detector, q.state, q.attempts) for q in repo.ledger.quanta(summary.run)}
    result = rerun_campaign(repo, run=summary.run, failed=True, into="relaxed", cluster="sync",
                            overrides=["subtract.minKernelSources=3",
                                       "subtract.restrictKernelEdgeSources=false"])
    assert result.run == "relaxed" and result.processed == len(failed)
    assert result.counts["done"] == len(failed)
    assert {(q.visit, q.detector) for q in repo.ledger.quanta("relaxed")} == failed
    info = repo.ledger.get_run("relaxed")
    config = info.config["tasks"]["subtract"]["config"]
    assert config["minKernelSources"] == 3 and config["restrictKernelEdgeSources"] is False
    assert summary.run in info.description and "minKernelSources" in info.description
    # the parent run is untouched
    assert {(q.visit, q.detector, q.state, q.attempts)
            for q in repo.ledger.quanta(summary.run)} == before


def test_rerun_where_qa_in_the_same_run(ran, tmp_path):
    from daskdiff.workflow.campaign import rerun_campaign

    repo, summary = _copy_ran(ran, tmp_path)
    pipeline = load_pipeline(WORKFLOWS / "al.yaml")
    before = {(q.visit, q.detector): q for q in repo.ledger.quanta(summary.run)}
    chosen = {k for k, q in before.items() if q.state == "done" and k[1] == 0}
    assert chosen
    result = rerun_campaign(repo, run=summary.run, where="noise_ratio > 0.5 and detector == 0",
                            cluster="sync")
    assert result.processed == len(chosen) and result.counts == summary.counts
    for key, old in before.items():
        new = repo.ledger.get(summary.run, visit=key[0], detector=key[1])
        assert new.attempts == old.attempts + (key in chosen)
        assert (new.started == old.started) == (key not in chosen)
    refs = repo.query(pipeline.dataset_name("diaSrc"), run=summary.run)
    assert len(refs) == summary.counts["done"]  # overwritten, not duplicated


def test_rerun_errors(ran):
    from daskdiff.workflow.campaign import rerun_campaign

    repo, summary = Repository.open(ran[0]), ran[1]
    cases = [
        ({}, "--failed and/or --where"),
        ({"failed": True, "overrides": ["subtract.mode=convolveScience"]}, "--into"),
        ({"failed": True, "overrides": ["subtract.mode"], "into": "x"}, "TASK.KEY=VALUE"),
        ({"failed": True, "overrides": ["subtrct.mode=auto"], "into": "x"}, "'subtract'"),
        ({"failed": True, "overrides": ["subtract.mdoe=auto"], "into": "x"}, "'mode'"),
        ({"failed": True, "overrides": ["subtract.kernelSize=big"], "into": "x"}, "kernelSize"),
        ({"where": "noise_ratoi > 1.2"}, "did you mean 'noise_ratio'"),
        ({"where": "__import__('os')"}, "not allowed"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            rerun_campaign(repo, run=summary.run, cluster="sync", **kwargs)
    assert [r.name for r in repo.ledger.runs()] == [summary.run]  # nothing was created


def test_cli_status_rerun_and_report(ran, tmp_path):
    import json

    repo, summary = _copy_ran(ran, tmp_path)
    status = CliRunner().invoke(main, ["status", str(repo.root), "--run", summary.run])
    assert status.exit_code == 0, status.output
    for text in ("slowest quanta", "peak memory", "noise ratio", "QA outliers"):
        assert text in status.output
    as_json = CliRunner().invoke(main, ["status", str(repo.root), "--run", summary.run,
                                        "--json"])
    assert json.loads(as_json.output)["counts"] == summary.counts
    rerun = CliRunner().invoke(main, ["rerun", str(repo.root), "--run", summary.run, "--where",
                                      "visit < 0", "--cluster", "sync"])
    assert rerun.exit_code == 0, rerun.output
    assert "0 quanta" in rerun.output
    report = CliRunner().invoke(main, ["report", str(repo.root), "--run", summary.run,
                                       "-o", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "| done |" in (tmp_path / "report" / "report.md").read_text()
    figures = json.loads((tmp_path / "report" / "report.json").read_text())[0]
    assert figures["counts"] == summary.counts and "noise_ratio" in figures["qa"]


def test_qa_outliers_flag_deviant_quanta():
    import numpy as np

    from daskdiff.workflow.report import qa_outliers

    rng = np.random.default_rng(7)
    ratio = rng.normal(1.0, 0.01, 50)
    ratio[[3, 17]] = [1.35, 0.7]
    sources = rng.poisson(20, 50).astype(float)
    sources[30] = 400
    found = qa_outliers(np.arange(50) + 1000, np.zeros(50, int),
                        {"noise_ratio": ratio, "n_dia_sources": sources})
    flagged = {(o["visit"], o["figure"]) for o in found}
    assert {(1003, "noise_ratio"), (1017, "noise_ratio"), (1030, "n_dia_sources")} <= flagged
    assert all(v in (1003, 1017, 1030) for v, _ in flagged)


# --- the driver ------------------------------------------------------------------------------


def _flaky(root, pipeline, run, visit, detector):
    from daskdiff.workflow.driver import QuantumResult

    marker = Path(root) / f"tried-{visit}-{detector}"
    if detector == 1 and not marker.exists():
        marker.write_text("once")
        raise OSError("a transient I/O error")
    return QuantumResult(visit, detector, "done", seconds=0.001)


def test_driver_records_trivial_quanta_and_retries(tmp_path):
    from daskdiff.workflow.driver import trivial_quantum

    repo = Repository.create(tmp_path / "repo")
    pipeline = load_pipeline(WORKFLOWS / "al.yaml")
    quanta = [(v, d) for v in range(100) for d in range(3)]
    summary = run_campaign(pipeline, repo, run="trivial", quanta=quanta, cluster="sync",
                           quantum_function=trivial_quantum)
    assert summary.counts["done"] == 300 and summary.processed == 300
    assert {q.attempts for q in repo.ledger.quanta("trivial")} == {1}
    flaky = run_campaign(pipeline, repo, run="flaky", quanta=quanta[:9], cluster="sync",
                         quantum_function=_flaky)
    assert flaky.counts["done"] == 9
    assert {(q.detector, q.attempts) for q in repo.ledger.quanta("flaky")} == {
        (0, 1), (1, 1), (2, 1)}  # retried inside the attempt (sync: in-process loop)


def test_group_tasks_return_retry_markers(tmp_path):
    from daskdiff.workflow.driver import group_size, run_group

    results, seconds = run_group(_flaky, str(tmp_path), {}, "r", [(1, 0), (1, 1), (1, 2)])
    assert [r.state for r in results] == ["done", "retry", "done"] and seconds >= 0
    assert "OSError" in results[1].reason and results[1].error_kind == "exception"
    assert group_size(None, target=0.2, limit=100) == 1
    assert group_size(5.0, target=0.2, limit=100) == 1
    assert group_size(0.01, target=0.2, limit=100) == 20
    assert group_size(0.0, target=0.2, limit=100) == 100


@pytest.mark.slow
def test_driver_on_a_local_cluster_groups_short_quanta(tmp_path):
    from daskdiff.workflow.driver import trivial_quantum

    repo = Repository.create(tmp_path / "repo")
    quanta = [(v, d) for v in range(1000) for d in range(3)]
    summary = run_campaign(load_pipeline(WORKFLOWS / "al.yaml"), repo, run="trivial",
                           quanta=quanta, cluster="local", workers=2, batch_size=1000,
                           quantum_function=trivial_quantum)
    assert summary.counts["done"] == 3000
    assert {q.attempts for q in repo.ledger.quanta("trivial")} == {1}


def test_missing_template_inputs_fail_before_any_work(tiny, tmp_path):
    repo = _copy(tiny, tmp_path)
    document = yaml.safe_load((WORKFLOWS / "al.yaml").read_text())
    document["parameters"]["coaddName"] = "deep"
    with pytest.raises(ConfigError, match=r"no deepCoadd coadds.*goodSeeing"):
        run_campaign(parse_pipeline(document), repo, cluster="sync")
    document = yaml.safe_load((WORKFLOWS / "pair.yaml").read_text())
    document["tasks"]["getTemplate"]["config"]["templateVisit"] = 4242
    with pytest.raises(ConfigError, match=r"template visit 4242 .*not in"):
        run_campaign(parse_pipeline(document), repo, cluster="sync")
    assert repo.ledger.runs() == []  # no run was started


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dcr", "pair"])
def test_shipped_pipeline_on_a_local_cluster(tiny, tmp_path, name):
    repo = _copy(tiny, tmp_path)
    pipeline = load_pipeline(WORKFLOWS / f"{name}.yaml")
    summary = run_campaign(pipeline, repo, cluster="local", workers=2)
    counts = summary.counts
    n_quanta = len(repo.query("calexp"))
    assert counts["pending"] == counts["running"] == 0
    assert counts["done"] + counts["no-work"] + counts["failed"] == n_quanta
    assert counts["done"] >= 1
    for quantum in repo.ledger.quanta(summary.run):
        data_id = {"visit": quantum.visit, "detector": quantum.detector}
        catalogs = repo.query(pipeline.dataset_name("diaSrc"), run=summary.run, **data_id)
        if quantum.state == "done":
            assert len(catalogs) == 1
            for kind in ("difference", "template"):
                assert repo.exists(pipeline.dataset_name(kind), run=summary.run, **data_id)
        else:
            assert catalogs == [] and quantum.reason
