"""Long-slit configuration, 2SPOT roles, line lists, combination and the BeSS writer/reader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

from rpp_tasks.config import LAMP_ELEMENTS, config_from_dict, find_config
from rpp_tasks.exceptions import ConfigError
from rpp_tasks.inputs.twospot import TwoSpotSetup, frame_roles, parse_last_obs
from rpp_tasks.spectra import combine, linelists, products, wavecal
from rpp_tasks.spectra.reduce import effective_setup

GOOD = {"dispersion_a_per_px": 2.6, "central_wavelength_a": 5600.0, "lamp_elements": ["Ar"]}


def _cfg(spec=None, kind="longslit"):
    d = {"observatory": "x", "instrument_kind": kind}
    if spec is not None:
        d["spectrograph"] = spec
    return config_from_dict(d)


def test_imaging_is_the_default_kind():
    c = config_from_dict({"observatory": "x"})
    assert c.instrument_kind == "imaging" and c.spectrograph is None


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"dispersion_a_per_px": 0}, "spectrograph.dispersion_a_per_px"),
        ({"dispersion_axis": 3}, "spectrograph.dispersion_axis"),
        ({"central_wavelength_a": None}, "spectrograph.central_wavelength_a"),
        ({"lamp_elements": ["Xe"]}, "spectrograph.lamp_elements[0]"),
        ({"lamp_elements": []}, "spectrograph.lamp_elements"),
        ({"bin_size_px": 0}, "spectrograph.bin_size_px"),
        ({"poly_degree": 9}, "spectrograph.poly_degree"),
        ({"poly_degree": 4, "min_lamp_lines": 5}, "spectrograph.min_lamp_lines"),
        ({"wavelength_range_a": [7000, 4000]}, "spectrograph.wavelength_range_a"),
        ({"extraction": "fancy"}, "spectrograph.extraction"),
        ({"reference_star": "HD 1"}, "spectrograph.reference_spectrum"),
        ({"unknown_key": 1}, "spectrograph.unknown_key"),
    ],
)
def test_invalid_spectrograph_sections_name_the_key(over, key):
    with pytest.raises(ConfigError) as err:
        _cfg({**GOOD, **over})
    assert err.value.key == key


def test_longslit_needs_a_spectrograph_and_kind_is_checked():
    with pytest.raises(ConfigError, match="spectrograph"):
        _cfg(None)
    with pytest.raises(ConfigError, match="instrument_kind"):
        _cfg(GOOD, kind="echelle")


def test_shipped_spectroscopic_observatories_load():
    two = find_config("2spot")
    assert two.instrument_kind == "longslit" and two.session.ready_rule == "twospot"
    assert two.spectrograph.lamp_elements == ["Ar", "Ne"]
    st7 = find_config("ast325_st7")
    assert st7.spectrograph.dispersion_a_per_px < 0
    assert set(LAMP_ELEMENTS) == set(linelists.known_elements())


def test_config_module_stays_cheap_to_import():
    code = (
        "import sys, rpp_tasks.config as c; c.find_config('2spot');"
        "heavy = {'numpy', 'astropy', 'scipy', 'specutils'} & {m.split('.')[0] for m in "
        "sys.modules}; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_setup_config_overrides_bin_size_and_posy():
    spec = find_config("2spot").spectrograph
    s = TwoSpotSetup(batch_name="last_obs", file_extension=".fits", bin_size=12, posy=549)
    eff = effective_setup(spec, s)
    assert eff.bin_size_px == 12 and eff.spectrum_y_px == 549.0
    assert effective_setup(spec, None) is spec


def test_twospot_frame_roles(tmp_path):
    (tmp_path / "last_obs.yaml").write_text(
        "SS433: [SS433, SS433-, 2, SS433_Neon-, 1, Flat-, 3, Dark, 0, Offset, 2, none]\n"
        "V1: [V1, V1-, 1, V1_Neon-, 1, Flat-, 3, Dark, 0, Offset, 2, none]\n"
    )
    roles = frame_roles(parse_last_obs(tmp_path / "last_obs.yaml"), extension=".fit")
    assert roles["ss433-2.fit"] == [("target", "SS433")]
    assert roles["ss433_neon-1.fit"] == [("lamp", "SS433")]
    assert roles["flat-3.fit"] == [("flat", "SS433"), ("flat", "V1")]
    assert roles["offset1.fit"] == [("offset", "SS433"), ("offset", "V1")]
    assert not any(n.startswith("dark") for n in roles)


def test_line_lists_are_air_wavelengths_from_nist():
    ne = {round(w, 2) for w, _, _ in linelists.lamp_lines("Ne")}
    for w in (5852.49, 6402.25, 6929.47, 7032.41, 6506.53):  # NIST air values
        assert w in ne
    ar = {round(w, 2) for w, _, _ in linelists.lamp_lines("ar")}
    for w in (6965.43, 7067.22, 7503.87, 8115.31, 4158.59):
        assert w in ar
    both = linelists.lamp_lines(["Ar", "Ne"], wavelength_range_a=(6000, 6100))
    assert [w for w, _, _ in both] == sorted(w for w, _, _ in both)
    assert all(6000 <= w <= 6100 for w, _, _ in both)
    with pytest.raises(ValueError, match="no line list"):
        linelists.lamp_lines("Xe")


def test_blend_filter_keeps_isolated_lines_and_drops_blends():
    lam, _, _ = wavecal.catalogue_lines(["Ne"], wavelength_range_a=(5800, 7100), resolution_a=10.0)
    assert 5852.488 in lam and 6402.248 in lam and 6929.467 in lam
    assert 5975.534 not in lam and 5974.627 not in lam  # 0.9 A apart: one unresolved peak


def test_solution_from_a_rendered_lamp_with_approximate_setup():
    """Dispersion 4 % and central wavelength 50 A off the truth; 2 % non-linearity."""
    rng = np.random.default_rng(3)
    nx = 1200
    xx = np.arange(nx, dtype=float)
    lam_true = 5600.0 + 2.5 * (xx - 599.5) + 5e-5 * (xx - 599.5) ** 2
    lines = linelists.lamp_lines(["Ar", "Ne"], wavelength_range_a=(lam_true[0], lam_true[-1]))
    imax = max(i for _, i, _ in lines)
    spec = np.full(nx, 50.0)
    sig = 3.5 / 2.3548
    for w, inten, _ in lines:
        x0 = np.interp(w, lam_true, xx)
        spec += (
            3e4
            * (inten / imax) ** 0.8
            * rng.uniform(0.7, 1.4)
            * np.exp(-0.5 * ((xx - x0) / sig) ** 2)
        )
    spec = rng.poisson(spec).astype(float)
    sol = wavecal.solve_wavelength(
        spec, elements=["Ar", "Ne"], dispersion_a_per_px=2.4, central_wavelength_a=5650.0
    )
    assert sol.ok and sol.n_lines >= 15 and sol.rms_px < 0.1
    inside = (lam_true > sol.calibrated_range_a[0]) & (lam_true < sol.calibrated_range_a[1])
    assert np.max(np.abs(sol.wavelength(xx) - lam_true)[inside]) < 0.2 * 2.5
    # the automatic matcher: no central wavelength, only the dispersion
    auto = wavecal.solve_wavelength(spec, elements=["Ar", "Ne"], dispersion_a_per_px=2.4)
    assert auto.ok and np.max(np.abs(auto.wavelength(xx) - lam_true)[inside]) < 0.5
    # the sign of the dispersion is wrong in the configuration: found, flagged
    flip = wavecal.solve_wavelength(
        spec[::-1], elements=["Ar", "Ne"], dispersion_a_per_px=2.4, central_wavelength_a=5650.0
    )
    assert flip.ok and "dispersion_sign_flipped" in flip.flags


def test_lamp_without_lines_fails_with_reason():
    rng = np.random.default_rng(0)
    flat_lamp = 1000 + rng.normal(0, 10, 1000)
    sol = wavecal.solve_wavelength(
        flat_lamp, elements=["Ne"], dispersion_a_per_px=2.0, central_wavelength_a=6000
    )
    assert not sol.ok and "emission line" in sol.reason
    assert sol.to_dict()["ok"] is False


def test_combination_weights_and_rejects_outliers():
    rng = np.random.default_rng(1)
    truth = np.full(500, 100.0)
    f = [truth + rng.normal(0, 2, 500) for _ in range(4)]
    v = [np.full(500, 4.0)] * 4
    f[2] = f[2] * 0.8  # a cloud: scaled back
    f[1][100] += 500  # a cosmic ray left in one exposure
    c = combine.combine_exposures(f, v)
    assert c.scales[2] == pytest.approx(1.25, rel=0.02)
    assert abs(c.flux[100] - 100) < 8 and c.n_used[100] == 3
    assert c.n_rejected_px >= 1
    assert np.median(np.sqrt(c.variance)) == pytest.approx(1.0, rel=0.05)


def test_resampling_conserves_flux_density_and_propagates_variance():
    x = np.arange(800.0)
    lam = 7000.0 - 4.3 * x  # decreasing, like the ST-7
    f = np.full(800, 430.0)  # 430 ADU per column = 100 ADU/A
    v = np.full(800, 430.0)
    grid = combine.linear_grid([(lam.min(), lam.max())], step_a=4.3)
    rf, rv = combine.resample_to_grid(lam, f, v, grid)
    inner = slice(5, -5)
    assert np.allclose(rf[inner], 100.0, rtol=1e-6)
    assert np.nanmedian(rv[inner]) == pytest.approx(430.0 / 4.3**2, rel=0.3)
    assert grid.crval1 % 4.3 == pytest.approx(0, abs=1e-6) or grid.crval1 % 4.3 == pytest.approx(
        4.3, abs=1e-6
    )


def test_heliocentric_correction_matches_astropy_scale():
    v = combine.heliocentric_correction(
        ra_deg=279.23,
        dec_deg=38.78,
        time_iso="2019-10-29T23:42:05",
        longitude_deg=-79.40,
        latitude_deg=43.66,
        elevation_m=100,
    )
    assert -30 < v < 30 and v != 0


def test_bess_writer_requires_keywords_and_round_trips(tmp_path):
    kw = {k: 0 for k in products.BESS_REQUIRED if not k.startswith(("C",))}
    kw.update(OBJNAME="HD 1", **{"DATE-OBS": "2025-01-01T00:00:00"}, EXPTIME2="2 x 60.0 s")
    with pytest.raises(ValueError, match="BSS_INST"):
        products.write_bess_fits(
            tmp_path / "x.fits",
            flux=np.ones(10),
            crval1=4000,
            cdelt1=2,
            keywords={k: v for k, v in kw.items() if k != "BSS_INST"},
        )
    p = products.write_bess_fits(
        tmp_path / "x.fits", flux=np.arange(10.0), crval1=4000.0, cdelt1=2.0, keywords=kw
    )
    h = fits.getheader(p)
    assert h["NAXIS"] == 1 and h["CTYPE1"] == "Wavelength" and h["CRPIX1"] == 1
    s = products.read_spectrum_1d(p)
    assert s.calibrated and s.wavelength_a[0] == 4000.0 and s.wavelength_a[-1] == 4018.0
    assert products.format_exptime2([1200.0] * 6) == "6 x 1200.0 s"
    assert products.format_exptime2([60, 90]) == "60.0 s + 90.0 s"
