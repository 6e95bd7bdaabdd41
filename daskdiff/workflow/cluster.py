"""Where a campaign runs: no cluster, a LocalCluster, an existing scheduler, or Slurm.

``--cluster`` specs:

- ``sync``: no cluster; Dask's synchronous scheduler (debugging).
- ``local`` (default): a :class:`distributed.LocalCluster` sized to the machine, its dashboard
  bound to localhost.
- ``tcp://HOST:PORT``: an existing scheduler.
- ``slurm:PROFILE``: :class:`dask_jobqueue.SLURMCluster` configured by
  ``deploy/slurm/PROFILE.yaml`` (or a path to a YAML profile), adapting between the profile's
  minimum and maximum number of jobs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["ClusterHandle", "load_profile", "open_cluster", "slurm_cluster", "slurm_job_script"]

#: Where the shipped profiles live (the checkout's deploy/slurm).
PROFILE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "slurm"

_SLURM_KEYS = {
    "account", "queue", "cores", "processes", "memory", "walltime", "interface",
    "local_directory", "job_extra_directives", "job_script_prologue", "worker_extra_args",
    "scheduler_options", "job_cpu", "job_mem", "python", "death_timeout", "name",
}


@dataclass
class ClusterHandle:
    """An open cluster: the client (None for ``sync``), the cluster object, the dashboard."""

    client: Any
    cluster: Any
    dashboard_link: str | None


def load_profile(name: str) -> dict[str, Any]:
    """Read a Slurm profile by name (``deploy/slurm/NAME.yaml``) or path.

    Raises
    ------
    ConfigError
        If the profile does not exist or holds unknown keys.
    """
    path = Path(name)
    if not path.suffix:
        path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"Slurm profile {name!r} not found ({path}); shipped profiles: "
                          f"{known}, or give a path to a YAML profile")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - _SLURM_KEYS - {"adapt"}
    if unknown:
        raise ConfigError(f"{path}: unknown profile keys {sorted(unknown)}; known: "
                          f"{sorted(_SLURM_KEYS | {'adapt'})}")
    return data


def slurm_cluster(profile: dict[str, Any]) -> Any:
    """Build (without starting jobs) a :class:`dask_jobqueue.SLURMCluster` from a profile."""
    from dask_jobqueue import SLURMCluster

    kwargs = {k: v for k, v in profile.items() if k != "adapt" and v is not None}
    if isinstance(kwargs.get("local_directory"), str):
        kwargs["local_directory"] = os.path.expandvars(kwargs["local_directory"])
    return SLURMCluster(**kwargs)


def slurm_job_script(profile: dict[str, Any], *,
                     scheduler: str = "tcp://127.0.0.1:8786") -> str:
    """Return the batch script a profile's jobs would run (no scheduler is started)."""
    from dask_jobqueue.slurm import SLURMJob

    kwargs = {k: v for k, v in profile.items()
              if k not in ("adapt", "scheduler_options") and v is not None}
    if isinstance(kwargs.get("local_directory"), str):
        kwargs["local_directory"] = os.path.expandvars(kwargs["local_directory"])
    return SLURMJob(scheduler=scheduler, name="daskdiff-worker", **kwargs).job_script()


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
        cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                               dashboard_address="127.0.0.1:0", processes=True)
        with cluster, Client(cluster) as client:
            yield ClusterHandle(client, cluster, client.dashboard_link)
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
        adapt = dict(profile.get("adapt") or {})
        if workers is not None:
            adapt["maximum_jobs"] = workers
        cluster = slurm_cluster(profile)
        cluster.adapt(minimum_jobs=adapt.get("minimum_jobs", 1),
                      maximum_jobs=adapt.get("maximum_jobs", 1))
        with cluster, Client(cluster) as client:
            yield ClusterHandle(client, cluster, client.dashboard_link)
        return
    raise ConfigError(f"unknown --cluster {spec!r}; use sync, local, tcp://HOST:PORT or "
                      "slurm:PROFILE")
