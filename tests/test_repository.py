"""Tests of the repository: layout, registry, data-ID validation, atomic writes, the ledger."""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astropy.wcs import WCS

from daskdiff.errors import AlgorithmError, ConfigError, InputError, NoWorkError
from daskdiff.exposure import is_lazy, make_exposure
from daskdiff.ledger import STATES, error_state
from daskdiff.metadata import PhotoCalib, VisitInfo
from daskdiff.repository import ANY_RUN, DatasetRef, Repository
from daskdiff.skymap import SkyMap

ROOT = Path(__file__).resolve().parents[1]


def make_wcs(ra: float = 150.0, dec: float = 2.0) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [30.0, 20.0]
    wcs.wcs.cd = np.array([[-0.2, 0.01], [0.01, 0.2]]) / 3600
    return wcs


def make_test_exposure(seed: int = 1, *, visit: int = 123, detector: int = 4, band: str = "r",
                       shape: tuple[int, int] = (48, 64), chunks: int | None = 32):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    variance = np.full(shape, 100.0, np.float32) + rng.uniform(0, 1, shape).astype(np.float32)
    mask = rng.integers(0, 2**5, shape).astype(np.uint32)
    info = VisitInfo(visit=visit, detector=detector, band=band, physical_filter=f"{band}_sim",
                     mjd=60000.5, exposure_time=30.0, airmass=1.2)
    return make_exposure(image, variance=variance, mask=mask, x0=1000, y0=-20, wcs=make_wcs(),
                         photo_calib=PhotoCalib(0.25, 0.001), visit_info=info, chunks=chunks)


def visible_files(root: Path) -> set[str]:
    """Every file under root outside hidden files and directories (relative paths).

    Empty directories are not listed: a failed write may leave the (empty) parent directory
    it created, which other writers of the same visit may be using at the same moment.
    """
    found = set()
    for base, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and not name.startswith("registry.sqlite3"):
                found.add(str((Path(base) / name).relative_to(root)))
    return found


def registry_rows(repo: Repository) -> list[tuple]:
    with sqlite3.connect(repo.registry_path) as conn:
        return conn.execute("SELECT dataset_type, run, data_key, path FROM datasets "
                            "ORDER BY id").fetchall()


def snapshot(repo: Repository) -> tuple:
    """Files, registry rows and quantum rows: what a failed call must not change."""
    with sqlite3.connect(repo.registry_path) as conn:
        quanta = conn.execute("SELECT * FROM quanta ORDER BY run, visit, detector").fetchall()
        types = conn.execute("SELECT * FROM dataset_types ORDER BY name").fetchall()
    return visible_files(repo.root), registry_rows(repo), quanta, types


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository.create(tmp_path / "repo")


def run_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------------------------
# create / open
# --------------------------------------------------------------------------------------------


def test_create_and_open(tmp_path):
    root = tmp_path / "repo"
    repo = Repository.create(root)
    assert (root / "daskdiff-repository.json").is_file()
    with sqlite3.connect(repo.registry_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Repository.open(root)
    assert again.root == repo.root
    assert pickle.loads(pickle.dumps(again)).root == repo.root
    # an existing repository is not overwritten by accident
    with pytest.raises(InputError, match="not empty"):
        Repository.create(root)
    repo.put_json({"a": 1}, "runConfig")
    fresh = Repository.create(root, overwrite=True)
    assert fresh.query() == []


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match=r"does not exist.*Repository.create"):
        Repository.open(tmp_path / "nowhere")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a daskdiff repository"):
        Repository.open(plain)
    # overwrite never deletes a directory daskdiff did not make
    with pytest.raises(InputError, match="not a daskdiff repository"):
        Repository.create(plain, overwrite=True)
    assert (plain / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        Repository.create(tmp_path / "file")


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------


def test_exposure_round_trip(repo):
    exposure = make_test_exposure()
    ref = repo.put_exposure(exposure, "calexp", visit=123, detector=4)
    assert ref.path == "calexp/visit=000123/detector=004.zarr"
    assert ref.data_id == {"visit": 123, "detector": 4, "band": "r", "physical_filter": "r_sim"}
    assert (repo.root / ref.path).is_dir()
    back = repo.get_exposure("calexp", visit=123, detector=4)
    assert is_lazy(back)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(back[plane].values, exposure[plane].values)
        assert back[plane].dtype == exposure[plane].dtype
    np.testing.assert_array_equal(back["x"].values, np.arange(1000, 1064))
    np.testing.assert_array_equal(back["y"].values, np.arange(-20, 28))
    assert back.attrs["visit_info"] == exposure.attrs["visit_info"]
    assert back.attrs["photo_calib"] == exposure.attrs["photo_calib"]
    x, y = np.array([1000.0, 1063.0]), np.array([-20.0, 27.0])
    np.testing.assert_allclose(back.attrs["wcs"].all_pix2world(x, y, 0),
                               exposure.attrs["wcs"].all_pix2world(x, y, 0), rtol=0, atol=1e-12)
    # a reference reads the same; eager read
    eager = repo.get_exposure(ref, chunks=None)
    assert not is_lazy(eager)
    np.testing.assert_array_equal(eager["image"].values, exposure["image"].values)

    # products in a run, coadds and DCR coadds
    diff = repo.put_exposure(exposure, "goodSeeingDiff_differenceExp", run="r1", visit=123,
                             detector=4)
    assert diff.path == "runs/r1/goodSeeingDiff_differenceExp/visit=000123/detector=004.zarr"
    coadd = repo.put_exposure(exposure, "goodSeeingCoadd", tract=0, patch=12, band="r")
    assert coadd.path == "goodSeeingCoadd/tract=0000/patch=012/band=r.zarr"
    dcr = repo.put_exposure(exposure, "dcrCoadd", tract=0, patch=12, band="r", subfilter=2)
    assert dcr.path == "dcrCoadd/tract=0000/patch=012/band=r/subfilter=02.zarr"
    np.testing.assert_array_equal(
        repo.get_exposure("dcrCoadd", tract=0, patch=12, band="r", subfilter=2)["image"].values,
        exposure["image"].values)


def test_table_round_trip(repo):
    schema = pa.schema([("id", pa.int64()), ("ra", pa.float64()), ("flag", pa.bool_()),
                        ("name", pa.string())], metadata={b"units": b"deg"})
    table = pa.table({"id": [1, 2, 3], "ra": [150.1, 150.2, None], "flag": [True, False, True],
                      "name": ["a", "b", None]}, schema=schema)
    ref = repo.put_table(table, "goodSeeingDiff_diaSrc", run="r1", visit=5, detector=9)
    assert ref.path == "runs/r1/goodSeeingDiff_diaSrc/visit=000005/detector=009.parquet"
    back = repo.get_table("goodSeeingDiff_diaSrc", run="r1", visit=5, detector=9)
    assert back.equals(table) and back.schema.metadata == schema.metadata
    assert repo.get_table(ref, columns=["ra"]).column_names == ["ra"]
    # an empty table keeps its full schema
    empty = schema.empty_table()
    repo.put_table(empty, "goodSeeingDiff_diaSrc", run="r1", visit=6, detector=9)
    back = repo.get_table("goodSeeingDiff_diaSrc", run="r1", visit=6, detector=9)
    assert back.num_rows == 0 and back.schema.equals(schema, check_metadata=True)
    # a truth table without a data ID
    truth = repo.put_table(table, "truthSources")
    assert truth.path == "truthSources.parquet"
    assert repo.get_table("truthSources").equals(table)
    with pytest.raises(InputError, match=r"pyarrow\.Table"):
        repo.put_table({"id": [1]}, "truthSources2")


def test_json_and_skymap_round_trip(repo):
    solution = {"kernel": [[0.1, 0.2], [0.3, 0.4]], "n_sources": 57, "mode": "convolveTemplate"}
    repo.put_json(solution, "goodSeeingDiff_psfMatchKernel", run="r1", visit=1, detector=2)
    assert repo.get_json("goodSeeingDiff_psfMatchKernel", run="r1", visit=1,
                         detector=2) == solution
    with pytest.raises(InputError, match="JSON"):
        repo.put_json({"a": object()}, "bad")
    skymap = SkyMap.discrete([(150.0, 2.0), (150.5, 2.2)], radius_deg=0.2,
                             pixel_scale_arcsec=0.5, patch_inner=400, patch_border=20)
    ref = repo.put_skymap(skymap)
    assert ref.path == "skyMap.json"
    assert repo.get_skymap() == skymap
    with pytest.raises(InputError, match="already exists"):
        repo.put_skymap(skymap)
    # reading a skymap dataset with the wrong method is refused
    with pytest.raises(InputError, match=r"get_skymap|get_json"):
        repo.get_table("skyMap")


# --------------------------------------------------------------------------------------------
# queries
# --------------------------------------------------------------------------------------------


def test_query_filters(repo):
    for visit in (1, 2, 3):
        for detector in (0, 1):
            band = "g" if visit == 3 else "r"
            repo.put_json({"v": visit}, "calexpSummary", visit=visit, detector=detector,
                          band=band)
            repo.put_json({"v": visit}, "goodSeeingDiff_qa", run="r1", visit=visit,
                          detector=detector)
    repo.put_json({"v": 0}, "goodSeeingDiff_qa", run="r2", visit=1, detector=0)
    assert len(repo.query()) == 13
    assert len(repo.query("calexpSummary")) == 6
    refs = repo.query("calexpSummary", visit=2)
    assert [r.data_id["detector"] for r in refs] == [0, 1]
    assert all(isinstance(r, DatasetRef) for r in refs)
    assert len(repo.query("calexpSummary", visit=[1, 3], detector=0)) == 2
    assert len(repo.query(band="g")) == 2
    assert {r.run for r in repo.query("goodSeeingDiff_qa")} == {"r1", "r2"}
    assert len(repo.query("goodSeeingDiff_qa", run="r1")) == 6
    assert len(repo.query("goodSeeingDiff_qa", run="r2", visit=1)) == 1
    assert repo.query("goodSeeingDiff_qa", run=None) == []
    assert len(repo.query(run=None)) == 6
    assert len(repo.query(run=ANY_RUN, detector=1)) == 6
    assert repo.query("noSuchType") == []
    assert repo.exists("calexpSummary", visit=3, detector=1)
    assert not repo.exists("calexpSummary", visit=4, detector=1)
    assert not repo.exists("calexpSummary", visit=3, detector=1, band="r")  # it is g
    with pytest.raises(InputError, match="unknown data-ID key"):
        repo.query(filter="r")
    # a reference survives JSON (as passed between processes)
    ref = refs[0]
    assert DatasetRef.from_dict(ref.to_dict()) == ref and hash(ref)


# --------------------------------------------------------------------------------------------
# validation, collisions, missing datasets
# --------------------------------------------------------------------------------------------


BAD_DATA_IDS = [
    ({"visit": -1, "detector": 0}, "must be >= 0"),
    ({"visit": "12", "detector": 0}, "must be an integer"),
    ({"visit": True, "detector": 0}, "must be an integer"),
    ({"visit": 1.0, "detector": 0}, "must be an integer"),
    ({"visit": 1, "detector": 0, "band": "../x"}, "invalid data-ID band"),
    ({"visit": 1, "detector": 0, "band": "/etc"}, "invalid data-ID band"),
    ({"visit": 1, "detector": 0, "band": "a/b"}, "invalid data-ID band"),
    ({"visit": 1, "detector": 0, "band": "a b"}, "invalid data-ID band"),
    ({"visit": 1, "detector": 0, "band": ".hidden"}, "invalid data-ID band"),
    ({"visit": 1, "detector": 0, "band": "r\n"}, "invalid data-ID band"),
    ({"visit": 1, "detector": 0, "band": ""}, "invalid data-ID band"),
    ({"visit": 1, "detector": 0, "foo": 3}, "unknown data-ID key"),
    ({"visit": 1}, r"identified by \(visit, detector\)"),
    ({"visit": 1, "detector": 0, "tract": 0}, "unexpected"),
]


@pytest.mark.parametrize(("data_id", "message"), BAD_DATA_IDS)
def test_bad_data_ids_are_refused(repo, data_id, message):
    exposure = make_test_exposure(chunks=None)
    before = snapshot(repo)
    with pytest.raises(InputError, match=message):
        repo.put_exposure(exposure, "calexp", **data_id)
    assert snapshot(repo) == before


@pytest.mark.parametrize("run", ["../x", "/etc", "a/b", "..", "a..b", " r", "", 3])
def test_bad_run_names_are_refused(repo, run):
    before = snapshot(repo)
    with pytest.raises(InputError, match="run name"):
        repo.put_json({}, "qa", run=run, visit=1, detector=1)
    assert snapshot(repo) == before


@pytest.mark.parametrize("name", ["../calexp", "/etc/passwd", "a/b", "a.b", "runs", "Runs",
                                  "1abc", "", "a b", "calexp\x00"])
def test_bad_dataset_types_are_refused(repo, name):
    before = snapshot(repo)
    with pytest.raises(InputError, match="dataset type"):
        repo.put_json({}, name, visit=1, detector=1)
    assert snapshot(repo) == before


def test_paths_are_one_to_one(repo):
    """Distinct data IDs (including ones that would collide without padding) get distinct paths."""
    seen: dict[str, tuple] = {}
    cases = [(1, 23), (12, 3), (123, 0), (1230, 0), (0, 1230), (1234567, 1), (1, 1234567)]
    for visit, detector in cases:
        ref = repo.put_json({}, "qa", visit=visit, detector=detector)
        assert ref.path not in seen
        seen[ref.path] = (visit, detector)
    assert len(registry_rows(repo)) == len(cases)
    # the keys of a generic dataset type are fixed by its first dataset
    with pytest.raises(InputError, match="identified by"):
        repo.put_json({}, "qa", visit=1)
    # bands differing only in case would share a path on case-insensitive file systems
    repo.put_json({}, "goodSeeingCoadd2Qa", tract=1, patch=2, band="r")
    with pytest.raises(InputError, match="letter case"):
        repo.put_json({}, "goodSeeingCoadd2Qa", tract=1, patch=2, band="R")
    with pytest.raises(InputError, match="letter case"):
        repo.put_json({}, "QA", visit=1, detector=1)
    # a dataset type keeps its storage class
    with pytest.raises(InputError, match="holds json"):
        repo.put_table(pa.table({"a": [1]}), "qa", visit=9, detector=9)


def test_duplicate_registration_refused(repo):
    first = make_test_exposure(1)
    second = make_test_exposure(2)
    repo.put_exposure(first, "calexp", visit=1, detector=2)
    before = snapshot(repo)
    with pytest.raises(InputError, match=r"calexp \(visit=1, detector=2.*already exists"):
        repo.put_exposure(second, "calexp", visit=1, detector=2)
    assert snapshot(repo) == before
    np.testing.assert_array_equal(repo.get_exposure("calexp", visit=1, detector=2)["image"],
                                  first["image"])
    # the same data ID in another run is a different dataset
    repo.put_exposure(second, "calexp", run="r1", visit=1, detector=2)
    # overwrite replaces, keeping one registry row
    repo.put_exposure(second, "calexp", visit=1, detector=2, overwrite=True)
    np.testing.assert_array_equal(repo.get_exposure("calexp", visit=1, detector=2)["image"],
                                  second["image"])
    assert len(repo.query("calexp", run=None)) == 1


def test_failed_write_changes_nothing(repo):
    good = make_test_exposure(1)
    repo.put_exposure(good, "calexp", visit=1, detector=2)
    before = snapshot(repo)

    def explode(block):
        raise RuntimeError("disk on fire")

    bad = make_test_exposure(2).copy()
    bad["image"] = bad["image"].copy(data=bad["image"].data.map_blocks(explode, dtype="f4"))
    for data_id in ({"visit": 1, "detector": 2}, {"visit": 5, "detector": 5}):
        with pytest.raises(RuntimeError, match="disk on fire"):
            repo.put_exposure(bad, "calexp", overwrite=True, **data_id)
        assert snapshot(repo) == before
    np.testing.assert_array_equal(repo.get_exposure("calexp", visit=1, detector=2)["image"],
                                  good["image"])
    assert not any(p.name.startswith(".") for p in (repo.root / "calexp").rglob("*"))


def test_missing_dataset_message(repo):
    for visit in (10, 11, 12):
        repo.put_exposure(make_test_exposure(chunks=None), "calexp", visit=visit, detector=4)
    repo.put_exposure(make_test_exposure(chunks=None), "calexp", visit=10, detector=5)
    before = snapshot(repo)
    with pytest.raises(InputError) as info:
        repo.get_exposure("calexp", visit=999, detector=4)
    message = str(info.value)
    assert "calexp (visit=999, detector=4) in the inputs does not exist" in message
    assert "available visit values for detector=4: 10, 11, 12" in message
    assert "available detector values for visit=999: none" in message
    with pytest.raises(InputError, match="available detector values for visit=10: 4, 5"):
        repo.get_exposure("calexp", visit=10, detector=6)
    with pytest.raises(InputError, match=r"no goodSeeingCoadd datasets.*\['calexp'\]"):
        repo.get_exposure("goodSeeingCoadd", tract=0, patch=0, band="r")
    with pytest.raises(InputError, match=r"in run 'r9' does not exist.*exists in: inputs"):
        repo.get_exposure("calexp", run="r9", visit=10, detector=4)
    with pytest.raises(InputError, match="no skyMap datasets"):
        repo.get_skymap()
    with pytest.raises(InputError, match="does not exist"):
        repo.remove("calexp", visit=999, detector=4)
    assert snapshot(repo) == before


def test_remove(repo):
    ref = repo.put_exposure(make_test_exposure(chunks=None), "calexp", visit=1, detector=1)
    repo.put_table(pa.table({"a": [1]}), "truthSources")
    repo.remove("calexp", visit=1, detector=1)
    assert not repo.exists("calexp", visit=1, detector=1)
    assert not (repo.root / ref.path).exists()
    repo.remove(repo.query("truthSources")[0])
    assert repo.query() == []
    assert not any(p.name.startswith(".") for p in repo.root.rglob("*") if "sqlite" not in p.name)


def test_repository_does_not_import_stages():
    """The repository layer never imports stage or simulator code (its own imports only:
    ``import daskdiff`` itself loads the whole public API)."""
    import ast

    import daskdiff.repository as module

    for path in (module.__file__, daskdiff_module_file("ledger"), daskdiff_module_file("dataid")):
        tree = ast.parse(open(path).read())
        imported = [node.module or "" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names]
        for forbidden in ("simulate", "template", "subtract", "detect", "workflow"):
            assert not any(forbidden in name for name in imported), (path, imported)


def daskdiff_module_file(name):
    import importlib

    return importlib.import_module(f"daskdiff.{name}").__file__


# --------------------------------------------------------------------------------------------
# atomicity under SIGKILL
# --------------------------------------------------------------------------------------------

SLOW_WRITER = """
import sys, time
from pathlib import Path
import dask.array as da
from daskdiff.exposure import make_exposure
from daskdiff.repository import Repository

root, ready = sys.argv[1], Path(sys.argv[2])

def slow(block, block_info=None):
    if block_info[None]["chunk-location"] == (1, 1):
        ready.touch()      # the other tiles are being written now
        time.sleep(300)    # never finishes: the parent kills us here
    return block

image = da.zeros((256, 256), chunks=128, dtype="f4").map_blocks(slow, dtype="f4")
exposure = make_exposure(image, variance=da.ones((256, 256), chunks=128, dtype="f4"), chunks=128)
Repository.open(root).put_exposure(exposure, "calexp", visit=7, detector=1)
"""


def test_sigkill_during_put_leaves_nothing(repo, tmp_path):
    ready = tmp_path / "ready"
    before_files = visible_files(repo.root)
    child = run_python(SLOW_WRITER, str(repo.root), str(ready))
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.05)
    time.sleep(0.3)
    temporaries = list((repo.root / "calexp").rglob(".detector=001.zarr.tmp-*"))
    assert temporaries, "the kill must happen in the middle of the write"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    # no registry row, no visible product
    assert repo.query("calexp") == [] and registry_rows(repo) == []
    assert not repo.exists("calexp", visit=7, detector=1)
    assert not (repo.root / "calexp/visit=000007/detector=001.zarr").exists()
    assert {f for f in visible_files(repo.root) - before_files
            if not f.startswith("calexp")} == set()
    assert not [f for f in visible_files(repo.root) if f.endswith(".zarr")]
    with pytest.raises(InputError, match="does not exist"):
        repo.get_exposure("calexp", visit=7, detector=1)
    # the stale temporary is cleaned, and the same data ID can be written
    assert len(repo.cleanup(min_age=0)) == 1
    exposure = make_test_exposure(3)
    repo.put_exposure(exposure, "calexp", visit=7, detector=1)
    back = repo.get_exposure("calexp", visit=7, detector=1)
    np.testing.assert_array_equal(back["image"].values, exposure["image"].values)


def test_orphan_product_is_replaced(repo):
    """A product renamed into place whose registration was lost is overwritten by a new put."""
    ref = repo.put_exposure(make_test_exposure(1), "calexp", visit=3, detector=3)
    with sqlite3.connect(repo.registry_path) as conn:
        conn.execute("DELETE FROM datasets")  # as if killed between rename and registration
    assert (repo.root / ref.path).exists() and not repo.exists("calexp", visit=3, detector=3)
    fresh = make_test_exposure(2)
    repo.put_exposure(fresh, "calexp", visit=3, detector=3)
    np.testing.assert_array_equal(repo.get_exposure("calexp", visit=3, detector=3)["image"],
                                  fresh["image"])


# --------------------------------------------------------------------------------------------
# the ledger
# --------------------------------------------------------------------------------------------


def test_ledger_batches_state_changes_in_one_transaction(repo):
    ledger = repo.ledger
    quanta = [(v, d) for v in range(40) for d in range(5)]
    ledger.add_pending("batch", quanta)
    running = ledger.set_states("batch", [{"visit": v, "detector": d, "state": "running"}
                                          for v, d in quanta])
    assert [(q.visit, q.detector, q.state, q.attempts) for q in running] == [
        (v, d, "running", 1) for v, d in quanta]
    ended = ledger.set_states("batch", [
        {"visit": v, "detector": d, "state": "done", "qa": {"noise_ratio": 1.0 + v / 100},
         "peak_memory": 2**20 * (v + 1), "worker": "w"} for v, d in quanta[:100]])
    assert ended[5].qa == {"noise_ratio": 1.01} and ended[5].peak_memory == 2**21
    assert ledger.get("batch", visit=0, detector=3) == ended[3]
    # one forbidden transition: nothing of the batch is applied
    with pytest.raises(InputError, match="cannot become 'running'"):
        ledger.set_states("batch", [{"visit": 39, "detector": 4, "state": "done"},
                                    {"visit": 0, "detector": 0, "state": "running"}])
    assert ledger.get("batch", visit=39, detector=4).state == "running"
    assert ledger.counts("batch")["done"] == 100 and ledger.set_states("batch", []) == []


def test_ledger_transitions(repo):
    ledger = repo.ledger
    info = ledger.create_run("r1", config={"subtract": {"mode": "auto"}, "coaddName": "goodSeeing"})
    assert info.config["coaddName"] == "goodSeeing" and info.created > 0
    assert ledger.add_pending("r1", [(1, 1), (1, 2), (2, 1), (2, 2)]) == 4
    assert ledger.add_pending("r1", [(1, 1), (3, 3)]) == 1  # existing quanta are kept
    assert ledger.counts("r1") == {"pending": 5, "running": 0, "done": 0, "no-work": 0,
                                   "failed": 0}
    q = ledger.set_state("r1", visit=1, detector=1, state="running", worker="tcp://w1")
    assert (q.state, q.attempts, q.worker) == ("running", 1, "tcp://w1")
    assert q.started is not None and q.ended is None
    q = ledger.set_state("r1", visit=1, detector=1, state="running", worker="tcp://w2")  # retry
    assert q.attempts == 2 and q.worker == "tcp://w2"
    time.sleep(0.01)
    q = ledger.set_state("r1", visit=1, detector=1, state="done", peak_memory=2**30,
                         qa={"n_sources": 12, "residual_rms": 1.02})
    assert q.state == "done" and q.ended >= q.started and q.seconds >= 0.01
    assert q.seconds == pytest.approx(q.ended - q.started)
    assert q.peak_memory == 2**30 and q.qa == {"n_sources": 12, "residual_rms": 1.02}
    # a final state is kept unless reset
    with pytest.raises(InputError, match=r"'done'.*cannot become 'running'"):
        ledger.set_state("r1", visit=1, detector=1, state="running")
    with pytest.raises(InputError, match="cannot become 'failed'"):
        ledger.set_state("r1", visit=1, detector=1, state="failed")
    with pytest.raises(InputError, match="unknown quantum state"):
        ledger.set_state("r1", visit=1, detector=2, state="finished")
    # failures with reasons and kinds; no-work straight from pending
    ledger.set_state("r1", visit=1, detector=2, state="running")
    state, kind, reason = error_state(AlgorithmError("too few kernel sources: 3 < 10"))
    ledger.set_state("r1", visit=1, detector=2, state=state, error_kind=kind, reason=reason,
                     seconds=4.5)
    state, kind, reason = error_state(NoWorkError("no template coverage"))
    ledger.set_state("r1", visit=2, detector=1, state=state, error_kind=kind, reason=reason)
    assert error_state(KeyError("x"))[:2] == ("failed", "exception")
    assert error_state(ConfigError("bad"))[:2] == ("failed", "config")
    counts = ledger.counts("r1")
    assert counts == {"pending": 2, "running": 0, "done": 1, "no-work": 1, "failed": 1}
    failures = ledger.failures("r1")
    assert [(f.visit, f.detector, f.error_kind, f.seconds) for f in failures] == [
        (1, 2, "algorithm", 4.5)]
    assert "too few kernel sources" in failures[0].reason
    assert [q.state for q in ledger.quanta("r1")] == [
        "done", "failed", "no-work", "pending", "pending"]
    assert len(list(ledger.quanta("r1", state=["done", "no-work"]))) == 2
    # a rerun of the failures
    assert ledger.reset("r1") == 1
    q = ledger.get("r1", visit=1, detector=2)
    assert q.state == "pending" and q.reason is None and q.attempts == 1
    assert ledger.reset("r1", states=["done"], quanta=[(1, 1)]) == 1
    assert ledger.counts("r1")["pending"] == 4
    with pytest.raises(InputError, match="not in run 'r1'"):
        ledger.get("r1", visit=9, detector=9)
    # run bookkeeping
    with pytest.raises(InputError, match="already exists"):
        ledger.create_run("r1", config={})
    assert ledger.create_run("r1", config=info.config, exist_ok=True).created == info.created
    with pytest.raises(ConfigError, match="different configuration"):
        ledger.create_run("r1", config={"subtract": {"mode": "convolveScience"}}, exist_ok=True)
    ledger.create_run("r2")
    assert [r.name for r in ledger.runs()] == ["r1", "r2"]
    with pytest.raises(InputError, match=r"run 'r3' does not exist; runs: \['r1', 'r2'\]"):
        ledger.get_run("r3")
    with pytest.raises(InputError, match="must be >= 0"):
        ledger.add_pending("r1", [(1, -1)])
    assert sorted(STATES) == sorted(counts)


def test_ledger_bulk_insert_100k(repo):
    quanta = [(visit, detector) for visit in range(1000) for detector in range(100)]
    start = time.perf_counter()
    added = repo.ledger.add_pending("big", quanta)
    elapsed = time.perf_counter() - start
    print(f"\nbulk insert of {len(quanta)} pending quanta: {elapsed:.2f} s")
    assert added == 100_000
    assert repo.ledger.counts("big")["pending"] == 100_000
    start = time.perf_counter()
    n = sum(1 for _ in repo.ledger.quanta("big", state="pending"))
    print(f"iterating {n} quanta: {time.perf_counter() - start:.2f} s")
    assert n == 100_000


CONCURRENT_WORKER = """
import sys, time
from pathlib import Path
from daskdiff.repository import Repository

root, worker, barrier = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
repo = Repository.open(root)
ledger = repo.ledger
(barrier / f"ready{worker}").touch()
while not (barrier / "go").exists():  # start together, so that the writes overlap
    time.sleep(0.01)
start = time.time()
visits = range(worker * 1000, worker * 1000 + 150)
ledger.add_pending("shared", [(v, d) for v in visits for d in range(2)])
for v in visits:
    ledger.set_state("shared", visit=v, detector=0, state="running", worker=f"w{worker}")
    ledger.set_state("shared", visit=v, detector=0, state="done", qa={"w": worker})
    if v % 5 == 0:
        repo.put_json({"visit": v}, "goodSeeingDiff_qa", run="shared", visit=v, detector=0)
# both workers also hammer the same quanta
for v in range(20):
    ledger.set_state("shared", visit=90000 + v, detector=0, state="pending")
print(start, time.time())
"""


@pytest.mark.slow
def test_concurrent_processes_do_not_corrupt(repo, tmp_path):
    workers = [run_python(CONCURRENT_WORKER, str(repo.root), str(w), str(tmp_path))
               for w in (1, 2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{w}").exists() for w in (1, 2)):
        assert all(w.poll() is None for w in workers), [w.communicate() for w in workers]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (tmp_path / "go").touch()
    spans = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        spans.append([float(v) for v in out.split()])
    # the two workers really wrote at the same time
    assert max(a for a, _ in spans) < min(b for _, b in spans)
    with sqlite3.connect(repo.registry_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    counts = repo.ledger.counts("shared")
    assert counts["done"] == 300 and counts["pending"] == 300 + 20
    assert {q.worker for q in repo.ledger.quanta("shared", state="done")} == {"w1", "w2"}
    refs = repo.query("goodSeeingDiff_qa", run="shared")
    assert len(refs) == 60
    assert all(repo.get_json(r) == {"visit": r.data_id["visit"]} for r in refs)


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def test_summary(repo):
    for visit, band in ((100, "r"), (101, "g")):
        for detector in (3, 4):
            repo.put_exposure(make_test_exposure(visit=visit, detector=detector, band=band,
                                                 chunks=None), "calexp", visit=visit,
                              detector=detector)
    repo.put_exposure(make_test_exposure(chunks=None), "goodSeeingCoadd", tract=0, patch=5,
                      band="r")
    repo.put_exposure(make_test_exposure(chunks=None), "goodSeeingCoadd", tract=1, patch=7,
                      band="g")
    repo.put_exposure(make_test_exposure(chunks=None), "dcrCoadd", tract=0, patch=5, band="r",
                      subfilter=0)
    repo.put_skymap(SkyMap.discrete([(150.0, 2.0), (151.0, 2.0)], radius_deg=0.3))
    repo.ledger.create_run("r1", config={"coaddName": "goodSeeing"})
    repo.ledger.add_pending("r1", [(100, 3), (100, 4), (101, 3)])
    repo.ledger.set_state("r1", visit=100, detector=3, state="running")
    repo.ledger.set_state("r1", visit=100, detector=3, state="done")
    repo.put_table(pa.table({"a": [1.0]}), "goodSeeingDiff_diaSrc", run="r1", visit=100,
                   detector=3)
    s = repo.summary()
    assert s["dataset_types"]["calexp"]["count"] == 4
    assert s["dataset_types"]["calexp"]["dimensions"] == ["visit", "detector"]
    assert s["dataset_types"]["goodSeeingCoadd"]["count"] == 2
    assert s["dataset_types"]["goodSeeingDiff_diaSrc"]["runs"] == {"r1": 1}
    assert s["visits"] == [100, 101] and s["detectors"] == [3, 4]
    assert s["bands"] == ["g", "r"]
    assert s["tracts"] == [0, 1] and s["patches"] == {"0": [5], "1": [7]}
    assert s["coadd_names"] == ["dcr", "goodSeeing"]
    assert s["skymap"] == {"kind": "discrete", "tracts": 2}
    assert s["runs"]["r1"]["quanta"] == {"pending": 2, "running": 0, "done": 1, "no-work": 0,
                                         "failed": 0}
    assert s["runs"]["r1"]["datasets"] == 1 and s["runs"]["r1"]["has_config"]
    on_disk = sum(p.stat().st_size for p in repo.root.rglob("*") if p.is_file()
                  and "sqlite" not in p.name and p.name != "daskdiff-repository.json")
    assert on_disk <= s["disk_bytes"] <= on_disk + sum(
        p.stat().st_size for p in repo.root.glob("registry.sqlite3*"))
    text = repo.format_summary()
    for expected in ("calexp", "goodSeeingCoadd", "visits: 100, 101", "bands: g, r",
                     "coadd names: dcr, goodSeeing", "sky map: discrete, 2 tracts", "r1",
                     "done 1"):
        assert expected in text, text


def _forked_writer(root: str) -> None:
    ledger = Repository.open(root).ledger
    for visit in range(50):
        ledger.set_state("fork", visit=visit, detector=1, state="running")
    os._exit(0)


def test_threads_and_forked_children_share_the_ledger(repo):
    """Dask workers are threads (per-thread connections) or forked processes."""
    import multiprocessing
    import threading

    ledger = repo.ledger
    ledger.add_pending("fork", [(v, d) for v in range(50) for d in range(5)])
    assert ledger.counts("fork")["pending"] == 250  # the parent now holds a connection

    def work(detector: int) -> None:
        for visit in range(50):
            ledger.set_state("fork", visit=visit, detector=detector, state="running")
            ledger.set_state("fork", visit=visit, detector=detector, state="done")

    threads = [threading.Thread(target=work, args=(d,)) for d in (2, 3, 4)]
    child = multiprocessing.get_context("fork").Process(target=_forked_writer,
                                                        args=(str(repo.root),))
    child.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    child.join(60)
    assert child.exitcode == 0
    assert ledger.counts("fork") == {"pending": 50, "running": 50, "done": 150, "no-work": 0,
                                     "failed": 0}
    with sqlite3.connect(repo.registry_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
