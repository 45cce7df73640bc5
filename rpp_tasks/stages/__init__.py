"""Science stages: pure functions over arrays and tables (calibration, cosmic rays, background,
detection, PSF, photometry, astrometry, reference catalogues, zero points, enrichment,
transients)."""
