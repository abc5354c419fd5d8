"""Every option of the project, with its default and help text, in one typed place.

Each group is a dataclass; `add_options(parser, Group)` turns its fields into command-line flags
(`node_coverage` -> `--node-coverage`, booleans get `--flag / --no-flag`), and
`from_args(args, Group)` builds the dataclass back from the parsed flags. Scripts never redefine
a flag; checkpoints store these dataclasses as dicts so a model is rebuilt from the file alone.
"""
import argparse
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def opt(default: Any, help: str, choices: Optional[tuple] = None, *,  # noqa: A002
        ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
        lt: Optional[float] = None, pattern: Optional[str] = None, expect: Optional[str] = None,
        path: Optional[str] = None) -> Any:
    """A dataclass field with help text and what values it accepts, checked by `check_options`
    wherever options are built (flags, stored dicts):

    choices          the allowed values
    ge, gt, le, lt   bounds of a number (every float must also be finite)
    pattern, expect  a regular expression a string must match in full, and how to say it
    path             (flags only) "file" or "dir": must exist; "out_dir": a folder that is, or
                     can be made, writable (not a file); "out_file": a file that can be written
    None is accepted only as the default of an Optional field.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "ge": ge, "gt": gt,
                                            "le": le, "lt": lt, "pattern": pattern,
                                            "expect": expect, "path": path})


# ----------------------------------------------------------------------------------------------
# Deformation graph (docs/DESIGN.md 5.1)


@dataclass
class GraphOptions:
    node_coverage: float = opt(0.05, "node coverage in metres: every kept vertex lies within this "
                                     "distance of a node; also the sigma of edge and skinning weights", gt=0)
    max_depth: float = opt(6.0, "depths beyond this many metres are treated as invalid", gt=0)
    depth_scale: float = opt(1000.0, "depth PNG units per metre (1000: millimetres, as DeepDeform; "
                                     "5000 for TUM-style files)", gt=0)
    max_triangle_edge: float = opt(0.05, "mesh from depth: longest triangle edge in metres", gt=0)
    erosion_iterations: int = opt(10, "mesh erosion passes before node sampling", ge=0)
    erosion_min_neighbors: int = opt(4, "erosion drops faces touching a vertex with fewer incident faces", ge=0)
    num_neighbors: int = opt(8, "graph edges per node", ge=1)
    num_anchors: int = opt(4, "anchor nodes per pixel (the pixel_anchors format and the solver "
                              "hold exactly 4)", choices=(4,))
    max_influence: Optional[float] = opt(None, "geodesic search radius in metres for edges and "
                                               "anchors (default: 2 x node coverage)", gt=0)
    min_edges: int = opt(2, "nodes with fewer edges are removed (repeatedly)", ge=0)
    min_cluster_size: int = opt(3, "connected components with fewer nodes are removed", ge=1)
    mode: str = opt("geodesic", "distance for edges and anchors: along the mesh or straight-line",
                    choices=("geodesic", "euclidean"))

    @property
    def influence_radius(self) -> float:
        return self.max_influence if self.max_influence is not None else 2.0 * self.node_coverage


# ----------------------------------------------------------------------------------------------
# Gauss-Newton solver (docs/DESIGN.md 5.3)


# Limits of the machine a run is on, and the choice between two solves of the same linear
# system: a checkpoint stores them (they made it) but never imposes them on a later run, whose
# flags or defaults hold (the shipped checkpoint was made under the old 500-node dense limit).
SOLVER_MACHINE_FIELDS = ("max_nodes", "max_memory_gb", "linear_solver", "sparse_min_nodes")


@dataclass
class SolverOptions:
    iterations: int = opt(3, "Gauss-Newton iterations (3 in training, as the reference)", ge=1)
    flow_weight: float = opt(0.001, "weight of the projective flow term (squared pixels)", ge=0)
    depth_weight: float = opt(1.0, "weight of the depth term (squared metres)", ge=0)
    arap_weight: float = opt(1.0, "weight of the as-rigid-as-possible term (squared metres)", ge=0)
    lm_damping: float = opt(0.1, "Levenberg-Marquardt damping added to the diagonal of J^T J", ge=0)
    max_matches: int = opt(0, "randomly keep at most this many matches per sample (0 = all)", ge=0)
    edge_weighting: bool = opt(False, "weight ARAP edges by K x their graph edge weight "
                                      "(otherwise every edge has weight 1)")
    remove_clusters: bool = opt(True, "drop graph clusters (connected components) whose total "
                                      "match weight is below --min-cluster-weight")
    min_cluster_weight: float = opt(200.0, "least total match weight (correspondence weight x "
                                           "skinning weight, summed) a cluster needs to be solved", ge=0)
    min_nodes: int = opt(4, "a sample with fewer solvable nodes is marked failed", ge=1)
    max_nodes: int = opt(1_000_000, "a sample with more nodes is marked failed (a cap of your "
                                    "own; the working memory is checked with --max-memory-gb)", ge=1)
    linear_solver: str = opt("auto", "linear solve of each Gauss-Newton step: dense Cholesky of "
                                     "the 6N x 6N system (memory N^2, time N^3), block-Jacobi "
                                     "preconditioned conjugate gradients on the block-sparse "
                                     "system (memory linear in nodes and matches), or auto: dense "
                                     "up to --sparse-min-nodes nodes, sparse above",
                             choices=("auto", "dense", "sparse"))
    sparse_min_nodes: int = opt(200, "auto linear solver: graphs with more nodes than this (padded "
                                     "over the batch) use the sparse solve", ge=0)
    cg_max_iterations: int = opt(1000, "sparse solve: most conjugate-gradient iterations per "
                                       "Gauss-Newton step; a step that does not reach "
                                       "--cg-tolerance within them marks its sample failed", ge=1)
    cg_tolerance: float = opt(1e-6, "sparse solve: conjugate gradients stop when the residual "
                                    "norm is below this fraction of the right-hand side's", gt=0, lt=1)
    max_memory_gb: float = opt(8.0, "a sample whose estimated linear-solve working memory (dense: "
                                    "~3 x (6N)^2 values; sparse: the 6x6 blocks and term lists) "
                                    "exceeds this many GiB is marked failed instead of running "
                                    "out of memory", gt=0)
    max_depth: float = opt(6.0, "source points and target depths beyond this many metres are ignored", gt=0)
    convergence_tolerance: float = opt(1e-6, "a sample has converged (and stops updating) when "
                                             "its largest increment is below this (radians / metres)", ge=0)
    robust_loss: str = opt("cauchy", "robust reweighting of matches by their reprojection error "
                                     "from the second iteration on (iteratively reweighted least "
                                     "squares); none is the reference's plain least squares",
                           choices=("none", "huber", "cauchy"))
    robust_scale: float = opt(3.0, "scale of the robust loss, in pixels of reprojection error", gt=0)
    icp_weight: float = opt(0.0, "weight of the dense point-to-plane depth term (squared metres) "
                                 "over the problem's ICP associations (fuse.py, default 300 there: "
                                 "rendered model pixels against the live depth at their projection); "
                                 "0 = off", ge=0)
    icp_robust_scale: float = opt(0.01, "scale of the robust loss (--robust-loss) of the "
                                        "point-to-plane terms, in metres", gt=0)


# ----------------------------------------------------------------------------------------------
# Data (dataset/deepdeform.py)


@dataclass
class DataOptions:
    crop_height: int = opt(0, "centre-crop frames to this height, intrinsics adjusted (0 = full)", ge=0)
    crop_width: int = opt(0, "centre-crop frames to this width, intrinsics adjusted (0 = full)", ge=0)
    color_jitter: float = opt(0.0, "training augmentation: random gain/bias of each colour "
                                   "frame, as a fraction (0 = off)", ge=0, le=1)
    rotation_augmentation: float = opt(0.0, "training augmentation: roll the target camera by up "
                                            "to this many degrees, ground truth kept consistent", ge=0, le=180)
    boundary_distance: float = opt(0.1, "target pixels next to a 3D jump larger than this many "
                                        "metres (or to missing depth) form the boundary mask", gt=0)


# ----------------------------------------------------------------------------------------------
# The tracker (model/tracker.py)


@dataclass
class TrackerOptions:
    flow: str = opt("dis", "correspondence front-end: the learned flow network and weighting head, "
                           "OpenCV's DIS optical flow, or the ground-truth optical flow (oracle)",
                    choices=("network", "dis", "gt"))
    network_flow: str = opt("pwc", "what the network front-end is: the PWC-Net flow and its "
                                   "weighting head, or the hybrid: DIS and PWC-Net flows blended "
                                   "per pixel and weighted by a small learned head that sees both "
                                   "(model/hybrid.py); stored in checkpoints",
                            choices=("pwc", "hybrid"))
    hybrid_passes: int = opt(1, "hybrid front-end: 2 = a second pass after the first solve: "
                                "the target frame is resampled by the first solve's motion "
                                "(projected into the target view), DIS and PWC-Net run again on "
                                "the small remaining motion, the head blends and weights those "
                                "flows, composed with the first, and the solver runs again; "
                                "stored in checkpoints (1 = one pass)", ge=1, le=2)
    use_mask: bool = opt(True, "network front-end: weight correspondences by the weighting head "
                               "(otherwise every weight is 1)")
    network_input: str = opt("crop", "frames whose sides are not multiples of 64: centre-crop "
                                     "them for the network (as the reference does for 640x480) or "
                                     "pad them by replicating the border; flow outside a crop is "
                                     "unknown, the warp still covers every anchored pixel",
                             choices=("crop", "pad"))
    network_width: int = opt(0, "resize frames to this width (aspect kept) before the network, "
                                "0 = run it at the frames' own size; stored in checkpoints, so a "
                                "network trained at 320 px runs at 320 px on any frame", ge=0)
    cost_volume: str = opt("normalized", "flow network cost volume: the reference's mean of "
                                         "feature products (its weights need it), or the same of "
                                         "features normalised per pixel, which trains from scratch "
                                         "where the product volume stalls; a checkpoint's own "
                                         "choice always wins when it is loaded",
                           choices=("product", "normalized"))
    dis_preset: str = opt("medium", "DIS optical flow preset; fine: medium down to full resolution "
                                    "with denser patches and more iterations (sharper, slower; "
                                    "model/dis_flow.py)", choices=("ultrafast", "fast", "medium", "fine"))
    dis_normalize: float = opt(0.0, "dis front-end: match locally contrast-normalised grey images, "
                                    "each pixel against the Gaussian (this sigma, pixels) mean and "
                                    "spread around it, so that shading which stays with the light "
                                    "while the surface turns does not hold the flow back; finds "
                                    "displacements up to about 30 px only (the coarse structure "
                                    "DIS's coarse levels need is gone): for tracking from a warm "
                                    "start, not for pairs far apart "
                                    "(model/image_proc.local_contrast; 0 = plain grey; fuse.py: 5)",
                               ge=0)
    dis_passes: int = opt(1, "dis front-end: DIS runs per pair; each later run matches the source "
                             "to the target resampled by the flow so far and adds what it finds "
                             "(DIS measures a weak texture's motion short: a later run measures "
                             "the rest; fuse.py: 2)", ge=1, le=4)
    dis_weights: str = opt("photometric", "DIS correspondence weights: all 1, or from the colour "
                                          "difference between a pixel and its match (of the "
                                          "normalised grey with --dis-normalize)",
                           choices=("uniform", "photometric"))
    dis_consistency: float = opt(2.0, "DIS: drop matches whose forward flow and the backward flow "
                                      "at the match disagree by more than this many pixels "
                                      "(0 = keep all)", ge=0)
    dis_min_consistent: float = opt(0.05, "DIS: skip that check for a pair when fewer than this "
                                          "fraction of its anchored pixels pass it (DIS's backward "
                                          "flow failed there, not the matches; the solver's robust "
                                          "loss still down-weights outliers)", ge=0, le=1)
    max_depth_jump: float = opt(0.05, "reject a match whose 4 target pixels differ in depth by "
                                      "more than this many metres (a depth edge)", gt=0)


# ----------------------------------------------------------------------------------------------
# A run of a script: which data, which device, how many threads (generate.py, example_viz.py and
# train.py share these flags; a script may override a default or leave a flag out with `only`)


@dataclass
class RunOptions:
    dataset_dir: str = opt("data/synthetic", "dataset root holding <split>_graphs.json", path="dir")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)",
                      pattern=r"auto|cpu|cuda(:\d+)?", expect="auto, cpu, cuda or cuda:N")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)", ge=0)


# ----------------------------------------------------------------------------------------------
# Training (train.py)


@dataclass
class TrainOptions(RunOptions):
    stage: str = opt("0_flow", "training stage (a preset of the options below, see STAGES)",
                     choices=("0_flow", "1_solver", "2_mask", "3_refine", "4_hybrid"))
    train_split: str = opt("train", "split to train on (needs ground truth)")
    val_split: str = opt("val", "split to validate on (needs ground truth); empty = no validation")
    experiment: str = opt("default", "experiment name: outputs go to WORKSPACE/EXPERIMENT/")
    workspace: str = opt("experiments", "folder of all experiments", path="out_dir")
    init: Optional[str] = opt(None, "start from this checkpoint's weights (ours or the reference's)", path="file")
    resume: bool = opt(False, "continue WORKSPACE/EXPERIMENT/checkpoints/last.pt (model, optimiser, "
                              "scheduler, RNG state, iteration)")
    max_iterations: int = opt(30000, "stop after this many optimiser steps", ge=1)
    batch_size: int = opt(4, "pairs per optimiser step (per process under torchrun)", ge=1)
    optimizer: str = opt("sgd", "optimiser", choices=("sgd", "adam"))
    learning_rate: float = opt(1e-5, "initial learning rate", gt=0)
    momentum: float = opt(0.9, "SGD momentum (Adam: beta1)", ge=0, lt=1)
    weight_decay: float = opt(0.0, "weight decay", ge=0)
    lr_step: int = opt(10000, "multiply the learning rate by --lr-gamma every this many steps", ge=1)
    lr_gamma: float = opt(0.1, "learning-rate decay factor of each step", gt=0)
    use_flow_loss: bool = opt(True, "robust L1 flow loss on every pyramid level")
    use_graph_loss: bool = opt(False, "L2 loss on node translations (needs the solver)")
    use_warp_loss: bool = opt(False, "L2 loss on warped points (needs the solver)")
    use_mask_loss: bool = opt(False, "BCE loss on correspondence weights (a baseline)")
    flow_loss_type: str = opt("robust", "flow loss: the reference's robust L1 (fine-tuning), or "
                                        "PWC-Net's multiscale end-point error (training from scratch)",
                              choices=("robust", "epe"))
    flow_loss_weight: float = opt(5.0, "weight of the flow loss", ge=0)
    graph_loss_weight: float = opt(2.0, "weight of the graph loss", ge=0)
    warp_loss_weight: float = opt(2.0, "weight of the warp loss", ge=0)
    mask_loss_weight: float = opt(1000.0, "weight of the mask loss", ge=0)
    run_solver: bool = opt(False, "run the Gauss-Newton solver in training steps")
    freeze_flow: bool = opt(False, "keep the flow network fixed")
    freeze_mask: bool = opt(True, "keep the weighting head fixed")
    train_max_matches: int = opt(10000, "matches per sample the solver keeps in training steps "
                                        "(random subset, as the reference)", ge=0)
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = off)", ge=0)
    max_bad_steps: int = opt(10, "a step whose loss or gradient is not finite is skipped with a "
                                 "warning; this many in a row stop the run", ge=1)
    val_every: int = opt(2000, "validate every this many steps (and at the end)", ge=1)
    val_pairs: int = opt(100, "validate on at most this many pairs of the split (0 = all)", ge=0)
    log_every: int = opt(20, "write losses to TensorBoard every this many steps", ge=1)
    checkpoint_every: int = opt(500, "write checkpoints/last.pt every this many steps", ge=1)
    num_workers: int = opt(1, "data-loading worker processes", ge=0)
    seed: int = opt(0, "random seed (data order, augmentation, match subsampling)", ge=0)


# Each stage is a named preset of TrainOptions / TrackerOptions / SolverOptions fields
# (docs/DESIGN.md 5.5); flags given on the command line override the preset.
STAGES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "0_flow": {"train": dict(use_flow_loss=True, use_graph_loss=False, use_warp_loss=False,
                             run_solver=False, freeze_flow=False, freeze_mask=True),
               "tracker": dict(use_mask=False)},
    "1_solver": {"train": dict(use_flow_loss=True, use_graph_loss=True, use_warp_loss=True,
                               run_solver=True, freeze_flow=False, freeze_mask=True),
                 "tracker": dict(use_mask=False)},
    "2_mask": {"train": dict(use_flow_loss=False, use_graph_loss=True, use_warp_loss=True,
                             run_solver=True, freeze_flow=True, freeze_mask=False),
               "tracker": dict(use_mask=True)},
    "3_refine": {"train": dict(use_flow_loss=True, use_graph_loss=True, use_warp_loss=True,
                               run_solver=True, freeze_flow=False, freeze_mask=False),
                 "tracker": dict(use_mask=True)},
    # The hybrid front-end's head alone, through the solver (PWC-Net and its weighting head frozen).
    "4_hybrid": {"train": dict(use_flow_loss=False, use_graph_loss=True, use_warp_loss=True,
                               run_solver=True, freeze_flow=True, freeze_mask=True),
                 "tracker": dict(use_mask=False, network_flow="hybrid")},
}
# In every stage the network runs the reference's plain least squares during training.
TRAIN_SOLVER_DEFAULTS: Dict[str, Any] = {"robust_loss": "none", "iterations": 3}


# ----------------------------------------------------------------------------------------------
# Command-line plumbing


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, group: Type, title: Optional[str] = None,
                defaults: Optional[Dict[str, Any]] = None, prefix: str = "",
                only: Optional[Sequence[str]] = None, required: Sequence[str] = ()):
    """Adds one flag per field of the dataclass `group` (defaults may be overridden). A prefix
    (e.g. "graph_") keeps two groups with a field of the same name apart: --graph-max-depth.
    `only` limits the flags to these fields (`from_args` gives the others their defaults);
    fields in `required` must be given on the command line. Returns the argument group (a
    script may add its own flags to it)."""
    section = parser.add_argument_group(title or group.__name__)
    hints = get_type_hints(group)
    for f in dataclasses.fields(group):
        if only is not None and f.name not in only:
            continue
        kind = hints[f.name]
        if get_origin(kind) is not None and type(None) in get_args(kind):  # Optional[X]
            kind = next(a for a in get_args(kind) if a is not type(None))
        default = (defaults or {}).get(f.name, f.default)
        bounds = _bounds(f.metadata)
        help_text = f.metadata.get("help", "") + f" (default: {default}{'; ' + bounds if bounds else ''})"
        name = prefix + f.name
        if f.name in required:
            section.add_argument(_flag(name), dest=name, type=kind, required=True,
                                 choices=f.metadata.get("choices"), help=f.metadata.get("help", ""))
        elif kind is bool:
            section.add_argument(_flag(name), dest=name, default=default, help=help_text,
                                 action=argparse.BooleanOptionalAction)
        else:
            section.add_argument(_flag(name), dest=name, type=kind, default=default,
                                 choices=f.metadata.get("choices"), help=help_text)
    return section


class OptionError(ValueError):
    """An option value outside what its field accepts; the message names the flag (or the stored
    option and its file), the value and what is allowed, on one line."""


# Pairs of fields of one group where the first may not exceed the second.
ORDERED_FIELDS: Dict[str, List[Tuple[str, str]]] = {
    "SolverOptions": [("min_nodes", "max_nodes")],
    "SyntheticOptions": [("large_flow_min", "large_flow_max"), ("min_distance", "max_distance")],
    "ResidualOptions": [("base_resolution", "max_resolution")],
    "SequenceResidualOptions": [("base_resolution", "max_resolution")],
}


def _bounds(meta: Dict[str, Any]) -> str:
    """The bounds of a field's metadata in words, e.g. "> 0 and <= 1" ("" without bounds)."""
    return " and ".join(f"{sign} {meta[key]:g}" for key, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"),
                                                                  ("le", "<="))
                        if meta.get(key) is not None)


def _allowed(meta: Dict[str, Any], kind: type) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    if meta.get("expect"):
        return meta["expect"]
    noun = {int: "an integer", float: "a finite number", bool: "true or false"}.get(kind, "a string")
    return noun + (" " + _bounds(meta) if _bounds(meta) else "")


def _value_problem(value: Any, kind: type, meta: Dict[str, Any]) -> Optional[str]:
    """What is wrong with `value` for a field of type `kind` (None when it is fine)."""
    if kind is bool:
        return None if isinstance(value, bool) else "not true or false"
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "not an integer"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "not a number"
        if not math.isfinite(value):
            return "not finite"
    if kind is str and not isinstance(value, str):
        return "not a string"
    if meta.get("choices") and value not in meta["choices"]:
        return "not allowed"
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        return "not allowed"
    for key, test in (("gt", lambda v, b: v > b), ("ge", lambda v, b: v >= b),
                      ("lt", lambda v, b: v < b), ("le", lambda v, b: v <= b)):
        if meta.get(key) is not None and not test(value, meta[key]):
            return "out of range"
    return None


def _field_type(group: Type, name: str) -> Tuple[type, bool]:
    """(the field's type, whether it is Optional)."""
    kind = get_type_hints(group)[name]
    if get_origin(kind) is not None and type(None) in get_args(kind):
        return next(a for a in get_args(kind) if a is not type(None)), True
    return kind, False


def _path_problem(path: str, kind: str) -> Optional[str]:
    if kind == "file":
        return None if os.path.isfile(path) else ("a folder, not a file" if os.path.isdir(path)
                                                  else "file not found")
    if kind == "dir":
        return None if os.path.isdir(path) else ("a file, not a folder" if os.path.exists(path)
                                                 else "folder not found")
    if kind == "out_file":
        if os.path.isdir(path):
            return "is a folder, not a file"
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return "cannot be written"
        problem = output_dir_problem(os.path.dirname(os.path.abspath(path)))
        return f"its folder {problem}" if problem else None
    return output_dir_problem(path)


def output_dir_problem(path: str) -> Optional[str]:
    """Why `path` cannot be (made) a writable output folder, or None. Creates nothing: the
    nearest existing folder on the way must be writable."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "is a file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "is a folder that cannot be written"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be made: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be made: {parent} cannot be written"
    return None


def check_options(options: Any, prefix: str = "", source: Optional[str] = None,
                  paths: bool = False) -> Any:
    """Checks every field of a group against its metadata (see `opt`) and the ordered pairs of
    ORDERED_FIELDS; raises OptionError on the first bad one. `source` names where stored values
    came from (a checkpoint), else the message names the flag. `paths` also checks path fields."""
    group = type(options)

    def name_of(f_name: str) -> str:
        return f"{source}: stored option {f_name}" if source else _flag(prefix + f_name)

    for f in dataclasses.fields(group):
        value = getattr(options, f.name)
        kind, optional = _field_type(group, f.name)
        if value is None:
            if optional:
                continue
            raise OptionError(f"{name_of(f.name)}: a value is required")
        if f.metadata.get("path"):
            if paths:
                problem = _path_problem(str(value), f.metadata["path"])
                if problem:
                    raise OptionError(f"{name_of(f.name)} {value}: {problem}")
            continue
        problem = _value_problem(value, kind, f.metadata)
        if problem:
            raise OptionError(f"{name_of(f.name)} {value}: {problem}; expected "
                              f"{_allowed(f.metadata, kind)}")
    for low, high in ORDERED_FIELDS.get(group.__name__, []):
        if getattr(options, low) > getattr(options, high):
            raise OptionError(f"{name_of(low)} {getattr(options, low)} is greater than "
                              f"{name_of(high)} {getattr(options, high)}")
    return options


def from_args(args: argparse.Namespace, group: Type[T], prefix: str = "") -> T:
    """Builds the dataclass `group` from parsed flags added by `add_options` (same prefix) and
    checks it (OptionError naming the flag); fields left out of the parser (`only`) keep their
    defaults."""
    options = group(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(group)
                       if hasattr(args, prefix + f.name)})
    return check_options(options, prefix, paths=True)


def to_dict(options: Any) -> Dict[str, Any]:
    return dataclasses.asdict(options)


def from_dict(group: Type[T], values: Dict[str, Any], source: str = "stored options") -> T:
    """Rebuilds `group` from a stored dict (ignoring keys that no longer exist) and checks it;
    `source` (e.g. the checkpoint's path) is named in an OptionError."""
    names = {f.name for f in dataclasses.fields(group)}
    return check_options(group(**{k: v for k, v in values.items() if k in names}), source=source)


def check_flag(flag: str, value: Any, kind: type, **meta: Any) -> Any:
    """Checks a script's own flag (one not in a group) with the same rules as `opt`'s fields;
    None passes (an unset optional flag)."""
    if value is None:
        return value
    if meta.get("path"):
        problem = _path_problem(str(value), meta["path"])
        if problem:
            raise OptionError(f"{flag} {value}: {problem}")
        return value
    problem = _value_problem(value, kind, meta)
    if problem:
        raise OptionError(f"{flag} {value}: {problem}; expected {_allowed(meta, kind)}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `PROG: error: MESSAGE (see --help)`."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# Synthetic data (docs/DESIGN.md 5.8, dataset/synthetic/)


@dataclass
class SyntheticOptions:
    out: str = opt("data/synthetic", "dataset root: writes OUT/<split>_graphs.json and OUT/<split>/seqNNNN/", path="out_dir")
    split: str = opt("train", "split name (train, val, test, ...); also mixed into each pair's seed")
    pairs: int = opt(100, "number of source/target pairs (finished pairs of an earlier run are kept)", ge=1)
    seed: int = opt(0, "random seed; pair i is drawn from a generator seeded by (seed, split, i)", ge=0)
    workers: int = opt(1, "worker processes (results do not depend on it)", ge=1)
    width: int = opt(640, "image width in pixels (real frames are resized to it)", ge=64)
    height: int = opt(480, "image height in pixels (real frames are resized to it)", ge=48)
    focal: float = opt(0.9, "procedural scenes: focal length in units of the image width "
                            "(DeepDeform: 575.5 / 640)", gt=0)
    shapes: str = opt("cloth,bump,cylinder,blob", "procedural surface families to draw from, "
                                                  "comma-separated")
    motions: str = opt("bend,twist,rbf,bulge,large", "motion families, comma-separated; pair i "
                                                     "gets the (i mod count)-th")
    motion_scale: float = opt(1.0, "multiplies every motion magnitude (angles, shifts, bulges); "
                                   "not the large family's target image motion", ge=0)
    large_flow_min: float = opt(30.0, "large motion: least mean optical flow in pixels at 640 px "
                                      "width (scaled with the width)", gt=0)
    large_flow_max: float = opt(60.0, "large motion: greatest mean optical flow in pixels at 640 px "
                                      "width (scaled with the width)", gt=0)
    min_distance: float = opt(0.8, "procedural object: nearest distance of its centre, metres", gt=0)
    max_distance: float = opt(2.5, "procedural object: farthest distance of its centre, metres", gt=0)
    depth_noise: float = opt(1.0, "scale of the depth noise sigma(z) = 1.2 mm + 1.9 mm/m^2 "
                                  "(z - 0.4 m)^2 (0 = noise-free)", ge=0)
    holes: float = opt(1.0, "scale of the number of missing-depth blobs and of the dropout at "
                            "depth discontinuities (0 = none)", ge=0)
    grazing_angle: float = opt(80.0, "depth is missing where the view ray meets the surface more "
                                     "than this many degrees away from its normal", gt=0, le=90)
    illumination: float = opt(1.0, "strength of the brightness and colour change between source "
                                   "and target (0 = none)", ge=0)
    jpeg_quality: int = opt(90, "JPEG quality of the colour images", ge=1, le=100)
    textures: str = opt("procedural", "procedural objects' textures: procedural (printed-fabric "
                                      "like), photos (crops of the photographs bundled with "
                                      "scikit-image, which is optional: pip install "
                                      "scikit-image) or mixed (either, even odds)",
                        choices=("procedural", "photos", "mixed"))
    real_frames: Optional[str] = opt(None, "deform the objects of real RGB-D frames instead of "
                                           "procedural surfaces: a folder with color/NAME.jpg|png, "
                                           "depth/NAME.png (uint16 mm), intrinsics.txt and optional "
                                           "mask/NAME_OBJECT.png", path="dir")
    real_depth_threshold: Optional[float] = opt(None, "real frames without a mask: the object is "
                                                      "the largest region nearer than this many "
                                                      "metres (default: automatic, Otsu)", gt=0)


# ----------------------------------------------------------------------------------------------
# Synthetic sequences (dataset/synthetic_sequence/)


@dataclass
class SequenceOptions:
    out: str = opt("data/sequence", "sequence folder: writes color/, depth/, mask/, intrinsics.txt and "
                                     "gt/ directly in it", path="out_dir")
    frames: int = opt(40, "number of frames (a longer run of the same settings extends a sequence: "
                          "the motion is a function of the frame index)", ge=1)
    seed: int = opt(0, "random seed: the object, its texture, the background, the motion and the "
                       "sensor noise all follow from it", ge=0)
    width: int = opt(640, "image width in pixels (a --background frame is resized to it)", ge=64)
    height: int = opt(480, "image height in pixels (a --background frame is resized to it)", ge=48)
    focal: float = opt(0.9, "procedural background: focal length in units of the image width "
                            "(DeepDeform: 575.5 / 640)", gt=0)
    object: str = opt("cloth", "the deforming object: a cloth-like sheet, or a closed body-like "
                               "blob", choices=("cloth", "blob"))
    motion: str = opt("bend,twist,bulge,turn,drift", "motion components, comma-separated: bend, "
                      "twist, bulge (local bumps), turn (rigid turn that brings unseen surface "
                      "into view), drift (translation)")
    motion_scale: float = opt(1.0, "multiplies every motion amplitude (angles, bulges, shifts, "
                                   "wrinkles)", ge=0)
    speed: float = opt(1.0, "multiplies every motion's rate (1: a bend or twist cycle takes "
                            "60-120 frames, the turn about 40-60)", gt=0)
    detail: bool = opt(False, "add travelling wrinkles of 2.5-5 cm wavelength, finer than a 5 cm "
                              "deformation graph can express")
    size: float = opt(0.6, "object size in metres (sheet width, or body height)", gt=0)
    distance: float = opt(1.4, "distance of the object's centre from the camera in metres "
                               "(a --background frame may move it nearer)", gt=0)
    spacing: float = opt(0.005, "vertex spacing of the object's mesh (the ground truth) in metres", gt=0)
    textures: Optional[str] = opt(None, "folder of images (jpg, png) to texture the object with, "
                                        "one drawn per seed (default: a procedural print, or "
                                        "--photos)", path="dir")
    photos: bool = opt(False, "texture the object with a crop of a photograph bundled with "
                              "scikit-image (optional: pip install scikit-image) instead of a "
                              "procedural print; ignored with --textures")
    background: Optional[str] = opt(None, "a real RGB-D frame as the static background: a folder "
                                          "with color/NAME.jpg|png, depth/NAME.png (uint16 mm) and "
                                          "intrinsics.txt (default: a procedural room)", path="dir")
    background_frame: Optional[str] = opt(None, "--background: the frame NAME to use (default: the "
                                                "first)")
    depth_noise: float = opt(1.0, "scale of the depth noise sigma(z) = 1.2 mm + 1.9 mm/m^2 "
                                  "(z - 0.4 m)^2 (0 = noise-free)", ge=0)
    holes: float = opt(1.0, "scale of the number of missing-depth blobs and of the dropout at "
                            "depth discontinuities (0 = none)", ge=0)
    grazing_angle: float = opt(80.0, "depth is missing where the view ray meets the surface more "
                                     "than this many degrees away from its normal", gt=0, le=90)
    illumination: float = opt(0.0, "strength of a random brightness flicker from frame to frame "
                                   "(0 = constant lighting, camera noise only)", ge=0)
    jpeg_quality: int = opt(90, "JPEG quality of the colour images", ge=1, le=100)


@dataclass
class PairExportOptions:
    sequence: str = opt("data/sequence", "a sequence written by python -m dataset.synthetic_sequence",
                        path="dir")
    source: int = opt(0, "source frame index", ge=0)
    target: int = opt(1, "target frame index", ge=0)
    out: str = opt("data/sequence_pairs", "dataset root of the pair: writes OUT/<split>_graphs.json "
                                          "(adding to the pairs listed there) and "
                                          "OUT/<split>/seqNNNN/", path="out_dir")
    split: str = opt("val", "split name of the pair")
    index: int = opt(0, "pair number: the pair is written to OUT/<split>/seqNNNN with NNNN = INDEX "
                        "(an existing pair of that number is replaced)", ge=0)

# ----------------------------------------------------------------------------------------------
# 4D hash-grid residual deformer (docs/DESIGN.md 5.7, model/residual.py)


@dataclass
class HashFieldOptions:
    """What the per-pair deformer (ResidualOptions) and the sequence field
    (SequenceResidualOptions) share: the hash encoding, the MLP, the bound, the data terms
    against an RGB-D observation, the optimiser's step size, threads and seed. Flags
    --residual-* (scripts add them with prefix="residual_")."""

    levels: int = opt(8, "hash encoding: resolution levels L", ge=1)
    features: int = opt(2, "hash encoding: features per level F", choices=(1, 2, 4, 8))
    log2_table_size: int = opt(15, "hash encoding: 2^T table rows per level (a pair has "
                               "about 50k points, so a small table rarely collides "
                               "and keeps each Adam step cheap)", ge=4, le=24)
    base_resolution: int = opt(4, "hash encoding: cells per axis of the coarsest level "
                               "over the object's bounding cube", ge=1)
    max_resolution: int = opt(128, "hash encoding: cells per axis of the finest level "
                              "(128 over a 60 cm object: 5 mm cells)", ge=1)
    margin: float = opt(0.1, "margin in metres added on every side of the source "
                        "object's bounding box before normalising it to [0, 1]", ge=0)
    hidden: int = opt(64, "width of the MLP's hidden layers", ge=1)
    layers: int = opt(2, "number of hidden layers of the MLP", ge=1)
    max: float = opt(0.03, "largest residual displacement in metres, per axis "
                     "(max * tanh of the MLP output)", gt=0)
    learning_rate: float = opt(1e-2, "Adam learning rate of the table and the MLP", gt=0)
    plane_weight: float = opt(3.0, "weight of the point-to-plane distance to the target "
                              "surface at the warped point's projection", ge=0)
    plane_scale: float = opt(0.005, "scale in metres of the robust (Geman-McClure) "
                             "point-to-plane term", gt=0)
    target_smoothing: float = opt(1.0, "sigma in pixels of the edge-aware Gaussian "
                                  "smoothing of the target surface before the "
                                  "point-to-plane term (depth noise; 0 = raw)", ge=0)
    occlusion: float = opt(0.03, "the point-to-plane and colour terms ignore a point "
                           "whose depth differs from the target depth at its "
                           "projection by more than this many metres (occluded "
                           "or an outlier)", gt=0)
    color_weight: float = opt(1.0, "weight of the colour term (source colour against "
                              "the target colour at the projection)", ge=0)
    color_scale: float = opt(0.1, "scale of the robust (Geman-McClure) colour term, in "
                             "units of the [0, 1] colour range", gt=0)
    magnitude_weight: float = opt(0.01, "weight of the squared residual (keeps it small)", ge=0)
    threads: int = opt(1, "CPU threads torch uses during the fit (then restored; 0 = "
                       "leave torch's setting): a step's tensors have a few thousand "
                       "rows, so thread hand-offs cost more than they save, and on a "
                       "busy machine far more (40 steps: 1.6 s with 1 thread, 16 s "
                       "with 2 on a 2-core machine with one core taken)", ge=0)
    seed: int = opt(0, "seed of the table initialisation and the point sampling", ge=0)


@dataclass
class ResidualOptions(HashFieldOptions):
    """The per-pair deformer (model/residual.py). Flags --residual-*."""

    iterations: int = opt(150, "Adam steps of the fit per pair (a fixed budget)", ge=1)
    time_budget: float = opt(5.0, "stop the fit of a pair after this many seconds (setup "
                             "included; at least one step is taken) even if iterations "
                             "remain (0 = no limit)", ge=0)
    points: int = opt(2048, "source points drawn per step (with their right and lower "
                      "neighbours for the smoothness term)", ge=1)
    match_weight: float = opt(1.0, "weight of the correspondence term (distance to the "
                              "matches' target points, times the match weights)", ge=0)
    match_scale: float = opt(0.01, "scale in metres of the robust (Geman-McClure) "
                             "correspondence term", gt=0)
    smoothness_weight: float = opt(50.0, "weight of the squared difference between "
                                   "neighbouring source pixels of the refined warp's "
                                   "detail (its part not in the low-passed graph "
                                   "warp)", ge=0)
    flow_blur: float = opt(8.0, "sigma in pixels (of a 640-pixel-wide frame; scaled with "
                           "the width) of the low-pass of the graph warp's scene "
                           "flow that the smoothness term keeps (0 = smooth the "
                           "residual itself)", ge=0)
    neighbor_distance: float = opt(0.02, "neighbouring pixels farther apart than this "
                                   "many metres (a depth edge) are not smoothed "
                                   "together", gt=0)


@dataclass
class SequenceResidualOptions(HashFieldOptions):
    """One field d(x_c, t) over a whole sequence (fusion/residual.py). Flags --residual-*."""

    log2_table_size: int = opt(17, "hash encoding: 2^T table rows per level (the surface "
                               "swept over the sequence fills a 3D slab of the 4D "
                               "grid, far more cells than one pair)", ge=4, le=24)
    max: float = opt(0.05, "largest residual displacement in metres, per axis "
                     "(max * tanh of the MLP output); a fused surface can be further from "
                     "the truth than a pair's graph warp", gt=0)
    occlusion: float = opt(0.05, "the point-to-plane and colour terms ignore a vertex whose "
                           "depth differs from the frame's depth at its projection by more "
                           "than this many metres (occluded, or off the object); on fused "
                           "reconstructions 5 cm recovered more than 3 cm (BENCHMARKS.md)", gt=0)
    iterations: int = opt(1500, "Adam steps of the fit over the whole sequence", ge=1)
    time_budget: float = opt(0.0, "stop the fit after this many seconds even if "
                             "iterations remain (0 = no limit); the checkpoint keeps "
                             "the step reached, --resume goes on from it", ge=0)
    frames_per_step: int = opt(4, "frames drawn per Adam step (a mini-batch of frames)", ge=1)
    points: int = opt(1024, "canonical vertices drawn per frame and step, among those "
                      "the frame sees", ge=1)
    smoothness_weight: float = opt(0.5, "weight of the squared difference of the residual "
                                   "between neighbouring canonical vertices (mesh "
                                   "edges), millimetres", ge=0)
    temporal_weight: float = opt(0.5, "weight of the squared difference of the residual "
                                 "at a vertex between the drawn frame and its previous "
                                 "(or next) frame, millimetres", ge=0)
    final_learning_rate: float = opt(0.1, "the learning rate decays exponentially to this "
                                     "fraction of --residual-learning-rate at the last step",
                                     gt=0, le=1)
    pin_reference: bool = opt(False, "pin the field at the first frame: d(x, t) = f(x, t) - "
                              "f(x, t0), exactly 0 there (its graph-only mesh is kept); "
                              "by default d is free at every frame, so that it can also "
                              "correct the fused canonical surface itself")
    checkpoint_every: int = opt(250, "write OUT/residual.pt (atomically) every this many "
                                "steps, and at the end", ge=1)
    log_every: int = opt(10, "TensorBoard scalars every this many steps", ge=1)
    video: bool = opt(True, "also write OUT/fusion_refined.mp4 (input, refined mesh, overlay per "
                            "frame) beside OUT/preview_refined.png")


# ----------------------------------------------------------------------------------------------
# Non-rigid fusion of a sequence (docs/DESIGN.md 5.9, fusion/, fuse.py)


@dataclass
class FusionOptions:
    sequence: Optional[str] = opt(None, "sequence folder: color/, depth/, mask/, intrinsics.txt (DeepDeform "
                                        "layout); required but with --residual-only, which reads the "
                                        "folder OUT/fusion_options.json records", path="dir")
    out: str = opt("fusion_out", "output folder: canonical.ply, frames/, nodes.npz, frames.csv, "
                                 "preview.png, fusion.mp4, state.pt", path="out_dir")
    object: Optional[str] = opt(None, "object name: the first frame's mask is mask/NNNNNN_<object>.png")
    mask: Optional[str] = opt(None, "object mask PNG of the first frame (default: its mask in mask/)",
                              path="file")
    frames: Optional[str] = opt(None, "frames to fuse, START:END[:STEP] in input frame numbers "
                                      "(END exclusive; default: all)", pattern=r"\d*:\d*(:\d+)?",
                                expect="START:END[:STEP]")
    voxel_size: float = opt(0.005, "TSDF voxel size in metres", gt=0)
    truncation: float = opt(0.025, "TSDF truncation in metres (less than 8 voxels: one block)", gt=0)
    weight_cap: float = opt(64.0, "largest integration weight of a voxel (older frames fade)", gt=0)
    node_coverage: float = opt(0.05, "deformation graph node spacing and skinning sigma, metres", gt=0)
    anchor_candidates: int = opt(16, "nearest nodes of each voxel block among which every voxel "
                                     "finds its anchors", ge=4, le=64)
    max_anchor_distance: float = opt(1.2, "voxels whose nearest node is farther than this many "
                                          "node coverages are not integrated (no reliable warp)", gt=0)
    dual_quaternion: bool = opt(False, "blend node motions as dual quaternions instead of linearly")
    oracle_motion: bool = opt(False, "oracle study: node motions from the synthetic sequence's "
                                     "gt/ instead of tracking")
    tracking: str = opt("model", "what each frame is tracked against: the model rendered at the "
                                 "previous motion (model), the previous input frame (previous), or "
                                 "the latest keyframe's input frame (keyframe: the first frame and "
                                 "every --texture-keyframes frames after; the solve starts from that "
                                 "frame's motion)",
                        choices=("model", "previous", "keyframe"))
    max_match_distance: float = opt(0.05, "drop a correspondence whose target point lies farther "
                                          "than this many metres from its (rendered) source point", gt=0)
    max_normal_angle: float = opt(60.0, "drop a correspondence whose source and target normals "
                                        "differ by more than this many degrees", gt=0, le=180)
    refine_border: int = opt(10, "refine the flow within this many pixels of the rendered model's "
                                 "silhouette by Lucas-Kanade over the model's own pixels (there the "
                                 "flow's patches mix in the static background and measure the motion "
                                 "short); every 2nd pixel, the others there are dropped; not with "
                                 "--flow gt; 0 = off", ge=0)
    texture_keyframes: int = opt(10, "colour the rendered model, which the flow tracks, from input "
                                     "frames kept as keyframes (the first and every this many frames "
                                     "after; the earliest that saw each point, warped by that frame's "
                                     "node motions) instead of the model's voxel colours, blurred by "
                                     "the mesh's vertex spacing, from which the flow measures the "
                                     "motion short; 0 = off (only with --tracking model; with "
                                     "--tracking keyframe the keyframe interval, at least 1)", ge=0)
    texture_tolerance: float = opt(0.01, "--texture-keyframes: a keyframe saw a point when its depth "
                                         "there is within this many metres of the point warped into it",
                                   gt=0)
    passes: int = opt(1, "tracking passes per frame: each later pass renders the model at the motion "
                         "the previous pass solved, matches it to the frame again and solves the "
                         "remaining motion on top (only with --tracking model)", ge=1, le=5)
    icp_stride: int = opt(2, "dense point-to-plane depth term (its weight is the solver's "
                             "--icp-weight; 0 turns it off): one term every this many pixels of "
                             "the rendered model in each direction",
                          ge=1)
    icp_max_distance: float = opt(0.02, "point-to-plane term: associate a rendered model pixel with "
                                        "the live depth there only when they differ by at most this "
                                        "many metres", gt=0)
    icp_max_normal_angle: float = opt(45.0, "point-to-plane term: ... and when the rendered and live "
                                            "normals differ by at most this many degrees", gt=0, le=180)
    icp_reassociate: Optional[int] = opt(None, "point-to-plane term: after the solve, this many times "
                                               "associate the model's points again with the live pixels "
                                               "they project to at the motion just solved and solve again "
                                               "from it (otherwise the associations of the previous motion "
                                               "hold through the solve and pull a curved surface back "
                                               "toward where it started); default 1 with the tracked "
                                               "front-ends, 0 with --flow gt, whose exact flow pins the "
                                               "motion (measured, BENCHMARKS.md); 0 = one solve",
                                         ge=0, le=5)
    color_observations: int = opt(3, "a voxel's colour averages only its first this many "
                                     "observations, then stays (0 = all, up to --weight-cap): the "
                                     "rendered model's texture, which the flow tracks, then keeps "
                                     "where the surface was first seen instead of following drift",
                                  ge=0)
    hidden_support: Optional[float] = opt(None, "nodes whose match support in a frame (sum of anchor x "
                                               "correspondence weights) is below this take the motion "
                                               "increment their nearest supported nodes predict (hidden "
                                               "surface follows the seen one rigidly; 0 = off: ARAP alone); "
                                               "default 40 with the tracked front-ends, whose few matches "
                                               "on a grazing border measure its motion short, 20 with "
                                               "--flow gt (measured, BENCHMARKS.md)", ge=0)
    hidden_arap_iterations: int = opt(10, "--hidden-support's nodes then take the increments that "
                                          "the as-rigid-as-possible energy alone gives them with the "
                                          "seen nodes' increments fixed (this many local-global "
                                          "iterations from the blended start; 0 = the blend alone)",
                                      ge=0)
    hidden_rest: str = opt("auto", "--hidden-arap-iterations keep the hidden nodes as rigid as "
                                        "possible against this shape: 'auto' (seen, with every "
                                        "front-end: measured, BENCHMARKS.md), 'canonical' "
                                        "(the graph's rest shape: what a hidden region's shape got "
                                        "wrong in earlier frames is undone), 'seen' (each graph "
                                        "edge's shape when its two nodes were last seen well, "
                                        "--rest-support; the canonical one until then: the "
                                        "deformation last observed carries on into the hidden part, "
                                        "no estimate of it does) or 'previous' "
                                        "(its live shape before the frame: errors stay and add up)",
                           choices=("auto", "canonical", "seen", "previous"))
    rest_support: float = opt(5.0, "--hidden-rest seen: an edge's shape is remembered in frames where "
                                   "both its nodes' match support is at least this many times "
                                   "--hidden-support (the well-seen interior, not the grazing border "
                                   "about to turn away)", gt=0)
    rest_smoothing: Optional[float] = opt(None, "--hidden-rest seen: each frame that sees an edge well "
                                                "moves its remembered shape this fraction of the way to "
                                                "its shape then (1: the last such frame's shape; less "
                                                "averages over those frames, so one frame's tracking "
                                                "error weighs less; default 1 with --flow gt, whose "
                                                "shapes are exact, 0.3 with the others: "
                                                "BENCHMARKS.md)",
                                          gt=0, le=1)
    rest_half_life: float = opt(40.0, "--hidden-rest seen: tracked frames after which a remembered edge "
                                      "shape counts half, blended toward the canonical one (the motion "
                                      "goes on out of view; measured, BENCHMARKS.md); 0: kept whole", ge=0)
    grow_nodes: bool = opt(True, "insert nodes where the canonical surface outgrows node coverage")
    max_new_nodes: int = opt(20, "most nodes inserted per frame (never beyond the solver's --max-nodes)", ge=0)
    object_distance: float = opt(1.0, "a live pixel not explained by the model is new object "
                                      "surface when within this many node coverages of a warped "
                                      "node (keeps the background out)", gt=0)
    edge_margin: int = opt(2, "live pixels within this many pixels of a depth jump are not "
                              "integrated (mixed depth at the object's border; 0 = off)", ge=0)
    edge_jump: float = opt(0.03, "a depth jump, for --edge-margin: neighbouring points farther "
                                 "apart than this many metres", gt=0)
    max_view_angle: float = opt(75.0, "live pixels whose surface normal is more than this many "
                                      "degrees from the view ray are not integrated (90 = off)", gt=0, le=90)
    extraction_weight: float = opt(0.5, "marching cubes uses voxels with more than this weight "
                                        "(0.5: seen once)", ge=0)
    save_every: int = opt(10, "write the resumable state OUT/state.pt every this many frames", ge=1)
    resume: bool = opt(False, "continue an interrupted run from OUT/state.pt")
    deepdeform_names: bool = opt(False, "also write OUT/deepdeform/<seq>_<segmentEnd>_<frame>.ply "
                                         "(DeepDeform's reconstruction benchmark naming)")
    video: bool = opt(True, "write OUT/fusion.mp4 (input, model, overlay per frame)")
    preview_frames: int = opt(4, "frames shown in OUT/preview.png", ge=1)
    show: bool = opt(False, "open the result in an Open3D window at the end (example_viz.py --sequence)")
