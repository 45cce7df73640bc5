"""The morning report of a long-slit session (2SPOT-style spectroscopic report).

Reads only the session summary (`~rpp_tasks.session.summary.SessionSummary` with its ``spectra``)
and the plots the spectra stage drew: per target, the 1-D spectrum (main H and He lines and the
telluric bands marked), the wavelength-solution residuals, S/N, resolving power, wavelength range
and RMS, whether it is flux-calibrated, the BeSS header facts and the weather keywords of the raw
headers; a rejected target shows its stage and reason. The page is self-contained (plots inlined).
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

from rpp_tasks.outputs.report_html import _CSS, _data_uri, _fmt
from rpp_tasks.session.summary import SessionSummary

__all__ = ["build_spectra_report", "render_spectra_html"]

log = logging.getLogger(__name__)


def _esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _png(path) -> bytes | None:
    try:
        return Path(path).read_bytes() if path else None
    except OSError:
        return None


def _figure(path, alt: str, caption: str) -> str:
    png = _png(path)
    if not png:
        return f'<p class="na">{_esc(alt)}: not available</p>'
    return (
        f'<figure><img src="{_data_uri(png)}" alt="{_esc(alt)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def render_spectra_html(
    summary: SessionSummary, *, title: str | None = None, site=None, products_zip=None
) -> str:
    """The HTML page of a long-slit session summary."""
    h = summary.headline
    site = site or {}
    head = title or summary.observatory
    rows = []
    for s in summary.spectra:
        if s.ok:
            rng = f"{s.wavelength_min_a:.0f}–{s.wavelength_max_a:.0f}"
            rows.append(
                f"<tr><td>{_esc(s.target)}</td><td>reduced</td><td>{_esc(s.exptime2)}</td>"
                f"<td>{rng}</td><td>{_fmt(s.rms_a, '{:.3f}')} / {_fmt(s.rms_px, '{:.3f}')}</td>"
                f"<td>{_fmt(s.resolving_power, '{:.0f}')}</td>"
                f"<td>{_fmt(s.snr_median, '{:.0f}')}</td>"
                f"<td>{'yes' if s.flux_calibrated else 'no'}</td></tr>"
            )
        else:
            rows.append(
                f"<tr><td>{_esc(s.target)}</td><td>{_esc(s.status)}</td>"
                f'<td colspan="6">{_esc(s.failed_stage)}: {_esc(s.reason)}</td></tr>'
            )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{_esc(head)} — {_esc(summary.session_id)}</title><style>{_CSS}</style></head>",
        f"<body><h1>{_esc(head)}: spectra of {_esc(summary.night_date or summary.session_id)}</h1>",
        f"<p>{h.n_ok} of {h.n_science} target(s) reduced, {h.n_rejected} rejected; "
        f"total exposure {h.total_exptime_s:.0f} s. Site: {_esc(site.get('name'))} "
        f"({_fmt(site.get('latitude_deg'))}, {_fmt(site.get('longitude_deg'))}, "
        f"{_fmt(site.get('elevation_m'), '{:.0f}')} m); telescope "
        f"{_esc(site.get('telescope'))}.</p>",
    ]
    if products_zip:
        parts.append(f'<p><a href="{_esc(products_zip)}">Products ZIP</a></p>')
    parts += [
        "<h2>Targets</h2><table><tr><th>target</th><th>outcome</th><th>exposures</th>"
        "<th>range (Å)</th><th>RMS Å / px</th><th>R</th><th>S/N</th><th>flux-calibrated</th>"
        "</tr>",
        *rows,
        "</table>",
    ]
    for s in summary.ok_spectra:
        parts.append(f"<h2>{_esc(s.target)}</h2>")
        parts.append(
            _figure(
                s.spectrum_png,
                f"spectrum of {s.target}",
                "H (red), He (blue) lines and telluric bands (grey) marked"
                + ("" if s.flux_calibrated else "; not flux-calibrated (relative flux)"),
            )
        )
        parts.append(
            _figure(
                s.wavesol_png,
                f"wavelength solution of {s.target}",
                f"lamp lines: {s.n_lamp_lines}, RMS {_fmt(s.rms_a, '{:.3f}')} Å "
                f"({_fmt(s.rms_px, '{:.3f}')} px)",
            )
        )
        items = "".join(
            f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in s.header.items()
        )
        parts.append(f"<h3>Header (BeSS)</h3><table>{items}</table>")
        if s.weather:
            w = "".join(
                f"<tr><td>{_esc(k)}</td><td>{_esc(v.get('label'))}</td>"
                f"<td>{_fmt(v.get('min'))}</td><td>{_fmt(v.get('median'))}</td>"
                f"<td>{_fmt(v.get('max'))}</td></tr>"
                for k, v in s.weather.items()
            )
            parts.append(
                "<h3>Weather</h3><table><tr><th>keyword</th><th></th><th>min</th>"
                f"<th>median</th><th>max</th></tr>{w}</table>"
            )
        else:
            parts.append('<p class="na">Weather: no weather keyword in the headers</p>')
        if s.flags:
            parts.append(f"<p>Flags: {_esc(', '.join(s.flags))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_spectra_report(
    summary, *, workdir=None, out_dir=None, title=None, site=None, products_zip=None
):
    """Write ``<workdir>/report/report.html`` (and a copy of each plot) for a long-slit session;
    returns a `~rpp_tasks.outputs.report.ReportResult`."""
    from rpp_tasks.outputs.report import ReportResult

    summary = SessionSummary.coerce(summary)
    workdir = Path(workdir or summary.workdir or ".")
    out_dir = Path(out_dir) if out_dir else workdir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_rel = os.path.relpath(Path(products_zip), out_dir) if products_zip else None
    page = render_spectra_html(summary, title=title, site=site, products_zip=zip_rel)
    plot_paths = {}
    for s in summary.ok_spectra:
        for kind, path in (("spectrum", s.spectrum_png), ("wavesol", s.wavesol_png)):
            png = _png(path)
            if png:
                safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in s.target)
                p = out_dir / f"{kind}_{safe}.png"
                p.write_bytes(png)
                plot_paths[f"{kind}_{safe}"] = str(p)
    html_path = out_dir / "report.html"
    tmp = html_path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, html_path)
    ok = summary.ok_spectra
    return ReportResult(
        html_path=str(html_path),
        plot_paths=plot_paths,
        n_frames=len(summary.spectra),
        n_ok=len(ok),
        preview_frame=ok[0].target if ok else None,
        available={"spectra": bool(ok), "weather": any(s.weather for s in ok)},
        size_bytes=html_path.stat().st_size,
        flags=() if ok else ("no_reduced_spectrum",),
        frames={
            s.target: {"snr_median": s.snr_median, "resolving_power": s.resolving_power} for s in ok
        },
    )
