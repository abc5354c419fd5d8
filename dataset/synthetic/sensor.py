"""The sensor model: depth noise growing with depth, holes, edge dropout, millimetre quantisation,
colour noise and illumination change (JPEG comes with writing)."""
import cv2
import numpy as np

from options import SyntheticOptions
from dataset.synthetic.render import Frame

def noise_sigma(z: np.ndarray) -> np.ndarray:
    """Axial depth noise (metres) of a Kinect-like sensor at depth z (metres)."""
    return 0.0012 + 0.0019 * (z - 0.4) ** 2


def sensor_depth(rng: np.random.Generator, frame: Frame, options: SyntheticOptions) -> np.ndarray:
    """Rendered depth -> what a depth camera reports, (H, W) float32 metres in whole
    millimetres, 0 = missing. Real measured pixels are kept as they are."""
    height, width = frame.depth.shape
    depth = frame.depth
    valid = np.isfinite(depth) & (depth > 0)
    synthetic = valid & ~frame.measured
    noisy = depth + options.depth_noise * noise_sigma(np.where(valid, depth, 0)) * \
        rng.standard_normal(depth.shape)
    out = np.where(synthetic, noisy, np.where(valid, depth, 0.0))

    drop = synthetic & (frame.cosine < np.cos(np.deg2rad(options.grazing_angle)))
    # Depth discontinuities: sensors lose depth on both sides of a jump, raggedly.
    d = np.where(valid, depth, 0.0)
    jump = np.zeros_like(valid)
    for axis in (0, 1):
        diff = np.abs(np.diff(d, axis=axis)) > np.maximum(0.05, 0.03 * np.maximum(
            np.delete(d, -1, axis=axis), np.delete(d, 0, axis=axis)))
        pad_low = [(0, 0), (0, 0)]
        pad_low[axis] = (1, 0)
        pad_high = [(0, 0), (0, 0)]
        pad_high[axis] = (0, 1)
        jump |= np.pad(diff, pad_low) | np.pad(diff, pad_high)
    edge = rng.uniform(size=depth.shape) < 0.6 * min(options.holes, 1.0 / 0.6)
    drop |= synthetic & jump & edge
    # Random blobs of missing depth, most of them on the object.
    blobs = np.zeros((height, width), np.uint8)
    scale = width / 640.0
    object_pixels = np.flatnonzero(frame.is_object)
    for _ in range(rng.poisson(5 * options.holes)):
        if object_pixels.size and rng.uniform() < 0.7:
            y, x = divmod(int(object_pixels[rng.integers(object_pixels.size)]), width)
        else:
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        axes = (max(1, int(rng.uniform(1.5, 10) * scale)), max(1, int(rng.uniform(1.5, 10) * scale)))
        cv2.ellipse(blobs, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    drop |= synthetic & (blobs > 0)

    out = np.where(drop, 0.0, out)
    out = np.round(out * 1000.0) / 1000.0
    out[(out <= 0) | (out > 65.535)] = 0
    return out.astype(np.float32)


def sensor_color(rng: np.random.Generator, color: np.ndarray, change: float) -> np.ndarray:
    """(H, W, 3) float RGB -> uint8 with a global illumination change of strength `change`
    (gain per channel, brightness, offset and a linear ramp across the image; 0 = none) and
    camera noise."""
    height, width = color.shape[:2]
    out = color.astype(np.float32)
    if change > 0:
        gain = np.exp(rng.normal(0, 0.03 * change, 3) + rng.normal(0, 0.06 * change))
        ramp_x = rng.normal(0, 0.04 * change) * (np.arange(width) / width - 0.5)
        ramp_y = rng.normal(0, 0.04 * change) * (np.arange(height) / height - 0.5)
        ramp = (1 + ramp_x[None, :] + ramp_y[:, None]).astype(np.float32)
        out = out * gain.astype(np.float32) * ramp[..., None] + np.float32(rng.normal(0, 3 * change))
    out += 1.5 * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
