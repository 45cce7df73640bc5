"""Tests of rpp_tasks.outputs.psf_plots: the PSF map of a frame and its residual stamps."""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from rpp_tasks.outputs.psf_plots import plot_psf_map, psf_residual_stamps
from rpp_tasks.stages.field_psf import FieldPSF

PNG = b"\x89PNG\r\n\x1a\n"


def _model():
    coeffs = np.zeros((4, 6))
    coeffs[:, 0] = [3.6, 0.0, 0.0, 0.33]
    coeffs[0, 3] = coeffs[0, 5] = 0.25  # FWHM grows towards the corners
    coeffs[1, 3], coeffs[1, 5] = 0.05, -0.05  # ellipticity turning around the field
    coeffs[2, 4] = 0.08
    return FieldPSF(coeffs, 2, (255.5, 255.5, 256.0, 256.0), (512, 512), 40, 25)


def test_residual_stamps_of_a_perfect_model_are_noise_free_and_the_map_draws():
    m = _model()
    rng = np.random.default_rng(1)
    xs = rng.uniform(30, 480, 25)
    ys = rng.uniform(30, 480, 25)
    img = 100.0 + m.render((512, 512), xs, ys, np.full(25, 2e5), half=20, dtype=np.float64)
    cat = Table(
        {"x_psf": xs, "y_psf": ys, "flux_psf": np.full(25, 2e5), "snr_psf": np.full(25, 300.0)}
    )
    stamps = psf_residual_stamps(m, img, cat, background=100.0)
    assert len(stamps) >= 6
    for st in stamps:
        assert np.abs(st["residual"]).max() < 0.5  # percent of the peak: only neighbours' wings
    sh = m.shape_at(np.array([0.0, 256.0]), np.array([0.0, 256.0]))
    assert sh["fwhm_px"][0] > sh["fwhm_px"][1] and sh["ellipticity"][0] > sh["ellipticity"][1]
    png = plot_psf_map(m.to_dict(), image=img, catalog=cat, pixel_scale_arcsec=1.2, title="t")
    assert png.startswith(PNG) and len(png) > 20_000
    # without image or catalogue: the map alone
    assert plot_psf_map(m).startswith(PNG)


def test_the_report_shows_the_psf_map_of_the_best_frame(tmp_path):
    from test_report import make_fake_session

    from rpp_tasks.outputs import report

    s = make_fake_session(tmp_path)
    summary = s.read_json("session_summary.json")
    coeffs = np.zeros((4, 1))
    coeffs[:, 0] = [2.5, 0.02, 0.0, 0.3]
    shape = None
    for f in summary["frames"]:
        if f.get("status") == "ok":
            from astropy.io import fits

            shape = fits.getdata(s.frame_dir(f["frame"]) / "calibrated.fits").shape
            model = FieldPSF(
                coeffs, 0, (shape[1] / 2, shape[0] / 2, shape[1] / 2, shape[0] / 2), shape, 30, 15
            )
            f.setdefault("stages", {}).setdefault("photometry", {})["psf_model"] = model.to_dict()
    res = report.build_report(summary, workdir=s.workdir)
    assert "psf_map" in res.plot_paths, res.flags
    page = open(res.html_path).read()
    assert "PSF model across the field" in page
