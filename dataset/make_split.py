"""A DeepDeform-format split from your own sequence folders (or DeepDeform's own sequences).

    python -m dataset.make_split --out D --split S --sequence SEQ --pair 000000:000110:shirt [...]

A sequence folder holds color/<frame>.jpg|png, depth/<frame>.png (uint16 mm) and intrinsics.txt,
optionally mask/<frame>_<object>.png and ground truth optical_flow/<object>_<src>_<tgt>.oflow and
scene_flow/<object>_<src>_<tgt>.sflow. The split gets D/S/<sequence name>/ with links to those
files (the source folder is never written to, so read-only data works), the graph files made by
our graph builder, and D/S_graphs.json. Then generate.py, evaluate.py and train.py run on it.
"""
import argparse
import glob
import os
import sys
from typing import Dict, List, Optional

from dataset import io
from dataset.graph import GraphError, run_split
from options import ArgumentParser, GraphOptions, add_options, check_flag, from_args


def _frame_file(sequence: str, kind: str, frame: str, suffixes) -> str:
    for suffix in suffixes:
        path = os.path.join(sequence, kind, frame + suffix)
        if os.path.isfile(path):
            return path
    raise io.FormatError(f"{os.path.join(sequence, kind, frame)}{'|'.join(suffixes)}: frame not found")


def _link(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(target), link)


def add_pair(root: str, split: str, sequence: str, source: str, target: str, obj: str,
             coverage: float, mode: str = "geodesic") -> Dict:
    """Links the pair's files into root/split/<sequence name>/ and returns its label."""
    seq_id = os.path.basename(os.path.normpath(sequence))
    rel = os.path.join(split, seq_id)
    seq_dir = os.path.join(root, rel)
    label = {"seq_id": seq_id, "object_id": obj, "source_id": source, "target_id": target}
    for key, kind, frame, suffixes in (("source_color", "color", source, (".jpg", ".png")),
                                       ("target_color", "color", target, (".jpg", ".png")),
                                       ("source_depth", "depth", source, (".png",)),
                                       ("target_depth", "depth", target, (".png",))):
        path = _frame_file(sequence, kind, frame, suffixes)
        name = os.path.join(kind, os.path.basename(path))
        _link(path, os.path.join(seq_dir, name))
        label[key] = os.path.join(rel, name)
    intr_path = os.path.join(sequence, "intrinsics.txt")
    label["intrinsics"] = io.read_intrinsics(intr_path)
    _link(intr_path, os.path.join(seq_dir, "intrinsics.txt"))
    mask = os.path.join(sequence, "mask", f"{source}_{obj}.png")
    if os.path.isfile(mask):
        _link(mask, os.path.join(seq_dir, "mask", os.path.basename(mask)))
        label["source_mask"] = os.path.join(rel, "mask", os.path.basename(mask))
    for key, kind, suffix in (("optical_flow", "optical_flow", ".oflow"), ("scene_flow", "scene_flow", ".sflow")):
        path = os.path.join(sequence, kind, f"{obj}_{source}_{target}{suffix}")
        if os.path.isfile(path):
            _link(path, os.path.join(seq_dir, kind, os.path.basename(path)))
            label[key] = os.path.join(rel, kind, os.path.basename(path))
    stem = f"{obj}_{source}_{target}_{mode}_{coverage:.2f}"
    for kind in io.GRAPH_KINDS:
        # Ground-truth node deformations come from the scene flow: only where there is one.
        if kind != io.GROUND_TRUTH_GRAPH_KIND or "scene_flow" in label:
            label[kind] = os.path.join(rel, kind, stem + ".bin")
    return label


def make_split(root: str, split: str, pairs: List[Dict[str, str]],
               graph_options: Optional[GraphOptions] = None) -> List[Dict]:
    """pairs: dicts with sequence, source, target, object. Writes labels and graph files."""
    graph_options = graph_options or GraphOptions()
    labels = [add_pair(root, split, p["sequence"], p["source"], p["target"], p["object"],
                       graph_options.node_coverage, graph_options.mode) for p in pairs]
    io.write_labels(io.labels_path(root, split), labels)
    _, failed = run_split(root, split, graph_options, overwrite=False)
    if failed:
        raise GraphError(f"{len(failed)} pair(s) without a graph: " + "; ".join(failed.values()))
    return labels


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to create or extend")
    parser.add_argument("--split", required=True, help="split name")
    parser.add_argument("--sequence", action="append", required=True,
                        help="sequence folder (repeat the flag for several; each --pair refers to "
                             "the last --sequence before it)")
    parser.add_argument("--pair", action="append", required=True,
                        help="SOURCE:TARGET[:OBJECT] frame ids (object default: the mask's, else 'object')")
    add_options(parser, GraphOptions, "graph")
    args = parser.parse_args(argv)
    # Pair each --pair with the nearest --sequence before it on the command line.
    raw = sys.argv[1:] if argv is None else argv
    pairs, sequence = [], None
    for i, token in enumerate(raw):
        if token == "--sequence":
            sequence = raw[i + 1]
        elif token == "--pair":
            parts = raw[i + 1].split(":")
            if len(parts) not in (2, 3) or sequence is None:
                parser.error(f"--pair {raw[i + 1]}: expected SOURCE:TARGET[:OBJECT] after a --sequence")
            obj = parts[2] if len(parts) == 3 else None
            if obj is None:
                masks = glob.glob(os.path.join(sequence, "mask", f"{parts[0]}_*.png"))
                obj = os.path.basename(masks[0])[len(parts[0]) + 1:-4] if masks else "object"
            pairs.append({"sequence": sequence, "source": parts[0], "target": parts[1], "object": obj})
    try:
        check_flag("--out", args.out, str, path="out_dir")
        for sequence in args.sequence:
            check_flag("--sequence", sequence, str, path="dir")
        labels = make_split(args.out, args.split, pairs, from_args(args, GraphOptions))
    except ValueError as error:   # FormatError, GraphError, OptionError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"split '{args.split}' with {len(labels)} pair(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
