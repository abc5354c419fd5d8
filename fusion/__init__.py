"""Whole sequences: non-rigid fusion into a canonical model and its animated mesh (docs/DESIGN.md 5.9)."""
