"""The DeepDeform-format dataset reader: a torch Dataset over `<split>_graphs.json` (formats: io.py).

Each item is one source/target pair (shapes for H x W frames, N graph nodes, K edges per node):
    name                 str   `<seq_id>_<object_id>_<source_id>_<target_id>`
    source_color, target_color    (3, H, W) float32 RGB in [0, 1]
    source_points, target_points  (3, H, W) float32 back-projected depth, metres (0 = invalid)
    target_boundary      (H, W) bool   target pixels on a depth boundary
    intrinsics           (4,) float32  fx, fy, cx, cy (adjusted for the crop)
    nodes (N, 3) float32; edges (N, K) int64 (-1 = none); edges_weights (N, K) float32;
    clusters (N,) int64; num_nodes int
    pixel_anchors (H, W, 4) int64 (-1 = none); pixel_weights (H, W, 4) float32
  and, when the label has ground truth (the public test split has none):
    optical_flow (2, H, W) float32, NaN where unknown; scene_flow (3, H, W) float32, NaN where
    unknown; node_deformations (N, 3) float32.
`collate` pads the node arrays of a batch to its largest graph.
"""
import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset import io
from dataset.graph import GraphError, build_graph, check_graph
from model import image_proc
from options import DataOptions, GraphOptions

GROUND_TRUTH_KEYS = ("optical_flow", "scene_flow", "node_deformations")
NODE_KEYS = ("nodes", "edges", "edges_weights", "clusters", "node_deformations")


# DeepDeform-format depth is always uint16 millimetres: what to do when a file's is not.
DEPTH_UNITS_HINT = ("the DeepDeform format stores uint16 millimetres: convert the file (graphs of "
                    "frames in other units: create_graph_data.py --depth-scale)")


class DatasetError(ValueError):
    """A pair cannot be loaded: names the pair and the file or key at fault."""


def has_ground_truth(label: Dict) -> bool:
    return all(k in label for k in ("optical_flow", "scene_flow", "graph_node_deformations"))


def _nan_invalid(flow: np.ndarray) -> np.ndarray:
    """Any non-finite value (the official files use -inf) marks the whole pixel invalid."""
    invalid = ~np.isfinite(flow).all(axis=0)
    flow = flow.copy()
    flow[:, invalid] = np.nan
    return flow


class DeepDeformDataset(Dataset):
    """Pairs of one split. `require_ground_truth` makes a label without it an error."""

    def __init__(self, root: str, split: str, options: DataOptions = DataOptions(),
                 require_ground_truth: bool = False, augment: bool = False, seed: int = 0):
        self.root = root
        self.split = split
        self.options = options
        self.augment = augment
        self.seed = seed
        path = self.labels_file = io.labels_path(root, split)
        try:
            self.labels = io.read_labels(path)
        except io.FormatError as error:
            raise DatasetError(f"split '{split}' of {root}: {error}") from error
        if require_ground_truth:
            for label in self.labels:
                missing = [k for k in io.LABEL_GROUND_TRUTH_KEYS if k not in label]
                if missing:
                    raise DatasetError(f"pair {io.pair_name(label)} in {path}: label has no "
                                       f"ground truth keys {missing}")
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return io.pair_name(self.labels[index])

    def path(self, index: int, key: str) -> str:
        label = self.labels[index]
        if key not in label:
            raise DatasetError(f"pair {io.pair_name(label)}: label has no key '{key}'")
        return os.path.join(self.root, label[key])

    def _read(self, index: int, key: str, reader):
        try:
            return reader(self.path(index, key))
        except io.FormatError as error:
            raise DatasetError(f"pair {self.name(index)} ({key}): {error}") from error

    def __getitem__(self, index: int) -> Dict:
        label = self.labels[index]
        name = io.pair_name(label)
        try:
            intr = io.label_intrinsics(label, self.labels_file)
        except io.FormatError as error:
            raise DatasetError(str(error)) from error
        source_color = self._read(index, "source_color", io.read_color)
        target_color = self._read(index, "target_color", io.read_color)
        source_depth = self._read(index, "source_depth", io.read_depth)
        target_depth = self._read(index, "target_depth", io.read_depth)
        anchors = self._read(index, "pixel_anchors", io.read_pixel_anchors)
        weights = self._read(index, "pixel_weights", io.read_pixel_weights)
        shape = source_depth.shape
        for key, array in (("source_color", source_color), ("target_color", target_color),
                           ("target_depth", target_depth), ("pixel_anchors", anchors),
                           ("pixel_weights", weights)):
            if array.shape[:2] != shape:
                raise DatasetError(f"pair {name} ({key}): size {array.shape[:2]} differs from the "
                                   f"source depth's {shape} ({self.path(index, key)})")
        item = {
            "name": name, "index": index,
            "nodes": self._read(index, "graph_nodes", io.read_graph_nodes),
            "edges": self._read(index, "graph_edges", io.read_graph_edges).astype(np.int64),
            "edges_weights": self._read(index, "graph_edges_weights", io.read_graph_edges_weights),
            "clusters": self._read(index, "graph_clusters", io.read_graph_clusters)[:, 0].astype(np.int64),
            "source_color": source_color, "target_color": target_color,
            "source_depth": source_depth, "target_depth": target_depth,
            "pixel_anchors": anchors.astype(np.int64), "pixel_weights": weights,
        }
        num_nodes = item["nodes"].shape[0]
        for key, path_key in (("source_depth", "source_depth"), ("target_depth", "target_depth")):
            try:
                io.check_depth(item[key], self.path(index, path_key), hint=DEPTH_UNITS_HINT)
            except io.FormatError as error:
                raise DatasetError(f"pair {name} ({key}): {error}") from error
        if has_ground_truth(label):
            item["optical_flow"] = _nan_invalid(self._read(index, "optical_flow", io.read_optical_flow))
            item["scene_flow"] = _nan_invalid(self._read(index, "scene_flow", io.read_scene_flow))
            item["node_deformations"] = self._read(index, "graph_node_deformations",
                                                   io.read_graph_node_deformations)
            if item["node_deformations"].shape[0] != num_nodes:
                raise DatasetError(
                    f"pair {name}: {item['node_deformations'].shape[0]} node deformations for "
                    f"{num_nodes} nodes ({self.path(index, 'graph_node_deformations')})")
            for key in ("optical_flow", "scene_flow"):
                if item[key].shape[1:] != shape:
                    raise DatasetError(f"pair {name} ({key}): size {item[key].shape[1:]} differs "
                                       f"from the frames' {shape} ({self.path(index, key)})")
        try:
            check_graph(item["nodes"], item["edges"], item["edges_weights"], item["clusters"],
                        item["pixel_anchors"], item["pixel_weights"], item.get("node_deformations"),
                        {kind: self.path(index, kind) for kind in io.GRAPH_KINDS if kind in label})
        except GraphError as error:
            raise DatasetError(f"pair {name}: {error}") from error

        intr = self._crop(item, intr)
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            intr = self._augment(item, intr, rng)
        return finish_item(item, intr, self.options.boundary_distance)

    # ------------------------------------------------------------------------------------------

    def _crop(self, item: Dict, intr: Dict[str, float]) -> Dict[str, float]:
        height, width = item["source_depth"].shape
        out_h = self.options.crop_height or height
        out_w = self.options.crop_width or width
        if (out_h, out_w) == (height, width):
            return intr
        try:
            top, left = image_proc.center_crop_offsets(height, width, out_h, out_w)
        except ValueError as error:
            raise DatasetError(f"pair {item['name']}: {error}") from error
        for key in ("source_color", "target_color", "source_depth", "target_depth",
                    "pixel_anchors", "pixel_weights"):
            item[key] = item[key][top:top + out_h, left:left + out_w]
        for key in ("optical_flow", "scene_flow"):
            if key in item:
                item[key] = item[key][:, top:top + out_h, left:left + out_w]
        return image_proc.crop_intrinsics(intr, top, left)

    def _augment(self, item: Dict, intr: Dict[str, float], rng: np.random.Generator) -> Dict[str, float]:
        """Colour jitter of both frames, and a roll of the target camera about its optical axis
        (an exact, consistent change of the ground truth: a homography in the image)."""
        strength = self.options.color_jitter
        if strength > 0:
            for key in ("source_color", "target_color"):
                gain = 1 + strength * rng.uniform(-1, 1, size=3)
                bias = 0.5 * strength * rng.uniform(-1, 1) * 255
                item[key] = np.clip(item[key].astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
        max_angle = self.options.rotation_augmentation
        if max_angle > 0:
            angle = math.radians(rng.uniform(-max_angle, max_angle))
            rotate_target(item, intr, angle)
        return intr


def read_pair_files(source_color: str, source_depth: str, target_color: str, target_depth: str,
                    intrinsics: str, mask: Optional[str] = None,
                    graph_options: GraphOptions = GraphOptions(), name: str = "custom") -> Dict:
    """A dataset item (see the module docstring) of a pair given as files, not as a split: the
    deformation graph is built on the fly from the source depth (and the optional object mask;
    default: all valid depth). No ground truth. Raises ValueError naming the file whose size
    differs, GraphError, or io.FormatError."""
    intr = io.read_intrinsics(intrinsics)
    depth = io.read_depth(source_depth, graph_options.depth_scale)
    item = {"name": name, "source_color": io.read_color(source_color),
            "target_color": io.read_color(target_color), "source_depth": depth,
            "target_depth": io.read_depth(target_depth, graph_options.depth_scale)}
    object_mask = io.read_mask(mask) if mask else None
    for key, path, array in (("source_color", source_color, item["source_color"]),
                             ("target_color", target_color, item["target_color"]),
                             ("target_depth", target_depth, item["target_depth"]),
                             ("mask", mask, object_mask)):
        if array is not None and array.shape[:2] != depth.shape:
            raise ValueError(f"{path}: {array.shape[1]}x{array.shape[0]} differs from the "
                             f"source depth {source_depth} ({depth.shape[1]}x{depth.shape[0]})")
    if object_mask is not None and not (object_mask & (depth > 0)).any():
        raise GraphError(f"{mask}: no valid depth of {source_depth} inside the mask "
                         f"({int(object_mask.sum())} pixels)")
    for path, frame_depth, frame_mask in ((source_depth, depth, object_mask),
                                          (target_depth, item["target_depth"], None)):
        io.check_depth(frame_depth, path, graph_options.max_depth, mask=frame_mask,
                       scale=graph_options.depth_scale, hint="--graph-depth-scale")
    try:
        graph = build_graph(depth, intr, mask=object_mask, options=graph_options)
    except GraphError as error:
        where = source_depth if mask is None else f"{source_depth} within the mask {mask}"
        raise GraphError(f"{where}: {error}") from error
    item.update(nodes=graph.nodes, edges=graph.edges.astype(np.int64), edges_weights=graph.edges_weights,
                clusters=graph.clusters[:, 0].astype(np.int64),
                pixel_anchors=graph.pixel_anchors.astype(np.int64), pixel_weights=graph.pixel_weights)
    return finish_item(item, intr)


def finish_item(item: Dict, intr: Dict[str, float], boundary_distance: float = 0.1) -> Dict:
    """Numpy arrays of a pair (colours uint8 (H, W, 3), depths metres (H, W), graph arrays, and
    optionally ground truth) -> the tensors of a dataset item (see the module docstring)."""
    out = {"name": item["name"], "index": item.get("index", 0)}
    for key in ("source", "target"):
        color = torch.from_numpy(np.ascontiguousarray(item[f"{key}_color"])).permute(2, 0, 1)
        out[f"{key}_color"] = color.float() / 255.0
        depth = torch.from_numpy(np.ascontiguousarray(item[f"{key}_depth"], dtype=np.float32))
        out[f"{key}_points"] = image_proc.backproject_depth(depth, intr, math.inf).permute(2, 0, 1).contiguous()
    out["target_boundary"] = image_proc.depth_boundary_mask(
        out["target_points"].permute(1, 2, 0).contiguous(), 1, boundary_distance)
    out["intrinsics"] = torch.tensor([intr["fx"], intr["fy"], intr["cx"], intr["cy"]], dtype=torch.float32)
    for key in ("nodes", "edges", "edges_weights", "clusters", "pixel_anchors", "pixel_weights",
                "optical_flow", "scene_flow", "node_deformations"):
        if key in item:
            out[key] = torch.from_numpy(np.ascontiguousarray(item[key]))
    out["num_nodes"] = int(item["nodes"].shape[0])
    return out


def rotate_target(item: Dict, intr: Dict[str, float], angle: float) -> None:
    """Rolls the target camera by `angle` radians about its optical axis, in place.

    A rotation R about the optical axis keeps every depth and maps target pixel u to
    K R K^-1 u. So the target images are resampled through that homography (colour bilinear,
    depth nearest so that no depth is invented), target pixels of the optical flow move by it,
    and 3D targets X' = X + d become R X': scene flow d -> R (x + d) - x and node deformations
    g -> R (g + d) - g.
    """
    import cv2

    c, s = math.cos(angle), math.sin(angle)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    K = np.array([[intr["fx"], 0, intr["cx"]], [0, intr["fy"], intr["cy"]], [0, 0, 1]])
    H = K @ R @ np.linalg.inv(K)
    height, width = item["target_depth"].shape
    # warpPerspective samples dst(u) = src(H^-1 u) when given H without WARP_INVERSE_MAP.
    item["target_color"] = cv2.warpPerspective(item["target_color"], H, (width, height),
                                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    item["target_depth"] = cv2.warpPerspective(item["target_depth"], H, (width, height),
                                               flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    if "optical_flow" in item:
        _rotate_ground_truth(item, intr, H, R)


def _rotate_ground_truth(item: Dict, intr: Dict[str, float], H: np.ndarray, R: np.ndarray) -> None:
    height, width = item["target_depth"].shape
    with np.errstate(invalid="ignore"):   # unknown (non-finite) ground truth stays unknown
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        flow = item["optical_flow"].astype(np.float64)
        tx, ty = xs + flow[0], ys + flow[1]
        w = H[2, 0] * tx + H[2, 1] * ty + H[2, 2]
        nx = (H[0, 0] * tx + H[0, 1] * ty + H[0, 2]) / w
        ny = (H[1, 0] * tx + H[1, 1] * ty + H[1, 2]) / w
        item["optical_flow"] = np.stack((nx - xs, ny - ys)).astype(np.float32)
        points = image_proc.backproject_depth(torch.from_numpy(item["source_depth"]), intr,
                                              math.inf).numpy().astype(np.float64)
        moved = points + item["scene_flow"].transpose(1, 2, 0)
        item["scene_flow"] = ((moved @ R.T) - points).transpose(2, 0, 1).astype(np.float32)
        nodes = item["nodes"].astype(np.float64)
        item["node_deformations"] = (((nodes + item["node_deformations"]) @ R.T) - nodes).astype(np.float32)


def collate(items: List[Dict]) -> Dict:
    """Stacks a list of items; node arrays are padded to the largest graph (edges -1, rest 0)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    sizes = {tuple(item["source_color"].shape[1:]) for item in items}
    if len(sizes) > 1:
        raise DatasetError(f"pairs of one batch must share a frame size, found {sorted(sizes)} "
                           f"({[item['name'] for item in items]}); crop them with --crop-height/--crop-width")
    with_gt = [all(k in item for k in GROUND_TRUTH_KEYS) for item in items]
    if any(with_gt) and not all(with_gt):
        raise DatasetError("a batch mixes pairs with and without ground truth: "
                           f"{[item['name'] for item in items]}")
    max_nodes = max(item["num_nodes"] for item in items)
    batch: Dict = {"name": [item["name"] for item in items],
                   "index": torch.tensor([item["index"] for item in items]),
                   "num_nodes": torch.tensor([item["num_nodes"] for item in items])}
    for key in items[0]:
        if key in batch:
            continue
        if key in NODE_KEYS:
            fill = -1 if key == "edges" else 0
            padded = []
            for item in items:
                value = item[key]
                pad = torch.full((max_nodes - value.shape[0],) + tuple(value.shape[1:]), fill,
                                 dtype=value.dtype)
                padded.append(torch.cat((value, pad)))
            batch[key] = torch.stack(padded)
        else:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


def make_subset(dataset: DeepDeformDataset, shard: int, num_shards: int,
                limit: Optional[int] = None) -> List[int]:
    """Indices of shard `shard` of `num_shards` (every num_shards-th pair), up to `limit`."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), found {shard}")
    indices = list(range(shard, len(dataset), num_shards))
    return indices[:limit] if limit else indices
