"""PSF photometry of all the sources of a frame at once, blends solved together.

psf_photometry fits the effective PSF (rpp_tasks.stages.epsf.EPSFModel, or the field-varying
rpp_tasks.stages.field_psf.FieldPSF) to all sources in one global, sparse, weighted linear
least-squares problem in which stars whose footprints overlap are solved together. The steps are

1. fluxes at the detection centroids (weights 1 / rms^2);
2. one Gauss-Newton step for the positions, with unknowns (f, f dx, f dy) per star (the PSF
   gradient is analytic), weights 1 / (rms^2 + model / gain) from step 1's model;
3. the final fluxes at the refined positions with weights from the step-2 model. Using the model
   rather than the data for the source shot noise keeps fluxes and errors unbiased.

The normal matrix is split into its connected components (groups of mutually overlapping stars),
and each component is solved and inverted densely, batched by component size, so flux errors are
the exact diagonal of the inverse normal matrix, including blend covariance. Large frames are
processed in overlapping bands.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from astropy.stats import sigma_clip  # noqa: F401  (documented alternative; clipping is vectorised below)
from astropy.table import Table
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from rpp_tasks import __version__
from rpp_tasks.stages.phot_common import _MAX_DENSE, _check_inputs, _check_positive, _mags, _xy

__all__ = ["psf_photometry"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# PSF photometry
# --------------------------------------------------------------------------------------------


def _solve_groups(nmat, rhs, comp, ncomp):
    """Solve N x = rhs and return x, diag(N^-1); N is block-diagonal by component ``comp``."""
    return _group_solver(nmat, comp, ncomp)(rhs)


def _group_solver(nmat, comp, ncomp):
    """`_solve_groups` in two steps: the blocks of N inverted once; the function returned solves
    for any right-hand side (the same numbers as `_solve_groups` for each)."""
    nun = comp.size
    sizes = np.bincount(comp, minlength=ncomp)
    order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.empty(nun, np.int64)
    pos[order] = np.arange(nun) - starts[comp[order]]
    coo = nmat.tocoo()
    r, c, v = coo.row, coo.col, coo.data
    size_r = sizes[comp[r]]
    size_u = sizes[comp]
    groups = []
    dinv = np.full(nun, np.nan)
    big = np.zeros(nun, bool)
    for m in np.unique(sizes):
        if m == 0:
            continue
        cm = np.flatnonzero(sizes == m)
        units = np.flatnonzero(size_u == m)
        if m > _MAX_DENSE:
            sub = nmat.tocsr()[units][:, units].tocsc()
            dinv[units] = 1.0 / sub.diagonal()
            big[units] = True
            groups.append((units, sub, None, None))
            continue
        slot = np.full(ncomp, -1, np.int64)
        slot[cm] = np.arange(cm.size)
        blocks = np.zeros((cm.size, m, m))
        e = size_r == m
        blocks[slot[comp[r[e]]], pos[r[e]], pos[c[e]]] = v[e]
        # scale to unit diagonal for conditioning
        d = np.sqrt(np.einsum("kii->ki", blocks))
        d = np.where(d > 0, d, 1.0)
        bs = blocks / d[:, :, None] / d[:, None, :]
        try:
            inv = np.linalg.inv(bs)
        except np.linalg.LinAlgError:
            inv = np.linalg.pinv(bs)
        inv = inv / d[:, :, None] / d[:, None, :]
        su = slot[comp[units]]
        dinv[units] = inv[su, pos[units], pos[units]]
        groups.append((units, inv, su, cm.size))

    def solve(rhs):
        x = np.full(nun, np.nan)
        for units, inv, su, n_blocks in groups:
            if su is None:
                from scipy.sparse.linalg import spsolve

                x[units] = spsolve(inv, rhs[units])
                continue
            vec = np.zeros((n_blocks, inv.shape[1]))
            vec[su, pos[units]] = rhs[units]
            sol = np.einsum("kij,kj->ki", inv, vec)
            x[units] = sol[su, pos[units]]
        return x, dinv.copy(), big.copy()

    return solve


def _empty_psf_columns(out):
    for name in (
        "x_psf",
        "y_psf",
        "flux_psf",
        "flux_err_psf",
        "mag_psf",
        "mag_err_psf",
        "snr_psf",
        "qfit_psf",
        "chi2_psf",
    ):
        out[name] = np.zeros(0)
    out["npix_psf"] = np.zeros(0, np.int64)
    out["flag_psf"] = np.zeros(0, np.int64)
    out["group_size_psf"] = np.zeros(0, np.int64)
    return out


def psf_photometry(
    data_sub,
    rms,
    sources,
    epsf,
    *,
    gain_e_per_adu,
    exptime_s,
    mask=None,
    fit_shape=None,
    refine_positions=True,
    max_shift_px=1.0,
    min_snr_refine=3.0,
    extended_wings=True,
    max_elements=None,
):
    """
    Simultaneous PSF-fitting photometry of all sources with an effective PSF.

    Parameters
    ----------
    data_sub : array_like
        Background-subtracted image (ADU).
    rms : array_like or float
        Background RMS map (ADU, read noise included).
    sources : `~astropy.table.Table`
        Sources with ``x_centroid``, ``y_centroid`` (0-based px); other columns are kept.
    epsf : `rpp_tasks.stages.epsf.EPSFModel`
        Effective PSF (unit total flux).
    gain_e_per_adu : float
        Gain, for the source shot-noise term ``model / gain`` of the variance.
    exptime_s : float
        Exposure time for magnitudes per second.
    mask : array_like of bool, optional
        Pixels excluded from the fit.
    fit_shape : int, optional
        Width (odd, px) of the fitted footprint of each star; default ``2 * round(2 * FWHM) + 1``
        (at least 7), capped by the ePSF footprint.
    refine_positions : bool, optional
        Do the Gauss-Newton position step (otherwise positions stay at the centroids).
    max_shift_px : float, optional
        Position updates are clipped to this length.
    min_snr_refine : float, optional
        Only stars with a step-1 flux S/N above this get a position update.
    extended_wings : bool, optional
        With a model that knows its footprint (`rpp_tasks.stages.field_psf.FieldPSF`), the wings of
        bright stars beyond the fitted footprint (out to where they fall below 2 % of the
        background noise) are subtracted from their neighbours' pixels as a fixed contribution
        (from the step-1 fluxes, then the final ones): without it, a star 3-4 FWHM from a
        brighter one takes some of that star's wing light.
    max_elements : int, optional
        Memory bound: when the stars' footprints hold more pixels than this (default: a thirtieth
        of the frame), the frame is fitted in horizontal bands of equal star counts, each with a
        64 px margin of neighbours fitted along (their results are taken from their own band).

    Returns
    -------
    table : `~astropy.table.Table`
        A copy of ``sources`` plus ``x_psf``, ``y_psf``, ``flux_psf``, ``flux_err_psf``,
        ``mag_psf``, ``mag_err_psf``, ``snr_psf``, ``qfit_psf`` (sum |residual| / flux over the
        footprint, as photutils), ``chi2_psf`` (reduced chi^2), ``npix_psf`` (fitted pixels),
        ``group_size_psf`` (stars fitted together) and ``flag_psf`` (1: no usable pixel,
        2: position not refined, 4: footprint truncated by the edge or mask, 8: very large
        group, errors approximate).

    Raises
    ------
    ValueError
        Shape mismatch, missing position columns, non-positive gain or exptime.
    """
    func = "psf_photometry"
    data, rms, mask = _check_inputs(data_sub, rms, mask, func)
    _check_positive(func, gain_e_per_adu=gain_e_per_adu, exptime_s=exptime_s)
    out = Table(sources, copy=True)
    out.meta.update(
        psf_fwhm_px=float(epsf.fwhm_px),
        psf_oversampling=int(epsf.oversampling),
        psf_n_stars=int(epsf.n_stars),
        exptime_s=float(exptime_s),
        gain_e_per_adu=float(gain_e_per_adu),
        rpp_tasks_version=__version__,
    )
    n = len(out)
    if n == 0:
        out.meta["no_sources"] = True
        return _empty_psf_columns(out)
    x0, y0 = _xy(sources, func)
    ny, nx = data.shape
    if fit_shape is None:
        fit_shape = 2 * int(round(2.0 * epsf.fwhm_px)) + 1
    fit_shape = max(7, int(fit_shape) | 1)
    if epsf.size_px:
        fit_shape = min(fit_shape, int(epsf.size_px) | 1)
    half = fit_shape // 2
    if max_elements is None:
        max_elements = max(50_000, data.size // 30)
    margin = 64
    if n * fit_shape**2 > max_elements and ny > 8 * margin:
        return _psf_photometry_bands(
            data,
            rms,
            sources,
            epsf,
            out,
            y0,
            n_bands=int(math.ceil(n * fit_shape**2 / max_elements)),
            margin=margin,
            kwargs=dict(
                gain_e_per_adu=gain_e_per_adu,
                exptime_s=exptime_s,
                mask=mask,
                fit_shape=fit_shape,
                refine_positions=refine_positions,
                max_shift_px=max_shift_px,
                min_snr_refine=min_snr_refine,
                extended_wings=extended_wings,
                max_elements=np.inf,
            ),
        )

    finite = (
        np.isfinite(x0)
        & np.isfinite(y0)
        & (x0 > -0.5)
        & (y0 > -0.5)
        & (x0 < nx - 0.5)
        & (y0 < ny - 0.5)
    )
    x = np.where(finite, x0, 0.0)
    y = np.where(finite, y0, 0.0)
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    k = np.arange(-half, half + 1)
    px = (ix[:, None] + k)[:, None, :] + 0 * k[None, :, None]
    py = (iy[:, None] + k)[:, :, None] + 0 * k[None, None, :]
    valid = (px >= 0) & (px < nx) & (py >= 0) & (py < ny) & finite[:, None, None]
    flat = np.where(valid, py * nx + px, 0)
    del px, py
    dat_all = np.asarray(data).ravel()  # gathered, then converted: no full-frame copies
    valid &= np.isfinite(dat_all[flat])
    if mask is not None:
        valid &= ~mask.ravel()[flat]
    rms_all = np.asarray(rms).ravel()
    r_flat = rms_all[flat]
    valid &= np.isfinite(r_flat) & (r_flat > 0)

    sel_star, sel_r, sel_c = (v.astype(np.int32) for v in np.nonzero(valid))
    pix = flat[sel_star, sel_r, sel_c]
    del flat, r_flat
    upix, row = np.unique(pix, return_inverse=True)
    row = row.astype(np.int32)
    d = dat_all[upix].astype(np.float64)
    v_bkg = rms_all[upix].astype(np.float64) ** 2
    npix_star = valid.sum(axis=(1, 2))
    flag = np.zeros(n, np.int64)
    flag[npix_star == 0] |= 1
    flag[(npix_star > 0) & (npix_star < fit_shape**2)] |= 4
    nrow = upix.size

    # overlap groups: stars sharing a pixel
    inc = sparse.csr_matrix((np.ones(pix.size, np.float32), (row, sel_star)), shape=(nrow, n))
    del pix
    adj = (inc.T @ inc).tocsr()
    del inc
    ncomp, comp = connected_components(adj, directed=False)
    del adj
    group_size = np.bincount(comp, minlength=ncomp)[comp]

    def design(xs, ys, deriv):
        return epsf.stamps(xs, ys, half, ix=ix, iy=iy, derivatives=deriv)

    # wings of bright stars beyond their fitted footprint (subtracted as a fixed contribution)
    tail_ok = hasattr(epsf, "_footprint_halves") and extended_wings
    rms_typ = float(np.median(np.sqrt(v_bkg))) if tail_ok and nrow else float("nan")

    geo = None

    def tails(xs_, ys_, f_):
        nonlocal geo
        if not tail_ok:
            return 0.0
        if geo is None:
            geo = _tail_geometry(epsf, xs_, ys_, f_, half, rms_typ, upix, nx, ny)
            log.debug("psf_photometry: %d wing-tail pixel entries", geo[0].size)
        return _tail_values(epsf, geo, xs_, ys_, f_, nrow)

    tail = 0.0

    def solve_flux(p_vals, w, same_as=None):
        # ``same_as``: the ``system`` of an earlier call with the same p_vals and w (only the
        # tail, hence the right-hand side, has changed): its matrices and inverted blocks
        if same_as is None:
            a = sparse.csr_matrix(
                (p_vals[sel_star, sel_r, sel_c], (row, sel_star)), shape=(nrow, n)
            )
            aw = sparse.diags(w) @ a
            nmat = (a.T @ aw).tocsr()
            diag = nmat.diagonal()
            ok = diag > 0
            nmat = nmat + sparse.diags(np.where(ok, 0.0, 1.0))
            same_as = (a, aw, ok, _group_solver(nmat, comp, ncomp))
        a, aw, ok, solver = same_as
        rhs = aw.T @ (d - tail)
        f, dinv, big = solver(np.where(ok, rhs, 0.0))
        f[~ok] = np.nan
        dinv[~ok] = np.nan
        return f, dinv, big, a, same_as

    # step 1: fluxes at the centroids, background-only weights
    if refine_positions:
        p0, gx, gy = design(x, y, True)
    else:
        p0 = design(x, y, False)
    w0 = 1.0 / v_bkg
    f1, dinv1, big, a0, _ = solve_flux(p0, w0)
    model = a0 @ np.nan_to_num(f1)
    del a0, w0
    xs, ys = x.copy(), y.copy()

    tail = tails(x, y, f1)
    if refine_positions:
        w1 = 1.0 / (v_bkg + np.maximum(model + tail, 0.0) / gain_e_per_adu)
        val = p0
        # CSR of [P, dP/dx, dP/dy] per star, built row-sorted without COO temporaries
        order = np.argsort(row, kind="stable")
        nnz = row.size
        vals = np.empty(3 * nnz)
        cols = np.empty(3 * nnz, np.int32)
        s3, r3, c3 = sel_star[order], sel_r[order], sel_c[order]
        vals[0::3] = val[s3, r3, c3]
        vals[1::3] = gx[s3, r3, c3]
        vals[2::3] = gy[s3, r3, c3]
        cols[0::3] = 3 * s3
        cols[1::3] = 3 * s3 + 1
        cols[2::3] = 3 * s3 + 2
        del s3, r3, c3, gx, gy, order
        indptr = np.zeros(nrow + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=nrow) * 3, out=indptr[1:])
        a3 = sparse.csr_matrix((vals, cols, indptr), shape=(nrow, 3 * n))
        del vals, cols, indptr
        aw3 = sparse.diags(w1) @ a3
        nmat3 = (a3.T @ aw3).tocsr()
        rhs3 = aw3.T @ (d - tail)
        del a3, aw3
        diag3 = nmat3.diagonal()
        ok3 = diag3 > 0
        nmat3 = nmat3 + sparse.diags(np.where(ok3, 0.0, 1.0))
        comp3 = np.repeat(comp, 3)
        sol, _, _ = _solve_groups(nmat3, np.where(ok3, rhs3, 0.0), comp3, ncomp)
        del nmat3
        f_gn = sol[0::3]
        snr1 = f1 / np.sqrt(dinv1)
        can = np.isfinite(f_gn) & (f_gn > 0) & (snr1 > min_snr_refine) & ok3[0::3]
        fsafe = np.where(can, f_gn, 1.0)
        dx = np.where(can, sol[1::3] / fsafe, 0.0)
        dy = np.where(can, sol[2::3] / fsafe, 0.0)
        shift = np.hypot(dx, dy)
        scale = np.where(shift > max_shift_px, max_shift_px / np.maximum(shift, 1e-12), 1.0)
        xs = x + dx * scale
        ys = y + dy * scale
        flag[~can] |= 2
        f_w = np.where(can, f_gn, f1)
    else:
        flag |= 2
        f_w = f1

    # final fluxes at (xs, ys), weights from the model of the refined positions
    del p0
    p2 = design(xs, ys, False)
    a_w = sparse.csr_matrix((p2[sel_star, sel_r, sel_c], (row, sel_star)), shape=(nrow, n))
    if tail_ok:
        tail = tails(xs, ys, f_w)
    model = a_w @ np.nan_to_num(f_w)
    w2 = 1.0 / (v_bkg + np.maximum(model + tail, 0.0) / gain_e_per_adu)
    f2, dinv2, big2, a2, system2 = solve_flux(p2, w2)
    if tail_ok:
        tail = tails(xs, ys, f2)
        f2, dinv2, big2, a2, _ = solve_flux(p2, w2, same_as=system2)
    flag[big | big2] |= 8
    err2 = np.sqrt(dinv2)
    model2 = a2 @ np.nan_to_num(f2)
    resid = d - tail - model2
    abs_res = np.bincount(sel_star, np.abs(resid[row]), minlength=n)
    chi2 = np.bincount(sel_star, (resid[row] ** 2 * w2[row]), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        qfit = abs_res / f2
        chi2r = chi2 / np.maximum(npix_star - 1, 1)
    nofit = ~finite | (npix_star == 0)
    for arr in (f2, err2, qfit, chi2r):
        arr[nofit] = np.nan
    xs = np.where(finite, xs, np.nan)
    ys = np.where(finite, ys, np.nan)
    mag, mag_err, snr = _mags(f2, err2, exptime_s)
    out["x_psf"] = xs
    out["y_psf"] = ys
    out["flux_psf"] = f2
    out["flux_err_psf"] = err2
    out["mag_psf"] = mag
    out["mag_err_psf"] = mag_err
    out["snr_psf"] = snr
    out["qfit_psf"] = qfit
    out["chi2_psf"] = chi2r
    out["npix_psf"] = npix_star.astype(np.int64)
    out["group_size_psf"] = group_size.astype(np.int64)
    out["flag_psf"] = flag
    out.meta.update(psf_fit_shape_px=fit_shape, no_sources=False, psf_n_groups=int(ncomp))
    log.info(
        "psf_photometry: %d sources, %d overlap groups (largest %d), fit shape %d px",
        n,
        ncomp,
        int(group_size.max()),
        fit_shape,
    )
    return out


def _psf_photometry_bands(data, rms, sources, epsf, out, y0, *, n_bands, margin, kwargs):
    """`psf_photometry` band by band (equal star counts), each with a margin of neighbours."""
    n = len(sources)
    yy = np.where(np.isfinite(y0), y0, -1.0)
    edges = np.quantile(yy, np.linspace(0.0, 1.0, n_bands + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    cols = None
    n_groups = 0
    for a, b in zip(edges[:-1], edges[1:]):
        own = (yy >= a) & (yy < b) if np.isfinite(b) else (yy >= a)
        if not np.any(own):
            continue
        ctx = (yy >= a - margin) & (yy < b + margin)
        idx = np.flatnonzero(ctx)
        t = psf_photometry(data, rms, sources[idx], epsf, **kwargs)
        n_groups += int(t.meta.get("psf_n_groups", 0))
        if cols is None:
            cols = {
                c: np.zeros(n, dtype=t[c].dtype) for c in t.colnames if c not in sources.colnames
            }
        keep = own[idx]
        for c in cols:
            cols[c][idx[keep]] = np.asarray(t[c])[keep]
        meta_fit = t.meta.get("psf_fit_shape_px")
    for c, v in cols.items():
        out[c] = v
    out.meta.update(
        psf_fit_shape_px=meta_fit, no_sources=False, psf_n_groups=n_groups, psf_n_bands=n_bands
    )
    return out


def _render(model, shape, x, y, flux, rms_typ, out=None):
    """float32 model image (added into ``out`` when given); footprints follow the brightness
    when the model supports it."""
    if hasattr(model, "_footprint_halves"):
        return model.render(shape, x, y, flux, rms=rms_typ, out=out)
    img = model.render(shape, x, y, flux)
    if out is None:
        return img.astype(np.float32)
    out += img.astype(np.float32)
    return out


def _strip_map(func, a, b, strip=256):
    """``func(a, b)`` evaluated row strip by row strip into a float32 array (no full-frame
    temporaries); ``b`` may be a scalar."""
    out = np.empty(np.shape(a), np.float32)
    b = np.broadcast_to(np.asarray(b, np.float32), out.shape)
    for r0 in range(0, out.shape[0], strip):
        sl = slice(r0, r0 + strip)
        out[sl] = func(np.asarray(a[sl], np.float32), b[sl])
    return out


def _tail_geometry(model, x, y, flux, half, rms_typ, upix, nx, ny):
    """Where the wings of bright stars beyond their ``half`` footprint fall on fitted pixels.

    Only stars whose wings reach another source are kept. Returns ``(star, pos, px, py)``:
    star index, index into ``upix`` and pixel coordinates of each (star, pixel) pair.
    """
    empty = (np.zeros(0, np.int64),) * 4
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0)
    if not np.any(ok) or not np.isfinite(rms_typ) or rms_typ <= 0 or upix.size == 0:
        return empty
    idx = np.flatnonzero(ok)
    halves = model._footprint_halves(x[idx], y[idx], flux[idx], rms_typ, 2 * half)
    big = halves > half
    idx, halves = idx[big], halves[big]
    if idx.size == 0:
        return empty
    pts = np.column_stack([np.where(ok, x, -1e9), np.where(ok, y, -1e9)])
    reach = cKDTree(pts).query_ball_point(pts[idx], (halves + half) * 1.415, return_length=True)
    idx, halves = idx[reach > 1], halves[reach > 1]
    upy, upx = np.divmod(upix, nx)
    # every (star, row) pair of the stars' boxes: the fitted pixels of that row within h of the
    # star's column are one run of the sorted ``upix`` (star by star, row by row, column order)
    cy = np.rint(y[idx]).astype(np.int64)
    cx = np.rint(x[idx]).astype(np.int64)
    r0 = np.maximum(cy - halves, 0)
    nr = np.maximum(np.minimum(cy + halves, ny - 1) - r0 + 1, 0)
    pair_star = np.repeat(np.arange(idx.size), nr)
    rows = r0[pair_star] + (np.arange(pair_star.size) - np.repeat(np.cumsum(nr) - nr, nr))
    c_lo = np.maximum(cx - halves, 0)[pair_star]
    c_hi = np.minimum(cx + halves, nx - 1)[pair_star]
    lo = np.searchsorted(upix, rows * nx + c_lo)
    cnt = np.maximum(np.searchsorted(upix, rows * nx + c_hi + 1) - lo, 0)
    pair = np.repeat(np.arange(lo.size), cnt)
    pos = lo[pair] + (np.arange(pair.size) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    s_loc = pair_star[pair]
    use = (np.abs(upx[pos] - cx[s_loc]) > half) | (np.abs(upy[pos] - cy[s_loc]) > half)
    if not np.any(use):
        return empty
    pos = pos[use]
    return idx[s_loc[use]], pos, upx[pos], upy[pos]


def _tail_values(model, geo, x, y, flux, nrow):
    """Light of the wings of `_tail_geometry` at the fitted pixels for positions/fluxes."""
    from rpp_tasks.stages.field_psf import _ell_pix

    star, pos, px, py = geo
    out = np.zeros(nrow)
    if star.size == 0:
        return out
    us, inv = np.unique(star, return_inverse=True)
    a, b, c, u = (v[inv] for v in model.params_at(x[us], y[us]))
    f = np.nan_to_num(flux[star])
    val = _ell_pix(px - x[star], py - y[star], a, b, c, u, integrate=False)
    return np.bincount(pos, f * np.nan_to_num(val), minlength=nrow)
