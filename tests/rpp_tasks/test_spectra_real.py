"""Long-slit reduction on real data: the AST325 SBIG ST-7 frames and two real 1-D spectra.

The ST-7 set (``spectra/ast325_sbig_st7``: Vega, a neon lamp, a dark; no flats, no offsets) is
reduced through `run_spectra` with ``config/observatories/ast325_st7.yaml``. Written down
(docs/spectra.md): the neon solution and where Vega's Balmer lines land.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from astropy.io import fits

from rpp_tasks.config import find_config
from rpp_tasks.spectra.linelists import BALMER_A
from rpp_tasks.spectra.products import plot_spectrum, read_spectrum_1d
from rpp_tasks.spectra.reduce import frames_from_headers, run_spectra

pytestmark = pytest.mark.realdata

ST7 = ("Vega.fit", "NeonCalibration.fit", "DarkBefore-001D120s.fit")


@pytest.fixture(scope="module")
def st7_reduced(real_data, tmp_path_factory):
    src = real_data / "spectra" / "ast325_sbig_st7"
    if not all((src / n).is_file() for n in ST7):
        pytest.skip(f"ST-7 frames not found in {src}")
    session = tmp_path_factory.mktemp("st7_session")
    for n in ST7:
        shutil.copy(src / n, session / n)
    out = tmp_path_factory.mktemp("st7_products")
    obs = find_config("ast325_st7")
    summary = run_spectra(session, obs, out)
    return session, out, summary


def test_st7_frame_roles_from_headers_and_patterns(st7_reduced):
    session, _, _ = st7_reduced
    obs = find_config("ast325_st7")
    targets, rejected = frames_from_headers(
        sorted(session.glob("*.fit")),
        lamp_patterns=obs.spectrograph.lamp_patterns,
        frame_types=obs.session.frame_types,
    )
    assert rejected == []
    assert list(targets) == ["Vega"]  # no OBJECT: the file stem names the target
    t = targets["Vega"]
    assert [p.rsplit("/", 1)[-1] for p in t.target] == ["Vega.fit"]
    assert [p.rsplit("/", 1)[-1] for p in t.lamp] == ["NeonCalibration.fit"]  # IMAGETYP LIGHT
    assert [p.rsplit("/", 1)[-1] for p in t.dark] == ["DarkBefore-001D120s.fit"]
    assert t.flat == () and t.offset == ()


def test_st7_neon_solution_converges(st7_reduced):
    _, out, summary = st7_reduced
    assert summary["n_ok"] == 1, summary
    s = summary["outcomes"][0]["summary"]
    w = s["wavelength"]
    assert w["ok"] and w["elements"] == ["Ne"]
    # written down in docs/spectra.md: 13 Ne lines 5852-6929 A, RMS 0.07 A = 0.017 px
    # (7032 A is dropped as an unresolved blend with 7024 A at this resolution)
    assert w["n_lines"] >= 10
    assert w["rms_px"] < 0.1
    assert w["rms_a"] < 0.5
    assert -4.5 < w["dispersion_a_per_px"] < -4.1  # red on the left
    assert 5840 < w["calibrated_range_a"][0] < 5860 and 6900 < w["calibrated_range_a"][1] < 7040
    assert 400 < w["resolving_power"] < 900
    assert "extrapolated" in s["flags"]  # no neon line bluer than 5852 A on this detector
    lines = json.loads(json.dumps(w))  # JSON-safe
    assert lines["nx"] == 765


def _line_centre(lam, flux, w0, half_a):
    sel = (lam > w0 - half_a) & (lam < w0 + half_a)
    x, f = lam[sel], flux[sel]
    i = int(np.argmin(f))
    lo, hi = max(0, i - 3), min(f.size, i + 4)
    p = np.polyfit(x[lo:hi] - x[i], f[lo:hi], 2)
    return float(x[i] - p[1] / (2 * p[0]))


def test_st7_vega_balmer_lines_within_one_resolution_element(st7_reduced):
    _, out, summary = st7_reduced
    o = summary["outcomes"][0]
    s = o["summary"]
    spec = read_spectrum_1d(o["products"]["bess_fits"])
    assert spec.calibrated
    lam, flux = spec.wavelength_a, spec.flux
    res_a = s["wavelength"]["fwhm_a"]  # one resolution element: the lamp lines' FWHM (A)
    assert 8 < res_a < 12
    inside = {n: w for n, w in BALMER_A.items() if lam[0] + 3 * res_a < w < lam[-1] - 3 * res_a}
    assert {"Ha", "Hb", "Hg", "Hd"} <= set(inside)
    # the lamp was taken 17 min after Vega: the telluric O2 B band head measured the shift
    assert s["zero_point_shift_a"] == pytest.approx(12.0, abs=3.0)
    offsets = {}
    for n, w in inside.items():
        offsets[n] = _line_centre(lam, flux, w, 1.5 * res_a) - w
        assert abs(offsets[n]) < res_a, (n, offsets[n], res_a)
    assert len(offsets) >= 4


def test_st7_products_are_bess(st7_reduced):
    _, out, summary = st7_reduced
    o = summary["outcomes"][0]
    h = fits.getheader(o["products"]["bess_fits"])
    assert h["NAXIS"] == 1
    assert h["CUNIT1"] == "Angstrom" and h["CDELT1"] > 0
    assert h["EXPTIME2"] == "1 x 120.0 s"
    assert h["SPE_RPOW"] > 300
    assert h["BSS_INST"] == "SBIG SGS ST-7"
    assert h["GEO_LAT"] == pytest.approx(43.66)
    assert "not_flux_calibrated" in o["summary"]["flags"]
    assert (out / "spectra_summary.json").is_file()
    assert o["products"]["calibrated_2d"]
    with fits.open(o["products"]["calibrated_2d"][0]) as hd:
        assert hd[0].data.shape == (510, 765) and "VARIANCE" in hd and "MASK" in hd


def test_real_bess_spectrum_read_and_plotted(real_data):
    p = real_data / "spectra" / "ciboulette_sa200" / "Pn_R_hd8538_20231008_836.fits"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    s = read_spectrum_1d(p)
    assert s.calibrated and s.flux.size == 560
    assert s.wavelength_a[0] == pytest.approx(5991.16, abs=0.01)
    assert s.wavelength_a[1] - s.wavelength_a[0] == pytest.approx(2.5016, abs=1e-3)
    assert s.to_dict()["object"] == "HD8538"
    png = plot_spectrum(s.wavelength_a, s.flux, title="HD8538")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_real_uncalibrated_1d_spectrum_is_rejected_with_reason(real_data):
    p = real_data / "spectra" / "pyspectrum" / "betelgeuse_fv.fit"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    s = read_spectrum_1d(p)
    assert not s.calibrated
    assert "no wavelength scale" in s.reason and "CRVAL1" in s.reason
    assert s.flux.size == 1280 and np.array_equal(s.wavelength_a, np.arange(1280.0))
    png = plot_spectrum(s.wavelength_a, s.flux, calibrated=False, title="uncalibrated")
    assert png[:4] == b"\x89PNG"


def test_a_2d_frame_is_not_a_1d_spectrum(real_data):
    p = real_data / "spectra" / "ast325_sbig_st7" / "Vega.fit"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    with pytest.raises(ValueError, match="not a 1-D spectrum"):
        read_spectrum_1d(p)
