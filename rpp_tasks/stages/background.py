"""Two-dimensional sky background and its noise (SExtractor-style mesh estimator via ``sep``).

The image is cut into ``box_size_px`` meshes; in each mesh the sky is estimated with SExtractor's
clipped mode estimator (``2.5 median - 1.5 mean``, falling back to the median in crowded meshes),
the mesh grid is median-filtered over ``filter_size`` meshes and interpolated back to every pixel
with a bicubic spline. The RMS map is built the same way from the clipped standard deviation in each
mesh: it is **measured on the image** and therefore contains everything that makes the sky scatter
-- photon noise of the sky, read noise, dark-current noise and any residual pattern. That is the
``rms_bkg_adu`` of the aperture error model in ``docs/ARCHITECTURE.md``; do not add read noise to it
a second time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import sep

__all__ = [
    "BackgroundResult",
    "NoiseCheck",
    "check_noise_model",
    "estimate_background",
    "gain_from_noise",
    "gain_upper_bound",
    "release_freed_memory",
]

log = logging.getLogger(__name__)


_LIBC = None


def release_freed_memory() -> bool:
    """Give the memory freed by earlier stages back to the operating system (glibc only).

    numpy's full-frame temporaries of a few tens of MB are served from the C heap once glibc has
    raised its mmap threshold, and freed heap memory stays in the process (RSS) until trimmed: a
    stage that follows a memory-hungry one would otherwise start from the earlier stage's peak.
    ``malloc_trim(0)`` costs a few milliseconds. Returns whether anything could be done.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    return bool(_LIBC.malloc_trim(0))


@dataclass(frozen=True)
class BackgroundResult:
    """Sky background and RMS maps of one frame.

    Attributes
    ----------
    background : numpy.ndarray
        float32 sky level per pixel, ADU.
    rms : numpy.ndarray
        float32 sky noise per pixel, ADU (includes read noise, see module docstring).
    global_median_adu, global_rms_adu : float
        Median of the background and RMS maps (a robust single number per frame).
    box_size_px, filter_size : int
        Mesh size in pixels and median-filter size in meshes that were used.
    n_masked_px : int
        Pixels excluded from the estimate (given mask plus non-finite pixels).
    flags : tuple of str
        ``"box_clipped_to_image"`` when the mesh was larger than the image,
        ``"all_masked"`` when no pixel was usable (maps are NaN then).
    """

    background: np.ndarray = field(repr=False)
    rms: np.ndarray = field(repr=False)
    global_median_adu: float
    global_rms_adu: float
    box_size_px: int
    filter_size: int
    n_masked_px: int = 0
    flags: tuple[str, ...] = ()

    @property
    def map_sigma_adu(self) -> float:
        """Uncertainty of the sky map at one position (ADU): the standard error of the median of
        one mesh, ``1.2533 * rms / box_size_px`` (the median filter over the meshes is left out:
        it stands for the faint-star light that moves the meshes' levels). Used as the prior width
        of the PSF stars' local sky and in the weights of the large-aperture flux references
        (`rpp_tasks.stages.photometry.measure_frame`). On the bench's 2048^2 optics fields
        (rms 32.5 ADU, 64 px meshes) it is 0.64 ADU; the map's measured error at the stars is
        0.60-0.70 ADU rms."""
        return float(1.2533 * self.global_rms_adu / max(self.box_size_px, 1))

    def to_dict(self) -> dict:
        """JSON-safe summary (without the maps)."""
        return {
            "global_median_adu": self.global_median_adu,
            "global_rms_adu": self.global_rms_adu,
            "map_sigma_adu": self.map_sigma_adu,
            "box_size_px": self.box_size_px,
            "filter_size": self.filter_size,
            "n_masked_px": self.n_masked_px,
            "flags": list(self.flags),
        }


def estimate_background(data, *, mask=None, box_size_px=64, filter_size=3):
    """
    Estimate the 2-D sky background and its RMS.

    Parameters
    ----------
    data : array_like
        2-D image in ADU (calibrated, sky **not** subtracted).
    mask : array_like of bool, optional
        True for pixels to ignore (saturated, bad, cosmic rays, sources if already known).
        Non-finite pixels are always ignored.
    box_size_px : int, optional
        Mesh size in pixels. It should be several times the FWHM and smaller than the scale of
        real sky variations (gradients, vignetting residuals).
    filter_size : int, optional
        Size of the median filter over the mesh grid (odd, in meshes); 1 disables it.

    Returns
    -------
    result : `BackgroundResult`

    Raises
    ------
    ValueError
        If ``data`` is not 2-D, ``mask`` has another shape, or the sizes are not positive.

    Notes
    -----
    Cost: about 0.1 CPU-s for a 2048 x 2048 frame (``sep`` works in C on float32).
    """
    data = np.asarray(data)
    if data.ndim != 2:
        msg = f"data must be a 2-D image, got shape {data.shape}"
        raise ValueError(msg)
    box_size_px = int(box_size_px)
    filter_size = int(filter_size)
    if box_size_px < 1 or filter_size < 1:
        msg = f"box_size_px and filter_size must be >= 1, got {box_size_px} and {filter_size}"
        raise ValueError(msg)

    bad = ~np.isfinite(data)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            msg = f"mask shape {mask.shape} differs from data shape {data.shape}"
            raise ValueError(msg)
        bad |= mask
    n_masked = int(np.count_nonzero(bad))
    flags = []

    ny, nx = data.shape
    if n_masked == data.size:
        log.warning("background: all %d pixels masked", data.size)
        nan = np.full(data.shape, np.nan, dtype=np.float32)
        return BackgroundResult(
            nan,
            nan.copy(),
            float("nan"),
            float("nan"),
            box_size_px,
            filter_size,
            n_masked,
            ("all_masked",),
        )

    box_y, box_x = min(box_size_px, ny), min(box_size_px, nx)
    if (box_y, box_x) != (box_size_px, box_size_px):
        flags.append("box_clipped_to_image")

    # sep needs C-contiguous native-endian float32; NaNs must not reach it even when masked.
    work = np.ascontiguousarray(data, dtype=np.float32)
    if bad.any():
        if work is data:
            work = work.copy()
        work[bad] = 0.0
    bkg = sep.Background(
        work, mask=bad if n_masked else None, bw=box_x, bh=box_y, fw=filter_size, fh=filter_size
    )
    background = bkg.back(dtype=np.float32)
    rms = bkg.rms(dtype=np.float32)
    result = BackgroundResult(
        background=background,
        rms=rms,
        global_median_adu=float(np.median(background)),
        global_rms_adu=float(np.median(rms)),
        box_size_px=box_size_px,
        filter_size=filter_size,
        n_masked_px=n_masked,
        flags=tuple(flags),
    )
    log.debug(
        "background: median %.2f ADU, rms %.2f ADU (box %d px, filter %d)",
        result.global_median_adu,
        result.global_rms_adu,
        box_size_px,
        filter_size,
    )
    return result


@dataclass(frozen=True)
class NoiseCheck:
    """Measured pixel noise against the camera's noise model (see `check_noise_model`).

    ``gain_max_e_per_adu`` is the largest gain the measured noise allows (NaN when the noise
    could not be measured); ``sky_dominated`` says whether the sky's Poisson term is most of the
    pixel variance at that gain, so that the bound does not hinge on the configured read noise.
    """

    sky_adu: float
    measured_sigma_adu: float
    model_sigma_adu: float
    ratio: float
    effective_read_noise_e: float
    gain_max_e_per_adu: float = float("nan")
    sky_dominated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def with_gain(self, gain_e_per_adu, read_noise_e) -> NoiseCheck:
        """The same measurement (sky level and pixel noise) against another camera model, as
        `check_noise_model` would give it (the image is not measured again)."""
        if not np.isfinite(self.measured_sigma_adu):  # too few pixels to measure
            nan = float("nan")
            return NoiseCheck(self.sky_adu, nan, nan, nan, float(read_noise_e))
        return _noise_check(self.sky_adu, self.measured_sigma_adu, gain_e_per_adu, read_noise_e)


#: Fraction of the measured pixel variance the sky's Poisson term must hold, at the gain bound,
#: for the frame to count as sky-dominated (`check_noise_model`).
SKY_DOMINATED_FRACTION = 0.8


def gain_upper_bound(sky_adu, sigma_adu, read_noise_e):
    """
    Largest gain (e-/ADU) a pixel noise ``sigma_adu`` allows on a sky level ``sky_adu``.

    The variance of a sky pixel is ``var = S/g + (rn/g)**2`` with ``S`` the sky's true level;
    a bias pedestal left in the frame only adds level, so ``S <= sky_adu`` and ``g`` is at most
    the positive root ``(sky + sqrt(sky**2 + 4 var rn**2)) / (2 var)``. Frames averaged or
    stacked in software have less noise than one exposure: the bound is larger (conservative);
    frames rescaled in software (e.g. 12-bit data written as 16-bit) give the smaller, effective
    gain that photometry errors need.

    Parameters
    ----------
    sky_adu, sigma_adu : float
        Sky level and its pixel noise (ADU).
    read_noise_e : float
        Read noise (e-).

    Returns
    -------
    float
        NaN when ``sigma_adu`` is not a positive finite number.
    """
    var = float(sigma_adu) ** 2
    if not (np.isfinite(var) and var > 0):
        return float("nan")
    sky, rn = max(float(sky_adu), 0.0), float(read_noise_e) if read_noise_e > 0 else 0.0
    return float((sky + np.sqrt(sky * sky + 4.0 * var * rn * rn)) / (2.0 * var))


def check_noise_model(data, *, gain_e_per_adu, read_noise_e, mask=None, row_step=4):
    """
    Compare the sky noise measured on the image with ``sqrt(sky/gain + (rn/gain)**2)``.

    The measured noise is ``1.4826 * MAD(d) / sqrt(2)`` of the differences ``d`` of horizontally
    adjacent pixels (every ``row_step``-th row), which removes sky structure and stars' smooth
    light; the sky level is the median. A camera configured with a wrong gain or read noise (or
    a raw frame still carrying an unknown bias pedestal) shows ``ratio`` far from 1.
    ``effective_read_noise_e`` is the read noise that makes the model match the measurement
    (never below the configured one): stages whose thresholds come from the noise model (cosmic
    rays) use it so that a wrong configuration cannot turn every noise peak into a detection.
    ``gain_max_e_per_adu`` is `gain_upper_bound` of the measurement (with the configured read
    noise; it needs no gain) and ``sky_dominated`` whether ``sky / gain_max`` is at least
    `SKY_DOMINATED_FRACTION` of the measured variance.

    Parameters
    ----------
    data : 2-D array (ADU, sky not subtracted)
    gain_e_per_adu, read_noise_e : float
        The camera's (NaN or 0 for an unknown gain: only the bound is computed).
    mask : 2-D bool array, optional
        Pixels to ignore.
    row_step : int
        Row subsampling (speed).

    Returns
    -------
    `NoiseCheck`
    """
    data = np.asarray(data, dtype=np.float32)[::row_step]
    d = np.diff(data, axis=1)
    ok = np.isfinite(d)
    if mask is not None:
        m = np.asarray(mask, bool)[::row_step]
        ok &= ~(m[:, 1:] | m[:, :-1])
    d = d[ok]
    sky = float(np.nanmedian(data))
    nan = float("nan")
    if d.size < 100:
        return NoiseCheck(sky, nan, nan, nan, float(read_noise_e))
    med = np.median(d)
    sigma = float(1.4826 * np.median(np.abs(d - med)) / np.sqrt(2.0))
    return _noise_check(sky, sigma, gain_e_per_adu, read_noise_e)


def _noise_check(sky, sigma, gain_e_per_adu, read_noise_e) -> NoiseCheck:
    """`NoiseCheck` of a measured sky level and pixel noise against a camera model."""
    nan = float("nan")
    g_max = gain_upper_bound(sky, sigma, read_noise_e)
    sky_dominated = bool(
        np.isfinite(g_max) and max(sky, 0.0) / g_max >= SKY_DOMINATED_FRACTION * sigma**2
    )
    g = nan if gain_e_per_adu is None else float(gain_e_per_adu)
    if not (g > 0):
        return NoiseCheck(sky, sigma, nan, nan, float(read_noise_e), g_max, sky_dominated)
    model = float(np.sqrt(max(sky, 0.0) / g + (float(read_noise_e) / g) ** 2))
    excess = sigma**2 - max(sky, 0.0) / g
    rn_eff = max(float(read_noise_e), g * float(np.sqrt(excess)) if excess > 0 else 0.0)
    ratio = sigma / model if model > 0 else nan
    return NoiseCheck(sky, sigma, model, ratio, rn_eff, g_max, sky_dominated)


#: A configured gain above this multiple of the bound, on a sky-dominated frame, is replaced.
GAIN_BOUND_TOLERANCE = 1.5


def gain_from_noise(check: NoiseCheck, gain_e_per_adu) -> tuple[float, str]:
    """
    The gain a frame's photometry should use, and its source.

    ``(gain_max, "sky noise bound")`` when the configured (or header) gain is unknown, or when
    it exceeds `GAIN_BOUND_TOLERANCE` times the bound of a sky-dominated frame (such a gain
    would make every Poisson error too small); else ``(gain_e_per_adu, "configured")``. A
    frame whose noise is mostly read noise never changes: there the bound hangs on the
    configured read noise.

    Parameters
    ----------
    check : `NoiseCheck`
    gain_e_per_adu : float
        Configured or header gain (NaN when unknown).

    Returns
    -------
    (float, str)
    """
    g = float("nan") if gain_e_per_adu is None else float(gain_e_per_adu)
    g_max = check.gain_max_e_per_adu
    if not np.isfinite(g_max):
        return g, "configured"
    if not (g > 0) or (check.sky_dominated and g > GAIN_BOUND_TOLERANCE * g_max):
        return float(g_max), "sky noise bound"
    return g, "configured"
