"""The photometry stage of one frame: the catalogue with RA/Dec and the limiting magnitude.

`measure_catalog` runs `rpp_tasks.stages.photometry.measure_frame` (field PSF, PSF and aperture
photometry, S/N flags) on one calibrated image, adds RA/Dec from the header WCS, the provenance
and the instrumental 5-sigma limiting magnitude, and returns the catalogue and a small JSON-safe
result; the adapter `rpp_tasks.session.adapters.step_photometry` only hands it the frame's arrays
and configuration.
"""

from __future__ import annotations

import numpy as np

from rpp_tasks import __version__
from rpp_tasks.exceptions import FrameRejected

__all__ = ["measure_catalog", "add_sky_coordinates", "LIMITING_MAG_DEFINITION"]

LIMITING_MAG_DEFINITION = (
    "5-sigma point source in a 1.3 FWHM aperture from the background RMS, "
    "instrumental (per second, before zero point)"
)


def measure_catalog(
    data,
    background,
    rms,
    sources,
    *,
    mask,
    header,
    meta: dict,
    background_rms_adu: float,
    cfg,
    provenance: dict | None = None,
    frame: str = "",
    path: str | None = None,
    sky_map_sigma_adu: float | None = None,
):
    """
    Measure the catalogue of one calibrated frame.

    Parameters
    ----------
    data, background, rms : numpy.ndarray
        Calibrated image, sky background and sky RMS (ADU).
    sources : `~astropy.table.Table`
        Detections (`rpp_tasks.stages.detection.detect_sources`).
    mask : numpy.ndarray of bool
    header : `~astropy.io.fits.Header`
        Gives RA/Dec through its WCS (NaN without a valid one).
    meta : dict
        The frame's normalised header (``gain_e_per_adu``, ``exptime_s``, ``saturation_adu``,
        ``pixel_scale_arcsec``, ``band``).
    background_rms_adu : float
        Global sky RMS (limiting magnitude).
    cfg : `~rpp_tasks.config.PhotometryConfig`
    provenance : dict, optional
        Added to the catalogue ``meta`` (observatory, config hash).
    frame : str, optional
        Frame name (catalogue ``meta``).
    path : str, optional
        Raw file, for the rejection.
    sky_map_sigma_adu : float, optional
        Uncertainty of the sky map at a star (`BackgroundResult.map_sigma_adu`); see
        `rpp_tasks.stages.photometry.measure_frame`.

    Returns
    -------
    catalog : `~astropy.table.Table`
    result : dict
        FWHM, counts by S/N class, instrumental limiting magnitude, field-PSF facts.

    Raises
    ------
    FrameRejected
        The FWHM could not be measured.
    """
    from rpp_tasks.stages import photometry, psf

    gain, exptime = meta["gain_e_per_adu"], meta["exptime_s"]
    res = photometry.measure_frame(
        None,  # made from image - background inside, freed as soon as possible
        rms,
        sources,
        gain_e_per_adu=gain,
        exptime_s=exptime,
        saturation_adu=meta["saturation_adu"],
        fixed_radius_px=cfg.fixed_radius_px,
        annulus_fwhm=cfg.annulus_fwhm,
        mask=mask,
        image=data,
        background=background,
        psf=cfg.psf,
        psf_max_stars=max(cfg.epsf_max_stars, 250),
        sky_sigma_adu=sky_map_sigma_adu,
        frame=frame,
    )
    if res.psf is None:
        raise FrameRejected(
            "FWHM could not be measured (no isolated unsaturated stars)",
            path=path,
            stage="photometry",
        )
    cat, fwhm = (
        res.catalog,
        psf.FwhmResult(
            res.fwhm_px, float("nan"), res.psf.n_stars, float("nan"), res.psf.beta, "field PSF"
        ),
    )
    epsf_info = {k: v for k, v in res.info.items() if k not in ("fwhm_px",)}
    add_sky_coordinates(cat, header)
    scale = meta.get("pixel_scale_arcsec")
    r_lim = 1.3 * fwhm.fwhm_px
    apc = (res.info.get("aperture_corrections") or {}).get("1p3fwhm", {}).get("median_mag", 0.0)
    noise = background_rms_adu * np.sqrt(np.pi) * r_lim * 10 ** (0.4 * apc)
    lim_mag = (
        float(-2.5 * np.log10(5.0 * noise / exptime)) if exptime and noise > 0 else float("nan")
    )
    cat.meta.update(
        {
            "rpp_version": __version__,
            "fwhm_px": float(fwhm.fwhm_px),
            "exptime_s": exptime,
            "gain_e_per_adu": gain,
            **(provenance or {}),
            "frame": frame,
            "band": meta.get("band"),
        }
    )
    q = np.asarray(cat["quality"]).astype(str)
    return cat, {
        "fwhm_px": float(fwhm.fwhm_px),
        "fwhm_err_px": float(getattr(fwhm, "fwhm_err_px", np.nan)),
        "fwhm_arcsec": float(fwhm.fwhm_px * scale) if scale else None,
        "fwhm_n_stars": int(fwhm.n_stars),
        "n_sources": len(cat),
        "n_good": int(np.sum(q == "good")),
        "n_marginal": int(np.sum(q == "marginal")),
        "n_poor": int(np.sum(q == "poor")),
        "limiting_mag_inst": lim_mag,
        "limiting_mag_definition": LIMITING_MAG_DEFINITION,
        **epsf_info,
    }


def add_sky_coordinates(cat, header) -> None:
    """RA/Dec columns from the header WCS when it is valid (NaN otherwise), at the PSF position
    when fitted, else the centroid."""
    from rpp_tasks.inputs.wcs import header_wcs

    check = header_wcs(header)
    ra = np.full(len(cat), np.nan)
    dec = np.full(len(cat), np.nan)
    if check.wcs is not None:
        x = cat["x_psf"] if "x_psf" in cat.colnames else cat["x_centroid"]
        y = cat["y_psf"] if "y_psf" in cat.colnames else cat["y_centroid"]
        x = np.where(np.isfinite(x), x, cat["x_centroid"])
        y = np.where(np.isfinite(y), y, cat["y_centroid"])
        ra, dec = check.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    cat["ra"] = ra
    cat["dec"] = dec
    cat.meta["wcs_status"] = check.status
