"""Writing a pair in the DeepDeform layout, with the record that lets a re-run resume."""
import json
import os
from typing import Dict, Optional

from dataset import io
from options import GraphOptions, SyntheticOptions, to_dict

SOURCE_ID, TARGET_ID = "000000", "000001"
PAIR_RECORD = "pair.json"
# Stored in each pair's record and compared on resume: raise it whenever a change of this module
# changes what a pair looks like, so that old pairs are remade rather than mixed with new ones.
GENERATOR_VERSION = 1
# Settings that do not change a pair's content, left out of the record compared on resume.
_JOB_FIELDS = ("out", "split", "pairs", "workers")

def seq_id(index: int) -> str:
    return f"seq{index:04d}"


def graph_name(object_id: str, graph_options: GraphOptions) -> str:
    return f"{object_id}_{SOURCE_ID}_{TARGET_ID}_{graph_options.mode}_{graph_options.node_coverage:g}"


def write_pair(out: str, split: str, index: int, pair: Dict, options: SyntheticOptions,
               graph_options: GraphOptions = GraphOptions(), settings: Optional[Dict] = None) -> Dict:
    """Writes one pair made by `make_pair` under out/split/seqNNNN/ and returns its label
    (paths relative to `out`). The record pair.json ({"label", "settings"}) is written last."""
    seq = seq_id(index)
    folder = os.path.join(out, split, seq)
    rel = f"{split}/{seq}"
    obj = pair["object_id"]
    flow_name = f"{obj}_{SOURCE_ID}_{TARGET_ID}"
    name = graph_name(obj, graph_options)
    label = {
        "source_color": f"{rel}/color/{SOURCE_ID}.jpg",
        "source_depth": f"{rel}/depth/{SOURCE_ID}.png",
        "target_color": f"{rel}/color/{TARGET_ID}.jpg",
        "target_depth": f"{rel}/depth/{TARGET_ID}.png",
        **{kind: f"{rel}/{kind}/{name}.bin" for kind in (
            "graph_nodes", "graph_edges", "graph_edges_weights", "graph_node_deformations",
            "graph_clusters", "pixel_anchors", "pixel_weights")},
        "optical_flow": f"{rel}/optical_flow/{flow_name}.oflow",
        "scene_flow": f"{rel}/scene_flow/{flow_name}.sflow",
        "source_mask": f"{rel}/mask/{SOURCE_ID}_{obj}.png",
        "intrinsics": pair["intrinsics"],
        "seq_id": seq, "object_id": obj, "source_id": SOURCE_ID, "target_id": TARGET_ID,
        "motion": pair["motion"], "shape": pair["shape"],
    }
    if pair["real_frame"] is not None:
        label["real_frame"] = pair["real_frame"]
    label["stats"] = pair["stats"]

    def path(key):
        return os.path.join(out, label[key])

    io.write_color(path("source_color"), pair["source_color"], options.jpeg_quality)
    io.write_color(path("target_color"), pair["target_color"], options.jpeg_quality)
    io.write_depth(path("source_depth"), pair["source_depth"])
    io.write_depth(path("target_depth"), pair["target_depth"])
    io.write_mask(path("source_mask"), pair["source_mask"])
    io.write_flow(path("optical_flow"), pair["optical_flow"])
    io.write_flow(path("scene_flow"), pair["scene_flow"])
    pair["graph"].save(folder, name)
    io.write_intrinsics(os.path.join(folder, "intrinsics.txt"), pair["intrinsics"])
    if settings is None:
        settings = pair_settings(options, graph_options)
    record = {"label": label, "settings": settings}
    io.atomic_write_bytes(os.path.join(folder, PAIR_RECORD), (json.dumps(record, indent=1) + "\n").encode())
    return label


def pair_settings(options: SyntheticOptions, graph_options: GraphOptions) -> Dict:
    """The settings that decide a pair's content (compared on resume)."""
    values = {k: v for k, v in to_dict(options).items() if k not in _JOB_FIELDS}
    return {"generator": GENERATOR_VERSION, "synthetic": values, "graph": to_dict(graph_options)}


def finished_label(out: str, split: str, index: int, settings: Dict) -> Optional[Dict]:
    """The label of pair `index` when its record and all its files exist and it was made with
    `settings`; otherwise None."""
    folder = os.path.join(out, split, seq_id(index))
    try:
        with open(os.path.join(folder, PAIR_RECORD), "rb") as handle:
            record = json.loads(handle.read())
        label = record["label"]
        keys = io.LABEL_PATH_KEYS + io.LABEL_GROUND_TRUTH_KEYS + ("source_mask",)
        paths = [os.path.join(out, label[k]) for k in keys] + [os.path.join(folder, "intrinsics.txt")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("settings") != settings or not all(os.path.isfile(p) for p in paths):
        return None
    return label
