"""The ledger: the state of every quantum of every run, in the repository's sqlite database.

A *quantum* is the work for one ``(run, visit, detector)``. Its state is one of

``pending``
    registered, not started;
``running``
    started by a worker (each start counts one attempt);
``done``
    finished, products written;
``no-work``
    nothing to do (e.g. no template coverage), skipped;
``failed``
    failed, with a reason and an error kind (``algorithm``, ``input``, ``config``, or
    ``exception`` for anything unclassified).

Allowed transitions: any state to ``pending`` (a reset for a rerun); ``pending`` to ``running``
or straight to a final state (decided before running, e.g. no coverage); ``running`` to
``running`` (a retry on another worker) or to a final state. A final state cannot move to
``running`` or to another final state without a reset: that would lose what happened.

The ``runs`` table keeps each run's fully resolved configuration (JSON) and creation time.

Every call opens its own short-lived connection, so a :class:`Ledger` can be pickled, shared
by threads and used by many processes at once. The database uses WAL journaling and a busy
timeout; writes take the write lock up front (``BEGIN IMMEDIATE``) so that concurrent writers
wait rather than fail. WAL needs a file system with working shared-memory locks (local disks,
Lustre and GPFS do; NFS does not).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataid import validate_run, validate_value
from .errors import ConfigError, DaskdiffError, InputError, NoWorkError

__all__ = [
    "FINAL_STATES",
    "STATES",
    "Ledger",
    "Quantum",
    "RunInfo",
    "connect",
    "enable_wal",
    "ensure_ledger_schema",
    "error_state",
    "transaction",
]

#: Every quantum state.
STATES: tuple[str, ...] = ("pending", "running", "done", "no-work", "failed")

#: States a quantum ends in.
FINAL_STATES: frozenset[str] = frozenset({"done", "no-work", "failed"})

#: Rows fetched per page when iterating over quanta.
_PAGE = 20_000

#: Seconds a connection waits for a lock held by another process before giving up.
BUSY_TIMEOUT_S = 120.0

#: Columns of the ``quanta`` table, in the order of the :class:`Quantum` fields.
QUANTUM_COLUMNS = ("run, visit, detector, state, reason, error_kind, attempts, started, ended, "
                   "seconds, peak_memory, worker, qa, updated")

_SELECT = f"SELECT {QUANTUM_COLUMNS} FROM quanta"
_SELECT_ONE = _SELECT + " WHERE run = ? AND visit = ? AND detector = ?"
_UPSERT = ("INSERT OR REPLACE INTO quanta (run, visit, detector, state, reason, error_kind, "
           "attempts, started, ended, seconds, peak_memory, worker, qa, updated) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL,
    config TEXT,
    description TEXT
);
CREATE TABLE IF NOT EXISTS quanta (
    run TEXT NOT NULL,
    visit INTEGER NOT NULL,
    detector INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'no-work', 'failed')),
    reason TEXT,
    error_kind TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    ended REAL,
    seconds REAL,
    peak_memory INTEGER,
    worker TEXT,
    qa TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (run, visit, detector)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quanta_state ON quanta (run, state);
"""


# --------------------------------------------------------------------------------------------
# sqlite helpers (shared with the repository's registry)
# --------------------------------------------------------------------------------------------


_local = threading.local()
_inherited: list[Any] = []


def _forget_after_fork() -> None:
    # A connection must not be used, nor closed, in a forked child: keep the parent's alive
    # and unused, and let the child open its own.
    _inherited.append(getattr(_local, "connections", None))
    _local.connections = {}


os.register_at_fork(after_in_child=_forget_after_fork)


def _open(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=True)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


@contextlib.contextmanager
def connect(path: str | Path) -> Iterator[sqlite3.Connection]:
    """Yield a connection to the database at ``path``, configured for concurrent use.

    The connection is in autocommit mode (use :func:`transaction` for writes), has a busy
    timeout and rows addressable by column name. Connections are kept open per process,
    thread and database file (closing the last connection of a WAL database checkpoints it,
    which costs milliseconds); a file replaced on disk gets a fresh connection.
    """
    path = str(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"registry database {path} does not exist; was the repository "
                         "deleted or moved?") from None
    identity = (stat.st_dev, stat.st_ino)
    cache: dict[tuple[str, int], tuple[tuple[int, int], sqlite3.Connection]] = getattr(
        _local, "connections", None) or {}
    _local.connections = cache
    key = (path, os.getpid())
    entry = cache.get(key)
    if entry is not None and entry[0] != identity:
        entry[1].close()
        entry = None
    if entry is None:
        entry = (identity, _open(path))
        cache[key] = entry
    conn = entry[1]
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block as one write transaction (``BEGIN IMMEDIATE``; rolled back on error)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def enable_wal(path: str | Path) -> None:
    """Switch the database at ``path`` to WAL journaling (a persistent setting)."""
    with connect(path) as conn:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise InputError(f"{path}: the file system does not support sqlite's WAL mode "
                         f"(got {mode!r}); put the repository on a local or parallel file system")


def ensure_ledger_schema(conn: sqlite3.Connection) -> None:
    """Create the ``runs`` and ``quanta`` tables if they do not exist."""
    conn.executescript(_SCHEMA)


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """One run: its name, creation time (UNIX seconds) and resolved configuration."""

    name: str
    created: float
    config: dict[str, Any] | None = None
    description: str | None = None

    @property
    def created_iso(self) -> str:
        """The creation time as an ISO 8601 UTC string."""
        return _iso(self.created)


@dataclass(frozen=True)
class Quantum:
    """The ledger row of one quantum.

    Times are UNIX seconds, ``seconds`` the wall time of the last attempt, ``peak_memory`` in
    bytes and ``qa`` a dict of QA figures.
    """

    run: str
    visit: int
    detector: int
    state: str
    reason: str | None = None
    error_kind: str | None = None
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    seconds: float | None = None
    peak_memory: int | None = None
    worker: str | None = None
    qa: dict[str, Any] = field(default_factory=dict)
    updated: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row | tuple) -> Quantum:
        """Build a record from a ``quanta`` row selected with :data:`QUANTUM_COLUMNS`."""
        values = tuple(row)
        qa = json.loads(values[12]) if values[12] else {}
        return cls(*values[:12], qa, values[13])


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def error_state(error: BaseException) -> tuple[str, str, str]:
    """Return ``(state, error_kind, reason)`` to record for an exception.

    :class:`~daskdiff.errors.NoWorkError` gives ``no-work``; other daskdiff errors give
    ``failed`` with their kind; anything else gives ``failed`` with kind ``exception``.
    """
    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, NoWorkError):
        return "no-work", error.kind, str(error)
    if isinstance(error, DaskdiffError):
        return "failed", error.kind, reason
    return "failed", "exception", reason


def _check_transition(old: str | None, new: str, *, run: str, visit: int,
                      detector: int) -> None:
    if new == "pending" or old is None or old == "pending":
        return
    if old == "running":
        return  # to running (a retry) or to a final state
    # old is final
    raise InputError(
        f"quantum run={run!r} visit={visit} detector={detector} is {old!r}; it cannot become "
        f"{new!r} directly. Reset it to 'pending' first (Ledger.reset) to run it again")


def _json_text(value: Any, *, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what} must be JSON-serialisable (dicts, lists, numbers, "
                         f"strings): {error}") from error


# --------------------------------------------------------------------------------------------
# the ledger
# --------------------------------------------------------------------------------------------


class Ledger:
    """Quantum states and run configurations of a repository.

    Parameters
    ----------
    path : path-like
        The sqlite database (the repository's registry file). It must exist; the schema is
        created if missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"ledger database {self.path} does not exist; open the repository "
                             "with Repository.open (or create one with Repository.create)")
        with connect(self.path) as conn:
            present = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' "
                                   "AND name IN ('runs', 'quanta')").fetchone()[0]
            if present != 2:
                ensure_ledger_schema(conn)

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    # --- runs -----------------------------------------------------------------------------

    def create_run(self, run: str, *, config: dict[str, Any] | None = None,
                   description: str | None = None, exist_ok: bool = False) -> RunInfo:
        """Register a run and its fully resolved configuration.

        Parameters
        ----------
        run : str
            Run name.
        config : dict, optional
            The resolved configuration (JSON-able).
        description : str, optional
            Free text.
        exist_ok : bool, optional
            Accept an existing run with the same configuration (a resumed campaign).

        Returns
        -------
        RunInfo

        Raises
        ------
        InputError
            If the run exists and ``exist_ok`` is false.
        ConfigError
            If the run exists with a different configuration.
        """
        run = validate_run(run)
        text = None if config is None else _json_text(config, what="run config")
        with connect(self.path) as conn, transaction(conn):
            row = conn.execute("SELECT * FROM runs WHERE name = ?", (run,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO runs (name, created, config, description) "
                             "VALUES (?, ?, ?, ?)", (run, time.time(), text, description))
            elif not exist_ok:
                raise InputError(f"run {run!r} already exists (created "
                                 f"{_iso(row['created'])}); choose another name, or pass "
                                 "exist_ok=True to resume it")
            elif row["config"] is None and text is not None:
                conn.execute("UPDATE runs SET config = ? WHERE name = ?", (text, run))
            elif text is not None and json.loads(row["config"]) != json.loads(text):
                raise ConfigError(
                    f"run {run!r} exists with a different configuration; resume it with the "
                    "configuration it was created with, or start a new run name")
        return self.get_run(run)

    def get_run(self, run: str) -> RunInfo:
        """Return a run's record.

        Raises
        ------
        InputError
            If the run does not exist (the message lists the runs that do).
        """
        run = validate_run(run)
        with connect(self.path) as conn:
            row = conn.execute("SELECT * FROM runs WHERE name = ?", (run,)).fetchone()
        if row is None:
            names = [r.name for r in self.runs()]
            raise InputError(f"run {run!r} does not exist; runs: {names or 'none yet'}")
        return _run_from_row(row)

    def runs(self) -> list[RunInfo]:
        """Return every run, oldest first."""
        with connect(self.path) as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY created, name").fetchall()
        return [_run_from_row(r) for r in rows]

    # --- quanta ---------------------------------------------------------------------------

    def add_pending(self, run: str, quanta: Iterable[tuple[int, int]]) -> int:
        """Register quanta ``(visit, detector)`` as pending, in one transaction.

        Quanta already in the ledger are left as they are, so a resumed campaign can add its
        whole list again. The run is registered (without a config) if it is new.

        Returns
        -------
        int
            The number of quanta added.
        """
        run = validate_run(run)
        now = time.time()
        rows = [(run, v, d, now) if type(v) is int and type(d) is int and v >= 0 and d >= 0
                else (run, validate_value("visit", v), validate_value("detector", d), now)
                for v, d in quanta]
        with connect(self.path) as conn, transaction(conn):
            conn.execute("INSERT OR IGNORE INTO runs (name, created) VALUES (?, ?)", (run, now))
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO quanta (run, visit, detector, state, updated) "
                "VALUES (?, ?, ?, 'pending', ?)", rows)
            added = conn.total_changes - before
        return added

    def set_state(
        self,
        run: str,
        *,
        visit: int,
        detector: int,
        state: str,
        reason: str | None = None,
        error_kind: str | None = None,
        seconds: float | None = None,
        peak_memory: int | None = None,
        worker: str | None = None,
        qa: dict[str, Any] | None = None,
    ) -> Quantum:
        """Move a quantum to a new state (creating it if it is not in the ledger).

        ``running`` counts an attempt and stamps the start; a final state stamps the end and
        the wall time (``seconds``, measured from the start unless given); ``pending`` clears
        the timings and the failure. ``qa`` figures are merged into those already recorded.

        Returns
        -------
        Quantum
            The updated record.

        Raises
        ------
        InputError
            For an unknown state or a forbidden transition (see the module docstring).
        """
        return self.set_states(run, [{
            "visit": visit, "detector": detector, "state": state, "reason": reason,
            "error_kind": error_kind, "seconds": seconds, "peak_memory": peak_memory,
            "worker": worker, "qa": qa}])[0]

    def set_states(self, run: str, changes: Iterable[Mapping[str, Any]]) -> list[Quantum]:
        """Apply many state changes of one run in one transaction.

        Each change is a mapping with the arguments of :meth:`set_state` (``visit``,
        ``detector``, ``state`` and optionally ``reason``, ``error_kind``, ``seconds``,
        ``peak_memory``, ``worker``, ``qa``). Either all of them are recorded or, if one is
        invalid or a forbidden transition, none is. One transaction for a batch is what lets
        a campaign driver record hundreds of quanta per second.

        Returns
        -------
        list of Quantum
            The updated records, in the order of ``changes``.

        Raises
        ------
        InputError
            For an unknown state or a forbidden transition.
        """
        run = validate_run(run)
        prepared = []
        for change in changes:
            state = change["state"]
            if state not in STATES:
                raise InputError(f"unknown quantum state {state!r}; states are "
                                 f"{', '.join(STATES)}")
            visit, detector = change["visit"], change["detector"]
            if not (type(visit) is int and type(detector) is int and visit >= 0
                    and detector >= 0):
                visit = int(validate_value("visit", visit))
                detector = int(validate_value("detector", detector))
            qa = change.get("qa")
            prepared.append(((run, visit, detector), change,
                             None if qa is None else _json_text(qa, what="qa")))
        if not prepared:
            return []
        now = time.time()
        records = []
        with connect(self.path) as conn, transaction(conn):
            conn.execute("INSERT OR IGNORE INTO runs (name, created) VALUES (?, ?)", (run, now))
            for key, change, qa_text in prepared:
                row = conn.execute(_SELECT_ONE, key).fetchone()
                old = None if row is None else Quantum.from_row(row)
                _check_transition(None if old is None else old.state, change["state"], run=run,
                                  visit=key[1], detector=key[2])
                values = _next_values(
                    old, change["state"], now=now, reason=change.get("reason"),
                    error_kind=change.get("error_kind"), seconds=change.get("seconds"),
                    peak_memory=change.get("peak_memory"), worker=change.get("worker"),
                    qa_text=qa_text)
                conn.execute(_UPSERT, (*key, *values.values()))
                records.append(Quantum(*key, **{k: v for k, v in values.items() if k != "qa"},
                                       qa=json.loads(values["qa"]) if values["qa"] else {}))
        return records

    def reset(self, run: str, *, states: Iterable[str] = ("failed",),
              quanta: Iterable[tuple[int, int]] | None = None) -> int:
        """Move quanta back to ``pending`` for a rerun.

        Parameters
        ----------
        run : str
            Run name.
        states : iterable of str, optional
            Reset quanta in these states (default: the failed ones).
        quanta : iterable of (int, int), optional
            Reset only these ``(visit, detector)`` (still filtered by ``states``).

        Returns
        -------
        int
            The number of quanta reset.
        """
        run = validate_run(run)
        states = list(states)
        for state in states:
            if state not in STATES:
                raise InputError(f"unknown quantum state {state!r}; states are {STATES}")
        marks = ", ".join("?" for _ in states)
        sql = (f"UPDATE quanta SET state = 'pending', reason = NULL, error_kind = NULL, "
               f"started = NULL, ended = NULL, seconds = NULL, updated = ? "
               f"WHERE run = ? AND state IN ({marks})")
        now = time.time()
        with connect(self.path) as conn, transaction(conn):
            before = conn.total_changes
            if quanta is None:
                conn.execute(sql, (now, run, *states))
            else:
                conn.executemany(sql + " AND visit = ? AND detector = ?",
                                 [(now, run, *states, int(v), int(d)) for v, d in quanta])
            return conn.total_changes - before

    def get(self, run: str, *, visit: int, detector: int) -> Quantum:
        """Return one quantum's record.

        Raises
        ------
        InputError
            If the quantum is not in the ledger.
        """
        run = validate_run(run)
        with connect(self.path) as conn:
            row = conn.execute(_SELECT_ONE,
                               (run, int(visit), int(detector))).fetchone()
            if row is None:
                total = conn.execute("SELECT COUNT(*) FROM quanta WHERE run = ?",
                                     (run,)).fetchone()[0]
        if row is None:
            raise InputError(f"quantum visit={visit} detector={detector} is not in run {run!r} "
                             f"(which has {total} quanta); add it with Ledger.add_pending")
        return Quantum.from_row(row)

    def counts(self, run: str) -> dict[str, int]:
        """Return the number of quanta of a run in each state (every state present)."""
        run = validate_run(run)
        with connect(self.path) as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM quanta WHERE run = ? GROUP BY state",
                                (run,)).fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({state: n for state, n in rows})
        return counts

    def quanta(self, run: str, *, state: str | Iterable[str] | None = None) -> Iterator[Quantum]:
        """Iterate over a run's quanta (by visit, detector), optionally only in some states."""
        run = validate_run(run)
        sql = _SELECT + " WHERE run = ?"
        params: list[Any] = [run]
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            for s in states:
                if s not in STATES:
                    raise InputError(f"unknown quantum state {s!r}; states are {STATES}")
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            params.extend(states)
        # pages of complete statements: no cursor stays open while the caller works (it may
        # well update the ledger as it goes)
        last = (-1, -1)
        while True:
            with connect(self.path) as conn:
                rows = conn.execute(sql + " AND (visit, detector) > (?, ?) ORDER BY visit, "
                                    "detector LIMIT ?", (*params, *last, _PAGE)).fetchall()
            for row in rows:
                yield Quantum.from_row(row)
            if len(rows) < _PAGE:
                return
            last = (rows[-1]["visit"], rows[-1]["detector"])

    def failures(self, run: str) -> list[Quantum]:
        """Return a run's failed quanta."""
        return list(self.quanta(run, state="failed"))


def _run_from_row(row: sqlite3.Row) -> RunInfo:
    config = json.loads(row["config"]) if row["config"] else None
    return RunInfo(row["name"], row["created"], config, row["description"])


def _next_values(old: Quantum | None, state: str, *, now: float, reason: str | None,
                 error_kind: str | None, seconds: float | None, peak_memory: int | None,
                 worker: str | None, qa_text: str | None) -> dict[str, Any]:
    """Column values of a quantum after a transition to ``state``."""
    attempts = 0 if old is None else old.attempts
    started = None if old is None else old.started
    qa = {} if old is None else dict(old.qa)
    if qa_text is not None:
        qa.update(json.loads(qa_text))
    values: dict[str, Any] = {
        "state": state, "reason": reason, "error_kind": error_kind, "attempts": attempts,
        "started": started, "ended": None, "seconds": None,
        "peak_memory": peak_memory if peak_memory is not None else (
            None if old is None else old.peak_memory),
        "worker": worker if worker is not None else (None if old is None else old.worker),
        "qa": json.dumps(qa, sort_keys=True) if qa else None, "updated": now,
    }
    if state == "running":
        values.update(attempts=attempts + 1, started=now)
    elif state == "pending":
        values.update(started=None)
    else:
        values["ended"] = now
        if seconds is None and started is not None and old is not None and (
                old.state == "running"):
            seconds = now - started
        values["seconds"] = None if seconds is None or math.isnan(seconds) else float(seconds)
    return values
