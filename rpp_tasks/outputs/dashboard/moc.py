"""Coverage maps: an IVOA MOC (multi-order coverage, HEALPix NESTED cells) per session and per
observatory, from the footprints of the archived rows, so "which nights cover this region" is one
look-up in a small map instead of a scan of the rows.

The map is at one fixed order (`DEFAULT_ORDER` = 10: cells of 3.4'), computed here without any
HEALPix dependency (`ang2pix_nest` is the standard NESTED numbering of Górski et al. 2005). A cell
is in the map when a sample point of a footprint falls in it (points every third of a cell, and the
footprint's vertices), so partly covered cells at the edges are included. Serialised in the MOC 2.0
JSON form (``{"10": [cells]}``) and the ASCII form (``10/1-3 7``).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_ORDER = 10


def _spread_bits(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.int64)
    out = np.zeros_like(v)
    for b in range(30):
        out |= ((v >> b) & 1) << (2 * b)
    return out


def ang2pix_nest(order: int, ra_deg, dec_deg) -> np.ndarray:
    """HEALPix NESTED pixel numbers at ``order`` (nside = 2**order) of ICRS positions (deg)."""
    nside = 1 << order
    ra = np.radians(np.asarray(ra_deg, dtype=float) % 360.0)
    z = np.sin(np.radians(np.asarray(dec_deg, dtype=float)))
    za = np.abs(z)
    tt = ra / (math.pi / 2)  # [0, 4)
    face = np.zeros(z.shape, dtype=np.int64)
    ix = np.zeros(z.shape, dtype=np.int64)
    iy = np.zeros(z.shape, dtype=np.int64)
    eq = za <= 2.0 / 3.0
    # equatorial belt
    t1 = nside * (0.5 + tt[eq])
    t2 = nside * z[eq] * 0.75
    jp = (t1 - t2).astype(np.int64)
    jm = (t1 + t2).astype(np.int64)
    ifp, ifm = jp // nside, jm // nside
    face[eq] = np.where(ifp == ifm, ifp | 4, np.where(ifp < ifm, ifp, ifm + 8))
    ix[eq] = jm & (nside - 1)
    iy[eq] = nside - (jp & (nside - 1)) - 1
    # polar caps
    pc = ~eq
    ntt = np.minimum(3, tt[pc].astype(np.int64))
    tp = tt[pc] - ntt
    tmp = nside * np.sqrt(3.0 * (1.0 - za[pc]))
    jp = np.minimum((tp * tmp).astype(np.int64), nside - 1)
    jm = np.minimum(((1.0 - tp) * tmp).astype(np.int64), nside - 1)
    north = z[pc] >= 0
    face[pc] = np.where(north, ntt, ntt + 8)
    ix[pc] = np.where(north, nside - jm - 1, jp)
    iy[pc] = np.where(north, nside - jp - 1, jm)
    return face * nside * nside + _spread_bits(ix) + 2 * _spread_bits(iy)


def footprint_cells(dali: str, order: int = DEFAULT_ORDER) -> set[int]:
    """Cells at ``order`` touched by a DALI polygon (``"ra1 dec1 ra2 dec2 ..."``, deg)."""
    from matplotlib.path import Path as MplPath

    v = np.array([float(x) for x in dali.split()], dtype=float).reshape(-1, 2)
    if len(v) < 3:
        return set()
    # gnomonic projection around the vertices' mean direction
    ra, dec = np.radians(v[:, 0]), np.radians(v[:, 1])
    xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    c = xyz.mean(axis=0)
    c /= np.linalg.norm(c)
    ra0 = math.atan2(c[1], c[0])
    e = np.array([-math.sin(ra0), math.cos(ra0), 0.0])
    n = np.cross(c, e)

    def proj(p):
        d = p @ c
        return np.stack([(p @ e) / d, (p @ n) / d], axis=1)

    poly = proj(xyz)
    cell = math.radians(58.6 / 60.0) / (1 << order)  # mean cell size (rad): 58.6 deg at order 0
    step = cell / 3.0
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    xs = np.arange(lo[0], hi[0] + step, step)
    ys = np.arange(lo[1], hi[1] + step, step)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    inside = pts[MplPath(poly).contains_points(pts, radius=1e-12)]
    inside = np.vstack([inside, poly])
    # back to the sphere
    p3 = c[None, :] + inside[:, :1] * e[None, :] + inside[:, 1:] * n[None, :]
    p3 /= np.linalg.norm(p3, axis=1)[:, None]
    ra_s = np.degrees(np.arctan2(p3[:, 1], p3[:, 0])) % 360.0
    dec_s = np.degrees(np.arcsin(np.clip(p3[:, 2], -1, 1)))
    return {int(x) for x in np.unique(ang2pix_nest(order, ra_s, dec_s))}


def to_json(cells, order: int = DEFAULT_ORDER) -> dict:
    """MOC 2.0 JSON (``{"<order>": [sorted cells]}``)."""
    return {str(order): sorted(int(c) for c in cells)}


def to_ascii(cells, order: int = DEFAULT_ORDER) -> str:
    """MOC ASCII serialisation with ranges: ``10/1-3 7``."""
    s = sorted(int(c) for c in cells)
    parts, i = [], 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(f"{s[i]}-{s[j]}" if j > i else str(s[i]))
        i = j + 1
    return f"{order}/" + " ".join(parts)


def contains(moc_json: dict, ra_deg: float, dec_deg: float) -> bool:
    """Whether a position falls in a single-order MOC (`to_json`)."""
    ((order, cells),) = moc_json.items()
    cell = int(ang2pix_nest(int(order), np.array([ra_deg]), np.array([dec_deg]))[0])
    return cell in set(cells)


def archive_mocs(url: str, obs_collection: str, *, order: int = DEFAULT_ORDER, table="rpp.main"):
    """``{session: cells}`` of the archived rows of a collection (rows without footprint are
    left out). The observatory's MOC is the union."""
    from sqlalchemy import inspect, text

    from rpp_tasks.outputs import obscore_sql
    from rpp_tasks.outputs.footprint import spoly_to_dali

    engine = obscore_sql._engine(url)
    name = obscore_sql._table_name(table, engine.dialect.name)
    out: dict[str, set[int]] = {}
    try:
        schema, _, bare = name.rpartition(".")
        if not inspect(engine).has_table(bare, schema=schema or None):
            return out
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    f"SELECT rpp_session, s_region FROM {name} "
                    "WHERE obs_collection = :c AND s_region IS NOT NULL"
                ),
                {"c": obs_collection},
            ).all()
    finally:
        engine.dispose()
    for session, region in rows:
        dali = spoly_to_dali(region) if engine.dialect.name == "postgresql" else region
        out.setdefault(session or "", set()).update(footprint_cells(dali, order))
    return out
