"""The stage table: every reduction stage declared once.

A `Stage` has one name, used everywhere: the Airflow task id, the stage recorded in a frame's
summary and timings, the stage of a rejection, the results-database stage run. It names its adapter
(a thin function in `rpp_tasks.session.adapters` calling the science in `rpp_tasks.stages`), the
named artefacts it reads and writes, its scope (``frame``: runs for each frame of the session, in a
process pool; ``session``: runs once, like the masters) and whether its task takes a slot of the
heavy Airflow pool.

`IMAGING` is the table of imaging observatories. The drivers (`rpp_tasks.session.pipeline`,
`rpp_tasks.session.lifecycle`) and the DAG factory (``dags/rpp_reduction.py``) read the table: the
checkpoints a stage reloads come from its ``reads``, what a chain of stages saves from the
``writes`` and from what later stages read, and the DAG's task list is the table's order. A second
table (long-slit spectroscopy: mostly session-scope stages) registers in `TABLES` under its
instrument kind (``instrument_kind`` of the observatory configuration) and runs through the same
factory and lifecycle.

This module is imported by the DAG file at parse time: standard library only. Adapters are named
``"module:function"`` and imported when a stage runs (a plain function works too, e.g. in tests).

Adding a stage is one entry here and one adapter function: see ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from rpp_tasks.exceptions import ConfigError

__all__ = [
    "Artefact",
    "Stage",
    "StageTable",
    "ARTEFACTS",
    "IMAGING",
    "LONGSLIT",
    "TABLES",
    "table_for",
]

Scope = Literal["frame", "session"]


@dataclass(frozen=True)
class Artefact:
    """A named file (or files) a stage hands to later stages.

    ``product`` artefacts are kept in the frame folder for the observers (calibrated image,
    catalogue, the normalised header); the others are checkpoints between tasks, written only
    when a later stage in another process reads them (or when intermediates are kept). Each
    artefact has exactly one save and one load (`rpp_tasks.session.frame.ARTEFACT_IO`).
    """

    name: str
    files: tuple[str, ...]
    product: bool
    scope: Scope = "frame"
    doc: str = ""


@dataclass(frozen=True)
class Stage:
    """One stage: its name, adapter, inputs, outputs, scope and pool.

    Attributes
    ----------
    name : str
        Task id, stage, rejection stage and results-database stage name.
    adapter : str or callable
        ``"module:function"`` (imported when the stage runs) or a function. Frame scope:
        ``fn(fw, obs) -> dict`` on a `rpp_tasks.session.frame.FrameWork`; session scope:
        ``fn(session, obs) -> dict``. The dict is the stage's small JSON-safe result.
    reads, writes : tuple of str
        Artefact names (`ARTEFACTS`). ``raw`` means the stage starts from the raw frame.
    scope : {"frame", "session"}
    heavy : bool
        The task takes a slot of the heavy Airflow pool (it runs a process pool of CPU work).
    doc : str
        One line for the DAG's documentation.
    """

    name: str
    adapter: str | Callable
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    scope: Scope = "frame"
    heavy: bool = True
    doc: str = ""

    def function(self) -> Callable:
        """The adapter function (imported on first use)."""
        if callable(self.adapter):
            return self.adapter
        module, _, name = self.adapter.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class StageTable:
    """An ordered list of stages with the artefacts they exchange."""

    kind: str
    stages: tuple[Stage, ...]
    artefacts: Mapping[str, Artefact] = field(default_factory=dict)

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            msg = f"stage table {self.kind!r}: duplicate stage names in {names}"
            raise ValueError(msg)
        available = {a for a, art in self.artefacts.items() if a == "raw"}
        for s in self.stages:
            unknown = [a for a in s.reads + s.writes if a not in self.artefacts]
            if unknown:
                msg = f"stage {s.name!r} uses undeclared artefacts {unknown}"
                raise ValueError(msg)
            missing = [a for a in s.reads if a not in available]
            if missing:
                msg = f"stage {s.name!r} reads {missing}, which no earlier stage writes"
                raise ValueError(msg)
            available.update(s.writes)

    # ---- lookup
    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        msg = f"no stage {name!r} in the {self.kind} table (stages: {', '.join(self.names)})"
        raise KeyError(msg)

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self.stages)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def frame_stages(self) -> tuple[str, ...]:
        """Names of the per-frame stages, in order."""
        return tuple(s.name for s in self.stages if s.scope == "frame")

    @property
    def session_stages(self) -> tuple[str, ...]:
        """Names of the session-wide stages (run once per session), in order."""
        return tuple(s.name for s in self.stages if s.scope == "session")

    def segments(self) -> tuple[tuple[Scope, tuple[str, ...]], ...]:
        """The table cut into runs of consecutive stages of one scope, in order:
        ``(("session", ("masters",)), ("frame", ("calibrate", ..., "transients")))`` for imaging.
        The DAG runs a session segment as one task per stage and a frame segment as one task
        mapped over chunks of the night's frames (the whole segment per chunk, in one process)."""
        out: list[tuple[Scope, tuple[str, ...]]] = []
        for s in self.stages:
            if out and out[-1][0] == s.scope:
                out[-1] = (s.scope, out[-1][1] + (s.name,))
            else:
                out.append((s.scope, (s.name,)))
        return tuple(out)

    def segment_task_id(self, names: tuple[str, ...]) -> str:
        """Task id of a frame segment's mapped task: ``frames`` when the table has one frame
        segment, else ``frames_<first stage>``."""
        n_frame_segments = sum(scope == "frame" for scope, _ in self.segments())
        return "frames" if n_frame_segments == 1 else f"frames_{names[0]}"

    def index(self, name: str) -> int:
        return self.names.index(self[name].name)

    def chain(self, names: str | tuple[str, ...] | list[str]) -> tuple[Stage, ...]:
        """The stages ``names`` (one name or consecutive names of the table), checked."""
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names:
            raise ValueError("no stage given")
        i0 = self.index(names[0])
        if names != self.names[i0 : i0 + len(names)]:
            msg = f"stages must be consecutive in {self.names}, got {names}"
            raise ValueError(msg)
        return tuple(self[n] for n in names)

    def describe(self) -> str:
        """Markdown list of the stages (the DAG's documentation)."""
        lines = []
        for scope, names in self.segments():
            if scope == "session":
                lines += [f"* **{n}** (session): {self[n].doc}" for n in names]
                continue
            lines.append(
                f"* **{self.segment_task_id(names)}**: one task per chunk of the night's frames, "
                "each running these frame stages in turn:"
            )
            lines += [f"  * **{n}**: {self[n].doc}" for n in names]
        return "\n".join([*lines, "* **products** -> (**archive**, **notify**)"])

    def read_after(self, name: str) -> set[str]:
        """Artefacts read by the stages after ``name``."""
        i = self.index(name)
        return {a for s in self.stages[i + 1 :] for a in s.reads}

    # ---- extension
    def with_stage(self, stage: Stage, *, after: str) -> StageTable:
        """A new table with ``stage`` inserted after the stage ``after``."""
        i = self.index(after)
        return replace(self, stages=self.stages[: i + 1] + (stage,) + self.stages[i + 1 :])

    def with_artefact(self, artefact: Artefact) -> StageTable:
        """A new table that also declares ``artefact`` (its I/O must be registered too)."""
        return replace(self, artefacts={**self.artefacts, artefact.name: artefact})


# --------------------------------------------------------------------------------- artefacts
ARTEFACTS: dict[str, Artefact] = {
    a.name: a
    for a in (
        Artefact("raw", (), product=False, doc="the raw frame (read only, never written)"),
        Artefact(
            "masters",
            ("masters.json",),
            product=True,
            scope="session",
            doc="master bias/dark/flat used (files under masters/)",
        ),
        Artefact("check", ("check.json",), product=True, doc="normalised header (FrameMeta)"),
        Artefact(
            "calibrated",
            ("calibrated.fits",),
            product=True,
            doc="float32 image, header + WCS + HISTORY, MASK extension",
        ),
        Artefact("background", ("background.fits",), product=False, doc="sky BKG and RMS images"),
        Artefact("sources", ("sources.ecsv",), product=False, doc="detections"),
        Artefact(
            "catalog", ("catalog.ecsv", "catalog.fits"), product=True, doc="photometry catalogue"
        ),
        Artefact(
            "targets",
            ("targets.json", "targets.ecsv", "comparison_stars.ecsv", "targets_photometry.json"),
            product=True,
            scope="session",
            doc="the targets' photometry of the night (the record step puts it in the results DB)",
        ),
    )
}

_A = "rpp_tasks.session.adapters:"

#: The imaging stages, in the order they run (BANZAI-style ordered list). astrometry writes the WCS
#: into the calibrated header before photometry computes RA/Dec; zero_point, enrich and transients
#: update the catalogue and never stop a frame when a service is down. targets is session-wide:
#: each frame's relative zero point comes from a comparison ensemble solved over all the night's
#: frames of a band and field, so it runs once, after every frame's catalogue is final.
IMAGING = StageTable(
    "imaging",
    (
        Stage(
            "masters",
            _A + "build_masters",
            reads=(),
            writes=("masters",),
            scope="session",
            doc="master bias/dark/flat from the session, else the master library",
        ),
        Stage(
            "calibrate",
            _A + "step_calibrate",
            reads=("raw", "masters"),
            writes=("check", "calibrated"),
            doc="read + check the raw frame, subtract bias/dark, divide by the flat",
        ),
        Stage(
            "cosmics",
            _A + "step_cosmics",
            reads=("check", "calibrated"),
            writes=("check", "calibrated"),
            doc="gain checked against the sky noise; cosmic rays (astroscrappy) cleaned and masked",
        ),
        Stage(
            "background",
            _A + "step_background",
            reads=("check", "calibrated"),
            writes=("background",),
            doc="2-D sky background and RMS",
        ),
        Stage(
            "detect",
            _A + "step_detect",
            reads=("check", "calibrated", "background"),
            writes=("sources",),
            doc="source detection (SEP / DAOStarFinder)",
        ),
        Stage(
            "astrometry",
            _A + "step_astrometry",
            reads=("check", "calibrated", "sources"),
            writes=("check", "calibrated"),
            doc="plate solve when needed, WCS refined against Gaia",
        ),
        Stage(
            "photometry",
            _A + "step_photometry",
            reads=("check", "calibrated", "background", "sources"),
            writes=("catalog",),
            doc="FWHM, aperture and PSF photometry, S/N flags, RA/Dec",
        ),
        Stage(
            "zero_point",
            _A + "step_zero_point",
            reads=("check", "calibrated", "catalog"),
            writes=("catalog",),
            doc="zero point against Gaia / Pan-STARRS / SkyMapper",
        ),
        Stage(
            "enrich",
            _A + "step_enrich",
            reads=("check", "calibrated", "catalog"),
            writes=("catalog",),
            doc="SIMBAD, SkyBoT, VSX, Milliquas, Astro-Colibri columns",
        ),
        Stage(
            "transients",
            _A + "step_transients",
            reads=("check", "calibrated", "background", "catalog"),
            writes=(),
            doc="transient candidates and their cutouts",
        ),
        Stage(
            "targets",
            _A + "measure_targets",
            reads=("check", "calibrated", "catalog"),
            writes=("targets",),
            scope="session",
            heavy=False,
            doc="the observer's targets in every frame: calibrated and differential magnitudes "
            "(comparison ensemble over the night) or upper limits",
        ),
    ),
    ARTEFACTS,
)

_S = "rpp_tasks.spectra.session:"

#: The long-slit stages (2SPOT-like spectroscopy): session scope, one task each. ``spectra`` runs
#: the per-target chain in memory (calibrate, trace and tilt, saturation, cosmic rays, slit
#: curvature, wavelength solution, sky, optimal extraction, combination, heliocentric
#: correction, BeSS products): a night has a few targets whose steps hand each other 2-D arrays,
#: so checkpointing them between tasks would cost more I/O than the steps' CPU (per-step CPU
#: seconds are kept in each target's ``cpu_s``).
LONGSLIT = StageTable(
    "longslit",
    (
        Stage(
            "masters",
            _S + "step_masters",
            reads=(),
            writes=("spectra_masters",),
            scope="session",
            doc="offset, dark (scaled by exposure) and long-slit flat masters per calibration set",
        ),
        Stage(
            "spectra",
            _S + "step_spectra",
            reads=("raw", "spectra_masters"),
            writes=("spectra",),
            scope="session",
            doc="per target: trace, cosmic rays, wavelength solution, optimal extraction, "
            "combination, BeSS 1-D spectrum (a bad target is rejected, the others go on)",
        ),
    ),
    {
        "raw": ARTEFACTS["raw"],
        "spectra_masters": Artefact(
            "spectra_masters",
            ("spectra/masters.json",),
            product=True,
            scope="session",
            doc="masters of each calibration set (spectra/masters/set<k>.npz)",
        ),
        "spectra": Artefact(
            "spectra",
            ("spectra/spectra_summary.json",),
            product=True,
            scope="session",
            doc="per target: BeSS FITS, ECSV, lamp solution, plots, 2-D calibrated frames",
        ),
    },
)

#: Stage tables by instrument kind (``instrument_kind`` of the observatory configuration, one of
#: `rpp_tasks.config.INSTRUMENT_KINDS`).
TABLES: dict[str, StageTable] = {"imaging": IMAGING, "longslit": LONGSLIT}


def table_for(obs, *, strict: bool = False) -> StageTable:
    """The stage table of an observatory (by ``obs.instrument_kind``; ``imaging`` by default).

    A kind without a registered table gets the imaging table's shape for the DAG; with
    ``strict`` (what reducing a session uses) it is refused instead of being reduced with the
    wrong stages.

    Raises
    ------
    ConfigError
        ``strict`` and no table is registered for the instrument kind.
    """
    kind = getattr(obs, "instrument_kind", None) or "imaging"
    if kind not in TABLES and not strict:
        return IMAGING
    if kind not in TABLES:
        expected = "an instrument kind with a stage table: " + ", ".join(sorted(TABLES))
        source = getattr(obs, "source", "") or "<config>"
        raise ConfigError(source, "instrument_kind", expected, kind)
    return TABLES[kind]
