"""Masked Lucas-Kanade refinement of the flow near the rendered model's silhouette.

The fusion loop's flow runs from the model, rendered over the previous frame, to the live frame.
Within a few pixels of the rendered silhouette every flow patch (DIS's, or a plain Lucas-Kanade
window) holds background as well as object; the background does not move with the object, so
the flow there comes out short (benchmarks/bench_fusion_flow.py: on the blobs, within 5 px of
the silhouette, a third of the true motion), the model lags most at its border, and the lag
grows frame by frame. Here each flow vector near the silhouette is refined by iterative
Lucas-Kanade whose window only counts the model's own pixels (the rendered mask), with the
window's mean removed (the rendering's colour is the model's, not the live frame's), starting
from the flow itself.
"""
from typing import Tuple

import cv2
import numpy as np

CHUNK = 30000


def _grey(rgb: np.ndarray, sigma: float) -> np.ndarray:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return cv2.GaussianBlur(grey, (0, 0), sigma) if sigma > 0 else grey


def masked_lucas_kanade(source_rgb: np.ndarray, target_rgb: np.ndarray, source_mask: np.ndarray,
                        flow: np.ndarray, pixels: np.ndarray, radius: int = 5, iterations: int = 8,
                        sigma: float = 1.5, max_step: float = 1.0,
                        tolerance: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """Refines `flow` at `pixels` by Lucas-Kanade over the source's masked window.

    source_rgb, target_rgb (H, W, 3) uint8; source_mask (H, W) bool, the pixels the window may
    use (the rendered model); flow (2, H, W) float32 pixels, the start (NaN: not refined);
    pixels (H, W) bool, where to refine. Both images are blurred by `sigma` px (a wider basin);
    the window is (2 radius + 1)^2 pixels, Gaussian-weighted (sigma radius / 1.5) and restricted
    to source_mask; each Gauss-Newton step of the window's mean-removed SSD is clamped to
    `max_step` px per axis. Returns (refined (2, H, W) float32, equal to `flow` elsewhere, and
    done (H, W) bool: refined with a well-conditioned window that converged, its last step at
    most `tolerance` px per axis; NaN where refinement was asked but the window's structure
    tensor is degenerate (no texture) or the search did not settle (on the blobs' weak texture
    those were the noisiest: dropping them lowered the drift of blobs 3, 4 and 11 further)).
    """
    refined = flow.copy()
    done = np.zeros(source_mask.shape, bool)
    ys, xs = np.nonzero(pixels & np.isfinite(flow).all(axis=0))
    if ys.size == 0:
        return refined, done
    source, target = _grey(source_rgb, sigma), _grey(target_rgb, sigma)
    # Target intensity and its gradient in one 3-channel image: one remap per iteration.
    stack = np.dstack((target, cv2.Sobel(target, cv2.CV_32F, 1, 0, ksize=3) / 8,
                       cv2.Sobel(target, cv2.CV_32F, 0, 1, ksize=3) / 8))
    mask = source_mask.astype(np.float32)
    # OpenCV's remap takes maps of fewer than 32767 rows.
    for start in range(0, ys.size, CHUNK):
        y, x = ys[start:start + CHUNK], xs[start:start + CHUNK]
        current, good = _refine(source, stack, mask, flow[:, y, x].T.astype(np.float32), y, x, radius,
                                iterations, max_step, tolerance)
        refined[:, y, x] = np.where(good[None], current.T, np.nan)
        done[y[good], x[good]] = True
    return refined, done


def _refine(source, stack, mask, current, ys, xs, radius, iterations, max_step, tolerance):
    """masked_lucas_kanade on (P,) pixels with (P, 2) starting flow: (P, 2) flow and (P,) good."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    oy, ox = [o.reshape(-1) for o in np.meshgrid(offsets, offsets, indexing="ij")]
    wx = xs[:, None].astype(np.float32) + ox[None]                    # (P, K) window pixels
    wy = ys[:, None].astype(np.float32) + oy[None]
    gauss = np.exp(-(ox ** 2 + oy ** 2) / (2 * (radius / 1.5) ** 2)).astype(np.float32)
    inside = cv2.remap(mask, wx, wy, cv2.INTER_NEAREST, borderValue=0)
    weight = inside * gauss[None]
    total = np.maximum(weight.sum(axis=1, keepdims=True), 1e-6)

    def centred(values):
        return values - (weight * values).sum(axis=1, keepdims=True) / total

    template = centred(cv2.remap(source, wx, wy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    current = current.copy()
    good = np.ones(ys.size, bool)
    for _ in range(iterations):
        sampled = cv2.remap(stack, wx + current[:, :1], wy + current[:, 1:], cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)
        residual = template - centred(sampled[..., 0])
        gx, gy = centred(sampled[..., 1]), centred(sampled[..., 2])
        h11, h12, h22 = [(weight * a * b).sum(axis=1) for a, b in ((gx, gx), (gx, gy), (gy, gy))]
        b1, b2 = (weight * gx * residual).sum(axis=1), (weight * gy * residual).sum(axis=1)
        det = h11 * h22 - h12 ** 2
        # Degenerate (flat or edge-only) windows: no reliable 2D step.
        good = det > 1e-3 * (h11 + h22) ** 2 + 1e-9
        safe = np.where(good, det, 1.0)
        step = np.stack(((h22 * b1 - h12 * b2) / safe, (h11 * b2 - h12 * b1) / safe), axis=1)
        step = np.where(good[:, None], np.clip(step, -max_step, max_step), 0.0)
        current += step
    return current, good & (np.abs(step).max(axis=1) <= tolerance)
