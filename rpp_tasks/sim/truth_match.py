"""Matching a catalogue to the synthetic truth, and the noise figures the truth implies.

match_to_truth pairs detections with true stars (nearest within a radius, one-to-one);
robust_std is a clipped standard deviation corrected for the clipping; expected_aperture_error_adu
and pixelated_fwhm_px give what a perfect measurement would report. The per-bin fidelity report
built on them is rpp_tasks.sim.evaluate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

__all__ = [
    "TruthMatch",
    "match_to_truth",
    "robust_std",
    "expected_aperture_error_adu",
    "pixelated_fwhm_px",
]

_CLIP = 4.0
_TRUNC_STD_4SIG = 0.998929  # std of N(0,1) truncated at +-4


# ------------------------------------------------------------------------------------------ helpers


def robust_std(values, *, clip_sigma=_CLIP, max_iter=10) -> float:
    """
    Standard deviation insensitive to outliers, unbiased for Gaussian data.

    Iterative ``clip_sigma`` clipping around the median (start: 1.4826 MAD), then the sample
    standard deviation of the kept values corrected for the truncation of a normal distribution
    at ``+-clip_sigma``. NaN when fewer than 3 finite values.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 3:
        return float("nan")
    med = np.median(v)
    s = 1.4826 * np.median(np.abs(v - med))
    if s == 0:
        s = np.std(v)
        if s == 0:
            return 0.0
    keep = np.ones(v.size, dtype=bool)
    for _ in range(max_iter):
        new = np.abs(v - med) <= clip_sigma * s
        if new.sum() < 3:
            break
        med = np.median(v[new])
        s_new = np.std(v[new], ddof=1) / _truncated_std(clip_sigma)
        if np.array_equal(new, keep) and math.isclose(s_new, s, rel_tol=1e-9):
            break
        keep, s = new, s_new
    return float(s)


def _truncated_std(k):
    from scipy.stats import norm

    if k == _CLIP:
        return _TRUNC_STD_4SIG
    mass = 2.0 * norm.cdf(k) - 1.0
    return math.sqrt(1.0 - 2.0 * k * norm.pdf(k) / mass)


def expected_aperture_error_adu(
    flux_ap_adu, *, radius_px, sky_adu, gain_e_per_adu, read_noise_e, n_annulus=None
):
    """
    Photon-noise error of an aperture flux with a local annulus background (ADU).

    ``sqrt(F_ap/g + A s2 + A**2 s2 / N_ann)`` with ``A = pi radius**2`` and
    ``s2 = sky/g + (rn/g)**2``; the last term is dropped when ``n_annulus`` is None.
    """
    f = np.asarray(flux_ap_adu, dtype=float)
    area = math.pi * float(radius_px) ** 2
    s2 = sky_adu / gain_e_per_adu + (read_noise_e / gain_e_per_adu) ** 2
    var = np.clip(f, 0, None) / gain_e_per_adu + area * s2
    if n_annulus is not None:
        var = var + area**2 * s2 / np.asarray(n_annulus, dtype=float)
    return np.sqrt(var)


def pixelated_fwhm_px(*, psf="gaussian", fwhm_px=3.5, beta=3.0) -> float:
    """FWHM along x of the continuous PSF convolved with a 1x1 px box (a pixel-value fit's FWHM)."""
    from scipy.optimize import brentq
    from scipy.special import erf

    from rpp_tasks.sim.synthetic import moffat_alpha_px

    if psf == "gaussian":
        s = math.sqrt(2.0) * fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))

        def prof(x):
            return 0.5 * (erf((x + 0.5) / s) - erf((x - 0.5) / s))
    else:
        a2 = moffat_alpha_px(fwhm_px, beta) ** 2
        t, w = np.polynomial.legendre.leggauss(16)
        t, w = 0.5 * t, 0.5 * w

        def prof(x):
            xx, yy = (x + t)[:, None], t[None, :]
            return float(np.sum(w[:, None] * w[None, :] * (1.0 + (xx**2 + yy**2) / a2) ** (-beta)))

    p0 = prof(0.0)
    return 2.0 * brentq(lambda x: prof(x) - 0.5 * p0, 1e-6, 5.0 * fwhm_px + 5.0)


# ----------------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class TruthMatch:
    """One-to-one pairs between catalogue rows and true stars (indices into the inputs)."""

    catalog_index: np.ndarray
    truth_index: np.ndarray
    separation_px: np.ndarray
    n_catalog: int
    n_truth: int
    radius_px: float

    @property
    def n_matched(self) -> int:
        return int(self.catalog_index.size)

    @property
    def unmatched_catalog(self) -> np.ndarray:
        """Indices of catalogue rows without a true star."""
        return np.setdiff1d(np.arange(self.n_catalog), self.catalog_index)

    @property
    def unmatched_truth(self) -> np.ndarray:
        """Indices of true stars without a detection."""
        return np.setdiff1d(np.arange(self.n_truth), self.truth_index)

    def joined(self, catalog: Table, truth: Table) -> Table:
        """Matched rows side by side: catalogue columns, then truth columns prefixed ``true_``."""
        left = Table(catalog[self.catalog_index], copy=True)
        for name in truth.colnames:
            left[f"true_{name}"] = truth[name][self.truth_index]
        left["sep_px"] = self.separation_px
        return left

    def to_dict(self) -> dict:
        return {
            "n_catalog": self.n_catalog,
            "n_truth": self.n_truth,
            "n_matched": self.n_matched,
            "radius_px": self.radius_px,
        }


def match_to_truth(
    catalog,
    truth,
    *,
    radius_px=1.5,
    x_col="x_centroid",
    y_col="y_centroid",
    truth_x_col="x",
    truth_y_col="y",
) -> TruthMatch:
    """
    Match catalogue rows to true stars one-to-one within ``radius_px``.

    Parameters
    ----------
    catalog, truth : astropy.table.Table
        Catalogue with ``x_col, y_col`` and truth with ``truth_x_col, truth_y_col`` (0-based px).
    radius_px : float
        Maximum separation.

    Returns
    -------
    match : `TruthMatch`
        Pairs sorted by catalogue index; greedy by increasing separation (see module docstring).
    """
    from scipy.spatial import cKDTree

    for tab, cols, what in (
        (catalog, (x_col, y_col), "catalog"),
        (truth, (truth_x_col, truth_y_col), "truth"),
    ):
        missing = [c for c in cols if c not in tab.colnames]
        if missing:
            msg = f"match_to_truth: {what} lacks column(s) {missing}"
            raise ValueError(msg)
    if not radius_px > 0:
        msg = f"match_to_truth: radius_px must be > 0, got {radius_px!r}"
        raise ValueError(msg)
    cx, cy = np.asarray(catalog[x_col], float), np.asarray(catalog[y_col], float)
    tx, ty = np.asarray(truth[truth_x_col], float), np.asarray(truth[truth_y_col], float)
    empty = np.zeros(0, dtype=np.int64)
    ok_c = np.flatnonzero(np.isfinite(cx) & np.isfinite(cy))
    ok_t = np.flatnonzero(np.isfinite(tx) & np.isfinite(ty))
    if ok_c.size == 0 or ok_t.size == 0:
        return TruthMatch(empty, empty, np.zeros(0), len(catalog), len(truth), float(radius_px))
    dist = cKDTree(np.column_stack([cx[ok_c], cy[ok_c]])).sparse_distance_matrix(
        cKDTree(np.column_stack([tx[ok_t], ty[ok_t]])), float(radius_px), output_type="ndarray"
    )
    order = np.argsort(dist["v"], kind="stable")
    used_c = np.zeros(ok_c.size, dtype=bool)
    used_t = np.zeros(ok_t.size, dtype=bool)
    ci, ti, sep = [], [], []
    for k in order:
        i, j = dist["i"][k], dist["j"][k]
        if used_c[i] or used_t[j]:
            continue
        used_c[i] = used_t[j] = True
        ci.append(ok_c[i])
        ti.append(ok_t[j])
        sep.append(dist["v"][k])
    ci, ti, sep = (
        np.asarray(ci, dtype=np.int64),
        np.asarray(ti, dtype=np.int64),
        np.asarray(sep, dtype=float),
    )
    srt = np.argsort(ci)
    return TruthMatch(ci[srt], ti[srt], sep[srt], len(catalog), len(truth), float(radius_px))
