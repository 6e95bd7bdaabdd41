"""Configuration of the Alard-Lupton subtraction stage (LSST ``AlardLuptonSubtractConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import StageConfig
from ..errors import ConfigError

__all__ = ["AlardLuptonConfig", "Mode"]

Mode = Literal["convolveTemplate", "convolveScience", "auto"]

_EXCLUDE = ("NO_DATA", "BAD", "SAT", "EDGE", "INJECTED", "HIGH_VARIANCE")


class AlardLuptonConfig(StageConfig):
    """Alard-Lupton PSF-matched subtraction (defaults of LSST's AlardLuptonSubtractTask)."""

    mode: Mode = Field("convolveTemplate", description="which image is convolved; 'auto' picks "
                       "convolveTemplate unless the template PSF is wider on both axes")
    kernel_basis: Literal["alard-lupton", "delta-function"] = Field(
        "alard-lupton", description="basis of the matching kernel")
    # Alard-Lupton basis
    n_gauss: int = Field(3, ge=1, le=5, description="number of Gaussians of the AL basis")
    deg_gauss: tuple[int, ...] = Field((4, 2, 2), description="polynomial degree per Gaussian")
    sig_gauss: tuple[float, ...] = Field((0.7, 1.5, 3.0),
                                         description="Gaussian sigmas (px) when PSFs are equal")
    gauss_beta: float = Field(2.0, gt=1.0, description="ratio of successive basis sigmas")
    min_sigma: float = Field(0.7, gt=0.0, description="smallest basis sigma (px)")
    min_sigma_deconv: float = Field(0.4, gt=0.0,
                                    description="smallest basis sigma when deconvolving (px)")
    scale_by_fwhm: bool = Field(True, description="derive basis sigmas from the PSF sizes")
    kernel_size_fwhm_scaling: float = Field(6.0, gt=0.0,
                                            description="kernel size = this x largest sigma")
    kernel_size_min: int = Field(21, ge=3, description="smallest kernel size (px, odd)")
    kernel_size_max: int = Field(35, ge=3, le=101, description="largest kernel size (px, odd)")
    kernel_size: int = Field(21, ge=3, le=101,
                             description="kernel size for config mode and the delta basis")
    regularization: float = Field(1e-4, ge=0.0, description="delta-function basis: "
                                  "Laplacian penalty relative to the mean normal-matrix diagonal")
    # fit
    fit_for_background: bool = Field(True, description="fit a differential background")
    correct_reference_noise: bool = Field(
        True, description="remove the convolved image's expected noise contribution from the "
        "kernel fit's normal equations (errors-in-variables): without it a noisy convolved "
        "image biases the kernel towards zero (too smooth, too small a sum); negligible for a "
        "deep template")
    spatial_kernel_order: int = Field(1, ge=0, le=3, description="Chebyshev order of the kernel")
    spatial_bg_order: int = Field(2, ge=0, le=4, description="Chebyshev order of the background")
    candidate_residual_mean_max: float = Field(0.25, gt=0.0,
                                               description="reject |mean chi| above this")
    candidate_residual_std_max: float = Field(1.5, gt=0.0, description="reject std chi above this")
    max_ksum_sigma: float = Field(3.0, gt=0.0, description="kernel-sum clipping (sigma)")
    min_sources_per_term: int = Field(5, ge=1, description="lower a spatial order until each "
                                      "polynomial term has this many kernel sources")
    max_spatial_iterations: int = Field(3, ge=1, le=10, description="spatial clipping passes")
    # kernel sources
    cell_size: int = Field(128, ge=16, description="cell edge (px) for spreading sources")
    n_star_per_cell: int = Field(5, ge=1, description="sources kept per cell")
    max_kernel_sources: int = Field(1000, ge=1, description="most kernel sources used")
    min_kernel_sources: int = Field(3, ge=1, description="fewer is an algorithm failure")
    source_snr_min: float = Field(10.0, gt=0.0, description="smallest PSF-flux S/N")
    source_snr_max: float = Field(500.0, gt=0.0, description="largest PSF-flux S/N")
    max_extendedness: float = Field(0.3, gt=0.0, description="largest relative excess of a "
                                    "source's weighted size over the PSF's (unresolved cut)")
    exclude_mask_planes: tuple[str, ...] = Field(
        _EXCLUDE, description="planes that must be clear in both images within a stamp")
    restrict_kernel_edge_sources: bool = Field(True, description="keep stamps a kernel size "
                                               "away from the image edge")
    # afterburners
    do_decorrelation: bool = Field(True, description="DMTN-021 decorrelation")
    do_scale_variance: bool = Field(True, description="rescale both variance planes first")
    scale_variance_limit: float = Field(10.0, gt=1.0, description="largest variance factor")
    subtract_background: bool = Field(False, description="subtract the fitted background")
    required_template_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                              description="no work below this coverage")
    min_template_fraction_for_expected_success: float = Field(
        0.2, ge=0.0, le=1.0, description="a failed fit below this coverage is no work")

    @model_validator(mode="after")
    def _check(self) -> AlardLuptonConfig:
        if len(self.deg_gauss) != self.n_gauss or len(self.sig_gauss) != self.n_gauss:
            raise ConfigError(
                f"deg_gauss {self.deg_gauss} and sig_gauss {self.sig_gauss} need n_gauss = "
                f"{self.n_gauss} entries each; give one degree and one sigma per Gaussian")
        if self.kernel_size_min > self.kernel_size_max:
            raise ConfigError(f"kernel_size_min {self.kernel_size_min} exceeds kernel_size_max "
                              f"{self.kernel_size_max}")
        if self.source_snr_min >= self.source_snr_max:
            raise ConfigError("source_snr_min must be below source_snr_max")
        return self
