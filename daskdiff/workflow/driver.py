"""The campaign driver: bounded, back-pressured submission of quanta, with a batched ledger.

:func:`drive_quanta` runs any *quantum function* ``f(root, pipeline, run, visit, detector) ->
QuantumResult`` over a list of ``(visit, detector)`` through a Dask client. At most ``window``
quanta are in flight: the driver submits a chunk of them with one ``client.map`` call, and
refills the window as results come back (back-pressure: a million-quantum campaign never
becomes one giant graph, and the driver's memory does not grow with the campaign).

Quanta go one per Dask task, so that each is balanced and retried on its own. Only when they
are much shorter than the scheduler's cost per task (about a millisecond) and the window is
much larger than the workers (``group_size``: measured from the first chunk) are several run
in one task (:func:`run_group`); a quantum that raises there is resubmitted on its own.

Ledger writes are batched, which is what lets the driver record hundreds of quanta per second:

- a chunk of quanta is marked ``running`` in one transaction *before* it is submitted;
- final states are buffered and written in one transaction whenever no result is waiting (so a
  slow campaign records every quantum as soon as it ends), when the buffer holds
  ``flush_size`` results, before new quanta are marked running, and at the end (also when the
  driver is interrupted).

Crash safety: a result is in the ledger only after its products are written (the quantum
writes them atomically before it returns). A driver killed between the two leaves the quantum
``running``; the next run takes it again and its products are overwritten atomically, so there
is no duplicate and no half-written product. Nothing that the ledger says is done is redone.

:class:`PeakMemory` measures a quantum's peak resident memory on the worker.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ..ledger import error_state

__all__ = ["PeakMemory", "QuantumResult", "drive_quanta", "group_size", "run_group",
           "trivial_quantum"]


@dataclass
class QuantumResult:
    """What one quantum reports back to the driver."""

    visit: int
    detector: int
    state: str
    reason: str | None = None
    error_kind: str | None = None
    seconds: float = 0.0
    n_dia_sources: int = 0
    worker: str | None = None
    qa: dict[str, Any] = field(default_factory=dict)
    peak_memory: int | None = None

    def ledger_change(self) -> dict[str, Any]:
        """Return this result as a :meth:`~daskdiff.ledger.Ledger.set_states` change."""
        qa = dict(self.qa)
        if self.state == "done":
            qa["n_dia_sources"] = self.n_dia_sources
        return {"visit": self.visit, "detector": self.detector, "state": self.state,
                "reason": self.reason, "error_kind": self.error_kind,
                "seconds": self.seconds or None, "peak_memory": self.peak_memory,
                "worker": self.worker, "qa": qa or None}


#: Signature of a quantum function: (root, pipeline document, run, visit, detector).
QuantumFunction = Callable[[str, dict[str, Any], str, int, int], QuantumResult]


def trivial_quantum(root: str, pipeline: dict[str, Any], run: str, visit: int,
                    detector: int) -> QuantumResult:
    """Do nothing and report done: a quantum for driver and ledger benchmarks and tests."""
    return QuantumResult(visit, detector, "done", seconds=0.0, worker=f"pid:{os.getpid()}")


# --------------------------------------------------------------------------------------------
# peak memory of a quantum
# --------------------------------------------------------------------------------------------


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
    except OSError:
        return False
    return True


class PeakMemory:
    """Measure the peak resident memory (bytes) of this process during a ``with`` block.

    On Linux the kernel's high-water mark is reset at entry and read at exit (exact); elsewhere
    a thread samples the resident size every ``interval`` seconds. The figure is for the whole
    worker process: with several threads per worker it includes the other tasks' memory.
    """

    def __init__(self, *, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exact = False

    def __enter__(self) -> PeakMemory:
        self._exact = _reset_hwm() and _read_hwm() is not None
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil comes with distributed
            return
        process = psutil.Process()
        while True:
            rss = process.memory_info().rss
            self.peak = rss if self.peak is None else max(self.peak, rss)
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            self.peak = _read_hwm()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------


class _Recorder:
    """Buffer final quantum states and write them to the ledger in one transaction."""

    def __init__(self, ledger: Any, run: str, flush_size: int) -> None:
        self.ledger, self.run, self.flush_size = ledger, run, flush_size
        self.buffer: list[dict[str, Any]] = []

    def add(self, result: QuantumResult) -> None:
        self.buffer.append(result.ledger_change())
        if len(self.buffer) >= self.flush_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.ledger.set_states(self.run, self.buffer)
            self.buffer = []

    def running(self, quanta: list[tuple[int, int]]) -> None:
        self.flush()
        self.ledger.set_states(self.run, [{"visit": v, "detector": d, "state": "running"}
                                          for v, d in quanta])


def drive_quanta(
    client: Any,
    todo: Iterable[tuple[int, int]],
    *,
    function: QuantumFunction,
    root: str,
    pipeline: dict[str, Any],
    run: str,
    ledger: Any,
    attempts: int = 3,
    window: int = 8,
    chunk: int | None = None,
    flush_size: int = 2000,
) -> Iterator[QuantumResult]:
    """Run ``function`` on every quantum of ``todo`` and record each state in the ledger.

    Parameters
    ----------
    client : distributed.Client or None
        Where to run; ``None`` runs the quanta one at a time in this process.
    todo : iterable of (int, int)
        The ``(visit, detector)`` to run, all ``pending`` (or ``running``) in the ledger.
    function : callable
        The quantum function, ``function(root, pipeline, run, visit, detector)``; it must be
        importable on the workers.
    root, pipeline, run : str, dict, str
        Its first three arguments: the repository root, the resolved pipeline and the run.
    ledger : Ledger
        Where the states go (running at submission, the final state at the end).
    attempts : int, optional
        Tries of a quantum whose function raises (a lost worker, an I/O error); daskdiff's
        own errors come back as results and are not retried.
    window : int, optional
        Quanta in flight at a time.
    chunk : int, optional
        Quanta submitted per ``client.map`` call (default: a quarter of the window); the
        window is refilled once this many have come back.
    flush_size : int, optional
        Final states buffered at most before they are written.

    Yields
    ------
    QuantumResult
        Each quantum's result, once it is recorded or buffered for the ledger.
    """
    recorder = _Recorder(ledger, run, flush_size)
    pending = iter(todo)
    try:
        if client is None:
            for visit, detector in pending:
                recorder.running([(visit, detector)])
                result = _attempt_locally(function, root, pipeline, run, visit, detector,
                                          attempts)
                recorder.add(result)
                recorder.flush()
                yield result
            return
        yield from _drive_distributed(client, pending, recorder, function=function, root=root,
                                      pipeline=pipeline, run=run, attempts=attempts,
                                      window=max(1, window),
                                      chunk=max(1, chunk or window // 4))
    finally:
        recorder.flush()


#: Retry marker of a quantum that raised inside a group task (never written to the ledger).
_RETRY = "retry"


def run_group(function: QuantumFunction, root: str, pipeline: dict[str, Any], run: str,
              quanta: list[tuple[int, int]]) -> tuple[list[QuantumResult], float]:
    """Run several quanta in one task; return their results and the task's wall seconds.

    A quantum whose function raises comes back with the state ``"retry"`` (and the error as
    its reason), for the driver to submit again on its own.
    """
    start = time.perf_counter()
    results = []
    for visit, detector in quanta:
        try:
            results.append(function(root, pipeline, run, visit, detector))
        except Exception as error:
            results.append(QuantumResult(visit, detector, _RETRY,
                                         f"{type(error).__name__}: {error}", "exception"))
    return results, time.perf_counter() - start


def group_size(seconds_per_quantum: float | None, *, target: float, limit: int) -> int:
    """Quanta per task so that a task lasts about ``target`` seconds (1 to ``limit``).

    Campaign quanta take seconds, so they go one per task (each retried and balanced on its
    own); only quanta much shorter than the scheduler's per-task cost are grouped.
    """
    if seconds_per_quantum is None or limit <= 1:
        return 1
    if seconds_per_quantum <= 0:
        return limit
    return max(1, min(limit, int(target / seconds_per_quantum)))


def _drive_distributed(client: Any, pending: Iterator[tuple[int, int]], recorder: _Recorder, *,
                       function: QuantumFunction, root: str, pipeline: dict[str, Any], run: str,
                       attempts: int, window: int, chunk: int,
                       target_task_seconds: float = 0.2) -> Iterator[QuantumResult]:
    from distributed import as_completed

    completed = as_completed()
    in_flight: dict[str, list[tuple[int, int]]] = {}
    grouped: set[str] = set()
    retry: list[tuple[int, int]] = []  # quanta that raised inside a group: resubmit alone
    n_in_flight = 0
    per_quantum: float | None = None  # measured task seconds per quantum (moving average)
    limit = max(1, window // (4 * max(1, len(client.scheduler_info().get("workers", {})))))

    def submit(quanta: list[tuple[int, int]], *, alone: bool, retries: int) -> None:
        nonlocal n_in_flight
        stamp = time.time_ns()
        size = 1 if alone else group_size(per_quantum, target=target_task_seconds,
                                          limit=limit)
        if size == 1:
            keys = [f"quantum-{run}-{v}-{d}-{stamp}" for v, d in quanta]
            n = len(quanta)
            futures = client.map(function, [root] * n, [pipeline] * n, [run] * n,
                                 [v for v, _ in quanta], [d for _, d in quanta], key=keys,
                                 retries=retries, pure=False)
            in_flight.update((k, [q]) for k, q in zip(keys, quanta, strict=True))
        else:
            groups = [quanta[i:i + size] for i in range(0, len(quanta), size)]
            keys = [f"quanta-{run}-{g[0][0]}-{g[0][1]}-{len(g)}-{stamp}" for g in groups]
            n = len(groups)
            futures = client.map(run_group, [function] * n, [root] * n, [pipeline] * n,
                                 [run] * n, groups, key=keys, retries=retries, pure=False)
            in_flight.update(zip(keys, groups, strict=True))
            grouped.update(keys)
        n_in_flight += len(quanta)
        completed.update(futures)

    def refill() -> None:
        free = window - n_in_flight
        if free < min(chunk, window) and in_flight and not retry:
            return
        if per_quantum is None:  # measure a first chunk before filling the window
            free = 0 if in_flight else min(free, chunk)
        if retry:  # their first try is spent
            again = retry[:max(1, free)]
            del retry[:len(again)]
            recorder.running(again)
            submit(again, alone=True, retries=attempts - 2)
            free -= len(again)
        quanta = list(islice(pending, max(0, free)))
        if quanta:
            recorder.running(quanta)
            submit(quanta, alone=False, retries=attempts - 1)

    def outcomes(future: Any, value: Any) -> Iterator[QuantumResult]:
        nonlocal per_quantum
        quanta = in_flight.pop(future.key)
        is_group = future.key in grouped
        grouped.discard(future.key)
        if value is None:  # retries exhausted (or cancelled): record and go on
            try:
                error = future.exception()
            except BaseException as cancelled:  # a cancelled future
                error = cancelled
            state, kind, reason = error_state(error)
            for visit, detector in quanta:
                yield QuantumResult(visit, detector, state, reason, kind)
            return
        if not is_group:
            yield value
            seconds = value.seconds
        else:
            results, seconds = value
            seconds /= max(1, len(results))
            for result in results:
                if result.state == _RETRY and attempts > 1:
                    retry.append((result.visit, result.detector))
                elif result.state == _RETRY:
                    yield QuantumResult(result.visit, result.detector, "failed",
                                        result.reason, result.error_kind)
                else:
                    yield result
        per_quantum = seconds if per_quantum is None else 0.8 * per_quantum + 0.2 * seconds

    refill()
    while in_flight or retry:
        if not in_flight:
            refill()
            continue
        batch = completed.next_batch(block=False)
        if not batch:
            recorder.flush()  # idle: make everything that has ended durable first
            batch = completed.next_batch(block=True)
        finished = [f for f in batch if f.status == "finished"]
        values = client.gather(finished) if finished else []
        pairs: list[tuple[Any, Any]] = list(zip(finished, values, strict=True))
        pairs += [(f, None) for f in batch if f.status != "finished"]
        for future, value in pairs:
            n_in_flight -= len(in_flight[future.key])
            for result in outcomes(future, value):
                recorder.add(result)
                yield result
            future.release()
        del batch, finished, values, pairs
        refill()


def _attempt_locally(function: QuantumFunction, root: str, pipeline: dict[str, Any], run: str,
                     visit: int, detector: int, attempts: int) -> QuantumResult:
    last: Exception | None = None
    for _ in range(max(1, attempts)):
        try:
            return function(root, pipeline, run, visit, detector)
        except Exception as error:  # retried like a lost worker
            last = error
    state, kind, reason = error_state(last or RuntimeError("no attempt was made"))
    return QuantumResult(visit, detector, state, reason, kind)
