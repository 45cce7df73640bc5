"""Long-slit spectroscopy: from raw 2-D frames to BeSS-ready 1-D spectra (see docs/spectra.md)."""
