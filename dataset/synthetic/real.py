"""Real RGB-D frames as scenes: the object meshed from its depth, the rest of the frame as the
static background."""
import glob
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from dataset import io
from model import image_proc
from dataset.synthetic.scene import Background, Mesh

# Real frames are meshed like the graph builder meshes them (docs/DESIGN.md 5.1).
REAL_MESH_MAX_EDGE = 0.05

@dataclass
class RealFrame:
    """One real RGB-D frame (resized to the requested size) and its object."""
    name: str
    color: np.ndarray       # (H, W, 3) uint8 RGB
    depth: np.ndarray       # (H, W) float32 metres, 0 = invalid
    mask: np.ndarray        # (H, W) bool object
    object_id: str
    intrinsics: Dict[str, float]


def _resize_nearest(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-pixel resize that keeps pixel centres aligned (cv2's nearest shifts them)."""
    h, w = image.shape[:2]
    ys = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return image[ys][:, xs]


def foreground_by_depth(depth: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """(H, W) bool: the largest connected region nearer than `threshold` metres (default: Otsu's
    threshold on the histogram of valid depths, in 1 cm bins), after a morphological opening."""
    valid = depth > 0
    if not valid.any():
        return valid
    if threshold is None:
        counts, edges = np.histogram(depth[valid], bins=np.arange(0, depth[valid].max() + 0.02, 0.01))
        centres = (edges[:-1] + edges[1:]) / 2
        w0 = np.cumsum(counts)
        w1 = w0[-1] - w0
        m0 = np.cumsum(counts * centres) / np.maximum(w0, 1)
        m1 = ((counts * centres).sum() - np.cumsum(counts * centres)) / np.maximum(w1, 1)
        threshold = float(edges[1:][np.argmax(w0 * w1 * (m0 - m1) ** 2)])
    near = (valid & (depth < threshold)).astype(np.uint8)
    k = max(3, int(round(depth.shape[1] / 160)) | 1)
    near = cv2.morphologyEx(near, cv2.MORPH_OPEN, np.ones((k, k), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=4)
    if count <= 1:
        return np.zeros_like(valid)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def load_real_frames(folder: str, width: int, height: int,
                     depth_threshold: Optional[float] = None) -> List[RealFrame]:
    """Reads every frame of a folder laid out like a DeepDeform sequence:

        FOLDER/color/NAME.jpg (or .png)   colour
        FOLDER/depth/NAME.png             uint16 millimetres, 0 = invalid
        FOLDER/intrinsics.txt             4x4 (or 3x3) matrix
        FOLDER/mask/NAME_OBJECT.png       optional object mask (non-zero = object); without one,
                                          the object is the foreground by a depth threshold

    Frames are resized to width x height (intrinsics scaled to match) when their size differs.
    """
    colors = sorted(glob.glob(os.path.join(folder, "color", "*.jpg"))
                    + glob.glob(os.path.join(folder, "color", "*.png")))
    if not colors:
        raise FileNotFoundError(f"{folder}: no color/*.jpg or color/*.png frames")
    base_intrinsics = io.read_intrinsics(os.path.join(folder, "intrinsics.txt"))
    frames = []
    for color_path in colors:
        name = os.path.splitext(os.path.basename(color_path))[0]
        color = io.read_color(color_path)
        depth = io.read_depth(os.path.join(folder, "depth", name + ".png"))
        if depth.shape != color.shape[:2]:
            raise io.FormatError(f"{folder}: frame {name} has colour {color.shape[:2]} but depth "
                                 f"{depth.shape}")
        masks = sorted(glob.glob(os.path.join(folder, "mask", name + "_*.png"))
                       + glob.glob(os.path.join(folder, "mask", name + ".png")))
        if masks:
            mask = io.read_mask(masks[0])
            stem = os.path.splitext(os.path.basename(masks[0]))[0]
            object_id = stem[len(name) + 1:] or "object"
        else:
            mask, object_id = None, "foreground"
        h, w = depth.shape
        intrinsics = dict(base_intrinsics)
        if (w, h) != (width, height):
            sx, sy = width / w, height / h
            intrinsics = {"fx": intrinsics["fx"] * sx, "fy": intrinsics["fy"] * sy,
                          "cx": (intrinsics["cx"] + 0.5) * sx - 0.5,
                          "cy": (intrinsics["cy"] + 0.5) * sy - 0.5}
            interpolation = cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR
            color = cv2.resize(color, (width, height), interpolation=interpolation)
            depth = _resize_nearest(depth, width, height)
            mask = _resize_nearest(mask, width, height) if mask is not None else None
        if mask is None:
            mask = foreground_by_depth(depth, depth_threshold)
        frames.append(RealFrame(name, color, depth, mask, object_id, intrinsics))
    return frames


def _object_surface(frame: RealFrame) -> np.ndarray:
    """(H, W) float32 metres: the real object's surface to mesh, 0 elsewhere. Holes inside the
    mask are inpainted; the depth is denoised with a bilateral filter (3 cm range sigma, so
    depth edges stay), since sensor noise would otherwise crumple the surface under rotation
    and make it hide itself in speckles; pieces of the mask cut off from the object by depth
    jumps of more than 5 cm (mixed pixels at the wall, slivers) smaller than a tenth of the
    largest piece are dropped."""
    height, width = frame.depth.shape
    mm = np.round(frame.depth * 1000).astype(np.uint16)
    holes = frame.mask & (mm == 0)
    filled = cv2.inpaint(mm, holes.astype(np.uint8), 3, cv2.INPAINT_TELEA) if holes.any() else mm
    depth = np.where(frame.mask, filled / 1000.0, 0).astype(np.float32)
    diameter = max(3, int(round(5 * width / 640)) | 1)
    smooth = cv2.bilateralFilter(depth, diameter, 0.03, diameter / 2)
    smooth = np.where(depth > 0, smooth, 0).astype(np.float32)

    jump = np.zeros((height, width), bool)
    for axis in (0, 1):
        a, b = np.delete(smooth, -1, axis=axis), np.delete(smooth, 0, axis=axis)
        cut = (a > 0) & (b > 0) & (np.abs(a - b) > REAL_MESH_MAX_EDGE)
        low, high = [(0, 0), (0, 0)], [(0, 0), (0, 0)]
        low[axis], high[axis] = (0, 1), (1, 0)
        jump |= np.pad(cut, low) | np.pad(cut, high)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        ((smooth > 0) & ~jump).astype(np.uint8), connectivity=4)
    if count <= 1:
        return np.zeros_like(smooth)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.concatenate(([False], areas >= 0.1 * areas.max()))
    return np.where(keep[labels], smooth, 0).astype(np.float32)


def real_scene(frame: RealFrame) -> Tuple[Mesh, Background, np.ndarray]:
    """The object of a real frame as a mesh (one vertex per pixel of `_object_surface`), the
    rest of the frame as the static background (colour and depth inpainted behind the object),
    and (H, W) int64 the vertex id of each pixel (-1 = none)."""
    height, width = frame.depth.shape
    mm = np.round(frame.depth * 1000).astype(np.uint16)
    mask_u8 = frame.mask.astype(np.uint8)
    points = image_proc.backproject_depth(torch.from_numpy(_object_surface(frame)), frame.intrinsics)
    vertices, vertex_pixels, faces = image_proc.mesh_from_depth(points, REAL_MESH_MAX_EDGE)
    vertices, vertex_pixels, faces = vertices.numpy().astype(np.float64), vertex_pixels.numpy(), \
        faces.numpy().astype(np.int64)
    pixel_vertex = np.full((height, width), -1, np.int64)
    pixel_vertex[vertex_pixels[:, 1], vertex_pixels[:, 0]] = np.arange(vertices.shape[0])
    mesh = Mesh(vertices, faces, vertex_pixels.astype(np.float64),
                frame.color.astype(np.float32), procedural=False)

    # The region behind the object (grown by a few pixels, so that its blurred rim does not
    # leak into the background) is inpainted; elsewhere the background is the measured frame.
    grow = max(1, int(round(3 * width / 640)))
    behind = cv2.dilate(mask_u8, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) > 0
    color = cv2.inpaint(frame.color, behind.astype(np.uint8), 3, cv2.INPAINT_TELEA)
    depth_mm = cv2.inpaint(mm, (behind | (mm == 0)).astype(np.uint8), 3, cv2.INPAINT_TELEA)
    depth = np.where(behind, depth_mm / 1000.0, frame.depth).astype(np.float64)
    depth = np.where(depth > 0, depth, np.inf)
    background = Background(depth, color.astype(np.float32), np.ones((height, width)), ~behind)
    return mesh, background, pixel_vertex
