"""Benchmark of the simulator: time (and peak memory) of one preset, per stage.

Usage::

    .venv/bin/python benchmarks/bench_simulate.py --preset demo [--workers 2] [--keep]

It reports the time to plan the campaign, to render one calexp and one coadd patch (in this
process), the time of the whole ``simulate`` run into a temporary repository, and the size of
the repository, as one JSON line. It uses every core it is given: do not run it beside other
benchmarks.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from daskdiff.simulate import get_preset, plan_campaign, render_exposure, simulate
from daskdiff.simulate.campaign import _coadd_task


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.returncode == 0 else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the repository")
    args = parser.parse_args()
    config = get_preset(args.preset, seed=args.seed)
    result: dict[str, object] = {"preset": args.preset, "seed": args.seed}
    start = time.perf_counter()
    plan = plan_campaign(config)
    result["plan_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    render_exposure(config, plan.visits[0], plan.detectors[0], plan.catalog)
    result["one_calexp_render_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    _coadd_task(plan, *next(iter(plan.patches)))
    result["one_coadd_render_s"] = round(time.perf_counter() - start, 2)
    root = Path(tempfile.mkdtemp(prefix="bench-simulate-")) / "repo"
    start = time.perf_counter()
    summary = simulate(root, config, num_workers=args.workers)
    result["simulate_s"] = round(time.perf_counter() - start, 2)
    result["n_calexps"] = summary.n_calexps
    result["n_coadds"] = summary.n_coadds
    result["n_dcr_coadds"] = summary.n_dcr_coadds
    result["repository_bytes"] = _du(root)
    result["driver_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    if not args.keep:
        shutil.rmtree(root.parent, ignore_errors=True)
    else:
        result["repository"] = str(root)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
