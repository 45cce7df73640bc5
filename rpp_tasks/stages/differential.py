"""Differential photometry: an automatic ensemble of comparison stars and each frame's relative
zero point, night by night.

Model (inhomogeneous ensemble photometry, Honeycutt 1992, PASP 104, 435): the instrumental
magnitude of comparison star ``i`` in frame ``f`` is ``m[i, f] = M[i] - Z[f]``, where ``M[i]`` is
the star's magnitude and ``Z[f]`` the frame's relative zero point (transparency, airmass...).
Both are solved together by weighted least squares from every measurement (stars missing from some
frames are fine). The ensemble's scale is tied to the reference catalogue: the weighted mean of
``M[i] - ref_mag[i]`` over the kept stars is zero, so the differential magnitude of a target,
``m_t[f] + Z[f]``, is on the catalogue's scale like the absolute one, but every frame of the night
is measured against the same stars (no per-frame star selection, no colour scatter of the
reference between frames).

Comparison stars are chosen automatically in each frame's catalogue: matched to the reference
catalogue (``ref_mag`` within ``ref_mag_range``), unsaturated, not blended, not near an edge, no
detection flags, S/N >= ``min_snr``, not a known variable (``vsx_name``, or ``ref_variable`` of the
catalogue), farther than ``exclude_radius_arcsec`` from every target, measured in at least
``min_frame_fraction`` of the night's frames; the ``max_stars`` with the best median S/N are kept.
Outliers are then removed night by night: single measurements further than ``clip_sigma`` from the
model (a cosmic ray, a satellite), then, one at a time, the star whose own light curve has the
largest reduced chi^2 when it exceeds ``max_chi2`` times the median of the ensemble (a variable
star unknown to VSX), and the star furthest from its catalogue magnitude when it is further than
4 robust sigma (at least 0.05 mag) from the others' offset (a variable steady tonight but at another
phase, a blend, a mismatch).

Errors: the night's stars tell how much they scatter beyond their photometric errors: the floor
``f`` that brings their chi^2 to the degrees of freedom (flat-field and PSF residuals; 0 when the
errors explain the scatter). Every measurement's error is ``s^2 = err^2 + f^2``, weights
``w = 1 / s^2``, ``Z_err[f]^2 = sum_i w^2 s^2 / (sum_i w)^2``, and a target's differential error
is ``sqrt(err_target^2 + f^2 + Z_err^2)``. The night's tie to the catalogue has its own
uncertainty (``anchor_err_mag``), common to every frame of the night; it is reported separately.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EnsembleSolution",
    "EnsembleResult",
    "solve_ensemble",
    "comparison_candidates",
    "differential_ensemble",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleSolution:
    """Result of `solve_ensemble`. Arrays: ``M``/``M_err`` per star, ``Z``/``Z_err``/``n_used``
    per frame (NaN/0 where the frame has fewer than ``min_stars`` stars), ``chi2`` per star,
    ``used`` per star, ``point_used`` per measurement; ``rejected`` maps a star index to why;
    ``floor_mag`` is the extra scatter per measurement the night's stars show beyond their errors
    (estimated, added in quadrature to every error, the targets' too)."""

    M: np.ndarray
    M_err: np.ndarray
    Z: np.ndarray
    Z_err: np.ndarray
    n_used: np.ndarray
    chi2: np.ndarray
    used: np.ndarray
    point_used: np.ndarray
    rejected: dict
    anchor_mag: float
    anchor_err_mag: float
    floor_mag: float = 0.0
    flags: tuple[str, ...] = ()


def _alternate(m0, w, Z, M):
    """Weighted alternating least squares of ``m = M - Z`` (w = 0 where not used)."""
    for _ in range(200):
        den = w.sum(axis=0)
        num = (w * (np.nan_to_num(M)[:, None] - m0)).sum(axis=0)
        Zn = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        den_s = w.sum(axis=1)
        num = (w * (m0 + np.nan_to_num(Zn)[None, :])).sum(axis=1)
        Mn = np.where(den_s > 0, num / np.where(den_s > 0, den_s, 1), np.nan)
        step = np.nanmax(np.abs(np.nan_to_num(Zn) - np.nan_to_num(Z)), initial=0.0)
        Z, M = Zn, Mn
        if step < 1e-7:
            break
    return Z, M


def _floor(resid, e2, n_dof) -> float:
    """The extra scatter ``f`` with ``sum r^2 / (e^2 + f^2) = n_dof`` (0 if the errors suffice)."""
    r2 = resid**2
    if n_dof < 3 or np.sum(r2 / e2) <= n_dof:
        return 0.0
    lo, hi = 0.0, 0.5
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.sum(r2 / (e2 + mid**2)) > n_dof:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def solve_ensemble(
    mag,
    err,
    ref_mag,
    *,
    clip_sigma: float = 5.0,
    max_chi2: float = 4.0,
    min_stars: int = 3,
    floor_mag: float | None = None,
    max_offset_sigma: float = 4.0,
    min_offset_mag: float = 0.05,
    max_iter: int = 100,
) -> EnsembleSolution:
    """
    Solve ``m[i, f] = M[i] - Z[f]`` with outlier and variable-star rejection.

    Parameters
    ----------
    mag, err : array_like, shape (n_star, n_frame)
        Instrumental magnitudes and errors of the comparison candidates (NaN where not measured).
    ref_mag : array_like, shape (n_star,)
        Reference-catalogue magnitudes (the scale of ``M``).
    clip_sigma : float
        Measurements with ``|m + Z - M| > clip_sigma * s`` are dropped (the worst of a star first).
    max_chi2 : float
        A star whose reduced chi^2 exceeds ``max_chi2`` times the ensemble median (at least 1) is
        rejected as variable (the worst one first, then the solution is redone).
    min_stars : int
        Frames with fewer kept stars get ``Z = NaN``.
    floor_mag : float, optional
        Extra error added in quadrature to every measurement (flat field, PSF residuals). By
        default it is estimated from the kept stars: the value that brings their chi^2 to the
        number of degrees of freedom (0 when the errors already explain the scatter).
    max_offset_sigma, min_offset_mag : float
        A star whose magnitude tonight is further from its catalogue value than the others'
        (``max(max_offset_sigma * robust scatter, min_offset_mag)`` from their median offset) is
        rejected: steady tonight, but a variable at another phase, a blend or a mismatch (it would
        shift the night's tie to the catalogue).

    Returns
    -------
    EnsembleSolution
        ``Z_err[f]^2 = sum_i w^2 s^2 / (sum_i w)^2`` with ``s^2 = err^2 + floor^2``,
        ``w = 1/s^2``: the frame-to-frame error (the stars' own magnitudes are common to the
        night; their mean is tied to the catalogue, whose error is ``anchor_err_mag``).
    """
    mag = np.asarray(mag, float)
    err = np.asarray(err, float)
    ref = np.asarray(ref_mag, float)
    if mag.ndim != 2 or mag.shape != err.shape or ref.shape != (mag.shape[0],):
        raise ValueError(f"mag, err must be (n_star, n_frame) and ref_mag (n_star,): {mag.shape}")
    n_star, n_frame = mag.shape
    e2 = np.where(np.isfinite(err) & (err > 0), err, np.nan) ** 2
    ok = np.isfinite(mag) & np.isfinite(e2)
    used = np.isfinite(ref) & (ok.sum(axis=1) >= 1)
    rejected: dict = {int(i): "no reference magnitude" for i in np.flatnonzero(~np.isfinite(ref))}
    m0 = np.where(ok, mag, 0.0)
    e2 = np.where(ok, e2, 1.0)
    floor = 0.0 if floor_mag is None else float(floor_mag)
    Z = np.full(n_frame, np.nan)
    M = np.where(np.isfinite(ref), ref, np.nan)
    chi2 = np.full(n_star, np.nan)
    for _ in range(max_iter):
        s2 = e2 + max(floor, 5e-4) ** 2
        w = np.where(ok & used[:, None], 1.0 / s2, 0.0)
        Z, M = _alternate(m0, w, Z, M)
        resid = np.where(ok, m0 + np.nan_to_num(Z)[None, :] - np.nan_to_num(M)[:, None], 0.0)
        live = ok & used[:, None]
        if floor_mag is None:
            n_dof = int(live.sum()) - int(used.sum()) - int((live.sum(axis=0) > 0).sum()) + 1
            new_floor = _floor(resid[live], e2[live], n_dof)
            if abs(new_floor - floor) > 1e-5:
                floor = new_floor
                continue
        z = resid / np.sqrt(s2)
        # single measurements: the worst outlier of each star (keep >= 2 points per star)
        changed = False
        bad = live & (np.abs(z) > clip_sigma)
        for i in np.flatnonzero(bad.any(axis=1)):
            if ok[i].sum() > 2:
                ok[i, int(np.argmax(np.where(bad[i], np.abs(z[i]), -1.0)))] = False
                changed = True
        if changed:
            continue
        npts = live.sum(axis=1)
        chi2 = np.where(
            npts > 1, (np.where(live, z**2, 0.0)).sum(axis=1) / np.maximum(npts - 1, 1), np.nan
        )
        cand = used & np.isfinite(chi2)
        if cand.sum() > min_stars:
            med = max(float(np.median(chi2[cand])), 1.0)
            worst = int(np.argmax(np.where(cand, chi2, -np.inf)))
            if chi2[worst] > max_chi2 * med:
                used[worst] = False
                rejected[worst] = (
                    f"variable: reduced chi2 {chi2[worst]:.1f} > {max_chi2:g} x {med:.2f}"
                )
                continue
            # a star steady tonight but far from its catalogue magnitude (relative to the others):
            # a variable at another phase, a blend or a mismatch
            d = np.where(cand, ref - M, np.nan)
            dmed = float(np.nanmedian(d))
            scatter = 1.4826 * float(np.nanmedian(np.abs(d - dmed)))
            lim = max(max_offset_sigma * scatter, min_offset_mag)
            off = np.abs(np.nan_to_num(d - dmed, nan=0.0))
            worst = int(np.argmax(off))
            if off[worst] > lim:
                used[worst] = False
                rejected[worst] = (
                    f"off its catalogue magnitude by {-(d[worst] - dmed):+.3f} (> {lim:.3f})"
                )
                continue
        break
    s2 = e2 + max(floor, 5e-4) ** 2
    live = ok & used[:, None]
    w = np.where(live, 1.0 / s2, 0.0)
    n_used = live.sum(axis=0)
    flags: list[str] = []
    # tie the scale to the catalogue (robust mean of ref - M over the kept stars)
    d = ref - M
    good = used & np.isfinite(d)
    if good.sum() == 0:
        anchor, anchor_err = float("nan"), float("nan")
        flags.append("no_comparison_stars")
    else:
        dd = d[good]
        med = float(np.median(dd))
        mad = 1.4826 * float(np.median(np.abs(dd - med)))
        keep = np.abs(dd - med) <= max(3 * mad, 0.02)
        anchor = float(np.mean(dd[keep]))
        anchor_err = (
            float(np.std(dd[keep], ddof=1) / math.sqrt(keep.sum())) if keep.sum() > 1 else math.nan
        )
    M = M + anchor
    Z = Z + anchor
    den_s = w.sum(axis=1)
    M_err = np.where(den_s > 0, 1.0 / np.sqrt(np.where(den_s > 0, den_s, 1)), np.nan)
    den = w.sum(axis=0)
    Z_err = np.sqrt((w**2 * s2).sum(axis=0)) / np.where(den > 0, den, np.nan)
    few = n_used < min_stars
    if few.any():
        flags.append("frames_with_too_few_comparison_stars")
    Z = np.where(few, np.nan, Z)
    Z_err = np.where(few, np.nan, Z_err)
    if floor > 0:
        flags.append(f"floor_{floor:.4f}")
    return EnsembleSolution(
        M,
        M_err,
        Z,
        Z_err,
        n_used,
        chi2,
        used,
        ok,
        rejected,
        anchor,
        anchor_err,
        floor,
        tuple(flags),
    )


# =============================================================================== night level
@dataclass(frozen=True)
class EnsembleResult:
    """The comparison ensemble of one night, one band and one photometry type.

    ``zp_rel``/``zp_rel_err``/``n_comp`` are per frame (in the order of ``frames``); ``stars`` is
    a Table of every candidate (``ra``, ``dec``, ``ref_mag``, ``mag`` (= M), ``mag_err``,
    ``chi2``, ``n_frames``, ``used``, ``reason``). ``status`` is ``ok`` or ``failed`` (``reason``:
    e.g. no comparison stars).
    """

    phot_type: str
    frames: tuple[str, ...]
    zp_rel: np.ndarray
    zp_rel_err: np.ndarray
    n_comp: np.ndarray
    stars: object
    anchor_err_mag: float
    status: str
    reason: str | None = None
    flags: tuple[str, ...] = ()
    floor_mag: float = 0.0
    removed: dict = dataclasses.field(default_factory=dict)  # candidate rows removed, by criterion

    def to_dict(self) -> dict:
        def f(v):
            return None if v is None or not math.isfinite(v) else round(float(v), 6)

        used = np.asarray(self.stars["used"], bool) if len(self.stars) else np.zeros(0, bool)
        reasons: dict = {}
        for r in np.asarray(self.stars["reason"]).astype(str) if len(self.stars) else ():
            if r:
                key = r.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        return {
            "phot_type": self.phot_type,
            "status": self.status,
            "reason": self.reason,
            "n_candidates": len(self.stars),
            "n_used": int(used.sum()),
            "rejected": reasons,
            "anchor_err_mag": f(self.anchor_err_mag),
            "floor_mag": f(self.floor_mag),
            "removed": dict(self.removed),
            "frames": {
                fr: {"zp_rel_mag": f(z), "zp_rel_err_mag": f(e), "n_comp": int(n)}
                for fr, z, e, n in zip(self.frames, self.zp_rel, self.zp_rel_err, self.n_comp)
            },
            "flags": list(self.flags),
        }


def comparison_candidates(
    cat,
    *,
    phot_type: str,
    min_snr: float = 30.0,
    ref_mag_range=(8.0, 19.0),
    exclude=(),
    exclude_radius_arcsec: float = 15.0,
) -> tuple[np.ndarray, dict]:
    """
    Rows of one frame's catalogue that may serve as comparison stars.

    Returns
    -------
    (mask, counts)
        Boolean mask of the usable rows and how many rows each criterion removed (in order).
    """
    from rpp_tasks.stages.catalogs import angular_sep_deg

    n = len(cat)
    counts: dict = {}
    ok = np.ones(n, bool)

    def cut(name, keep):
        nonlocal ok
        keep = np.asarray(keep, bool)
        counts[name] = int((ok & ~keep).sum())
        ok &= keep

    ref = np.asarray(cat["ref_mag"], float) if "ref_mag" in cat.colnames else np.full(n, np.nan)
    cut("no_reference_match", np.isfinite(ref))
    cut("reference_mag_range", (ref >= ref_mag_range[0]) & (ref <= ref_mag_range[1]))
    for name in ("saturated", "blended", "near_edge"):
        if name in cat.colnames:
            cut(name, ~np.asarray(cat[name], bool))
    if "flag" in cat.colnames:
        cut("detection_flags", (np.asarray(cat["flag"], np.int64) & ~1) == 0)
    m = np.asarray(cat[f"mag_{phot_type}"], float) if f"mag_{phot_type}" in cat.colnames else None
    if m is None:
        cut("no_photometry", np.zeros(n, bool))
        return ok, counts
    snr = np.asarray(cat[f"snr_{phot_type}"], float) if f"snr_{phot_type}" in cat.colnames else None
    cut("not_measured", np.isfinite(m))
    if snr is not None:
        cut("low_snr", np.nan_to_num(snr, nan=0.0) >= min_snr)
    if "vsx_name" in cat.colnames:
        cut("vsx_variable", np.char.strip(np.asarray(cat["vsx_name"]).astype(str)) == "")
    if "ref_variable" in cat.colnames:
        cut("catalogue_variable", ~np.asarray(cat["ref_variable"], bool))
    if exclude and "ra" in cat.colnames:
        near = np.zeros(n, bool)
        for ra, dec in exclude:
            near |= angular_sep_deg(ra, dec, cat["ra"], cat["dec"]) * 3600 <= exclude_radius_arcsec
        cut("near_a_target", ~near)
    return ok, counts


def differential_ensemble(
    cats,
    frames,
    *,
    phot_type: str,
    exclude=(),
    min_snr: float = 30.0,
    max_stars: int = 40,
    min_stars: int = 3,
    min_frame_fraction: float = 0.5,
    clip_sigma: float = 5.0,
    max_chi2: float = 4.0,
    exclude_radius_arcsec: float = 15.0,
    ref_mag_range=(8.0, 19.0),
    match_radius_arcsec: float = 1.5,
) -> EnsembleResult:
    """
    The comparison ensemble of one night (frames of one band) and each frame's relative zero point.

    Parameters
    ----------
    cats : sequence of astropy.table.Table
        The frames' catalogues (calibrated: ``ref_mag``, ``mag_<phot_type>``, flags; enrichment
        columns when available).
    frames : sequence of str
        Frame names (same order).
    phot_type : str
        ``psf``, ``1p3fwhm``, ``1p1fwhm`` or ``fixed``.
    exclude : sequence of (ra, dec)
        Target positions: no comparison star within ``exclude_radius_arcsec``.
    Other parameters
        See the module docstring (``targets.ensemble`` in the observatory YAML).

    Returns
    -------
    EnsembleResult
        ``status="failed"`` with the reason when fewer than ``min_stars`` usable stars exist (the
        differential magnitudes are then NaN; the absolute ones are unaffected).
    """
    from astropy.table import Table

    from rpp_tasks.stages.catalogs import match_catalogs

    frames = tuple(frames)
    nf = len(frames)
    masks, counts_all = [], {}
    for cat in cats:
        mask, counts = comparison_candidates(
            cat,
            phot_type=phot_type,
            min_snr=min_snr,
            ref_mag_range=ref_mag_range,
            exclude=exclude,
            exclude_radius_arcsec=exclude_radius_arcsec,
        )
        masks.append(mask)
        for k, v in counts.items():
            counts_all[k] = counts_all.get(k, 0) + v
    empty_stars = Table(
        {
            "ra": np.zeros(0),
            "dec": np.zeros(0),
            "ref_mag": np.zeros(0),
            "mag": np.zeros(0),
            "mag_err": np.zeros(0),
            "chi2": np.zeros(0),
            "n_frames": np.zeros(0, int),
            "used": np.zeros(0, bool),
            "reason": np.zeros(0, "U64"),
        }
    )

    def failed(reason, stars=empty_stars):
        nan = np.full(nf, np.nan)
        return EnsembleResult(
            phot_type,
            frames,
            nan,
            nan.copy(),
            np.zeros(nf, int),
            stars,
            float("nan"),
            "failed",
            reason,
            ("no_comparison_stars",),
            removed=counts_all,
        )

    n_cand = [int(m.sum()) for m in masks]
    lost = "removed: " + (", ".join(f"{k} {v}" for k, v in counts_all.items() if v) or "nothing")
    if nf == 0 or max(n_cand, default=0) < min_stars:
        return failed(
            f"no comparison stars: at most {max(n_cand, default=0)} usable per frame, "
            f"{min_stars} needed ({lost})"
        )
    # master list: the frame with the most candidates; every frame matched to it by position
    k0 = int(np.argmax(n_cand))
    master = cats[k0][masks[k0]]
    mra, mdec = np.asarray(master["ra"], float), np.asarray(master["dec"], float)
    ns = len(master)
    mag = np.full((ns, nf), np.nan)
    err = np.full((ns, nf), np.nan)
    snr = np.full((ns, nf), np.nan)
    for f, (cat, mask) in enumerate(zip(cats, masks)):
        sub = cat[mask]
        if len(sub) == 0:
            continue
        idx, _ = match_catalogs(mra, mdec, sub["ra"], sub["dec"], radius_arcsec=match_radius_arcsec)
        hit = idx >= 0
        mag[hit, f] = np.asarray(sub[f"mag_{phot_type}"], float)[idx[hit]]
        err[hit, f] = np.asarray(sub[f"mag_err_{phot_type}"], float)[idx[hit]]
        if f"snr_{phot_type}" in sub.colnames:
            snr[hit, f] = np.asarray(sub[f"snr_{phot_type}"], float)[idx[hit]]
    n_frames = np.isfinite(mag).sum(axis=1)
    reason = np.full(ns, "", dtype="U64")
    keep = n_frames >= max(1, math.ceil(min_frame_fraction * nf))
    reason[~keep] = "measured in too few frames"
    med_snr = np.nanmedian(np.where(np.isfinite(snr), snr, np.nan), axis=1)
    med_snr = np.where(np.isfinite(med_snr), med_snr, 1.0 / np.nanmedian(err, axis=1))
    order = np.argsort(-np.where(keep, med_snr, -np.inf), kind="stable")
    sel = order[: min(max_stars, int(keep.sum()))]
    surplus = np.setdiff1d(np.flatnonzero(keep), sel)
    reason[surplus] = "beyond max_stars"
    ref_mag = np.asarray(master["ref_mag"], float)
    stars = Table(
        {
            "ra": mra,
            "dec": mdec,
            "ref_mag": ref_mag,
            "mag": np.full(ns, np.nan),
            "mag_err": np.full(ns, np.nan),
            "chi2": np.full(ns, np.nan),
            "n_frames": n_frames,
            "used": np.zeros(ns, bool),
            "reason": reason,
        }
    )
    if sel.size < min_stars:
        return failed(
            f"no comparison stars: {sel.size} measured in >= {min_frame_fraction:.0%} of the "
            f"{nf} frames, {min_stars} needed ({lost})",
            stars,
        )
    sol = solve_ensemble(
        mag[sel],
        err[sel],
        ref_mag[sel],
        clip_sigma=clip_sigma,
        max_chi2=max_chi2,
        min_stars=min_stars,
    )
    stars["mag"][sel] = sol.M
    stars["mag_err"][sel] = sol.M_err
    stars["chi2"][sel] = sol.chi2
    stars["used"][sel] = sol.used
    for i, why in sol.rejected.items():
        stars["reason"][sel[i]] = why[:64]
    n_used = int(sol.used.sum())
    if n_used < min_stars:
        return failed(
            f"no comparison stars: {n_used} left after rejecting variables ({lost})", stars
        )
    status, why = "ok", None
    if not np.isfinite(sol.Z).any():
        status, why = "failed", f"no frame has {min_stars} comparison stars measured"
    log.debug(
        "ensemble %s: %d/%d stars kept over %d frames (anchor err %.4f)",
        phot_type,
        n_used,
        ns,
        nf,
        sol.anchor_err_mag,
    )
    return EnsembleResult(
        phot_type,
        frames,
        sol.Z,
        sol.Z_err,
        sol.n_used,
        stars,
        sol.anchor_err_mag,
        status,
        why,
        sol.flags,
        sol.floor_mag,
        counts_all,
    )
