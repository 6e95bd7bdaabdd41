"""Benchmark: detection and measurement of a 4096 x 4096 difference with 200 sources.

Target (issue 6): at most 3 s on one core. Run with ``python benchmarks/bench_detect.py``;
prints the wall and CPU time of :func:`daskdiff.detect.detect_and_measure` (best of
``--repeat``), with and without the science / matched images (forced photometry). The compiled
(numba) kernels are warmed up first on a small image; that one-time cost (compilation, or
loading from numba's on-disk cache) is printed separately.
"""

from __future__ import annotations

import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dask  # noqa: E402
import numpy as np  # noqa: E402

from daskdiff.detect import DetectAndMeasureConfig, detect_and_measure  # noqa: E402
from daskdiff.exposure import make_exposure  # noqa: E402
from daskdiff.psf import GaussianPsf  # noqa: E402


def make_difference(size: int = 4096, n_sources: int = 200, *, seed: int = 1):
    """Return (science, matched, difference) with ``n_sources`` PSF sources of both signs."""
    rng = np.random.default_rng(seed)
    psf = GaussianPsf(sigma=2.0)
    noise = 5.0
    diff = rng.standard_normal((size, size)).astype(np.float32) * noise
    sci = rng.standard_normal((size, size)).astype(np.float32) * noise
    xs = rng.uniform(40, size - 40, n_sources)
    ys = rng.uniform(40, size - 40, n_sources)
    fluxes = rng.uniform(500, 5000, n_sources) * np.where(rng.random(n_sources) < 0.5, -1, 1)
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        stamp, box = psf.image(x, y)
        diff[box.y0:box.y1, box.x0:box.x1] += f * stamp
    variance = np.full((size, size), noise**2, np.float32)
    kw = {"psf": psf, "chunks": None}
    difference = make_exposure(diff, variance=variance, **kw)
    science = make_exposure(sci, variance=variance, **kw)
    return science, science, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    config = DetectAndMeasureConfig()
    with dask.config.set(scheduler="synchronous"):
        start, cpu = time.perf_counter(), time.process_time()
        small = make_difference(256, 5)
        detect_and_measure(small[0], small[1], small[2], config=config)
        print(f"warm-up (numba compile or cache load, 256^2 image): "
              f"{time.perf_counter() - start:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")
    science, matched, difference = make_difference(args.size, args.sources)
    with dask.config.set(scheduler="synchronous"):
        for label, sci, mat in (("difference only", None, None),
                                ("with forced photometry", science, matched)):
            times, cpus = [], []
            for _ in range(args.repeat):
                start, cpu = time.perf_counter(), time.process_time()
                catalog = detect_and_measure(sci, mat, difference, config=config)
                times.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
            real = catalog.num_rows - int(np.sum(catalog["sky_source"].to_numpy()))
            print(f"{args.size}^2, {args.sources} sources, {label}: best {min(times):.2f} s "
                  f"wall, {min(cpus):.2f} s CPU (wall runs "
                  f"{', '.join(f'{t:.2f}' for t in times)}); {real} detections + "
                  f"{catalog.num_rows - real} sky sources")


if __name__ == "__main__":
    main()
