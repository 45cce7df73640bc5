"""Fidelity of a source catalogue against a synthetic truth table.

`match_to_truth` pairs catalogue rows with true stars; `fidelity_report` turns the pairs into the
figures the reduction benchmark quotes (``bench/README.md``). Definitions (all in one place):

Matching
    One-to-one, greedy by increasing separation: every (detection, true star) pair closer than
    ``radius_px`` is a candidate; the closest pair is accepted first, and a detection or a star
    is used at most once. Rows with non-finite positions never match.
Completeness
    Fraction of true stars with ``snr_expected > snr_min`` (default 10; the photon-noise S/N in a
    1-FWHM aperture, see `rpp_tasks.sim.synthetic.make_star_field`) that are matched, among stars
    with ``frac_in_image >= 0.99`` (stars cut by the image edge are left out; without that
    truth column all stars count). Also per S/N bin, and for *isolated* stars (no other true
    star within ``isolation_fwhm`` FWHM that is at least ``neighbour_flux_frac`` times as bright).
Spurious fraction
    Unmatched detections divided by the number of detections. Duplicates of a matched star
    (shredded stars) count as spurious. Excused, and reported separately, are unmatched
    detections within ``exclude_radius_px`` of a cosmic-ray or hot pixel (when the masks are
    given) or within ``saturated_halo_fwhm`` FWHM of a saturated star (spikes and halos of
    saturated stars are not false stars of the reduction). ``spurious_fraction_raw`` counts all.
Photometry sample
    Matched stars that are not saturated (truth flag, and the noiseless peak + sky + bias below
    ``nonlinear_frac`` of saturation), isolated, with ``frac_in_image >= 0.999``, finite
    measured flux and ``snr_expected > snr_min``.
Offset (aperture correction)
    ``dm = -2.5 log10(flux_measured / flux_true)``; the offset is the 3-sigma-clipped median of
    ``dm`` over the photometry sample with expected error below ``offset_err_max_mag``
    (0.02 mag; all of the sample when fewer than 10 such stars, flag ``offset_from_faint``).
    For an aperture of radius r the ideal offset is ``-2.5 log10(EE(r))`` (``offset_ideal_mag``).
Expected error (photon noise)
    Aperture: ``var = F_ap/g + A s2 + A**2 s2 / N_ann`` (ADU**2) with ``F_ap = c F_true``
    (``c = 10**(-0.4 offset)``), ``A = pi r**2``, ``s2 = sky/g + (rn/g)**2`` the true per-pixel
    sky variance, ``N_ann`` the annulus pixels (catalogue column ``n_annulus``, else the meta
    annulus radii): Poisson star + sky + read noise in the aperture + the annulus-mean term.
    PSF: the Cramer-Rao bound ``1/sqrt(sum P**2/var)`` with the true pixel-integrated PSF ``P``
    and ``var = (F P + sky)/g + (rn/g)**2`` (truth column ``flux_err_crb_adu``).
Offset uncertainty (``offset_sigma_mag``)
    The offset is an estimate from the frame's own stars: its standard error (bootstrap of the
    median of the clipped sample, 200 resamples, seeded) is common to every star of the frame
    and, in flux, proportional to the star's flux, ``s_c = c offset_sigma_mag / 1.0857``. Each
    comparison below has ``(s_c F_true)**2`` added to its expected variance: it is the
    yardstick's error, not the photometry's, and it is comparable to the photon noise of the
    brightest stars (0.3-0.5 mmag on a 2048**2 frame: without it a bright star with honest
    errors scores 1.04-1.08 in the S/N > 500 bin, pooled over frames).
Scatter ratio
    Robust standard deviation (below) of ``z = (F_meas - c F_true) / sqrt(sigma_expected**2 +
    (s_c F_true)**2)`` over the photometry sample: 1.0 means photon-noise-limited. In flux
    space, so it stays Gaussian at low S/N. Per S/N bin also ``scatter_mag`` (robust std of
    ``dm - offset``) and ``expected_mag`` (rms of ``1.0857 sigma_expected / F_ap``), neither
    with the offset term.
Error honesty (``error_ratio``)
    Robust std of ``(F_meas - c F_true) / sqrt(flux_err_reported**2 + (s_c F_true)**2)``: 1.0
    means the reported errors match the real scatter; > 1 they are too small.
Bright-star floor
    Over the ``n_bright`` (20) brightest stars of the photometry sample: ``bright_scatter_mag``
    (robust std of ``dm - offset``), ``bright_expected_mag`` (rms of the expected errors) and
    ``bright_floor_mag = sqrt(max(0, scatter**2 - expected**2))``: what is left when photon
    noise is taken out (flat-field, PSF-model, centring and background errors).
Spurious breakdown (``spurious_breakdown``)
    Every unmatched detection is put in one class, in this order: ``duplicate`` (a matched true
    star lies within ``duplicate_radius_fwhm`` FWHM and no unmatched true star within twice the
    matching radius: a second detection of a star already found), ``saturated`` (within
    ``saturated_halo_fwhm`` FWHM of a saturated star, or within ``exclude_radius_px`` of a bleed
    trail pixel), ``defect`` (within ``exclude_radius_px`` of a cosmic-ray or hot pixel),
    ``other``. ``spurious_fraction_raw`` counts them all.
Varying PSF and sky
    When the truth has the per-star columns ``fwhm_px``, ``beta`` and ``sky_adu`` (fields made
    with a PSF or sky varying across the field), the aperture expectation uses each star's own
    sky and encircled energy (circular Moffat of the local FWHM and beta), and the FWHM is
    compared in zones (``fwhm_zones``: the centre, within 15 % of the half-diagonal of the frame
    centre, and each corner, within 25 % of it), with the catalogue's per-star model FWHM
    (column ``psf_fwhm_px``) when present, else its single ``fwhm_px``.
Aperture-corrected fluxes
    When the catalogue has a column ``apcorr_<label>`` (the factor that turned the aperture flux
    into a total flux), the star's aperture flux is ``F_meas / apcorr`` and its expected error
    ``apcorr * sigma_ap(c F_true / apcorr)``; the ideal offset is then 0.
FWHM error
    ``fwhm_rel_err = measured / true - 1`` against the continuous PSF FWHM (``truth.meta``), and
    ``fwhm_rel_err_pixelated`` against the FWHM of the pixel-integrated PSF (the continuous PSF
    convolved with a 1x1 px box, which is what a fit to pixel values measures).
Positions
    Median offset (x, y) and rms radial offset of matched stars with ``snr_expected > snr_min``.
Robust standard deviation
    Iterative 4-sigma clipping around the median (starting from 1.4826 MAD), then the standard
    deviation of the kept values divided by 0.99893, the std of a unit normal truncated at
    +-4 sigma, so it is unbiased for Gaussian data and insensitive to a few outliers.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np

from rpp_tasks.jsonsafe import json_safe
from rpp_tasks.sim.truth_match import (
    TruthMatch,
    expected_aperture_error_adu,
    match_to_truth,
    pixelated_fwhm_px,
    robust_std,
)

__all__ = [
    "TruthMatch",
    "PhotometryFidelity",
    "FidelityReport",
    "match_to_truth",
    "fidelity_report",
    "robust_std",
    "pooled_bins",
    "expected_aperture_error_adu",
    "pixelated_fwhm_px",
    "DEFAULT_FLUX_COLS",
]

log = logging.getLogger(__name__)

DEFAULT_FLUX_COLS = ("flux_1p1fwhm", "flux_1p3fwhm", "flux_fixed", "flux_psf")
_MAG_PER_FLUX = 2.5 / math.log(10.0)


# ------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class PhotometryFidelity:
    """Fidelity of one flux column (definitions in the module docstring)."""

    flux_col: str
    kind: str  # "aperture" | "psf"
    radius_px: float  # aperture radius (NaN for PSF)
    n_used: int
    offset_mag: float
    offset_ideal_mag: float
    scatter_ratio: float
    error_ratio: float
    bright_scatter_mag: float
    bright_expected_mag: float
    bright_floor_mag: float
    n_bright: int
    bins: tuple = ()
    flags: tuple[str, ...] = ()
    samples: dict = field(default_factory=dict, repr=False, compare=False)
    offset_sigma_mag: float = float("nan")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "samples"}
        d["bins"] = [dict(b) for b in self.bins]
        d["flags"] = list(self.flags)
        return json_safe(d)


@dataclass(frozen=True)
class FidelityReport:
    """Catalogue fidelity against truth (definitions in the module docstring)."""

    n_truth: int
    n_catalog: int
    n_matched: int
    snr_min: float
    n_truth_snr: int
    completeness: float
    completeness_isolated: float
    completeness_bins: tuple
    n_spurious: int
    n_spurious_excused: int
    spurious_fraction: float
    spurious_fraction_raw: float
    position_offset_px: tuple[float, float]
    position_rms_px: float
    fwhm_true_px: float
    fwhm_true_pixelated_px: float
    fwhm_measured_px: float
    fwhm_rel_err: float
    fwhm_rel_err_pixelated: float
    photometry: tuple[PhotometryFidelity, ...] = ()
    flags: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    spurious_breakdown: dict = field(default_factory=dict)
    fwhm_zones: dict = field(default_factory=dict)

    def for_column(self, flux_col: str) -> PhotometryFidelity:
        """The `PhotometryFidelity` of one flux column (KeyError if it was not evaluated)."""
        for p in self.photometry:
            if p.flux_col == flux_col:
                return p
        raise KeyError(flux_col)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "photometry"}
        d["completeness_bins"] = [dict(b) for b in self.completeness_bins]
        d["position_offset_px"] = list(self.position_offset_px)
        d["flags"] = list(self.flags)
        d["photometry"] = {p.flux_col: p.to_dict() for p in self.photometry}
        return json_safe(d)


def _meta_get(meta, *keys, default=None):
    for k in keys:
        if k in meta and meta[k] is not None:
            return meta[k]
    return default


def _aperture_radius(label, catalog_meta, fwhm_px, aperture_radii_px):
    if aperture_radii_px and label in aperture_radii_px:
        return float(aperture_radii_px[label])
    radii = catalog_meta.get("aperture_radii_px")
    if isinstance(radii, dict) and label in radii:
        return float(radii[label])
    for key in (f"r_{label}_px", f"radius_{label}_px", f"aperture_{label}_px"):
        if key in catalog_meta:
            return float(catalog_meta[key])
    m = re.fullmatch(r"(\d+)p(\d+)fwhm", label)
    if m and fwhm_px and math.isfinite(fwhm_px):
        return float(f"{m.group(1)}.{m.group(2)}") * fwhm_px
    if label == "fixed" and "fixed_radius_px" in catalog_meta:
        return float(catalog_meta["fixed_radius_px"])
    return float("nan")


def _isolated(tx, ty, tflux, radius_px, flux_frac):
    from scipy.spatial import cKDTree

    n = tx.size
    iso = np.ones(n, dtype=bool)
    if n < 2:
        return iso
    pairs = cKDTree(np.column_stack([tx, ty])).query_pairs(radius_px, output_type="ndarray")
    if pairs.size:
        i, j = pairs[:, 0], pairs[:, 1]
        iso[i[tflux[j] >= flux_frac * tflux[i]]] = False
        iso[j[tflux[i] >= flux_frac * tflux[j]]] = False
    return iso


def _near_mask(x, y, mask, radius_px):
    """True where (x, y) lies within radius_px of a True pixel of mask."""
    from scipy.ndimage import distance_transform_edt

    if mask is None or not np.any(mask):
        return np.zeros(np.size(x), dtype=bool)
    dist = distance_transform_edt(~np.asarray(mask, dtype=bool))
    ny, nx = dist.shape
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    return dist[iy, ix] <= radius_px


def fidelity_report(
    catalog,
    truth,
    *,
    flux_cols=None,
    radius_px=1.5,
    x_col="x_centroid",
    y_col="y_centroid",
    gain_e_per_adu=None,
    read_noise_e=None,
    sky_adu=None,
    fwhm_measured_px=None,
    aperture_radii_px=None,
    n_annulus=None,
    snr_min=10.0,
    snr_bins=(3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0, 1000.0, np.inf),
    cr_mask=None,
    hot_mask=None,
    exclude_radius_px=3.0,
    saturated_halo_fwhm=8.0,
    isolation_fwhm=3.0,
    neighbour_flux_frac=1e-3,
    nonlinear_frac=0.9,
    n_bright=20,
    offset_err_max_mag=0.02,
    bleed_mask=None,
    duplicate_radius_fwhm=2.0,
) -> FidelityReport:
    """
    Completeness, spurious detections, photometric scatter vs photon noise, error honesty, FWHM.

    Every definition is in the module docstring of `rpp_tasks.sim.evaluate` (the bench README
    quotes it).

    Parameters
    ----------
    catalog : astropy.table.Table
        Photometry catalogue (``docs/ARCHITECTURE.md`` "Source tables"): positions, flux columns
        ``flux_<L>`` with errors ``flux_err_<L>``; ``meta`` may carry ``fwhm_px``,
        ``aperture_radii_px`` and ``annulus_px``; a ``n_annulus`` column is used when present.
    truth : astropy.table.Table
        Truth of `rpp_tasks.sim.synthetic.make_star_field` (its ``meta`` gives the PSF, sky, gain,
        read noise, saturation and bias unless overridden here).
    flux_cols : sequence of str, optional
        Flux columns to evaluate (default: those of `DEFAULT_FLUX_COLS` present). ``flux_psf``
        (any column containing ``psf``) is treated as a PSF flux, the others as apertures.
    radius_px : float
        Matching radius.
    gain_e_per_adu, read_noise_e, sky_adu : float, optional
        Override ``truth.meta``.
    fwhm_measured_px : float, optional
        Default ``catalog.meta["fwhm_px"]``.
    aperture_radii_px : dict, optional
        ``{label: radius}``, default from ``catalog.meta``.
    n_annulus : float, optional
        Annulus pixel count when the catalogue has no ``n_annulus`` column.
    snr_min : float
        S/N threshold of ``snr_expected`` for completeness and the photometry sample.
    snr_bins : sequence of float
        Bin edges in ``snr_expected`` for the binned figures.
    cr_mask, hot_mask, bleed_mask : numpy.ndarray, optional
        Pixels hit by cosmic rays / hot pixels / bleed trails (excuse spurious detections near
        them; bleed trails class them as ``saturated`` in the breakdown).
    duplicate_radius_fwhm : float
        See "Spurious breakdown" in the module docstring.
    exclude_radius_px, saturated_halo_fwhm, isolation_fwhm, neighbour_flux_frac, nonlinear_frac,
    n_bright, offset_err_max_mag
        See the module docstring.

    Returns
    -------
    report : `FidelityReport`
        NaN figures with a flag when a sample is empty (e.g. ``"no_stars_above_snr_min"``).
    """
    from rpp_tasks.sim.synthetic import psf_encircled_energy

    need = ("x", "y", "flux_adu", "snr_expected")
    missing = [c for c in need if c not in truth.colnames]
    if missing:
        msg = f"fidelity_report: truth lacks column(s) {missing}"
        raise ValueError(msg)
    tm, cm = truth.meta, catalog.meta
    g = float(
        gain_e_per_adu
        if gain_e_per_adu is not None
        else _meta_get(tm, "gain_e_per_adu", default=np.nan)
    )
    rn = float(
        read_noise_e if read_noise_e is not None else _meta_get(tm, "read_noise_e", default=np.nan)
    )
    sky = float(sky_adu if sky_adu is not None else _meta_get(tm, "sky_adu", default=np.nan))
    if not (g > 0 and rn >= 0 and sky >= 0):
        msg = (
            f"fidelity_report: need gain, read noise and sky (truth.meta or arguments), "
            f"got gain={g!r}, read_noise={rn!r}, sky={sky!r}"
        )
        raise ValueError(msg)
    psf = _meta_get(tm, "psf", default="gaussian")
    fwhm_true = float(_meta_get(tm, "fwhm_px", default=np.nan))
    beta = float(_meta_get(tm, "beta", default=3.0))
    sat = float(_meta_get(tm, "saturation_adu", default=np.inf))
    bias = float(_meta_get(tm, "bias_adu", default=0.0))
    fwhm_meas = float(
        fwhm_measured_px
        if fwhm_measured_px is not None
        else _meta_get(cm, "fwhm_px", "FWHM", "fwhm", default=np.nan)
    )
    flags = []

    match = match_to_truth(catalog, truth, radius_px=radius_px, x_col=x_col, y_col=y_col)
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    tflux = np.asarray(truth["flux_adu"], float)
    tsnr = np.asarray(truth["snr_expected"], float)
    tsat = (
        np.asarray(truth["saturated"], bool)
        if "saturated" in truth.colnames
        else np.zeros(len(truth), bool)
    )
    fwhm_ref = fwhm_true if math.isfinite(fwhm_true) else fwhm_meas
    iso = (
        _isolated(tx, ty, tflux, isolation_fwhm * fwhm_ref, neighbour_flux_frac)
        if math.isfinite(fwhm_ref)
        else np.ones(len(truth), bool)
    )

    detected = np.zeros(len(truth), dtype=bool)
    detected[match.truth_index] = True

    # completeness (stars cut by the image edge, frac_in_image < 0.99, are left out)
    frac_in = (
        np.asarray(truth["frac_in_image"], float)
        if "frac_in_image" in truth.colnames
        else np.ones(len(truth))
    )
    above = (tsnr > snr_min) & (frac_in >= 0.99)
    n_above = int(above.sum())
    completeness = float(detected[above].mean()) if n_above else float("nan")
    completeness_iso = float(detected[above & iso].mean()) if np.any(above & iso) else float("nan")
    if not n_above:
        flags.append("no_stars_above_snr_min")
    edges = np.asarray(snr_bins, float)
    cbins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (tsnr > lo) & (tsnr <= hi) & (frac_in >= 0.99)
        cbins.append(
            {
                "snr_lo": float(lo),
                "snr_hi": float(hi),
                "n_true": int(sel.sum()),
                "n_detected": int(detected[sel].sum()),
                "completeness": float(detected[sel].mean()) if sel.any() else float("nan"),
            }
        )

    # spurious
    un = match.unmatched_catalog
    cx, cy = np.asarray(catalog[x_col], float), np.asarray(catalog[y_col], float)
    excused = np.zeros(un.size, dtype=bool)
    if un.size:
        ux, uy = cx[un], cy[un]
        finite = np.isfinite(ux) & np.isfinite(uy)
        for m in (cr_mask, hot_mask):
            if m is not None:
                excused[finite] |= _near_mask(ux[finite], uy[finite], m, exclude_radius_px)
        if np.any(tsat) and math.isfinite(fwhm_ref):
            from scipy.spatial import cKDTree

            tree = cKDTree(np.column_stack([tx[tsat], ty[tsat]]))
            d, _ = tree.query(np.column_stack([ux[finite], uy[finite]]), k=1)
            excused[np.flatnonzero(finite)[d <= saturated_halo_fwhm * fwhm_ref]] = True
    n_cat = len(catalog)
    n_spur = int((~excused).sum())
    spurious = n_spur / n_cat if n_cat else float("nan")
    spurious_raw = un.size / n_cat if n_cat else float("nan")
    breakdown = _spurious_breakdown(
        cx[un],
        cy[un],
        tx,
        ty,
        detected,
        tsat,
        fwhm_ref=fwhm_ref,
        match_radius=radius_px,
        duplicate_radius_fwhm=duplicate_radius_fwhm,
        saturated_halo_fwhm=saturated_halo_fwhm,
        exclude_radius_px=exclude_radius_px,
        defect_masks=(cr_mask, hot_mask),
        bleed_mask=bleed_mask,
    )

    # positions
    pos_sel = above[match.truth_index]
    dx = cx[match.catalog_index] - tx[match.truth_index]
    dy = cy[match.catalog_index] - ty[match.truth_index]
    if pos_sel.any():
        offset_xy = (float(np.median(dx[pos_sel])), float(np.median(dy[pos_sel])))
        pos_rms = float(np.sqrt(np.mean(dx[pos_sel] ** 2 + dy[pos_sel] ** 2)))
    else:
        offset_xy, pos_rms = (float("nan"), float("nan")), float("nan")

    # photometry
    if flux_cols is None:
        flux_cols = tuple(c for c in DEFAULT_FLUX_COLS if c in catalog.colnames)
    peak = (
        np.asarray(truth["peak_adu"], float)
        if "peak_adu" in truth.colnames
        else np.zeros(len(truth))
    )
    sky_star = (
        np.asarray(truth["sky_adu"], float)
        if "sky_adu" in truth.colnames and sky_adu is None
        else np.full(len(truth), sky)
    )
    base = (
        (~tsat) & (peak + sky_star + bias < nonlinear_frac * sat) & iso & (frac_in >= 0.999) & above
    )
    if n_annulus is None and "n_annulus" in catalog.colnames:
        n_ann_col = np.asarray(catalog["n_annulus"], float)
    else:
        n_ann_col = None
        if n_annulus is None:
            ann = cm.get("annulus_px")
            if ann is not None and len(ann) == 2:
                n_annulus = math.pi * (float(ann[1]) ** 2 - float(ann[0]) ** 2)
    phot = []
    for col in flux_cols:
        if col not in catalog.colnames:
            msg = f"fidelity_report: catalog lacks flux column {col!r}"
            raise ValueError(msg)
        phot.append(
            _photometry_fidelity(
                col,
                catalog,
                truth,
                match,
                base,
                g=g,
                rn=rn,
                sky=sky_star,
                psf=psf,
                fwhm_true=fwhm_true,
                beta=beta,
                fwhm_meas=fwhm_meas,
                aperture_radii_px=aperture_radii_px,
                n_ann_col=n_ann_col,
                n_annulus=n_annulus,
                edges=edges,
                n_bright=n_bright,
                offset_err_max_mag=offset_err_max_mag,
                encircled=psf_encircled_energy,
            )
        )

    # FWHM
    if math.isfinite(fwhm_true):
        fwhm_pix = pixelated_fwhm_px(psf=psf, fwhm_px=fwhm_true, beta=beta)
    else:
        fwhm_pix = float("nan")
        flags.append("no_true_fwhm")
    if not math.isfinite(fwhm_meas):
        flags.append("no_measured_fwhm")

    zones = _fwhm_zones(catalog, truth, fwhm_meas, x_col=x_col, y_col=y_col)

    params = {
        "radius_px": radius_px,
        "snr_min": snr_min,
        "exclude_radius_px": exclude_radius_px,
        "saturated_halo_fwhm": saturated_halo_fwhm,
        "isolation_fwhm": isolation_fwhm,
        "neighbour_flux_frac": neighbour_flux_frac,
        "nonlinear_frac": nonlinear_frac,
        "n_bright": n_bright,
        "offset_err_max_mag": offset_err_max_mag,
        "gain_e_per_adu": g,
        "read_noise_e": rn,
        "sky_adu": sky,
        "psf": psf,
        "beta": beta,
    }
    return FidelityReport(
        n_truth=len(truth),
        n_catalog=n_cat,
        n_matched=match.n_matched,
        snr_min=float(snr_min),
        n_truth_snr=n_above,
        completeness=completeness,
        completeness_isolated=completeness_iso,
        completeness_bins=tuple(cbins),
        n_spurious=n_spur,
        n_spurious_excused=int(excused.sum()),
        spurious_fraction=spurious,
        spurious_fraction_raw=spurious_raw,
        position_offset_px=offset_xy,
        position_rms_px=pos_rms,
        fwhm_true_px=fwhm_true,
        fwhm_true_pixelated_px=fwhm_pix,
        fwhm_measured_px=fwhm_meas,
        fwhm_rel_err=fwhm_meas / fwhm_true - 1.0,
        fwhm_rel_err_pixelated=fwhm_meas / fwhm_pix - 1.0,
        photometry=tuple(phot),
        flags=tuple(flags),
        params=params,
        spurious_breakdown=breakdown,
        fwhm_zones=zones,
    )


def pooled_bins(fidelities, snr_bins, *, n_bright=20):
    """Per-S/N-bin figures pooled over several frames (`PhotometryFidelity` of one column each).

    Returns a list of dicts (``snr_lo``, ``snr_hi``, ``n``, ``scatter_ratio``, ``error_ratio``,
    ``error_ratio_sigma``, ``scatter_mag``, ``expected_mag``) and the pooled bright-star floor
    over the ``n_bright`` brightest stars of every frame: ``(bins, floor_mag)``.
    ``error_ratio_sigma`` is the statistical uncertainty of ``error_ratio`` (bootstrap over the
    bin's stars, 200 resamples, seeded): about ``0.09`` for 60 stars, so a bin of a few frames'
    brightest stars does not tell 0.9 from 1.0.
    """
    keys = ("snr_expected", "z", "z_reported", "dm", "expected_mag")
    cat = {
        k: np.concatenate([np.asarray(f.samples.get(k, []), float) for f in fidelities])
        for k in keys
    }
    edges = np.asarray(snr_bins, float)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        b = (cat["snr_expected"] > lo) & (cat["snr_expected"] <= hi)
        out.append(
            {
                "snr_lo": float(lo),
                "snr_hi": float(hi),
                "n": int(b.sum()),
                "scatter_ratio": robust_std(cat["z"][b]),
                "error_ratio": robust_std(cat["z_reported"][b]),
                "error_ratio_sigma": _bootstrap_sigma(cat["z_reported"][b], robust_std),
                "scatter_mag": robust_std(cat["dm"][b]),
                "expected_mag": float(np.sqrt(np.mean(cat["expected_mag"][b] ** 2)))
                if b.any()
                else float("nan"),
            }
        )
    floors = []
    dms, exps = [], []
    for f in fidelities:
        sn = np.asarray(f.samples.get("snr_expected", []), float)
        if sn.size < 5:
            continue
        top = np.argsort(-sn)[:n_bright]
        dms.append(np.asarray(f.samples["dm"])[top])
        exps.append(np.asarray(f.samples["expected_mag"])[top])
    if dms:
        dm, ex = np.concatenate(dms), np.concatenate(exps)
        sc = robust_std(dm)
        floors = math.sqrt(max(0.0, sc**2 - float(np.mean(ex**2))))
    else:
        floors = float("nan")
    return out, floors


def _spurious_breakdown(
    ux,
    uy,
    tx,
    ty,
    detected,
    tsat,
    *,
    fwhm_ref,
    match_radius,
    duplicate_radius_fwhm,
    saturated_halo_fwhm,
    exclude_radius_px,
    defect_masks,
    bleed_mask,
):
    """Classes of the unmatched detections (see "Spurious breakdown" in the module docstring)."""
    from scipy.spatial import cKDTree

    out = {"duplicate": 0, "saturated": 0, "defect": 0, "other": 0}
    ok = np.isfinite(ux) & np.isfinite(uy)
    out["other"] += int((~ok).sum())
    ux, uy = ux[ok], uy[ok]
    n = ux.size
    if n == 0:
        return out
    fw = fwhm_ref if math.isfinite(fwhm_ref) else 3.0
    cls = np.full(n, "other", dtype="U10")
    pts = np.column_stack([ux, uy])
    if detected.any() and tx.size:
        d_det, _ = cKDTree(np.column_stack([tx[detected], ty[detected]])).query(pts)
        near_un = np.zeros(n, bool)
        if (~detected).any():
            d_un, _ = cKDTree(np.column_stack([tx[~detected], ty[~detected]])).query(pts)
            near_un = d_un <= 2.0 * match_radius
        cls[(d_det <= duplicate_radius_fwhm * fw) & ~near_un] = "duplicate"
    todo = cls == "other"
    sat_near = np.zeros(n, bool)
    if np.any(tsat):
        d_sat, _ = cKDTree(np.column_stack([tx[tsat], ty[tsat]])).query(pts)
        sat_near |= d_sat <= saturated_halo_fwhm * fw
    if bleed_mask is not None:
        sat_near |= _near_mask(ux, uy, bleed_mask, exclude_radius_px)
    cls[todo & sat_near] = "saturated"
    todo = cls == "other"
    defect = np.zeros(n, bool)
    for m in defect_masks:
        if m is not None:
            defect |= _near_mask(ux, uy, m, exclude_radius_px)
    cls[todo & defect] = "defect"
    for k in ("duplicate", "saturated", "defect", "other"):
        out[k] += int(np.sum(cls == k))
    return out


def _fwhm_zones(catalog, truth, fwhm_meas, *, x_col, y_col):
    """Measured / true FWHM - 1 at the centre and in the corners (see the module docstring)."""
    if "fwhm_px" not in truth.colnames or len(truth) == 0:
        return {}
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    tf = np.asarray(truth["fwhm_px"], float)
    shape = truth.meta.get("shape")
    if shape is None:
        ny, nx = float(np.nanmax(ty)) + 1, float(np.nanmax(tx)) + 1
    else:
        ny, nx = float(shape[0]), float(shape[1])
    half_diag = 0.5 * math.hypot(nx, ny)
    per_star = "psf_fwhm_px" in catalog.colnames
    if per_star:
        match = match_to_truth(catalog, truth, radius_px=1.5, x_col=x_col, y_col=y_col)
        meas = np.full(len(truth), np.nan)
        meas[match.truth_index] = np.asarray(catalog["psf_fwhm_px"], float)[match.catalog_index]
    else:
        meas = np.full(len(truth), float(fwhm_meas))
    zones = {
        "centre": ((nx - 1) / 2.0, (ny - 1) / 2.0, 0.15),
        "corner_ll": (0.0, 0.0, 0.25),
        "corner_lr": (nx - 1.0, 0.0, 0.25),
        "corner_ul": (0.0, ny - 1.0, 0.25),
        "corner_ur": (nx - 1.0, ny - 1.0, 0.25),
    }
    out = {"source": "psf_fwhm_px" if per_star else "fwhm_px"}
    for name, (zx, zy, frac) in zones.items():
        sel = (np.hypot(tx - zx, ty - zy) <= frac * half_diag) & np.isfinite(meas) & np.isfinite(tf)
        if sel.sum() < 3:
            out[name] = None
            continue
        out[name] = {
            "n": int(sel.sum()),
            "fwhm_true_px": float(np.median(tf[sel])),
            "fwhm_measured_px": float(np.median(meas[sel])),
            "rel_err": float(np.median(meas[sel] / tf[sel]) - 1.0),
        }
    errs = [abs(v["rel_err"]) for k, v in out.items() if isinstance(v, dict)]
    out["max_abs_rel_err"] = max(errs) if errs else None
    return out


def _bootstrap_sigma(values, statistic, *, n_boot=200, seed=0):
    """Standard error of ``statistic(values)`` (bootstrap over the finite values, seeded: the
    same figure every run); NaN for fewer than 3 values."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 3:
        return float("nan")
    rng = np.random.default_rng(seed)
    est = [statistic(v[rng.integers(0, v.size, v.size)]) for _ in range(n_boot)]
    return float(np.std(est, ddof=1))


def _photometry_fidelity(
    col,
    catalog,
    truth,
    match,
    base,
    *,
    g,
    rn,
    sky,
    psf,
    fwhm_true,
    beta,
    fwhm_meas,
    aperture_radii_px,
    n_ann_col,
    n_annulus,
    edges,
    n_bright,
    offset_err_max_mag,
    encircled,
) -> PhotometryFidelity:
    flags = []
    is_psf = "psf" in col
    label = col[len("flux_") :] if col.startswith("flux_") else col
    err_col = col.replace("flux", "flux_err", 1)
    ci, ti = match.catalog_index, match.truth_index
    f_meas = np.asarray(catalog[col], float)[ci]
    f_err = (
        np.asarray(catalog[err_col], float)[ci]
        if err_col in catalog.colnames
        else np.full(ci.size, np.nan)
    )
    if err_col not in catalog.colnames:
        flags.append("no_error_column")
    f_true = np.asarray(truth["flux_adu"], float)[ti]
    sel = base[ti] & np.isfinite(f_meas) & (f_meas > 0)
    apcorr = None
    if not is_psf and f"apcorr_{label}" in catalog.colnames:
        apcorr = np.asarray(catalog[f"apcorr_{label}"], float)[ci]
        sel &= np.isfinite(apcorr) & (apcorr > 0)
        apcorr = np.where(np.isfinite(apcorr) & (apcorr > 0), apcorr, 1.0)
        flags.append("aperture_corrected")
    sky = np.asarray(sky)[ti] if np.ndim(sky) else sky

    if is_psf:
        radius = float("nan")
        offset_ideal = 0.0
        if "flux_err_crb_adu" in truth.colnames:
            sig_true_units = np.asarray(truth["flux_err_crb_adu"], float)[ti]
        else:
            sig_true_units = np.full(ci.size, np.nan)
            flags.append("no_crb_column")
    else:
        radius = _aperture_radius(label, catalog.meta, fwhm_meas, aperture_radii_px)
        if not math.isfinite(radius):
            flags.append("unknown_aperture_radius")
        if "fwhm_px" in truth.colnames and "beta" in truth.colnames and psf == "moffat":
            from rpp_tasks.sim.synthetic import moffat_alpha_px

            bt = np.asarray(truth["beta"], float)[ti]
            al = np.array(
                [moffat_alpha_px(f, b) for f, b in zip(np.asarray(truth["fwhm_px"], float)[ti], bt)]
            )
            ee_star = 1.0 - (1.0 + (radius / al) ** 2) ** (1.0 - bt)
            ee = float(np.median(ee_star[sel])) if sel.any() else float("nan")
        else:
            ee = (
                float(encircled(radius, psf=psf, fwhm_px=fwhm_true, beta=beta))
                if math.isfinite(radius)
                else np.nan
            )
        offset_ideal = -2.5 * math.log10(ee) if ee > 0 else float("nan")
        if apcorr is not None:
            offset_ideal = 0.0

    dm = -2.5 * np.log10(np.where(sel, f_meas, np.nan) / f_true)
    n_used = int(sel.sum())
    nan = float("nan")
    if n_used < 3:
        flags.append("too_few_stars")
        return PhotometryFidelity(
            col,
            "psf" if is_psf else "aperture",
            radius,
            n_used,
            nan,
            offset_ideal,
            nan,
            nan,
            nan,
            nan,
            nan,
            0,
            (),
            tuple(flags),
        )

    # expected errors need the offset (F_ap = c F_true); start from the ideal, refine once
    def expected(c):
        if is_psf:
            return sig_true_units * c
        if n_ann_col is not None:
            n_ann = n_ann_col[ci]
        else:
            n_ann = n_annulus
            if n_ann is None:
                flags.append("annulus_term_omitted")
        if apcorr is not None:
            return apcorr * expected_aperture_error_adu(
                c * f_true / apcorr,
                radius_px=radius,
                sky_adu=sky,
                gain_e_per_adu=g,
                read_noise_e=rn,
                n_annulus=n_ann,
            )
        return expected_aperture_error_adu(
            c * f_true,
            radius_px=radius,
            sky_adu=sky,
            gain_e_per_adu=g,
            read_noise_e=rn,
            n_annulus=n_ann,
        )

    from astropy.stats import sigma_clip

    c0 = 10 ** (-0.4 * offset_ideal) if math.isfinite(offset_ideal) else 1.0
    sig_mag = _MAG_PER_FLUX * expected(c0) / (c0 * f_true)
    good_for_offset = sel & (sig_mag < offset_err_max_mag)
    if good_for_offset.sum() < 10:
        good_for_offset = sel
        flags.append("offset_from_faint")
    kept = sigma_clip(dm[good_for_offset], sigma=3.0, maxiters=10)
    offset = float(np.ma.median(kept))
    offset_sigma = _bootstrap_sigma(np.ma.compressed(kept), np.median)
    if not math.isfinite(offset_sigma):
        offset_sigma = 0.0
        flags.append("offset_error_unknown")
    c = 10 ** (-0.4 * offset)
    sig = expected(c)
    sig_mag = _MAG_PER_FLUX * sig / (c * f_true)
    resid = f_meas - c * f_true
    # the offset is itself an estimate: its error is common to every star, in flux proportional
    # to the star's flux, so it is part of each comparison's expected variance (it matters for
    # the brightest stars, whose own errors are comparable to it)
    var_offset = (offset_sigma / _MAG_PER_FLUX * c * f_true) ** 2
    z = resid / np.sqrt(sig**2 + var_offset)
    z_rep = resid / np.sqrt(f_err**2 + var_offset)
    scatter_ratio = robust_std(z[sel])
    error_ratio = robust_std(z_rep[sel])

    tsnr = np.asarray(truth["snr_expected"], float)[ti]
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        b = sel & (tsnr > lo) & (tsnr <= hi)
        if not b.any():
            continue
        bins.append(
            {
                "snr_lo": float(lo),
                "snr_hi": float(hi),
                "n": int(b.sum()),
                "scatter_mag": robust_std(dm[b] - offset),
                "expected_mag": float(np.sqrt(np.mean(sig_mag[b] ** 2))),
                "scatter_ratio": robust_std(z[b]),
                "error_ratio": robust_std(z_rep[b]),
            }
        )

    idx = np.flatnonzero(sel)
    bright = idx[np.argsort(-f_true[idx])[:n_bright]]
    if bright.size >= 5:
        b_scatter = robust_std(dm[bright] - offset)
        b_expected = float(np.sqrt(np.mean(sig_mag[bright] ** 2)))
        b_floor = math.sqrt(max(0.0, b_scatter**2 - b_expected**2))
    else:
        b_scatter = b_expected = b_floor = nan
        flags.append("too_few_bright_stars")
    return PhotometryFidelity(
        flux_col=col,
        kind="psf" if is_psf else "aperture",
        radius_px=radius,
        n_used=n_used,
        offset_mag=offset,
        offset_ideal_mag=offset_ideal,
        offset_sigma_mag=offset_sigma,
        scatter_ratio=scatter_ratio,
        error_ratio=error_ratio,
        bright_scatter_mag=b_scatter,
        bright_expected_mag=b_expected,
        bright_floor_mag=b_floor,
        n_bright=int(bright.size),
        bins=tuple(bins),
        flags=tuple(dict.fromkeys(flags)),
        samples={
            "snr_expected": tsnr[sel],
            "z": z[sel],
            "z_reported": z_rep[sel],
            "dm": dm[sel] - offset,
            "expected_mag": sig_mag[sel],
            "x": np.asarray(truth["x"], float)[ti][sel],
            "y": np.asarray(truth["y"], float)[ti][sel],
        },
    )
