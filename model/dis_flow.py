"""OpenCV's DIS optical flow as a correspondence front-end that needs no checkpoint.

Flow from the source to the target frame (in grey, or in locally contrast-normalised grey:
TrackerOptions.dis_normalize), a forward-backward consistency check (matches whose
backward flow does not lead back are dropped) and uniform or photometric match weights.
"""
from typing import Optional, Tuple

import cv2
import numpy as np

from model import image_proc
from options import TrackerOptions


PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
           "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def _dis(source_rgb: np.ndarray, target_rgb: np.ndarray, preset: str, normalize: float = 0.0):
    """A DIS instance of the preset and the two frames in grey (local contrast normalised with
    that sigma when `normalize` > 0: image_proc.local_contrast).

    "fine" is OpenCV's medium preset run down to full resolution (finest scale 0), with patches
    every 2 pixels, 25 gradient-descent and 10 variational-refinement iterations: on our
    real-frame synthetic pairs it halves the medium preset's flow error (5.6 -> 3.8 px on 10
    pairs) at several times the cost."""
    dis = cv2.DISOpticalFlow_create(PRESETS["medium" if preset == "fine" else preset])
    if preset == "fine":
        dis.setFinestScale(0)
        dis.setPatchStride(2)
        dis.setGradientDescentIterations(25)
        dis.setVariationalRefinementIterations(10)
    grays = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in (source_rgb, target_rgb)]
    if normalize > 0:
        grays = [image_proc.local_contrast(gray, normalize) for gray in grays]
    return (dis, *grays)


def _residual_pass(dis, source_gray: np.ndarray, target_gray: np.ndarray, forward: np.ndarray,
                   xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The flow (H, W, 2) `forward` refined by one more DIS run: the target resampled at every
    source pixel's match (target(x + forward(x)), aligned with the source where the flow is
    right) is matched to the source; a pixel x whose remaining flow is r matches the resampled
    target at x + r, that is the target at x + r + forward(x + r)."""
    aligned = cv2.remap(target_gray, xs + forward[..., 0], ys + forward[..., 1], cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
    rest = dis.calc(source_gray, aligned, None)
    carried = cv2.remap(forward, xs + rest[..., 0], ys + rest[..., 1], cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
    return rest + carried


def dis_forward_backward(source_rgb: np.ndarray, target_rgb: np.ndarray,
                         preset: str = "medium") -> Tuple[np.ndarray, np.ndarray]:
    """Raw DIS flows source -> target and target -> source between two (H, W, 3) uint8 RGB
    frames, each (2, H, W) float32 pixels, no check applied (the hybrid front-end's input)."""
    dis, source_gray, target_gray = _dis(source_rgb, target_rgb, preset)
    forward = dis.calc(source_gray, target_gray, None)
    backward = dis.calc(target_gray, source_gray, None)
    return forward.transpose(2, 0, 1).copy(), backward.transpose(2, 0, 1).copy()


def dis_flow(source_rgb: np.ndarray, target_rgb: np.ndarray, options: TrackerOptions,
             object_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """DIS optical flow between two (H, W, 3) uint8 RGB frames.

    Returns flow (2, H, W) float32 in pixels (NaN where the forward-backward check fails) and
    weights (H, W) float32 in [0, 1]. object_mask (H, W) bool, the pixels the solver will use
    (those with anchors): when fewer than options.dis_min_consistent of them pass the check,
    the check is skipped. DIS's backward flow can fail on an object where the forward flow is
    right (a procedural 320x240 pair: forward median error 0.3 px, backward off by ~15 px, so
    the check dropped every object pixel and the solve had no match at all); a check that
    rejects almost everything says more about the backward flow than about the matches, and
    the solver's robust loss still down-weights outliers.
    """
    dis, source_gray, target_gray = _dis(source_rgb, target_rgb, options.dis_preset, options.dis_normalize)
    forward = dis.calc(source_gray, target_gray, None)                      # (H, W, 2)
    height, width = source_gray.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(options.dis_passes - 1):
        forward = _residual_pass(dis, source_gray, target_gray, forward, xs, ys)
    map_x, map_y = xs + forward[..., 0], ys + forward[..., 1]
    valid = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    if options.dis_consistency > 0:
        backward = dis.calc(target_gray, source_gray, None)
        back_at_match = cv2.remap(backward, map_x, map_y, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=(1e6, 1e6))
        consistent = np.linalg.norm(forward + back_at_match, axis=-1) <= options.dis_consistency
        inside = valid if object_mask is None else valid & object_mask
        if not inside.any() or consistent[inside].mean() >= options.dis_min_consistent:
            valid &= consistent
    if options.dis_weights == "photometric":
        # Compared on the images DIS matched: normalised, the colours differ by the shading the
        # normalisation took out, and the weights would then fall where the light moved.
        source, target = (source_rgb, target_rgb) if options.dis_normalize <= 0 else (source_gray, target_gray)
        warped = cv2.remap(target, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        difference = (warped.astype(np.float32) - source.astype(np.float32)).reshape(height, width, -1) / 255.0
        # Gaussian of the mean colour difference; sigma 0.1 of the colour range.
        weights = np.exp(-(difference ** 2).mean(axis=-1) / (2 * 0.1 ** 2)).astype(np.float32)
    else:
        weights = np.ones((height, width), dtype=np.float32)
    flow = forward.transpose(2, 0, 1).copy()
    flow[:, ~valid] = np.nan
    return flow, weights
