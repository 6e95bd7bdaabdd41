"""Kernel fit: per-candidate least squares, clipping, and the spatial model.

For every kernel source a stamp of side ``2 * size + 1`` of the unconvolved ("target") image is
modelled as ``sum_i a_i (R * B_i) + b`` where ``R`` is the convolved ("reference") image and
``B_i`` the basis. All stamps are convolved with all bases at once (separable 1-D passes for
the Alard-Lupton basis, a batched FFT for the delta-function basis), and each
candidate is reduced to its normal equations plus the few sums needed to evaluate its residual
statistics analytically for *any* coefficient vector, so clipping and the spatial fit never
touch pixels again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import linalg, signal

from ..box import Box
from ..errors import AlgorithmError
from .basis import SeparableBasis, laplacian_penalty
from .config import AlardLuptonConfig
from .kernel import KernelSolution, chebyshev_terms, n_terms, scaled_position

__all__ = ["CandidateSystems", "build_systems", "fit_kernel", "noise_gram",
           "regularisation_penalty", "solve_candidates"]

_BATCH = 64


@dataclass
class CandidateSystems:
    """Per-candidate normal equations and residual sums (``c`` candidates, ``m`` unknowns)."""

    x: np.ndarray          # (c,) parent x of the stamp centres
    y: np.ndarray          # (c,)
    normal: np.ndarray     # (c, m, m)  A A^T with the constant weight folded in
    rhs: np.ndarray        # (c, m)     A s, weighted
    chi_normal: np.ndarray  # (c, m, m) A diag(1/v) A^T
    chi_rhs: np.ndarray    # (c, m)     A s / v
    chi_ss: np.ndarray     # (c,)       sum s^2 / v
    chi_sum_a: np.ndarray  # (c, m)     sum A / sqrt(v)
    chi_sum_s: np.ndarray  # (c,)       sum s / sqrt(v)
    n_pix: int
    # the expected reference-noise part of candidate k's normal matrix is
    # noise_scale[k] * noise_gram (both None without a noise model)
    noise_scale: np.ndarray | None = None  # (c,)
    noise_gram: np.ndarray | None = None   # (m, m)

    def residual_stats(self, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean and std of ``(s - A a) / sqrt(v)`` per candidate."""
        mean = (self.chi_sum_s - np.einsum("cm,cm->c", self.chi_sum_a, coeffs)) / self.n_pix
        sq = (self.chi_ss - 2 * np.einsum("cm,cm->c", coeffs, self.chi_rhs)
              + np.einsum("cm,cmn,cn->c", coeffs, self.chi_normal, coeffs))
        var = np.maximum(sq / self.n_pix - mean**2, 0.0)
        return mean, np.sqrt(var)

    def subset(self, keep: np.ndarray) -> CandidateSystems:
        """Return the systems of the kept candidates."""
        return CandidateSystems(*(getattr(self, f)[keep] for f in (
            "x", "y", "normal", "rhs", "chi_normal", "chi_rhs", "chi_ss", "chi_sum_a",
            "chi_sum_s")), n_pix=self.n_pix,
            noise_scale=None if self.noise_scale is None else self.noise_scale[keep],
            noise_gram=self.noise_gram)


def _stamps(image: np.ndarray, origin: tuple[int, int], xs: np.ndarray, ys: np.ndarray,
            half: int) -> np.ndarray:
    ox, oy = origin
    side = 2 * half + 1
    out = np.empty((len(xs), side, side), dtype=np.float64)
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        r, c = int(y) - oy - half, int(x) - ox - half
        out[k] = image[r:r + side, c:c + side]
    return out


def _fft_design(r_img: np.ndarray, basis: np.ndarray, side: int) -> np.ndarray:
    """Return the valid convolutions of stamps with basis images (FFT), ``(c, n, p)``."""
    half = basis.shape[-1] // 2
    nfft = sfft.next_fast_len(r_img.shape[-1], real=True)
    basis_ft = sfft.rfft2(basis, s=(nfft, nfft))
    conv = sfft.irfft2(sfft.rfft2(r_img, s=(nfft, nfft))[:, None] * basis_ft[None],
                       s=(nfft, nfft))[..., 2 * half:2 * half + side, 2 * half:2 * half + side]
    return conv.reshape(len(r_img), basis.shape[0], -1)


def _band(kernels: np.ndarray, n: int, side: int) -> np.ndarray:
    """Return ``W (d, n, side)``: ``sum_u W[p, u, x] f[u]`` is the valid convolution of ``f``."""
    size = kernels.shape[0]
    w = np.zeros((kernels.shape[1], n, side), dtype=np.float32)
    flipped = kernels[::-1].T
    for x in range(side):
        w[:, x:x + size, x] = flipped
    w[np.abs(w) < 1e-30] = 0.0  # no subnormal float32 taps (far Gaussian wings): they are slow
    return w


def _separable_design(r_img: np.ndarray, basis: SeparableBasis, side: int) -> np.ndarray:
    """Return the valid convolutions of the stamps with the *raw* separable kernels.

    Each 1-D pass is one single-precision matrix product with a banded (Toeplitz) matrix (the
    stamps are float32 data: the passes lose nothing); the y pass is done only for the powers
    ``q`` that go with each ``p``. The result has shape ``(c, n_raw, side * side)``; the
    renormalising map ``basis.transform`` is applied to the normal equations instead.
    """
    c, n = r_img.shape[0], r_img.shape[1]
    stamps = np.ascontiguousarray(r_img.transpose(1, 0, 2), dtype=np.float32).reshape(n * c, n)
    raw = np.empty((c, len(basis.gauss), side, side), dtype=np.float32)
    for g, kx in enumerate(basis.kx):
        w = _band(kx, n, side)                                     # (p, u, x)
        for p in range(kx.shape[1]):
            sel = np.flatnonzero((basis.gauss == g) & (basis.px == p))
            rows = (stamps @ w[p]).reshape(n, c * side)            # (Y, c, x)
            wy = w[basis.py[sel]].transpose(0, 2, 1).reshape(len(sel) * side, n)  # (q, y, Y)
            both = (wy @ rows).reshape(len(sel), side, c, side)   # (q, y, c, x)
            raw[:, sel] = both.transpose(2, 0, 1, 3)
    return raw.reshape(c, len(basis.gauss), -1)


def build_systems(target: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                  xs: np.ndarray, ys: np.ndarray, basis: np.ndarray | SeparableBasis, *,
                  fit_background: bool, reference_noise: np.ndarray | None = None
                  ) -> CandidateSystems:
    """Convolve every reference stamp with every basis and reduce to normal equations.

    Parameters
    ----------
    target, reference : dict
        ``image``, ``variance`` (numpy, whole images) and ``origin`` ``(x0, y0)``.
    xs, ys : numpy.ndarray
        Integer parent positions of the stamp centres; stamps must lie inside both images.
    basis : numpy.ndarray or SeparableBasis
        ``(n_basis, size, size)`` basis images, or a separable AL basis.
    fit_background : bool
        Add a constant column (the local differential background).
    reference_noise : numpy.ndarray, optional
        The reference image's pixel-noise autocovariance in units of its variance plane
        (:func:`~daskdiff.subtract.variance.noise_covariance`). When given, each candidate's
        expected noise contribution to its normal matrix is stored as ``noise_scale`` times
        ``noise_gram`` (see :func:`noise_gram`), for the errors-in-variables correction of
        the spatial fit.
    """
    separable = isinstance(basis, SeparableBasis)
    size = basis.kx[0].shape[0] if separable else basis.shape[-1]
    nb = len(basis.gauss) if separable else basis.shape[0]
    half = size // 2
    hs = size  # stamp half-side: the stamp is 2 * size + 1 wide
    side = 2 * hs + 1
    m = nb + (1 if fit_background else 0)
    transform = np.eye(m)
    if separable:
        transform[:nb, :nb] = basis.transform
    c = len(xs)
    out = {k: [] for k in ("normal", "rhs", "chi_normal", "chi_rhs", "chi_ss", "chi_sum_a",
                           "chi_sum_s", "noise_scale")}
    for start in range(0, c, _BATCH):
        sl = slice(start, start + _BATCH)
        s_img = _stamps(target["image"], target["origin"], xs[sl], ys[sl], hs)
        s_var = _stamps(target["variance"], target["origin"], xs[sl], ys[sl], hs)
        r_img = _stamps(reference["image"], reference["origin"], xs[sl], ys[sl], hs + half)
        r_var = _stamps(reference["variance"], reference["origin"], xs[sl], ys[sl], hs)
        design = (_separable_design(r_img, basis, side) if separable
                  else _fft_design(r_img, basis, side))
        nc = len(s_img)
        # rows: the design, the background column, then the data (one product gives all sums)
        rows = np.empty((nc, m + 1, side * side))
        rows[:, :nb] = design
        if fit_background:
            rows[:, nb] = 1.0
        rows[:, m] = s_img.reshape(nc, -1)
        v = np.maximum((s_var + r_var).reshape(nc, -1), 1e-30)
        weight = 1.0 / np.median(v, axis=1)
        inv_sigma = np.sqrt(1.0 / v)
        scaled = rows * inv_sigma[:, None, :]
        plain = np.empty((nc, m + 1, m + 1))
        chi = np.empty((nc, m + 1, m + 1))
        for k in range(nc):  # X @ X.T is a symmetric rank-k update (BLAS syrk)
            plain[k] = rows[k] @ rows[k].T
            chi[k] = scaled[k] @ scaled[k].T
        sums = scaled.sum(axis=2)
        out["normal"].append(plain[:, :m, :m] * weight[:, None, None])
        if reference_noise is not None:  # median of every 4th pixel: cheap
            out["noise_scale"].append(weight * side * side
                                      * np.median(r_var.reshape(nc, -1)[:, ::4], axis=1))
        out["rhs"].append(plain[:, :m, m] * weight[:, None])
        out["chi_normal"].append(chi[:, :m, :m])
        out["chi_rhs"].append(chi[:, :m, m])
        out["chi_ss"].append(chi[:, m, m])
        out["chi_sum_a"].append(sums[:, :m])
        out["chi_sum_s"].append(sums[:, m])
    noise_scale = out.pop("noise_scale")
    arrays = {k: (np.concatenate(v) if v else np.zeros((0, m, m) if "normal" in k else (0, m)))
              for k, v in out.items()}
    if separable:  # from the raw kernels to the renormalised basis
        for key in ("normal", "chi_normal"):
            arrays[key] = np.matmul(np.matmul(transform, arrays[key]), transform.T)
        for key in ("rhs", "chi_rhs", "chi_sum_a"):
            arrays[key] = arrays[key] @ transform.T
    if reference_noise is not None:
        gram = np.zeros((m, m))
        gram[:nb, :nb] = noise_gram(basis.images() if separable else basis, reference_noise)
        arrays["noise_scale"] = np.concatenate(noise_scale) if noise_scale else np.zeros(0)
        arrays["noise_gram"] = gram
    return CandidateSystems(x=np.asarray(xs, float), y=np.asarray(ys, float), n_pix=side * side,
                            **arrays)


def noise_gram(basis: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """Return ``G_ij = sum_{q, q'} B_i(q) B_j(q') C(q' - q)`` for basis images ``B``.

    Convolving a reference stamp whose noise has autocovariance ``sigma^2 C`` with the basis
    adds, in expectation, ``n_pix sigma^2 G`` to the (unweighted) normal matrix ``A A^T`` of
    the fit: noise in the regressors, which biases the kernel towards zero (regression
    dilution) unless the reference is much deeper than the target.
    """
    correlated = np.stack([signal.correlate(b, covariance, mode="same") for b in basis])
    gram = np.tensordot(basis, correlated, axes=([1, 2], [1, 2]))
    return 0.5 * (gram + gram.T)


def solve_candidates(systems: CandidateSystems, penalty: np.ndarray | None) -> np.ndarray:
    """Return each candidate's own least-squares coefficients, ``(c, m)``.

    ``penalty`` (``(m, m)``, or ``None``) is a regularisation matrix scaled by the mean diagonal
    of each candidate's normal matrix (see :func:`regularisation_penalty`).
    """
    normal = systems.normal
    if penalty is not None:
        scale = np.trace(normal, axis1=1, axis2=2) / normal.shape[1]
        normal = normal + scale[:, None, None] * penalty[None]
    ridge = 1e-12 * np.trace(normal, axis1=1, axis2=2)[:, None, None] * np.eye(normal.shape[1])
    return np.linalg.solve(normal + ridge, systems.rhs[..., None])[..., 0]


def regularisation_penalty(basis: np.ndarray, n_unknowns: int, *, config: AlardLuptonConfig
                           ) -> np.ndarray | None:
    """Return the delta-function basis's Laplacian penalty on ``n_unknowns`` unknowns.

    ``None`` for the Alard-Lupton basis or without regularisation.
    """
    if config.kernel_basis != "delta-function" or config.regularization <= 0:
        return None
    nb = basis.shape[0]
    penalty = np.zeros((n_unknowns, n_unknowns))
    penalty[:nb, :nb] = config.regularization * laplacian_penalty(basis.shape[-1])
    return penalty


def _clipped_stats(values: np.ndarray, *, nsigma: float = 3.0, n_iter: int = 3
                   ) -> tuple[float, float]:
    keep = np.isfinite(values)
    for _ in range(n_iter):
        mean, std = np.mean(values[keep]), np.std(values[keep])
        new = keep & (np.abs(values - mean) <= nsigma * std + 1e-12)
        if new.sum() == keep.sum() or new.sum() < 2:
            break
        keep = new
    return float(np.mean(values[keep])), float(np.std(values[keep]))


def _design_map(systems: CandidateSystems, nb: int, box: Box, kernel_order: int,
                bg_order: int | None) -> np.ndarray:
    """Return Phi ``(c, m, n_par)`` mapping global parameters to per-candidate coefficients."""
    xs, ys = scaled_position(box, systems.x, systems.y)
    kt = chebyshev_terms(kernel_order, xs, ys).T  # (c, nt)
    nt = kt.shape[1]
    nbg = 0 if bg_order is None else n_terms(bg_order)
    m = nb + (1 if bg_order is not None else 0)
    npar = 1 + (nb - 1) * nt + nbg
    phi = np.zeros((len(xs), m, npar))
    phi[:, 0, 0] = 1.0
    for i in range(1, nb):
        phi[:, i, 1 + (i - 1) * nt:1 + i * nt] = kt
    if bg_order is not None:
        phi[:, nb, 1 + (nb - 1) * nt:] = chebyshev_terms(bg_order, xs, ys).T
    return phi


#: The noise correction amplifies no direction of the solution more than this (directions in
#: which the reference noise carries more than half the normal matrix are noise-dominated).
_MAX_NOISE_BOOST = 2.0


def _corrected_solve(normal: np.ndarray, noise: np.ndarray, rhs: np.ndarray
                     ) -> tuple[np.ndarray, float] | None:
    """Solve ``(normal - noise) theta = rhs`` with bounded amplification, or ``None``.

    In the basis that whitens ``normal`` (``normal = L L^T``), the noise is
    ``L^-1 noise L^-T = U diag(f) U^T`` with ``f`` the noise fraction of each direction; the
    exact correction divides each component by ``1 - f``, here capped at
    :data:`_MAX_NOISE_BOOST`. Returns the solution and the largest noise fraction; ``None`` if
    ``normal`` is not positive definite.
    """
    try:
        lower = np.linalg.cholesky(normal)
    except np.linalg.LinAlgError:
        return None
    half = linalg.solve_triangular(lower, noise, lower=True)
    whitened = linalg.solve_triangular(lower, half.T, lower=True)
    fraction, vectors = np.linalg.eigh(0.5 * (whitened + whitened.T))
    gain = 1.0 / np.maximum(1.0 - fraction, 1.0 / _MAX_NOISE_BOOST)
    y = linalg.solve_triangular(lower, rhs, lower=True)
    theta = linalg.solve_triangular(lower.T, vectors @ (gain * (vectors.T @ y)), lower=False)
    return theta, float(fraction.max())


def _spatial_solve(systems: CandidateSystems, phi: np.ndarray, penalty: np.ndarray | None,
                   nb: int, nt: int, *, correct_noise: bool
                   ) -> tuple[np.ndarray, float, float | None]:
    """Solve for the global parameters.

    Returns the parameters, the condition number and the largest noise fraction seen by the
    reference-noise correction (``None`` if it was not applied).
    """
    npar = phi.shape[2]
    flat_phi = phi.reshape(-1, npar)
    normal = flat_phi.T @ np.matmul(systems.normal, phi).reshape(-1, npar)
    rhs = flat_phi.T @ systems.rhs.reshape(-1)
    if penalty is not None:
        full = np.zeros_like(normal)
        pen = np.kron(penalty[1:nb, 1:nb], np.eye(nt))
        full[1:1 + pen.shape[0], 1:1 + pen.shape[0]] = pen
        full[0, 0] = penalty[0, 0]
        normal = normal + np.trace(normal) / normal.shape[0] * full
    cond = float(np.linalg.cond(normal))
    if correct_noise and systems.noise_scale is not None:
        scaled = systems.noise_scale[:, None, None] * np.matmul(systems.noise_gram, phi)
        noise = flat_phi.T @ scaled.reshape(-1, npar)
        solved = _corrected_solve(normal, noise, rhs)
        if solved is not None:
            return solved[0], cond, solved[1]
    theta = np.linalg.lstsq(normal, rhs, rcond=1e-13)[0]
    return theta, cond, None


def _affordable_order(order: int, n_candidates: float, per_term: int) -> int:
    """Return the highest order <= ``order`` with ``per_term`` candidates per spatial term.

    A spatial polynomial with as many terms as candidates interpolates them exactly and is
    unconstrained in between (LSST only warns); lowering the order keeps the model determined.
    ``n_candidates`` may be an effective (information-weighted) count,
    :func:`effective_count`.
    """
    while order > 0 and n_terms(order) * per_term > n_candidates:
        order -= 1
    return order


def effective_count(information: np.ndarray) -> float:
    """Return the effective number of candidates, ``(sum w)^2 / sum w^2`` (Kish).

    ``w`` is each candidate's weight in the spatial fit (the trace of its block of the normal
    matrix, about ``(S/N)^2`` for the kernel). Kernel sources span S/N 10 to 500, a factor of
    2500 in weight, so a field with two S/N-400 stars and twenty S/N-20 ones is, for the
    spatial terms, a two-candidate fit: the gradients are then set by the faint stars' noise
    and swing far off wherever the bright ones are not (issue #5: a 20 % ring around a bright
    star 700 px from the two stars that carried the fit).
    """
    w = np.clip(np.asarray(information, dtype=float), 0.0, None)
    total = float(w.sum())
    return total**2 / float((w**2).sum()) if total > 0 else 0.0


def _fail(message: str, counts: dict[str, int]) -> None:
    raise AlgorithmError(f"kernel fit failed: {message} ({counts}); check that the images "
                         "overlap and contain at least a few unsaturated isolated stars",
                         metadata=counts)


def fit_kernel(systems: CandidateSystems, basis: np.ndarray, box: Box, *,
               config: AlardLuptonConfig, convolved: str
               ) -> tuple[KernelSolution, np.ndarray]:
    """Clip candidates and fit the spatially varying kernel (LSST ``PsfMatchTask._solve``).

    Returns
    -------
    solution : KernelSolution
        The spatial kernel and background.
    used : numpy.ndarray
        Boolean per candidate: kept by the clipping.

    Raises
    ------
    AlgorithmError
        Fewer than ``config.min_kernel_sources`` candidates survive the clipping.
    """
    nb = basis.shape[0]
    bg_order = config.spatial_bg_order if config.fit_for_background else None
    penalty = regularisation_penalty(basis, systems.normal.shape[1], config=config)
    counts = {"n_candidates": len(systems.x), "rejected_single": 0, "rejected_ksum": 0,
              "rejected_spatial": 0}
    keep = np.ones(len(systems.x), dtype=bool)
    while True:  # single-kernel and kernel-sum clipping until nothing changes
        if keep.sum() < config.min_kernel_sources:
            _fail("too few candidates survived the single-kernel clipping", counts)
        sub = systems.subset(keep)
        coeffs = solve_candidates(sub, penalty)
        mean, std = sub.residual_stats(coeffs)
        bad = (np.abs(mean) > config.candidate_residual_mean_max) | (
            std > config.candidate_residual_std_max) | ~np.isfinite(std)
        ksum = coeffs[:, 0] * basis[0].sum()
        good = ~bad
        if good.sum() >= 2:
            kmean, kstd = _clipped_stats(ksum[good])
            ks_bad = good & (np.abs(ksum - kmean) > config.max_ksum_sigma * kstd + 1e-9)
        else:
            ks_bad = np.zeros_like(bad)
        if not bad.any() and not ks_bad.any():
            break
        idx = np.flatnonzero(keep)
        counts["rejected_single"] += int(bad.sum())
        counts["rejected_ksum"] += int(ks_bad.sum())
        keep[idx[bad | ks_bad]] = False
    for iteration in range(config.max_spatial_iterations + 1):
        if keep.sum() < config.min_kernel_sources:
            _fail("too few candidates survived the spatial clipping", counts)
        per_term = config.min_sources_per_term
        sub = systems.subset(keep)
        n_kernel = effective_count(np.trace(sub.normal[:, :nb, :nb], axis1=1, axis2=2))
        k_order = _affordable_order(config.spatial_kernel_order, n_kernel, per_term)
        b_order = None if bg_order is None else _affordable_order(
            bg_order, effective_count(sub.normal[:, nb, nb]), per_term)
        nt = n_terms(k_order)
        phi = _design_map(sub, nb, box, k_order, b_order)
        theta, cond, corrected = _spatial_solve(sub, phi, penalty, nb, nt,
                                                correct_noise=config.correct_reference_noise)
        if iteration == config.max_spatial_iterations:
            break
        mean, std = sub.residual_stats(np.einsum("cip,p->ci", phi, theta))
        bad = (np.abs(mean) > config.candidate_residual_mean_max) | (
            std > config.candidate_residual_std_max)
        if not bad.any():
            break
        counts["rejected_spatial"] += int(bad.sum())
        keep[np.flatnonzero(keep)[bad]] = False
    npar_k = 1 + (nb - 1) * nt
    counts.update(n_used=int(keep.sum()), n_rejected=int((~keep).sum()))
    stats = {"condition_number": cond, **counts, "n_effective_kernel": n_kernel,
             "reference_noise_fraction": -1.0 if corrected is None else corrected,
             "kernel_order_used": k_order,
             "bg_order_used": b_order if b_order is not None else -1}
    solution = KernelSolution(basis=basis, constant=float(theta[0]),
                          spatial=theta[1:npar_k].reshape(nb - 1, nt),
                          background=theta[npar_k:], box=box,
                          kernel_order=k_order, bg_order=b_order if b_order is not None else 0,
                          convolved=convolved, stats=stats)
    return solution, keep
