"""Benchmark: the template for one 4072 x 4000 LSST detector straddling two tracts.

Builds coadd patches (4000 px inner + 100 px border, random noise, a Gaussian PSF) for the
patches of two tracts that overlap the detector, in memory, then times ``assemble_template``
(patch merge per tract, Lanczos-3 warp onto the detector, tract merge, HIGH_VARIANCE: all fused
into one task per output tile, then the HIGH_VARIANCE flagging) computed with the synchronous
scheduler (one core); ``finalize`` is dask's concatenation of the tiles into the loaded
arrays. The numba kernels are compiled (or loaded from numba's cache) by a small warm-up
template first, timed separately. Reported: the best of
``--repeats`` runs, wall and CPU seconds, the graph build and the compute, CPU seconds per
task kind (from a dask callback) and the process's peak RSS increase during the first run.
Run: ``.venv/bin/python benchmarks/bench_template.py [width height] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import dask
import numpy as np
from dask.callbacks import Callback
from dask.utils import key_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tan_wcs

from daskdiff import Box, PhotoCalib, VisitInfo, load, make_exposure
from daskdiff.psf import GaussianPsf
from daskdiff.skymap import SkyMap
from daskdiff.template import GetTemplateConfig, assemble_template

#: Task kinds (dask key prefixes) and the step they belong to.
STEPS = {
    "fill_cell": "cut/align tiles (regrid copies)",
    "regrid": "cut/align tiles (regrid copies)",
    "merge_block": "merge (patches per tract, then tracts)",
    "template_tile": "fused tile (merge, warp, tract merge, bin medians)",
    "warp_block": "warp (Lanczos-3, image + variance + mask)",
    "bin_medians": "HIGH_VARIANCE (bin medians)",
    "flag_block": "HIGH_VARIANCE (flagging)",
    "finalize": "concatenate tiles into the result (load)",
}


class StepTimer(Callback):
    """CPU seconds per task kind."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: dict[str, float] = defaultdict(float)
        self._began: dict[object, float] = {}

    def _pretask(self, key, dsk, state):
        self._began[key] = time.process_time()

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key_split(key)
        step = next((label for prefix, label in STEPS.items() if prefix in name), "other tasks")
        self.cpu[step] += time.process_time() - self._began.pop(key)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_inputs(width: int, height: int, *, seed: int = 1):
    """Science exposure and coadd patches (per tract) of a detector straddling two tracts."""
    dec0 = -30.0
    sep = 0.35
    dra = sep / math.cos(math.radians(dec0))
    skymap = SkyMap.discrete([(55.0, dec0), (55.0 + dra, dec0)], radius_deg=0.25,
                             pixel_scale_arcsec=0.2, tract_overlap_deg=0.02)
    det = Box(0, 0, width, height)
    wcs = make_tan_wcs(ra=55.0 + dra / 2, dec=dec0, crpix=(width / 2, height / 2),
                       rotation_deg=12.0, sip=True)
    science = make_exposure(np.zeros(det.shape, np.float32), variance=np.ones(det.shape),
                            wcs=wcs, visit_info=VisitInfo(visit=1, detector=0, band="g"))
    wanted = skymap.find_patches(wcs, det.grow(20))
    rng = np.random.default_rng(seed)
    patches: dict[int, list] = {}
    for tract_id, patch_id in wanted:
        tract = skymap[tract_id]
        box = tract.patch(patch_id).outer_box
        image = rng.normal(100.0, 1.0, box.shape).astype(np.float32)
        patches.setdefault(tract_id, []).append(make_exposure(
            image, variance=np.ones(box.shape, np.float32), x0=box.x0, y0=box.y0,
            wcs=tract.wcs, psf=GaussianPsf(sigma=1.5), photo_calib=PhotoCalib(1.0),
            visit_info=VisitInfo(band="g")))
    return science, patches, len(wanted)


def run_once(science, patches, config, *, timer: StepTimer | None = None) -> dict[str, float]:
    cpu = time.process_time()
    start = time.perf_counter()
    with dask.config.set(scheduler="synchronous"):
        template = assemble_template(science, patches, config=config)
        built_wall, built_cpu = time.perf_counter(), time.process_time()
        if timer is not None:
            with timer:
                template = load(template)
        else:
            template = load(template)
    end, end_cpu = time.perf_counter(), time.process_time()
    return {"build_wall": built_wall - start, "build_cpu": built_cpu - cpu,
            "compute_wall": end - built_wall, "compute_cpu": end_cpu - built_cpu,
            "wall": end - start, "cpu": end_cpu - cpu, "template": template}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="*", type=int, default=[4072, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    width, height = (args.size + [4072, 4000][len(args.size):])[:2]
    config = GetTemplateConfig()

    start = time.perf_counter()
    small_science, small_patches, _ = make_inputs(256, 256, seed=2)
    run_once(small_science, small_patches, config)
    print(f"warm-up (numba compilation or cache load, small template): "
          f"{time.perf_counter() - start:.2f} s")

    science, patches, n_patches = make_inputs(width, height)
    print(f"detector {width} x {height}; patches: {n_patches} in tracts {sorted(patches)}; "
          f"inputs held in memory: "
          f"{sum(p['image'].nbytes * 3 for g in patches.values() for p in g) / 2**20:.0f} MiB")
    runs = []
    for k in range(args.repeats):
        before = _rss_mib()
        timer = StepTimer()
        run = run_once(science, patches, config, timer=timer)
        run["peak"] = _rss_mib() - before
        run["steps"] = dict(timer.cpu)
        template = run.pop("template")
        runs.append(run)
        print(f"run {k + 1}: {run['wall']:.2f} s wall, {run['cpu']:.2f} s CPU (graph build "
              f"{run['build_wall']:.2f} s wall / {run['build_cpu']:.2f} s CPU, compute "
              f"{run['compute_wall']:.2f} s wall / {run['compute_cpu']:.2f} s CPU)")
        del template
    best = min(runs, key=lambda r: r["cpu"])
    print(f"best of {len(runs)}: {min(r['wall'] for r in runs):.2f} s wall, "
          f"{best['cpu']:.2f} s CPU; peak RSS increase (first run): {runs[0]['peak']:.0f} MiB")
    print("CPU seconds by step (best run):")
    print(f"  {'graph build':45s} {best['build_cpu']:6.2f}")
    for step, seconds in sorted(best["steps"].items(), key=lambda kv: -kv[1]):
        print(f"  {step:45s} {seconds:6.2f}")
    print(f"  {'scheduler overhead (compute - tasks)':45s} "
          f"{best['compute_cpu'] - sum(best['steps'].values()):6.2f}")


if __name__ == "__main__":
    main()
