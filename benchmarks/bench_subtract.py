"""Benchmark: Alard-Lupton subtraction of one 4096 x 4096 pair on one core.

Times the kernel fit + convolution + decorrelation (``subtract`` then computing the difference
planes with the synchronous scheduler) and reports the peak resident memory of the process
during each subtraction (the kernel's high-water mark, reset before each run, as the pipeline
measures a quantum; the inputs are already loaded, so the figure includes them). As the
pipeline does after every quantum, a full garbage collection separates the runs. Where
``hotpants`` is on PATH it runs it on the same pair and prints the time ratio.

A small pair is subtracted first (``--cold`` skips it) so that imports, numba caches and FFT
plans are loaded, as in a running pipeline; the best of ``--repeat`` runs is reported, with
wall and CPU seconds (the CPU figure is the robust one on a shared machine).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_subtract.py [--size 4096] [--tile 1024]``
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import dask
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scene import make_test_image

from daskdiff.subtract import subtract
from daskdiff.workflow.driver import PeakMemory


def _hotpants(science, template, workdir: Path) -> tuple[float, float] | None:
    """Run ``hotpants`` on the pair; return its wall and CPU seconds (None if absent)."""
    exe = shutil.which("hotpants")
    if exe is None:
        return None
    from astropy.io import fits

    paths = {}
    for name, exp in (("sci", science), ("tmpl", template)):
        paths[name] = workdir / f"{name}.fits"
        fits.writeto(paths[name], np.asarray(exp["image"].values, np.float32), overwrite=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([exe, "-inim", str(paths["sci"]), "-tmplim", str(paths["tmpl"]),
                    "-outim", str(workdir / "diff.fits"), "-n", "i", "-c", "t"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)


def _warm_up() -> float:
    """Run a small pair once: imports, numba caches and FFT plans, as in a running pipeline."""
    start = time.perf_counter()
    kwargs = dict(x_size=512, y_size=512, n_src=80, noise_level=5.0, flux_level=5000.0,
                  chunks=256)
    science, _ = make_test_image(psf_size=2.4, noise_seed=1, **kwargs)
    template, _ = make_test_image(psf_size=2.0, noise_seed=2, template_border=20, **kwargs)
    with dask.config.set(scheduler="synchronous"):
        result = subtract(science, template)
        dask.compute(result.difference["image"].data)
    return time.perf_counter() - start


def _run(science, template) -> tuple[float, float, float, float, int, int | None]:
    with dask.config.set(scheduler="synchronous"), PeakMemory() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        result = subtract(science, template)
        fit, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
        dask.compute(result.difference["image"].data, result.difference["variance"].data,
                     result.difference["mask"].data)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
        n_used = int(result.metadata["n_kernel_sources_used"])
        del result
    gc.collect()  # as run_quantum does after every quantum
    return fit, fit_cpu, total, total_cpu, n_used, memory.peak


def _rss() -> float:
    """Return the current resident memory in GiB (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--stars", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="no warm-up run first")
    args = parser.parse_args()
    warm = 0.0 if args.cold else _warm_up()
    kwargs = dict(x_size=args.size, y_size=args.size, n_src=args.stars, noise_level=5.0,
                  flux_level=5000.0, chunks=args.tile)
    science, _ = make_test_image(psf_size=2.4, noise_seed=6, **kwargs)
    template, _ = make_test_image(psf_size=2.0, noise_seed=7, template_border=20, **kwargs)
    science, template = science.persist(), template.persist()
    gc.collect()
    base = _rss()
    runs = [_run(science, template) for _ in range(max(args.repeat, 1))]
    fit, fit_cpu, total, total_cpu, n_used, _ = min(runs, key=lambda r: r[2])
    best_cpu = min(r[3] for r in runs)
    peaks = [r[5] / 2**30 for r in runs if r[5] is not None]
    peak = max(peaks) if peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.size}^2 pair, best of {len(runs)} (warm-up {warm:.2f} s): kernel fit "
          f"{fit:.2f} s wall / {fit_cpu:.2f} s CPU, total {total:.2f} s wall / {total_cpu:.2f} s "
          f"CPU (best CPU {best_cpu:.2f} s; target <= 6 s); peak RSS {peak:.2f} GiB (runs: "
          f"{', '.join(f'{p:.2f}' for p in peaks)}; inputs loaded at {base:.2f} GiB; target "
          f"<= 2 GiB); kernel sources used {n_used}")
    with tempfile.TemporaryDirectory() as tmp:
        hp = _hotpants(science, template, Path(tmp))
    if hp is not None:
        print(f"hotpants {hp[0]:.2f} s wall / {hp[1]:.2f} s CPU: daskdiff is {hp[0] / total:.2f}x "
              f"faster in wall time, {hp[1] / best_cpu:.2f}x in CPU time")
    else:
        print("hotpants not on PATH: no comparison")


if __name__ == "__main__":
    main()
