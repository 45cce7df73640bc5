"""The dashboard in headless Chromium against a real ``airflow standalone``: log in through the
simple auth manager's login page as an observer, search by name, open a frame, withdraw it (it
leaves the ObsCore table), validate it again (it comes back). Screenshots are analysed (the
preview's grey sky and green detection circles) and compared with a control where the preview
is broken.

Chromium is driven through the DevTools protocol (``websockets``). Skipped with the reason when
Chromium is missing; takes a few minutes (Airflow starts its components).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("RPP_SCREENSHOT_DIR", tempfile.gettempdir())) / "rpp_dashboard_shots"
USER, PASSWORD = "obs1", "observer-pw-1"
OTHERS = {"view1": ("viewer", "viewer-pw-1"), "adm1": ("admin", "admin-pw-1")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")


def _helpers():
    spec = importlib.util.spec_from_file_location(
        "_dash_helpers_c", REPO / "tests" / "plugins" / "test_dashboard.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    _chromium()
    from rpp_tasks.ops.up import AirflowProcess

    root = tmp_path_factory.mktemp("rpp_dash_ui")
    old = os.environ.get("RPP_DATA_ROOT")
    os.environ["RPP_DATA_ROOT"] = str(root)
    night = _helpers().reduce_night(root, n_science=3)
    home = root / "airflow_home"
    (home / "dags").mkdir(parents=True)
    pw = home / "passwords.json"
    pw.write_text(json.dumps({USER: PASSWORD, **{u: p for u, (_, p) in OTHERS.items()}}))
    port = _free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
            [f"{USER}:user", *(f"{u}:{r}" for u, (r, _) in OTHERS.items())]
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": "rpp-test-jwt-secret-0123456789abcdef",
        "AIRFLOW__API__SECRET_KEY": "rpp-test-secret-key",
        "AIRFLOW__API__WORKERS": "1",
        "RPP_DATA_ROOT": str(root),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    proc = AirflowProcess(env, home / "standalone.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.alive(), (home / "standalone.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (home / "standalone.log").read_text()[-3000:]
            time.sleep(2)
        yield {"base": base, **night}
    finally:
        proc.stop()
        if old is None:
            os.environ.pop("RPP_DATA_ROOT", None)
        else:
            os.environ["RPP_DATA_ROOT"] = old


class Browser:
    """A minimal DevTools-protocol client: one page, navigate, evaluate, screenshot."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def send(self, method, **params):
        self.n += 1
        mid = self.n
        await self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg.get("result", {})

    async def js(self, expr):
        r = await self.send(
            "Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    async def wait(self, expr, timeout=60.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                v = await self.js(expr)
                if v:
                    return v
            except RuntimeError:
                pass
            await asyncio.sleep(0.3)
        raise TimeoutError(f"{expr} after {timeout} s; page: {await self.js('location.href')}")

    async def goto(self, url):
        await self.send("Page.navigate", url=url)
        await asyncio.sleep(0.3)
        await self.wait("document.readyState === 'complete'")

    async def shot(self, path: Path) -> np.ndarray:
        from matplotlib.image import imread

        r = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(r["data"]))
        img = imread(path)
        return (img[..., :3] * 255).round().astype(int)


def _grey(img) -> int:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(np.count_nonzero((r == g) & (g == b) & (r > 40) & (r < 200)))


def _green(img) -> int:
    return int(np.count_nonzero(np.all(np.abs(img - np.array([0, 255, 0])) <= 40, axis=-1)))


def _dids(url):
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    with eng.connect() as c:
        out = {r[0] for r in c.execute(sa.text("SELECT obs_publisher_did FROM rpp_main"))}
    eng.dispose()
    return out


def test_observer_logs_in_searches_withdraws_and_validates_in_chromium(airflow, tmp_path):
    import websockets

    browser_bin = _chromium()
    SHOTS.mkdir(parents=True, exist_ok=True)
    dport = _free_port()
    profile = tmp_path / "profile"
    chrome = subprocess.Popen(
        [
            browser_bin,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1200,1400",
            f"--remote-debugging-port={dport}",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = airflow["base"]
    all_dids = _dids(airflow["url"])
    assert len(all_dids) == 3
    stem = airflow["summary"]["frames"][0]["frame"]

    async def run():
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dport}/json/list", timeout=2) as r:
                    pages = [p for p in json.loads(r.read()) if p["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.2)
        async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=50_000_000) as ws:
            b = Browser(ws)
            await b.send("Page.enable")
            # not logged in: the dashboard answers 401
            await b.goto(f"{base}/rpp-reports/dash/")
            assert "Not authenticated" in await b.js("document.body.innerText")
            # the simple auth manager's login page, filled in as a user would
            await b.goto(f"{base}/auth/login?next={base}/rpp-reports/dash/")
            await b.wait("document.querySelectorAll('input').length >= 2")
            await b.shot(SHOTS / "login.png")
            for i, text in enumerate((USER, PASSWORD)):  # typed, as a user would
                await b.js(f"document.querySelectorAll('input')[{i}].focus(); true")
                await b.send("Input.insertText", text=text)
            await b.wait("!document.querySelector('button[type=submit]').disabled")
            await b.js("document.querySelector('button[type=submit]').click(); true")
            await b.wait("fetch('/rpp-reports/dash/me').then(r => r.ok)", timeout=60)
            me = await b.js("fetch('/rpp-reports/dash/me').then(r => r.json())")
            assert me == {"name": USER, "roles": ["user"], "level": "observer"}

            # search by name
            await b.goto(f"{base}/rpp-reports/dash/")
            await b.js(
                "document.querySelector('input[name=name]').value = 'demo';"
                "document.getElementById('go').click(); true"
            )
            await b.wait(
                "location.search.includes('name=demo') && document.readyState === 'complete'"
            )
            await b.wait("[...document.images].every(i => i.complete)")
            n = await b.js("document.querySelectorAll('#results a.frame').length")
            assert n == 3
            await b.shot(SHOTS / "search.png")

            # open the frame
            await b.js(
                f"[...document.querySelectorAll('#results a.frame')]"
                f".find(a => a.textContent === {json.dumps(stem)}).click(); true"
            )
            await b.wait(
                "document.getElementById('preview') && "
                "document.getElementById('preview').complete && "
                "document.getElementById('preview').naturalWidth > 0",
                timeout=90,
            )
            frame_img = await b.shot(SHOTS / "frame.png")
            rect = await b.js(
                "(() => { const r = document.getElementById('preview').getBoundingClientRect();"
                " return [r.left, r.top, r.width, r.height].map(Math.round); })()"
            )
            # control: the same page with the preview broken
            await b.js("document.getElementById('preview').src = 'broken.png'; true")
            await asyncio.sleep(1.0)
            control = await b.shot(SHOTS / "frame_broken_control.png")
            await b.goto(await b.js("location.href"))

            # withdraw it
            await b.js(
                "document.getElementById('reason').value = 'satellite trail'; "
                "document.getElementById('withdraw').click(); true"
            )
            await b.wait("document.getElementById('msg').textContent.includes('withdrawn by')")
            gone = _dids(airflow["url"])
            await b.wait(
                "document.readyState === 'complete' && "
                "document.getElementById('state') && "
                "document.getElementById('state').textContent === 'withdrawn'"
            )
            withdrawn_img = await b.shot(SHOTS / "frame_withdrawn.png")
            text = await b.js("document.body.innerText")
            assert "satellite trail" in text and USER in text

            # validate again
            await b.js(
                "document.getElementById('reason').value = 'trail misses the target'; "
                "document.getElementById('validate').click(); true"
            )
            await b.wait("document.getElementById('msg').textContent.includes('validated by')")
            back = _dids(airflow["url"])
            return frame_img, control, withdrawn_img, rect, gone, back

    try:
        frame_img, control, withdrawn_img, rect, gone, back = asyncio.run(run())
    finally:
        chrome.terminate()
        chrome.wait(20)
    assert len(gone) == 2 and gone < all_dids
    assert back == all_dids
    # the preview: zscale sky (grey) and detection circles (green) where the preview is, and
    # neither in the control page whose preview is broken (same rectangle)
    x, y, w, h = rect
    assert w >= 600 and h >= 600, rect
    shot, ctrl = frame_img[y : y + h, x : x + w], control[y : y + h, x : x + w]
    assert _grey(shot) > 0.5 * w * h and _green(shot) > 300, (_grey(shot), _green(shot))
    assert _grey(ctrl) < 0.1 * w * h and _green(ctrl) < 20, (_grey(ctrl), _green(ctrl))

    # the red "withdrawn" badge shows after the withdrawal only
    def red(img):
        return int(np.count_nonzero(np.all(np.abs(img - np.array([238, 51, 51])) <= 30, axis=-1)))

    assert red(withdrawn_img) > 200 and red(frame_img) < 20, (red(withdrawn_img), red(frame_img))


def _api(base, method, path, *, token=None, body=None):
    req = urllib.request.Request(base + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = None
    if body is not None:
        req.add_header("Content-Type", "application/json")
        data = json.dumps(body).encode()
    try:
        with urllib.request.urlopen(req, data=data, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_roles_with_real_airflow_tokens(airflow):
    """Bearer tokens from Airflow's own ``POST /auth/token`` for a viewer and an admin: the
    dashboard's levels and refusals come from the running auth manager."""
    base = airflow["base"]
    tokens = {}
    for user, (_, pw) in OTHERS.items():
        code, js = _api(base, "POST", "/auth/token", body={"username": user, "password": pw})
        assert code == 201, js
        tokens[user] = js["access_token"]
    assert _api(base, "GET", "/rpp-reports/dash/me", token=tokens["view1"])[1]["level"] == "viewer"
    assert _api(base, "GET", "/rpp-reports/dash/me", token=tokens["adm1"])[1]["level"] == "admin"
    assert _api(base, "GET", "/rpp-reports/dash/me")[0] == 401
    assert _api(base, "GET", "/rpp-reports/dash/me", token="not-a-jwt")[0] in (401, 403)
    stem = airflow["summary"]["frames"][0]["frame"]
    sid = airflow["summary"]["session_id"]
    before = _dids(airflow["url"])
    body = {"decision": "withdrawn", "reason": "x", "frames": [stem]}
    code, js = _api(
        base, "POST", f"/rpp-reports/dash/decide/demo/{sid}", token=tokens["view1"], body=body
    )
    assert code == 403 and "observer" in js["detail"]
    code, js = _api(base, "POST", f"/rpp-reports/dash/delete/demo/{sid}", token=tokens["view1"])
    assert code == 403 and _dids(airflow["url"]) == before
    code, js = _api(base, "GET", "/rpp-reports/dash/?name=demo&format=json", token=tokens["view1"])
    assert code == 200 and js["total"] == 3
