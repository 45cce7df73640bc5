"""Asterism (triangle) matching of detections against reference stars of known approximate scale.

The problem: a frame without a WCS, a pointing hint (header RA/DEC, OBJCTRA/OBJCTDEC, a configured
target) that may be off by several field widths, and a pixel-scale hint good to ±20 %. The
reference stars of a cone around the hint are projected on the tangent plane at the hint, in units
of the hinted pixel, so image and reference differ by a similarity transform (rotation, a possible
mirror flip, a scale within the tolerance, a shift).

Method (written for this pipeline; the idea of triangles between each star and its nearest
neighbours comes from astroalign, Beroiz et al. 2020, and the verification by cross-match counting
from twirl, Garcia et al. 2022):

1. Take the ``n`` brightest detections, and the brightest reference stars down to the same surface
   density (times ``ref_factor``, as magnitudes in the frame's band and the catalogue's differ).
2. Triangles of each star with pairs of its ``neighbours`` nearest neighbours; invariants are the
   side ratios ``(a/c, b/c)`` (``a <= b <= c``), which also order the vertices. Triangles whose
   sides are too short or too alike to order reliably are dropped.
3. Every image/reference triangle pair with invariants within ``ratio_tol`` and a size ratio inside
   the scale tolerance gives a similarity transform (flip when the orientations differ). Pairs are
   ranked by votes (hypotheses that agree on rotation, scale and the sky position of the image
   centre) and verified: the brightest detections are mapped onto the reference plane and matches
   within ``match_radius_px`` counted.
4. The best hypothesis is refit on all its matches and accepted only when it is significant: the
   binomial probability of as many chance matches (reference density times match area), times
   the number of hypotheses tried, must be below ``10**max_log10_false_alarm``.

The ladder ``n_levels`` (15, 30, 60 stars by default) stops at the first significant match: sparse
fields solve with the few stars they have, crowded ones with their brightest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["AsterismMatch", "match_asterisms", "triangle_invariants"]


@dataclass(frozen=True)
class AsterismMatch:
    """A similarity transform ``image = linear @ ref + offset`` and the star pairs that support it.

    Attributes
    ----------
    linear : numpy.ndarray
        2x2 matrix mapping reference-plane coordinates to image pixels (includes the flip).
    offset : numpy.ndarray
        Image position (x, y) of the reference-plane origin.
    det_index, ref_index : numpy.ndarray
        Matched pairs (indices into the arrays given to `match_asterisms`).
    scale : float
        Image pixels per reference unit (1 when the scale hint is exact).
    rotation_deg : float
        Rotation of the reference plane onto the image (after the flip), degrees.
    flipped : bool
        True when the image is mirrored with respect to the sky.
    rms_px : float
        RMS of the matched pairs after the similarity fit, image pixels.
    log10_false_alarm : float
        log10 of the probability that a random alignment gives as many matches, times the number
        of hypotheses verified.
    n_hypotheses : int
        Hypotheses verified (all levels).
    n_stars : int
        Detections used at the level that succeeded.
    """

    linear: np.ndarray
    offset: np.ndarray
    det_index: np.ndarray
    ref_index: np.ndarray
    scale: float
    rotation_deg: float
    flipped: bool
    rms_px: float
    log10_false_alarm: float
    n_hypotheses: int
    n_stars: int

    @property
    def n_matches(self) -> int:
        return int(self.det_index.size)

    def to_dict(self) -> dict:
        return {
            "n_matches": self.n_matches,
            "scale": round(self.scale, 6),
            "rotation_deg": round(self.rotation_deg, 4),
            "flipped": self.flipped,
            "rms_px": round(self.rms_px, 4),
            "log10_false_alarm": round(self.log10_false_alarm, 2),
            "n_hypotheses": self.n_hypotheses,
            "n_stars": self.n_stars,
        }


# =============================================================================== triangles
def _triangles(xy: np.ndarray, neighbours: int) -> np.ndarray:
    """Unique index triples: each point with every pair of its ``neighbours`` nearest neighbours."""
    from scipy.spatial import cKDTree

    n = len(xy)
    if n < 3:
        return np.zeros((0, 3), int)
    k = min(neighbours, n - 1)
    _, nn = cKDTree(xy).query(xy, k=k + 1)
    nn = nn[:, 1:]
    a, b = np.triu_indices(k, 1)
    tri = np.column_stack([np.repeat(np.arange(n), a.size), nn[:, a].ravel(), nn[:, b].ravel()])
    return np.unique(np.sort(tri, axis=1), axis=0)


def _window_triangles(xy: np.ndarray, max_side: float, max_triangles: int) -> np.ndarray:
    """Every triangle whose three sides are at most ``max_side`` (at most ``max_triangles``; the
    points are taken in order, brightest first, until the estimate reaches the cap)."""
    from scipy.spatial import cKDTree

    n = len(xy)
    if n < 3:
        return np.zeros((0, 3), int)
    tree = cKDTree(xy)
    counts = tree.query_ball_point(xy, r=max_side, return_length=True) - 1
    # each triangle is counted from its three vertices: about sum(m*(m-1)/2) / 3 of them
    est = np.cumsum(counts * (counts - 1) / 2.0) / 3.0
    n = max(3, int(np.searchsorted(est, max_triangles)) if est[-1] > max_triangles else n)
    xy = xy[:n]
    nbrs = cKDTree(xy).query_ball_point(xy, r=max_side)
    out = []
    for i, nb in enumerate(nbrs):
        fw = np.asarray([j for j in nb if j > i], int)
        if fw.size < 2:
            continue
        a, b = np.triu_indices(fw.size, 1)
        j, l = fw[a], fw[b]
        ok = np.hypot(*(xy[j] - xy[l]).T) <= max_side
        out.append(np.column_stack([np.full(ok.sum(), i), j[ok], l[ok]]))
    return np.concatenate(out) if out else np.zeros((0, 3), int)


def triangle_invariants(
    xy, neighbours: int = 5, *, min_side: float = 5.0, gap: float = 0.02, tri=None
):
    """
    Triangles of a point set and their similarity invariants.

    Parameters
    ----------
    xy : array_like, shape (n, 2)
    neighbours : int
        Triangles are built from each point and pairs of its nearest neighbours.
    min_side : float
        Shortest side kept (same units as ``xy``).
    gap : float
        Sides must differ by more than ``gap`` (fraction of the longest) so that the vertex order is
        unambiguous.

    Returns
    -------
    vertices : numpy.ndarray, shape (t, 3)
        Indices ordered as the vertices opposite the shortest, middle and longest side.
    invariants : numpy.ndarray, shape (t, 2)
        ``(a/c, b/c)``.
    longest : numpy.ndarray
        ``c``.
    orientation : numpy.ndarray
        +1 counter-clockwise, -1 clockwise (in the ordered vertex sequence).
    tri : array_like, shape (t, 3), optional
        Index triples to use instead of the nearest-neighbour triangles.
    """
    xy = np.asarray(xy, float)
    tri = _triangles(xy, neighbours) if tri is None else np.asarray(tri, int).reshape(-1, 3)
    if tri.size == 0:
        return tri, np.zeros((0, 2)), np.zeros(0), np.zeros(0)
    p = xy[tri]
    s = np.stack(
        [
            np.hypot(*(p[:, 1] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 1]).T),
        ],
        axis=1,
    )
    order = np.argsort(s, axis=1)
    s = np.take_along_axis(s, order, 1)
    v = np.take_along_axis(tri, order, 1)
    a, b, c = s.T
    pv = xy[v]
    d1, d2 = pv[:, 1] - pv[:, 0], pv[:, 2] - pv[:, 0]
    orient = np.sign(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (a >= min_side) & ((b - a) > gap * c) & ((c - b) > gap * c) & (orient != 0)
    return v[ok], np.column_stack([a / c, b / c])[ok], c[ok], orient[ok]


# =============================================================================== transforms
def _similarity(w, z, flip):
    """Least-squares similarity z = A * w' + t (complex; w' = conj(w) when flipped), row-wise.

    ``w`` and ``z`` are (h, m) complex arrays, ``flip`` (h,) bool. Returns A (h,), t (h,)."""
    w = np.where(flip[:, None], np.conj(w), w)
    wm, zm = w.mean(axis=1), z.mean(axis=1)
    wc, zc = w - wm[:, None], z - zm[:, None]
    den = np.sum(np.abs(wc) ** 2, axis=1)
    A = np.sum(zc * np.conj(wc), axis=1) / np.where(den > 0, den, np.inf)
    return A, zm - A * wm


def _to_ref(z, A, t, flip):
    """Image positions (complex) -> reference plane for each hypothesis: (h, n) complex."""
    w = (z[None, :] - t[:, None]) / A[:, None]
    return np.where(flip[:, None], np.conj(w), w)


def _log10_binom_sf(k: int, n: int, p: float) -> float:
    """log10 P(X >= k), X ~ Binomial(n, p)."""
    from scipy.stats import binom

    if k <= 0:
        return 0.0
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return float(binom.logsf(k - 1, n, p) / math.log(10.0))


def _hull_area(xy: np.ndarray) -> float:
    from scipy.spatial import ConvexHull, QhullError

    if len(xy) < 3:
        return 0.0
    try:
        return float(ConvexHull(xy).volume)
    except (QhullError, ValueError):
        return 0.0


# =============================================================================== matching
def _mutual_matches(z_det, w_ref, A, t, flip, radius_ref):
    """Detection/reference pairs within ``radius_ref`` (reference units), one-to-one (closest)."""
    from scipy.spatial import cKDTree

    w = _to_ref(z_det, np.array([A]), np.array([t]), np.array([flip]))[0]
    d, j = cKDTree(np.column_stack([w_ref.real, w_ref.imag])).query(
        np.column_stack([w.real, w.imag]), distance_upper_bound=radius_ref
    )
    hit = np.flatnonzero(np.isfinite(d))
    hit = hit[np.argsort(d[hit])]
    _, first = np.unique(j[hit], return_index=True)
    di = np.sort(hit[first])
    return di, j[di]


def _refit_and_score(a, t, flip, zv, wv, match_radius_px, n_tri, tried, area_ref, area_img):
    """Refit one hypothesis on all its matches and score it; None when < 3 matches remain.

    The score is log10 of the binomial probability of as many chance matches, within the radius
    the fit supports (3 x RMS, at least 0.5 px), among the ``n_eff`` brightest detections (twice
    the reference stars expected in the field), times the hypotheses tried."""
    di = ri = np.zeros(0, int)
    for _ in range(4):
        di, ri = _mutual_matches(zv, wv, a, t, flip, match_radius_px / abs(a))
        if di.size < 3:
            return None
        a2, t2 = _similarity(wv[ri][None, :], zv[di][None, :], np.array([flip]))
        a, t = a2[0], t2[0]
    w_fit = np.conj(wv[ri]) if flip else wv[ri]
    res = np.abs(a * w_fit + t - zv[di])
    rms = float(np.sqrt(np.mean(res**2)))
    r_sig = min(match_radius_px, max(3.0 * rms, 0.5))
    density = len(wv) / area_ref
    n_eff = int(min(len(zv), max(n_tri, math.ceil(2.0 * density * area_img / abs(a) ** 2))))
    k = int(np.count_nonzero((res <= r_sig) & (di < n_eff)))
    p = min(1.0, density * math.pi * (r_sig / abs(a)) ** 2)
    lfa = _log10_binom_sf(k - 3, max(n_eff - 3, 1), p) + math.log10(max(tried, 1))
    lfa = max(lfa, -300.0)  # binom.logsf underflows to -inf (not JSON)
    return {"a": a, "t": t, "flip": flip, "di": di, "ri": ri, "rms": rms, "k": k,
            "n_eff": n_eff, "lfa": float(lfa)}  # fmt: skip


def match_asterisms(
    det_xy,
    ref_uv,
    *,
    shape,
    scale_tolerance: float = 0.2,
    match_radius_px: float = 3.0,
    n_levels=(8, 15, 30, 60),
    neighbours: int = 5,
    ref_factor: float = 2.0,
    max_ref: int = 4000,
    n_verify: int = 150,
    ratio_tol: float = 0.015,
    min_matches: int = 6,
    max_log10_false_alarm: float = -6.0,
    max_hypotheses: int = 4000,
    n_refit: int = 5,
    max_checks: int = 1_000_000,
    window_stars: int = 8,
    max_window_triangles: int = 400_000,
    time_budget_s: float = 30.0,
) -> tuple[AsterismMatch | None, str]:
    """
    Find the similarity transform between detections and reference stars.

    Parameters
    ----------
    det_xy : array_like, shape (n, 2)
        0-based pixel positions, brightest first.
    ref_uv : array_like, shape (m, 2)
        Reference positions on the tangent plane at the pointing hint, in hinted pixels (arcsec /
        hinted scale), brightest first.
    shape : (ny, nx)
        Image size (the density of the detections is taken over it).
    scale_tolerance : float
        The true scale is within ``±scale_tolerance`` (fraction) of the hint.
    match_radius_px : float
        Verification radius in image pixels (centroid errors, distortion left by a similarity).
    n_levels : sequence of int
        Numbers of brightest detections tried in turn, with nearest-neighbour triangles.
    window_stars : int
        Last resort for sparse fields (few stars, reference cone much larger than the field, where
        the nearest neighbours of a reference star near the field edge lie outside the field):
        every triangle of the ``window_stars`` brightest detections against every reference
        triangle small enough to fit in the image (at most ``max_window_triangles``). 0: off.
    ref_factor : float
        Reference stars are taken down to ``ref_factor`` times the detections' surface density.
    min_matches : int
        Fewest matched pairs accepted.
    max_log10_false_alarm : float
        Significance required (see the module notes).
    max_hypotheses, max_checks, time_budget_s : int, int, float
        Bounds on the work: at least ``max_hypotheses`` (the most voted) are verified per level,
        more while hypotheses x verification stars stay below ``max_checks``; time in total.
    n_refit : int
        Hypotheses with the most matches that are refitted and scored, per level.

    Returns
    -------
    (AsterismMatch or None, str)
        The match, or None and the reason it failed.
    """
    from scipy.spatial import cKDTree

    t_start = time.perf_counter()
    det = np.asarray(det_xy, float).reshape(-1, 2)
    ref = np.asarray(ref_uv, float).reshape(-1, 2)
    det_ok = np.flatnonzero(np.isfinite(det).all(axis=1))
    det = det[det_ok]
    ref_ok = np.flatnonzero(np.isfinite(ref).all(axis=1))
    ref_all = ref[ref_ok]
    ny, nx = shape
    if len(det) < 3:
        return None, f"only {len(det)} detections"
    if len(ref_all) < 3:
        return None, f"only {len(ref_all)} reference stars"
    area_img = float(nx * ny)
    area_ref = max(_hull_area(ref_all), area_img)
    s_lo, s_hi = 1.0 / (1.0 + scale_tolerance), 1.0 / max(1.0 - scale_tolerance, 1e-3)
    z_all = det[:, 0] + 1j * det[:, 1]
    w_all = ref_all[:, 0] + 1j * ref_all[:, 1]
    centre = ((nx - 1) / 2.0) + 1j * ((ny - 1) / 2.0)
    tried = 0
    best_fail = "no triangle of the image matched the reference"
    plan = [("nearest", n) for n in sorted({min(int(n), len(det)) for n in n_levels})]
    if window_stars:  # sparse fields: every field-sized triangle of the brightest few stars
        plan.append(("window", min(int(window_stars), len(det))))
    side_ref = min(nx, ny) / s_lo  # longest side of a triangle that fits in the image
    for mode, n_tri in plan:
        if time.perf_counter() - t_start > time_budget_s:
            best_fail = f"time budget of {time_budget_s:g} s spent"
            break
        n_ref_tri = int(
            min(max_ref, len(ref_all), math.ceil(ref_factor * n_tri * area_ref / area_img))
        )
        if mode == "nearest":
            vd, inv_d, c_d, o_d = triangle_invariants(det[:n_tri], neighbours)
            vr, inv_r, c_r, o_r = triangle_invariants(ref_all[:n_ref_tri], neighbours)
        else:
            from itertools import combinations

            tri_d = np.array(list(combinations(range(n_tri), 3)), int)
            vd, inv_d, c_d, o_d = triangle_invariants(det[:n_tri], tri=tri_d)
            keep_d = c_d <= min(nx, ny)
            vd, inv_d, c_d, o_d = vd[keep_d], inv_d[keep_d], c_d[keep_d], o_d[keep_d]
            tri_r = _window_triangles(ref_all[:n_ref_tri], side_ref, max_window_triangles)
            vr, inv_r, c_r, o_r = triangle_invariants(ref_all[:n_ref_tri], tri=tri_r)
        if len(vd) == 0 or len(vr) == 0:
            continue
        lists = cKDTree(inv_r).query_ball_point(inv_d, r=ratio_tol)
        i_d = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
        if i_d.size == 0:
            continue
        i_r = np.concatenate([np.asarray(x, int) for x in lists])
        ratio = c_d[i_d] / c_r[i_r]
        keep = (ratio >= s_lo) & (ratio <= s_hi)
        i_d, i_r = i_d[keep], i_r[keep]
        if i_d.size == 0:
            best_fail = "no triangle pair within the scale tolerance"
            continue
        flip = o_d[i_d] != o_r[i_r]
        zt = z_all[vd[i_d]]
        wt = w_all[vr[i_r]]
        A, t = _similarity(wt, zt, flip)
        ok = (np.abs(A) >= s_lo) & (np.abs(A) <= s_hi)
        A, t, flip = A[ok], t[ok], flip[ok]
        if A.size == 0:
            continue
        # verification set: the brightest detections, as many as could be in the reference
        # (twice the reference stars expected in the field; chance matches of fainter detections
        # would drown the true ones), and the reference stars at ref_factor x their density
        n_in_all = min(len(ref_all), max_ref) / area_ref * area_img
        n_v = int(min(len(det), max(n_tri, min(n_verify, math.ceil(2.0 * n_in_all)))))
        # votes: hypotheses agreeing on rotation (2 deg), scale (2 %) and the sky position of the
        # image centre (15 reference units) support each other; the most voted are verified
        wc = _to_ref(np.array([centre]), A, t, flip)[:, 0]
        key = np.column_stack(
            [
                flip.astype(int),
                np.round(np.degrees(np.angle(A)) / 2.0),
                np.round(np.log(np.abs(A)) / 0.02),
                np.round(wc.real / 15.0),
                np.round(wc.imag / 15.0),
            ]
        )
        _, inverse, votes = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        first = np.unique(inverse, return_index=True)[1]
        n_hyp = max(max_hypotheses, max_checks // max(n_v, 1))
        order = first[np.argsort(-votes[inverse[first]], kind="stable")][:n_hyp]
        A, t, flip = A[order], t[order], flip[order]
        zv = z_all[:n_v]
        n_rv = int(min(len(ref_all), max_ref, math.ceil(ref_factor * n_v * area_ref / area_img)))
        wv = w_all[:n_rv]
        tree = cKDTree(np.column_stack([wv.real, wv.imag]))
        counts = np.zeros(A.size, int)
        for c0 in range(0, A.size, 256):
            sl = slice(c0, c0 + 256)
            wq = _to_ref(zv, A[sl], t[sl], flip[sl])
            rad = match_radius_px / np.abs(A[sl])
            d, _ = tree.query(np.column_stack([wq.real.ravel(), wq.imag.ravel()]))
            counts[sl] = (d.reshape(wq.shape) <= rad[:, None]).sum(axis=1)
            if time.perf_counter() - t_start > time_budget_s:
                counts, A, t, flip = counts[: sl.stop], A[: sl.stop], t[: sl.stop], flip[: sl.stop]
                break
        tried += A.size
        best = None
        for h in np.argsort(-counts, kind="stable")[:n_refit]:
            sc = _refit_and_score(
                A[h], t[h], bool(flip[h]), zv, wv, match_radius_px, n_tri, tried, area_ref, area_img
            )
            if sc is not None and (best is None or sc["lfa"] < best["lfa"]):
                best = sc
        if best is None:
            best_fail = "no hypothesis kept 3 matches after the refit"
            continue
        if best["di"].size < min_matches or best["lfa"] > max_log10_false_alarm:
            best_fail = (
                f"best match {best['k']} of the {best['n_eff']} brightest stars (log10 false "
                f"alarm {best['lfa']:.1f}) with the {n_tri} brightest detections ({mode} "
                "triangles): not significant"
            )
            continue
        a_h, t_h, f_h = best["a"], best["t"], best["flip"]
        lin = np.array([[a_h.real, -a_h.imag], [a_h.imag, a_h.real]])
        if f_h:
            lin = lin @ np.array([[1.0, 0.0], [0.0, -1.0]])
        return (
            AsterismMatch(
                linear=lin,
                offset=np.array([t_h.real, t_h.imag]),
                det_index=det_ok[best["di"]],
                ref_index=ref_ok[best["ri"]],
                scale=float(abs(a_h)),
                rotation_deg=float(np.degrees(np.angle(a_h))),
                flipped=f_h,
                rms_px=best["rms"],
                log10_false_alarm=best["lfa"],
                n_hypotheses=tried,
                n_stars=n_tri,
            ),
            "",
        )
    return None, best_fail
