"""Reading an RGB-D sequence in DeepDeform's layout (docs/DESIGN.md 5.9).

    DIR/color/NNNNNN.jpg   DIR/depth/NNNNNN.png (uint16 mm)   DIR/mask/NNNNNN_<object>.png
    DIR/intrinsics.txt     (DIR/gt/ for synthetic sequences, read by fusion/gt.py)

Every problem is a SequenceError whose one-line message names the file or folder and what was
expected and found.
"""
import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from dataset import io


class SequenceError(ValueError):
    """A sequence folder or frame that cannot be fused (one line, naming the file)."""


@dataclass
class Frame:
    index: int                 # position in the processed list
    frame_id: int              # number of the input files
    color: np.ndarray          # (H, W, 3) uint8 RGB
    depth: np.ndarray          # (H, W) float32 metres, 0 = invalid


def parse_frames(spec: Optional[str], ids: List[int], where: str) -> List[int]:
    """START:END[:STEP] over the frame numbers present (END exclusive, either side may be empty)."""
    if not spec:
        return ids
    match = re.fullmatch(r"(\d*):(\d*)(?::(\d+))?", spec.strip())
    if not match:
        raise SequenceError(f"--frames {spec}: expected START:END[:STEP] (frame numbers, e.g. 0:40 or 10::2)")
    start = int(match.group(1)) if match.group(1) else min(ids)
    end = int(match.group(2)) if match.group(2) else max(ids) + 1
    step = int(match.group(3)) if match.group(3) else 1
    if step < 1:
        raise SequenceError(f"--frames {spec}: STEP must be >= 1")
    chosen = [i for i in ids if start <= i < end and (i - start) % step == 0]
    if not chosen:
        raise SequenceError(f"--frames {spec}: no frame of {where} in that range "
                            f"(its frames are {min(ids)}..{max(ids)})")
    return chosen


class Sequence:
    """The frames of one sequence folder; frames are read (and checked) when asked for."""

    def __init__(self, root: str, frames: Optional[str] = None, depth_scale: float = 1000.0,
                 max_depth: float = 6.0):
        self.root = os.fspath(root)
        self.depth_scale, self.max_depth = depth_scale, max_depth
        if not os.path.isdir(self.root):
            raise SequenceError(f"{self.root}: sequence folder not found")
        for sub in ("color", "depth"):
            if not os.path.isdir(os.path.join(self.root, sub)):
                raise SequenceError(f"{os.path.join(self.root, sub)}: folder not found (a sequence holds "
                                    "color/, depth/, mask/ and intrinsics.txt)")
        intrinsics_path = os.path.join(self.root, "intrinsics.txt")
        if not os.path.isfile(intrinsics_path):
            raise SequenceError(f"{intrinsics_path}: not found (4x4 matrix with fx, fy, cx, cy)")
        try:
            self.intrinsics: Dict[str, float] = io.read_intrinsics(intrinsics_path)
        except io.FormatError as error:
            raise SequenceError(str(error)) from None
        depth_ids = self._ids("depth", ".png")
        color_ids = self._ids("color", ".jpg") or self._ids("color", ".png")
        if not depth_ids:
            raise SequenceError(f"{os.path.join(self.root, 'depth')}: no NNNNNN.png depth frames")
        self.color_ext = ".jpg" if self._ids("color", ".jpg") else ".png"
        missing = sorted(set(depth_ids) - set(color_ids))
        if missing:
            raise SequenceError(f"{self.color_path(missing[0])}: missing (depth/{missing[0]:06d}.png exists)")
        self.frame_ids = parse_frames(frames, depth_ids, self.root)
        first = self.read(0)
        self.height, self.width = first.depth.shape

    def _ids(self, sub: str, ext: str) -> List[int]:
        names = glob.glob(os.path.join(self.root, sub, "*" + ext))
        return sorted(int(os.path.basename(n)[:-len(ext)]) for n in names
                      if re.fullmatch(r"\d+", os.path.basename(n)[:-len(ext)]))

    def __len__(self) -> int:
        return len(self.frame_ids)

    def color_path(self, frame_id: int) -> str:
        return os.path.join(self.root, "color", f"{frame_id:06d}{getattr(self, 'color_ext', '.jpg')}")

    def depth_path(self, frame_id: int) -> str:
        return os.path.join(self.root, "depth", f"{frame_id:06d}.png")

    def read(self, index: int) -> Frame:
        frame_id = self.frame_ids[index]
        depth_path, color_path = self.depth_path(frame_id), self.color_path(frame_id)
        for path in (depth_path, color_path):
            if not os.path.isfile(path):
                raise SequenceError(f"{path}: frame missing")
        try:
            depth = io.read_depth(depth_path, self.depth_scale)
            color = io.read_color(color_path)
        except io.FormatError as error:
            raise SequenceError(str(error)) from None
        if color.shape[:2] != depth.shape:
            raise SequenceError(f"{color_path}: colour is {color.shape[1]}x{color.shape[0]}, depth "
                                f"{depth_path} is {depth.shape[1]}x{depth.shape[0]}")
        if hasattr(self, "height") and depth.shape != (self.height, self.width):
            raise SequenceError(f"{depth_path}: frame is {depth.shape[1]}x{depth.shape[0]}, the sequence's "
                                f"first frame is {self.width}x{self.height}")
        depth[~np.isfinite(depth) | (depth > self.max_depth)] = 0
        if not (depth > 0).any():
            raise SequenceError(f"{depth_path}: no valid depth (every pixel is 0 or beyond {self.max_depth} m)")
        return Frame(index=index, frame_id=frame_id, color=color, depth=depth)

    def first_mask(self, mask_path: Optional[str] = None, object_name: Optional[str] = None
                   ) -> Tuple[np.ndarray, str]:
        """The object mask of the first processed frame: `mask_path`, or mask/NNNNNN_<object>.png,
        or the only mask of that frame in mask/. Returns (mask (H, W) bool, its path)."""
        frame_id = self.frame_ids[0]
        if mask_path is None:
            folder = os.path.join(self.root, "mask")
            if object_name:
                mask_path = os.path.join(folder, f"{frame_id:06d}_{object_name}.png")
                if not os.path.isfile(mask_path):
                    raise SequenceError(f"{mask_path}: mask of object {object_name!r} for the first frame not found")
            else:
                found = sorted(glob.glob(os.path.join(folder, f"{frame_id:06d}_*.png")))
                if not found:
                    raise SequenceError(f"{folder}: no mask {frame_id:06d}_<object>.png for the first frame "
                                        "(give --mask PNG or --object NAME)")
                if len(found) > 1:
                    names = ", ".join(os.path.basename(f) for f in found)
                    raise SequenceError(f"{folder}: several masks for the first frame ({names}); choose one "
                                        "with --object NAME")
                mask_path = found[0]
        if not os.path.isfile(mask_path):
            raise SequenceError(f"{mask_path}: mask not found")
        try:
            mask = io.read_mask(mask_path)
        except io.FormatError as error:
            raise SequenceError(str(error)) from None
        if mask.shape != (self.height, self.width):
            raise SequenceError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, the frames are "
                                f"{self.width}x{self.height}")
        if not mask.any():
            raise SequenceError(f"{mask_path}: the mask is empty")
        depth = self.read(0).depth
        if not (mask & (depth > 0)).any():
            raise SequenceError(f"{mask_path}: no valid depth of {self.depth_path(frame_id)} inside the mask")
        return mask, mask_path
