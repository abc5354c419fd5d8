"""Image processing on RGB-D frames (Python API over csrc/image).

Conventions (docs/DESIGN.md 3): metres; pixel (x, y) with x right, y down, origin at the top-left
pixel centre; camera x right, y down, z forward; intrinsics as a dict {fx, fy, cx, cy}.
"""
from typing import Dict, Tuple, Union

import cv2
import numpy as np
import torch

from model.ext import C

ArrayLike = Union[np.ndarray, torch.Tensor]
Intrinsics = Dict[str, float]


def _tensor(x: ArrayLike, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(x).to(dtype)


def backproject_depth(depth: ArrayLike, intrinsics: Intrinsics, max_depth: float = 6.0) -> torch.Tensor:
    """(H, W) depth in metres -> (H, W, 3) points; invalid depth (<= 0, > max_depth, NaN) -> 0.

    Runs on the depth's device (CPU or CUDA) and keeps float32/float64.
    """
    depth = torch.as_tensor(depth)
    if not depth.is_floating_point():
        depth = depth.float()
    return C.backproject_depth(depth, intrinsics["fx"], intrinsics["fy"], intrinsics["cx"],
                               intrinsics["cy"], float(max_depth))


def project_points(points: torch.Tensor, intrinsics: Intrinsics) -> torch.Tensor:
    """(..., 3) camera points -> (..., 2) pixel coordinates (x, y)."""
    z = points[..., 2]
    return torch.stack((intrinsics["fx"] * points[..., 0] / z + intrinsics["cx"],
                        intrinsics["fy"] * points[..., 1] / z + intrinsics["cy"]), dim=-1)


def depth_boundary_mask(points: ArrayLike, radius: int = 1, max_distance: float = 0.1) -> torch.Tensor:
    """(H, W, 3) points -> (H, W) bool: valid pixels next to (within `radius` pixels of) an
    invalid pixel, the image border, or a point farther than `max_distance` metres."""
    return C.depth_boundary_mask(torch.as_tensor(points), int(radius), float(max_distance))


def mesh_from_depth(points: ArrayLike, max_edge_length: float = 0.05
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, W, 3) points -> vertices (V, 3) float32, vertex_pixels (V, 2) int32 (x, y),
    faces (F, 3) int32: two triangles per 2x2 block of valid pixels whose edges are at most
    `max_edge_length` metres, normals towards the camera."""
    vertices, vertex_pixels, faces = C.mesh_from_depth(_tensor(points).cpu(), float(max_edge_length))
    return vertices, vertex_pixels, faces


def center_crop_offsets(height: int, width: int, out_height: int, out_width: int) -> Tuple[int, int]:
    """(top, left) of the centre crop of size (out_height, out_width); both must fit."""
    if out_height > height or out_width > width:
        raise ValueError(f"crop {out_height}x{out_width} does not fit an image of {height}x{width}")
    return (height - out_height) // 2, (width - out_width) // 2


def crop_intrinsics(intrinsics: Intrinsics, top: int, left: int) -> Intrinsics:
    """Intrinsics of an image cropped at (top, left): the principal point moves by exactly the
    offset. (The reference code was off by half a pixel here; see tests/test_image_proc.py.)"""
    return {"fx": intrinsics["fx"], "fy": intrinsics["fy"],
            "cx": intrinsics["cx"] - left, "cy": intrinsics["cy"] - top}


def center_crop(image: ArrayLike, out_height: int, out_width: int, channels_first: bool = False):
    """Centre crop of an (H, W, ...) image, or (..., H, W) with channels_first."""
    if channels_first:
        height, width = image.shape[-2:]
        top, left = center_crop_offsets(height, width, out_height, out_width)
        return image[..., top:top + out_height, left:left + out_width]
    height, width = image.shape[:2]
    top, left = center_crop_offsets(height, width, out_height, out_width)
    return image[top:top + out_height, left:left + out_width]


def to_u8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) colour in [0, 1] -> (H, W, 3) uint8, as OpenCV takes it."""
    return (image.permute(1, 2, 0).detach().cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)


def sample_points(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, C) of an (H, W, C) image at float pixel coordinates x, y (N,),
    clamped to the border, in the image's dtype. (cv2.remap quantises positions to 1/32 pixel:
    plenty for colour.) The points are laid out as rows of 1024, since remap maps must stay
    below 32767 a side."""
    count = x.shape[0]
    cols = 1024
    rows = max(1, -(-count // cols))
    maps = np.zeros((2, rows * cols), np.float32)
    maps[0, :count], maps[1, :count] = x, y
    out = cv2.remap(image, maps[0].reshape(rows, cols), maps[1].reshape(rows, cols),
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, image.shape[2])[:count]


def local_contrast(gray: np.ndarray, sigma: float, floor: float = 4.0) -> np.ndarray:
    """(H, W) uint8 grey -> (H, W) uint8 with local contrast normalised: every pixel minus the
    Gaussian-weighted mean around it (standard deviation `sigma` pixels), over the
    Gaussian-weighted standard deviation there plus `floor` grey levels, written around 128
    (48 levels per local standard deviation, clipped).

    Brightness that varies smoothly (shading, a light's falloff, a highlight's halo) goes, and
    weak texture is evened out with strong texture. Why it matters: DIS compares patches free
    of their mean but not of their contrast, so where the texture is weak the shading decides
    the match; on a turning object the shading stays with the light while the texture moves
    with the surface, and the flow then measures too little motion. `floor` (about the noise of
    an 8-bit frame) keeps flat regions from being blown up into noise."""
    g = gray.astype(np.float32)
    detail = g - cv2.GaussianBlur(g, (0, 0), sigma)
    spread = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), sigma))
    return np.clip(detail / (spread + floor) * 48 + 128, 0, 255).astype(np.uint8)
