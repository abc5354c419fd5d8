"""Image processing, graph construction, visualisation, checkpoints, metrics and helpers."""
