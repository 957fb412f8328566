"""Shared test helpers (issue 11 moves the rest of the suite's helpers here)."""
