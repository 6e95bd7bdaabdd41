"""``daskdiff subtract``: the one-shot command on written exposures and on real image pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner

from daskdiff.cli import main
from daskdiff.io import read_exposure, write_exposure
from daskdiff.subtract import KernelSolution

from .scene import make_test_image

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "data" / "real"


def _robust_std(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    q1, q3 = np.percentile(values, [25, 75])
    return float(0.7413 * (q3 - q1))


def test_cli_writes_products(tmp_path):
    science, _ = make_test_image(psf_size=2.4, noise_level=1.0, noise_seed=6, n_src=40,
                                 flux_level=2000.0)
    template, _ = make_test_image(psf_size=2.0, noise_level=1.0, noise_seed=7, n_src=40,
                                  flux_level=2000.0, template_border=20)
    write_exposure(science, tmp_path / "sci.fits")
    write_exposure(template, tmp_path / "tmpl.fits")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["subtract", str(tmp_path / "sci.fits"),
                                       str(tmp_path / "tmpl.fits"), "-o", str(out),
                                       "--set", "spatialKernelOrder=0"])
    assert result.exit_code == 0, result.output
    for name in ("difference.fits", "matched.fits", "kernel.fits", "diaSrc.parquet",
                 "summary.json"):
        assert (out / name).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["spatialKernelOrder"] == 0
    from daskdiff.detect import dia_source_schema, read_dia_sources

    catalog = read_dia_sources(out / "diaSrc.parquet")
    assert catalog.schema.names == dia_source_schema().names
    assert catalog.num_rows == summary["n_dia_sources"]
    # equal scenes apart from the seeing and noise: few or no real (non-sky) detections
    real = [not flag for flag in catalog.column("sky_source").to_pylist()]
    assert sum(real) <= 5, sum(real)
    assert abs(summary["residuals"]["robust_std_normalized"] - 1.0) < 0.05
    diff = read_exposure(out / "difference.fits", chunks=None)
    assert diff["image"].shape == science["image"].shape
    with fits.open(out / "kernel.fits") as hdul:
        assert abs(hdul[0].data.sum() - hdul[0].header["KSUM"]) < 1e-6
        assert hdul["BASIS"].data.shape[0] == summary["metadata"]["n_basis"]


def test_cli_rejects_bad_settings(tmp_path):
    science, _ = make_test_image()
    write_exposure(science, tmp_path / "sci.fits")
    result = CliRunner().invoke(main, ["subtract", str(tmp_path / "sci.fits"),
                                       str(tmp_path / "sci.fits"), "-o", str(tmp_path / "o"),
                                       "--set", "spatialKernelOrdr=2"])
    assert result.exit_code == 2
    assert "did you mean" in result.output


def test_kernel_solution_json_roundtrip():
    science, truth = make_test_image(psf_size=2.4, noise_level=1.0)
    template, _ = make_test_image(psf_size=2.0, noise_level=1.0, noise_seed=7,
                                  template_border=20)
    from daskdiff.subtract import subtract

    kernel = subtract(science, template, sources=truth).kernel
    again = KernelSolution.from_dict(json.loads(json.dumps(kernel.to_dict())))
    np.testing.assert_allclose(again.kernel_image(12400.0, 67950.0),
                               kernel.kernel_image(12400.0, 67950.0), rtol=1e-12)


# --- real pairs (skipped where ../shared is absent) -------------------------------------------

def _star_rms(snr: np.ndarray, xs: np.ndarray, ys: np.ndarray, radius: float) -> np.ndarray:
    ny, nx = snr.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    values = []
    for x, y in zip(xs, ys, strict=True):
        v = snr[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2]
        v = v[np.isfinite(v)]
        if v.size > 10:
            values.append(np.sqrt(np.mean(v**2)))
    return np.array(values)


def _bright_compact(path: Path, fwhm: float) -> tuple[np.ndarray, np.ndarray]:
    from daskdiff.subtract.sources import detect_sources

    exposure = read_exposure(path, chunks=None)
    image = exposure["image"].values.astype(float)
    variance = exposure["variance"].values.astype(float)
    found = detect_sources(image, variance, ~np.isfinite(image), origin=(0, 0),
                           psf_sigma=fwhm / 2.355, threshold=5.0)
    x, y = np.asarray(found["x"]), np.asarray(found["y"])
    xi, yi = np.round(x).astype(int), np.round(y).astype(int)
    snr = image[yi, xi] / np.sqrt(variance[yi, xi])
    ny, nx = image.shape
    keep = ((snr > 30) & (x > 20) & (x < nx - 20) & (y > 20) & (y < ny - 20)
            & ~np.asarray(found["blended"]))
    return x[keep], y[keep]


def _run_real(tmp_path: Path, science: Path, template: Path) -> tuple[Path, dict]:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["subtract", str(science), str(template), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "summary.json").read_text())


def _sky_normalised(out: Path) -> np.ndarray:
    with fits.open(out / "difference.fits") as hdul:
        snr = hdul["IMAGE"].data / np.sqrt(hdul["VARIANCE"].data)
        snr[(hdul["MASK"].data & ((1 << 4) | (1 << 8))) != 0] = np.nan
    return snr / _robust_std(snr)


@pytest.mark.real
@pytest.mark.slow
def test_decam_pair(tmp_path):
    folder = REAL / "sfft-decam-i-series"
    if not folder.exists():
        pytest.skip("../shared/data/real is absent")
    science = folder / "input" / "DEC-OBS04a.mini.fits"
    out, summary = _run_real(tmp_path, science, folder / "input" / "DEC-OBS18a.mini.fits")
    assert abs(summary["residuals"]["robust_std_normalized"] - 1.0) < 0.1
    ours = _sky_normalised(out)
    reference = fits.getdata(folder / "reference_output" / "FinalDifference.DeCorr.fits")
    reference = reference / _robust_std(reference)
    xs, ys = _bright_compact(science, 5.0)
    mine, theirs = _star_rms(ours, xs, ys, 10.0), _star_rms(reference, xs, ys, 10.0)
    # measured: median 1.055 (ours) vs 1.86 (sfft's decorrelated difference of the stacks)
    assert np.median(mine) <= np.median(theirs)


@pytest.mark.real
@pytest.mark.slow
def test_jwst_pair(tmp_path):
    folder = REAL / "sfft-jwst-nircam-a2744"
    if not folder.exists():
        pytest.skip("../shared/data/real is absent")
    stem = "nircam_clear-f200w_i2d_stamp"
    science = folder / "input" / f"jw02561001002-02561-o001_t003_{stem}.fits"
    template = folder / "input" / f"jw01324001001-01324-o001_t001_{stem}.fits"
    out, summary = _run_real(tmp_path, science, template)
    assert summary["metadata"]["n_kernel_sources_used"] >= 3
    ours = _sky_normalised(out)
    reference = fits.getdata(folder / "reference_output"
                             / f"jw02561001002-02561-o001_t003_{stem}.crossConvd.sfftdiff"
                               ".DeCorrelated.SNR.fits").astype(float)
    reference = reference / _robust_std(reference)
    xs, ys = _bright_compact(science, 2.5)
    mine, theirs = _star_rms(ours, xs, ys, 5.0), _star_rms(reference, xs, ys, 5.0)
    # measured: median 1.08 vs sfft's 1.18, worst 1.22 vs 2.56 (1.45 and 1.91 without the
    # reference-noise correction: the two epochs are about equally deep)
    assert np.median(mine) <= np.median(theirs)
    assert mine.max() <= theirs.max()
