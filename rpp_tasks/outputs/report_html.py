"""The report page: one self-contained HTML file (`render_report_html`) and the header facts.

Every plot is embedded as a base64 ``data:`` URI and the CSS is inline, so the page opens offline,
from an e-mail attachment or from a ZIP. Each section is rendered only from data that exists; a
section whose data is missing says "not available yet" with the reason, never invented values.
The night's figures come from the session summary (`~rpp_tasks.session.summary.SessionSummary`
and its `~rpp_tasks.session.summary.Headline`); `header_facts` gathers the observing conditions
(weather keywords) the calibrated frames' headers carry.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rpp_tasks import __version__
from rpp_tasks.outputs.plots import _finite, _parse_time
from rpp_tasks.stages import columns as C

__all__ = [
    "NOT_AVAILABLE",
    "WEATHER_KEYWORDS",
    "FACT_KEYWORDS",
    "header_facts",
    "render_report_html",
]

NOT_AVAILABLE = "not available yet"

#: Header keywords reported as observing conditions when present: keyword -> label.
WEATHER_KEYWORDS: dict[str, str] = {
    "AMBTEMP": "ambient temperature",
    "AMB-TEMP": "ambient temperature",
    "TEMPEXT": "ambient temperature",
    "EXTTEMP": "ambient temperature",
    "OUTTEMP": "ambient temperature",
    "TEMPAIR": "ambient temperature",
    "HUMIDITY": "humidity",
    "RELHUM": "humidity",
    "HUMID": "humidity",
    "PRESSURE": "pressure",
    "PRESS": "pressure",
    "DEWPOINT": "dew point",
    "DEWPT": "dew point",
    "WINDSPD": "wind speed",
    "WINDSPEED": "wind speed",
    "WINDGUST": "wind gust",
    "WINDDIR": "wind direction",
    "CLOUDCVR": "cloud cover",
    "CLOUDS": "cloud cover",
    "SKYTEMP": "sky temperature",
    "SKYBRGHT": "sky brightness",
    "SKYQUAL": "sky quality (SQM)",
    "SQM": "sky quality (SQM)",
    "MPSAS": "sky quality (SQM)",
    "SEEING": "seeing (weather station)",
    "STARFWHM": "star FWHM (capture)",
    "RAINRATE": "rain rate",
    "AIRMASS": "airmass",
    "MOONANGL": "moon distance",
    "MOONPHAS": "moon phase",
    "FOCTEMP": "focuser temperature",
    "CCD-TEMP": "sensor temperature",
    "CCDTEMP": "sensor temperature",
}
#: Header keywords for the "who / what / where" facts: label -> candidate keywords.
FACT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "object": ("OBJECT", "OBJNAME", "TARGET"),
    "telescope": ("TELESCOP",),
    "instrument": ("INSTRUME", "CAMERA"),
    "observer": ("OBSERVER", "AUTHOR"),
    "site": ("SITENAME", "OBSERVAT", "SITE"),
    "filter": ("FILTER", "FILTER1", "FILTNAME"),
    "site latitude": ("SITELAT", "LAT-OBS", "OBSLAT"),
    "site longitude": ("SITELONG", "LONG-OBS", "OBSLONG"),
    "site elevation": ("SITEELEV", "ALT-OBS", "OBSALT"),
}


def _fmt(value, fmt: str = "{:.2f}", missing: str = "—") -> str:
    v = _finite(value)
    return missing if v is None else fmt.format(v)


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# =============================================================================== header facts
def header_facts(headers: Mapping[str, Any]) -> dict:
    """
    The facts observers look for, gathered from the frames' FITS headers.

    Parameters
    ----------
    headers : mapping of str to header-like mapping
        Frame name -> FITS header (or any mapping of keyword -> value).

    Returns
    -------
    facts : dict
        ``{"facts": {label: [distinct values]}, "weather": {keyword: {"label", "min", "median",
        "max", "n_frames", "comment"}}}``. Keywords absent from every header are left out.
    """
    facts: dict[str, list] = {}
    weather: dict[str, dict] = {}
    values: dict[str, list[float]] = {}
    comments: dict[str, str] = {}
    for hdr in headers.values():
        if hdr is None:
            continue
        for label, keys in FACT_KEYWORDS.items():
            for k in keys:
                v = hdr.get(k) if hasattr(hdr, "get") else None
                if v not in (None, ""):
                    v = str(v).strip()
                    if v and v not in facts.setdefault(label, []):
                        facts[label].append(v)
                    break
        for k in WEATHER_KEYWORDS:
            v = hdr.get(k) if hasattr(hdr, "get") else None
            fv = _finite(v) if not isinstance(v, bool) else None
            if fv is None:
                continue
            values.setdefault(k, []).append(fv)
            if k not in comments and hasattr(hdr, "comments"):
                try:
                    comments[k] = str(hdr.comments[k])
                except (KeyError, IndexError):
                    pass
    for k, vals in values.items():
        a = np.asarray(vals)
        weather[k] = {
            "label": WEATHER_KEYWORDS[k],
            "min": float(a.min()),
            "median": float(np.median(a)),
            "max": float(a.max()),
            "n_frames": int(a.size),
            "comment": comments.get(k, ""),
        }
    return {"facts": {k: v for k, v in facts.items() if v}, "weather": weather}


# =============================================================================== HTML
_CSS = """
:root { --ok:#1a7f37; --bad:#c62828; --warn:#b26a00; --ink:#1d2430; --muted:#5b6575; --line:#e3e7ee;
        --card:#f6f8fb; --accent:#283593; }
* { box-sizing: border-box; }
body { margin:0;
       font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Helvetica, Arial, sans-serif;
       color:var(--ink); background:#fff; line-height:1.45; font-size:15px; }
header { background: linear-gradient(120deg, #0b1033 0%, #1b2a6b 55%, #3949ab 100%); color:#fff;
         padding:28px 36px 22px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; letter-spacing:.2px; }
header .sub { opacity:.85; font-size:14px; }
main { max-width:1180px; margin:0 auto; padding:8px 28px 40px; }
h2 { font-size:19px; margin:30px 0 10px; padding-bottom:6px; border-bottom:2px solid var(--line);
     color:var(--accent); }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(165px, 1fr)); gap:12px;
         margin:20px 0 6px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px;
        padding:12px 14px; }
.card .v { font-size:24px; font-weight:650; }
.card .l { color:var(--muted); font-size:12.5px; text-transform:uppercase; letter-spacing:.4px; }
.card .s { color:var(--muted); font-size:12.5px; }
.pill { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12.5px;
        font-weight:600; }
.pill.ok { background:#e6f4ea; color:var(--ok); }
.pill.bad { background:#fdecea; color:var(--bad); }
.pill.na { background:#eef0f4; color:var(--muted); }
table { border-collapse:collapse; width:100%; font-size:13.5px; }
th, td { padding:6px 9px; border-bottom:1px solid var(--line); text-align:left;
         vertical-align:top; }
th { background:var(--card); font-weight:600; color:#2b3445; position:sticky; top:0; }
td.n, th.n { text-align:right; font-variant-numeric: tabular-nums; }
td.n { white-space:nowrap; }
tr.rejected td { background:#fff5f5; }
.facts { display:grid; grid-template-columns: 1fr 1fr; gap:18px; }
.facts table td:first-child { color:var(--muted); width:38%; }
figure { margin:14px 0; text-align:center; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.na { color:var(--muted); font-style:italic; background:var(--card); border:1px dashed #c9d0db;
      border-radius:8px; padding:10px 14px; }
.reason { color:var(--bad); font-size:12.5px; }
footer { color:var(--muted); font-size:12px; border-top:1px solid var(--line); margin-top:36px;
         padding-top:10px; }
code { background:var(--card); padding:1px 4px; border-radius:4px; font-size:12.5px; }
@media (max-width: 760px) { .facts { grid-template-columns: 1fr; } main { padding:8px 12px; } }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_html(png: bytes | None, alt: str, caption: str, *, missing: str) -> str:
    if not png:
        return f'<p class="na">{_esc(missing)}</p>'
    return (
        f'<figure><img src="{_data_uri(png)}" alt="{_esc(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _range_text(values: Sequence, fmt: str = "{:g}") -> str:
    vals = sorted({v for v in (_finite(x) for x in values) if v is not None})
    if not vals:
        return "—"
    return (
        fmt.format(vals[0]) if len(vals) == 1 else f"{fmt.format(vals[0])}–{fmt.format(vals[-1])}"
    )


def _weather_range(w: Mapping[str, Any]) -> str:
    """Range of a weather keyword: ``"-12 to -8"``, or the single value when it did not change."""
    lo, hi = _fmt(w.get("min"), "{:.4g}"), _fmt(w.get("max"), "{:.4g}")
    return lo if lo == hi else f"{lo} to {hi}"


def _span_text(first, last) -> str:
    """``first – last`` frame times (UTC); the last one carries its date when it is another day
    (a folder holding two nights printed '2024-07-31 02:44 – 01:20', the last before the first)."""
    if not (first and last):
        return "—"
    end = f"{last:%H:%M}" if last.date() == first.date() else f"{last:%Y-%m-%d %H:%M}"
    return f"{first:%Y-%m-%d %H:%M} – {end}"


def _utc(value) -> str:
    t = _parse_time(value)
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else (str(value) if value else "—")


def render_report_html(
    summary: Mapping[str, Any],
    *,
    plots: Mapping[str, bytes | None] | None = None,
    facts: Mapping[str, Any] | None = None,
    site: Mapping[str, Any] | None = None,
    title: str | None = None,
    candidates: Mapping[str, Any] | None = None,
    preview_frame: str | None = None,
    products_zip: str | None = None,
    generated_utc: str | None = None,
    cutouts: Mapping[tuple[str, str], bytes] | None = None,
    zeropoint_reason: str = "",
    candidates_reason: str = "",
    target_html: str = "",
) -> str:
    """
    Render the self-contained HTML report of a session.

    Parameters
    ----------
    summary : `~rpp_tasks.session.summary.SessionSummary` or its dict
        The session summary: the headline facts and the frames (status, reason, FWHM,
        background, zero point, limiting magnitudes).
    plots : mapping of str to bytes, optional
        PNG bytes by section: ``preview``, ``trends``, ``mag_error``, ``zeropoint``, ``field``.
        A missing or None entry renders "not available yet" with the reason.
    facts : mapping, optional
        Output of `header_facts`.
    site : mapping, optional
        ``name``, ``latitude_deg``, ``longitude_deg``, ``elevation_m``, ``telescope``, ``camera``
        from the observatory configuration.
    title : str, optional
        Observatory title for the page header.
    candidates : mapping of str to `~astropy.table.Table`, optional
        Frame name -> transient candidates (the table of the candidates section).
    cutouts : mapping of (frame, id) to bytes, optional
        PNG cutouts of the candidates, shown in the table.
    zeropoint_reason, candidates_reason : str, optional
        Why zero points / candidates are missing, appended to "not available yet".
    target_html : str, optional
        The observer's targets (`rpp_tasks.outputs.report_target.target_section_html`): the page
        leads with it.
    preview_frame : str, optional
        Name of the frame shown in the preview.
    products_zip : str, optional
        Relative link to the products ZIP.
    generated_utc : str, optional
        Generation time (default: now).

    Returns
    -------
    html : str
    """
    from rpp_tasks.session.summary import SessionSummary

    plots = dict(plots or {})
    facts = dict(facts or {})
    site = dict(site or {})
    summary = SessionSummary.coerce(summary)
    h = summary.headline
    frames = [f.to_dict() for f in summary.frames]
    n_sci, n_ok = h.n_science, h.n_ok
    session_id = summary.session_id or "?"
    obs_name = summary.observatory
    generated_utc = generated_utc or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    has_zp = h.median_zp_mag is not None
    has_cand = h.n_transient_candidates is not None
    fwhm_as, fwhm_px = h.median_fwhm_arcsec, h.median_fwhm_px
    objects, bands = h.objects, h.bands
    first, last = _parse_time(h.first_date_obs), _parse_time(h.last_date_obs)

    def card(value, label, sub=""):
        return (
            f'<div class="card"><div class="l">{_esc(label)}</div><div class="v">{value}</div>'
            f'<div class="s">{sub}</div></div>'
        )

    status_pill = (
        f'<span class="pill ok">{n_ok}/{n_sci} reduced</span>'
        if n_ok == n_sci and n_sci
        else f'<span class="pill bad">{n_ok}/{n_sci} reduced</span>'
    )
    cards = [
        card(
            f"{n_ok}<span style='font-size:15px;color:#5b6575'> / {n_sci}</span>",
            "frames reduced",
            status_pill + (f" &nbsp;{n_sci - n_ok} rejected" if n_sci - n_ok else ""),
        ),
        card(
            f"{fwhm_as:.2f}\u2033"
            if fwhm_as is not None
            else (f"{fwhm_px:.2f} px" if fwhm_px else "—"),
            "median FWHM",
            f"{fwhm_px:.2f} px" if fwhm_px is not None and fwhm_as is not None else "",
        ),
        card(
            _fmt(h.median_sky_adu, "{:.0f}"),
            "median sky (ADU)",
            f"range {h.min_sky_adu:.0f}–{h.max_sky_adu:.0f}"
            if n_ok > 1 and h.min_sky_adu is not None
            else "",
        ),
        card(
            _fmt(h.limiting_mag),
            "deepest limiting mag",
            "5σ, calibrated"
            if h.limiting_mag_kind == "calibrated"
            else "5σ, instrumental (zero point " + NOT_AVAILABLE + ")",
        ),
        card(f"{h.n_sources:,}", "sources measured", "all reduced frames"),
        card(
            str(h.n_transient_candidates) if has_cand else "—",
            "transient candidates",
            "" if has_cand else NOT_AVAILABLE,
        ),
    ]

    # --- header facts
    fact_rows = []
    f_facts = dict(facts.get("facts") or {})
    fact_rows.append(("object", ", ".join(objects) or ", ".join(f_facts.get("object", [])) or "—"))
    fact_rows.append(("bands", ", ".join(bands) or ", ".join(f_facts.get("filter", [])) or "—"))
    fact_rows.append(
        (
            "exposure",
            (_range_text([f.get("exptime_s") for f in frames]) + " s")
            if any(_finite(f.get("exptime_s")) for f in frames)
            else "—",
        )
    )
    total_exp = h.total_exptime_s
    fact_rows.append(
        ("total exposure (reduced)", f"{total_exp / 60:.1f} min" if total_exp else "—")
    )
    fact_rows.append(
        (
            "first / last frame (UTC)",
            _span_text(first, last),
        )
    )
    for label in ("telescope", "instrument", "observer"):
        vals = f_facts.get(label) or ([site[label]] if site.get(label) else [])
        if label == "instrument" and not vals and site.get("camera"):
            vals = [site["camera"]]
        fact_rows.append((label, ", ".join(vals) or "—"))
    site_txt = site.get("name") or ", ".join(f_facts.get("site", [])) or ""
    if (
        _finite(site.get("latitude_deg")) is not None
        and _finite(site.get("longitude_deg")) is not None
    ):
        site_txt += (
            f" ({site['latitude_deg']:.4f}°, {site['longitude_deg']:.4f}°"
            + (
                f", {site['elevation_m']:.0f} m"
                if _finite(site.get("elevation_m")) is not None
                else ""
            )
            + ")"
        )
    fact_rows.append(("site", site_txt.strip() or "—"))
    cal = summary.n_calibration or {}
    if cal:
        fact_rows.append(("calibration frames", ", ".join(f"{v} {k}" for k, v in cal.items())))
    facts_html = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in fact_rows)
    weather = facts.get("weather") or {}
    if weather:
        wrows = "".join(
            f"<tr><td>{_esc(w['label'])} <code>{_esc(k)}</code></td>"
            f"<td class='n'>{_esc(_fmt(w['median'], '{:.4g}'))}</td>"
            f"<td class='n'>{_esc(_weather_range(w))}</td>"
            f"<td>{_esc(w.get('comment', ''))}</td></tr>"
            for k, w in weather.items()
        )
        weather_html = (
            "<table><tr><th>condition</th><th class='n'>median</th><th class='n'>range</th>"
            f"<th>header comment</th></tr>{wrows}</table>"
        )
    else:
        weather_html = (
            "<p class='na'>No weather keywords in the headers (e.g. AMBTEMP, HUMIDITY, "
            "SKYQUAL).</p>"
        )

    # --- per-frame table
    rows = []
    for fs, f in zip(summary.frames, frames, strict=True):
        st = f.get("status", "?")
        good = st == "ok"
        zp = _finite(f.get("zp_mag"))
        lim_i = _finite(f.get("limiting_mag_inst"))
        lim_c = _finite(f.get("limiting_mag_cal"))
        lim = (
            f"{lim_c:.2f}"
            if lim_c is not None
            else (
                f"{lim_i:.2f} <span style='color:#5b6575'>inst</span>" if lim_i is not None else "—"
            )
        )
        zp_txt = (
            (
                f"{zp:.3f}"
                + (f" ± {f['zp_err_mag']:.3f}" if _finite(f.get("zp_err_mag")) is not None else "")
                + (
                    f" <span style='color:#5b6575'>({int(f['n_zp_stars'])}★)</span>"
                    if _finite(f.get("n_zp_stars")) is not None
                    else ""
                )
            )
            if zp is not None
            else "—"
        )
        cand = (
            str(len(candidates[f["frame"]]))
            if has_cand and candidates.get(f.get("frame")) is not None
            else "—"
        )
        pill = (
            '<span class="pill ok">ok</span>'
            if good
            else f'<span class="pill bad">{_esc(st)}</span>'
        )
        reason = (
            ""
            if good
            else (
                f"<div class='reason'>{_esc(f.get('failed_stage') or '')}: "
                f"{_esc(f.get('reason') or 'no reason recorded')}</div>"
            )
        )
        gain_note = fs.gain_warning
        if gain_note:
            reason += f"<div class='reason' style='color:var(--warn)'>{_esc(gain_note)}</div>"
        fwhm = "—"
        if _finite(f.get("fwhm_px")) is not None:
            fwhm = (
                f"{f['fwhm_arcsec']:.2f}\u2033 / "
                if _finite(f.get("fwhm_arcsec")) is not None
                else ""
            ) + f"{f['fwhm_px']:.2f} px"
        t = _parse_time(f.get("date_obs"))
        rows.append(
            f"<tr class='{'' if good else 'rejected'}'><td><b>{_esc(f.get('frame'))}</b>{reason}"
            f"</td><td>{pill}</td>"
            f"<td>{_esc(t.strftime('%H:%M:%S') if t else '—')}</td>"
            f"<td>{_esc(f.get('object') or '—')}</td>"
            f"<td>{_esc(f.get('band') or '—')}</td>"
            f"<td class='n'>{_esc(_fmt(f.get('exptime_s'), '{:g}'))}</td>"
            f"<td class='n'>{_esc(f.get('n_sources') if f.get('n_sources') is not None else '—')}"
            f"</td><td class='n'>{fwhm}</td>"
            f"<td class='n'>{_esc(_fmt(f.get('background_adu'), '{:.0f}'))}</td>"
            f"<td class='n'>{zp_txt}</td><td class='n'>{lim}</td><td class='n'>{_esc(cand)}</td>"
            "</tr>"
        )
    table_html = (
        "<table><tr><th>frame</th><th>status</th><th>UTC</th><th>object</th><th>band</th>"
        "<th class='n'>exp (s)</th><th class='n'>sources</th><th class='n'>FWHM</th>"
        "<th class='n'>sky (ADU)</th><th class='n'>zero point</th><th class='n'>lim. mag (5σ)</th>"
        f"<th class='n'>cand.</th></tr>{''.join(rows)}</table>"
    )
    if not has_zp:
        table_html += (
            "<p style='color:#5b6575;font-size:13px'>Zero points: "
            + NOT_AVAILABLE
            + " for this session"
            + (f" ({_esc(zeropoint_reason)})" if zeropoint_reason else "")
            + ", so limiting magnitudes are instrumental (per second, before zero point).</p>"
        )
    if summary.files:  # every input file and its outcome (rpp_tasks.outputs.report_files)
        from rpp_tasks.outputs.report_files import files_table_html

        files_html = files_table_html(summary)
    else:  # a summary written before the files were recorded
        files_html = "".join(
            f"<li><code>{_esc(k)}</code>: {_esc((v or {}).get('reason'))}</li>"
            for k, v in (summary.rejected_files or {}).items()
        )
        files_html = f"<ul>{files_html}</ul>" if files_html else ""

    # --- candidates
    if not has_cand:
        why = (
            "the transient search had no reference catalogue "
            f"({_esc(candidates_reason)}), so no source "
            "could be called new"
            if candidates_reason
            else "the transient search has not run on this session"
        )
        cand_html = f"<p class='na'>Transient candidates: {NOT_AVAILABLE} ({why}).</p>"
    elif h.n_transient_candidates == 0:
        cand_html = "<p>No transient candidate in this session.</p>"
    else:
        crow = []
        for frame, t in candidates.items():
            if t is None:
                continue
            mag_col = C.mag("psf", calibrated=C.mag("psf", calibrated=True) in t.colnames)
            for r in t[:50]:

                def get(name, r=r, cols=t.colnames):
                    return r[name] if name in cols else None

                cid = str(get(C.ID))
                png = (cutouts or {}).get((frame, cid))
                img = (
                    f"<img src=\"{_data_uri(png)}\" alt='cutout' "
                    "style='height:72px;image-rendering:pixelated'>"
                    if png
                    else ""
                )
                crow.append(
                    f"<tr><td>{img}</td><td>{_esc(frame)}</td><td>{_esc(cid)}</td>"
                    f"<td class='n'>{_esc(_fmt(get(C.RA), '{:.5f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get(C.DEC), '{:.5f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get(C.X), '{:.1f}'))}, "
                    f"{_esc(_fmt(get(C.Y), '{:.1f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get(mag_col), '{:.2f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get(C.SNR), '{:.1f}'))}</td>"
                    f"<td>{_esc(get(C.SIMBAD_ID) or '')}</td></tr>"
                )
        cand_html = (
            "<table><tr><th>cutout</th><th>frame</th><th>id</th><th class='n'>RA (°)</th>"
            "<th class='n'>Dec (°)</th><th class='n'>x, y (px)</th><th class='n'>mag</th>"
            "<th class='n'>S/N</th><th>note</th></tr>"
            f"{''.join(crow)}</table>"
        )

    preview_caption = (
        (
            f"Frame <b>{_esc(preview_frame)}</b> (best FWHM of the night), zscale. "
            "Circles: detections "
            "coloured by S/N class (green &gt; 10, amber 5–10, red &le; 5)"
            + (
                "; magenta squares: transient candidates."
                if has_cand
                else "; transient candidates: " + NOT_AVAILABLE + "."
            )
        )
        if preview_frame
        else ""
    )
    zp_missing = (
        "Zero-point residuals: "
        + NOT_AVAILABLE
        + " ("
        + (
            f"no zero point for this session: {zeropoint_reason}"
            if zeropoint_reason
            else "no zero-point stars recorded for this session"
        )
        + ")."
    )
    zip_html = (
        f"<p>All products of the session (calibrated frames, catalogues, summaries, this report): "
        f"<a href='{_esc(products_zip)}'>{_esc(Path(products_zip).name)}</a></p>"
        if products_zip
        else ""
    )

    sub = " · ".join(
        x
        for x in [
            f"{n_ok} of {n_sci} science frames reduced",
            f"median FWHM {fwhm_as:.2f}\u2033" if fwhm_as is not None else "",
            ", ".join(objects[:4]) + ("…" if len(objects) > 4 else ""),
            ", ".join(bands),
        ]
        if x
    )
    page_title = f"{title or obs_name} — night {session_id}"
    figs = {
        "trends": _figure_html(
            plots.get("trends"),
            "night trends",
            "Seeing, sky, number of sources and limiting magnitude through the night (limiting "
            "magnitude: up = deeper).",
            missing="Night trends: no reduced frame.",
        ),
        "preview": _figure_html(
            plots.get("preview"),
            "frame preview",
            preview_caption,
            missing="Frame preview: no reduced frame to show.",
        ),
        "mag_error": _figure_html(
            plots.get("mag_error"),
            "magnitude vs error",
            "Magnitude against its error for every measured source (PSF photometry where the fit "
            "succeeded, else the 1.3 FWHM aperture). Dashed: S/N 10 and 5.",
            missing="Photometry: no catalogue with magnitudes.",
        ),
        "zeropoint": _figure_html(
            plots.get("zeropoint"),
            "zero-point residuals",
            "Reference minus calibrated magnitude of the zero-point stars; grey band: RMS.",
            missing=zp_missing,
        ),
        "psf_map": _figure_html(
            plots.get("psf_map"),
            "PSF model across the field",
            f"PSF model of frame {_esc(preview_frame or '')}: FWHM (colour) and ellipticity "
            "(whisker length, along the major axis) across the field, the stars it was fitted on, "
            "and what is left when the model is subtracted from an isolated star near the centre, "
            "the edges and the corners (a good model leaves noise).",
            missing="PSF model across the field: no PSF model for this frame.",
        ),
        "field": _figure_html(
            plots.get("field"),
            "FWHM and background across the field",
            "FWHM in a 3×3 grid (stacked fit of the stars in each cell) and the sky background of "
            f"frame {_esc(preview_frame or '')}. Corner-to-centre FWHM differences show tilt, "
            "field curvature or coma.",
            missing="FWHM and background across the field: no reduced frame.",
        ),
    }
    body = f"""
<header><h1>{_esc(page_title)}</h1><div class="sub">{_esc(sub)}</div></header>
<main>
{target_html}
<div class="cards">{"".join(cards)}</div>

<h2>The night</h2>
<div class="facts"><div><table>{facts_html}</table></div><div>{weather_html}</div></div>
{figs["trends"]}

<h2>Frame preview</h2>
{figs["preview"]}

<h2>Photometry</h2>
{figs["mag_error"]}

<h2>Zero point</h2>
{figs["zeropoint"]}

<h2>Across the field</h2>
{figs["psf_map"]}
{figs["field"]}

<h2>Transient candidates</h2>
{cand_html}

<h2>Frames</h2>
{table_html}

<h2>Every file of the session</h2>
{files_html}

<h2>Products</h2>
{zip_html}
<p>Work folder: <code>{_esc(summary.workdir or "")}</code></p>

<footer>Generated {_esc(generated_utc)} by rpp_tasks {_esc(summary.rpp_version or __version__)}
· configuration hash {_esc(summary.config_hash or "—")} · observatory {_esc(obs_name)}
· this page is self-contained (plots embedded) and can be read offline.</footer>
</main>"""
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(page_title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}\n</body></html>\n"
    )
