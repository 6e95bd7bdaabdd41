"""Campaigns: run a pipeline over many (visit, detector) quanta through Dask, with a ledger.

:func:`run_quantum` is one quantum, start to end: it reads the calexp, builds the template,
subtracts, detects and measures, and writes every product atomically to the repository; it
returns a small :class:`QuantumResult` and converts the deterministic daskdiff errors into
states (no work, failed with its reason), so that Dask retries only the other failures (a lost
worker, an I/O hiccup).

:func:`run_campaign` builds the quanta from the registry, records them in the ledger, skips what
is already final (so running it again resumes), and submits the rest in a bounded window of
futures (back-pressure: a million-quantum campaign never becomes one giant graph). Every state
change goes to the ledger as it happens.
"""

from __future__ import annotations

import ast
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, DaskdiffError
from ..ledger import error_state
from .cluster import open_cluster
from .pipeline import Pipeline, parse_pipeline

__all__ = [
    "CampaignSummary",
    "QuantumResult",
    "parse_where",
    "run_campaign",
    "run_quantum",
    "write_campaign_stamps",
]

#: Quantum states a resumed campaign does not run again (besides deterministic failures).
FINAL_STATES = ("done", "no-work")


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


@dataclass
class CampaignSummary:
    """The outcome of :func:`run_campaign`."""

    run: str
    counts: dict[str, int]
    failures: dict[str, int]
    skipped: int
    processed: int
    seconds: float
    n_dia_sources: int
    dashboard_link: str | None = None

    @property
    def throughput(self) -> float:
        """Quanta processed per minute."""
        return 60.0 * self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {**asdict(self), "throughput_per_minute": self.throughput}

    def format(self) -> str:
        """Return a human-readable summary."""
        lines = [f"run {self.run}: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()),
                 f"processed {self.processed} quanta in {self.seconds:.1f} s "
                 f"({self.throughput:.1f} per minute); skipped {self.skipped} already final",
                 f"DIA sources found: {self.n_dia_sources}"]
        for reason, count in sorted(self.failures.items(), key=lambda item: -item[1]):
            lines.append(f"  failed x{count}: {reason}")
        if self.dashboard_link:
            lines.append(f"dashboard: {self.dashboard_link}")
        return "\n".join(lines)


def run_quantum(root: str, pipeline: dict[str, Any], run: str, visit: int,
                detector: int) -> QuantumResult:
    """Run the pipeline on one (visit, detector) and write its products.

    Deterministic daskdiff errors become ``no-work`` / ``failed`` results; any other error
    propagates, so that the scheduler can retry the quantum on another worker.
    """
    import dask

    from ..detect import detect_and_measure
    from ..exposure import load
    from ..repository import Repository
    from ..subtract import subtract
    from ..template import get_template

    start = time.perf_counter()
    spec = parse_pipeline(pipeline)
    worker = os.environ.get("HOSTNAME", "") + f":{os.getpid()}"
    try:
        with dask.config.set(scheduler="synchronous"):  # one quantum per worker thread
            repo = Repository.open(root)
            ids = {"run": run, "visit": visit, "detector": detector, "overwrite": True}
            science = load(repo.get_exposure("calexp", visit=visit, detector=detector))
            template = load(get_template(science, repo, config=spec.task("template").config))
            result = subtract(science, template, config=spec.task("subtract").config)
            difference, matched = load(result.difference), load(result.matched)
            catalog = detect_and_measure(science, matched, difference,
                                         config=spec.task("detect").config)
            repo.put_exposure(template, spec.dataset_name("template"), **ids)
            repo.put_exposure(difference, spec.dataset_name("difference"), **ids)
            repo.put_exposure(matched, spec.dataset_name("matched"), **ids)
            repo.put_json(result.kernel.to_dict(), spec.dataset_name("kernel"), **ids)
            repo.put_table(catalog, spec.dataset_name("diaSrc"), **ids)
    except DaskdiffError as error:
        state, kind, reason = error_state(error)
        return QuantumResult(visit, detector, state, reason, kind,
                             time.perf_counter() - start, worker=worker)
    qa = {key: value for key, value in result.metadata.items()
          if isinstance(value, int | float) and not isinstance(value, bool)}
    n_real = sum(1 for flag in catalog.column("sky_source").to_pylist() if not flag)
    return QuantumResult(visit, detector, "done", seconds=time.perf_counter() - start,
                         n_dia_sources=n_real, worker=worker, qa=qa)


_ALLOWED_NAMES = {"visit", "detector"}


def parse_where(expression: str | None) -> Callable[[int, int], bool]:
    """Compile a ``--where`` selection such as ``visit in (1000, 1001) and detector < 10``.

    Only ``visit`` and ``detector``, integer literals, tuples, comparisons, ``in`` and
    ``and``/``or``/``not`` are allowed; nothing is executed.

    Raises
    ------
    ConfigError
        For anything else.
    """
    if not expression:
        return lambda visit, detector: True
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ConfigError(f"--where {expression!r}: not a valid expression ({error.msg})"
                          ) from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in _ALLOWED_NAMES:
            raise ConfigError(f"--where: unknown name {node.id!r}; use visit and detector")
        allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not,
                   ast.Compare, ast.Name, ast.Load, ast.Constant, ast.Tuple, ast.List, ast.Eq,
                   ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.USub)
        if not isinstance(node, allowed):
            raise ConfigError(f"--where {expression!r}: {type(node).__name__} is not allowed; "
                              "use comparisons of visit and detector with integers")
        if isinstance(node, ast.Constant) and not isinstance(node.value, int):
            raise ConfigError(f"--where: only integer values are allowed, got {node.value!r}")
    code = compile(tree, "<where>", "eval")

    def select(visit: int, detector: int) -> bool:
        return bool(eval(code, {"__builtins__": {}}, {"visit": visit, "detector": detector}))

    return select


def _quanta(repo: Any, where: str | None) -> list[tuple[int, int]]:
    select = parse_where(where)
    found = {(int(r.data_id["visit"]), int(r.data_id["detector"]))
             for r in repo.query("calexp", run=None)}
    return sorted(q for q in found if select(*q))


def _record(ledger: Any, run: str, result: QuantumResult) -> None:
    ledger.set_state(run, visit=result.visit, detector=result.detector, state=result.state,
                     reason=result.reason, error_kind=result.error_kind,
                     seconds=result.seconds, worker=result.worker,
                     qa={**result.qa, "n_dia_sources": result.n_dia_sources})


def run_campaign(
    pipeline: Pipeline,
    repo: Any,
    *,
    run: str | None = None,
    where: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    attempts: int = 3,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> CampaignSummary:
    """Run a pipeline on every selected (visit, detector) of a repository.

    Parameters
    ----------
    pipeline : Pipeline
        A validated pipeline (:func:`~daskdiff.workflow.load_pipeline`).
    repo : Repository
        The repository with the calexps and the template inputs.
    run : str, optional
        The run name (default: the pipeline's coadd name + ``"Diff"``); running the same
        command again resumes it.
    where : str, optional
        A selection such as ``"visit in (1000, 1001) and detector < 10"``.
    cluster : str, optional
        ``sync``, ``local``, ``tcp://HOST:PORT`` or ``slurm:PROFILE``.
    workers : int, optional
        Local workers, or the maximum number of Slurm jobs.
    attempts : int, optional
        Tries of a quantum that fails with a non-daskdiff error (a lost worker, ...).
    batch_size : int, optional
        Quanta in flight at a time (default: 4 per worker).
    progress : callable, optional
        Called with progress messages (the dashboard link first).

    Returns
    -------
    CampaignSummary
    """
    if attempts < 1:
        raise ConfigError(f"attempts must be >= 1, got {attempts}")
    say = progress or (lambda message: None)
    run = run or f"{pipeline.parameters['coaddName']}Diff"
    ledger = repo.ledger
    ledger.create_run(run, config=pipeline.to_dict(), exist_ok=True)
    quanta = _quanta(repo, where)
    if not quanta:
        raise ConfigError(f"no calexp matches --where {where!r} in {repo.root}")
    ledger.add_pending(run, quanta)
    final = {(q.visit, q.detector) for q in ledger.quanta(run, state=FINAL_STATES)}
    # deterministic failures stay failed (rerun them on purpose, with a reset); failures whose
    # retries ran out (lost workers, I/O) are tried again
    transient = []
    for q in ledger.quanta(run, state="failed"):
        if q.error_kind == "exception":
            transient.append((q.visit, q.detector))
        else:
            final.add((q.visit, q.detector))
    if transient:
        ledger.reset(run, states=("failed",), quanta=transient)
    todo = [q for q in quanta if q not in final]
    document = pipeline.to_dict()
    start = time.perf_counter()
    n_sources = 0
    with open_cluster(cluster, workers=workers) as handle:
        if handle.dashboard_link:
            say(f"Dask dashboard: {handle.dashboard_link}")
        say(f"run {run}: {len(todo)} quanta to process, {len(quanta) - len(todo)} already final")
        for result in _execute(handle.client, todo, str(repo.root), document, run, ledger,
                               attempts=attempts, batch_size=batch_size, workers=workers):
            _record(ledger, run, result)
            n_sources += result.n_dia_sources
            say(f"visit {result.visit} detector {result.detector}: {result.state}"
                + (f" ({result.reason})" if result.reason else "")
                + f" in {result.seconds:.1f} s")
        link = handle.dashboard_link
    failures: dict[str, int] = {}
    for quantum in ledger.quanta(run, state="failed"):
        key = (quantum.reason or "unknown").split("\n")[0][:160]
        failures[key] = failures.get(key, 0) + 1
    return CampaignSummary(run, ledger.counts(run), failures, len(quanta) - len(todo),
                           len(todo), time.perf_counter() - start, n_sources, link)


def _execute(client: Any, todo: list[tuple[int, int]], root: str, document: dict[str, Any],
             run: str, ledger: Any, *, attempts: int, batch_size: int | None,
             workers: int | None) -> Iterable[QuantumResult]:
    if client is None:  # --cluster sync: in this process, one quantum at a time
        for visit, detector in todo:
            ledger.set_state(run, visit=visit, detector=detector, state="running")
            yield _attempt_locally(root, document, run, visit, detector, attempts)
        return
    from distributed import as_completed

    window = batch_size or 4 * max(len(client.scheduler_info().get("workers", {})),
                                   workers or 1)
    pending = iter(todo)
    futures = as_completed()
    keys: dict[Any, tuple[int, int]] = {}

    def submit_next() -> bool:
        quantum = next(pending, None)
        if quantum is None:
            return False
        visit, detector = quantum
        ledger.set_state(run, visit=visit, detector=detector, state="running")
        future = client.submit(run_quantum, root, document, run, visit, detector,
                               retries=attempts - 1, pure=False,
                               key=f"quantum-{run}-{visit}-{detector}-{time.time_ns()}")
        keys[future] = quantum
        futures.add(future)
        return True

    for _ in range(window):
        if not submit_next():
            break
    for future in futures:
        visit, detector = keys.pop(future)
        try:
            yield future.result()
        except Exception as error:  # retries exhausted: record and go on
            state, kind, reason = error_state(error)
            yield QuantumResult(visit, detector, state, reason, kind)
        future.release()
        submit_next()


def _attempt_locally(root: str, document: dict[str, Any], run: str, visit: int,
                     detector: int, attempts: int) -> QuantumResult:
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return run_quantum(root, document, run, visit, detector)
        except Exception as error:  # retried like a lost worker
            last = error
    state, kind, reason = error_state(last or RuntimeError("no attempt was made"))
    return QuantumResult(visit, detector, state, reason, kind)


def write_campaign_stamps(repo: Any, pipeline: Pipeline, run: str, *, n_brightest: int = 20,
                          size: int = 100) -> Any:
    """Write postage stamps of the brightest DIA sources of a run and a gallery page.

    The ``n_brightest`` real (non-sky) sources by absolute calibrated PSF flux over all quanta
    get science / template / difference stamps (FITS and PNG) in
    ``REPO/runs/RUN/stamps/visit=V_detector=D/``; ``REPO/runs/RUN/stamps/index.html`` links
    the per-quantum galleries. Returns that page, or ``None`` when the run found no source.
    """
    import numpy as np
    import pyarrow as pa

    from ..stamps import make_stamps

    refs = repo.query(pipeline.dataset_name("diaSrc"), run=run)
    tables = [repo.get_table(ref) for ref in refs]
    tables = [t for t in tables if t.num_rows]
    if not tables or n_brightest <= 0:
        return None
    catalog = pa.concat_tables(tables)
    real = ~np.asarray(catalog.column("sky_source").to_pylist(), bool)
    flux = np.abs(np.nan_to_num(np.asarray(catalog.column("psf_flux_njy").to_pylist(),
                                           float)))
    order = [i for i in np.argsort(-flux) if real[i]][:n_brightest]
    if not order:
        return None
    chosen = catalog.take(sorted(order))
    root = repo.root / "runs" / run / "stamps"
    links = []
    quanta = sorted(set(zip(chosen.column("visit").to_pylist(),
                            chosen.column("detector").to_pylist(), strict=True)))
    for visit, detector in quanta:
        keep = np.asarray([v == visit and d == detector for v, d in zip(
            chosen.column("visit").to_pylist(), chosen.column("detector").to_pylist(),
            strict=True)])
        ids = {"visit": visit, "detector": detector}
        page = make_stamps(
            repo.get_exposure("calexp", **ids, chunks=None),
            repo.get_exposure(pipeline.dataset_name("template"), run=run, **ids, chunks=None),
            repo.get_exposure(pipeline.dataset_name("difference"), run=run, **ids,
                              chunks=None),
            chosen.filter(pa.array(keep)), root / f"visit={visit}_detector={detector}",
            size=size, overwrite=True)
        links.append((visit, detector, int(keep.sum()), page.relative_to(root)))
    items = "\n".join(f'<li><a href="{path}">visit {v}, detector {d}</a>: {n} sources</li>'
                      for v, d, n, path in links)
    index = root / "index.html"
    index.write_text(f"<html><head><title>{run}: brightest DIA sources</title></head><body>"
                     f"<h1>{run}: the {len(order)} brightest DIA sources</h1><ul>{items}</ul>"
                     "</body></html>\n")
    return index
