"""The observer's target first: what the report, the e-mail and the Telegram message lead with.

Every fact comes from the session summary (`~rpp_tasks.session.summary.SessionSummary.targets`,
typed `TargetSummary` / `TargetBand` built once from the ``targets`` stage): per target and band,
the calibrated magnitude ± error of each photometry type, the S/N, the differential magnitude
against the night's comparison ensemble, the match distance, or, when it was not detected, the
5-sigma limiting magnitude at its position. The light curve over the last nights is drawn from
the results database (`rpp_tasks.outputs.lightcurve`), never from the session's files.

* `target_lines(summary)` -- one plain-text line per target and band (e-mail text, Telegram);
* `target_email_rows(summary)` -- (label, value) rows for the e-mail's table;
* `target_section_html(summary, plots)` -- the report's leading "Your targets" section;
* `target_light_curve_plots(summary, results_url, ...)` -- PNG of each target's light curve over
  the last nights, read from the results database.
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path

from rpp_tasks.session.summary import SessionSummary, TargetBand, TargetSummary

__all__ = [
    "PHOT_LABELS",
    "band_text",
    "target_lines",
    "target_email_rows",
    "target_section_html",
    "target_light_curve_plots",
]

log = logging.getLogger(__name__)

#: How the photometry types are named for observers.
PHOT_LABELS = {"psf": "PSF", "1p3fwhm": "1.3 FWHM", "1p1fwhm": "1.1 FWHM", "fixed": "fixed ap."}


def _v(value, fmt="{:.3f}") -> str | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return fmt.format(v) if math.isfinite(v) else None


def _pm(mag, err) -> str | None:
    m = _v(mag)
    if m is None:
        return None
    e = _v(err)
    return f"{m} ± {e}" if e is not None else m


def band_text(b: TargetBand) -> str:
    """One band of a target in words, e.g. ``V = 14.123 ± 0.010 (PSF, mean of 3 frames), S/N 206,
    differential 14.120 ± 0.007 (13 comparison stars), matched at 0.02″``; or ``not detected:
    fainter than 19.20 (5σ limit at its position, calibrated, 3 frames)``."""
    if b.detected:
        pt = PHOT_LABELS.get(b.phot_type or "", b.phot_type or "")
        n = b.n_detected
        parts = [
            f"{b.band} = {_pm(b.mag, b.mag_err) or 'no zero point'}"
            + f" ({pt}, {'mean of ' + str(n) + ' frames' if n > 1 else '1 frame'})"
        ]
        if b.snr_median is not None:
            parts.append(f"S/N {b.snr_median:.0f}")
        diff = _pm(b.mag_diff, b.mag_diff_err)
        if diff is not None:
            comp = f" ({b.n_comp} comparison stars)" if b.n_comp else ""
            parts.append(f"differential {diff}{comp}")
        elif b.ensemble and b.ensemble != "ok":
            parts.append(f"no differential magnitude ({b.ensemble})")
        if b.match_sep_arcsec is not None:
            parts.append(f"matched at {b.match_sep_arcsec:.2f}\u2033")
        if b.n_upper_limits:
            parts.append(f"not detected in {b.n_upper_limits} frames")
        return ", ".join(parts)
    if b.n_upper_limits:
        lim = _v(b.limit_mag, "{:.2f}")
        kind = b.limit_kind or "instrumental"
        n = b.n_upper_limits
        if lim is None:
            return f"{b.band}: not detected ({n} frames, no limit measured)"
        return (
            f"{b.band}: not detected, fainter than {lim} "
            f"(5σ limit at its position, {kind}, {n} frame{'s' if n > 1 else ''})"
        )
    return f"{b.band}: no measurement"


def _by_type_text(b: TargetBand) -> str:
    """The latest detection in every photometry type: ``PSF 14.126 ± 0.010 (S/N 206) · ...``."""
    out = []
    for t in ("psf", "1p3fwhm", "1p1fwhm", "fixed"):
        d = b.by_type.get(t)
        if not d:
            continue
        m = _pm(d.get("mag"), d.get("mag_err"))
        if m is None:
            continue
        snr = _v(d.get("snr"), "{:.0f}")
        out.append(f"{PHOT_LABELS[t]} {m}" + (f" (S/N {snr})" if snr else ""))
    return " · ".join(out)


def _target_head(t: TargetSummary) -> str:
    pos = (
        f" ({t.ra_deg:.5f} {t.dec_deg:+.5f})"
        if t.ra_deg is not None and t.dec_deg is not None
        else ""
    )
    return f"{t.name}{pos}"


def _not_measured(t: TargetSummary) -> str:
    if t.n_outside_field and t.n_outside_field == t.n_frames:
        return f"outside the field in all {t.n_frames} frames" + (
            f" ({t.reason})" if t.reason else ""
        )
    return t.reason or "not measured"


def target_lines(summary) -> list[str]:
    """Plain-text lines, one per target and band (the e-mail text and the Telegram message lead
    with them); unresolved run/config names get one line each with the reason."""
    summary = SessionSummary.coerce(summary)
    lines = []
    for t in summary.targets:
        if not t.measured:
            lines.append(f"{_target_head(t)}: {_not_measured(t)}")
            continue
        for b in t.bands:
            if not (b.n_detected or b.n_upper_limits):
                continue
            lines.append(f"{t.name}: {band_text(b)}")
    for u in summary.targets_unresolved:
        if u.get("named_by") != "header":  # an OBJECT naming a field is no target
            lines.append(f"{u.get('query')}: not resolved ({u.get('reason')})")
    return lines


def target_email_rows(summary) -> list[tuple[str, str]]:
    """(label, value) rows for the top of the e-mail's table."""
    summary = SessionSummary.coerce(summary)
    rows = []
    for t in summary.targets:
        if not t.measured:
            rows.append((f"Target {t.name}", _not_measured(t)))
            continue
        for b in t.bands:
            if b.n_detected or b.n_upper_limits:
                by_t = _by_type_text(b) if b.detected else ""
                rows.append(
                    (f"Target {t.name}", band_text(b) + (f" — latest: {by_t}" if by_t else ""))
                )
    for u in summary.targets_unresolved:
        if u.get("named_by") != "header":
            rows.append((f"Target {u.get('query')}", f"not resolved: {u.get('reason')}"))
    return rows


# =============================================================================== report
def target_section_html(summary, plots: dict | None = None) -> str:
    """The report's leading section: a table of the night's targets (per band: calibrated
    magnitude ± error per photometry type, S/N, differential magnitude, match distance, or the
    limit at the position) and each target's light curve over the last nights (``plots``:
    target name -> PNG bytes). Empty string when the session has no target."""
    from rpp_tasks.outputs.report_html import _figure_html

    summary = SessionSummary.coerce(summary)
    plots = plots or {}
    e = html.escape
    unresolved = [u for u in summary.targets_unresolved if u.get("named_by") != "header"]
    if not summary.targets and not unresolved:
        return ""
    rows = []
    for t in summary.targets:
        head = (
            f"<b>{e(t.name)}</b><br><span style='color:#5b6575;font-size:12px'>"
            f"{e(_target_head(t)[len(t.name) :].strip(' ()'))} · named by {e(t.named_by or '?')}"
            "</span>"
        )
        if not t.measured:
            rows.append(f"<tr><td>{head}</td><td colspan='6'>{e(_not_measured(t))}</td></tr>")
            continue
        for b in t.bands:
            if not (b.n_detected or b.n_upper_limits):
                continue
            if b.detected:
                pt = PHOT_LABELS.get(b.phot_type or "", b.phot_type or "")
                cal = e(_pm(b.mag, b.mag_err) or "no zero point") + f" <small>({e(pt)})</small>"
                diff = _pm(b.mag_diff, b.mag_diff_err)
                diff_html = (
                    e(diff) + (f" <small>({b.n_comp} comp.)</small>" if b.n_comp else "")
                    if diff
                    else f"<span class='reason'>{e(b.ensemble or '—')}</span>"
                )
                types = e(_by_type_text(b))
                snr = e(_v(b.snr_median, "{:.0f}") or "—")
                sep = e(_v(b.match_sep_arcsec, "{:.2f}") or "—") + "\u2033"
                frames = f"{b.n_detected} detected" + (
                    f", {b.n_upper_limits} not" if b.n_upper_limits else ""
                )
            else:
                lim = _v(b.limit_mag, "{:.2f}")
                cal = (
                    f"&gt; {e(lim)} <small>(5σ limit at its position, "
                    f"{e(b.limit_kind or 'instrumental')})</small>"
                    if lim
                    else "not detected"
                )
                diff_html, types, snr, sep = "—", "", "—", "—"
                frames = f"not detected in {b.n_upper_limits}"
            rows.append(
                f"<tr><td>{head}</td><td>{e(b.band)}</td><td class='n'>{cal}</td>"
                f"<td class='n'>{snr}</td><td class='n'>{diff_html}</td><td class='n'>{sep}</td>"
                f"<td>{frames}<br><small>{types}</small></td></tr>"
            )
    for u in unresolved:
        rows.append(
            f"<tr><td><b>{e(str(u.get('query')))}</b></td><td colspan='6' class='reason'>"
            f"not resolved: {e(str(u.get('reason')))}</td></tr>"
        )
    table = (
        "<table><tr><th>target</th><th>band</th><th class='n'>calibrated magnitude</th>"
        "<th class='n'>S/N</th><th class='n'>differential</th><th class='n'>match</th>"
        f"<th>frames · latest per photometry type</th></tr>{''.join(rows)}</table>"
        "<p style='color:#5b6575;font-size:12.5px'>Calibrated: the night's weighted mean against "
        "the reference catalogue (zero point and extinction included). Differential: against the "
        "night's comparison ensemble, on the catalogue's scale. Not detected: the frame's 5σ "
        "limiting magnitude at the target's position (the deepest of the night).</p>"
    )
    figs = "".join(
        _figure_html(
            png,
            f"light curve of {t.name}",
            f"{e(t.name)}: light curve over the last nights from the results database "
            "(differential magnitudes where measured, else calibrated; open triangles: upper "
            "limits).",
            missing="",
        )
        for t in summary.targets
        if (png := plots.get(t.name))
    )
    return f"<h2>Your targets</h2>\n{table}\n{figs}"


def target_light_curve_plots(
    summary,
    results_url: str | None,
    out_dir: str | Path,
    *,
    nights: int = 30,
) -> dict[str, bytes]:
    """PNG of each measured target's light curve over the last ``nights`` nights up to this
    session's night, read from the results database (`rpp_tasks.outputs.lightcurve`); written
    as ``<out_dir>/lightcurve_<k>.png``. Targets with nothing recorded are left out; a database
    error is logged and gives no plot."""
    from rpp_tasks.outputs.lightcurve import LightCurve, plot_light_curve, target_light_curve

    summary = SessionSummary.coerce(summary)
    out: dict[str, bytes] = {}
    if not results_url:
        return out
    for k, t in enumerate(summary.targets, start=1):
        if not t.measured or t.ra_deg is None or t.dec_deg is None:
            continue
        try:
            table = target_light_curve(
                results_url,
                (t.ra_deg, t.dec_deg),
                observatory=summary.observatory,
                last_nights=nights,
                until_night=summary.night_date,
            )
        except Exception as exc:
            log.warning("[%s] light curve of %s not read: %s", summary.session_id, t.name, exc)
            continue
        if not len(table):
            continue
        n_nights = len(set(str(x) for x in table["night_date"]))
        path = plot_light_curve(
            LightCurve(table, (), t.name),
            Path(out_dir) / f"lightcurve_{k}.png",
            title=f"{t.name}: {len(table)} points over the last {n_nights} night"
            + ("s" if n_nights > 1 else ""),
        )
        out[t.name] = path.read_bytes()
    return out
