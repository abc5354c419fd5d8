"""Every option of the project, with its default and help text, in one typed place.

Each group is a dataclass; `add_options(parser, Group)` turns its fields into command-line flags
(`node_coverage` -> `--node-coverage`, booleans get `--flag / --no-flag`), and
`from_args(args, Group)` builds the dataclass back from the parsed flags. Scripts never redefine
a flag; checkpoints store these dataclasses as dicts so a model is rebuilt from the file alone.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Type, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def opt(default: Any, help: str, choices: Optional[tuple] = None) -> Any:  # noqa: A002
    """A dataclass field with help text (and optional choices) for its command-line flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


# ----------------------------------------------------------------------------------------------
# Deformation graph (docs/DESIGN.md 5.1)


@dataclass
class GraphOptions:
    node_coverage: float = opt(0.05, "node coverage in metres: every kept vertex lies within this "
                                     "distance of a node; also the sigma of edge and skinning weights")
    max_depth: float = opt(6.0, "depths beyond this many metres are treated as invalid")
    max_triangle_edge: float = opt(0.05, "mesh from depth: longest triangle edge in metres")
    erosion_iterations: int = opt(10, "mesh erosion passes before node sampling")
    erosion_min_neighbors: int = opt(4, "erosion drops faces touching a vertex with fewer incident faces")
    num_neighbors: int = opt(8, "graph edges per node")
    num_anchors: int = opt(4, "anchor nodes per pixel")
    max_influence: Optional[float] = opt(None, "geodesic search radius in metres for edges and "
                                               "anchors (default: 2 x node coverage)")
    min_edges: int = opt(2, "nodes with fewer edges are removed (repeatedly)")
    min_cluster_size: int = opt(3, "connected components with fewer nodes are removed")
    mode: str = opt("geodesic", "distance for edges and anchors: along the mesh or straight-line",
                    choices=("geodesic", "euclidean"))

    @property
    def influence_radius(self) -> float:
        return self.max_influence if self.max_influence is not None else 2.0 * self.node_coverage


# ----------------------------------------------------------------------------------------------
# Gauss-Newton solver (docs/DESIGN.md 5.3)


@dataclass
class SolverOptions:
    iterations: int = opt(3, "Gauss-Newton iterations (3 in training, as the reference)")
    flow_weight: float = opt(0.001, "weight of the projective flow term (squared pixels)")
    depth_weight: float = opt(1.0, "weight of the depth term (squared metres)")
    arap_weight: float = opt(1.0, "weight of the as-rigid-as-possible term (squared metres)")
    lm_damping: float = opt(0.1, "Levenberg-Marquardt damping added to the diagonal of J^T J")
    max_matches: int = opt(0, "randomly keep at most this many matches per sample (0 = all)")
    edge_weighting: bool = opt(False, "weight ARAP edges by K x their graph edge weight "
                                      "(otherwise every edge has weight 1)")
    remove_clusters: bool = opt(True, "drop graph clusters (connected components) whose total "
                                      "match weight is below --min-cluster-weight")
    min_cluster_weight: float = opt(200.0, "least total match weight (correspondence weight x "
                                           "skinning weight, summed) a cluster needs to be solved")
    min_nodes: int = opt(4, "a sample with fewer solvable nodes is marked failed")
    max_nodes: int = opt(500, "a sample with more nodes is marked failed (the dense 6N x 6N "
                              "system grows quadratically)")
    max_depth: float = opt(6.0, "source points and target depths beyond this many metres are ignored")
    convergence_tolerance: float = opt(1e-6, "a sample has converged (and stops updating) when "
                                             "its largest increment is below this (radians / metres)")
    robust_loss: str = opt("cauchy", "robust reweighting of matches by their reprojection error "
                                     "from the second iteration on (iteratively reweighted least "
                                     "squares); none is the reference's plain least squares",
                           choices=("none", "huber", "cauchy"))
    robust_scale: float = opt(3.0, "scale of the robust loss, in pixels of reprojection error")


# ----------------------------------------------------------------------------------------------
# Data (dataset/deepdeform.py)


@dataclass
class DataOptions:
    crop_height: int = opt(0, "centre-crop frames to this height, intrinsics adjusted (0 = full)")
    crop_width: int = opt(0, "centre-crop frames to this width, intrinsics adjusted (0 = full)")
    color_jitter: float = opt(0.0, "training augmentation: random gain/bias of each colour "
                                   "frame, as a fraction (0 = off)")
    rotation_augmentation: float = opt(0.0, "training augmentation: roll the target camera by up "
                                            "to this many degrees, ground truth kept consistent")
    boundary_distance: float = opt(0.1, "target pixels next to a 3D jump larger than this many "
                                        "metres (or to missing depth) form the boundary mask")


# ----------------------------------------------------------------------------------------------
# The tracker (model/tracker.py)


@dataclass
class TrackerOptions:
    flow: str = opt("dis", "correspondence front-end: the learned flow network and weighting head, "
                           "OpenCV's DIS optical flow, or the ground-truth optical flow (oracle)",
                    choices=("network", "dis", "gt"))
    use_mask: bool = opt(True, "network front-end: weight correspondences by the weighting head "
                               "(otherwise every weight is 1)")
    network_input: str = opt("crop", "frames whose sides are not multiples of 64: centre-crop "
                                     "them for the network (as the reference does for 640x480) or "
                                     "pad them by replicating the border; flow outside a crop is "
                                     "unknown, the warp still covers every anchored pixel",
                             choices=("crop", "pad"))
    network_width: int = opt(0, "resize frames to this width (aspect kept) before the network, "
                                "0 = run it at the frames' own size; stored in checkpoints, so a "
                                "network trained at 320 px runs at 320 px on any frame")
    cost_volume: str = opt("normalized", "flow network cost volume: the reference's mean of "
                                         "feature products (its weights need it), or the same of "
                                         "features normalised per pixel, which trains from scratch "
                                         "where the product volume stalls; a checkpoint's own "
                                         "choice always wins when it is loaded",
                           choices=("product", "normalized"))
    dis_preset: str = opt("medium", "DIS optical flow preset", choices=("ultrafast", "fast", "medium"))
    dis_weights: str = opt("photometric", "DIS correspondence weights: all 1, or from the colour "
                                          "difference between a pixel and its match",
                           choices=("uniform", "photometric"))
    dis_consistency: float = opt(2.0, "DIS: drop matches whose forward flow and the backward flow "
                                      "at the match disagree by more than this many pixels "
                                      "(0 = keep all)")
    max_depth_jump: float = opt(0.05, "reject a match whose 4 target pixels differ in depth by "
                                      "more than this many metres (a depth edge)")


# ----------------------------------------------------------------------------------------------
# A run of a script: which data, which device, how many threads (generate.py, example_viz.py and
# train.py share these flags; a script may override a default or leave a flag out with `only`)


@dataclass
class RunOptions:
    dataset_dir: str = opt("data/synthetic", "dataset root holding <split>_graphs.json")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")


# ----------------------------------------------------------------------------------------------
# Training (train.py)


@dataclass
class TrainOptions(RunOptions):
    stage: str = opt("0_flow", "training stage (a preset of the options below, see STAGES)",
                     choices=("0_flow", "1_solver", "2_mask", "3_refine"))
    train_split: str = opt("train", "split to train on (needs ground truth)")
    val_split: str = opt("val", "split to validate on (needs ground truth); empty = no validation")
    experiment: str = opt("default", "experiment name: outputs go to WORKSPACE/EXPERIMENT/")
    workspace: str = opt("experiments", "folder of all experiments")
    init: Optional[str] = opt(None, "start from this checkpoint's weights (ours or the reference's)")
    resume: bool = opt(False, "continue WORKSPACE/EXPERIMENT/checkpoints/last.pt (model, optimiser, "
                              "scheduler, RNG state, iteration)")
    max_iterations: int = opt(30000, "stop after this many optimiser steps")
    batch_size: int = opt(4, "pairs per optimiser step (per process under torchrun)")
    optimizer: str = opt("sgd", "optimiser", choices=("sgd", "adam"))
    learning_rate: float = opt(1e-5, "initial learning rate")
    momentum: float = opt(0.9, "SGD momentum (Adam: beta1)")
    weight_decay: float = opt(0.0, "weight decay")
    lr_step: int = opt(10000, "multiply the learning rate by --lr-gamma every this many steps")
    lr_gamma: float = opt(0.1, "learning-rate decay factor of each step")
    use_flow_loss: bool = opt(True, "robust L1 flow loss on every pyramid level")
    use_graph_loss: bool = opt(False, "L2 loss on node translations (needs the solver)")
    use_warp_loss: bool = opt(False, "L2 loss on warped points (needs the solver)")
    use_mask_loss: bool = opt(False, "BCE loss on correspondence weights (a baseline)")
    flow_loss_type: str = opt("robust", "flow loss: the reference's robust L1 (fine-tuning), or "
                                        "PWC-Net's multiscale end-point error (training from scratch)",
                              choices=("robust", "epe"))
    flow_loss_weight: float = opt(5.0, "weight of the flow loss")
    graph_loss_weight: float = opt(2.0, "weight of the graph loss")
    warp_loss_weight: float = opt(2.0, "weight of the warp loss")
    mask_loss_weight: float = opt(1000.0, "weight of the mask loss")
    run_solver: bool = opt(False, "run the Gauss-Newton solver in training steps")
    freeze_flow: bool = opt(False, "keep the flow network fixed")
    freeze_mask: bool = opt(True, "keep the weighting head fixed")
    train_max_matches: int = opt(10000, "matches per sample the solver keeps in training steps "
                                        "(random subset, as the reference)")
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = off)")
    val_every: int = opt(2000, "validate every this many steps (and at the end)")
    val_pairs: int = opt(100, "validate on at most this many pairs of the split (0 = all)")
    log_every: int = opt(20, "write losses to TensorBoard every this many steps")
    checkpoint_every: int = opt(500, "write checkpoints/last.pt every this many steps")
    num_workers: int = opt(1, "data-loading worker processes")
    seed: int = opt(0, "random seed (data order, augmentation, match subsampling)")


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
        help_text = f.metadata.get("help", "") + f" (default: {default})"
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


def from_args(args: argparse.Namespace, group: Type[T], prefix: str = "") -> T:
    """Builds the dataclass `group` from parsed flags added by `add_options` (same prefix);
    fields left out of the parser (`only`) keep their defaults."""
    return group(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(group)
                    if hasattr(args, prefix + f.name)})


def to_dict(options: Any) -> Dict[str, Any]:
    return dataclasses.asdict(options)


def from_dict(group: Type[T], values: Dict[str, Any]) -> T:
    """Rebuilds `group` from a stored dict, ignoring keys that no longer exist."""
    names = {f.name for f in dataclasses.fields(group)}
    return group(**{k: v for k, v in values.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Synthetic data (docs/DESIGN.md 5.8, dataset/synthetic.py)


@dataclass
class SyntheticOptions:
    out: str = opt("data/synthetic", "dataset root: writes OUT/<split>_graphs.json and OUT/<split>/seqNNNN/")
    split: str = opt("train", "split name (train, val, test, ...); also mixed into each pair's seed")
    pairs: int = opt(100, "number of source/target pairs (finished pairs of an earlier run are kept)")
    seed: int = opt(0, "random seed; pair i is drawn from a generator seeded by (seed, split, i)")
    workers: int = opt(1, "worker processes (results do not depend on it)")
    width: int = opt(640, "image width in pixels (real frames are resized to it)")
    height: int = opt(480, "image height in pixels (real frames are resized to it)")
    focal: float = opt(0.9, "procedural scenes: focal length in units of the image width "
                            "(DeepDeform: 575.5 / 640)")
    shapes: str = opt("cloth,bump,cylinder,blob", "procedural surface families to draw from, "
                                                  "comma-separated")
    motions: str = opt("bend,twist,rbf,bulge,large", "motion families, comma-separated; pair i "
                                                     "gets the (i mod count)-th")
    motion_scale: float = opt(1.0, "multiplies every motion magnitude (angles, shifts, bulges); "
                                   "not the large family's target image motion")
    large_flow_min: float = opt(30.0, "large motion: least mean optical flow in pixels at 640 px "
                                      "width (scaled with the width)")
    large_flow_max: float = opt(60.0, "large motion: greatest mean optical flow in pixels at 640 px "
                                      "width (scaled with the width)")
    min_distance: float = opt(0.8, "procedural object: nearest distance of its centre, metres")
    max_distance: float = opt(2.5, "procedural object: farthest distance of its centre, metres")
    depth_noise: float = opt(1.0, "scale of the depth noise sigma(z) = 1.2 mm + 1.9 mm/m^2 "
                                  "(z - 0.4 m)^2 (0 = noise-free)")
    holes: float = opt(1.0, "scale of the number of missing-depth blobs and of the dropout at "
                            "depth discontinuities (0 = none)")
    grazing_angle: float = opt(80.0, "depth is missing where the view ray meets the surface more "
                                     "than this many degrees away from its normal")
    illumination: float = opt(1.0, "strength of the brightness and colour change between source "
                                   "and target (0 = none)")
    jpeg_quality: int = opt(90, "JPEG quality of the colour images")
    real_frames: Optional[str] = opt(None, "deform the objects of real RGB-D frames instead of "
                                           "procedural surfaces: a folder with color/NAME.jpg|png, "
                                           "depth/NAME.png (uint16 mm), intrinsics.txt and optional "
                                           "mask/NAME_OBJECT.png")
    real_depth_threshold: Optional[float] = opt(None, "real frames without a mask: the object is "
                                                      "the largest region nearer than this many "
                                                      "metres (default: automatic, Otsu)")


# ----------------------------------------------------------------------------------------------
# 4D hash-grid residual deformer (docs/DESIGN.md 5.7, model/residual.py)


@dataclass
class ResidualOptions:
    """Flags --residual-* (scripts add them with prefix="residual_")."""

    levels: int = opt(8, "hash encoding: resolution levels L")
    features: int = opt(2, "hash encoding: features per level F", choices=(1, 2, 4, 8))
    log2_table_size: int = opt(15, "hash encoding: 2^T table rows per level (a pair has "
                               "about 50k points, so a small table rarely collides "
                               "and keeps each Adam step cheap)")
    base_resolution: int = opt(4, "hash encoding: cells per axis of the coarsest level "
                               "over the object's bounding cube")
    max_resolution: int = opt(128, "hash encoding: cells per axis of the finest level "
                              "(128 over a 60 cm object: 5 mm cells)")
    margin: float = opt(0.1, "margin in metres added on every side of the source "
                        "object's bounding box before normalising it to [0, 1]")
    hidden: int = opt(64, "width of the MLP's hidden layers")
    layers: int = opt(2, "number of hidden layers of the MLP")
    max: float = opt(0.03, "largest residual displacement in metres, per axis "
                     "(max * tanh of the MLP output)")
    iterations: int = opt(150, "Adam steps of the fit per pair (a fixed budget)")
    time_budget: float = opt(5.0, "stop the fit of a pair after this many seconds even "
                             "if iterations remain (0 = no limit)")
    learning_rate: float = opt(1e-2, "Adam learning rate of the table and the MLP")
    points: int = opt(2048, "source points drawn per step (with their right and lower "
                      "neighbours for the smoothness term)")
    plane_weight: float = opt(3.0, "weight of the point-to-plane distance to the target "
                              "surface at the warped point's projection")
    plane_scale: float = opt(0.005, "scale in metres of the robust (Geman-McClure) "
                             "point-to-plane term")
    target_smoothing: float = opt(1.0, "sigma in pixels of the edge-aware Gaussian "
                                  "smoothing of the target surface before the "
                                  "point-to-plane term (depth noise; 0 = raw)")
    occlusion: float = opt(0.03, "the point-to-plane and colour terms ignore a point "
                           "whose depth differs from the target depth at its "
                           "projection by more than this many metres (occluded "
                           "or an outlier)")
    color_weight: float = opt(1.0, "weight of the colour term (source colour against "
                              "the target colour at the projection)")
    color_scale: float = opt(0.1, "scale of the robust (Geman-McClure) colour term, in "
                             "units of the [0, 1] colour range")
    match_weight: float = opt(1.0, "weight of the correspondence term (distance to the "
                              "matches' target points, times the match weights)")
    match_scale: float = opt(0.01, "scale in metres of the robust (Geman-McClure) "
                             "correspondence term")
    magnitude_weight: float = opt(0.01, "weight of the squared residual (keeps it small)")
    smoothness_weight: float = opt(50.0, "weight of the squared difference between "
                                   "neighbouring source pixels of the refined warp's "
                                   "detail (its part not in the low-passed graph "
                                   "warp)")
    flow_blur: float = opt(8.0, "sigma in pixels (of a 640-pixel-wide frame; scaled with "
                           "the width) of the low-pass of the graph warp's scene "
                           "flow that the smoothness term keeps (0 = smooth the "
                           "residual itself)")
    neighbor_distance: float = opt(0.02, "neighbouring pixels farther apart than this "
                                   "many metres (a depth edge) are not smoothed "
                                   "together")
    threads: int = opt(1, "CPU threads torch uses during the fit (then restored; 0 = "
                       "leave torch's setting): a step's tensors have a few thousand "
                       "rows, so thread hand-offs cost more than they save, and on a "
                       "busy machine far more (40 steps: 1.6 s with 1 thread, 16 s "
                       "with 2 on a 2-core machine with one core taken)")
    seed: int = opt(0, "seed of the table initialisation and the point sampling")
