"""Cluster specs and Slurm profiles (job scripts are checked without a Slurm)."""

from __future__ import annotations

import pytest

from daskdiff import ConfigError
from daskdiff.workflow.cluster import (
    load_profile,
    open_cluster,
    slurm_cluster,
    slurm_job_script,
)


def test_perlmutter_job_script():
    script = slurm_job_script(load_profile("perlmutter"))
    for line in ("#SBATCH -A m0000", "#SBATCH --qos=regular", "#SBATCH --constraint=cpu",
                 "#SBATCH -t 04:00:00", "--lifetime 225m", "--interface hsn0",
                 "module load python"):
        assert line in script, (line, script)


def test_local_slurm_profile_builds():
    cluster = slurm_cluster(load_profile("local-slurm"))
    try:
        assert "#SBATCH -p debug" in cluster.job_script()
    finally:
        cluster.close()


def test_profile_errors(tmp_path):
    with pytest.raises(ConfigError, match="shipped profiles"):
        load_profile("nersc-typo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cores: 4\ncoers: 2\n")
    with pytest.raises(ConfigError, match="unknown profile keys"):
        load_profile(str(bad))


def test_unknown_spec_and_unreachable_scheduler():
    with pytest.raises(ConfigError, match="unknown --cluster"):
        with open_cluster("kubernetes"):
            pass
    with pytest.raises(ConfigError, match="cannot reach"):
        with open_cluster("tcp://127.0.0.1:9", timeout=2):
            pass


def test_local_cluster_dashboard_on_localhost():
    with open_cluster("local", workers=1) as handle:
        assert handle.dashboard_link.startswith("http://127.0.0.1:")
        assert handle.client.submit(sum, [1, 2]).result() == 3
