"""Test doubles shipped with the package: the local fake upstream (tests, demo, benchmark)."""
