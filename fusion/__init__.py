"""Whole sequences: non-rigid fusion into a canonical model, and meshes out (docs/DESIGN.md 5.9)."""
