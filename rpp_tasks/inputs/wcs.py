"""The celestial WCS of a raw frame's header: `header_wcs` -> `WcsCheck`.

Fixed where a known quirk allows (SIP terms without ``-SIP`` in CTYPE), never raising for a bad
WCS (the status says why it is unusable). Fixes are made on a copy of the header, never on the
file.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from rpp_tasks.inputs.cards import json_safe, to_float

__all__ = ["WcsCheck", "header_wcs"]


@dataclass(frozen=True)
class WcsCheck:
    """Celestial WCS of a header (see `header_wcs`).

    ``status`` is ``"valid"``, ``"valid-sip-fixed"``, ``"absent"`` or ``"invalid: <why>"``;
    ``wcs`` is None unless the status starts with ``"valid"``. ``footprint`` is the 4x2 array of
    (ra, dec) corners in degrees.
    """

    wcs: WCS | None
    status: str
    pixel_scale_arcsec: float | None = None
    center_ra_deg: float | None = None
    center_dec_deg: float | None = None
    footprint: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_valid(self) -> bool:
        return self.status.startswith("valid")

    def to_dict(self) -> dict:
        """JSON-safe summary (the WCS object itself is left out)."""
        return json_safe(
            {
                "status": self.status,
                "pixel_scale_arcsec": self.pixel_scale_arcsec,
                "center_ra_deg": self.center_ra_deg,
                "center_dec_deg": self.center_dec_deg,
                "footprint": None
                if self.footprint is None
                else np.asarray(self.footprint).tolist(),
                "notes": list(self.notes),
            }
        )


_WCS_KEY_RE = re.compile(r"^(CTYPE|CRVAL|CRPIX|CDELT|CUNIT|CROTA)\d$|^(CD|PC)\d_\d$")


def header_wcs(header):
    """
    Check the celestial WCS of a header; never raises for a bad WCS.

    * No ``CTYPE1``/``CTYPE2``: ``"absent"`` (left-over linear keywords such as ``CDELT1=1`` without
      CTYPE, common in capture software, are ignored with a note).
    * SIP coefficients (``A_ORDER``) with CTYPEs lacking ``-SIP`` (astrometry.net output re-saved by
      other software, e.g. Huntsman ``science_0``): the suffix is added on a copy of the header and
      the status is ``"valid-sip-fixed"``; the returned WCS applies SIP.
    * Not celestial, singular or non-finite CD/PC matrix, NaN reference values, a pixel scale above
      0.5 deg/px, or a projection that fails at the image centre: ``"invalid: <why>"``.

    Parameters
    ----------
    header : `~astropy.io.fits.Header`
        With ``NAXIS1``/``NAXIS2`` describing the image (for the centre and the footprint).

    Returns
    -------
    `WcsCheck`
        Centre at the image centre, 0-based pixel ``((nx-1)/2, (ny-1)/2)``.
    """
    notes: list[str] = []
    try:
        ctypes = [header.get("CTYPE1"), header.get("CTYPE2")]
        bad = [
            k
            for k in header.keys()
            if _WCS_KEY_RE.match(k)
            and not k.startswith(("CTYPE", "CUNIT"))
            and not isinstance(header[k], (int, float, np.number))
        ]
    except (ValueError, fits.VerifyError) as exc:
        return WcsCheck(
            wcs=None, status=f"invalid: unparsable WCS card ({' '.join(str(exc).split())[:150]})"
        )
    if bad:
        k = bad[0]
        return WcsCheck(wcs=None, status=f"invalid: {k}={header[k]!r} is not a number")
    if not any(isinstance(c, str) and c.strip() for c in ctypes):
        if any(_WCS_KEY_RE.match(k) for k in header.keys()):
            notes.append("linear WCS keywords without CTYPE ignored")
        return WcsCheck(wcs=None, status="absent", notes=tuple(notes))
    hdr = header.copy()
    status = "valid"
    c1, c2 = (str(c or "").strip() for c in ctypes)
    if "A_ORDER" in hdr and "B_ORDER" in hdr and not (c1.endswith("-SIP") and c2.endswith("-SIP")):
        hdr["CTYPE1"] = c1[:8].ljust(8, "-") + "-SIP" if len(c1) <= 8 else c1
        hdr["CTYPE2"] = c2[:8].ljust(8, "-") + "-SIP" if len(c2) <= 8 else c2
        status = "valid-sip-fixed"
        notes.append(
            f"SIP coefficients without '-SIP' in CTYPE: read as {hdr['CTYPE1']}/{hdr['CTYPE2']}"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w = WCS(hdr, naxis=2, relax=True, fix=True)
        for c in caught:
            text = " ".join(str(c.message).split())
            if text and "'datfix' made the change" not in text:
                notes.append(f"{c.category.__name__}: {text[:200]}")
        if not w.has_celestial:
            return WcsCheck(
                wcs=None,
                status=f"invalid: not a celestial WCS (CTYPE {c1!r}/{c2!r})",
                notes=tuple(notes),
            )
        if not np.all(np.isfinite(w.wcs.crval)) or not np.all(np.isfinite(w.wcs.crpix)):
            return WcsCheck(wcs=None, status="invalid: non-finite CRVAL/CRPIX", notes=tuple(notes))
        m = w.pixel_scale_matrix
        if not np.all(np.isfinite(m)):
            return WcsCheck(wcs=None, status="invalid: non-finite CD/PC matrix", notes=tuple(notes))
        det = float(np.linalg.det(m))
        if det == 0 or abs(det) < 1e-20:
            return WcsCheck(
                wcs=None,
                status="invalid: singular CD/PC matrix (determinant 0)",
                notes=tuple(notes),
            )
        scale = math.sqrt(abs(det)) * 3600.0
        if scale > 1800.0:
            return WcsCheck(
                wcs=None,
                status=f"invalid: implausible pixel scale {scale:.4g} arcsec/px",
                notes=tuple(notes),
            )
        nx = int(to_float(header.get("NAXIS1")) or 0)
        ny = int(to_float(header.get("NAXIS2")) or 0)
        if nx > 0 and ny > 0:
            cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        else:
            cx, cy = w.wcs.crpix[0] - 1, w.wcs.crpix[1] - 1
            notes.append("no NAXIS1/NAXIS2: centre taken at CRPIX")
        ra, dec = (float(v) for v in w.pixel_to_world_values(cx, cy))
        if not (math.isfinite(ra) and math.isfinite(dec)):
            return WcsCheck(
                wcs=None, status="invalid: projection fails at the image centre", notes=tuple(notes)
            )
        footprint = w.calc_footprint(axes=(nx, ny)) if nx > 0 and ny > 0 else None
        if footprint is not None and not np.all(np.isfinite(footprint)):
            return WcsCheck(
                wcs=None,
                status="invalid: projection fails at the image corners",
                notes=tuple(notes),
            )
    # astropy/wcslib raise many types for broken headers; a bad WCS must not stop the frame
    except Exception as exc:
        return WcsCheck(
            wcs=None,
            status=f"invalid: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
            notes=tuple(notes),
        )
    return WcsCheck(
        wcs=w,
        status=status,
        pixel_scale_arcsec=scale,
        center_ra_deg=ra % 360.0,
        center_dec_deg=dec,
        footprint=footprint,
        notes=tuple(notes),
    )
