"""ObsCore ids are unique per product (issue 12, item 4): the same stem in two sessions, or two
products whose headers give the same default ``obs_id`` (same INSTRUME and DATE-OBS, files in
different subfolders), are separate rows; re-archiving the same products updates them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
from astropy.io import fits

from rpp_tasks.outputs.archive import archive_session, run_archive
from rpp_tasks.session.summary import FrameSummary, SessionSummary


def _product(path: Path) -> Path:
    """A calibrated image with a celestial WCS, INSTRUME and DATE-OBS (same for every call)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = fits.Header()
    h.update(
        CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=2.0, CRPIX1=32.5, CRPIX2=32.5,
        CDELT1=-1e-3, CDELT2=1e-3, INSTRUME="CAM1", DATE_OBS="2025-01-15T22:00:00",
        EXPTIME=60.0, FILTER="V", OBJECT="field",
    )  # fmt: skip
    h["DATE-OBS"] = h.pop("DATE_OBS")
    fits.PrimaryHDU(np.zeros((64, 64), np.float32), h).writeto(path, overwrite=True)
    return path


def _summary(root: Path, session_id: str, stems) -> SessionSummary:
    frames = tuple(
        FrameSummary(
            frame=stem,
            status="ok",
            calibrated=str(_product(root / session_id / "frames" / stem / "calibrated.fits")),
            date_obs="2025-01-15T22:00:00",
            mjd_obs=60690.9166667,
            exptime_s=60.0,
            band="V",
        )
        for stem in stems
    )
    return SessionSummary(observatory="demo", session_id=session_id, frames=frames)


def _rows(db: Path):
    with sqlite3.connect(db) as con:
        return sorted(con.execute("SELECT obs_id, obs_publisher_did FROM rpp_main").fetchall())


def test_same_stem_in_two_sessions_and_reruns(tmp_path):
    db = tmp_path / "archive.sqlite"
    kw = dict(url=f"sqlite:///{db}", obs_collection="demo", publisher_authority="rpp.example")
    # two frames of one session whose headers are identical (x.fits and x.fit -> unique stems)
    a = archive_session(_summary(tmp_path, "2025-01-15", ["x", "x_fit"]), **kw)
    b = archive_session(_summary(tmp_path, "2025-01-16", ["x"]), **kw)
    assert (a["n_inserted"], b["n_inserted"]) == (2, 1)
    rows = _rows(db)
    assert [r[0] for r in rows] == ["2025-01-15/x", "2025-01-15/x_fit", "2025-01-16/x"]
    assert len({r[1] for r in rows}) == 3
    again = archive_session(_summary(tmp_path, "2025-01-15", ["x", "x_fit"]), **kw)
    assert (again["n_inserted"], again["n_updated"]) == (0, 2) and len(_rows(db)) == 3


def test_products_with_the_same_default_obs_id_get_separate_rows(tmp_path):
    db = tmp_path / "archive.sqlite"
    kw = dict(url=f"sqlite:///{db}", obs_collection="demo", publisher_authority="rpp.example")
    paths = [_product(tmp_path / sub / "x.fits") for sub in ("a", "b")]
    first = run_archive([str(p) for p in paths], **kw)
    assert first["n_inserted"] == 2
    rows = _rows(db)
    assert len({r[0] for r in rows}) == 2 and len({r[1] for r in rows}) == 2
    assert all(r[0].startswith("CAM1_20250115T220000_") for r in rows)
    assert run_archive([str(p) for p in paths], **kw)["n_updated"] == 2  # deterministic ids
    assert _rows(db) == rows
    # one product alone keeps the documented default id
    single = tmp_path / "single.sqlite"
    run_archive([str(paths[0])], **{**kw, "url": f"sqlite:///{single}"})
    assert [r[0] for r in _rows(single)] == ["CAM1_20250115T220000"]
