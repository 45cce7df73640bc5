"""The source table that detection produces: its columns, flag bits and the empty table."""

from __future__ import annotations

import numpy as np
from astropy.table import Table

__all__ = [
    "SOURCE_COLUMNS",
    "FLAG_PEAK_FINDER",
    "FLAG_RESIDUAL",
    "FLAG_SATURATED",
    "empty_source_table",
]

#: Columns of a source table, in order, with their dtypes.
SOURCE_COLUMNS = (
    ("id", np.int64),
    ("x_centroid", np.float64),
    ("y_centroid", np.float64),
    ("flux", np.float64),
    ("peak", np.float64),
    ("npix", np.int64),
    ("a_px", np.float64),
    ("b_px", np.float64),
    ("theta_rad", np.float64),
    ("flag", np.int64),
    ("snr_det", np.float64),
)

FLAG_PEAK_FINDER = 0x1000  #: ``flag`` bit of sources added by the matched-filter peak search
FLAG_RESIDUAL = 0x2000  #: ``flag`` bit of sources found on the PSF-fit residual image
FLAG_SATURATED = 0x4000  #: ``flag`` bit of a saturated star (one source per saturated region)


def empty_source_table(*, method="sep", threshold_sigma=np.nan):
    """An empty source table with the standard columns and ``meta["no_sources"] = True``."""
    tab = Table([np.zeros(0, dt) for _, dt in SOURCE_COLUMNS], names=[n for n, _ in SOURCE_COLUMNS])
    tab.meta.update(
        method=method, threshold_sigma=float(threshold_sigma), n_sources=0, no_sources=True
    )
    return tab
