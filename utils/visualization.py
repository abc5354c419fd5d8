"""Pictures for people: flow fields as colour, weights as grey, side-by-side panels."""
from typing import Optional

import numpy as np


def flow_to_color(flow: np.ndarray, max_magnitude: Optional[float] = None) -> np.ndarray:
    """(2, H, W) flow in pixels -> (H, W, 3) uint8 RGB: hue = direction, saturation = magnitude
    (relative to max_magnitude, default the 99th percentile), black where the flow is unknown."""
    import cv2

    valid = np.isfinite(flow).all(axis=0)
    u, v = np.nan_to_num(flow[0]), np.nan_to_num(flow[1])
    magnitude = np.hypot(u, v)
    if max_magnitude is None:
        max_magnitude = float(np.percentile(magnitude[valid], 99)) if valid.any() else 1.0
    angle = (np.degrees(np.arctan2(-v, -u)) + 180.0) / 2.0           # OpenCV hue is 0..180
    hsv = np.zeros(flow.shape[1:] + (3,), dtype=np.uint8)
    hsv[..., 0] = angle.astype(np.uint8)
    hsv[..., 1] = np.clip(255 * magnitude / max(max_magnitude, 1e-6), 0, 255).astype(np.uint8)
    hsv[..., 2] = 255
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    rgb[~valid] = 0
    return rgb


def gray_to_rgb(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 grey, black where not finite."""
    scaled = np.clip((np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12), 0, 1)
    out = (255 * scaled).astype(np.uint8)
    out[~np.isfinite(values)] = 0
    return np.repeat(out[..., None], 3, axis=2)


def tensor_image(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1] for TensorBoard."""
    return rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
