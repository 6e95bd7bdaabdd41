"""Configuration of the DetectAndMeasure stage."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from ..config import StageConfig

__all__ = ["BAD_PEAK_PLANES", "DetectAndMeasureConfig", "PIXEL_FLAG_PLANES"]

#: Mask planes on which a detection peak is not trusted (the source is removed).
BAD_PEAK_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE")

#: Pixel-flag names and the mask planes they test ("anywhere in the footprint" and "centre").
PIXEL_FLAG_PLANES: dict[str, str] = {
    "edge": "EDGE",
    "nodata": "NO_DATA",
    "saturated": "SAT",
    "cr": "CR",
    "bad": "BAD",
    "interpolated": "INTRP",
    "suspect": "SUSPECT",
    "sat_template": "SAT_TEMPLATE",
    "high_variance": "HIGH_VARIANCE",
    "injected": "INJECTED",
    "injected_template": "INJECTED_TEMPLATE",
    "streak": "STREAK",
}


class DetectAndMeasureConfig(StageConfig):
    """Configuration of DetectAndMeasure (LSST's DetectAndMeasureTask defaults).

    Fluxes are measured in the difference's instrumental units (counts) and also reported in
    nJy through its photometric calibration.
    """

    threshold: float = Field(5.0, gt=0, description="detection threshold in sigma per pixel of "
                             "the PSF-smoothed difference (pixel_stdev)")
    n_sigma_to_grow: float = Field(2.4, ge=0, description="footprint growth radius in units of "
                                   "the PSF sigma (isotropic)")
    smoothing_width_sigma: float = Field(7.0, gt=0, description="width of the Gaussian "
                                         "smoothing kernel in PSF sigmas (odd, rounded)")
    do_subtract_background: bool = Field(True, description="fit and subtract the difference's "
                                         "background in two passes")
    background_bin_first: int = Field(8, ge=4, description="bin size (px) of the first, "
                                      "masking background pass")
    background_bin: int = Field(40, ge=4, description="bin size (px) of the final background")
    do_find_cosmic_rays: bool = Field(True, description="mask cosmic rays (CR plane)")
    cr_min_sigma: float = Field(6.0, gt=0, description="minimum significance of a CR pixel")
    cr_cond3_fac: float = Field(2.5, ge=0, description="noise allowance (sigma) of the "
                                "sharpness test: a CR pixel is sharper than the PSF by more "
                                "than this")
    max_cosmic_ray_fraction: float = Field(0.01, gt=0, le=1, description="more CR pixels than "
                                           "this fraction is an AlgorithmError")
    do_merge: bool = Field(True, description="merge overlapping positive and negative "
                           "footprints into one (dipole candidate) source")
    do_sky_sources: bool = Field(True, description="add sky sources at blank positions")
    n_sky_sources: int = Field(100, ge=0, description="number of sky sources")
    sky_source_radius: int = Field(8, ge=1, description="radius (px) of the blank disk needed "
                                   "around a sky source")
    sky_seed: int = Field(0, ge=0, description="seed of the sky-source positions (combined "
                          "with visit and detector)")
    aperture_radii: tuple[float, ...] = Field((12.0,), min_length=1, description="radii (px) "
                                              "of the circular aperture fluxes")
    do_dipole_fit: bool = Field(True, description="fit dipoles to merged +/- sources")
    dipole_max_footprint_area: int = Field(1200, ge=1, description="larger footprints are "
                                           "not dipole-fitted (flag)")
    dipole_max_separation: float = Field(5.0, gt=0, description="lobe centroid bound in PSF "
                                         "sigmas from its starting peak")
    dipole_rel_weight: float = Field(0.5, ge=0, description="weight of the science and "
                                     "template images in the joint dipole fit")
    dipole_min_sn: float = Field(5.0 * 2**0.5, ge=0, description="dipole classification: "
                                 "minimum signal-to-noise")
    dipole_max_flux_ratio: float = Field(0.65, gt=0, description="dipole classification: "
                                         "maximum lobe flux / (2 total flux)")
    do_forced_measurement: bool = Field(True, description="forced PSF flux on the science "
                                        "image and on the matched template")
    reject_bad_peaks: bool = Field(True, description="remove sources with a peak on NO_DATA, "
                                   "BAD, SAT or EDGE")
    bad_source_flags: tuple[str, ...] = Field(("offimage",), description="pixel flags "
                                              "(without the prefix) that remove a source")
    tile_size: int | None = Field(None, ge=64, description="tile edge of the tile-parallel "
                                  "detection; None keeps the input's chunks")

    @model_validator(mode="after")
    def _check(self) -> Self:
        known = {"offimage", *PIXEL_FLAG_PLANES, *(f"{k}_center" for k in PIXEL_FLAG_PLANES)}
        unknown = [flag for flag in self.bad_source_flags if flag not in known]
        if unknown:
            raise ValueError(f"unknown bad_source_flags {unknown}; known: {sorted(known)}")
        if self.background_bin < self.background_bin_first:
            raise ValueError("background_bin must be >= background_bin_first (the final "
                             "background is the smoother one)")
        return self
