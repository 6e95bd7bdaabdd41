"""What a run's ledger says: counts, failures, the slowest quanta, memory and QA outliers.

:func:`run_report` gathers the figures of one run from the ledger in one streaming pass (a
million-quantum run keeps a few arrays of numbers, not its records); :func:`format_status`
is ``daskdiff status``; :func:`write_report` is ``daskdiff report`` (JSON and Markdown, one
or several runs side by side).

A QA outlier is a done quantum whose figure lies more than ``threshold`` robust standard
deviations (1.4826 x MAD) from the run's median, or whose ``noise_ratio`` (measured over
expected noise of the difference image) is outside ``noise_bounds``.
"""

from __future__ import annotations

import heapq
import json
import math
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QA_FIGURES", "format_status", "qa_outliers", "run_report", "write_report"]

#: QA figures summarised and searched for outliers (the ledger fields and the QA keys).
QA_FIGURES: tuple[str, ...] = ("noise_ratio", "n_dia_sources", "photometric_scale",
                               "template_coverage", "n_kernel_sources_used", "seconds",
                               "peak_memory")


def _robust(values: np.ndarray) -> tuple[float, float]:
    median = float(np.median(values))
    return median, float(1.4826 * np.median(np.abs(values - median)))


def qa_outliers(visits: np.ndarray, detectors: np.ndarray, values: dict[str, np.ndarray], *,
                threshold: float = 5.0, noise_bounds: tuple[float, float] = (0.8, 1.2),
                min_quanta: int = 5) -> list[dict[str, Any]]:
    """Return the QA outliers, the largest deviations first.

    Parameters
    ----------
    visits, detectors : numpy.ndarray
        The quanta.
    values : dict of str to numpy.ndarray
        Per figure, its value for each quantum (NaN where absent).
    threshold : float, optional
        Robust standard deviations from the median that make an outlier.
    noise_bounds : (float, float), optional
        The accepted range of ``noise_ratio``.
    min_quanta : int, optional
        Figures with fewer finite values are not tested against the median.

    Returns
    -------
    list of dict
        ``visit``, ``detector``, ``figure``, ``value``, ``median``, ``sigma``, ``z`` (NaN for
        a ``noise_ratio`` outside its bounds) and ``why``.
    """
    found = []
    for name, column in values.items():
        finite = np.isfinite(column)
        if name == "noise_ratio":
            low, high = noise_bounds
            for i in np.flatnonzero(finite & ((column < low) | (column > high))):
                found.append({"visit": int(visits[i]), "detector": int(detectors[i]),
                              "figure": name, "value": float(column[i]), "median": math.nan,
                              "sigma": math.nan, "z": math.inf,
                              "why": f"outside [{low}, {high}]"})
        if finite.sum() < min_quanta:
            continue
        median, sigma = _robust(column[finite])
        if not sigma > 0:
            continue
        z = (column - median) / sigma
        for i in np.flatnonzero(finite & (np.abs(z) > threshold)):
            found.append({"visit": int(visits[i]), "detector": int(detectors[i]),
                          "figure": name, "value": float(column[i]), "median": median,
                          "sigma": sigma, "z": float(z[i]),
                          "why": f"{z[i]:+.1f} sigma from the median {median:.4g}"})
    return sorted(found, key=lambda o: -abs(o["z"]))


def run_report(ledger: Any, run: str, *, slowest: int = 5, figures: Sequence[str] = QA_FIGURES,
               threshold: float = 5.0, max_outliers: int = 20) -> dict[str, Any]:
    """Return the figures of one run (JSON-able).

    Keys: ``run``, ``created``, ``description``, ``config``, ``counts``, ``failures`` (by
    reason, and each failed quantum), ``slowest`` (quanta), ``seconds`` and ``peak_memory``
    (statistics over done quanta), ``qa`` (median and robust sigma of each figure), ``outliers``
    and ``n_dia_sources`` (the total).
    """
    info = ledger.get_run(run)
    counts = ledger.counts(run)
    failures: dict[str, int] = {}
    failed = []
    for quantum in ledger.quanta(run, state="failed"):
        key = (quantum.reason or "unknown").split("\n")[0][:160]
        failures[key] = failures.get(key, 0) + 1
        if len(failed) < 200:
            failed.append({"visit": quantum.visit, "detector": quantum.detector,
                           "error_kind": quantum.error_kind, "attempts": quantum.attempts,
                           "reason": quantum.reason})
    visits, detectors = array("q"), array("q")
    columns = {name: array("d") for name in figures}
    heap: list[tuple[float, int, int, dict[str, Any]]] = []
    for quantum in ledger.quanta(run, state="done"):
        visits.append(quantum.visit)
        detectors.append(quantum.detector)
        record = {**quantum.qa, "seconds": quantum.seconds, "peak_memory": quantum.peak_memory}
        for name in figures:
            value = record.get(name)
            columns[name].append(float(value) if isinstance(value, int | float) and not
                                 isinstance(value, bool) else math.nan)
        if quantum.seconds is not None:
            entry = (quantum.seconds, quantum.visit, quantum.detector,
                     {"visit": quantum.visit, "detector": quantum.detector,
                      "seconds": quantum.seconds, "peak_memory": quantum.peak_memory,
                      "attempts": quantum.attempts, "worker": quantum.worker,
                      "n_dia_sources": quantum.qa.get("n_dia_sources")})
            if len(heap) < slowest:
                heapq.heappush(heap, entry)
            elif slowest > 0:
                heapq.heappushpop(heap, entry)
    v, d = np.asarray(visits, dtype=np.int64), np.asarray(detectors, dtype=np.int64)
    values = {name: np.asarray(column, dtype=float) for name, column in columns.items()}
    qa = {}
    for name, column in values.items():
        finite = column[np.isfinite(column)]
        if finite.size:
            median, sigma = _robust(finite)
            qa[name] = {"n": int(finite.size), "median": median, "sigma": sigma,
                        "min": float(finite.min()), "max": float(finite.max()),
                        "p90": float(np.percentile(finite, 90))}
    outliers = qa_outliers(v, d, values, threshold=threshold)
    total = values.get("n_dia_sources")
    return {
        "run": run, "created": info.created_iso, "description": info.description,
        "config": info.config, "counts": counts, "failures": failures, "failed": failed,
        "slowest": [entry[3] for entry in sorted(heap, reverse=True)],
        "qa": qa, "outliers": outliers[:max_outliers], "n_outliers": len(outliers),
        "n_dia_sources": int(np.nansum(total)) if total is not None else None,
    }


def _mib(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value / 2**20:.0f} MiB"


def format_status(report: dict[str, Any]) -> str:
    """Return ``daskdiff status``'s text for a :func:`run_report`."""
    counts = report["counts"]
    lines = [f"run {report['run']}: " + ", ".join(f"{k} {n}" for k, n in counts.items())
             + f" (created {report['created']})"]
    if report.get("description"):
        lines.append(f"  {report['description']}")
    if report["failures"]:
        lines.append("failures by reason:")
        for reason, n in sorted(report["failures"].items(), key=lambda item: -item[1]):
            lines.append(f"  x{n}: {reason}")
        for q in report["failed"]:
            lines.append(f"  failed visit {q['visit']} detector {q['detector']} "
                         f"({q['error_kind']}, {q['attempts']} attempts): {q['reason']}")
    if report["slowest"]:
        lines.append("slowest quanta:")
        for q in report["slowest"]:
            lines.append(f"  visit {q['visit']} detector {q['detector']}: {q['seconds']:.1f} s, "
                         f"peak memory {_mib(q['peak_memory'])}, "
                         f"{q['n_dia_sources'] or 0} DIA sources")
    qa = report["qa"]
    if "seconds" in qa:
        s = qa["seconds"]
        lines.append(f"wall seconds per quantum: median {s['median']:.1f}, 90% {s['p90']:.1f}, "
                     f"max {s['max']:.1f}")
    if "peak_memory" in qa:
        m = qa["peak_memory"]
        lines.append(f"peak memory per quantum: median {_mib(m['median'])}, "
                     f"90% {_mib(m['p90'])}, max {_mib(m['max'])}")
    if "noise_ratio" in qa:
        n = qa["noise_ratio"]
        lines.append(f"noise ratio (difference noise / expected): median {n['median']:.3f}, "
                     f"range {n['min']:.3f} to {n['max']:.3f}")
    if report["outliers"]:
        lines.append(f"QA outliers ({report['n_outliers']}):")
        for o in report["outliers"]:
            lines.append(f"  visit {o['visit']} detector {o['detector']}: {o['figure']} "
                         f"{o['value']:.4g} ({o['why']})")
    elif report["qa"]:
        lines.append("QA outliers: none")
    return "\n".join(lines)


def _markdown(reports: list[dict[str, Any]]) -> str:
    lines = ["# daskdiff campaign report", ""]
    runs = [r["run"] for r in reports]
    lines += ["| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for state in reports[0]["counts"]:
        lines.append(f"| {state} | " + " | ".join(str(r["counts"][state]) for r in reports)
                     + " |")
    lines.append("| DIA sources | " + " | ".join(str(r["n_dia_sources"]) for r in reports)
                 + " |")
    names = sorted({name for r in reports for name in r["qa"]})
    for name in names:
        cells = []
        for r in reports:
            stats = r["qa"].get(name)
            cells.append("-" if stats is None else f"{stats['median']:.4g} "
                         f"(sigma {stats['sigma']:.2g}, n {stats['n']})")
        lines.append(f"| median {name} | " + " | ".join(cells) + " |")
    for r in reports:
        lines += ["", f"## {r['run']}", "", "```", format_status(r), "```"]
    return "\n".join(lines) + "\n"


def write_report(ledger: Any, runs: Iterable[str], out: str | Path, **options: Any) -> Path:
    """Write ``report.json`` and ``report.md`` for one or more runs into ``out``.

    Several runs (e.g. a rerun with overrides next to its parent) are compared side by side:
    counts, DIA sources and the median of every QA figure. ``options`` go to
    :func:`run_report`. Returns the Markdown file.
    """
    reports = [run_report(ledger, run, **options) for run in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(reports, indent=1, default=str))
    page = out / "report.md"
    page.write_text(_markdown(reports))
    return page
