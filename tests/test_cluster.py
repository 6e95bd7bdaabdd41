"""Cluster specs and Slurm profiles (job scripts are checked without a Slurm).

The tests that need a running Slurm are in ``test_slurm.py``.
"""

from __future__ import annotations

import pytest

from daskdiff import ConfigError
from daskdiff.workflow.cluster import (
    adapt_bounds,
    load_profile,
    open_cluster,
    slurm_cluster,
    slurm_job_script,
    slurm_walltime_seconds,
)


def _profile(tmp_path, text: str) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return str(path)


def test_perlmutter_job_script():
    profile = load_profile("perlmutter")
    script = slurm_job_script(profile)
    for line in ("#SBATCH -A m0000", "#SBATCH --qos=regular", "#SBATCH --constraint=cpu",
                 "#SBATCH -t 04:00:00", "#SBATCH --mem=0", "#SBATCH -J daskdiff-worker",
                 "--lifetime 225m", "--lifetime-stagger 5m", "--interface hsn0",
                 "--nworkers 32", "--nthreads 4", "--local-directory /tmp",
                 "module load python"):
        assert line in script, (line, script)
    # workers retire and their jobs end (adapt replaces them): no restart inside the job
    assert "--lifetime-restart" not in script
    assert profile["scheduler_options"]["dashboard_address"].startswith("127.0.0.1:")
    assert adapt_bounds(profile) == (1, 20)
    assert adapt_bounds(profile, workers=4) == (1, 4)


def test_local_slurm_profile_builds(tmp_path):
    profile = load_profile("local-slurm")
    profile["log_directory"] = str(tmp_path / "logs")
    cluster = slurm_cluster(profile)
    try:
        script = cluster.job_script()
        assert "#SBATCH -p debug" in script and "--interface lo" in script
        assert f"#SBATCH -o {tmp_path}/logs/" in script
        # scheduler and dashboard on the loopback interface only
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
    finally:
        cluster.close()


def test_dashboard_defaults_to_localhost(tmp_path):
    profile = load_profile(_profile(tmp_path, "cores: 1\nmemory: 1GB\ninterface: lo\n"))
    cluster = slurm_cluster(profile)
    try:
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
    finally:
        cluster.close()


def test_profile_errors(tmp_path):
    with pytest.raises(ConfigError, match="shipped profiles"):
        load_profile("nersc-typo")
    cases = {
        "cores: 4\ncoers: 2\n": "did you mean 'cores'",
        "cores: 4\nextra: ['--lifetime', '1h']\n": "old name; write worker_extra_args",
        "job_extra: ['--qos=debug']\n": "write job_extra_directives",
        "project: m0000\n": "write account",
        "adapt: {minimum_jobs: 3, maximum_jobs: 2}\n": "exceeds",
        "adapt: {maximum: 2}\n": "did you mean 'adapt.maximum_jobs'",
        "adapt: {maximum_jobs: two}\n": "non-negative integer",
        "walltime: '01:00:00'\nworker_extra_args: ['--lifetime', '58m', '--lifetime-stagger',"
        " '3m']\n": "must be shorter than the walltime",
        "walltime: 'soon'\nworker_extra_args: ['--lifetime', '5m']\n": "not a Slurm time",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_profile(_profile(tmp_path, text))
    # a lifetime with its stagger inside the walltime is fine
    load_profile(_profile(tmp_path, "walltime: '01:00:00'\nworker_extra_args: "
                                    "['--lifetime', '55m', '--lifetime-stagger', '4m']\n"))


def test_unset_variable_in_log_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("DASKDIFF_UNSET_FOR_TEST", raising=False)
    profile = load_profile(_profile(tmp_path, "cores: 1\nmemory: 1GB\n"
                                    "log_directory: $DASKDIFF_UNSET_FOR_TEST/logs\n"))
    with pytest.raises(ConfigError, match="not set"):
        slurm_job_script(profile)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("1-02", 93600),
    ("1-02:03", 93780), ("1-02:03:04", 93784),
])
def test_slurm_walltime_formats(text, seconds):
    assert slurm_walltime_seconds(text) == seconds


def test_unknown_spec_and_unreachable_scheduler():
    with pytest.raises(ConfigError, match="unknown --cluster"):
        with open_cluster("kubernetes"):
            pass
    with pytest.raises(ConfigError, match="cannot reach"):
        with open_cluster("tcp://127.0.0.1:9", timeout=2):
            pass
    with pytest.raises(ConfigError, match="--workers"):
        with open_cluster("local", workers=0):
            pass


def test_local_cluster_dashboard_on_localhost():
    with open_cluster("local", workers=1) as handle:
        assert handle.dashboard_link.startswith("http://127.0.0.1:")
        assert handle.max_workers == 1
        assert handle.client.submit(sum, [1, 2]).result() == 3
