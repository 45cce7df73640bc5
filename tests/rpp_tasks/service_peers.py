"""Loopback peers for the catalogue and enrichment services (no network in the tests).

`Peer` is a threaded HTTP server on 127.0.0.1 whose routes answer in each service's real format:
the Gaia TAP JSON of the recorded ``astroquery/gaia/cone_search.json`` (its 152-column metadata and
a recorded row as template for every synthetic star), VizieR VOTables with the ``I/355/gaiadr3``
column names, the MAST ``info``+``data`` JSON of ``astroquery/mast/panstarrs.json``, SkyMapper DR4
TAP VOTables with the ``dr4.master`` column names, SIMBAD TAP
VOTable and the recorded SkyBoT VOTable. Each route can be switched to ``"500"``, ``"slow"``
(answers after the client's timeout), ``"malformed"`` or ``"empty"``; `refused_url` is an address
nothing listens on.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
from astropy.table import Table

RESPONSES = (
    Path(
        os.environ.get(
            "RPP_REAL_DATA", Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
        )
    )
    / "catalog_responses"
)
GAIA_TAP_RECORDED = RESPONSES / "astroquery/gaia/cone_search.json"


def require_recorded(path: Path = GAIA_TAP_RECORDED) -> Path:
    """Skip the calling test (from the test's own thread) when a recorded reply is absent (fresh
    clone)."""
    if not path.is_file():
        import pytest

        pytest.skip(
            f"recorded catalogue reply {path} not found: the loopback peer answers in its recorded "
            "format (real test data absent; set RPP_REAL_DATA, see README 'Test data')"
        )
    return path


class Peer:
    """HTTP server with ``routes[path_prefix] = handler(query: dict, body: dict) -> (status, ctype,
    bytes)``."""

    def __init__(self):
        self.routes: dict = {}
        self.mode: dict = {}  # path prefix -> "ok" | "500" | "slow" | "malformed" | "empty"
        self.calls: list = []
        self.raw_query = ""
        self.slow_s = 3.0
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _serve(self, body: dict):
                u = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(u.query).items()}
                peer.raw_query = u.query  # e.g. Sesame's "?<name>" (no key=value pairs)
                for prefix, fn in sorted(peer.routes.items(), key=lambda kv: -len(kv[0])):
                    if u.path.startswith(prefix):
                        peer.calls.append((prefix, query, body))
                        mode = peer.mode.get(prefix, "ok")
                        if mode == "500":
                            return self._send(500, "text/plain", b"Internal Server Error")
                        if mode == "slow":
                            time.sleep(peer.slow_s)
                        if mode == "malformed":
                            return self._send(
                                200, "application/json", b'{"metadata": [{"name": "ra"}], "da'
                            )
                        status, ctype, content = fn(query, body, mode)
                        return self._send(status, ctype, content)
                return self._send(404, "text/plain", b"not found")

            def _send(self, status, ctype, content):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                self._serve({})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n).decode() if n else ""
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    body = json.loads(raw or "{}")
                else:
                    body = {k: v[0] for k, v in parse_qs(raw).items()}
                self._serve(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def refused_url() -> str:
    """An address on loopback where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------- formats
def _cone(tab, query, body, ra_key="ra", dec_key="dec"):
    return tab


def gaia_tap_json(stars: Table) -> bytes:
    """The recorded Gaia TAP JSON (metadata + a template row) filled with ``stars`` (ra, dec, G, BP,
    RP)."""
    doc = json.loads(GAIA_TAP_RECORDED.read_text())
    names = [c["name"] for c in doc["metadata"]]
    tpl = list(doc["data"][0])
    ix = {n: i for i, n in enumerate(names)}
    rows = []
    for k, s in enumerate(stars):
        row = list(tpl)
        sid = int(s["source_id"]) if "source_id" in stars.colnames else 4_000_000_000_000_000 + k
        row[ix["source_id"]] = sid
        row[ix["designation"]] = f"Gaia DR3 {sid}"
        row[ix["ra"]], row[ix["dec"]] = float(s["ra"]), float(s["dec"])
        row[ix["pmra"]] = row[ix["pmdec"]] = 0.0
        row[ix["phot_g_mean_mag"]] = float(s["G"])
        row[ix["phot_bp_mean_mag"]] = float(s["BP"])
        row[ix["phot_rp_mean_mag"]] = float(s["RP"])
        row[ix["phot_g_mean_flux_over_error"]] = 2000.0
        row[ix["phot_bp_mean_flux_over_error"]] = 500.0
        row[ix["phot_rp_mean_flux_over_error"]] = 500.0
        rows.append(row)
    doc["data"] = rows
    return json.dumps(doc).encode()


def votable_bytes(tab: Table) -> bytes:
    from astropy.io.votable import from_table

    buf = io.BytesIO()
    from_table(tab).to_xml(buf)
    return buf.getvalue()


def vizier_gaia_votable(stars: Table) -> bytes:
    t = Table()
    t["Source"] = np.asarray(
        stars["source_id"]
        if "source_id" in stars.colnames
        else 4_000_000_000_000_000 + np.arange(len(stars)),
        dtype=np.int64,
    )
    t["RA_ICRS"], t["DE_ICRS"] = np.asarray(stars["ra"], float), np.asarray(stars["dec"], float)
    t["pmRA"] = t["pmDE"] = np.zeros(len(stars))
    for b in ("G", "BP", "RP"):
        t[f"{b}mag"] = np.asarray(stars[b], float)
        t[f"e_{b}mag"] = np.full(len(stars), 0.003)
    return votable_bytes(t)


def ps1_json(stars: Table) -> bytes:
    """MAST Catalogs JSON (``info`` + ``data``, as the recorded panstarrs.json) with mean PSF
    magnitudes."""
    cols = ["objID", "raMean", "decMean", "nDetections"] + [
        f"{b}MeanPSFMag{e}" for b in "grizy" for e in ("", "Err")
    ]
    info = [{"name": c, "type": "double", "db_type": "NUMBER", "description": c} for c in cols]
    data = []
    for k, s in enumerate(stars):
        row = [str(100000000000 + k), float(s["ra"]), float(s["dec"]), 10]
        for b in "grizy":
            row += [
                float(s[b]) if b in stars.colnames else -999.0,
                0.01 if b in stars.colnames else -999.0,
            ]
        data.append(row)
    return json.dumps({"info": info, "data": data}).encode()


def skymapper_votable(stars: Table) -> bytes:
    """SkyMapper DR4 TAP VOTable of ``dr4.master`` (the columns `query_skymapper` selects); bands
    ``g r i z`` from ``stars`` when present, else empty (NULL) values."""
    t = Table()
    t["object_id"] = np.asarray(600_000_000 + np.arange(len(stars)), dtype=np.int64)
    t["raj2000"], t["dej2000"] = np.asarray(stars["ra"], float), np.asarray(stars["dec"], float)
    for b in "griz":
        have = b in stars.colnames
        t[f"{b}_psf"] = np.asarray(stars[b], float) if have else np.full(len(stars), np.nan)
        t[f"e_{b}_psf"] = np.full(len(stars), 0.02 if have else np.nan)
    return votable_bytes(t)


def make_sky(ra0, dec0, *, n=300, radius_deg=0.1, seed=0, g_range=(11.0, 17.5)):
    """A reference sky: positions, Gaia G and BP/RP colours, seeded."""
    rng = np.random.default_rng(seed)
    r = radius_deg * np.sqrt(rng.uniform(0, 1, n))
    th = rng.uniform(0, 2 * np.pi, n)
    dec = dec0 + r * np.sin(th)
    ra = ra0 + r * np.cos(th) / np.cos(np.radians(dec0))
    g = rng.uniform(*g_range, n)
    bprp = rng.uniform(0.5, 1.8, n)
    t = Table(
        {
            "source_id": 5_000_000_000_000_000 + np.arange(n, dtype=np.int64),
            "ra": ra,
            "dec": dec,
            "G": g,
            "BP": g + 0.35 * bprp,
            "RP": g - 0.65 * bprp,
        }
    )
    return t


def add_gaia_routes(peer: Peer, stars: Table):
    # in the test thread: a missing template must skip, not break the server thread
    require_recorded()
    peer.routes["/tap/sync"] = lambda q, b, m: (
        200,
        "application/json",
        gaia_tap_json(stars[:0] if m == "empty" else stars),
    )
    peer.routes["/viz-bin/votable"] = lambda q, b, m: (
        200,
        "text/xml",
        vizier_gaia_votable(stars[:0] if m == "empty" else stars),
    )
    peer.routes["/panstarrs"] = lambda q, b, m: (
        200,
        "application/json",
        ps1_json(stars[:0] if m == "empty" else stars),
    )
    peer.routes["/skymapper/sync"] = lambda q, b, m: (
        200,
        "text/xml",
        skymapper_votable(stars[:0] if m == "empty" else stars),
    )


# ----------------------------------------------------------------------------- name resolvers
def sesame_text(query: str, hit: dict | None) -> bytes:
    """A CDS Sesame plain-text reply (``nph-sesame/-oI/SNV?<name>``): ``%J`` position, ``%I.0``
    main identifier, ``%C.0`` object type, ``%P`` proper motion; else a 'Nothing found' reply."""
    if hit is None:
        text = (
            f"# {query}    #Q12345\n#=Si=Simbad, all IDs (via url):    0\n"
            "#! *** Nothing found *** \n#=V=VizieR (local):    0\n#! *** Nothing found *** \n\n"
            "#====Done (2025-Feb-01,12:00:00z)====\n"
        )
        return text.encode()
    ra, dec = hit["ra"], hit["dec"]
    lines = [
        f"# {query}    #Q12345",
        "#=Si=Simbad, all IDs (via url):    1     3ms",
        "%@ 123456",
        f"%I.0 {hit.get('main_id', query)}",
        f"%C.0 {hit.get('otype', '*')}",
        f"%J {ra:.9f} {dec:+.9f} = 00:00:00.00 +00:00:00.0",
        "%J.E [0.01 0.01 90] A 2020yCat.1350....0G",
    ]
    if "pmra" in hit:
        lines.append(f"%P {hit['pmra']:.3f} {hit['pmdec']:.3f} [0.02 0.02 0] A 2020yCat.1350....0G")
    lines += ["", "#====Done (2025-Feb-01,12:00:00z)===="]
    return ("\n".join(lines) + "\n").encode()


def simbad_ident_votable(hit: dict | None) -> bytes:
    """SIMBAD TAP answer to the ``ident JOIN basic`` query (``main_id, ra, dec, otype, pmra,
    pmdec``), empty when the identifier is unknown."""
    rows = [hit] if hit else []
    t = Table(
        {
            "main_id": np.asarray([h.get("main_id", "") for h in rows], dtype=str),
            "ra": np.asarray([h["ra"] for h in rows], float),
            "dec": np.asarray([h["dec"] for h in rows], float),
            "otype": np.asarray([h.get("otype", "*") for h in rows], dtype=str),
            "pmra": np.asarray([h.get("pmra", np.nan) for h in rows], float),
            "pmdec": np.asarray([h.get("pmdec", np.nan) for h in rows], float),
        }
    )
    return votable_bytes(t)


def add_name_routes(peer: Peer, names: dict, *, simbad_names: dict | None = None):
    """Sesame (``/sesame``) and SIMBAD TAP (``/simbad/sync``) answering for ``names``
    (``{name: {"ra", "dec", "main_id", "otype", "pmra", "pmdec"}}``; SIMBAD knows
    ``simbad_names`` when given, else the same names)."""
    from urllib.parse import unquote

    def sesame_route(q, b, m):
        name = unquote(peer.raw_query)  # nph-sesame/-oI/SNV?<name>
        return 200, "text/plain", sesame_text(name, names.get(name))

    def simbad(q, b, m):
        import re

        query = b.get("QUERY", "")
        hit = re.search(r"ident\.id = '((?:[^']|'')*)'", query)
        name = hit.group(1).replace("''", "'") if hit else ""
        known = simbad_names if simbad_names is not None else names
        return 200, "text/xml", simbad_ident_votable(known.get(name))

    peer.routes["/sesame"] = sesame_route
    peer.routes["/simbad/sync"] = simbad
