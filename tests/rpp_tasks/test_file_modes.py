"""Product files share one file mode: JSON written atomically (through a private temporary file,
created 0600) gets the mode the FITS products get, that is 0666 less the process umask."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest
from astropy.io import fits

from rpp_tasks.session.workdir import write_json_atomic


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_json_products_get_the_mode_of_the_fits_products(tmp_path, mask):
    with _umask(mask):
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
        fits.PrimaryHDU().writeto(tmp_path / "calibrated.fits")
    assert _mode(tmp_path / "summary.json") == _mode(tmp_path / "calibrated.fits") == 0o666 & ~mask
    # rewriting keeps it (the temporary file replaces the old one)
    with _umask(mask):
        write_json_atomic(tmp_path / "summary.json", {"a": 2})
    assert _mode(tmp_path / "summary.json") == 0o666 & ~mask


def test_every_file_of_a_reduced_frame_has_one_mode(tmp_path):
    from rpp_tasks.config import config_from_dict
    from rpp_tasks.session import pipeline
    from rpp_tasks.sim.synthetic import make_star_field

    fld = make_star_field((128, 128), n_stars=30, mag_range=(13, 16), n_cosmic_rays=0, seed=3)
    fits.PrimaryHDU(fld.data, fld.header).writeto(tmp_path / "f.fits")
    obs = config_from_dict(
        {
            "observatory": "modes",
            "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0},
            "stages": {
                "astrometry": {"enabled": False},
                "zero_point": {"enabled": False},
                "transients": {"enabled": False},
            },
        }
    )
    with _umask(0o022):
        s = pipeline.reduce_frame(tmp_path / "f.fits", obs, tmp_path / "out")
    assert s["status"] == "ok", s.get("reason")
    modes = {p.name: oct(_mode(p)) for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert "summary.json" in modes and "calibrated.fits" in modes
    assert set(modes.values()) == {oct(0o644)}, modes
