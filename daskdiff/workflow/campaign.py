"""Campaigns: run a pipeline over many (visit, detector) quanta through Dask, with a ledger.

:func:`run_quantum` is one quantum, start to end: it reads the calexp, builds the template,
subtracts, detects and measures, and writes every product atomically to the repository; it
returns a small :class:`QuantumResult` and converts the deterministic daskdiff errors into
states (no work, failed with its reason), so that Dask retries only the other failures (a lost
worker, an I/O hiccup).

:func:`run_campaign` builds the quanta from the registry, records them in the ledger, skips what
is already final (so running it again resumes), and submits the rest in a bounded window of
futures (back-pressure: a million-quantum campaign never becomes one giant graph), through the
driver of :mod:`daskdiff.workflow.driver`; every state change goes to the ledger.

:func:`rerun_campaign` runs a selection of a run's quanta again (the failed ones, or a
``--where`` cut on ledger fields and QA figures such as ``noise_ratio``), in the same run or,
with ``TASK.KEY=VALUE`` config overrides, into a new run that stores its resolved config.
"""

from __future__ import annotations

import ast
import difflib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from ..errors import ConfigError, DaskdiffError, InputError
from ..ledger import error_state
from .cluster import open_cluster
from .driver import PeakMemory, QuantumFunction, QuantumResult, drive_quanta
from .pipeline import Pipeline, parse_pipeline

__all__ = [
    "CampaignSummary",
    "QuantumResult",
    "apply_overrides",
    "compile_selection",
    "noise_ratio",
    "parse_where",
    "rerun_campaign",
    "run_campaign",
    "run_quantum",
    "select_quanta",
    "write_campaign_stamps",
]

#: Quantum states a resumed campaign does not run again (besides deterministic failures).
FINAL_STATES = ("done", "no-work")

#: Mask planes left out of the difference-image noise figure.
NOISE_BAD_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP", "DETECTED",
                    "DETECTED_NEGATIVE", "SAT_TEMPLATE")


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
    peak_memory: int | None = None

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
        if self.peak_memory:
            lines.append(f"peak memory of a quantum: {self.peak_memory / 2**20:.0f} MiB")
        for reason, count in sorted(self.failures.items(), key=lambda item: -item[1]):
            lines.append(f"  failed x{count}: {reason}")
        if self.dashboard_link:
            lines.append(f"dashboard: {self.dashboard_link}")
        return "\n".join(lines)


def noise_ratio(difference: Any) -> float:
    """Return the measured over the expected noise of a difference image.

    The robust standard deviation (1.4826 x MAD) of ``image / sqrt(variance)`` over pixels
    with a positive variance and none of :data:`NOISE_BAD_PLANES`: 1 when the variance plane
    describes the difference's noise, above 1 when the subtraction left structure or the
    variance is underestimated. NaN for fewer than 100 usable pixels.
    """
    from ..exposure import get_mask_planes

    planes = get_mask_planes(difference)
    bits = np.uint32(planes.bitmask(*[n for n in NOISE_BAD_PLANES if n in planes]))
    image = np.asarray(difference["image"].values, dtype=np.float64)
    variance = np.asarray(difference["variance"].values, dtype=np.float64)
    good = ((np.asarray(difference["mask"].values) & bits) == 0) & (variance > 0) & \
        np.isfinite(image) & np.isfinite(variance)
    if good.sum() < 100:
        return float("nan")
    z = image[good] / np.sqrt(variance[good])
    return float(1.4826 * np.median(np.abs(z - np.median(z))))


def _read_calexp(repo: Any, visit: int, detector: int) -> Any:
    """Load a quantum's calexp; an unreadable file is an input error (not retried)."""
    from ..exposure import load

    try:
        return load(repo.get_exposure("calexp", visit=visit, detector=detector))
    except (DaskdiffError, OSError):  # OSError: maybe transient (file system), retried
        raise
    except Exception as error:
        path = repo.path(repo.query("calexp", visit=visit, detector=detector)[0])
        raise InputError(f"calexp visit={visit} detector={detector} at {path} is unreadable "
                         f"({type(error).__name__}: {error}); replace the file, or leave the "
                         "quantum out with --where") from error


def run_quantum(root: str, pipeline: dict[str, Any], run: str, visit: int,
                detector: int) -> QuantumResult:
    """Run the pipeline on one (visit, detector) and write its products.

    Deterministic daskdiff errors become ``no-work`` / ``failed`` results; any other error
    propagates, so that the scheduler can retry the quantum on another worker. The result
    carries the wall time, the worker process's peak memory during the quantum and the QA
    figures (the subtraction's numeric metadata and :func:`noise_ratio`).

    A full garbage collection follows every quantum, so that the next one on this worker
    starts from the worker's baseline memory: dask's graph construction calls curried toolz
    functions whose internal exceptions leave reference cycles that pin the calling frames,
    and with them the quantum's task graph and its in-memory images (0.6 GiB for a 4k
    detector), until the cycle collector happens to reach them.
    """
    try:
        with PeakMemory() as memory:
            result = _run_quantum(root, pipeline, run, visit, detector)
    finally:
        gc.collect()
    result.peak_memory = memory.peak
    return result


def _run_quantum(root: str, pipeline: dict[str, Any], run: str, visit: int,
                 detector: int) -> QuantumResult:
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
            science = _read_calexp(repo, visit, detector)
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
    qa["noise_ratio"] = noise_ratio(difference)
    n_real = sum(1 for flag in catalog.column("sky_source").to_pylist() if not flag)
    return QuantumResult(visit, detector, "done", seconds=time.perf_counter() - start,
                         n_dia_sources=n_real, worker=worker, qa=qa)


_ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub,
                  ast.Compare, ast.Name, ast.Load, ast.Constant, ast.Tuple, ast.List, ast.Eq,
                  ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)


def compile_selection(expression: str, names: Iterable[str], *, numbers: type | tuple = int,
                      strings: bool = False) -> Callable[[Mapping[str, Any]], bool]:
    """Compile a selection expression over named fields, without executing anything.

    Parameters
    ----------
    expression : str
        Comparisons (``<``, ``==``, ``in (...)``, ...) of field names with literals, joined
        by ``and`` / ``or`` / ``not``, e.g. ``"noise_ratio > 1.2 and detector < 10"``.
    names : iterable of str
        The field names allowed.
    numbers : type or tuple of types, optional
        The numeric literal types allowed (``int``, or ``(int, float)``).
    strings : bool, optional
        Allow string literals (e.g. ``state == 'failed'``).

    Returns
    -------
    callable
        ``select(record)``: whether a mapping of field values is selected. A field missing
        from the record is NaN, so a comparison with it is false.

    Raises
    ------
    ConfigError
        For a syntax error, an unknown name (with a suggestion) or a disallowed construct.
    """
    known = sorted(set(names))
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ConfigError(f"--where {expression!r}: not a valid expression ({error.msg})"
                          ) from None
    kinds = "numbers" + (" and strings" if strings else "")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in known:
            guess = difflib.get_close_matches(node.id, known, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"use {', '.join(known)}"
            raise ConfigError(f"--where: unknown name {node.id!r}; {hint}")
        if not isinstance(node, _ALLOWED_NODES):
            raise ConfigError(f"--where {expression!r}: {type(node).__name__} is not allowed; "
                              f"use comparisons of {', '.join(known)} with {kinds}")
        if isinstance(node, ast.Constant):
            ok = (isinstance(node.value, numbers) and not isinstance(node.value, bool)) or (
                strings and isinstance(node.value, str))
            if not ok:
                raise ConfigError(f"--where: only {kinds} are allowed as values, got "
                                  f"{node.value!r}")
    code = compile(tree, "<where>", "eval")

    def select(record: Mapping[str, Any]) -> bool:
        values = {name: record.get(name) for name in known}
        values = {k: float("nan") if v is None else v for k, v in values.items()}
        try:
            return bool(eval(code, {"__builtins__": {}}, values))
        except TypeError:  # e.g. a string field compared with a number
            return False

    return select


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
    select = compile_selection(expression, ("visit", "detector"))
    return lambda visit, detector: select({"visit": visit, "detector": detector})


def _quanta(repo: Any, where: str | None,
            given: Iterable[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    select = parse_where(where)
    if given is None:
        found = {(int(r.data_id["visit"]), int(r.data_id["detector"]))
                 for r in repo.query("calexp", run=None)}
    else:
        found = {(int(v), int(d)) for v, d in given}
    return sorted(q for q in found if select(*q))


def check_inputs(pipeline: Pipeline, repo: Any) -> None:
    """Check that the repository holds what the pipeline's template stage reads.

    That is the ``{coaddName}Coadd`` coadds, or the template visit or file; checked before any
    work starts.

    Raises
    ------
    ConfigError
        What is missing, what the repository holds instead, and how to fix it.
    """
    from ..template import ExposureTemplateConfig

    task = pipeline.task("template")
    config = task.config
    if isinstance(config, ExposureTemplateConfig):
        if config.template_path is not None:
            if not os.path.exists(config.template_path):
                raise ConfigError(f"{pipeline.source}: the template file "
                                  f"{config.template_path!r} ({task.label}.templatePath) does "
                                  "not exist")
            return
        if not repo.query("calexp", visit=config.template_visit):
            visits = repo.summary()["visits"]
            raise ConfigError(f"{pipeline.source}: the template visit {config.template_visit} "
                              f"({task.label}.templateVisit) is not in {repo.root}; its "
                              f"visits are {visits[:10]}{' ...' if len(visits) > 10 else ''}")
        return
    dataset_type = f"{config.coadd_name}Coadd"
    if not repo.query(dataset_type, run=None):
        coadds = repo.summary()["coadd_names"]
        raise ConfigError(f"{pipeline.source}: the repository {repo.root} has no {dataset_type} "
                          f"coadds, which parameters.coaddName = {config.coadd_name!r} names; "
                          f"it has {coadds or 'no coadds'}: set coaddName to one of them or "
                          "make the coadds first")


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
    quanta: Iterable[tuple[int, int]] | None = None,
    quantum_function: QuantumFunction | None = None,
    description: str | None = None,
    progress_bar: bool = False,
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
    quanta : iterable of (int, int), optional
        The ``(visit, detector)`` to run instead of every calexp of the registry (still
        filtered by ``where``); :func:`rerun_campaign` passes its selection here.
    quantum_function : callable, optional
        What runs one quantum (default :func:`run_quantum`); the driver benchmark plugs in
        :func:`~daskdiff.workflow.driver.trivial_quantum`.
    description : str, optional
        Stored with a new run (e.g. where a rerun comes from).
    progress_bar : bool, optional
        Show a progress bar on standard error (done, failed, DIA sources, throughput); the
        per-quantum ``progress`` messages are then given for failures only.

    Returns
    -------
    CampaignSummary
    """
    if attempts < 1:
        raise ConfigError(f"attempts must be >= 1, got {attempts}")
    say = progress or (lambda message: None)
    run = run or f"{pipeline.parameters['coaddName']}Diff"
    if quantum_function is None:  # the pipeline's own stages read the template inputs
        check_inputs(pipeline, repo)
    ledger = repo.ledger
    ledger.create_run(run, config=pipeline.to_dict(), description=description, exist_ok=True)
    selected = _quanta(repo, where, quanta)
    if not selected:
        what = "the given quanta" if quanta is not None else f"calexp in {repo.root}"
        raise ConfigError(f"no {what} matches --where {where!r}")
    ledger.add_pending(run, selected)
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
    todo = [q for q in selected if q not in final]
    del final
    document = pipeline.to_dict()
    start = time.perf_counter()
    n_sources, n_failed, peak = 0, 0, None
    with open_cluster(cluster, workers=workers) as handle:
        if handle.dashboard_link:
            say(f"Dask dashboard: {handle.dashboard_link}")
        say(f"run {run}: {len(todo)} quanta to process, "
            f"{len(selected) - len(todo)} already final")
        connected = len(handle.client.scheduler_info().get("workers", {})) if handle.client else 1
        # an adaptive (Slurm) cluster starts with no worker and grows only while tasks wait:
        # size the window for the most workers it can reach
        window = batch_size or 4 * max(handle.max_workers or 0, connected, workers or 1)
        bar = tqdm(total=len(todo), unit="quantum", disable=not progress_bar, file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0, desc=run)
        with bar:
            for result in drive_quanta(handle.client, todo,
                                       function=quantum_function or run_quantum,
                                       root=str(repo.root), pipeline=document, run=run,
                                       ledger=ledger, attempts=attempts, window=window):
                n_sources += result.n_dia_sources
                if result.peak_memory is not None:
                    peak = max(peak or 0, result.peak_memory)
                n_failed += result.state == "failed"
                bar.update(1)
                bar.set_postfix(failed=n_failed, dia_sources=n_sources, refresh=False)
                if progress is not None and (not progress_bar or result.state == "failed"):
                    message = (f"visit {result.visit} detector {result.detector}: "
                               f"{result.state}"
                               + (f" ({result.reason})" if result.reason else "")
                               + f" in {result.seconds:.1f} s")
                    if progress_bar:
                        bar.write(message, file=sys.stderr)
                    else:
                        say(message)
        link = handle.dashboard_link
    failures: dict[str, int] = {}
    for quantum in ledger.quanta(run, state="failed"):
        key = (quantum.reason or "unknown").split("\n")[0][:160]
        failures[key] = failures.get(key, 0) + 1
    return CampaignSummary(run, ledger.counts(run), failures, len(selected) - len(todo),
                           len(todo), time.perf_counter() - start, n_sources, link, peak)


# --------------------------------------------------------------------------------------------
# rerun
# --------------------------------------------------------------------------------------------

#: Ledger fields a rerun selection can use besides the QA figures.
LEDGER_FIELDS = ("visit", "detector", "state", "error_kind", "attempts", "seconds",
                 "peak_memory")


def apply_overrides(document: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``TASK.KEY=VALUE`` overrides to a resolved pipeline document.

    ``TASK`` is a task label (``subtract``, ``getTemplate``, ...), a stage name (``template``,
    ``subtract``, ``detect``) or ``parameters``; ``VALUE`` is read as YAML (``3``, ``0.5``,
    ``true``, ``[1, 2]``, ``convolveScience``). The result is validated by
    :func:`~daskdiff.workflow.pipeline.parse_pipeline` by the caller.

    Raises
    ------
    ConfigError
        A malformed override or an unknown task (with a suggestion).
    """
    from .pipeline import STAGE_VARIANTS

    data = yaml.safe_load(yaml.safe_dump(dict(document)))  # a deep copy
    tasks = data.setdefault("tasks", {})
    by_stage = {STAGE_VARIANTS[body["class"]][0]: label for label, body in tasks.items()
                if body.get("class") in STAGE_VARIANTS}
    for item in overrides:
        target, sep, text = item.partition("=")
        task, dot, key = target.strip().partition(".")
        if not sep or not dot or not task or not key:
            raise ConfigError(f"--set {item!r}: write TASK.KEY=VALUE, e.g. subtract.mode="
                              "convolveScience or parameters.coaddName=deep")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({error})"
                              ) from None
        if task == "parameters":
            data.setdefault("parameters", {})[key] = value
            continue
        label = task if task in tasks else by_stage.get(task)
        if label is None:
            known = sorted(set(tasks) | set(by_stage) | {"parameters"})
            guess = difflib.get_close_matches(task, known, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"known: {known}"
            raise ConfigError(f"--set {item!r}: unknown task {task!r}; {hint}")
        if key == "class":
            tasks[label]["class"] = value
        else:
            tasks[label].setdefault("config", {})[key] = value
    return data


def select_quanta(ledger: Any, run: str, *, failed: bool = False,
                  where: str | None = None) -> list[tuple[int, int]]:
    """Return the ``(visit, detector)`` of a run's quanta that are failed and/or match ``where``.

    ``where`` may use the ledger fields (:data:`LEDGER_FIELDS`) and every QA figure recorded
    in the run (``noise_ratio``, ``n_dia_sources``, ``photometric_scale``, ...), with numbers
    and strings, e.g. ``"noise_ratio > 1.2 or state == 'failed'"``.
    """
    records = list(ledger.quanta(run, state="failed" if failed else None))
    if not where:
        return [(q.visit, q.detector) for q in records]
    names = set(LEDGER_FIELDS)
    for quantum in ledger.quanta(run):
        names.update(quantum.qa)
    select = compile_selection(where, names, numbers=(int, float), strings=True)
    return [(q.visit, q.detector) for q in records
            if select({**q.qa, **{k: getattr(q, k) for k in LEDGER_FIELDS}})]


def rerun_campaign(
    repo: Any,
    *,
    run: str,
    failed: bool = False,
    where: str | None = None,
    overrides: Iterable[str] = (),
    into: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    attempts: int = 3,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> CampaignSummary:
    """Run a selection of a run's quanta again, in the same run or, with overrides, a new one.

    Parameters
    ----------
    repo : Repository
        The repository.
    run : str
        The run whose quanta are selected; its stored configuration is the starting point.
    failed : bool, optional
        Select the failed quanta.
    where : str, optional
        Select by ledger fields and QA figures (see :func:`select_quanta`); with ``failed``,
        both must hold.
    overrides : iterable of str, optional
        ``TASK.KEY=VALUE`` config changes (see :func:`apply_overrides`); they need ``into``.
    into : str, optional
        The run to write to (default: ``run`` itself). A new run stores the resolved config
        with the overrides; running the same rerun again resumes it.
    cluster, workers, attempts, batch_size, progress
        As for :func:`run_campaign`.

    Returns
    -------
    CampaignSummary
        Of the rerun (an empty one when nothing is selected).

    Raises
    ------
    ConfigError
        No selection given, overrides without ``into``, an invalid override, or a target run
        that exists with another configuration.
    InputError
        The run does not exist.
    """
    if not failed and not where:
        raise ConfigError("choose what to rerun: --failed and/or --where EXPR "
                          "(e.g. --where \"noise_ratio > 1.2\")")
    ledger = repo.ledger
    info = ledger.get_run(run)
    if info.config is None:
        raise ConfigError(f"run {run!r} has no stored pipeline configuration to rerun with")
    overrides = list(overrides)
    document = apply_overrides(info.config, overrides)
    pipeline = parse_pipeline(document, source=f"run {run} with --set {overrides}"
                              if overrides else f"run {run}")
    target = into or run
    if target == run and pipeline.to_dict() != parse_pipeline(info.config).to_dict():
        raise ConfigError(f"config overrides change run {run!r}'s configuration; write the "
                          "rerun into a new run with --into NEWRUN")
    selection = select_quanta(ledger, run, failed=failed, where=where)
    how = " and ".join(part for part in ("failed" if failed else "",
                                          f"where {where}" if where else "") if part)
    say = progress or (lambda message: None)
    say(f"rerun of {run} ({how}): {len(selection)} quanta into run {target}")
    if not selection:
        return CampaignSummary(target, ledger.counts(target) if target == run else {}, {}, 0,
                               0, 0.0, 0)
    if target == run:
        ledger.reset(run, states=("failed", "done", "no-work", "running"), quanta=selection)
    else:
        ledger.create_run(target, config=pipeline.to_dict(), exist_ok=True,
                          description=f"rerun of {run} ({how})"
                          + (f" with {' '.join(overrides)}" if overrides else ""))
        ledger.add_pending(target, selection)
        ledger.reset(target, states=("failed",), quanta=selection)
    return run_campaign(pipeline, repo, run=target, cluster=cluster, workers=workers,
                        attempts=attempts, batch_size=batch_size, progress=progress,
                        quanta=selection)


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
