"""Slow, literal reference implementations that tests and benchmarks compare against."""
