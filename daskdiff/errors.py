"""The daskdiff error hierarchy.

Every error a user can meet is one of four kinds, because a campaign driver must treat them
differently:

- :class:`NoWorkError`: nothing to do (e.g. no template coverage); the quantum is recorded as
  ``no-work`` and skipped.
- :class:`AlgorithmError`: a deterministic failure of an algorithm on valid input (e.g. too few
  kernel sources); recorded as ``failed`` with its reason and never retried.
- :class:`ConfigError`: a configuration that cannot work; raised before any work starts.
- :class:`InputError`: input data that cannot be used (a corrupt file, a missing WCS, planes of
  mismatched shapes); recorded as ``failed`` and not retried.

Anything else (a lost worker, an I/O hiccup) is treated as transient and may be retried.
Each message says what is wrong and what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlgorithmError",
    "ConfigError",
    "DaskdiffError",
    "InputError",
    "NoWorkError",
    "is_retryable",
]


class DaskdiffError(Exception):
    """Base class of all errors raised deliberately by daskdiff.

    Parameters
    ----------
    message : str
        What is wrong and what to do about it.
    metadata : dict, optional
        Machine-readable details (counts, thresholds, data IDs) stored in the ledger.
    """

    #: Short name of the error kind, as stored in the ledger.
    kind: str = "error"

    def __init__(self, message: str, *, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __reduce__(self):  # keep metadata across pickling (Dask ships errors between processes)
        return (_rebuild_error, (type(self), str(self), self.metadata))


def _rebuild_error(cls: type, message: str, metadata: dict[str, Any]) -> DaskdiffError:
    return cls(message, metadata=metadata)


class NoWorkError(DaskdiffError):
    """There is nothing to do for this input; skip it (not a failure)."""

    kind = "no-work"


class AlgorithmError(DaskdiffError):
    """A deterministic algorithm failure on valid input; retrying will not help."""

    kind = "algorithm"


class ConfigError(DaskdiffError, ValueError):
    """A configuration value or combination that cannot work."""

    kind = "config"


class InputError(DaskdiffError, ValueError):
    """Input data that cannot be used as given (corrupt, incomplete or inconsistent)."""

    kind = "input"


def is_retryable(error: BaseException) -> bool:
    """Return whether a failure may succeed on a retry (on another worker).

    Parameters
    ----------
    error : BaseException
        The exception raised by a quantum.

    Returns
    -------
    bool
        ``False`` for every :class:`DaskdiffError` (they are deterministic), ``True`` otherwise.
    """
    return not isinstance(error, DaskdiffError)
