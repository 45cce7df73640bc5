"""Positional cross-match on the sphere: separations and nearest-neighbour matching (KD-tree on unit
vectors)."""

from __future__ import annotations

import numpy as np

__all__ = ["angular_sep_deg", "unit_vectors", "match_catalogs"]


def angular_sep_deg(ra1, dec1, ra2, dec2):
    """Great-circle separation in degrees (haversine, arrays broadcast)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))


def unit_vectors(ra, dec):
    """Unit vectors (N, 3) of positions in degrees (for KD-trees on the sphere)."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def match_catalogs(ra1, dec1, ra2, dec2, *, radius_arcsec: float):
    """Nearest neighbour of each (ra1, dec1) in (ra2, dec2) within ``radius_arcsec``.

    Returns ``(index, sep_arcsec)``: index -1 (and NaN separation) where there is no match or the
    position is not finite.
    """
    from scipy.spatial import cKDTree

    ra1, dec1 = np.asarray(ra1, float), np.asarray(dec1, float)
    idx = np.full(ra1.size, -1, dtype=np.int64)
    sep = np.full(ra1.size, np.nan)
    ok1 = np.isfinite(ra1) & np.isfinite(dec1)
    ra2, dec2 = np.asarray(ra2, float), np.asarray(dec2, float)
    ok2 = np.flatnonzero(np.isfinite(ra2) & np.isfinite(dec2))
    if not ok1.any() or ok2.size == 0:
        return idx, sep
    tree = cKDTree(unit_vectors(ra2[ok2], dec2[ok2]))
    chord = 2 * np.sin(np.radians(radius_arcsec / 3600.0) / 2)
    d, j = tree.query(unit_vectors(ra1[ok1], dec1[ok1]), distance_upper_bound=chord)
    hit = np.isfinite(d)
    sel = np.flatnonzero(ok1)
    idx[sel[hit]] = ok2[j[hit]]
    sep[sel[hit]] = np.degrees(2 * np.arcsin(d[hit] / 2)) * 3600.0
    return idx, sep
