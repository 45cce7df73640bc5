"""The observatory configuration's sections as frozen dataclasses, with their defaults.

One dataclass per YAML section (site, camera, filters, paths, session, stages.*, notifications,
archive, catalogs, targets, scheduling, spectrograph) and ObservatoryConfig over them. Loading,
merging over config/defaults.yaml and validation are rpp_tasks.config, which re-exports every
name here. Imported by the DAG files at parse time: standard library only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: File names read as FITS (case-insensitive): plain, tile-compressed (fpack ``.fz``), gzip, bzip2.
FITS_EXTENSIONS = (
    ".fits",
    ".fit",
    ".fts",
    ".fits.fz",
    ".fit.fz",
    ".fts.fz",
    ".fz",
    ".fits.gz",
    ".fit.gz",
    ".fts.gz",
    ".fits.bz2",
    ".fit.bz2",
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SiteConfig:
    """Where the telescope is. Used for airmass/extinction and for the local night date."""

    latitude_deg: float = 0.0
    longitude_deg: float = 0.0
    elevation_m: float = 0.0
    name: str | None = None


@dataclass(frozen=True)
class CameraConfig:
    """Detector facts used when the FITS header does not say (the header wins when it does)."""

    name: str = "camera"
    gain_e_per_adu: float = 1.0
    read_noise_e: float = 10.0
    saturation_adu: float = 65000.0
    pixel_scale_arcsec: float | None = None
    binning: tuple[int, int] = (1, 1)
    bayer_pattern: str | None = None
    telescope: str | None = None
    #: black level (bias pedestal) in ADU per raw pixel, before any software binning; subtracted
    #: from frames calibrated without a master bias or dark (the header's BLKLEVEL wins)
    bias_level_adu: float | None = None


@dataclass(frozen=True)
class FiltersConfig:
    """Header FILTER value -> photometric band (case-insensitive), and the band for frames without
    one."""

    aliases: dict[str, str] = field(default_factory=dict)
    default_band: str | None = None


@dataclass(frozen=True)
class PathsConfig:
    """Folders. Relative paths are relative to ``RPP_DATA_ROOT`` (default: the repository root)."""

    incoming: str = "data/incoming/{observatory}"
    work: str = "data/work/{observatory}"
    products: str = "data/products/{observatory}"
    master_library: str = "data/masters/{observatory}"


@dataclass(frozen=True)
class SessionConfig:
    """When a synced folder counts as a complete session, and how its files are recognised."""

    ready_rule: Literal["quiet", "marker", "twospot"] = "quiet"
    quiet_seconds: float = 600.0
    marker_file: str | None = None
    twospot_obs_file: str = "last_obs.yaml"
    settle_seconds: float = 5.0
    stall_seconds: float = 3600.0
    use_polling: bool = False
    #: memory budget of one frame worker (null: 80 % of the machine's RAM / workers)
    memory_per_worker_mb: float | None = None
    #: peak bytes per pixel of the frame chain in a worker (bench/README.md, "Issue 12")
    bytes_per_pixel: float = 40.0
    frame_types: dict[str, list[str]] = field(
        default_factory=lambda: {
            "bias": ["bias*", "offset*", "zero*"],
            "dark": ["dark*"],
            "flat": ["flat*"],
        }
    )
    extensions: list[str] = field(  # case-insensitive; same list as config/defaults.yaml
        default_factory=lambda: list(FITS_EXTENSIONS)
    )


@dataclass(frozen=True)
class CalibrationConfig:
    combine: Literal["median", "mean"] = "median"
    clip_sigma: float = 3.0
    use_master_library: bool = True
    max_library_age_days: float = 60.0


@dataclass(frozen=True)
class CosmicsConfig:
    enabled: bool = True
    sigclip: float = 4.5
    sigfrac: float = 0.3
    objlim: float = 5.0


@dataclass(frozen=True)
class BackgroundConfig:
    box_size_px: int = 64
    filter_size: int = 3


@dataclass(frozen=True)
class DetectionConfig:
    method: Literal["sep", "dao"] = "sep"
    threshold_sigma: float = 3.0
    min_area_px: int = 5
    deblend_cont: float = 0.005
    fwhm_guess_px: float = 3.5


@dataclass(frozen=True)
class PhotometryConfig:
    fixed_radius_px: float = 8.0
    annulus_fwhm: tuple[float, float] = (3.0, 5.0)
    psf: bool = True
    epsf_oversampling: int = 4
    epsf_max_stars: int = 150


@dataclass(frozen=True)
class AstrometryConfig:
    """Plate solving (local astrometry.net) and WCS refinement against the reference catalogue."""

    enabled: bool = True
    solve: Literal["auto", "always", "never"] = (
        "auto"  # auto: only when the header WCS is not valid
    )
    solve_timeout_s: float = 30.0
    scale_tolerance: float = 0.2  # +-fraction around the hinted pixel scale
    search_radius_deg: float = 3.0  # around the header pointing
    index_dirs: list[str] = field(default_factory=list)  # extra astrometry.net index folders
    max_stars: int = 200
    # solvers tried in order when a solve is needed: "catalog" (asterism matching against the Gaia
    # cone around the pointing hint: any field size, needs a pointing and a pixel-scale hint) and
    # "astrometry.net" (local solve-field: blind or hinted; the Tycho-2 indexes solve wide fields)
    solvers: list[Literal["catalog", "astrometry.net"]] = field(
        default_factory=lambda: ["catalog", "astrometry.net"]
    )
    hint_error_arcmin: float = 15.0  # how far the field centre may be from the pointing hint
    # pointing of the observatory's targets by OBJECT (or FIELD/OBJNAME) name: [RA, Dec] in degrees,
    # the hint for frames whose header has no RA/DEC (names compared without case, spaces, - or _)
    targets: dict[str, tuple[float, float]] = field(default_factory=dict)
    refine: bool = True
    sip_degree: int = 2  # 0: plain TAN
    match_radius_arcsec: float = 3.0
    max_offset_arcsec: float = 120.0  # largest header-WCS error the refinement searches for
    min_matches: int = 8


@dataclass(frozen=True)
class ZeroPointConfig:
    """Photometric zero point per photometry type (apertures and PSF)."""

    enabled: bool = True
    match_radius_arcsec: float = 2.0
    clip_sigma: float = 3.0
    max_residual_mag: float = 0.25
    min_stars: int = 5
    min_snr: float = 20.0
    ref_mag_range: tuple[float, float] = (8.0, 19.0)
    colour_term: bool = False
    extinction_mag_per_airmass: dict[str, float] = field(
        default_factory=lambda: {
            "U": 0.5,
            "B": 0.25,
            "V": 0.15,
            "R": 0.10,
            "I": 0.07,
            "g": 0.20,
            "r": 0.12,
            "i": 0.08,
            "z": 0.06,
            "G": 0.14,
            "BP": 0.20,
            "RP": 0.09,
            "Clear": 0.15,
        }
    )


@dataclass(frozen=True)
class TransientsConfig:
    enabled: bool = True
    min_snr: float = 10.0
    match_radius_arcsec: float = 3.0
    cutout_px: int = 31
    max_candidates: int = 50


@dataclass(frozen=True)
class StagesConfig:
    """Parameters of each reduction stage, in the order they run."""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    cosmics: CosmicsConfig = field(default_factory=CosmicsConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    zero_point: ZeroPointConfig = field(default_factory=ZeroPointConfig)
    transients: TransientsConfig = field(default_factory=TransientsConfig)


@dataclass(frozen=True)
class NotificationsConfig:
    """Who is told. Secrets never live here: only Airflow connection ids."""

    email_to: list[str] = field(default_factory=list)
    operators_email_to: list[str] = field(default_factory=list)
    smtp_conn_id: str = "rpp_smtp"
    telegram_conn_id: str | None = None
    operators_telegram_conn_id: str | None = None


@dataclass(frozen=True)
class ArchiveConfig:
    enabled: bool = True
    obs_collection: str | None = None
    publisher_authority: str = "ivo://rpp.example/archive"
    conn_id: str | None = None
    # access_url of the rows: "file://" (embedded single-user default: the product's file URI) or
    # the HTTP address of the observatory's work folder, e.g. the dashboard's download route
    # "https://rpp.example.org/rpp-reports/{observatory}/" (placeholder filled in); the row's URL
    # is that + "<session>/frames/<frame>/calibrated.fits".
    base_url: str = "file://"
    # "always": every reduced frame not withdrawn; "on_validation": only frames an observer
    # validated (the dashboard), the "with the observer's agreement" rule.
    publish: Literal["always", "on_validation"] = "always"


@dataclass(frozen=True)
class CatalogsConfig:
    """Reference catalogues and enrichment services (see `rpp_tasks.stages.catalogs`). Addresses are
    configurable; secrets (the Astro-Colibri key) come from an Airflow connection or the
    environment."""

    services: dict[str, str] = field(
        default_factory=dict
    )  # name -> base URL (overrides the defaults)
    bands: dict[str, str] = field(
        default_factory=lambda: {
            "Clear": "gaia/G",
            "L": "gaia/G",
            "G": "gaia/G",
            "BP": "gaia/BP",
            "RP": "gaia/RP",
            "B": "gaia/B",
            "V": "gaia/V",
            "R": "gaia/R",
            "I": "gaia/I",
            "g": "ps1/g",
            "r": "ps1/r",
            "i": "ps1/i",
            "z": "ps1/z",
        }
    )  # band -> catalogue/reference band
    # "local" = the local reference catalogue (`local`), tried where it stands in this order
    gaia_order: list[str] = field(default_factory=lambda: ["local", "gaia_tap", "gaia_vizier"])
    enrichment: list[str] = field(
        default_factory=lambda: ["simbad", "skybot", "vsx", "milliquas", "colibri"]
    )
    cache_dir: str | None = "data/cache/catalogs"
    timeout_s: float = 10.0
    max_retries: int = 2
    backoff_s: float = 0.5
    breaker_s: float = 120.0
    max_rows: int = 5000
    mag_limit: float = 19.0
    ps1_release: str = "dr2"
    colibri_conn_id: str | None = "astro_colibri"
    # local reference catalogues: files or folders of Gaia DR3 extracts (FITS/ECSV/CSV) or
    # ATLAS-RefCat2 tiles; `rpp catalog fetch` stores cones in the first folder
    local: list[str] = field(default_factory=list)
    local_fetch_radius_deg: float = 0.5


@dataclass(frozen=True)
class TargetEntry:
    """One target of the observatory: ``ra``/``dec`` in degrees (numbers) or sexagesimal strings
    (RA in hours ``"10:00:24.5"``, Dec in degrees ``"+02:12:00"``); without coordinates the name is
    resolved online (Sesame, SIMBAD)."""

    name: str
    ra: float | str | None = None
    dec: float | str | None = None
    aliases: list[str] = field(default_factory=list)
    pmra_mas_yr: float = 0.0  # proper motion (mu_alpha* = mu_alpha cos dec)
    pmdec_mas_yr: float = 0.0
    epoch_jyear: float = 2000.0  # epoch of ra/dec


@dataclass(frozen=True)
class EnsembleConfig:
    """Comparison stars of the differential photometry (chosen automatically, night by night)."""

    min_snr: float = 30.0
    max_stars: int = 40
    min_stars: int = 3
    min_frame_fraction: float = 0.5  # measured on at least this fraction of the night's frames
    clip_sigma: float = 5.0  # single measurements further than this from the star's model
    max_chi2: float = 4.0  # reduced chi^2 of a star's own light curve above which it is variable
    exclude_radius_arcsec: float = 15.0  # around the targets
    ref_mag_range: tuple[float, float] = (8.0, 19.0)


@dataclass(frozen=True)
class TargetsConfig:
    """The observer's targets: named by the frame (OBJECT), this list, or the run's parameters."""

    enabled: bool = True
    objects: list[TargetEntry] = field(default_factory=list)
    use_object_header: bool = True  # the frame's OBJECT names a target
    resolve_online: bool = True  # names not in ``objects``: Sesame, then SIMBAD (cached)
    match_radius_arcsec: float = 2.0
    detect_min_snr: float = 3.0  # fainter (or no source): an upper limit
    phot_type: Literal["auto", "psf", "1p3fwhm", "1p1fwhm", "fixed"] = "auto"
    edge_margin_px: float = 5.0
    store_all_sources: bool = False  # results DB: also every catalogue-matched source
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass(frozen=True)
class SchedulingConfig:
    """How a night is spread over the Airflow workers (docs/airflow.md, "Scaling out").

    The night's science frames are cut into chunks; each chunk runs the per-frame stages as one
    task (mapped over the chunks), so the chunks of one night run on different workers at once.
    """

    chunk_megapixels: float = 256.0  # largest chunk (61 frames of 2048^2); >= 1 per lane
    chunk_frames: int | None = None  # at most this many frames per chunk (not by pixels)
    max_active_runs: int = 2  # nights of this observatory reduced at once
    max_active_tasks: int = 2  # tasks of one run at once (chunks of a night in parallel)
    retries: int = 2  # tries after the first, per task (per chunk for the frame stages)
    retry_delay_s: float = 10.0  # before the first retry (doubling, capped at 10 min)


#: Instrument kinds an observatory can declare; each has its stage table in the DAG factory.
INSTRUMENT_KINDS = ("imaging", "longslit")
#: Lamp elements with a shipped line list (`rpp_tasks.spectra.linelists.LAMP_LINES`).
LAMP_ELEMENTS = ("Ne", "Ar", "He", "Hg")


@dataclass(frozen=True)
class SpectrographConfig:
    """Long-slit spectrograph setup (``instrument_kind: longslit``); see docs/spectra.md.

    2SPOT's ``setup_config.yaml`` overrides ``bin_size_px`` (``bin_size``) and
    ``spectrum_y_px`` (``posy``) for the night.
    """

    name: str = "spectrograph"
    dispersion_a_per_px: float = 2.4  # approximate; negative: wavelength decreases with x
    central_wavelength_a: float | None = None  # at the central column of the dispersion axis
    wavelength_range_a: tuple[float, float] | None = None  # alternative to the central value
    dispersion_axis: int = 1  # FITS axis along which the wavelength changes (1: NAXIS1)
    spectrum_y_px: float | None = None  # 0-based row of the spectrum (null: automatic)
    bin_size_px: int = 16  # extraction aperture height (2SPOT bin_size)
    lamp_elements: list[str] = field(default_factory=lambda: ["Ne"])
    resolving_power: float | None = None  # expected R (a measured R far from it is flagged)
    poly_degree: int = 3
    min_lamp_lines: int = 5
    dispersion_tolerance: float = 0.15
    extraction: Literal["optimal", "boxcar"] = "optimal"
    sky_offset_px: float = 15.0  # sky windows start this far from the trace ...
    sky_width_px: float = 30.0  # ... and are this wide, on both sides
    flat_smooth_px: int = 31
    max_saturated_fraction: float = 0.01  # of the trace's columns
    zero_point: Literal["auto", "off"] = "auto"  # telluric/sky zero-point (flexure) correction
    heliocentric: Literal["record", "apply"] = "record"
    resample_step_a: float | None = None  # BeSS grid step (default: the mean dispersion)
    reference_star: str | None = None  # target whose known spectrum gives the response
    reference_spectrum: str | None = None  # its spectrum (ECSV or BeSS FITS)
    lamp_patterns: list[str] = field(
        default_factory=lambda: ["*neon*", "*_ne-*", "*arc*", "*lamp*", "*calib*", "*argon*"]
    )
    bss_inst: str | None = None  # BeSS instrument label (default: "<telescope> + <name>")
    bss_site: str | None = None
    observer: str | None = None


@dataclass(frozen=True)
class ObservatoryConfig:
    """One observatory = one YAML file = one Airflow DAG (``rpp_<name>``)."""

    observatory: str
    title: str = ""
    site: SiteConfig = field(default_factory=SiteConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    catalogs: CatalogsConfig = field(default_factory=CatalogsConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    instrument_kind: Literal["imaging", "longslit"] = "imaging"
    spectrograph: SpectrographConfig | None = None
    source: str = ""  # the YAML path (filled by the loader)
    config_hash: str = ""  # sha256[:12] of the merged mapping (provenance of products)

    @property
    def name(self) -> str:
        return self.observatory

    @property
    def dag_id(self) -> str:
        return f"rpp_{self.observatory}"

    def resolve_path(self, which: str) -> Path:
        """Absolute path of ``paths.<which>`` with ``{observatory}`` expanded.

        Relative paths are taken from ``RPP_DATA_ROOT`` when set, else the repository root.
        """
        raw = getattr(self.paths, which).format(observatory=self.observatory)
        p = Path(os.path.expandvars(os.path.expanduser(raw)))
        if not p.is_absolute():
            p = Path(os.environ.get("RPP_DATA_ROOT", REPO_ROOT)) / p
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
