"""The session report opens in headless Chromium and its plots render (screenshot analysed).

Uses Debian's ``chromium`` (``apt-get install -y chromium``); skipped with the reason when it is not
installed. The page is opened from ``file://`` with networking disabled, so it also proves that the
report is self-contained. A control copy of the page with the embedded images broken shows that
the colours counted in the screenshot come from the plots.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1200,2000",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")


def _fake_session(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "_report_fixtures", REPO / "tests" / "rpp_tasks" / "test_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_fake_session(tmp_path, zeropoint=True, candidates=True), mod.FAKE_OBS


def _screenshot(browser: str, page: Path, out: Path) -> np.ndarray:
    from matplotlib.image import imread

    profile = Path(tempfile.mkdtemp(prefix="rpp_chromium_"))
    try:
        res = subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert res.returncode == 0 and out.is_file(), res.stderr[-3000:]
    img = imread(out)
    return (
        (img[..., :3] * 255).round().astype(int)
        if img.dtype != np.uint8
        else img[..., :3].astype(int)
    )


def _count(img: np.ndarray, rgb, tol: int = 12) -> int:
    return int(np.count_nonzero(np.all(np.abs(img - np.array(rgb)) <= tol, axis=-1)))


def test_report_renders_plots_in_headless_chromium(tmp_path):
    browser = _chromium()
    from rpp_tasks.outputs import report

    session, obs = _fake_session(tmp_path)
    res = report.run_report(session, obs)
    page = Path(res["html_path"])
    shot = _screenshot(browser, page, tmp_path / "report.png")
    assert shot.shape[:2] == (2000, 1200)

    # a control page whose embedded images cannot be decoded
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,AAAA", page.read_text()))
    control = _screenshot(browser, broken, tmp_path / "broken.png")

    blue, purple = (31, 119, 180), (148, 103, 189)  # FWHM and sky lines of the night-trends plot
    assert _count(shot, blue) > 150 and _count(shot, purple) > 150, (
        _count(shot, blue),
        _count(shot, purple),
    )
    assert _count(control, blue) < 20 and _count(control, purple) < 20

    # the zscale preview: mid-grey sky noise and the magenta square of the transient candidate
    def mid_grey(img):
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        return int(np.count_nonzero((r == g) & (g == b) & (r > 60) & (r < 200)))

    assert mid_grey(shot) > 50_000 and mid_grey(control) < 5_000, (
        mid_grey(shot),
        mid_grey(control),
    )
    assert _count(shot, (255, 0, 255), tol=30) > 100 and _count(control, (255, 0, 255), tol=30) < 10
    # the header banner (text and CSS) renders in both
    assert (
        _count(shot, (11, 16, 51), tol=20) > 1000 and _count(control, (11, 16, 51), tol=20) > 1000
    )
