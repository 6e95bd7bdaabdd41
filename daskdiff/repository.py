"""The repository: one directory holding inputs, products per run, and a sqlite registry.

Layout of a repository ``ROOT``::

    ROOT/daskdiff-repository.json        marker: format name and version
    ROOT/registry.sqlite3                registry of datasets, runs and the quantum ledger
    ROOT/calexp/visit=000123/detector=004.zarr
    ROOT/goodSeeingCoadd/tract=0000/patch=012/band=r.zarr
    ROOT/dcrCoadd/tract=0000/patch=012/band=r/subfilter=01.zarr
    ROOT/skyMap.json
    ROOT/runs/<run>/goodSeeingDiff_differenceExp/visit=000123/detector=004.zarr
    ROOT/runs/<run>/goodSeeingDiff_diaSrc/visit=000123/detector=004.parquet

Inputs (``run=None``) live at the top level, products under ``runs/<run>/``. A dataset's path
is derived from its validated dataset type, run and data ID (:mod:`daskdiff.dataid`), and is
also recorded in the registry, which is the authority on what exists: a file without a
registry row is an orphan of an interrupted write and is replaced by the next write of that
dataset.

Writes are atomic: a product is written under a hidden temporary name, renamed into place
(:mod:`daskdiff.io.atomic`), and only then registered, in one sqlite transaction. A writer
killed at any point leaves no registry row for an incomplete product and no visible partial
file. A failed write changes nothing already in the repository.

A :class:`Repository` holds only its root path: it pickles cheaply and every call opens its
own database connection, so Dask workers (threads or processes) can share one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import xarray as xr

from . import io as ddio
from .dataid import (
    KEY_ORDER,
    coadd_name,
    data_id_key,
    format_data_id,
    format_value,
    known_dimensions,
    split_data_id,
    validate_data_id,
    validate_dataset_type,
    validate_run,
    validate_value,
)
from .errors import InputError
from .io.atomic import atomic_path, cleanup_stale, remove_path, temporary_name
from .ledger import Ledger, connect, enable_wal, ensure_ledger_schema, transaction
from .skymap import SkyMap

__all__ = [
    "ANY_RUN",
    "DatasetRef",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Repository",
]

#: Name and version written in the marker file.
FORMAT_NAME = "daskdiff-repository"
FORMAT_VERSION = 1

MARKER = "daskdiff-repository.json"
REGISTRY = "registry.sqlite3"

#: Pass as ``run`` to :meth:`Repository.query` to match inputs and every run.
ANY_RUN: Any = type("AnyRun", (), {"__repr__": lambda self: "ANY_RUN"})()

#: File-name ending of each storage class.
_EXTENSIONS = {"exposure": ".zarr", "table": ".parquet", "json": ".json", "skymap": ".json"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dataset_types (
    name TEXT PRIMARY KEY,
    name_key TEXT NOT NULL UNIQUE,
    storage TEXT NOT NULL,
    dimensions TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    dataset_type TEXT NOT NULL REFERENCES dataset_types (name),
    run TEXT NOT NULL,
    data_key TEXT NOT NULL,
    tract INTEGER, patch INTEGER, band TEXT, subfilter INTEGER, physical_filter TEXT,
    visit INTEGER, detector INTEGER,
    path TEXT NOT NULL,
    path_key TEXT NOT NULL UNIQUE,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (dataset_type, run, data_key)
);
CREATE INDEX IF NOT EXISTS datasets_visit ON datasets (dataset_type, run, visit, detector);
CREATE INDEX IF NOT EXISTS datasets_patch ON datasets (dataset_type, run, tract, patch);
"""


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=True)
class DatasetRef:
    """A reference to one registered dataset.

    Attributes
    ----------
    dataset_type : str
        E.g. ``"calexp"`` or ``"goodSeeingDiff_diaSrc"``.
    run : str or None
        The run, ``None`` for inputs.
    data_id : dict
        The data ID (dimensions and implied values such as a calexp's band).
    path : str
        Location relative to the repository root (POSIX separators).
    storage : str
        ``"exposure"``, ``"table"``, ``"json"`` or ``"skymap"``.
    """

    dataset_type: str
    run: str | None
    data_id: dict[str, Any]
    path: str
    storage: str

    def __hash__(self) -> int:
        return hash((self.dataset_type, self.run, tuple(sorted(self.data_id.items())), self.path))

    def __str__(self) -> str:
        where = "inputs" if self.run is None else f"run {self.run!r}"
        return f"{self.dataset_type}({format_data_id(self.data_id)}) in {where}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dictionary."""
        return {"dataset_type": self.dataset_type, "run": self.run,
                "data_id": dict(self.data_id), "path": self.path, "storage": self.storage}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetRef:
        """Inverse of :meth:`to_dict`."""
        return cls(data["dataset_type"], data["run"], dict(data["data_id"]), data["path"],
                   data["storage"])


@dataclass(frozen=True)
class _Target:
    """A validated write or read target."""

    dataset_type: str
    run: str | None
    dimensions: tuple[str, ...]
    data_id: dict[str, Any]  # dimensions and implied values
    data_key: str

    @property
    def run_key(self) -> str:
        return "" if self.run is None else self.run

    def describe(self) -> str:
        where = "the inputs" if self.run is None else f"run {self.run!r}"
        return f"{self.dataset_type} ({format_data_id(self.data_id)}) in {where}"


def _run_key(run: str | None) -> str:
    return "" if run is None else validate_run(run)


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for base, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except FileNotFoundError:
                pass
    return total


# --------------------------------------------------------------------------------------------
# the repository
# --------------------------------------------------------------------------------------------


class Repository:
    """A daskdiff data repository (open one with :meth:`open`, make one with :meth:`create`).

    Parameters
    ----------
    root : path-like
        The repository directory (it must already be a repository; see :meth:`open`).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        _check_marker(self.root)
        self.ledger = Ledger(self.registry_path)

    # --- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | os.PathLike[str], *, overwrite: bool = False) -> Repository:
        """Create an empty repository.

        Parameters
        ----------
        root : path-like
            A directory that does not exist or is empty.
        overwrite : bool, optional
            Delete an existing daskdiff repository at ``root`` first. A non-empty directory
            that is not a daskdiff repository is never deleted.

        Returns
        -------
        Repository

        Raises
        ------
        InputError
            If ``root`` is a file, or a non-empty directory (unless it is a repository and
            ``overwrite`` is true).
        """
        root = Path(root).absolute()
        if root.exists() and not root.is_dir():
            raise InputError(f"{root} is a file; choose a directory path for the repository")
        if root.is_dir() and any(root.iterdir()):
            if not overwrite:
                raise InputError(f"{root} is not empty; choose a new directory, or pass "
                                 "overwrite=True to replace an existing repository there")
            if not (root / MARKER).is_file():
                raise InputError(
                    f"{root} is not empty and is not a daskdiff repository; refusing to delete "
                    "files daskdiff did not write. Remove it yourself or choose another path")
            remove_path(root)
        root.mkdir(parents=True, exist_ok=True)
        registry = root / REGISTRY
        registry.touch()
        with connect(registry) as conn:
            conn.executescript(_SCHEMA)
            ensure_ledger_schema(conn)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('format_version', ?)",
                         (str(FORMAT_VERSION),))
        enable_wal(registry)
        marker = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with atomic_path(root / MARKER) as tmp:  # the marker last: a repository is complete
            tmp.write_text(json.dumps(marker, indent=1) + "\n")
        return cls(root)

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Repository:
        """Open an existing repository.

        Raises
        ------
        InputError
            If ``root`` does not exist or is not a daskdiff repository of a known version.
        """
        return cls(root)

    def __repr__(self) -> str:
        return f"Repository({str(self.root)!r})"

    def __reduce__(self):  # pickle as the root path only
        return (Repository, (str(self.root),))

    @property
    def registry_path(self) -> Path:
        """The sqlite registry file."""
        return self.root / REGISTRY

    # --- targets and paths ----------------------------------------------------------------

    def _target(self, dataset_type: str, run: str | None,
                data_id: Mapping[str, Any]) -> _Target:
        """Validate a (dataset type, run, data ID) and split off implied values."""
        dataset_type = validate_dataset_type(dataset_type)
        run = None if run is None else validate_run(run)
        checked = validate_data_id(data_id)
        dims, _implied = split_data_id(checked)
        fixed = known_dimensions(dataset_type)
        if fixed is not None and set(dims) != set(fixed):
            missing = [k for k in fixed if k not in checked]
            extra = [k for k in dims if k not in fixed]
            raise InputError(
                f"dataset type {dataset_type} is identified by ({', '.join(fixed)}); "
                f"got ({format_data_id(checked)})"
                + (f": missing {missing}" if missing else "")
                + (f": unexpected {extra}" if extra else ""))
        dims = tuple(k for k in KEY_ORDER if k in dims)
        return _Target(dataset_type, run, dims, checked, data_id_key(checked, dims))

    def _relative_path(self, target: _Target, storage: str) -> str:
        parts = [] if target.run is None else ["runs", target.run]
        ext = _EXTENSIONS[storage]
        components = [format_value(k, target.data_id[k]) for k in target.dimensions]
        if components:
            parts += [target.dataset_type, *components[:-1], components[-1] + ext]
        else:
            parts.append(target.dataset_type + ext)
        return "/".join(parts)

    def path(self, ref: DatasetRef) -> Path:
        """Return the absolute path of a dataset."""
        return self.root / ref.path

    # --- generic put / get ----------------------------------------------------------------

    def _registered_type(self, conn: Any, dataset_type: str) -> Any:
        return conn.execute("SELECT * FROM dataset_types WHERE name = ?",
                            (dataset_type,)).fetchone()

    def _check_type(self, conn: Any, target: _Target, storage: str) -> None:
        row = self._registered_type(conn, target.dataset_type)
        if row is None:
            clash = conn.execute("SELECT name FROM dataset_types WHERE name_key = ?",
                                 (target.dataset_type.lower(),)).fetchone()
            if clash is not None:
                raise InputError(
                    f"dataset type {target.dataset_type!r} differs from the registered "
                    f"{clash['name']!r} only in letter case; their paths would collide on "
                    f"case-insensitive file systems. Use {clash['name']!r}")
            return
        if row["storage"] != storage:
            raise InputError(f"dataset type {target.dataset_type} holds {row['storage']} "
                             f"datasets, not {storage}; use another dataset type name")
        dims = tuple(json.loads(row["dimensions"]))
        if dims != target.dimensions:
            raise InputError(
                f"dataset type {target.dataset_type} is identified by ({', '.join(dims)}); "
                f"got ({', '.join(target.dimensions)}). Give exactly those keys")

    def _find_row(self, conn: Any, target: _Target) -> Any:
        return conn.execute(
            "SELECT * FROM datasets WHERE dataset_type = ? AND run = ? AND data_key = ?",
            (target.dataset_type, target.run_key, target.data_key)).fetchone()

    def _put(self, storage: str, dataset_type: str, run: str | None, overwrite: bool,
             data_id: Mapping[str, Any], write: Callable[[Path], None],
             implied: Mapping[str, Any] | None = None) -> DatasetRef:
        target = self._target(dataset_type, run, data_id)
        if implied:
            fill = {k: validate_value(k, v) for k, v in implied.items()
                    if k not in target.data_id and v and "visit" in target.data_id}
            target = _Target(target.dataset_type, target.run, target.dimensions,
                             {**target.data_id, **fill},
                             target.data_key)
        rel = self._relative_path(target, storage)
        with connect(self.registry_path) as conn:
            self._check_type(conn, target, storage)
            existing = self._find_row(conn, target)
            if existing is not None and not overwrite:
                raise InputError(f"{target.describe()} already exists at {existing['path']}; "
                                 "pass overwrite=True to replace it")
            clash = conn.execute("SELECT path FROM datasets WHERE path_key = ? AND path != ?",
                                 (rel.lower(), rel)).fetchone()
            if clash is not None:
                raise InputError(f"{target.describe()} would be written at {rel}, which differs "
                                 f"from the existing {clash['path']} only in letter case; "
                                 "rename the run, band or dataset type")
        final = self.root / rel
        write(final)  # atomic: nothing visible at `final` until complete
        size = _size_of(final)
        row = {k: target.data_id.get(k) for k in KEY_ORDER}
        with connect(self.registry_path) as conn, transaction(conn):
            self._check_type(conn, target, storage)
            conn.execute("INSERT OR IGNORE INTO dataset_types (name, name_key, storage, "
                         "dimensions) VALUES (?, ?, ?, ?)",
                         (target.dataset_type, target.dataset_type.lower(), storage,
                          json.dumps(list(target.dimensions))))
            if target.run is not None:
                conn.execute("INSERT OR IGNORE INTO runs (name, created) VALUES (?, ?)",
                             (target.run, time.time()))
            if self._find_row(conn, target) is not None:
                if not overwrite:
                    raise InputError(f"{target.describe()} was registered by another writer "
                                     "while this one was writing; pass overwrite=True to "
                                     "replace it")
                conn.execute("DELETE FROM datasets WHERE dataset_type = ? AND run = ? AND "
                             "data_key = ?",
                             (target.dataset_type, target.run_key, target.data_key))
            conn.execute(
                f"INSERT INTO datasets (dataset_type, run, data_key, {', '.join(KEY_ORDER)}, "
                "path, path_key, size_bytes, created) VALUES "
                f"(?, ?, ?, {', '.join('?' for _ in KEY_ORDER)}, ?, ?, ?, ?)",
                (target.dataset_type, target.run_key, target.data_key, *row.values(), rel,
                 rel.lower(), size, time.time()))
        return DatasetRef(target.dataset_type, target.run, dict(target.data_id), rel, storage)

    def _resolve(self, dataset_type: str | DatasetRef, run: str | None,
                 data_id: Mapping[str, Any], storage: str | None) -> DatasetRef:
        """Return the registered dataset for a read (InputError naming what exists if none)."""
        if isinstance(dataset_type, DatasetRef):
            if data_id:
                raise InputError("give either a DatasetRef or a data ID, not both")
            dataset_type, run, data_id = (dataset_type.dataset_type, dataset_type.run,
                                          dataset_type.data_id)
        target = self._target(dataset_type, run, data_id)
        with connect(self.registry_path) as conn:
            type_row = self._registered_type(conn, target.dataset_type)
            row = None
            if type_row is not None:
                dims = tuple(json.loads(type_row["dimensions"]))
                if dims == target.dimensions:
                    row = self._find_row(conn, target)
            if row is None or any(row[k] != v for k, v in target.data_id.items()):
                raise InputError(self._missing_message(conn, target, type_row))
        ref = _ref_from_row(row, type_row)
        if storage is not None and ref.storage != storage and (
                {ref.storage, storage} != {"json", "skymap"}):
            raise InputError(f"{ref} holds a {ref.storage} dataset; read it with the "
                             f"get_{ref.storage} method")
        return ref

    def _missing_message(self, conn: Any, target: _Target, type_row: Any) -> str:
        if type_row is None:
            names = [r[0] for r in conn.execute("SELECT name FROM dataset_types ORDER BY name")]
            return (f"{target.describe()} does not exist: the repository has no "
                    f"{target.dataset_type} datasets (dataset types: {names or 'none'})")
        dims = json.loads(type_row["dimensions"])
        lines = [f"{target.describe()} does not exist"]
        if tuple(dims) != target.dimensions:
            lines.append(f"{target.dataset_type} is identified by ({', '.join(dims)})")
        params: list[Any] = [target.dataset_type, target.run_key]
        n = conn.execute("SELECT COUNT(*) FROM datasets WHERE dataset_type = ? AND run = ?",
                         params).fetchone()[0]
        lines.append(f"{n} {target.dataset_type} datasets in "
                     + ("the inputs" if target.run is None else f"run {target.run!r}"))
        # what exists for each key, fixing the others where they match
        for key in dims:
            others = [(k, target.data_id[k]) for k in dims if k != key and k in target.data_id]
            sql = "SELECT DISTINCT {0} FROM datasets WHERE dataset_type = ? AND run = ?"
            args = list(params)
            for k, v in others:
                sql += f" AND {k} = ?"
                args.append(v)
            values = [r[0] for r in conn.execute(sql.format(key) + f" ORDER BY {key} LIMIT 21",
                                                 args)]
            fixed = ", ".join(f"{k}={v}" for k, v in others)
            shown = ", ".join(str(v) for v in values[:20]) + (", ..." if len(values) > 20 else "")
            lines.append(f"available {key} values{' for ' + fixed if fixed else ''}: "
                         f"{shown or 'none'}")
        runs = [r[0] or "inputs" for r in conn.execute(
            "SELECT run FROM datasets WHERE dataset_type = ? AND data_key = ? ORDER BY run",
            (target.dataset_type, target.data_key))]
        if runs:
            lines.append(f"this data ID exists in: {', '.join(runs)}")
        return "; ".join(lines)

    # --- exposures ------------------------------------------------------------------------

    def put_exposure(self, exposure: xr.Dataset, dataset_type: str, *, run: str | None = None,
                     overwrite: bool = False, **data_id: Any) -> DatasetRef:
        """Write an exposure as a zarr store and register it.

        Parameters
        ----------
        exposure : xarray.Dataset
            The exposure (see :mod:`daskdiff.exposure`); dask planes are written tile by tile.
        dataset_type : str
            E.g. ``"calexp"``, ``"goodSeeingCoadd"``, ``"goodSeeingDiff_differenceExp"``.
        run : str, optional
            The run of a product; ``None`` for inputs.
        overwrite : bool, optional
            Replace an existing dataset with the same dataset type, run and data ID.
        **data_id
            The data ID (e.g. ``visit=123, detector=4``). A visit's band and physical filter
            are taken from the exposure's visit info when not given.

        Returns
        -------
        DatasetRef

        Raises
        ------
        InputError
            For an invalid name or data ID, a dataset that exists (without ``overwrite``), or
            an exposure that cannot be written. Nothing in the repository changes.
        """
        info = exposure.attrs.get("visit_info") if isinstance(exposure, xr.Dataset) else None
        implied = {} if info is None else {"band": info.band,
                                           "physical_filter": info.physical_filter}

        def write(final: Path) -> None:
            ddio.write_exposure(exposure, final, overwrite=True)

        return self._put("exposure", dataset_type, run, overwrite, data_id, write, implied)

    def get_exposure(self, dataset_type: str | DatasetRef, *, run: str | None = None,
                     chunks: Any = ..., **data_id: Any) -> xr.Dataset:
        """Open a registered exposure lazily.

        Parameters
        ----------
        dataset_type : str or DatasetRef
            The dataset type (or a reference from :meth:`query`).
        run : str, optional
            The run; ``None`` for inputs.
        chunks : optional
            Tile shape of the dask planes (see :func:`daskdiff.io.read_exposure`); ``None``
            loads into memory.
        **data_id
            The data ID.

        Raises
        ------
        InputError
            If the dataset does not exist (the message lists what does).
        """
        ref = self._resolve(dataset_type, run, data_id, "exposure")
        if chunks is ...:
            return ddio.read_exposure(self.path(ref))
        return ddio.read_exposure(self.path(ref), chunks=chunks)

    # --- tables ---------------------------------------------------------------------------

    def put_table(self, table: pa.Table, dataset_type: str, *, run: str | None = None,
                  overwrite: bool = False, **data_id: Any) -> DatasetRef:
        """Write an Arrow table as Parquet and register it (empty tables keep their schema).

        Parameters and errors are those of :meth:`put_exposure`.
        """
        if not isinstance(table, pa.Table):
            raise InputError(f"put_table needs a pyarrow.Table, got {type(table).__name__}; "
                             "convert with pyarrow.Table.from_pandas or from_pydict")

        def write(final: Path) -> None:
            with atomic_path(final, overwrite=True) as tmp:
                pq.write_table(table, tmp)

        return self._put("table", dataset_type, run, overwrite, data_id, write)

    def get_table(self, dataset_type: str | DatasetRef, *, run: str | None = None,
                  columns: list[str] | None = None, **data_id: Any) -> pa.Table:
        """Read a registered table (optionally only some columns)."""
        ref = self._resolve(dataset_type, run, data_id, "table")
        return pq.read_table(self.path(ref), columns=columns)

    # --- JSON -----------------------------------------------------------------------------

    def put_json(self, data: Mapping[str, Any], dataset_type: str, *, run: str | None = None,
                 overwrite: bool = False, **data_id: Any) -> DatasetRef:
        """Write a small JSON-able dict (a kernel solution, a config) and register it."""
        if not isinstance(data, Mapping):
            raise InputError(f"put_json needs a dict, got {type(data).__name__}")
        try:
            text = json.dumps(dict(data), sort_keys=True, indent=1)
        except (TypeError, ValueError) as error:
            raise InputError(f"{dataset_type}: the data is not JSON-serialisable ({error}); "
                             "convert arrays with .tolist() and numpy scalars with float()"
                             ) from error
        return self._put("json", dataset_type, run, overwrite, data_id, _text_writer(text))

    def get_json(self, dataset_type: str | DatasetRef, *, run: str | None = None,
                 **data_id: Any) -> dict[str, Any]:
        """Read a registered JSON dataset."""
        ref = self._resolve(dataset_type, run, data_id, "json")
        return json.loads(self.path(ref).read_text())

    # --- sky map --------------------------------------------------------------------------

    def put_skymap(self, skymap: SkyMap, *, name: str = "skyMap",
                   overwrite: bool = False) -> DatasetRef:
        """Store the sky map (an input dataset ``name``, default ``skyMap``)."""
        if not isinstance(skymap, SkyMap):
            raise InputError(f"put_skymap needs a SkyMap, got {type(skymap).__name__}")
        text = json.dumps(skymap.to_dict())
        return self._put("skymap", name, None, overwrite, {}, _text_writer(text))

    def get_skymap(self, *, name: str = "skyMap") -> SkyMap:
        """Read the sky map.

        Raises
        ------
        InputError
            If the repository holds none (store one with :meth:`put_skymap`).
        """
        ref = self._resolve(name, None, {}, "skymap")
        return SkyMap.from_dict(json.loads(self.path(ref).read_text()))

    # --- query / exists / remove ----------------------------------------------------------

    def query(self, dataset_type: str | None = None, *, run: Any = ANY_RUN,
              **where: Any) -> list[DatasetRef]:
        """Return the registered datasets matching a dataset type, run and key values.

        Parameters
        ----------
        dataset_type : str, optional
            Only this dataset type.
        run : str or None, optional
            Only this run (``None``: inputs only); by default every run and the inputs.
        **where
            Key values to match; a list, tuple or set matches any of its values.

        Returns
        -------
        list of DatasetRef
            Sorted by dataset type, run and data ID.
        """
        sql = ("SELECT d.*, t.storage AS storage FROM datasets d "
               "JOIN dataset_types t ON t.name = d.dataset_type WHERE 1 = 1")
        args: list[Any] = []
        if dataset_type is not None:
            sql += " AND d.dataset_type = ?"
            args.append(validate_dataset_type(dataset_type))
        if run is not ANY_RUN:
            sql += " AND d.run = ?"
            args.append(_run_key(run))
        for key, value in where.items():
            values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
            checked = [validate_value(key, v) for v in values]
            sql += f" AND d.{key} IN ({', '.join('?' for _ in checked)})"
            args.extend(checked)
        order = ", ".join(f"d.{k}" for k in KEY_ORDER)
        with connect(self.registry_path) as conn:
            rows = conn.execute(sql + f" ORDER BY d.dataset_type, d.run, {order}",
                                args).fetchall()
        return [_ref_from_row(row) for row in rows]

    def exists(self, dataset_type: str, *, run: str | None = None, **data_id: Any) -> bool:
        """Return whether a dataset is registered."""
        target = self._target(dataset_type, run, data_id)
        with connect(self.registry_path) as conn:
            type_row = self._registered_type(conn, target.dataset_type)
            if type_row is None:
                return False
            dims = tuple(json.loads(type_row["dimensions"]))
            if dims != target.dimensions:
                return False
            row = self._find_row(conn, target)
        return row is not None and all(row[k] == v for k, v in target.data_id.items())

    def remove(self, dataset_type: str | DatasetRef, *, run: str | None = None,
               **data_id: Any) -> None:
        """Unregister and delete a dataset.

        The registry row goes first (one transaction), then the files, moved to a hidden name
        and deleted, so a crash never leaves a row without its product.

        Raises
        ------
        InputError
            If the dataset does not exist.
        """
        ref = self._resolve(dataset_type, run, data_id, None)
        with connect(self.registry_path) as conn, transaction(conn):
            conn.execute("DELETE FROM datasets WHERE path = ?", (ref.path,))
        final = self.path(ref)
        if os.path.lexists(final):
            hidden = temporary_name(final)
            os.replace(final, hidden)
            remove_path(hidden)

    def cleanup(self, *, min_age: float = 3600.0) -> list[Path]:
        """Remove temporaries of interrupted writes older than ``min_age`` seconds.

        Use ``min_age=0`` only when no writer is running (e.g. before a campaign resumes).
        """
        return cleanup_stale(self.root, min_age=min_age, recursive=True)

    # --- summary --------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Return what the repository holds.

        Returns
        -------
        dict
            ``root``, ``format_version``, ``dataset_types`` (name -> storage, dimensions,
            count, runs), ``visits``, ``detectors``, ``bands``, ``tracts``, ``patches``
            (tract -> patch ids), ``coadd_names``, ``runs`` (name -> created, config
            present, dataset count, quantum counts), ``skymap`` (kind and tract count, or
            None) and ``disk_bytes`` (registered products plus the registry).
        """
        with connect(self.registry_path) as conn:
            types = conn.execute("SELECT * FROM dataset_types ORDER BY name").fetchall()
            counts = conn.execute("SELECT dataset_type, run, COUNT(*) AS n, SUM(size_bytes) "
                                  "AS size FROM datasets GROUP BY dataset_type, run").fetchall()

            def distinct(column: str) -> list[Any]:
                return [r[0] for r in conn.execute(
                    f"SELECT DISTINCT {column} FROM datasets WHERE {column} IS NOT NULL "
                    f"ORDER BY {column}")]

            visits, detectors = distinct("visit"), distinct("detector")
            bands, tracts = distinct("band"), distinct("tract")
            patch_rows = conn.execute("SELECT DISTINCT tract, patch FROM datasets WHERE tract "
                                      "IS NOT NULL AND patch IS NOT NULL ORDER BY tract, patch")
            patches: dict[str, list[int]] = {}
            for tract, patch in patch_rows:
                patches.setdefault(str(tract), []).append(patch)
        dataset_types: dict[str, Any] = {}
        for row in types:
            dataset_types[row["name"]] = {"storage": row["storage"],
                                          "dimensions": json.loads(row["dimensions"]),
                                          "count": 0, "runs": {}}
        per_run: dict[str, int] = {}
        disk = 0
        for row in counts:
            entry = dataset_types[row["dataset_type"]]
            entry["count"] += row["n"]
            entry["runs"][row["run"] or "(inputs)"] = row["n"]
            if row["run"]:
                per_run[row["run"]] = per_run.get(row["run"], 0) + row["n"]
            disk += row["size"] or 0
        for suffix in ("", "-wal", "-shm"):
            db = Path(str(self.registry_path) + suffix)
            if db.exists():
                disk += db.stat().st_size
        runs = {}
        for info in self.ledger.runs():
            runs[info.name] = {"created": info.created_iso, "has_config": info.config is not None,
                               "datasets": per_run.get(info.name, 0),
                               "quanta": self.ledger.counts(info.name)}
        skymap = None
        if "skyMap" in dataset_types and dataset_types["skyMap"]["count"]:
            sm = self.get_skymap()
            skymap = {"kind": sm.kind, "tracts": len(sm)}
        return {
            "root": str(self.root), "format_version": FORMAT_VERSION,
            "dataset_types": dataset_types, "visits": visits, "detectors": detectors,
            "bands": bands, "tracts": tracts, "patches": patches,
            "coadd_names": sorted({n for n in map(coadd_name, dataset_types) if n}),
            "runs": runs, "skymap": skymap, "disk_bytes": disk,
        }

    def format_summary(self) -> str:
        """Return :meth:`summary` as readable text (used by ``daskdiff info REPO``)."""
        s = self.summary()
        lines = [f"daskdiff repository {s['root']} (format {s['format_version']}, "
                 f"{_human_bytes(s['disk_bytes'])})"]
        lines.append("dataset types:")
        if not s["dataset_types"]:
            lines.append("  (none)")
        width = max([len(n) for n in s["dataset_types"]] + [4])
        for name, entry in s["dataset_types"].items():
            where = ", ".join(f"{r}: {n}" for r, n in sorted(entry["runs"].items()))
            lines.append(f"  {name:<{width}}  {entry['count']:>7}  {entry['storage']:<8} "
                         f"({', '.join(entry['dimensions']) or '-'})  {where}")
        lines.append(f"visits: {_short_list(s['visits'])}")
        lines.append(f"detectors: {_short_list(s['detectors'])}")
        lines.append(f"bands: {', '.join(s['bands']) or '-'}")
        lines.append(f"coadd names: {', '.join(s['coadd_names']) or '-'}")
        patches = sum(len(p) for p in s["patches"].values())
        lines.append(f"tracts: {_short_list(s['tracts'])} ({patches} patches)")
        if s["skymap"]:
            lines.append(f"sky map: {s['skymap']['kind']}, {s['skymap']['tracts']} tracts")
        lines.append("runs:" if s["runs"] else "runs: none")
        for name, run in s["runs"].items():
            states = ", ".join(f"{k} {v}" for k, v in run["quanta"].items())
            lines.append(f"  {name}  created {run['created']}  datasets {run['datasets']}  "
                         f"quanta: {states}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_marker(root: Path) -> None:
    if not root.exists():
        raise InputError(f"repository {root} does not exist; create one with "
                         f"Repository.create({str(root)!r}) or `daskdiff simulate`")
    marker = root / MARKER
    if not root.is_dir() or not marker.is_file():
        raise InputError(f"{root} is not a daskdiff repository (no {MARKER}); create one with "
                         "Repository.create(path) in an empty directory")
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{marker} is unreadable ({error}); the repository is damaged") from error
    if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
        raise InputError(f"{root} has repository format {info.get('format')!r} version "
                         f"{info.get('version')!r}; this daskdiff reads {FORMAT_NAME!r} version "
                         f"{FORMAT_VERSION}")
    if not (root / REGISTRY).is_file():
        raise InputError(f"{root} has no registry ({REGISTRY}); the repository is damaged")


def _text_writer(text: str) -> Callable[[Path], None]:
    def write(final: Path) -> None:
        with atomic_path(final, overwrite=True) as tmp:
            tmp.write_text(text)
    return write


def _ref_from_row(row: Any, type_row: Any = None) -> DatasetRef:
    storage = row["storage"] if type_row is None else type_row["storage"]
    data_id = {k: row[k] for k in KEY_ORDER if row[k] is not None}
    return DatasetRef(row["dataset_type"], row["run"] or None, data_id, row["path"], storage)


def _short_list(values: Iterable[Any], limit: int = 12) -> str:
    values = list(values)
    if not values:
        return "-"
    if len(values) <= limit:
        return ", ".join(str(v) for v in values)
    return f"{len(values)} ({values[0]} .. {values[-1]})"


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"

