"""The PSF that varies across the field: an elliptical, pixel-integrated Moffat whose FWHM,
ellipticity and 1/beta are polynomials of position.

FieldPSF evaluates the model (and its derivatives) at any star's position, renders stamps, gives
the local FWHM/ellipticity/angle for the report's PSF map, the fraction of light inside a radius
(aperture corrections) and its uncertainty from the fit's covariance (flux_fraction_sigma), and
serialises itself into summary.json. It is fitted by rpp_tasks.stages.field_psf_fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rpp_tasks.stages.psf import _GL_W, _GL_X, _LN2, _U_MAX, _drawable, _stamp_pixels

__all__ = ["FieldPSF"]


# --------------------------------------------------------------------------------------------
# PSF varying across the field
# --------------------------------------------------------------------------------------------
#
# Profile (unit total flux), with ``q = a dx^2 + 2 b dx dy + c dy^2`` (a, b, c in 1/px^2) and
# ``u = 1/beta``:
#
#     f = N (1 + k q)^(-1/u),   k = 4 (2^u - 1),   N = k (1/u - 1) sqrt(ac - b^2) / pi
#
# The half maximum is at q = 1/4 whatever u, so a circular star of FWHM F has a = c = 1/F^2, and
# u -> 0 is the Gaussian exp(-4 ln2 q). The ellipse (a, b, c) comes from the FWHM s (geometric
# mean of the axes) and the ellipticity components e1 = e cos 2t, e2 = e sin 2t (e = 1 - b/a, t the
# major-axis angle); s, e1, e2 and u are polynomials of the normalised position. The profile is
# integrated over each pixel by Gauss-Legendre quadrature (3x3 nodes in the core, 2x2 outside).

_U_MIN_FIELD = 1e-4  # u below this is the Gaussian limit numerically (beta = 10 000)
_GL2_NODES = tuple(
    zip(0.5 * np.polynomial.legendre.leggauss(2)[0], 0.5 * np.polynomial.legendre.leggauss(2)[1])
)

_PARAM_NAMES = ("fwhm_px", "e1", "e2", "u")
_FWHM_MIN_PX = 0.5


def _abc_from_shape(s, e1, e2):
    """Quadratic form ``(a, b, c)`` (1/px^2) of an ellipse of FWHM ``s`` (geometric mean of the
    axes) and ellipticity components ``e1, e2`` (``e = 1 - b/a``)."""
    s = np.asarray(s, float)
    e1 = np.asarray(e1, float)
    e2 = np.asarray(e2, float)
    e = np.minimum(np.hypot(e1, e2), 0.9)
    # a PSF narrower than half a pixel is not measurable (pixel integration dominates)
    inv2 = 0.5 / np.maximum(s, _FWHM_MIN_PX) ** 2
    tr = (1.0 - e) + 1.0 / (1.0 - e)
    k = (2.0 - e) / (1.0 - e)
    return inv2 * (tr - e1 * k), -inv2 * e2 * k, inv2 * (tr + e1 * k)


def _abc_jacobian(s, e1, e2, eps=1e-6):
    """d(a, b, c) / d(s, e1, e2) per star: ``(N, 3, 3)``, rows a, b, c (finite differences)."""
    base = np.stack(_abc_from_shape(s, e1, e2), -1)
    cols = []
    for k, h in enumerate((eps * np.maximum(np.abs(s), 1.0), eps, eps)):
        args = [np.asarray(s, float), np.asarray(e1, float), np.asarray(e2, float)]
        args[k] = args[k] + h
        cols.append((np.stack(_abc_from_shape(*args), -1) - base) / np.asarray(h)[..., None])
    return np.stack(cols, -1)


def _poly_terms(order):
    """Exponents ``(i, j)`` of ``X**i Y**j`` for total degree <= order, by degree."""
    return [(d - j, j) for d in range(int(order) + 1) for j in range(d + 1)]


def _poly_basis(x, y, order, norm):
    """``(N, T)`` design of the polynomial terms at positions (x, y)."""
    cx, cy, hx, hy = norm
    xn = (np.asarray(x, float) - cx) / hx
    yn = (np.asarray(y, float) - cy) / hy
    return np.stack([xn**i * yn**j for i, j in _poly_terms(order)], axis=-1)


def _ell_pix(dx, dy, a, b, c, u, *, derivs=False, integrate=True):
    """Pixel-integrated unit-flux elliptical profile at pixel offsets ``(dx, dy)`` (pixel - star).

    ``a, b, c, u`` broadcast against ``dx``. Returns the values, and with ``derivs`` a dict of
    derivatives with respect to ``dx``, ``dy`` (pixel offsets) and ``a, b, c, u``
    (``derivs="xy"``: those by ``dx``, ``dy`` only, the shape derivatives are not computed).
    Without ``integrate`` the profile is sampled at the pixel centres (for far wings, where the
    pixel integration changes values by less than 1e-3 of themselves).
    """
    u_in = u
    u = np.clip(u, _U_MIN_FIELD, _U_MAX)
    det = a * c - b * b
    det = np.where(det > 0, det, np.nan)
    kap = 4.0 * (np.exp2(u) - 1.0)
    inv_u = 1.0 / u
    norm = kap * (inv_u - 1.0) * np.sqrt(det) / math.pi
    shape = np.broadcast_shapes(
        np.shape(dx), np.shape(dy), np.shape(a), np.shape(b), np.shape(c), np.shape(u)
    )
    val = np.zeros(shape)
    shape_derivs = derivs is True
    if derivs:
        acc = {
            k: np.zeros(shape) for k in ("x", "y", "a", "b", "c", "u")[: 6 if shape_derivs else 2]
        }
        dkap = 4.0 * _LN2 * np.exp2(u)
        dlnn_du = dkap / kap - 1.0 / (u * (1.0 - u))
    if integrate is True or integrate == 3:
        nodes = tuple(zip(_GL_X, _GL_W))
    elif integrate == 2:
        nodes = _GL2_NODES
    else:
        nodes = ((0.0, 1.0),)
    # t = 1 + kap q with q = a ex^2 + 2 b ex ey + c ey^2, assembled from the parts that depend
    # on one node coordinate only (small arrays), then in place on full-size buffers
    ka, kb2, kc = kap * a, 2.0 * kap * b, kap * c
    t = np.empty(shape)
    f = np.empty(shape)
    if derivs:
        lt, rt, g, tmp = (np.empty(shape) for _ in range(4))
    for xi, wi in nodes:
        ex = dx + xi
        tx = ka * ex * ex
        bx = kb2 * ex
        for yj, wj in nodes:
            ey = dy + yj
            np.multiply(bx, ey, out=t)
            t += tx
            t += 1.0 + kc * ey * ey
            wgt = wi * wj
            if not derivs:
                np.log(t, out=f)
                f *= -inv_u
                np.exp(f, out=f)
                f *= wgt
                val += f
                continue
            np.log(t, out=lt)
            np.multiply(lt, -inv_u, out=f)
            np.exp(f, out=f)
            f *= wgt  # the weighted profile at this node
            val += f
            np.divide(1.0, t, out=rt)
            # d f / d q = f (-kap / u) / t, weighted
            np.multiply(f, rt, out=g)
            g *= -inv_u * kap
            # (the sums of the small one-coordinate parts go into tmp: no full-size temporary)
            np.add(2.0 * (a * ex), 2.0 * (b * ey), out=tmp)
            tmp *= g
            acc["x"] += tmp
            np.add(2.0 * (b * ex), 2.0 * (c * ey), out=tmp)
            tmp *= g
            acc["y"] += tmp
            if not shape_derivs:
                continue
            np.multiply(g, ex * ex, out=tmp)
            acc["a"] += tmp
            np.multiply(g, 2.0 * ex, out=tmp)
            tmp *= ey
            acc["b"] += tmp
            np.multiply(g, ey * ey, out=tmp)
            acc["c"] += tmp
            # d f / d u = f (ln t / u^2 - (dkap / kap) (1 - 1/t) / u)
            np.subtract(1.0, rt, out=tmp)
            tmp *= -inv_u * dkap / kap
            lt *= inv_u * inv_u
            tmp += lt
            tmp *= f
            acc["u"] += tmp
    val = val * norm
    if not derivs:
        return val
    out = {"x": acc["x"] * norm, "y": acc["y"] * norm}
    if not shape_derivs:
        return val, out
    # d ln N / d(a, b, c) = (c, -2b, a) / (2 det)
    out["a"] = acc["a"] * norm + val * (c / (2.0 * det))
    out["b"] = acc["b"] * norm + val * (-b / det)
    out["c"] = acc["c"] * norm + val * (a / (2.0 * det))
    out["u"] = (acc["u"] * norm + val * dlnn_du) * ((u_in >= _U_MIN_FIELD) & (u_in <= _U_MAX))
    return val, out


def _aperture_reach(r, half):
    """``(he, where)``: half-width and pixel mask of a ``2 he + 1`` stamp holding every pixel
    that SEP's exact sum over a circle of radius ``r`` can use, for a circle centred within
    0.5 px (per axis) of the stamp centre. SEP uses the pixels whose centre is closer than
    ``r + 0.7072`` to the circle's centre, so closer than ``r + 1.4143`` to the stamp centre."""
    he = min(int(half), int(math.ceil(r)) + 1)
    k = np.arange(-he, he + 1)
    return he, np.hypot(k[:, None], k[None, :]) <= float(r) + 1.5


def _flat(v, where):
    """``(N, 1, m)`` values of paired pixel lists as ``(N, m)`` (``where`` given), else as is."""
    return v if where is None else v[:, 0, :]


def _shape_from_abc(a, b, c, u):
    """FWHM (geometric mean of the axes), major/minor FWHM, ellipticity, angle (deg), beta."""
    a, b, c = (np.asarray(v, float) for v in (a, b, c))
    tr = 0.5 * (a + c)
    dd = np.sqrt(np.maximum(0.25 * (a - c) ** 2 + b * b, 0.0))
    lmin = np.maximum(tr - dd, 1e-12)  # along the major axis
    lmax = np.maximum(tr + dd, 1e-12)
    f_major = 1.0 / np.sqrt(lmin)
    f_minor = 1.0 / np.sqrt(lmax)
    theta = 0.5 * np.degrees(np.arctan2(-2.0 * b, c - a))
    u = np.clip(np.asarray(u, float), 0.0, _U_MAX)
    beta = np.where(u < 1.01 * _U_MIN_FIELD, np.inf, 1.0 / np.maximum(u, 1e-300))
    return (
        np.sqrt(f_major * f_minor),
        f_major,
        f_minor,
        1.0 - f_minor / f_major,
        np.mod(theta, 180.0),
        beta,
    )


@dataclass(frozen=True, eq=False)
class FieldPSF:
    """A PSF that varies smoothly across the field: an elliptical Moffat (Gaussian in the limit)
    whose four shape parameters are polynomials of the position.

    Attributes
    ----------
    coeffs : numpy.ndarray
        ``(4, T)`` polynomial coefficients of ``a, b, c`` (1/px^2) and ``u = 1/beta`` over the
        terms ``X**i Y**j`` (total degree <= ``order``, in the order of `_poly_terms`), with
        ``X = (x - cx) / hx``, ``Y = (y - cy) / hy`` (``norm = (cx, cy, hx, hy)``).
    order : int
        Polynomial order (0: the same PSF everywhere).
    norm : tuple of float
    shape : tuple of int
        ``(ny, nx)`` of the frame the model was fitted on.
    n_stars : int
        PSF stars of the final fit.
    size_px : int
        Footprint width (px) used for rendering the model of a star.
    flags : tuple of str
    stats : dict
        Fit statistics (reduced chi^2, stars per order tried, reason for the order).
    """

    coeffs: np.ndarray
    order: int
    norm: tuple
    shape: tuple
    n_stars: int
    size_px: int
    flags: tuple = ()
    stats: dict = field(default_factory=dict)
    oversampling: int = 1  # duck-typing with EPSFModel (analytic model: no grid)
    #: ``(4 T, 4 T)`` covariance of ``coeffs.ravel()`` from the fit (zeros for fixed terms);
    #: None when unknown (e.g. a model rebuilt by `from_dict`)
    cov: np.ndarray | None = None

    # ---------------------------------------------------------------- local parameters
    def shape_params_at(self, x, y):
        """``(fwhm_px, e1, e2, u)`` at positions (the polynomials themselves)."""
        bas = _poly_basis(x, y, self.order, self.norm)
        p = bas @ np.asarray(self.coeffs, float).T  # (..., 4)
        return p[..., 0], p[..., 1], p[..., 2], p[..., 3]

    def params_at(self, x, y):
        """``(a, b, c, u)`` of the profile at positions (arrays of the shape of x, y)."""
        s, e1, e2, u = self.shape_params_at(x, y)
        a, b, c = _abc_from_shape(s, e1, e2)
        return a, b, c, np.clip(u, _U_MIN_FIELD, _U_MAX)

    def shape_at(self, x, y):
        """Local PSF: dict of ``fwhm_px`` (geometric mean of the axes), ``fwhm_major_px``,
        ``fwhm_minor_px``, ``ellipticity`` (1 - b/a), ``theta_deg`` (major axis from +x) and
        ``beta``, as arrays."""
        fw, fa, fb, e, th, beta = _shape_from_abc(*self.params_at(x, y))
        return {
            "fwhm_px": fw,
            "fwhm_major_px": fa,
            "fwhm_minor_px": fb,
            "ellipticity": e,
            "theta_deg": th,
            "beta": beta,
        }

    @property
    def fwhm_px(self) -> float:
        """Median FWHM over the frame (a 9x9 grid of positions)."""
        cached = self.__dict__.get("_fwhm_med")
        if cached is None:
            ny, nx = self.shape
            gx, gy = np.meshgrid(np.linspace(0, nx - 1, 9), np.linspace(0, ny - 1, 9))
            cached = float(np.median(self.shape_at(gx.ravel(), gy.ravel())["fwhm_px"]))
            object.__setattr__(self, "_fwhm_med", cached)
        return cached

    @property
    def beta(self) -> float:
        ny, nx = self.shape
        b = self.shape_at(np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))["beta"]
        return float(b[0])

    def positions_summary(self) -> dict:
        """The local PSF at the centre, the middle of the edges and the corners (JSON-safe)."""
        ny, nx = self.shape
        pts = {
            "centre": ((nx - 1) / 2.0, (ny - 1) / 2.0),
            "corner_ll": (0.0, 0.0),
            "corner_lr": (nx - 1.0, 0.0),
            "corner_ul": (0.0, ny - 1.0),
            "corner_ur": (nx - 1.0, ny - 1.0),
        }
        xs = np.array([p[0] for p in pts.values()])
        ys = np.array([p[1] for p in pts.values()])
        sh = self.shape_at(xs, ys)
        out = {}
        for i, name in enumerate(pts):
            out[name] = {
                "x": float(xs[i]),
                "y": float(ys[i]),
                "fwhm_px": round(float(sh["fwhm_px"][i]), 4),
                "ellipticity": round(float(sh["ellipticity"][i]), 4),
                "theta_deg": round(float(sh["theta_deg"][i]), 2),
                "beta": round(float(sh["beta"][i]), 3) if np.isfinite(sh["beta"][i]) else None,
            }
        return out

    def to_dict(self) -> dict:
        """JSON-safe description: enough to rebuild the model with `from_dict`."""
        return {
            "kind": "field_moffat",
            "model": "elliptical Moffat (Gaussian when beta is inf), pixel-integrated; "
            "fwhm_px, e1, e2 and u = 1/beta are polynomials of "
            "X = (x - cx) / hx, Y = (y - cy) / hy",
            "order": int(self.order),
            "n_terms": len(_poly_terms(self.order)),
            "terms": [f"x^{i} y^{j}" for i, j in _poly_terms(self.order)],
            "params": list(_PARAM_NAMES),
            "coeffs": [[float(v) for v in row] for row in np.asarray(self.coeffs)],
            "norm": [float(v) for v in self.norm],
            "shape": [int(v) for v in self.shape],
            "n_stars": int(self.n_stars),
            "size_px": int(self.size_px),
            "fwhm_px": round(self.fwhm_px, 4),
            "at": self.positions_summary(),
            "flags": list(self.flags),
            "stats": _json_clean(self.stats),
        }

    @classmethod
    def from_dict(cls, d) -> FieldPSF:
        """Rebuild a model from `to_dict` output (e.g. a frame's ``summary.json``)."""
        return cls(
            coeffs=np.asarray(d["coeffs"], float),
            order=int(d["order"]),
            norm=tuple(float(v) for v in d["norm"]),
            shape=tuple(int(v) for v in d["shape"]),
            n_stars=int(d.get("n_stars", 0)),
            size_px=int(d.get("size_px", 0)) or 15,
            flags=tuple(d.get("flags", ())),
            stats=dict(d.get("stats", {})),
        )

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, dx, dy, x, y):
        """Pixel values of a unit-flux star at ``(x, y)`` for pixel offsets ``(dx, dy)``."""
        a, b, c, u = self.params_at(np.asarray(x, float), np.asarray(y, float))
        return _ell_pix(np.asarray(dx, float), np.asarray(dy, float), a, b, c, u)

    def stamps(
        self, x, y, half, *, ix=None, iy=None, derivatives=False, integrate=True, where=None
    ):
        """
        Model stamps of unit-flux stars at ``(x, y)`` on the ``(2*half+1)^2`` pixels around
        ``(ix, iy)`` (default ``rint(x, y)``), each with its own local PSF.

        Returns ``(N, S, S)`` values and, with ``derivatives``, ``dE/dx_star`` and ``dE/dy_star``
        (same interface as `EPSFModel.stamps`). With ``where`` (``(S, S)`` bool), only those
        pixels are evaluated (the same values as without it) and the others are 0.
        """
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        ix = np.rint(x) if ix is None else np.asarray(ix)
        iy = np.rint(y) if iy is None else np.asarray(iy)
        k = np.arange(-half, half + 1, dtype=float)
        a, b, c, u = (v[:, None, None] for v in self.params_at(x, y))
        n = x.size
        s = k.size
        new = np.empty if where is None else np.zeros
        val = new((n, s, s))
        if derivatives:
            gx = new((n, s, s))
            gy = new((n, s, s))
        # 3x3 Gauss-Legendre nodes per pixel in the core (|offset| <= ~0.8 FWHM), 2x2 in the
        # wings, where the profile is smooth on the pixel scale (errors < 1e-4 of the peak)
        fwhm_max = float(np.max(1.0 / np.sqrt(np.maximum(self._lmin(a, b, c), 1e-12))))
        hc = min(half, max(1, int(math.ceil(0.8 * fwhm_max))))
        split = integrate is True and hc < half
        core = slice(half - hc, half + hc + 1)
        chunk = max(1, 60_000 // (s * s))  # bounds the temporaries of the quadrature
        # the wing quadrature only on the pixels outside the core (rows above and below it,
        # then the columns left and right of it): each pixel is evaluated once
        out_rows = np.r_[0 : half - hc, half + hc + 1 : s]
        out_cols = out_rows
        blocks = [(slice(None), slice(None))]
        if split:
            blocks = [(core, core), (out_rows, slice(None)), (core, out_cols)]
        if where is not None:
            # pixel lists (rows, cols paired): the core's, then the wings'
            in_core = np.zeros((s, s), bool)
            if split:
                in_core[core, core] = True
            else:
                in_core[:] = True
            where = np.asarray(where, bool)
            blocks = [np.nonzero(where & in_core), np.nonzero(where & ~in_core)]
        for i0 in range(0, n, chunk):
            sl = slice(i0, min(n, i0 + chunk))
            ox = (ix[sl] - x[sl])[:, None, None]
            oy = (iy[sl] - y[sl])[:, None, None]
            pars = (a[sl], b[sl], c[sl], u[sl])
            for j, (rows, cols) in enumerate(blocks):
                quad = integrate if j == 0 else 2
                dx = ox + k[cols][None, None, :]
                dy = oy + k[rows][None, :, None]
                if where is not None:
                    if rows.size == 0:
                        continue
                    dy = oy + k[rows][None, None, :]  # (N, 1, m): paired with dx
                if derivatives:
                    v, d = _ell_pix(dx, dy, *pars, derivs="xy", integrate=quad)
                    # (one of rows, cols at most is an index array, or both paired)
                    val[sl, rows, cols] = _flat(v, where)
                    gx[sl, rows, cols] = -_flat(d["x"], where)
                    gy[sl, rows, cols] = -_flat(d["y"], where)
                else:
                    val[sl, rows, cols] = _flat(_ell_pix(dx, dy, *pars, integrate=quad), where)
        if derivatives:
            return val, gx, gy
        return val

    @staticmethod
    def _lmin(a, b, c):
        return 0.5 * (a + c) - np.sqrt(0.25 * (a - c) ** 2 + b * b)

    def render(self, shape, x, y, flux, *, half=None, rms=None, dtype=np.float32, out=None):
        """
        Image of stars at ``(x, y)`` with total fluxes ``flux`` (the model of a PSF fit).

        Each star is drawn over ``half`` px (default ``size_px // 2``); with ``rms`` (a typical
        background noise, ADU) faint stars are drawn only as far as their model exceeds
        ``0.02 * rms`` (bright ones up to 4x ``size_px``), which keeps the render cheap.
        With ``out`` (a C-contiguous array of ``shape``) the stars are added into it.
        """
        ny, nx = int(shape[0]), int(shape[1])
        x, y, flux = _drawable(shape, x, y, flux)
        if out is None:
            out = np.zeros((ny, nx), dtype=dtype)
        result = out
        out = out.reshape(-1)  # a view: added to in place
        dtype = out.dtype
        if x.size == 0:
            return result
        h0 = max(1, int(self.size_px) // 2) if half is None else int(half)
        if rms is not None and half is None and np.isfinite(rms) and rms > 0:
            halves = self._footprint_halves(x, y, np.abs(flux), float(rms), h0)
        else:
            halves = np.full(x.size, h0)
        for h in np.unique(halves):
            sel = np.flatnonzero(halves == h)
            ix = np.rint(x[sel]).astype(np.int64)
            iy = np.rint(y[sel]).astype(np.int64)
            k = np.arange(-h, h + 1)
            chunk = max(1, 200_000 // k.size**2)
            for i0 in range(0, sel.size, chunk):
                ss = slice(i0, i0 + chunk)
                s_idx = sel[ss]
                val = self.stamps(x[s_idx], y[s_idx], h, ix=ix[ss], iy=iy[ss])
                val *= flux[s_idx, None, None]
                flat, inside = _stamp_pixels(shape, ix[ss], iy[ss], k)
                np.add.at(out, flat[inside], val[inside].astype(dtype, copy=False))
        return result

    def radius_below(self, x, y, flux, level):
        """Radius (px, along the major axis) beyond which stars of ``flux`` at ``(x, y)`` fall
        below ``level`` (ADU per pixel; continuous profile)."""
        a, b, c, u = self.params_at(np.asarray(x, float), np.asarray(y, float))
        lmin = 0.5 * (a + c) - np.sqrt(0.25 * (a - c) ** 2 + b * b)
        fwhm_major = 1.0 / np.sqrt(np.maximum(lmin, 1e-12))
        kap = 4.0 * (np.exp2(u) - 1.0)
        peak = (
            np.asarray(flux, float)
            * kap
            * (1.0 / u - 1.0)
            * np.sqrt(np.maximum(a * c - b * b, 1e-30))
            / math.pi
        )
        ratio = np.clip(float(level) / np.maximum(peak, 1e-30), 1e-30, 1.0)
        return fwhm_major * np.sqrt(np.maximum((ratio ** (-u) - 1.0) / kap, 0.0))

    def _footprint_halves(self, x, y, flux, rms, h0):
        """Per-star half-width where the model falls below ``0.02 rms`` (a few sizes)."""
        a, b, c, u = self.params_at(x, y)
        lmin = 0.5 * (a + c) - np.sqrt(0.25 * (a - c) ** 2 + b * b)
        r_major_unit = 1.0 / np.sqrt(np.maximum(lmin, 1e-12))  # FWHM along the major axis
        # peak-normalised Moffat along the major axis: (1 + k q)^(-1/u), q = (r / FWHM)^2
        kap = 4.0 * (np.exp2(u) - 1.0)
        peak = flux * kap * (1.0 / u - 1.0) * np.sqrt(np.maximum(a * c - b * b, 1e-30)) / math.pi
        ratio = np.clip(0.02 * rms / np.maximum(peak, 1e-30), 1e-30, 1.0)
        q_need = (ratio ** (-u) - 1.0) / kap
        r_need = r_major_unit * np.sqrt(np.maximum(q_need, 0.0))
        levels = np.array([h0 // 2, h0, 2 * h0, 4 * h0])
        levels = np.maximum(levels, 3)
        idx = np.searchsorted(levels, r_need)
        return levels[np.minimum(idx, levels.size - 1)]

    def flux_fraction_sigma(self, x, y, radius_px, *, chunk=256):
        """Relative uncertainty that the model's statistical error gives the fraction of a star's
        total flux inside a circle of ``radius_px`` (the extrapolation from a measured aperture,
        or from a fitted footprint, to the total flux): ``sqrt(g^T C g)`` with ``C`` the
        covariance of the polynomial coefficients (`cov`) and ``g`` the derivative of the log
        fraction with respect to them, per star. Zeros when the covariance is unknown."""
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        out = np.zeros(x.size)
        ok = np.isfinite(x) & np.isfinite(y)
        if self.cov is None or not np.any(ok):
            return out
        cov = np.asarray(self.cov, float)
        r = float(radius_px)
        half = int(math.ceil(r)) + 1
        k = np.arange(-half, half + 1, dtype=float)
        for sl, dx0, dy0, bas, val, dp in self._local_derivatives(x, y, ok, k, chunk):
            # pixel weights: the part of each pixel inside the circle (linear in the distance)
            m = np.clip(r + 0.5 - np.hypot(dx0, dy0), 0.0, 1.0)
            frac = np.maximum(np.sum(m * val, axis=(1, 2)), 1e-12)
            g = np.stack([np.sum(m * q, axis=(1, 2)) / frac for q in dp], 1)
            grad = (g[:, :, None] * bas[:, None, :]).reshape(sl.size, -1)
            out[sl] = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", grad, cov, grad), 0.0))
        return out

    def _local_derivatives(self, x, y, ok, k, chunk):
        """The local model on a pixel grid around each star (offsets ``k``) and its derivatives
        by the four shape parameters (FWHM, e1, e2, 1/beta), in batches of ``chunk`` of the stars
        ``ok``: yields ``(sl, dx0, dy0, basis, value, [d_fwhm, d_e1, d_e2, d_u])``. Sampled at the
        pixel centres: a fraction within a circle of several pixels does not need the pixel
        integration (its derivatives change by < 1e-3 of themselves)."""
        idx = np.flatnonzero(ok)
        for i0 in range(0, idx.size, chunk):
            sl = idx[i0 : i0 + chunk]
            ix, iy = np.rint(x[sl]), np.rint(y[sl])
            dx0 = (ix - x[sl])[:, None, None] + k[None, None, :] + 0.0 * k[None, :, None]
            dy0 = (iy - y[sl])[:, None, None] + k[None, :, None] + 0.0 * k[None, None, :]
            bas = _poly_basis(x[sl], y[sl], self.order, self.norm)
            p = bas @ np.asarray(self.coeffs, float).T
            a, b, c = (v[:, None, None] for v in _abc_from_shape(p[:, 0], p[:, 1], p[:, 2]))
            u = np.clip(p[:, 3], _U_MIN_FIELD, _U_MAX)[:, None, None]
            val, d = _ell_pix(dx0, dy0, a, b, c, u, derivs=True, integrate=False)
            jac = _abc_jacobian(p[:, 0], p[:, 1], p[:, 2])
            dp = [
                d["a"] * jac[:, 0, j, None, None]
                + d["b"] * jac[:, 1, j, None, None]
                + d["c"] * jac[:, 2, j, None, None]
                for j in range(3)
            ] + [d["u"]]
            yield sl, dx0, dy0, bas, val, dp

    def flux_responses(self, x, y, radii, *, fit_half, flux=None, sky_var=None, gain=1.0):
        """How each star's measured fluxes move with the model's coefficients, per star.

        For a change ``dp`` of ``coeffs.ravel()`` (the model's statistical error, covariance
        `cov`), to first order: the fraction of light within a circle of radius ``r`` changes
        by ``g_r . dp`` (relative), so a flux corrected to a total with this model (an aperture
        flux over its fraction, or a large-aperture reference) by ``-g_r . dp``; a PSF fit of
        the square footprint ``2 fit_half + 1`` (weights ``1 / (sky_var + flux P / gain)``) by
        ``-g_fit . dp`` with ``g_fit = sum(w P dP) / sum(w P^2)``.

        Returns
        -------
        dict of numpy.ndarray
            ``{label: (N, 4 T)}`` for each label of ``radii`` and ``"fit"`` (zeros where the
            position is not finite).
        """
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        nt = np.asarray(self.coeffs).shape[1]
        labels = list(radii) + ["fit"]
        out = {lab: np.zeros((x.size, 4 * nt)) for lab in labels}
        ok = np.isfinite(x) & np.isfinite(y)
        if not np.any(ok):
            return out
        flux = np.zeros(x.size) if flux is None else np.nan_to_num(np.asarray(flux, float))
        sky_var = np.ones(x.size) if sky_var is None else np.asarray(sky_var, float)
        half = max(int(math.ceil(max(radii.values()))) + 1, int(fit_half))
        k = np.arange(-half, half + 1, dtype=float)
        in_fit = (np.abs(k)[None, :] <= fit_half) & (np.abs(k)[:, None] <= fit_half)
        for sl, dx0, dy0, bas, val, dp in self._local_derivatives(x, y, ok, k, 256):
            rr = np.hypot(dx0, dy0)
            for lab, r in radii.items():
                m = np.clip(float(r) + 0.5 - rr, 0.0, 1.0)
                frac = np.maximum(np.sum(m * val, axis=(1, 2)), 1e-12)
                g = np.stack([np.sum(m * q, axis=(1, 2)) / frac for q in dp], 1)
                out[lab][sl] = (g[:, :, None] * bas[:, None, :]).reshape(sl.size, -1)
            v_pix = sky_var[sl, None, None] + np.maximum(flux[sl, None, None] * val, 0.0) / gain
            w = in_fit / v_pix
            den = np.maximum(np.sum(w * val * val, axis=(1, 2)), 1e-30)
            g = np.stack([np.sum(w * val * q, axis=(1, 2)) / den for q in dp], 1)
            out["fit"][sl] = (g[:, :, None] * bas[:, None, :]).reshape(sl.size, -1)
        return out

    def aperture_fractions(self, x, y, radii, *, x_ap=None, y_ap=None, half=None):
        """Fraction of each star's total flux inside circular apertures.

        Parameters
        ----------
        x, y : array_like
            Star centres (0-based px).
        radii : dict
            ``{label: radius_px}``.
        x_ap, y_ap : array_like, optional
            Aperture centres (default the star centres): a misplaced aperture loses light, and
            the fraction says how much.

        Returns
        -------
        dict of numpy.ndarray
            ``{label: fraction}``: exact pixel/circle overlaps (SEP) of the pixel-integrated local
            model; 1 / fraction is the aperture correction to a total flux.
        """
        import sep

        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        xa = x if x_ap is None else np.atleast_1d(np.asarray(x_ap, float))
        ya = y if y_ap is None else np.atleast_1d(np.asarray(y_ap, float))
        out = {lab: np.full(x.size, np.nan) for lab in radii}
        ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(xa) & np.isfinite(ya)
        ok &= np.hypot(xa - x, ya - y) < 3.0
        if not np.any(ok):
            return out
        if half is None:
            half = int(math.ceil(max(radii.values()))) + 3
        size = 2 * half + 1
        idx = np.flatnonzero(ok)
        ix = np.rint(xa[idx])
        iy = np.rint(ya[idx])
        # the model is evaluated only where the apertures can use it (the rest of the tile stays
        # 0; same tiles, so the same sums to the last bit)
        he, where = _aperture_reach(max(radii.values()), half)
        st = self.stamps(x[idx], y[idx], he, ix=ix, iy=iy, where=where)
        m = idx.size
        ncol = int(math.ceil(math.sqrt(m)))
        nrow = int(math.ceil(m / ncol))
        mosaic = np.zeros((nrow, ncol, size, size))
        inner = slice(half - he, half + he + 1)
        mosaic.reshape(nrow * ncol, size, size)[:m, inner, inner] = st
        mosaic = np.ascontiguousarray(
            mosaic.transpose(0, 2, 1, 3).reshape(nrow * size, ncol * size)
        )
        tile = np.arange(m)
        xm = (tile % ncol) * size + half + (xa[idx] - ix)
        ym = (tile // ncol) * size + half + (ya[idx] - iy)
        for lab, r in radii.items():
            out[lab][idx] = sep.sum_circle(mosaic, xm, ym, float(r), subpix=0)[0]
        return out


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
