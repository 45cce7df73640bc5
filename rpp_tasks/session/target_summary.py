"""The observer's targets in the session summary: `TargetSummary` (one target) and `TargetBand`
(its photometry in one band over the night), typed once from the ``targets`` stage's
``targets.json`` by `target_summaries`. `rpp_tasks.session.summary.SessionSummary` holds them
(``targets``, ``targets_unresolved``); the report, the e-mail and the Telegram message read them
from there (`rpp_tasks.outputs.report_target`). Imported from `rpp_tasks.session.summary` too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from rpp_tasks.jsonsafe import json_safe

__all__ = ["TargetBand", "TargetSummary", "target_summaries"]


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


_PHOT_FACTS = ("mag", "mag_err", "mag_diff", "mag_diff_err", "snr")


@dataclass(frozen=True)
class TargetBand:
    """A target in one band over the night (from the ``targets`` stage).

    ``mag``/``mag_diff`` (± ``_err``) are the night's weighted means of the calibrated and the
    differential magnitudes of the primary photometry type ``phot_type`` (errors scaled by the
    scatter when it exceeds them); ``by_type`` the latest detection in every photometry type
    (``mag``, ``mag_err``, ``mag_diff``, ``mag_diff_err``, ``snr``); ``latest`` that frame
    (``frame``, ``mjd_mid``, ``mag``, ``mag_err``, ``mag_diff``, ``mag_diff_err``, ``snr``,
    ``match_sep_arcsec``). Not detected in any frame: ``limit_mag`` is the deepest 5-sigma limit at
    the target's position (``limit_kind``: calibrated or instrumental). ``ensemble`` is the
    comparison ensemble's status (``ok`` or the reason it failed), ``n_comp`` its median number of
    comparison stars per frame.
    """

    band: str
    n_detected: int = 0
    n_upper_limits: int = 0
    phot_type: str | None = None
    mag: float | None = None
    mag_err: float | None = None
    mag_diff: float | None = None
    mag_diff_err: float | None = None
    snr_median: float | None = None
    match_sep_arcsec: float | None = None
    n_comp: int | None = None
    by_type: dict = field(default_factory=dict)
    latest: dict = field(default_factory=dict)
    limit_mag: float | None = None
    limit_kind: str | None = None
    ensemble: str | None = None

    @property
    def detected(self) -> bool:
        return self.n_detected > 0

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetBand:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TargetSummary:
    """One of the night's targets: who it is, how it was named, and its photometry per band.

    ``reason`` says why it has no measurement at all (outside every frame, no WCS).
    """

    name: str
    ra_deg: float | None = None
    dec_deg: float | None = None
    named_by: str | None = None  # run | header | config
    source: str | None = None  # where its position came from (config, sesame, simbad, ...)
    n_frames: int = 0
    n_detected: int = 0
    n_upper_limits: int = 0
    n_outside_field: int = 0
    reason: str | None = None
    bands: tuple[TargetBand, ...] = ()

    @property
    def measured(self) -> bool:
        return bool(self.n_detected or self.n_upper_limits)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["bands"] = [b.to_dict() for b in self.bands]
        return json_safe(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetSummary:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["bands"] = tuple(
            b if isinstance(b, TargetBand) else TargetBand.from_dict(b)
            for b in d.get("bands") or ()
        )
        return cls(**kw)


def _round(v, nd):
    v = _finite(v)
    return None if v is None else round(v, nd)


def target_summaries(stage: Mapping[str, Any] | None) -> tuple[tuple[TargetSummary, ...], tuple]:
    """The typed targets of a session from the ``targets`` stage's summary (``targets.json``'s
    ``summary``): ``(targets, unresolved)``, unresolved as ``{query, named_by, reason}``. The one
    place that file is read for the summary."""
    if not isinstance(stage, Mapping):
        return (), ()
    ens = stage.get("ensembles") or {}
    out = []
    for t in stage.get("targets") or ():
        bands = []
        for band, b in (t.get("bands") or {}).items():
            pt = b.get("phot_type")
            e = {}
            for label, by_t in ens.items():  # "V" or "V field 2": the band's ensemble(s)
                if label == band or label.startswith(f"{band} field "):
                    e = by_t.get(pt) or next(iter(by_t.values()), {}) if by_t else {}
                    if e.get("status") == "ok":
                        break
            latest = dict(b.get("latest") or {})
            bands.append(
                TargetBand(
                    band=band,
                    n_detected=int(b.get("n_detected") or 0),
                    n_upper_limits=int(b.get("n_upper_limits") or 0),
                    phot_type=pt,
                    mag=_round(b.get("mag"), 4),
                    mag_err=_round(b.get("mag_err"), 4),
                    mag_diff=_round(b.get("mag_diff"), 4),
                    mag_diff_err=_round(b.get("mag_diff_err"), 4),
                    snr_median=_round(b.get("snr_median"), 1),
                    match_sep_arcsec=_round(b.get("match_sep_arcsec"), 3),
                    n_comp=b.get("n_comp"),
                    by_type={
                        k: {f: _round(v.get(f), 4) for f in _PHOT_FACTS}
                        for k, v in (b.get("by_type") or {}).items()
                        if isinstance(v, Mapping)
                    },
                    latest=latest,
                    limit_mag=_round(b.get("deepest_limit_mag"), 3),
                    limit_kind=b.get("limit_kind"),
                    ensemble=None
                    if not e
                    else ("ok" if e.get("status") == "ok" else e.get("reason") or e.get("status")),
                )
            )
        out.append(
            TargetSummary(
                name=str(t.get("name")),
                ra_deg=_finite(t.get("ra_deg")),
                dec_deg=_finite(t.get("dec_deg")),
                named_by=t.get("named_by"),
                source=t.get("source"),
                n_frames=int(t.get("n_frames") or 0),
                n_detected=int(t.get("n_detected") or 0),
                n_upper_limits=int(t.get("n_upper_limits") or 0),
                n_outside_field=int(t.get("n_outside_field") or 0),
                reason=t.get("reason"),
                bands=tuple(bands),
            )
        )
    unresolved = tuple(
        {k: u.get(k) for k in ("query", "named_by", "reason")}
        for u in stage.get("unresolved") or ()
    )
    return tuple(out), unresolved
