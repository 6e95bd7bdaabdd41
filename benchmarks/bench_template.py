"""Benchmark: the template for one 4072 x 4000 LSST detector straddling two tracts.

Builds coadd patches (4000 px inner + 100 px border, random noise, a Gaussian PSF) for the
patches of two tracts that overlap the detector, in memory, then times ``assemble_template``
(patch merge per tract, Lanczos-3 warp onto the detector, tract merge, HIGH_VARIANCE) computed
with the synchronous scheduler (one core). Peak memory is the process's maximum RSS increase
during the computation. Run: ``.venv/bin/python benchmarks/bench_template.py``.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path

import dask
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tan_wcs

from daskdiff import Box, PhotoCalib, VisitInfo, load, make_exposure
from daskdiff.psf import GaussianPsf
from daskdiff.skymap import SkyMap
from daskdiff.template import GetTemplateConfig, assemble_template


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(width: int = 4072, height: int = 4000) -> None:
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
    rng = np.random.default_rng(1)
    patches: dict[int, list] = {}
    for tract_id, patch_id in wanted:
        tract = skymap[tract_id]
        box = tract.patch(patch_id).outer_box
        image = rng.normal(100.0, 1.0, box.shape).astype(np.float32)
        patches.setdefault(tract_id, []).append(make_exposure(
            image, variance=np.ones(box.shape, np.float32), x0=box.x0, y0=box.y0,
            wcs=tract.wcs, psf=GaussianPsf(sigma=1.5), photo_calib=PhotoCalib(1.0),
            visit_info=VisitInfo(band="g")))
    print(f"patches: {len(wanted)} in tracts {sorted(patches)}")
    config = GetTemplateConfig()
    before = _rss_mib()
    cpu = time.process_time()
    start = time.perf_counter()
    with dask.config.set(scheduler="synchronous"):
        template = assemble_template(science, patches, config=config)
        built = time.perf_counter()
        template = load(template)
    end = time.perf_counter()
    print(f"graph build: {built - start:.2f} s; compute (one core): {end - built:.2f} s; "
          f"total {end - start:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")
    print(f"peak RSS increase: {_rss_mib() - before:.0f} MiB (inputs held in memory: "
          f"{sum(p['image'].nbytes * 3 for g in patches.values() for p in g) / 2**20:.0f} MiB)")
    print(f"template {template.dd.box}, NO_DATA fraction "
          f"{float((template['mask'].values & (1 << 8) > 0).mean()):.3f}")


if __name__ == "__main__":
    main(*[int(v) for v in sys.argv[1:3]])
