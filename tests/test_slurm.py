"""Campaigns on a real single-node Slurm through dask-jobqueue (``--cluster slurm:PROFILE``).

A session fixture starts the local Slurm with the project's own script
(``deploy/slurm/start-local-slurm.sh``: installs slurmctld, slurmd and munge with apt if needed)
and skips these tests, with the script's output, where it cannot (not root, no apt). The
campaign tests run ``workflows/al.yaml`` on a ``tiny`` simulated repository with every worker a
Slurm job, and compare every product with a synchronous run of the same campaign: difference
images pixel for pixel and DIA catalogs row for row. The fault test ``scancel``s a worker's job
mid-campaign. Jobs are named ``daskdiff-worker`` and none is left in the queue afterwards; the
Slurm daemons stay up (stop them with ``deploy/slurm/stop-local-slurm.sh``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from daskdiff import Repository, load_pipeline
from daskdiff.simulate.campaign import simulate
from daskdiff.simulate.presets import get_preset
from daskdiff.workflow.campaign import run_campaign
from daskdiff.workflow.cluster import load_profile, open_cluster

# a generous limit: where Slurm never runs the worker jobs, fail instead of hanging CI
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = ROOT / "deploy" / "slurm" / "start-local-slurm.sh"
WORKFLOW = ROOT / "workflows" / "al.yaml"
JOB_NAME = "daskdiff-test-worker"


# --- Slurm -------------------------------------------------------------------------------

def _our_jobs() -> list[str]:
    """Ids of this module's Slurm jobs still in the queue."""
    out = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-o", "%i"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return out.split()


def _wait_for_empty_queue(timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (jobs := _our_jobs()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return jobs


@pytest.fixture(scope="session")
def local_slurm():
    """Start the local Slurm once per session (idempotent); skip where it cannot start."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the local Slurm needs Linux and root (apt-get, daemons)")
    try:
        proc = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True,
                              timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"{START_SCRIPT.name} could not run: {error}")
    if proc.returncode != 0:
        pytest.skip(f"{START_SCRIPT.name} failed (exit {proc.returncode}):\n"
                    f"{(proc.stdout + proc.stderr)[-2000:]}")
    yield proc.stdout
    leftover = _wait_for_empty_queue(timeout=20)
    if leftover:  # never leave our worker jobs behind
        subprocess.run(["scancel", "-n", JOB_NAME], timeout=30, check=False)


@pytest.fixture
def profile_path(local_slurm, tmp_path) -> Path:
    """The shipped local-slurm profile, with its directories under ``tmp_path``."""
    profile = load_profile("local-slurm")
    profile.update(log_directory=str(tmp_path / "slurm-logs"),
                   local_directory=str(tmp_path / "scratch"), job_name=JOB_NAME)
    path = tmp_path / "local-slurm-test.yaml"
    path.write_text(yaml.safe_dump(profile))
    yield path
    assert _wait_for_empty_queue() == [], "Slurm worker jobs left in the queue"


def _worker_jobs(client) -> dict[str, tuple[str | None, int]]:
    """Each connected worker's address -> (its SLURM_JOB_ID, its pid)."""
    return client.run(lambda: (os.environ.get("SLURM_JOB_ID"), os.getpid()))


# --- the campaign and its reference --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, local_slurm):
    """A tiny simulated repository and the synchronous run of al.yaml on a copy of it."""
    base = tmp_path_factory.mktemp("slurm-campaign")
    simulate(base / "pristine", get_preset("tiny", seed=3), scheduler="sync")
    shutil.copytree(base / "pristine", base / "reference")
    reference = Repository.open(base / "reference")
    summary = run_campaign(load_pipeline(WORKFLOW), reference, cluster="sync")
    assert summary.counts["done"] >= 2, summary.counts
    return base / "pristine", reference, summary.run


def _fresh_copy(tiny, tmp_path) -> Repository:
    shutil.copytree(tiny[0], tmp_path / "repo")
    return Repository.open(tmp_path / "repo")


def _assert_same_products(reference: Repository, ref_run: str, repo: Repository,
                          run: str) -> int:
    """Every quantum in the same final state, identical products; return the number done."""
    import pandas as pd

    pipeline = load_pipeline(WORKFLOW)
    expected = {(q.visit, q.detector): q for q in reference.ledger.quanta(ref_run)}
    got = {(q.visit, q.detector): q for q in repo.ledger.quanta(run)}
    assert got.keys() == expected.keys()
    n_done = 0
    for quantum, ref in expected.items():
        assert (got[quantum].state, got[quantum].reason) == (ref.state, ref.reason), quantum
        if ref.state != "done":
            continue
        n_done += 1
        ids = {"visit": quantum[0], "detector": quantum[1]}
        for product in ("difference", "matched", "template"):
            name = pipeline.dataset_name(product)
            a = reference.get_exposure(name, run=ref_run, chunks=None, **ids)
            b = repo.get_exposure(name, run=run, chunks=None, **ids)
            for plane in ("image", "variance", "mask"):
                np.testing.assert_array_equal(b[plane].values, a[plane].values,
                                              err_msg=f"{product} {plane} {quantum}")
        name = pipeline.dataset_name("diaSrc")
        a = reference.get_table(name, run=ref_run, **ids).to_pandas()
        b = repo.get_table(name, run=run, **ids).to_pandas()
        pd.testing.assert_frame_equal(b, a, check_exact=True)
        assert len(repo.query(name, run=run, **ids)) == 1
    assert n_done == sum(q.state == "done" for q in expected.values())
    return n_done


# --- tests -----------------------------------------------------------------------------------

def test_campaign_on_slurm_matches_the_synchronous_run(tiny, tmp_path, profile_path):
    """`--cluster slurm:PROFILE`: the workers are Slurm jobs; the products are identical."""
    from distributed import get_client

    repo = _fresh_copy(tiny, tmp_path)
    seen: dict[str, tuple[str | None, int]] = {}
    messages: list[str] = []

    def progress(message: str) -> None:
        messages.append(message)
        seen.update(_worker_jobs(get_client()))  # the campaign's client, the default one

    start = time.perf_counter()
    summary = run_campaign(load_pipeline(WORKFLOW), repo, cluster=f"slurm:{profile_path}",
                           progress=progress)
    seconds = time.perf_counter() - start
    assert summary.counts["pending"] == summary.counts["running"] == 0
    assert any("dashboard" in m and "http://127.0.0.1:" in m for m in messages), messages[:3]
    # every worker that showed up was a Slurm job, and every quantum ran in one of them
    assert seen and all(job is not None for job, _ in seen.values()), seen
    slurm_pids = {pid for _, pid in seen.values()}
    for quantum in repo.ledger.quanta(summary.run):
        if quantum.state == "done":
            numbers = {int(n) for n in re.findall(r"\d+", quantum.worker or "")}
            assert numbers & slurm_pids, (quantum.worker, seen)
    n_done = _assert_same_products(tiny[1], tiny[2], repo, summary.run)
    print(f"slurm campaign: {n_done} quanta done in {seconds:.1f} s, "
          f"Slurm jobs {sorted({job for job, _ in seen.values()})}")


def test_scancelled_worker_job_is_replaced_and_products_identical(tiny, tmp_path,
                                                                  profile_path):
    """`scancel` a worker job mid-campaign: every quantum done, identical, the job replaced."""
    profile = yaml.safe_load(profile_path.read_text())
    profile["adapt"] = {"minimum_jobs": 2, "maximum_jobs": 2}
    profile_path.write_text(yaml.safe_dump(profile))
    repo = _fresh_copy(tiny, tmp_path)
    with open_cluster(f"slurm:{profile_path}") as handle:
        client = handle.client
        assert handle.max_workers == 2
        client.wait_for_workers(2, timeout=120)
        before = _worker_jobs(client)
        assert all(job is not None for job, _ in before.values()), before
        cancelled: list[str] = []
        killed_at: list[float] = []

        def progress(message: str) -> None:
            if cancelled or not message.startswith("visit "):
                return
            # the first result is in: cancel the job of a worker that is running a quantum
            busy = {address: keys for address, keys in client.processing().items() if keys}
            victim = next(iter(busy or before))
            job = before[victim][0]
            subprocess.run(["scancel", job], check=True, timeout=30)
            cancelled.append(job)
            killed_at.append(time.monotonic())
            print(f"scancel {job} (worker {victim}, running {busy.get(victim)})")

        summary = run_campaign(load_pipeline(WORKFLOW), repo,
                               cluster=handle.client.scheduler.address, progress=progress)
        assert cancelled, "the campaign ended before a job could be cancelled"
        assert summary.counts["pending"] == summary.counts["running"] == 0
        _assert_same_products(tiny[1], tiny[2], repo, summary.run)
        # adapt submits a replacement for the cancelled job
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            jobs = {job for job, _ in _worker_jobs(client).values()}
            if len(jobs) == 2 and cancelled[0] not in jobs:
                break
            time.sleep(1)
        jobs = {job for job, _ in _worker_jobs(client).values()}
        print(f"summary: {summary.counts}; jobs before {sorted(j for j, _ in before.values())}"
              f", after {sorted(jobs)} ({time.monotonic() - killed_at[0]:.1f} s after scancel)")
        assert cancelled[0] not in jobs and len(jobs) == 2, (cancelled, jobs)
        assert jobs - {job for job, _ in before.values()}, "no replacement job"
