"""Session report: self-contained HTML, plots, honest "not available yet" sections, products ZIP."""

from __future__ import annotations

import base64
import json
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from rpp_tasks.outputs import plots, report, report_html
from rpp_tasks.session import adapters, lifecycle
from rpp_tasks.session.frame import FrameWork, frame_summary
from rpp_tasks.session.workdir import Session

PNG = b"\x89PNG\r\n\x1a\n"
SHAPE = (160, 200)


def _star_image(rng, xs, ys, fluxes, *, fwhm_px=3.2, sky=500.0, noise=8.0):
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    sigma = fwhm_px / 2.3548
    img = np.full(SHAPE, sky, float) + rng.normal(0, noise, SHAPE)
    for x, y, f in zip(xs, ys, fluxes):
        img += (
            f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        )
    return img.astype(np.float32)


def make_fake_session(
    tmp_path: Path,
    *,
    n_ok: int = 2,
    rejected: bool = True,
    zeropoint: bool | str = False,
    candidates: bool | str = False,
    session_id: str = "2025-01-15",
    stem_prefix: str = "demo_V_",
    object_name: str = "M 42",
) -> Session:
    """A small session work folder shaped like the pipeline's output (no reduction run: fast).

    ``zeropoint=True``: the zero-point stage's outputs (``zeropoint.json`` with per-type zero
    points, airmass and extinction; catalogue columns ``ref_mag``, ``zp_star``, ``mag_cal_*``);
    ``zeropoint="no_reference"``: its output when the reference catalogue was unreachable.
    ``candidates=True``: ``candidates.ecsv`` with one candidate and its PNG cutout;
    ``candidates="no_reference"``: the empty file flagged ``no_reference``.
    """
    rng = np.random.default_rng(1)
    s = Session.create(
        tmp_path / "raw" / session_id,
        observatory="demo",
        work_root=tmp_path / "work",
        session_id=session_id,
    )
    frames = []
    for i in range(n_ok):
        stem = f"{stem_prefix}{i + 1:03d}"
        d = s.frame_dir(stem)
        n = 40
        xs, ys = rng.uniform(12, SHAPE[1] - 12, n), rng.uniform(12, SHAPE[0] - 12, n)
        fluxes = 10 ** rng.uniform(3.3, 5, n)
        img = _star_image(rng, xs, ys, fluxes)
        hdr = fits.Header(
            {
                "OBJECT": object_name,
                "EXPTIME": 60.0,
                "DATE-OBS": f"2025-01-15T20:{30 + 2 * i}:00",
                "TELESCOP": "Demo 0.4 m",
                "INSTRUME": "SYNTH-CAM",
                "OBSERVER": "A. Observer",
                "FILTER": "V",
            }
        )
        hdr["AMBTEMP"] = (4.5 + i, "[C] ambient temperature")
        hdr["HUMIDITY"] = (71.0 - i, "[%] relative humidity")
        fits.HDUList(
            [fits.PrimaryHDU(img, hdr), fits.ImageHDU(np.zeros(SHAPE, np.uint8), name="MASK")]
        ).writeto(d / "calibrated.fits")
        flux_err = np.sqrt(fluxes + 2000.0)
        mag = -2.5 * np.log10(fluxes / 60.0)
        mag_err = 1.0857 * flux_err / fluxes
        snr = fluxes / flux_err
        cat = Table(
            {
                "id": np.arange(1, n + 1),
                "x_centroid": xs,
                "y_centroid": ys,
                "flux": fluxes,
                "peak": fluxes / (2 * np.pi * (3.2 / 2.3548) ** 2),
                "npix": np.full(n, 20),
                "a_px": np.full(n, 1.4),
                "b_px": np.full(n, 1.35),
                "theta_rad": np.zeros(n),
                "flag": np.zeros(n, int),
                "mag_psf": mag,
                "mag_err_psf": mag_err,
                "mag_1p3fwhm": mag + 0.01,
                "mag_err_1p3fwhm": mag_err * 1.1,
                "snr": snr,
                "quality": np.where(snr > 10, "good", np.where(snr > 5, "marginal", "poor")),
                "bkg_local": np.full(n, 500.0),
            }
        )
        zp_psf, k_mag, airmass = 21.40 + 0.01 * i, 0.15, 1.2
        if zeropoint is True:
            cat["ref_mag"] = np.where(
                snr > 30, mag - k_mag * airmass + zp_psf + rng.normal(0, 0.03, n), np.nan
            )
            cat["zp_star"] = np.isfinite(cat["ref_mag"]) & (rng.uniform(size=n) > 0.1)
            for t, off in (("psf", 0.0), ("1p3fwhm", 0.01)):
                cat[f"mag_cal_{t}"] = cat["mag_psf"] + off - k_mag * airmass + zp_psf
                cat[f"mag_cal_err_{t}"] = np.hypot(mag_err, 0.012)
        cat.write(d / "catalog.ecsv", format="ascii.ecsv")
        # the stages' results, from which the pipeline's producer writes the frame summary
        fw = FrameWork(stem=stem, raw_path=s.raw_dir / f"{stem}.fits", outdir=d)
        fw.meta = {
            "object": object_name,
            "band": "V",
            "exptime_s": 60.0,
            "date_obs": hdr["DATE-OBS"],
            "pixel_scale_arcsec": 1.1,
        }
        fw.results = {
            "background": {"background_adu": 500.0 + 5 * i, "background_rms_adu": 8.0},
            "photometry": {
                "n_sources": n,
                "fwhm_px": 3.2 + 0.1 * i,
                "fwhm_arcsec": 3.52 + 0.11 * i,
                "limiting_mag_inst": -2.5 - 0.05 * i,
            },
        }
        record = None
        if zeropoint is True:
            n_zp = int(np.sum(cat["zp_star"]))
            types = {
                t: {"zp_mag": zp_psf + off, "zp_err_mag": 0.012, "n_used": n_zp, "flags": []}
                for t, off in (("psf", 0.0), ("1p3fwhm", -0.01))
            }
            record = {
                "band": "V",
                "ref_catalog": "gaia",
                "airmass": airmass,
                "extinction_k_mag": k_mag,
                "zp_mag": zp_psf,
                "zp_err_mag": 0.012,
                "n_zp_stars": n_zp,
                "types": types,
                "flags": [],
            }
        elif zeropoint == "no_reference":
            record = {
                "zp_mag": None,
                "zp_err_mag": None,
                "n_zp_stars": 0,
                "types": {},
                "flags": ["no_reference"],
                "reference": {
                    "services": [
                        {
                            "service": "gaia_tap",
                            "status": "failed",
                            "reason": "unreachable: name resolution failed (offline?)",
                        }
                    ]
                },
            }
        if record is not None:
            (d / "zeropoint.json").write_text(json.dumps(record))
            fw.results["zero_point"] = {
                "zp_mag": record["zp_mag"],
                "zp_err_mag": record["zp_err_mag"],
                "n_zp_stars": record["n_zp_stars"],
                "airmass": record.get("airmass"),
                "extinction_k_mag": record.get("extinction_k_mag"),
                "flags": record["flags"],
                "reason": adapters._zp_unavailable_reason(record),
                "zp_by_type": {t: v["zp_mag"] for t, v in record["types"].items()},
            }
        if candidates is True:
            (d / "cutouts").mkdir()
            fig = plots.figure(0.64, 0.64)
            fig.add_subplot().imshow(img[:16, :16], cmap="gray")
            (d / "cutouts" / "cand_1.png").write_bytes(plots.png(fig))
            t = Table(
                {
                    "id": [1],
                    "x_centroid": [xs[0]],
                    "y_centroid": [ys[0]],
                    "ra": [83.8221],
                    "dec": [-5.3911],
                    "mag_psf": [-7.1],
                    "mag_cal_psf": [15.2],
                    "snr": [42.0],
                    "cutout": ["cand_1.png"],
                }
            )
            t.meta = {"frame": stem, "n_candidates": 1, "flags": []}
            t.write(d / "candidates.ecsv", format="ascii.ecsv")
            fw.results["transients"] = {"n_candidates": 1, "flags": []}
        elif candidates == "no_reference":
            t = Table(
                {"id": np.zeros(0, int), "x_centroid": np.zeros(0), "y_centroid": np.zeros(0)}
            )
            t.meta = {"frame": stem, "n_candidates": 0, "flags": ["no_reference"]}
            t.write(d / "candidates.ecsv", format="ascii.ecsv")
            fw.results["transients"] = {"n_candidates": 0, "flags": ["no_reference"]}
        summary = frame_summary(fw, FAKE_OBS)
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "background.fits").write_bytes(b"checkpoint, not a product")
        (d / "sources.ecsv").write_text("# checkpoint\n")
        frames.append(summary)
    if rejected:
        frames.append({"frame": "demo_V_bad"})
        s.reject("demo_V_bad", reason="truncated FITS file", stage="read")
    s.write_json("manifest.json", {"science": [{"stem": f["frame"]} for f in frames]})
    lifecycle.summarise(s, FAKE_OBS)  # the pipeline's producer of session_summary.json
    return s


FAKE_OBS = SimpleNamespace(
    name="demo",
    observatory="demo",
    config_hash="abc123",
    title="Demo observatory",
    site=SimpleNamespace(
        name="Demo site", latitude_deg=43.75, longitude_deg=6.92, elevation_m=1270.0
    ),
    camera=SimpleNamespace(name="SYNTH-CCD", telescope="Demo 0.4 m", saturation_adu=60000.0),
)


def _images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


# ----------------------------------------------------------------------------- build_report
def test_report_is_self_contained_with_plots_table_and_facts(tmp_path):
    s = make_fake_session(tmp_path)
    res = report.build_report(
        s.read_json("session_summary.json"),
        workdir=s.workdir,
        title="Demo observatory",
        site=report.site_facts(FAKE_OBS),
    )
    page = Path(res.html_path).read_text()
    images = _images(page)
    assert len(images) == 4 and all(
        img.startswith(PNG) for img in images
    )  # trends, preview, mag, field
    assert set(res.plot_paths) == {"trends", "preview", "mag_error", "field"}
    assert all(Path(p).read_bytes().startswith(PNG) for p in res.plot_paths.values())
    # nothing fetched from elsewhere: opens offline
    assert (
        not re.search(r'(src|href)="(https?:)?//', page)
        and "<script" not in page
        and "<link" not in page
    )
    # header facts and weather keywords
    for text in (
        "M 42",
        "A. Observer",
        "SYNTH-CAM",
        "Demo 0.4 m",
        "Demo site",
        "ambient temperature",
        "AMBTEMP",
        "humidity",
    ):
        assert text in page, text
    # per-frame table: rejected frame with its stage and reason
    assert "demo_V_bad" in page and "truncated FITS file" in page
    assert res.n_frames == 3 and res.n_ok == 2 and res.preview_frame == "demo_V_001"  # best FWHM
    assert res.flags == ()


def test_missing_zero_points_and_candidates_say_not_available(tmp_path):
    s = make_fake_session(tmp_path)
    res = report.build_report(s.read_json("session_summary.json"), workdir=s.workdir)
    page = Path(res.html_path).read_text()
    assert "Zero-point residuals: not available yet" in page
    assert "Transient candidates: not available yet" in page
    assert "zeropoint" not in res.plot_paths
    assert res.available == {
        "zeropoint": False,
        "zeropoint_residuals": False,
        "candidates": False,
        "weather": True,
        "targets": False,  # no targets stage in this session: no section, no light curve
        "target_light_curves": False,
    }
    assert "Your targets" not in page
    assert "21.4" not in page  # no invented zero point


def test_zero_points_and_candidates_rendered_when_present(tmp_path):
    s = make_fake_session(tmp_path, zeropoint=True, candidates=True)
    res = report.build_report(s.read_json("session_summary.json"), workdir=s.workdir)
    page = Path(res.html_path).read_text()
    assert "zeropoint" in res.plot_paths and len(_images(page)) == 7  # + 2 candidate cutouts
    assert "21.400 ± 0.012" in page  # per-frame zero point
    assert "not available yet" not in page.split("<h2>Zero point</h2>")[1].split("<h2>")[0]
    assert "83.82210" in page and "15.20" in page and "alt='cutout'" in page  # candidate table
    assert res.available["candidates"] and res.available["zeropoint_residuals"]
    # calibrated limit = instrumental - k X + ZP(1.3 FWHM aperture), as the catalogue's mag_cal_*
    expected = -2.5 - 0.15 * 1.2 + 21.39
    assert res.frames["demo_V_001"]["limiting_mag_cal"] == pytest.approx(expected)
    assert f"{expected:.2f}" in page and "5σ, calibrated" in page
    assert res.frames["demo_V_001"]["n_candidates"] == 1


def test_zero_point_residuals_come_from_the_calibrated_catalogue(tmp_path):
    s = make_fake_session(tmp_path, zeropoint=True)
    cat = Table.read(s.workdir / "frames/demo_V_001/catalog.ecsv")
    zp = json.loads((s.workdir / "frames/demo_V_001/zeropoint.json").read_text())
    zp_by_type = {t: v["zp_mag"] for t, v in zp["types"].items()}
    stars = plots.zeropoint_stars_from_catalog(cat, zp_by_type)
    assert stars.meta["phot_type"] == "psf" and len(stars) == np.isfinite(cat["ref_mag"]).sum()
    assert abs(np.median(stars["residual_mag"])) < 0.03 and np.std(stars["residual_mag"]) < 0.06
    assert plots.zeropoint_stars_from_catalog(cat[["x_centroid"]], zp_by_type) is None


def test_unreachable_reference_says_why_instead_of_zero_candidates(tmp_path):
    s = make_fake_session(tmp_path, zeropoint="no_reference", candidates="no_reference")
    res = report.build_report(s.read_json("session_summary.json"), workdir=s.workdir)
    page = Path(res.html_path).read_text()
    assert (
        "Transient candidates: not available yet (the transient search had no reference catalogue"
        in page
    )
    assert "No transient candidate" not in page
    assert "gaia_tap: unreachable: name resolution failed" in page
    assert not res.available["candidates"] and not res.available["zeropoint"]
    assert res.frames["demo_V_001"]["n_candidates"] is None


def test_report_of_a_session_without_reduced_frames(tmp_path):
    s = make_fake_session(tmp_path, n_ok=0)
    res = report.build_report(s.read_json("session_summary.json"), workdir=s.workdir)
    page = Path(res.html_path).read_text()
    assert res.flags == ("no_reduced_frame",) and res.plot_paths == {}
    assert (
        "0 / 1" in page.replace("<span style='font-size:15px;color:#5b6575'>", "")
        and "truncated FITS" in page
    )


def test_build_report_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        report.build_report({"session_id": "x"}, workdir=tmp_path)


def test_html_escapes_header_values(tmp_path):
    summary = {
        "session_id": "n1",
        "observatory": "o",
        "frames": [
            {
                "frame": "f<1>",
                "status": "rejected",
                "reason": "<script>alert(1)</script>",
                "failed_stage": "read",
            }
        ],
    }
    page = report_html.render_report_html(summary)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_a_gain_replaced_by_the_sky_noise_bound_is_shown_next_to_its_frame():
    """``gain`` of the frame's summary.json (`rpp_tasks.session.adapters.check_gain`): a gain
    the sky noise made impossible is told to the observer with the value to configure; a
    configured gain that was kept says nothing."""
    kept = {"used_e_per_adu": 0.13, "source": "configured", "configured_e_per_adu": 0.13}
    bound = {
        "used_e_per_adu": 0.1358,
        "source": "sky noise bound",
        "configured_e_per_adu": 1.0,
        "bound_e_per_adu": 0.1358,
        "sky_dominated": True,
        "noise_ratio": 2.73,
    }
    summary = {
        "session_id": "n1",
        "observatory": "o",
        "frames": [
            {"frame": "a", "status": "ok", "gain": bound},
            {"frame": "b", "status": "ok", "gain": kept},
        ],
    }
    page = report_html.render_report_html(summary)
    note = (
        "gain 1 e-/ADU configured, impossible for the sky noise: 0.136 e-/ADU used (sky noise "
        "bound); set camera.gain_e_per_adu to about that value"
    )
    assert page.count(note) == 1 and page.index(note) < page.index("<b>b</b>")
    assert page.count("impossible for the sky noise") == 1


# ----------------------------------------------------------------------------- pure pieces
def test_zscale_limits_and_bad_input():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (64, 64))
    img[10, 10] = 1e6
    lo, hi = plots.zscale_limits(img)
    assert 80 < lo < 100 < hi < 130
    with pytest.raises(ValueError, match="2-D"):
        plots.zscale_limits(np.zeros(10))
    with pytest.raises(ValueError, match="no finite"):
        plots.zscale_limits(np.full((4, 4), np.nan))


def test_plot_functions_return_png():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (80, 120))
    cands = Table({"x_centroid": [10.0], "y_centroid": [20.0], "id": [1]})
    assert plots.plot_frame_preview(img, candidates=cands, title="t").startswith(PNG)
    cat = Table(
        {
            "mag_psf": [-8.0, -6.0, np.nan],
            "mag_err_psf": [0.01, 0.05, np.nan],
            "mag_1p3fwhm": [-8.0, -6.0, -4.0],
            "mag_err_1p3fwhm": [0.01, 0.05, 0.2],
        }
    )
    assert plots.plot_mag_error({"a": cat}).startswith(PNG)
    frames = [
        {
            "status": "ok",
            "date_obs": None,
            "fwhm_px": 3.0,
            "background_adu": 10,
            "n_sources": 5,
            "limiting_mag_inst": -3.0,
        }
    ]
    assert plots.plot_night_trends(frames).startswith(PNG)
    with pytest.raises(ValueError, match="no reduced frame"):
        plots.plot_night_trends([{"status": "rejected"}])


def test_header_facts_collects_distinct_values_and_weather():
    h1 = fits.Header({"OBJECT": "M 42", "OBSERVER": "Ann", "HUMIDITY": 70.0})
    h2 = fits.Header({"OBJECT": "M 43", "OBSERVER": "Ann", "HUMIDITY": 80.0})
    facts = report_html.header_facts({"a": h1, "b": h2, "c": None})
    assert facts["facts"]["object"] == ["M 42", "M 43"] and facts["facts"]["observer"] == ["Ann"]
    assert (
        facts["weather"]["HUMIDITY"]["median"] == 75.0
        and facts["weather"]["HUMIDITY"]["n_frames"] == 2
    )
    assert "AMBTEMP" not in facts["weather"]


# ----------------------------------------------------------------------------- ZIP and adapter
def test_zip_products_holds_products_not_checkpoints(tmp_path):
    s = make_fake_session(tmp_path, candidates=True)
    out = report.zip_products(s)
    assert out == s.workdir / "2025-01-15_products.zip"
    assert zipfile.ZipFile(out).testzip() is None  # every member intact
    names = set(zipfile.ZipFile(out).namelist())
    assert {
        "2025-01-15/session_summary.json",
        "2025-01-15/frames/demo_V_001/calibrated.fits",
        "2025-01-15/frames/demo_V_001/catalog.ecsv",
        "2025-01-15/frames/demo_V_001/candidates.ecsv",
        "2025-01-15/frames/demo_V_001/cutouts/cand_1.png",
    } <= names
    assert not any(n.endswith(("background.fits", "sources.ecsv", "session.json")) for n in names)
    small = report.zip_products(s, out_path=tmp_path / "small.zip", include_images=False)
    assert not any(n.endswith("calibrated.fits") for n in zipfile.ZipFile(small).namelist())


def test_run_report_writes_report_zip_and_record(tmp_path):
    s = make_fake_session(tmp_path)
    out = report.run_report(s, FAKE_OBS)
    assert Path(out["html_path"]) == s.workdir / "report" / "report.html"
    assert "2025-01-15/report/report.html" in zipfile.ZipFile(out["products_zip"]).namelist()
    assert s.read_json("report/report.json")["products_zip"] == out["products_zip"]
    page = Path(out["html_path"]).read_text()
    assert "href='../2025-01-15_products.zip'" in page  # relative link
    assert json.loads(json.dumps(out)) == out  # JSON-safe (XCom)


def test_run_report_needs_a_session_summary(tmp_path):
    s = Session.create(
        tmp_path / "raw", observatory="demo", work_root=tmp_path / "work", session_id="n1"
    )
    with pytest.raises(FileNotFoundError, match="session_summary.json"):
        report.run_report(s, FAKE_OBS)


def test_dollar_signs_in_file_names_and_header_values_lose_no_plot(tmp_path, monkeypatch):
    """`M42_$1_$2.fits` (a shell template that was not expanded) made matplotlib read `1_` as TeX:
    the preview, magnitude-error and zero-point plots were lost. Every plot is drawn, and the
    names and OBJECT values are drawn as they are (no mathtext), e.g. not an alpha for $\\alpha$."""
    from matplotlib.text import Text

    drawn = []
    original = Text.draw

    def spy(self, renderer):
        if "$" in self.get_text():
            drawn.append((self.get_text(), self.get_parse_math()))
        return original(self, renderer)

    monkeypatch.setattr(Text, "draw", spy)
    s = make_fake_session(
        tmp_path,
        zeropoint=True,
        candidates=True,
        stem_prefix="M42_$1_$2_",
        object_name="M$42$^ x$\\alpha$",
    )
    res = report.build_report(
        s.read_json("session_summary.json"), workdir=s.workdir, site=report.site_facts(FAKE_OBS)
    )
    assert res.flags == ()
    assert set(res.plot_paths) == {"trends", "preview", "mag_error", "field", "zeropoint"}
    texts = {t for t, _ in drawn}
    assert any("M42_$1_$2_001" in t for t in texts)  # a legend entry
    assert any("x$\\alpha$" in t for t in texts)  # the preview title
    assert drawn and not any(parse for _, parse in drawn)


def test_night_span_gives_the_last_date_when_it_differs():
    """qa12: the real Seestar folder (NGC 7023 in 2024, M 94 in 2025) printed
    '2024-07-31 02:44 – 01:20' as its first / last frame."""
    from datetime import datetime

    a = datetime(2024, 7, 31, 2, 44)
    assert report_html._span_text(a, datetime(2024, 7, 31, 3, 5)) == "2024-07-31 02:44 – 03:05"
    span = report_html._span_text(a, datetime(2025, 3, 27, 1, 20))
    assert span == "2024-07-31 02:44 – 2025-03-27 01:20"
    assert report_html._span_text(None, a) == "—"
