"""A 2SPOT long-slit session through the session lifecycle (what ``rpp reduce`` and the DAG call).

A synthetic night (`rpp_tasks.sim.longslit`) written as a 2SPOT session (``last_obs.yaml`` +
``setup_config.yaml``) with a good target, a target whose lamp file is missing and a target whose
exposure is saturated: the good one is reduced to BeSS products with the spectra facts in the
session summary, the others are rejected with the reason; the report shows the plots and the
weather keywords, the e-mail and Telegram carry the spectrum plot (loopback peers), the archive
has one ObsCore spectrum row per reduced target, upserted on a re-run (SQLite and the local
PostgreSQL). The real 1-D BeSS spectrum of the shared folder gets an ObsCore row too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from test_notify import FAST, bot_api, smtp_server  # noqa: F401 (fixtures; same folder)

from rpp_tasks.config import config_from_dict
from rpp_tasks.session import lifecycle
from rpp_tasks.session.summary import SessionSummary
from rpp_tasks.session.table import LONGSLIT, table_for
from rpp_tasks.sim.longslit import make_longslit_night, write_longslit_session
from rpp_tasks.spectra.session import list_spectra
from tests.pgdb import obscore_database

REAL = Path(os.environ.get("RPP_REAL_DATA", "/work/shared/data/real")) / "spectra"


def make_obs(work: Path):
    return config_from_dict(
        {
            "observatory": "synth2spot",
            "title": "Synthetic 2SPOT",
            "instrument_kind": "longslit",
            "site": {
                "name": "2SPOT Chile",
                "latitude_deg": -30.17,
                "longitude_deg": -70.8,
                "elevation_m": 1550,
            },
            "camera": {
                "name": "SYNTHCAM",
                "telescope": "RC12",
                "gain_e_per_adu": 1.4,
                "read_noise_e": 9.0,
                "saturation_adu": 65000,
            },
            "spectrograph": {
                "name": "Alpy600",
                "dispersion_a_per_px": 4.0,
                "central_wavelength_a": 5600.0,
                "lamp_elements": ["Ar", "Ne"],
                "bin_size_px": 16,
                "sky_offset_px": 15,
                "sky_width_px": 40,
                "poly_degree": 3,
                "resolving_power": 500,
                "bss_site": "2SPOT Chile",
            },
            "session": {"ready_rule": "twospot"},
            "targets": {
                "objects": [{"name": "GOOD", "ra": "10:00:00", "dec": "-20:30:00"}],
                "resolve_online": False,
            },
            "paths": {"work": str(work / "work"), "incoming": str(work / "incoming")},
            "notifications": {"email_to": ["team@example.org"]},
        }
    )


def write_night(folder: Path, *, seed=5):
    """GOOD (2 exposures, weather keywords, no pointing), NOLAMP (its lamp file missing),
    SATURATED, NOLINES (its "lamp" is a flat: no line), NOTRACE (its exposures are darks)."""
    names = ("GOOD", "NOLAMP", "SATURATED", "NOLINES", "NOTRACE")
    night = make_longslit_night(shape=(300, 900), targets=names, n_target=2, seed=seed)
    paths = write_longslit_session(folder, night)
    for p in paths["lamp"]["NOLINES"]:
        fits.writeto(p, fits.getdata(paths["flat"][0]), fits.getheader(p), overwrite=True)
    for p in paths["target"]["NOTRACE"]:
        fits.writeto(p, fits.getdata(paths["dark"][0]), fits.getheader(p), overwrite=True)
    for i, p in enumerate(paths["target"]["GOOD"]):
        with fits.open(p, mode="update") as h:  # no pointing: position from the target name
            for k in ("OBJCTRA", "OBJCTDEC", "RA", "DEC"):
                h[0].header.remove(k, ignore_missing=True)
            h[0].header["AMBTEMP"] = (12.5 + i, "[C] ambient temperature")
            h[0].header["HUMIDITY"] = (40.0 + 2 * i, "[%] relative humidity")
    for p in paths["lamp"]["NOLAMP"]:
        Path(p).unlink()
    for p in paths["target"]["SATURATED"]:
        d = fits.getdata(p).astype(float)
        fits.writeto(
            p,
            np.clip((d - 1000) * 40 + 1000, 0, 65535).astype(np.uint16),
            fits.getheader(p),
            overwrite=True,
        )
    return night, paths


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectra_session")
    raw = root / "incoming" / "2025-03-14"
    night, paths = write_night(raw)
    obs = make_obs(root)
    summary, made = lifecycle.reduce_session(raw, obs)
    return obs, night, paths, summary, made


def test_longslit_table_is_registered(reduced):
    obs = reduced[0]
    assert table_for(obs, strict=True) is LONGSLIT
    assert LONGSLIT.names == ("masters", "spectra")
    assert all(s.scope == "session" for s in LONGSLIT)


def test_targets_reduced_or_rejected_with_reason(reduced):
    obs, night, paths, summary, made = reduced
    by = {s.target: s for s in summary.spectra}
    assert summary.instrument_kind == "longslit"
    assert (summary.n_science, summary.n_ok, summary.n_rejected) == (5, 1, 4)
    assert by["NOLINES"].failed_stage == "wavelength"
    assert "wavelength calibration failed" in by["NOLINES"].reason
    assert by["NOTRACE"].failed_stage == "trace" and "trace not found" in by["NOTRACE"].reason
    assert by["NOLAMP"].failed_stage == "lamp" and "no arc lamp" in by["NOLAMP"].reason
    assert by["SATURATED"].failed_stage == "saturation"
    assert "saturated" in by["SATURATED"].reason
    g = by["GOOD"]
    # (the <= 0.1 px truth figure is asserted at 1200 px, tests/integration/test_dag_spectra.py;
    # this 900 px night gets fewer lamp lines, as in test_spectra_synthetic's bad-target night)
    assert g.ok and g.rms_px < 0.2 and g.rms_a == pytest.approx(g.rms_px * 4.0, rel=0.1)
    t = night.truth
    lo, hi = t.wavelength(np.array([0.0, 899.0]))
    assert g.wavelength_min_a == pytest.approx(min(lo, hi), abs=10)
    assert g.wavelength_max_a == pytest.approx(max(lo, hi), abs=10)
    assert 300 < g.resolving_power < 800 and g.snr_median > 50 and not g.flux_calibrated
    assert g.header["EXPTIME2"] == "2 x 600.0 s" and g.header["BSS_SITE"] == "2SPOT Chile"
    assert g.mjd_end > g.mjd_start + 1200 / 86400
    assert (g.ra_deg, g.dec_deg, g.position_source) == (150.0, -20.5, "config")
    assert "no_heliocentric_correction" in g.flags  # without a header pointing
    assert g.weather["AMBTEMP"]["min"] == 12.5 and g.weather["AMBTEMP"]["max"] == 13.5
    assert summary.night_date == "2025-03-14"
    # every input file has an outcome; the missing lamp is named by validate
    outcome = {Path(f.path).name: (f.kind, f.outcome) for f in summary.files}
    assert outcome["GOOD-1.fits"] == ("science", "reduced")
    assert outcome["SATURATED-2.fits"] == ("science", "rejected")
    assert outcome["GOOD_Neon-1.fits"] == ("lamp", "calibration used")
    manifest = lifecycle.Session.load(made["workdir"]).read_json("manifest.json")
    assert manifest["missing_files"] == ["NOLAMP_Neon-1.fits"]


def test_summary_round_trip_and_dashboard_listing(reduced):
    summary, made = reduced[3], reduced[4]
    again = SessionSummary.from_dict(summary.to_dict())
    assert again.spectra == summary.spectra
    listed = list_spectra(made["workdir"])
    assert [x["target"] for x in listed] == ["GOOD", "NOLAMP", "SATURATED", "NOLINES", "NOTRACE"]
    good = listed[0]
    assert Path(good["spectrum_png"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(good["bess_fits"]).is_file() and good["status"] == "ok"


def test_report_shows_plots_snr_header_and_weather(reduced):
    summary, made = reduced[3], reduced[4]
    page = Path(made["report"]).read_text()
    g = summary.ok_spectra[0]
    assert page.count("data:image/png;base64,") == 2  # spectrum + wavelength residuals
    assert "ambient temperature" in page and "humidity" in page
    assert f"{g.snr_median:.0f}" in page and "2 x 600.0 s" in page
    assert "no arc lamp" in page and "saturation" in page
    assert "SPE_RPOW" in page and "not flux-calibrated" in page


def test_mail_and_telegram_carry_the_spectrum_plot(reduced, smtp_server, bot_api):  # noqa: F811
    from rpp_tasks.outputs import notify

    obs, summary, made = reduced[0], reduced[3], reduced[4]
    inbox, smtp = smtp_server()
    s = lifecycle.resume(made["workdir"])
    res = notify.run_notify(s, obs, smtp=smtp, telegram=bot_api.settings, policy=FAST)
    assert res["status"] == "ok"
    png = Path(summary.ok_spectra[0].spectrum_png).read_bytes()
    (got,) = inbox.messages
    msg = got["msg"]
    assert "1/5 spectra reduced" in msg["Subject"]
    inline = next(p for p in msg.walk() if p["Content-ID"] == "<night_plot>")
    assert inline.get_payload(decode=True) == png
    text = next(p for p in msg.walk() if p.get_content_type() == "text/plain").get_content()
    assert "GOOD: 2 x 600.0 s" in text and "NOLAMP: rejected (lamp" in text
    methods = [c[0] for c in bot_api.calls]
    assert methods == ["sendMessage", "sendPhoto"]
    assert bot_api.calls[1][2]["photo"] == png
    assert "S/N=" in bot_api.calls[1][2]["caption"]


def _rows(url):
    import sqlalchemy as sa

    eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))
    with eng.connect() as c:
        table = "rpp_main" if url.startswith("sqlite") else "rpp.main"
        q = (
            f"select dataproduct_type, target_name, em_min, em_max, em_res_power, t_min, t_max, "
            f"s_ra, s_dec, "
            f"t_exptime, access_url, obs_publisher_did from {table} where rpp_session = :s"
        )
        return [dict(r._mapping) for r in c.execute(sa.text(q), {"s": "2025-03-14"})]


def _check_rows(rows, summary):
    g = summary.ok_spectra[0]
    (row,) = rows
    assert row["dataproduct_type"] == "spectrum" and row["target_name"] == "GOOD"
    assert row["em_min"] == pytest.approx(g.wavelength_min_a * 1e-10, rel=1e-3)
    assert row["em_max"] == pytest.approx(g.wavelength_max_a * 1e-10, rel=1e-3)
    assert row["em_res_power"] == pytest.approx(g.resolving_power)
    assert row["t_min"] == pytest.approx(g.mjd_start, abs=1e-6)
    assert row["t_max"] == pytest.approx(g.mjd_end, abs=1e-6)
    assert row["t_exptime"] == 1200.0
    assert (row["s_ra"], row["s_dec"]) == pytest.approx((150.0, -20.5))
    assert row["access_url"].endswith(".fits")


def test_archive_one_spectrum_row_upserted_sqlite(reduced, tmp_path):
    obs, summary, made = reduced[0], reduced[3], reduced[4]
    url = f"sqlite:///{tmp_path / 'archive.sqlite'}"
    s = lifecycle.resume(made["workdir"])
    first = lifecycle.archive(s, obs, url=url)
    again = lifecycle.archive(s, obs, url=url)
    assert (first["n_inserted"], again["n_inserted"], again["n_updated"]) == (1, 0, 1)
    _check_rows(_rows(url), summary)


@pytest.fixture
def pg_url():
    """A throw-away database with pgsphere and the ObsCore table (skips without them)."""
    with obscore_database("rpp_spectra_archive_test") as url:
        yield url


def test_archive_one_spectrum_row_upserted_postgresql(reduced, pg_url):
    obs, summary, made = reduced[0], reduced[3], reduced[4]
    url = pg_url
    s = lifecycle.resume(made["workdir"])
    lifecycle.archive(s, obs, url=url)
    again = lifecycle.archive(s, obs, url=url)
    assert again["n_updated"] == 1 and again["n_inserted"] == 0
    _check_rows(_rows(url), summary)


def test_real_bess_spectrum_gets_an_obscore_row():
    from rpp_tasks.outputs.obscore import read_product_header, to_obscore_row
    from rpp_tasks.spectra.products import read_spectrum_1d

    path = REAL / "ciboulette_sa200" / "Pn_R_hd8538_20231008_836.fits"
    if not path.is_file():
        pytest.skip(f"real data not available: {path}")
    s = read_spectrum_1d(path)
    row = to_obscore_row(
        read_product_header(path),
        product_path=path,
        access_url=path.as_uri(),
        obs_collection="BeSS",
        publisher_authority="rpp.example.org",
    )
    assert row.dataproduct_type == "spectrum"
    assert row.em_min == pytest.approx(s.wavelength_a.min() * 1e-10, rel=1e-3)
    assert row.em_max == pytest.approx(s.wavelength_a.max() * 1e-10, rel=2e-3)
    assert row.t_min is not None and row.target_name


@pytest.mark.integration
def test_spectrum_row_found_by_dachs_tap(reduced):
    """The spectrum's row, upserted as the pipeline role into DaCHS's table, is found by TAP in
    ivoa.obscore (skips when DaCHS is not installed or not serving;
    archive/dachs/setup_dachs.sh)."""
    import dataclasses
    import shutil
    import urllib.request
    import warnings

    import sqlalchemy as sa

    dachs = os.environ.get("RPP_DACHS_URL", "http://localhost:8089").rstrip("/")
    if shutil.which("dachs") is None:
        pytest.skip("GAVO DaCHS is not installed: run 'sudo archive/dachs/setup_dachs.sh'")
    try:
        urllib.request.urlopen(dachs + "/", timeout=5).close()  # loopback only
    except OSError as exc:
        pytest.skip(f"DaCHS not answering at {dachs} ({exc}): run archive/dachs/setup_dachs.sh")
    pipeline = os.environ.get(
        "RPP_DACHS_PIPELINE_URL",
        f"postgresql://rpp_pipeline:{os.environ.get('RPP_PIPELINE_PASSWORD', 'rpp-pipeline-dev')}"
        "@127.0.0.1:5432/gavo",
    )
    admin = sa.create_engine(
        os.environ.get("RPP_DACHS_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/gavo").replace(
            "postgresql://", "postgresql+psycopg2://"
        )
    )
    coll = "rpp-ci-spectra"

    def clean():
        with admin.begin() as c:
            c.execute(sa.text("DELETE FROM rpp.main WHERE obs_collection = :c"), {"c": coll})

    obs, summary, made = reduced[0], reduced[3], reduced[4]
    obs = dataclasses.replace(obs, archive=dataclasses.replace(obs.archive, obs_collection=coll))
    clean()
    try:
        s = lifecycle.resume(made["workdir"])
        lifecycle.archive(s, obs, url=pipeline)
        again = lifecycle.archive(s, obs, url=pipeline)
        assert (again["n_inserted"], again["n_updated"]) == (0, 1)
        import pyvo

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = (
                pyvo.dal.TAPService(dachs + "/tap")
                .search(
                    f"SELECT * FROM ivoa.obscore WHERE obs_collection = '{coll}' "
                    "AND dataproduct_type = 'spectrum'"
                )
                .to_table()
            )
        g = summary.ok_spectra[0]
        assert len(t) == 1 and t[0]["target_name"] == "GOOD"
        assert t[0]["em_min"] == pytest.approx(g.wavelength_min_a * 1e-10, rel=1e-3)
        assert t[0]["em_res_power"] == pytest.approx(g.resolving_power, rel=1e-6)
        assert (t[0]["s_ra"], t[0]["s_dec"]) == pytest.approx((150.0, -20.5))
        assert t[0]["t_exptime"] == pytest.approx(1200.0)
    finally:
        clean()
        admin.dispose()


def test_a_folder_without_target_is_described_with_the_reason(tmp_path):
    """Only calibration frames: no science to reduce, and the description says why (the DAG's
    validate skips the run with it)."""
    night = make_longslit_night(shape=(60, 200), targets=("X",), n_target=1, seed=2)
    raw = tmp_path / "incoming" / "2025-03-15"
    raw.mkdir(parents=True)
    d, h = night.dark[0]
    fits.PrimaryHDU(np.clip(d, 0, 65535).astype(np.uint16), h).writeto(raw / "Dark-1.fits")
    out = lifecycle.describe(lifecycle.open_session(raw, make_obs(tmp_path)))
    assert out["n_science"] == 0 and out["n_targets"] == 0
    assert "no target exposure" in out["spectra_error"]
