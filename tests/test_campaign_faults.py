"""Campaign fault tests on a `tiny` repository with a LocalCluster of 2 single-thread workers.

(a) a worker process killed mid-campaign costs only its in-flight quantum, which is retried:
    every quantum ends as in a clean run and the products are identical;
(d) the driver (``daskdiff run`` in a subprocess) killed mid-campaign: running it again
    completes without redoing the quanta recorded done, without duplicate catalog rows, and
    every product reads back.
(c), a corrupt input, is ``tests/test_campaign.py::test_corrupt_input_fails_only_that_quantum``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from daskdiff import Repository, load_pipeline
from daskdiff.simulate.campaign import simulate
from daskdiff.simulate.presets import get_preset
from daskdiff.workflow.campaign import run_campaign

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
PIPELINE = WORKFLOWS / "al.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A tiny repository, and a copy of it after a clean (synchronous) run."""
    base = tmp_path_factory.mktemp("faults")
    simulate(base / "tiny", get_preset("tiny", seed=3), scheduler="sync")
    shutil.copytree(base / "tiny", base / "clean")
    repo = Repository.open(base / "clean")
    summary = run_campaign(load_pipeline(PIPELINE), repo, cluster="sync")
    assert summary.counts["done"] >= 2
    return base / "tiny", repo, summary


def _states(repo, run):
    return {(q.visit, q.detector): q.state for q in repo.ledger.quanta(run)}


def _assert_same_products(repo, reference, run):
    pipeline = load_pipeline(PIPELINE)
    for quantum in reference.ledger.quanta(run, state="done"):
        ids = {"visit": quantum.visit, "detector": quantum.detector}
        for kind in ("template", "difference", "matched"):
            a = reference.get_exposure(pipeline.dataset_name(kind), run=run, **ids, chunks=None)
            b = repo.get_exposure(pipeline.dataset_name(kind), run=run, **ids, chunks=None)
            for plane in ("image", "variance", "mask"):
                np.testing.assert_array_equal(a[plane].values, b[plane].values)
        a = reference.get_table(pipeline.dataset_name("diaSrc"), run=run, **ids)
        b = repo.get_table(pipeline.dataset_name("diaSrc"), run=run, **ids)
        assert a.num_rows == b.num_rows
        np.testing.assert_array_equal(a.column("psf_flux_njy").to_numpy(),
                                      b.column("psf_flux_njy").to_numpy())


def test_killed_worker_costs_only_its_quantum(clean, tmp_path):
    from distributed import Client, LocalCluster

    tiny, reference, summary = clean
    shutil.copytree(tiny, tmp_path / "repo")
    repo = Repository.open(tmp_path / "repo")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        outcome: dict = {}

        def drive():
            try:
                outcome["summary"] = run_campaign(load_pipeline(PIPELINE), repo,
                                                  cluster=cluster.scheduler_address)
            except BaseException as error:  # reported by the assertion below
                outcome["error"] = error

        thread = threading.Thread(target=drive)
        thread.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and thread.is_alive():
            busy = {address: keys for address, keys in client.processing().items() if keys}
            if busy:
                time.sleep(1.0)  # well inside the quantum (the first takes seconds)
                address = sorted(busy)[0]
                pid = client.run(os.getpid, workers=[address])[address]
                os.kill(pid, signal.SIGKILL)
                killed = pid
            else:
                time.sleep(0.2)
        thread.join(timeout=600)
    assert killed is not None, "no quantum was seen running"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["summary"]
    assert result.counts == summary.counts
    assert _states(repo, result.run) == _states(reference, summary.run)
    assert max(q.attempts for q in repo.ledger.quanta(result.run)) == 1  # retried by Dask
    _assert_same_products(repo, reference, result.run)


def test_killed_driver_resumes_without_redoing_or_duplicating(clean, tmp_path):
    tiny, reference, summary = clean
    shutil.copytree(tiny, tmp_path / "repo")
    root = tmp_path / "repo"
    repo = Repository.open(root)
    command = [sys.executable, "-c", "from daskdiff.cli import main; main()", "run",
               str(PIPELINE), str(root), "--cluster", "local", "--workers", "2",
               "--stamps", "0"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    run = summary.run
    try:
        deadline = time.monotonic() + 300
        done: dict = {}
        while time.monotonic() < deadline and process.poll() is None:
            try:
                done = {(q.visit, q.detector): q for q in repo.ledger.quanta(run, state="done")}
            except Exception:  # the run is not registered yet
                done = {}
            if done:
                break
            time.sleep(0.1)
        assert process.poll() is None, "the campaign ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)  # the driver only
        process.wait()
    finally:
        time.sleep(1.0)  # its workers exit when their parent dies; make sure of it
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert done, "no quantum was done in time"
    unfinished = [q for q in repo.ledger.quanta(run) if q.state in ("pending", "running")]
    assert unfinished, "the driver was killed after the last quantum"

    again = run_campaign(load_pipeline(PIPELINE), repo, cluster="sync")
    assert again.counts == summary.counts
    assert again.processed == len(unfinished) and again.skipped == 4 - len(unfinished)
    for key, before in done.items():  # not redone: same attempt, same timestamps
        after = repo.ledger.get(run, visit=key[0], detector=key[1])
        assert (after.state, after.attempts, after.started, after.ended) == (
            "done", before.attempts, before.started, before.ended)
    pipeline = load_pipeline(PIPELINE)
    refs = repo.query(pipeline.dataset_name("diaSrc"), run=run)
    keys = [(r.data_id["visit"], r.data_id["detector"]) for r in refs]
    assert len(keys) == len(set(keys)) == again.counts["done"]
    for quantum in repo.ledger.quanta(run, state="done"):  # every product reads back
        ids = {"visit": quantum.visit, "detector": quantum.detector}
        for kind in ("template", "difference", "matched"):
            exposure = repo.get_exposure(pipeline.dataset_name(kind), run=run, **ids,
                                         chunks=None)
            assert np.isfinite(exposure["image"].values).any()
        assert repo.get_table(pipeline.dataset_name("diaSrc"), run=run, **ids).num_rows >= 0
        assert repo.get_json(pipeline.dataset_name("kernel"), run=run, **ids)
    _assert_same_products(repo, reference, run)
