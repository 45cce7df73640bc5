"""Synthetic frames and sessions with known truth, and the measurements against it (tests and
bench)."""
