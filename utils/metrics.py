"""The benchmark metrics of DeepDeform (docs/DESIGN.md 5.6), pooled over pairs.

Graph Error 3D: mean L2 error of the predicted node translations over all nodes of all pairs.
EPE 3D: mean L2 error of the predicted scene flow over the source pixels that have valid
ground-truth scene flow, valid depth (0 < z <= 6 m) and 4 valid anchors, over all pairs.
Both in millimetres. Sums and counts are kept per pair so that a split's numbers are exact
pooled means (not means of per-pair means).
"""
import csv
import io as text_io
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
from tqdm import tqdm

from dataset import io
from dataset.fileio import atomic_write_bytes

MAX_DEPTH = 6.0
# The reference code wrote predictions centre-cropped to sides divisible by this (640x448 of
# 640x480 frames), the flow network's stride.
NETWORK_MULTIPLE = 64
REFERENCE_ROW_MARGIN = 16


@dataclass
class PairErrors:
    name: str
    graph_error_sum: float     # metres, summed over nodes
    num_nodes: int
    epe_sum: float             # metres, summed over evaluated pixels
    num_pixels: int

    @property
    def graph_error_mm(self) -> float:
        return 1000.0 * self.graph_error_sum / self.num_nodes if self.num_nodes else float("nan")

    @property
    def epe_mm(self) -> float:
        return 1000.0 * self.epe_sum / self.num_pixels if self.num_pixels else float("nan")


def evaluation_mask(gt_scene_flow: np.ndarray, source_depth: np.ndarray,
                    pixel_anchors: np.ndarray) -> np.ndarray:
    """(H, W) bool: finite ground truth, depth in (0, 6] m, 4 valid anchors."""
    return (np.isfinite(gt_scene_flow).all(axis=0) & (source_depth > 0) & (source_depth <= MAX_DEPTH)
            & (pixel_anchors >= 0).all(axis=-1))


def pair_errors(name: str, pred_translations: np.ndarray, gt_deformations: np.ndarray,
                pred_scene_flow: np.ndarray, gt_scene_flow: np.ndarray, source_depth: np.ndarray,
                pixel_anchors: np.ndarray) -> PairErrors:
    """Errors of one pair. Shapes: translations (N, 3); scene flows (3, H, W); depth (H, W)
    metres; anchors (H, W, 4). Nodes whose ground truth is not finite are not counted."""
    node_ok = np.isfinite(gt_deformations).all(axis=1)
    graph = np.linalg.norm(pred_translations[node_ok].astype(np.float64)
                           - gt_deformations[node_ok].astype(np.float64), axis=1)
    mask = evaluation_mask(gt_scene_flow, source_depth, pixel_anchors)
    diff = pred_scene_flow[:, mask].astype(np.float64) - gt_scene_flow[:, mask].astype(np.float64)
    epe = np.linalg.norm(diff, axis=0)
    return PairErrors(name, float(graph.sum()), int(node_ok.sum()), float(epe.sum()), int(mask.sum()))


def pooled(errors: Iterable[PairErrors]):
    """(Graph Error 3D, EPE 3D) in mm over all pairs."""
    errors = list(errors)
    nodes = sum(e.num_nodes for e in errors)
    pixels = sum(e.num_pixels for e in errors)
    graph = 1000.0 * sum(e.graph_error_sum for e in errors) / nodes if nodes else float("nan")
    epe = 1000.0 * sum(e.epe_sum for e in errors) / pixels if pixels else float("nan")
    return graph, epe


def crop_rows_to(array: np.ndarray, height: int, width: Optional[int] = None, axis: int = 0) -> np.ndarray:
    """Centre-crops the image axes starting at `axis` to (height, width): a 448-row prediction
    of the reference code is compared with rows 16..463 of a 480-row ground truth."""
    full_h = array.shape[axis]
    full_w = array.shape[axis + 1]
    width = width or full_w
    top, left = (full_h - height) // 2, (full_w - width) // 2
    index = [slice(None)] * array.ndim
    index[axis] = slice(top, top + height)
    index[axis + 1] = slice(left, left + width)
    return array[tuple(index)]


def accepted_prediction_sizes(height: int, width: int):
    """(rows, columns) a scene-flow prediction of a height x width frame may have: the full
    frame (ours), or the reference code's centre crops: 16 rows off the top and the bottom
    (640x448 of 640x480) and sides rounded down to multiples of the network stride 64."""
    sizes = [(height, width)]
    for size in ((height - 2 * REFERENCE_ROW_MARGIN, width),
                 (height // NETWORK_MULTIPLE * NETWORK_MULTIPLE, width // NETWORK_MULTIPLE * NETWORK_MULTIPLE)):
        if min(size) > 0 and size not in sizes:
            sizes.append(size)
    return sizes


class EvaluationError(ValueError):
    """Predictions are missing or malformed; `problems` lists every one of them."""

    def __init__(self, problems):
        self.problems = list(problems)
        # One line, however many: scripts and logs read errors line by line.
        super().__init__(f"{len(self.problems)} missing or malformed prediction(s): "
                         + "; ".join(self.problems))


def evaluate_split(dataset_dir: str, split: str, predictions_dir: str, progress: bool = True):
    """Evaluates `generate.py` (or reference-code) predictions of a split with ground truth.

    Every pair is checked before any number is reported: a missing file, an unreadable one, a
    node count or frame size that does not fit the pair, or a non-finite prediction at an
    evaluated pixel is collected, and all of them are raised together as EvaluationError.
    Scene flow predictions may be at the full frame size, or centre-cropped as the reference code
    wrote them (`accepted_prediction_sizes`: 448 of 480 rows); any other size is listed as
    malformed. Returns the list of PairErrors.
    """
    labels = io.read_labels(io.labels_path(dataset_dir, split))
    problems, results = [], []
    for label in tqdm(labels, desc=f"evaluate {split}", disable=not progress, leave=False):
        name = io.pair_name(label)
        missing_gt = [k for k in ("scene_flow", "graph_node_deformations") if k not in label]
        if missing_gt:
            raise io.FormatError(f"pair {name}: the labels of split '{split}' have no ground truth "
                                 f"{missing_gt}; evaluation needs it")
        translations_path, flow_path = io.prediction_paths(predictions_dir, name)
        gt_nodes = io.read_graph_node_deformations(os.path.join(dataset_dir, label["graph_node_deformations"]))
        gt_flow = io.read_scene_flow(os.path.join(dataset_dir, label["scene_flow"]))
        depth = io.read_depth(os.path.join(dataset_dir, label["source_depth"]))
        anchors = io.read_pixel_anchors(os.path.join(dataset_dir, label["pixel_anchors"]))
        # The ground truth must agree with itself before predictions are measured against it.
        for key, size in (("scene_flow", gt_flow.shape[1:]), ("pixel_anchors", anchors.shape[:2])):
            if tuple(size) != depth.shape:
                raise io.FormatError(f"pair {name}: {os.path.join(dataset_dir, label[key])} is "
                                     f"{size[1]}x{size[0]}, the source depth "
                                     f"{os.path.join(dataset_dir, label['source_depth'])} "
                                     f"{depth.shape[1]}x{depth.shape[0]}")
        if gt_nodes.shape[0] != io.read_graph_nodes(os.path.join(dataset_dir, label["graph_nodes"])).shape[0]:
            raise io.FormatError(f"pair {name}: {os.path.join(dataset_dir, label['graph_node_deformations'])} "
                                 f"has {gt_nodes.shape[0]} rows, not one per graph node")
        pair_problems = []
        for path in (translations_path, flow_path):
            if not os.path.isfile(path):
                pair_problems.append(f"{name}: missing {path}")
        if pair_problems:
            problems += pair_problems
            continue
        try:
            translations, flow = io.read_prediction(predictions_dir, name)
        except io.FormatError as error:
            problems.append(f"{name}: {error}")
            continue
        if translations.shape[0] != gt_nodes.shape[0]:
            problems.append(f"{name}: {translations_path} has {translations.shape[0]} node "
                            f"translations, the graph has {gt_nodes.shape[0]} nodes")
            continue
        height, width = flow.shape[1:]
        sizes = accepted_prediction_sizes(*gt_flow.shape[1:])
        if (height, width) not in sizes:
            problems.append(f"{name}: {flow_path} is {width}x{height}; expected the frame's "
                            f"{sizes[0][1]}x{sizes[0][0]} or a centre crop of the reference code ("
                            + " or ".join(f"{w}x{h}" for h, w in sizes[1:]) + ")")
            continue
        if (height, width) != gt_flow.shape[1:]:
            gt_flow = crop_rows_to(gt_flow, height, width, axis=1)
            depth = crop_rows_to(depth, height, width)
            anchors = crop_rows_to(anchors, height, width)
        mask = evaluation_mask(gt_flow, depth, anchors)
        bad_pixels = int((~np.isfinite(flow[:, mask]).all(axis=0)).sum())
        if bad_pixels or not np.isfinite(translations).all():
            problems.append(f"{name}: non-finite predictions ({bad_pixels} evaluated pixels of "
                            f"{flow_path}, {int((~np.isfinite(translations)).any(axis=1).sum())} "
                            f"nodes of {translations_path})")
            continue
        results.append(pair_errors(name, translations, gt_nodes, flow, gt_flow, depth, anchors))
    if problems:
        raise EvaluationError(problems)
    return results


def write_evaluation(results, dataset_dir: str, split: str, predictions_dir: str) -> str:
    """Writes the per-pair table <predictions_dir>/evaluation_<split>.csv and the results
    evaluation_<split>.txt (each atomically); returns the two score lines
    ("Graph Error 3D (mm): X", "EPE 3D (mm): Y")."""
    graph_error, epe = pooled(results)
    table = text_io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["pair", "num_nodes", "graph_error_3d_mm", "num_pixels", "epe_3d_mm"])
    for r in results:
        writer.writerow([r.name, r.num_nodes, f"{r.graph_error_mm:.4f}", r.num_pixels, f"{r.epe_mm:.4f}"])
    atomic_write_bytes(os.path.join(predictions_dir, f"evaluation_{split}.csv"), table.getvalue().encode())
    summary = (f"Graph Error 3D (mm): {graph_error:.3f}\nEPE 3D (mm): {epe:.3f}\n")
    atomic_write_bytes(os.path.join(predictions_dir, f"evaluation_{split}.txt"),
                       (summary + f"pairs: {len(results)}\nnodes: {sum(r.num_nodes for r in results)}\n"
                        f"pixels: {sum(r.num_pixels for r in results)}\n"
                        f"dataset: {os.path.abspath(dataset_dir)} split {split}\n").encode())
    return summary
