"""Reading raw frames: FITS reading and header normalisation, session grouping, 2SPOT session files."""
