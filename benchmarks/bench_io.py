"""Benchmark of exposure I/O: time and peak memory of writing, opening and loading.

For a 4072 x 4000 exposure (random image, variance and mask, a TAN-SIP WCS and a pixel PSF)
each step runs in a fresh Python process, which reports its wall time and its peak resident
memory (``getrusage`` maxrss) together with the increase over the process's memory just
before the step (after imports)::

    .venv/bin/python benchmarks/bench_io.py [--workdir DIR] [--tile 1024]

The exposure is built lazily (dask random tiles), as a pipeline product would be, so the
"write" steps include generating the pixels; the "generate" step measures that alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NY, NX = 4000, 4072
STEPS = ["generate", "write_fits", "open_fits", "load_fits", "write_zarr", "open_zarr",
         "load_zarr"]


def build_exposure(tile: int):
    import dask.array as da
    import numpy as np
    from astropy.wcs import WCS, Sip

    from daskdiff import Box, make_exposure
    from daskdiff.psf import GaussianPsf, PixelPsf

    rng = da.random.default_rng(42)
    image = rng.normal(1000.0, 30.0, (NY, NX), chunks=tile).astype(np.float32)
    variance = rng.uniform(800.0, 1000.0, (NY, NX), chunks=tile).astype(np.float32)
    mask = rng.integers(0, 2**16, (NY, NX), chunks=tile, dtype=np.uint32)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [53.1, -27.8]
    wcs.wcs.crpix = [NX / 2, NY / 2]
    wcs.wcs.cd = np.array([[-5.55e-5, 0.0], [0.0, 5.55e-5]])
    a = np.zeros((3, 3))
    a[2, 0] = 1e-7
    wcs.sip = Sip(a, np.zeros((3, 3)), None, None, wcs.wcs.crpix)
    basis = np.stack([GaussianPsf(sigma=s).kernel_image(0, 0, size=25) for s in (1.7, 2.2, 2.8)])
    psf = PixelPsf(basis * np.array([1.0, 0.05, -0.03])[:, None, None], Box(0, 0, NX, NY))
    return make_exposure(image, variance=variance, mask=mask, wcs=wcs, psf=psf, chunks=None)


def run_step(step: str, workdir: Path, tile: int) -> dict[str, float]:
    import dask

    from daskdiff import load
    from daskdiff.io import read_exposure, write_exposure

    exposure = build_exposure(tile) if step in ("generate", "write_fits", "write_zarr") else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    suffix = ".fits" if step.endswith("fits") else ".zarr"
    path = workdir / f"bench{suffix}"
    if step == "generate":
        dask.compute(*(exposure[name].data.sum() for name in ("image", "variance", "mask")))
    elif step.startswith("write"):
        write_exposure(exposure, path, overwrite=True)
    elif step.startswith("open"):
        opened = read_exposure(path, chunks=tile)
        assert opened.image.shape == (NY, NX)
    else:
        loaded = load(read_exposure(path, chunks=tile))
        assert loaded.image.values.shape == (NY, NX)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": elapsed, "peak_mib": peak / 1024, "increase_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # child process: one measurement
        print(json.dumps(run_step(args.step, args.workdir, args.tile)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_io_"))
    workdir.mkdir(parents=True, exist_ok=True)
    planes_mib = NY * NX * 12 / 2**20
    print(f"exposure {NX} x {NY}, tiles {args.tile}, planes {planes_mib:.0f} MiB in all; "
          f"files in {workdir}")
    print(f"{'step':<12}{'time (s)':>10}{'peak RSS (MiB)':>16}{'increase (MiB)':>16}")
    try:
        for step in STEPS:
            output = subprocess.run(
                [sys.executable, __file__, "--step", step, "--workdir", str(workdir),
                 "--tile", str(args.tile)], check=True, capture_output=True, text=True,
            ).stdout
            result = json.loads(output.strip().splitlines()[-1])
            print(f"{step:<12}{result['seconds']:>10.2f}{result['peak_mib']:>16.0f}"
                  f"{result['increase_mib']:>16.0f}")
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir()
                 else p.stat().st_size for p in workdir.iterdir()}
        print("sizes: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(sizes.items())))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
