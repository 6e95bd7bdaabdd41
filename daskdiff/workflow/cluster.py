"""Where a campaign runs: no cluster, a LocalCluster, an existing scheduler, or Slurm.

``--cluster`` specs:

- ``sync``: no cluster; Dask's synchronous scheduler (debugging).
- ``local`` (default): a :class:`distributed.LocalCluster` sized to the machine, its dashboard
  bound to localhost.
- ``tcp://HOST:PORT``: an existing scheduler.
- ``slurm:PROFILE``: :class:`dask_jobqueue.SLURMCluster` configured by
  ``deploy/slurm/PROFILE.yaml`` (or a path to a YAML profile), adapting between the profile's
  minimum and maximum number of jobs, so that a job lost to ``scancel``, a node failure or the
  walltime is replaced.

A profile holds :class:`dask_jobqueue.SLURMCluster` arguments, under their current names only
(``worker_extra_args``, ``job_extra_directives``, ``job_script_prologue``,
``job_directives_skip``, ``account``), plus ``adapt: {minimum_jobs, maximum_jobs}``. Unless the
profile says otherwise, the dashboard binds to localhost. A ``--lifetime`` in
``worker_extra_args`` (plus its ``--lifetime-stagger``) must be shorter than the walltime, so
that workers retire gracefully before Slurm kills their job.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = [
    "ClusterHandle",
    "adapt_bounds",
    "load_profile",
    "open_cluster",
    "slurm_cluster",
    "slurm_job_script",
    "slurm_walltime_seconds",
]

#: Where the shipped profiles live (the checkout's deploy/slurm).
PROFILE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "slurm"

#: The dashboard address when a profile does not choose one: localhost only.
DEFAULT_DASHBOARD = "127.0.0.1:8787"

_SLURM_KEYS = {
    "account", "queue", "cores", "processes", "memory", "walltime", "interface",
    "local_directory", "log_directory", "job_extra_directives", "job_directives_skip",
    "job_script_prologue", "worker_extra_args", "scheduler_options", "job_cpu", "job_mem",
    "python", "death_timeout", "name", "job_name",
}
_ADAPT_KEYS = {"minimum_jobs", "maximum_jobs"}

#: dask-jobqueue's deprecated argument names and what to write instead.
_RENAMED = {
    "extra": "worker_extra_args",
    "env_extra": "job_script_prologue",
    "job_extra": "job_extra_directives",
    "header_skip": "job_directives_skip",
    "project": "account",
    "dashboard_address": "scheduler_options: {dashboard_address: ...}",
    "host": "scheduler_options: {host: ...}",
}


@dataclass
class ClusterHandle:
    """An open cluster: the client (None for ``sync``), the cluster object, the dashboard.

    ``max_workers`` is the number of Dask workers the cluster can reach (a LocalCluster's
    workers; for Slurm the maximum number of jobs times the workers per job), None where
    unknown (an existing scheduler). Size the submission window on it: under ``adapt`` the
    cluster only grows when tasks wait, and a Slurm cluster starts with no worker connected.
    """

    client: Any
    cluster: Any
    dashboard_link: str | None
    max_workers: int | None = None


def _unknown_key_message(path: Path, key: str, known: set[str]) -> str:
    if key in _RENAMED:
        return (f"{path}: {key!r} is dask-jobqueue's old name; write {_RENAMED[key]} "
                "instead")
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {sorted(known)}"
    return f"{path}: unknown profile key {key!r}{hint}"


def slurm_walltime_seconds(walltime: str) -> float:
    """Parse a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``).

    Raises
    ------
    ConfigError
        If it is not a Slurm time limit.
    """
    text = str(walltime).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise ConfigError(f"walltime {walltime!r} is not a Slurm time limit; write HH:MM:SS")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60.0 + seconds
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60.0 + int(third)
    if second is not None:  # MM:SS
        return int(first) * 60.0 + int(second)
    return int(first) * 60.0  # MM


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _check_lifetime(path: Path, profile: dict[str, Any]) -> None:
    from dask.utils import parse_timedelta

    args = [str(a) for a in profile.get("worker_extra_args") or []]
    lifetime = _option(args, "--lifetime")
    walltime = profile.get("walltime")
    if lifetime is None or walltime is None:
        return
    stagger = _option(args, "--lifetime-stagger") or "0s"
    try:
        total = parse_timedelta(lifetime) + parse_timedelta(stagger)
    except (ValueError, KeyError):
        raise ConfigError(f"{path}: --lifetime {lifetime!r} / --lifetime-stagger {stagger!r} "
                          "are not durations such as 225m or 5m") from None
    limit = slurm_walltime_seconds(walltime)
    if total >= limit:
        raise ConfigError(f"{path}: --lifetime {lifetime} plus --lifetime-stagger {stagger} "
                          f"({total:.0f} s) must be shorter than the walltime {walltime} "
                          f"({limit:.0f} s), or Slurm kills the workers with their results")


def load_profile(name: str) -> dict[str, Any]:
    """Read and validate a Slurm profile by name (``deploy/slurm/NAME.yaml``) or path.

    Raises
    ------
    ConfigError
        If the profile does not exist, holds unknown or deprecated keys, an invalid ``adapt``
        section, or a worker lifetime not shorter than the walltime.
    """
    path = Path(name)
    if not path.suffix:
        path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"Slurm profile {name!r} not found ({path}); shipped profiles: "
                          f"{known}, or give a path to a YAML profile")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a mapping of SLURMCluster arguments")
    for key in data:
        if key not in _SLURM_KEYS | {"adapt"}:
            raise ConfigError(_unknown_key_message(path, key, _SLURM_KEYS | {"adapt"}))
    adapt = data.get("adapt") or {}
    if not isinstance(adapt, dict):
        raise ConfigError(f"{path}: adapt must be a mapping with minimum_jobs, maximum_jobs")
    for key, value in adapt.items():
        if key not in _ADAPT_KEYS:
            raise ConfigError(_unknown_key_message(path, f"adapt.{key}", {
                f"adapt.{k}" for k in _ADAPT_KEYS}))
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{path}: adapt.{key} must be a non-negative integer, got "
                              f"{value!r}")
    if adapt.get("minimum_jobs", 0) > adapt.get("maximum_jobs", 1):
        raise ConfigError(f"{path}: adapt.minimum_jobs ({adapt['minimum_jobs']}) exceeds "
                          f"adapt.maximum_jobs ({adapt.get('maximum_jobs', 1)})")
    _check_lifetime(path, data)
    return data


def _cluster_kwargs(profile: dict[str, Any]) -> dict[str, Any]:
    """SLURMCluster keyword arguments from a profile (driver-side paths resolved)."""
    kwargs = {k: v for k, v in profile.items() if k != "adapt" and v is not None}
    # the log directory is created by the driver: resolve it here; the local (spill) directory
    # is left as written, so that `$TMPDIR` expands on the compute node inside the job
    if isinstance(kwargs.get("log_directory"), str):
        expanded = os.path.expandvars(kwargs["log_directory"])
        if "$" in expanded:
            raise ConfigError(f"log_directory {kwargs['log_directory']!r}: an environment "
                              "variable in it is not set here (the driver creates it)")
        kwargs["log_directory"] = str(Path(expanded).expanduser().resolve())
    options = dict(kwargs.get("scheduler_options") or {})
    options.setdefault("dashboard_address", DEFAULT_DASHBOARD)
    kwargs["scheduler_options"] = options
    return kwargs


def slurm_cluster(profile: dict[str, Any]) -> Any:
    """Build (without starting jobs) a :class:`dask_jobqueue.SLURMCluster` from a profile."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**_cluster_kwargs(profile))


def slurm_job_script(profile: dict[str, Any], *,
                     scheduler: str = "tcp://127.0.0.1:8786") -> str:
    """Return the batch script a profile's jobs would run (no scheduler is started)."""
    from dask_jobqueue.slurm import SLURMJob

    kwargs = _cluster_kwargs(profile)
    kwargs.pop("scheduler_options")
    kwargs.setdefault("name", "daskdiff-worker")
    return SLURMJob(scheduler=scheduler, **kwargs).job_script()


def adapt_bounds(profile: dict[str, Any], workers: int | None = None) -> tuple[int, int]:
    """Return (minimum_jobs, maximum_jobs): the profile's, ``workers`` capping the maximum."""
    adapt = profile.get("adapt") or {}
    maximum = adapt.get("maximum_jobs", 1) if workers is None else workers
    minimum = min(adapt.get("minimum_jobs", 1), maximum)
    return minimum, maximum


@contextlib.contextmanager
def open_cluster(spec: str = "local", *, workers: int | None = None,
                 timeout: float = 10.0) -> Iterator[ClusterHandle]:
    """Open the cluster named by ``spec`` for the duration of a ``with`` block.

    Parameters
    ----------
    spec : str
        ``sync``, ``local``, ``tcp://HOST:PORT`` or ``slurm:PROFILE``.
    workers : int, optional
        Local workers (default: one per core) or, for Slurm, the maximum number of jobs.
    timeout : float, optional
        Seconds to wait for an existing scheduler.

    Raises
    ------
    ConfigError
        An unknown spec, a bad profile, or an unreachable scheduler address.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if spec == "sync":
        yield ClusterHandle(None, None, None)
        return
    from distributed import Client, LocalCluster

    if spec == "local":
        n_workers = workers or os.cpu_count() or 1
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1,
                               dashboard_address="127.0.0.1:0", processes=True)
        with cluster, Client(cluster) as client:
            yield ClusterHandle(client, cluster, client.dashboard_link, n_workers)
        return
    if spec.startswith("tcp://"):
        try:
            client = Client(spec, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise ConfigError(f"cannot reach the Dask scheduler at {spec} ({error}); check the "
                              "address, or use --cluster local") from None
        with client:
            yield ClusterHandle(client, None, client.dashboard_link)
        return
    if spec.startswith("slurm:"):
        profile = load_profile(spec.removeprefix("slurm:"))
        minimum, maximum = adapt_bounds(profile, workers)
        cluster = slurm_cluster(profile)
        # adapt, not scale: adapt resubmits jobs that Slurm lost (scancel, walltime, node)
        cluster.adapt(minimum_jobs=minimum, maximum_jobs=maximum)
        per_job = int(profile.get("processes") or 1)
        with cluster, Client(cluster) as client:
            yield ClusterHandle(client, cluster, client.dashboard_link, maximum * per_job)
        return
    raise ConfigError(f"unknown --cluster {spec!r}; use sync, local, tcp://HOST:PORT or "
                      "slurm:PROFILE")
