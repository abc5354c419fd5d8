"""Readers and writers of the DeepDeform file formats (docs/DESIGN.md section 4), all little-endian.

Every reader checks the header against the file size and raises `FormatError` naming the file,
what was expected and what was found; every writer writes atomically (temporary file, then
rename), so an interrupted job never leaves a half file behind.

Layouts:
    .oflow / .sflow   uint32 W, uint32 H, uint32 C, float32 [C, H, W]   (non-finite = invalid)
    .flo              b"PIEH", int32 W, int32 H, float32 [H, W, 2]     (read as [2, H, W])
    graph_nodes, graph_node_deformations   uint32 N, float32 [N, 3]
    graph_edges        uint32 N, uint32 K, int32 [N, K]   (-1 = no edge)
    graph_edges_weights uint32 N, uint32 K, float32 [N, K]
    graph_clusters     uint32 N, uint32 1, int32 [N, 1]
    pixel_anchors      uint32 4, uint32 W, uint32 H, int32 [H, W, 4]   (-1 = none)
    pixel_weights      uint32 4, uint32 W, uint32 H, float32 [H, W, 4]
    depth PNG          uint16 millimetres, 0 = invalid  (read as float32 metres)
    intrinsics.txt     4x4 matrix: fx [0,0], fy [1,1], cx [0,2], cy [1,2]
"""
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from dataset.fileio import PathLike, atomic_open, atomic_write_bytes


class FormatError(ValueError):
    """A file is missing, truncated or not in the format its name promises."""


def _read_bytes(path: PathLike, what: str) -> bytes:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: {what} file not found")
    with open(path, "rb") as handle:
        return handle.read()


def _uint32s(data: bytes, path: PathLike, count: int, what: str) -> List[int]:
    if len(data) < 4 * count:
        raise FormatError(
            f"{os.fspath(path)}: {what} header needs {4 * count} bytes, file has {len(data)}"
        )
    return [int(v) for v in np.frombuffer(data, dtype="<u4", count=count)]


def _payload(data: bytes, offset: int, shape: Sequence[int], dtype: str, path: PathLike,
             what: str) -> np.ndarray:
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise FormatError(
            f"{os.fspath(path)}: {what} with header shape {tuple(shape)} needs {expected} bytes, "
            f"file has {len(data)} ({'truncated' if len(data) < expected else 'trailing data'})"
        )
    array = np.frombuffer(data, dtype=dtype, offset=offset, count=int(np.prod(shape)))
    return array.reshape(shape).astype(dtype[1:], copy=True)


def _check_array(array: np.ndarray, ndim: int, path: PathLike, what: str,
                 last_dim: Optional[int] = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != ndim or (last_dim is not None and array.shape[-1] != last_dim):
        want = f"{ndim} dims" + (f" with last dim {last_dim}" if last_dim is not None else "")
        raise ValueError(f"{os.fspath(path)}: {what} must have {want}, found shape {array.shape}")
    return array


# --------------------------------------------------------------------------------------------
# Flow


def read_flow(path: PathLike, channels: Optional[int] = None) -> np.ndarray:
    """Reads .oflow / .sflow (or Middlebury .flo) as float32 [C, H, W]."""
    data = _read_bytes(path, "flow")
    if os.fspath(path).lower().endswith(".flo"):
        if data[:4] != b"PIEH":
            raise FormatError(f"{os.fspath(path)}: .flo must start with b'PIEH', found {data[:4]!r}")
        if len(data) < 12:
            raise FormatError(f"{os.fspath(path)}: .flo header needs 12 bytes, file has {len(data)}")
        width, height = (int(v) for v in np.frombuffer(data, dtype="<i4", count=2, offset=4))
        if width < 0 or height < 0:
            raise FormatError(f"{os.fspath(path)}: .flo has negative size {width}x{height}")
        flow = _payload(data, 12, (height, width, 2), "<f4", path, ".flo flow")
        flow = np.ascontiguousarray(flow.transpose(2, 0, 1))
    else:
        width, height, num_channels = _uint32s(data, path, 3, "flow")
        flow = _payload(data, 12, (num_channels, height, width), "<f4", path, "flow")
    if channels is not None and flow.shape[0] != channels:
        raise FormatError(
            f"{os.fspath(path)}: expected {channels} flow channels, found {flow.shape[0]}"
        )
    return flow


def write_flow(path: PathLike, flow: np.ndarray) -> None:
    """Writes float32 [C, H, W] as .oflow/.sflow, or [2, H, W] as Middlebury .flo."""
    flow = _check_array(flow, 3, path, "flow").astype("<f4")
    if os.fspath(path).lower().endswith(".flo"):
        if flow.shape[0] != 2:
            raise ValueError(f"{os.fspath(path)}: .flo holds 2 channels, found {flow.shape[0]}")
        header = b"PIEH" + np.array([flow.shape[2], flow.shape[1]], dtype="<i4").tobytes()
        atomic_write_bytes(path, header + np.ascontiguousarray(flow.transpose(1, 2, 0)).tobytes())
        return
    header = np.array([flow.shape[2], flow.shape[1], flow.shape[0]], dtype="<u4").tobytes()
    atomic_write_bytes(path, header + np.ascontiguousarray(flow).tobytes())


def read_optical_flow(path: PathLike) -> np.ndarray:
    return read_flow(path, channels=2)


def read_scene_flow(path: PathLike) -> np.ndarray:
    return read_flow(path, channels=3)


# --------------------------------------------------------------------------------------------
# Graph binaries


def _read_rows(path: PathLike, what: str, dtype: str, has_k: bool, cols: Optional[int]) -> np.ndarray:
    """uint32 N, then (when has_k) uint32 K, then data [N, K]; without K the rows hold `cols`."""
    data = _read_bytes(path, what)
    if not has_k:
        (num,) = _uint32s(data, path, 1, what)
        return _payload(data, 4, (num, cols), dtype, path, what)
    num, k = _uint32s(data, path, 2, what)
    if cols is not None and k != cols:
        raise FormatError(f"{os.fspath(path)}: {what} must have {cols} column(s), header says {k}")
    return _payload(data, 8, (num, k), dtype, path, what)


def _write_rows(path: PathLike, array: np.ndarray, dtype: str, with_k: bool, what: str) -> None:
    array = _check_array(array, 2, path, what, 3 if not with_k else None).astype(dtype)
    header = [array.shape[0], array.shape[1]] if with_k else [array.shape[0]]
    atomic_write_bytes(path, np.array(header, dtype="<u4").tobytes() + array.tobytes())


def read_graph_nodes(path: PathLike) -> np.ndarray:
    """float32 [N, 3] node positions (metres)."""
    return _read_rows(path, "graph nodes", "<f4", False, 3)


def write_graph_nodes(path: PathLike, nodes: np.ndarray) -> None:
    _write_rows(path, nodes, "<f4", False, "graph nodes")


def read_graph_node_deformations(path: PathLike) -> np.ndarray:
    """float32 [N, 3] ground-truth (or predicted) node translations (metres)."""
    return _read_rows(path, "node deformations", "<f4", False, 3)


def write_graph_node_deformations(path: PathLike, deformations: np.ndarray) -> None:
    _write_rows(path, deformations, "<f4", False, "node deformations")


def read_graph_edges(path: PathLike) -> np.ndarray:
    """int32 [N, K] neighbour ids, -1 = no edge."""
    return _read_rows(path, "graph edges", "<i4", True, None)


def write_graph_edges(path: PathLike, edges: np.ndarray) -> None:
    _write_rows(path, edges, "<i4", True, "graph edges")


def read_graph_edges_weights(path: PathLike) -> np.ndarray:
    """float32 [N, K] edge weights."""
    return _read_rows(path, "graph edge weights", "<f4", True, None)


def write_graph_edges_weights(path: PathLike, weights: np.ndarray) -> None:
    _write_rows(path, weights, "<f4", True, "graph edge weights")


def read_graph_clusters(path: PathLike) -> np.ndarray:
    """int32 [N, 1] cluster id of each node."""
    return _read_rows(path, "graph clusters", "<i4", True, 1)


def write_graph_clusters(path: PathLike, clusters: np.ndarray) -> None:
    clusters = np.asarray(clusters).reshape(-1, 1)
    _write_rows(path, clusters, "<i4", True, "graph clusters")


def _read_pixel_image(path: PathLike, dtype: str, what: str) -> np.ndarray:
    data = _read_bytes(path, what)
    channels, width, height = _uint32s(data, path, 3, what)
    return _payload(data, 12, (height, width, channels), dtype, path, what)


def _write_pixel_image(path: PathLike, image: np.ndarray, dtype: str, what: str) -> None:
    image = _check_array(image, 3, path, what).astype(dtype)
    header = np.array([image.shape[2], image.shape[1], image.shape[0]], dtype="<u4").tobytes()
    atomic_write_bytes(path, header + np.ascontiguousarray(image).tobytes())


def read_pixel_anchors(path: PathLike) -> np.ndarray:
    """int32 [H, W, 4] node ids anchoring each pixel, -1 = none."""
    return _read_pixel_image(path, "<i4", "pixel anchors")


def write_pixel_anchors(path: PathLike, anchors: np.ndarray) -> None:
    _write_pixel_image(path, anchors, "<i4", "pixel anchors")


def read_pixel_weights(path: PathLike) -> np.ndarray:
    """float32 [H, W, 4] skinning weights of the anchors."""
    return _read_pixel_image(path, "<f4", "pixel weights")


def write_pixel_weights(path: PathLike, weights: np.ndarray) -> None:
    _write_pixel_image(path, weights, "<f4", "pixel weights")


# --------------------------------------------------------------------------------------------
# Images and intrinsics


def _decode_png(path: PathLike, what: str) -> np.ndarray:
    import cv2

    data = _read_bytes(path, what)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FormatError(f"{os.fspath(path)}: not a readable image ({what}, {len(data)} bytes)")
    return image


def read_depth(path: PathLike, scale: float = 1000.0) -> np.ndarray:
    """uint16 PNG of `scale` units per metre (1000: millimetres) -> float32 [H, W] metres,
    0 = invalid."""
    depth = _decode_png(path, "depth")
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise FormatError(
            f"{os.fspath(path)}: depth must be a single-channel uint16 PNG (millimetres), found "
            f"{depth.dtype} with shape {depth.shape}"
        )
    return depth.astype(np.float32) / float(scale)


# A plausible median depth of an RGB-D frame's valid pixels, in metres: depth sensors see from
# about 0.2 m; far below (or beyond the depth limit) the PNG is almost surely in another unit.
MIN_PLAUSIBLE_MEDIAN_DEPTH = 0.1


def check_depth(depth_m: np.ndarray, path: PathLike, max_depth: float = 6.0,
                mask: Optional[np.ndarray] = None, scale: float = 1000.0,
                hint: str = "--depth-scale") -> None:
    """Refuses a depth frame (H, W) metres without valid pixels (in `mask` when given) or whose
    median valid depth is not plausible for `scale` PNG units per metre; `hint` is how the user
    gives another scale, named in the message."""
    where = os.fspath(path)
    valid = np.isfinite(depth_m) & (depth_m > 0)
    if mask is not None:
        valid &= mask
    if not valid.any():
        raise FormatError(f"{where}: no valid depth (every pixel{' in the mask' if mask is not None else ''} "
                          f"is 0)")
    # Every 4th row and column tell the unit as well as all pixels do, at 1/16 of the cost.
    sample = depth_m[::4, ::4][valid[::4, ::4]]
    median = float(np.median(sample if sample.size >= 64 else depth_m[valid]))
    if not MIN_PLAUSIBLE_MEDIAN_DEPTH <= median <= max_depth:
        raise FormatError(
            f"{where}: median depth {median:.4g} m at {scale:g} PNG units per metre is not plausible "
            f"(expected {MIN_PLAUSIBLE_MEDIAN_DEPTH}..{max_depth:g} m); give the file's units per metre "
            f"with {hint}")


def write_depth(path: PathLike, depth_m: np.ndarray) -> None:
    """float [H, W] metres (non-finite or <= 0 = invalid) -> uint16 millimetre PNG."""
    import cv2

    depth_m = _check_array(depth_m, 2, path, "depth")
    valid = np.isfinite(depth_m) & (depth_m > 0)
    mm = np.where(valid, np.round(np.nan_to_num(depth_m) * 1000.0), 0)
    if mm.max(initial=0) > 65535:
        raise ValueError(f"{os.fspath(path)}: depth beyond 65.535 m cannot be stored in uint16 mm")
    ok, encoded = cv2.imencode(".png", mm.astype(np.uint16))
    if not ok:
        raise ValueError(f"{os.fspath(path)}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())


def read_color(path: PathLike) -> np.ndarray:
    """uint8 [H, W, 3] RGB. Decoded with Pillow, as the reference did (JPEG decoders differ)."""
    from PIL import Image, UnidentifiedImageError

    _read_bytes(path, "colour image")  # existence check with the common message
    try:
        with Image.open(os.fspath(path)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as error:
        raise FormatError(f"{os.fspath(path)}: not a readable colour image ({error})") from error


def write_color(path: PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """uint8 [H, W, 3] RGB -> JPEG (by .jpg/.jpeg suffix, at `quality`) or PNG."""
    from PIL import Image

    rgb = _check_array(rgb, 3, path, "colour image", 3)
    fmt = "JPEG" if os.fspath(path).lower().endswith((".jpg", ".jpeg")) else "PNG"
    with atomic_open(path, "wb") as handle:
        Image.fromarray(rgb.astype(np.uint8)).save(handle, format=fmt, quality=quality)


def read_mask(path: PathLike) -> np.ndarray:
    """Any PNG -> bool [H, W], true where non-zero (DeepDeform masks are 0 / 65535)."""
    mask = _decode_png(path, "mask")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0


def write_mask(path: PathLike, mask: np.ndarray) -> None:
    import cv2

    mask = _check_array(mask, 2, path, "mask")
    ok, encoded = cv2.imencode(".png", np.where(mask, 65535, 0).astype(np.uint16))
    if not ok:
        raise ValueError(f"{os.fspath(path)}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())


def read_intrinsics(path: PathLike) -> Dict[str, float]:
    """4x4 intrinsics.txt -> {fx, fy, cx, cy}."""
    text = _read_bytes(path, "intrinsics").decode("utf-8", errors="replace")
    try:
        matrix = np.array([[float(v) for v in line.split()] for line in text.splitlines() if line.strip()])
    except ValueError as error:
        raise FormatError(f"{os.fspath(path)}: intrinsics must be numbers ({error})") from error
    if matrix.ndim != 2 or matrix.shape[0] < 3 or matrix.shape[1] < 3:
        raise FormatError(
            f"{os.fspath(path)}: intrinsics must be a 4x4 (or 3x3) matrix, found shape {matrix.shape}"
        )
    intrinsics = {"fx": matrix[0, 0], "fy": matrix[1, 1], "cx": matrix[0, 2], "cy": matrix[1, 2]}
    if not (intrinsics["fx"] > 0 and intrinsics["fy"] > 0) or not np.isfinite(matrix[:3, :3]).all():
        raise FormatError(f"{os.fspath(path)}: intrinsics need finite values and positive focal "
                          f"lengths, found {intrinsics}")
    return {k: float(v) for k, v in intrinsics.items()}


def write_intrinsics(path: PathLike, intrinsics: Dict[str, float]) -> None:
    matrix = np.eye(4)
    matrix[0, 0], matrix[1, 1] = intrinsics["fx"], intrinsics["fy"]
    matrix[0, 2], matrix[1, 2] = intrinsics["cx"], intrinsics["cy"]
    lines = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in matrix) + "\n"
    atomic_write_bytes(path, lines.encode())


# --------------------------------------------------------------------------------------------
# Labels JSON

# The graph files of a pair, in the order labels list them: a label key and a folder name each
# (DIR/<kind>/NAME.bin). The last, the ground-truth node deformations, exists only where the
# pair has a ground-truth scene flow.
GRAPH_KINDS = ("graph_nodes", "graph_edges", "graph_edges_weights", "graph_clusters",
               "pixel_anchors", "pixel_weights", "graph_node_deformations")
GROUND_TRUTH_GRAPH_KIND = "graph_node_deformations"
LABEL_PATH_KEYS = ("source_color", "source_depth", "target_color", "target_depth") + GRAPH_KINDS[:-1]
LABEL_GROUND_TRUTH_KEYS = ("optical_flow", "scene_flow", GROUND_TRUTH_GRAPH_KIND)
LABEL_ID_KEYS = ("seq_id", "object_id", "source_id", "target_id")


def labels_path(root: PathLike, split: str) -> str:
    """`<root>/<split>_graphs.json`, the labels of one split."""
    return os.path.join(os.fspath(root), f"{split}_graphs.json")


def pair_name(label: Dict) -> str:
    """`<seq_id>_<object_id>_<source_id>_<target_id>`, the name of a pair's prediction files."""
    return "_".join(str(label[k]) for k in LABEL_ID_KEYS)


def read_labels(path: PathLike) -> List[Dict]:
    """Reads `<split>_graphs.json`; every entry must have the path, id and intrinsics keys, with
    string paths and numeric intrinsics (their values are checked per pair by
    `label_intrinsics`, so that one bad pair does not stop a split).

    Ground-truth keys (optical_flow, scene_flow, graph_node_deformations) are optional: the
    public test split has none.
    """
    data = _read_bytes(path, "labels")
    try:
        labels = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(f"{os.fspath(path)}: not valid JSON ({error})") from error
    if not isinstance(labels, list):
        raise FormatError(f"{os.fspath(path)}: expected a JSON list of pairs, found {type(labels).__name__}")
    for index, label in enumerate(labels):
        where = f"{os.fspath(path)}: entry {index}"
        if not isinstance(label, dict):
            raise FormatError(f"{where}: expected an object, found {type(label).__name__}")
        missing = [k for k in LABEL_PATH_KEYS + LABEL_ID_KEYS + ("intrinsics",) if k not in label]
        if missing:
            raise FormatError(f"{where} ({label.get('seq_id', '?')}): missing keys {missing}")
        not_paths = [k for k in LABEL_PATH_KEYS + LABEL_GROUND_TRUTH_KEYS
                     if k in label and not (isinstance(label[k], str) and label[k])]
        if not_paths:
            raise FormatError(f"{where} ({pair_name(label)}): {not_paths[0]} must be a file path, "
                              f"found {label[not_paths[0]]!r}")
        intr = label["intrinsics"]
        if not isinstance(intr, dict) or any(k not in intr for k in ("fx", "fy", "cx", "cy")):
            raise FormatError(f"{where} ({pair_name(label)}): intrinsics must have fx, fy, cx, cy")
        if any(isinstance(intr[k], bool) or not isinstance(intr[k], (int, float))
               for k in ("fx", "fy", "cx", "cy")):
            raise FormatError(f"{where} ({pair_name(label)}): intrinsics must be numbers, found {intr}")
    return labels


def label_intrinsics(label: Dict, where: str) -> Dict[str, float]:
    """{fx, fy, cx, cy} of a label, refused (naming `where`, e.g. the labels file, and the pair)
    unless the focal lengths are positive and every value finite."""
    intr = {k: float(label["intrinsics"][k]) for k in ("fx", "fy", "cx", "cy")}
    if not all(np.isfinite(v) for v in intr.values()) or intr["fx"] <= 0 or intr["fy"] <= 0:
        raise FormatError(f"{where}: pair {pair_name(label)}: intrinsics need finite values and "
                          f"positive fx, fy; found {intr}")
    return intr


def write_labels(path: PathLike, labels: List[Dict]) -> None:
    atomic_write_bytes(path, (json.dumps(labels, indent=1) + "\n").encode())


# --------------------------------------------------------------------------------------------
# Predictions (what generate.py writes and evaluate.py reads), one pair `<name>` per file pair:
#     <dir>/<name>_node_translations.bin   graph_node_deformations layout, one row per graph node
#     <dir>/<name>_sceneflow.sflow         (3, H, W) scene flow, -inf where not predicted


def prediction_paths(predictions_dir: PathLike, name: str):
    """(node translations path, scene flow path) of pair `name` in `predictions_dir`."""
    predictions_dir = os.fspath(predictions_dir)
    return (os.path.join(predictions_dir, f"{name}_node_translations.bin"),
            os.path.join(predictions_dir, f"{name}_sceneflow.sflow"))


def write_prediction(predictions_dir: PathLike, name: str, translations: np.ndarray,
                     scene_flow: np.ndarray) -> None:
    """translations (N, 3); scene_flow (3, H, W) with NaN where not predicted (written -inf).
    Each file is written atomically."""
    translations_path, flow_path = prediction_paths(predictions_dir, name)
    scene_flow = np.where(np.isfinite(scene_flow), scene_flow, -np.inf).astype(np.float32)
    write_flow(flow_path, scene_flow)
    write_graph_node_deformations(translations_path, np.asarray(translations).astype(np.float32))


def read_prediction(predictions_dir: PathLike, name: str):
    """(translations (N, 3) float32, scene flow (3, H, W) float32) of pair `name`; FormatError
    naming the file when one is missing or malformed."""
    translations_path, flow_path = prediction_paths(predictions_dir, name)
    return read_graph_node_deformations(translations_path), read_scene_flow(flow_path)


# --------------------------------------------------------------------------------------------
# Triangle meshes (PLY): what the sequence generator writes as ground truth (gt/mesh.ply) and
# a sequence reconstruction writes per frame (OUT/frames/NNNNNN.ply).
#     ply / format binary_little_endian 1.0 / element vertex V (float x, y, z) /
#     element face F (list uchar int vertex_indices) / end_header, then the data.
# The reader also takes ASCII and big-endian files and extra vertex properties (normals,
# colours), as other tools write them; faces must be triangles.

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def write_ply(path: PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """vertices (V, 3) float (stored float32, metres), faces (F, 3) int vertex ids -> binary
    little-endian PLY, written atomically."""
    vertices = np.asarray(vertices)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"{os.fspath(path)}: vertices must be (V, 3), found shape {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"{os.fspath(path)}: faces must be (F, 3), found shape {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= vertices.shape[0]):
        raise ValueError(f"{os.fspath(path)}: face vertex ids must lie in [0, {vertices.shape[0]}), found "
                         f"[{faces.min()}, {faces.max()}]")
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {vertices.shape[0]}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {faces.shape[0]}\nproperty list uchar int vertex_indices\nend_header\n")
    rows = np.empty(faces.shape[0], dtype=[("n", "u1"), ("ids", "<i4", (3,))])
    rows["n"] = 3
    rows["ids"] = faces
    with atomic_open(path, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(vertices.astype("<f4").tobytes())
        handle.write(rows.tobytes())


def _ply_header(data: bytes, where: str):
    """(format, [(element name, count, [(property, type) or (property, count type, item type)])],
    offset of the data) of a PLY file's bytes."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise FormatError(f"{where}: not a PLY file (expected a 'ply' ... 'end_header' header)")
    newline = data.find(b"\n", end)
    offset = len(data) if newline < 0 else newline + 1
    fmt, elements = None, []
    for line in data[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], words[2], words[3]))
        elif words[0] == "property" and elements and len(words) == 3:
            elements[-1][2].append((words[2], words[1]))
        else:
            raise FormatError(f"{where}: cannot read the PLY header line {line!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise FormatError(f"{where}: PLY format must be binary_little_endian, binary_big_endian or ascii, "
                          f"found {fmt}")
    return fmt, elements, offset


def read_ply(path: PathLike):
    """A triangle-mesh PLY -> (vertices (V, 3) float32, faces (F, 3) int64). FormatError naming
    the file when it is not a PLY, lacks x/y/z, has non-triangle faces or ids out of range."""
    where = os.fspath(path)
    data = _read_bytes(path, "PLY mesh")
    fmt, elements, offset = _ply_header(data, where)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise FormatError(f"{where}: no 'element vertex' in the PLY header")
    order = "<" if fmt == "binary_little_endian" else ">"
    vertices = faces = None
    if fmt == "ascii":
        lines = data[offset:].decode("ascii", errors="replace").split("\n")
        row = 0
    for name, count, properties in elements:
        if any(len(p) == 2 and p[1] not in _PLY_TYPES for p in properties) or \
                any(len(p) == 3 and (p[1] not in _PLY_TYPES or p[2] not in _PLY_TYPES) for p in properties):
            raise FormatError(f"{where}: unknown PLY property type in element {name}")
        lists = [p for p in properties if len(p) == 3]
        if fmt == "ascii":
            try:
                values = [[float(v) for v in line.split()] for line in lines[row:row + count]]
            except ValueError as error:
                raise FormatError(f"{where}: element {name}: not numbers ({error})") from error
            row += count
            if len(values) < count:
                raise FormatError(f"{where}: element {name}: expected {count} rows, found {len(values)}")
            if name == "vertex":
                columns = [p[0] for p in properties]
                if lists or not all(c in columns for c in "xyz") or any(len(v) != len(columns) for v in values):
                    raise FormatError(f"{where}: vertex rows must hold x, y, z among {len(columns)} scalars")
                table = np.array(values, dtype=np.float64).reshape(count, len(columns))
                vertices = table[:, [columns.index(c) for c in "xyz"]].astype(np.float32)
            elif name == "face":
                if len(properties) != 1 or not lists or any(len(v) != 4 or v[0] != 3 for v in values):
                    raise FormatError(f"{where}: faces must be triangles (rows '3 i j k')")
                faces = np.array(values, dtype=np.int64).reshape(count, 4)[:, 1:]
            continue
        if lists and not (name == "face" and len(properties) == 1):
            raise FormatError(f"{where}: element {name}: list properties are read only as the face's one "
                              "vertex_indices list")
        if lists:
            _, count_type, item_type = lists[0]
            dtype = np.dtype([("n", order + _PLY_TYPES[count_type]), ("ids", order + _PLY_TYPES[item_type], (3,))])
        else:
            dtype = np.dtype([(p[0], order + _PLY_TYPES[p[1]]) for p in properties])
        size = dtype.itemsize * count
        if offset + size > len(data):
            raise FormatError(f"{where}: element {name}: expected {size} bytes of data at offset {offset}, "
                              f"found {len(data) - offset} (truncated, or faces that are not triangles)")
        table = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += size
        if name == "vertex":
            if not all(c in dtype.names for c in "xyz"):
                raise FormatError(f"{where}: vertex element lacks x, y or z")
            vertices = np.stack([table[c] for c in "xyz"], axis=1).astype(np.float32)
        elif name == "face":
            if not lists or (table["n"] != 3).any():
                raise FormatError(f"{where}: faces must be triangles (a list of 3 vertex ids each)")
            faces = table["ids"].astype(np.int64)
    if faces is None:
        faces = np.zeros((0, 3), np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= vertices.shape[0]):
        raise FormatError(f"{where}: face vertex ids must lie in [0, {vertices.shape[0]}), found "
                          f"[{faces.min()}, {faces.max()}]")
    return vertices, faces
