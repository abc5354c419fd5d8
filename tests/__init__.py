"""Tests; `tests.reference` holds the slow reference implementations."""
