"""The fuse.py driver: flags -> options, the frame loop with progress, state saved atomically
every K frames (and on Ctrl-C) for --resume, then the outputs (fusion/export.py).
"""
import argparse
import os
import sys
import time
from typing import Optional

import torch
from tqdm import tqdm

from dataset.fileio import atomic_open
from dataset.graph import GraphError
from fusion import export
from fusion.gt import GroundTruth
from fusion.loop import STEPS, Fusion
from fusion.residual import add_fuse_flags, residual_after_fusion
from fusion.sequence import Sequence, SequenceError
from options import (ArgumentParser, FusionOptions, OptionError, RunOptions, SolverOptions, TrackerOptions,
                     add_options, from_args, to_dict)
from utils.fusion_viz import show_sequence
from utils.checkpoints import (CheckpointError, MissingCheckpointError, build_tracker, default_checkpoint,
                               default_checkpoint_for, parse_with_checkpoint, pick_front_end, setup_run)

# Fusion solves one frame against the model with more iterations than training's 3 (the solver
# stops early once the increments are below its tolerance) and a bounded number of matches, with
# the dense point-to-plane term on (its projective associations come from the rendered model;
# 300: a millimetre along the normal weighs about as much as 0.55 px of flow).
SOLVER_DEFAULTS = {"iterations": 6, "max_matches": 20000, "convergence_tolerance": 1e-4,
                   "min_cluster_weight": 50.0, "icp_weight": 300.0}
# The dis front-end on locally contrast-normalised images (model/image_proc.local_contrast: the
# model's texture comes from keyframes shot under another shading than the live frame's, and a
# turning object's shading stays with the light) with a second DIS pass (the first measures the
# motion short where its patches mix in the static background); its photometric weights then
# compare the normalised grey too. Measured on 14 blob and 3 cloth sequences: BENCHMARKS.md.
# Pairs (generate.py) keep one plain pass: not measured there.
TRACKER_DEFAULTS = {"dis_normalize": 5.0, "dis_passes": 2}
STATE = "state.pt"


class FusionError(ValueError):
    """A fusion run that cannot start or continue (one line)."""


def build_parser(first=None, defaults_tracker=None, defaults_solver=None) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=sys.modules["__main__"].__doc__ if first is None else None,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    # --sequence is required but with --residual-only (main checks it), which reads the
    # sequence folder OUT/fusion_options.json records.
    add_options(parser, FusionOptions, "fusion", required=("out",))
    add_options(parser, RunOptions, "run", only=("device", "threads"))
    parser.add_argument("--checkpoint", default=None,
                        help="tracker checkpoint for --flow network "
                             f"(default: {default_checkpoint() or 'none shipped'})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_options(parser, TrackerOptions, "tracker", defaults={"flow": None, **(defaults_tracker or {}), **TRACKER_DEFAULTS})
    add_options(parser, SolverOptions, "solver", defaults={**(defaults_solver or {}), **SOLVER_DEFAULTS})
    add_fuse_flags(parser)
    return parser


def _state_path(out: str) -> str:
    return os.path.join(out, STATE)


def _identity(options: FusionOptions) -> dict:
    """What a resumed run must share with the interrupted one."""
    keep = {k: v for k, v in to_dict(options).items() if k not in ("resume", "show", "video", "preview_frames",
                                                                     "deepdeform_names", "save_every")}
    keep["sequence"] = os.path.abspath(options.sequence)
    keep["out"] = os.path.abspath(options.out)
    return keep


def save_state(fusion: Fusion, options: FusionOptions, next_index: int) -> None:
    payload = {"fusion": fusion.state_dict(), "options": _identity(options), "next_index": next_index}
    with atomic_open(_state_path(options.out), "wb") as handle:
        torch.save(payload, handle)


def run_fusion(options: FusionOptions, solver_options: SolverOptions, tracker, device: str = "cpu",
               progress: bool = True, stop_after: Optional[int] = None, log=print,
               fusion_class: type = Fusion) -> Fusion:
    """Fuses the sequence and writes every output. `stop_after` (tests) processes at most that
    many frames in this call, saves the state and returns without outputs, as an interrupted
    run would leave it. `fusion_class`, Fusion or a subclass of it, runs the frames (a variant
    of the loop without a copy of this driver: benchmarks/diagnose_fusion.py)."""
    if options.truncation >= 8 * options.voxel_size:
        raise FusionError(f"--truncation {options.truncation}: must be less than 8 voxels "
                          f"({8 * options.voxel_size:g} m at --voxel-size {options.voxel_size})")
    sequence = Sequence(options.sequence, options.frames)
    mask, _ = sequence.first_mask(options.mask, options.object)
    needs_gt = options.oracle_motion or (tracker is not None and tracker.options.flow == "gt")
    gt = GroundTruth(sequence.root, sequence.frame_ids[0]) if needs_gt else None
    if gt is not None:
        for frame_id in sequence.frame_ids:
            gt.check_frame(frame_id)
    fusion = fusion_class(sequence, options, solver_options, tracker, gt, torch.device(device))
    os.makedirs(options.out, exist_ok=True)
    start_index = 0
    if options.resume and os.path.isfile(_state_path(options.out)):
        try:
            state = torch.load(_state_path(options.out), map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable file is the same error to the user
            raise FusionError(f"{_state_path(options.out)}: cannot be read to resume ({error})") from None
        if state.get("options") != _identity(options):
            changed = sorted(k for k in _identity(options) if state.get("options", {}).get(k) != _identity(options)[k])
            raise FusionError(f"{_state_path(options.out)}: was made with other options ({', '.join(changed)}); "
                              "run without --resume to start over")
        fusion.load_state_dict(state["fusion"])
        start_index = int(state["next_index"])
        log(f"resuming at frame {start_index} of {len(sequence)} from {_state_path(options.out)}")
    elif options.resume:
        log(f"no {_state_path(options.out)} to resume from: starting at the first frame")
    done = 0
    bar = tqdm(total=len(sequence), initial=start_index, desc="fusion", disable=not progress)
    index = start_index
    try:
        while index < len(sequence):
            if stop_after is not None and done >= stop_after:
                save_state(fusion, options, index)
                bar.close()
                return fusion
            frame = sequence.read(index)
            entry = fusion.first_frame(frame, mask) if index == 0 else fusion.step(frame)
            if entry.status == "failed":
                tqdm.write(f"frame {frame.frame_id}: solve failed ({entry.message}); motion kept, "
                           "frame not integrated")
            index += 1
            done += 1
            bar.update(1)
            bar.set_postfix(nodes=entry.nodes, status=entry.status)
            if index % options.save_every == 0 and index < len(sequence):
                save_state(fusion, options, index)
    except KeyboardInterrupt:
        save_state(fusion, options, index)
        bar.close()
        log(f"interrupted: state saved to {_state_path(options.out)}; run again with --resume")
        raise
    bar.close()
    if start_index < len(sequence):
        # A --resume of a finished run then only writes the outputs again.
        save_state(fusion, options, len(sequence))
    write_outputs(fusion, options, solver_options, tracker, log)
    return fusion


def write_outputs(fusion: Fusion, options: FusionOptions, solver_options: SolverOptions, tracker, log=print):
    tick = time.perf_counter()
    mesh = fusion.mesh()
    if mesh.vertices.shape[0] == 0:
        raise FusionError(f"{options.sequence}: the fused model has no surface (nothing was integrated "
                          "inside the mask?)")
    R, t = fusion.history()
    out = options.out
    sequence_name = os.path.basename(os.path.normpath(fusion.sequence.root))
    warped = export.export_meshes(out, mesh.vertices, mesh.faces, mesh.colors, mesh.anchors, mesh.weights,
                                  fusion.graph.positions, R, t, fusion.frame_ids,
                                  sequence_name if options.deepdeform_names else None)
    status = [entry.status for entry in fusion.log]
    export.write_nodes(os.path.join(out, "nodes.npz"), fusion.graph.positions, R, t, fusion.frame_ids,
                       fusion.graph.coverage, fusion.graph.created, mesh.anchors, mesh.weights, status)
    export.write_bytes(os.path.join(out, "frames.csv"), export.frames_csv(fusion.log, STEPS).encode("utf-8"))
    export.write_json(os.path.join(out, "fusion_options.json"), {
        "sequence": os.path.abspath(options.sequence), "fusion": to_dict(options),
        "solver": to_dict(solver_options),
        "tracker": to_dict(tracker.options) if tracker is not None else None})
    export.pictures(out, fusion.sequence, fusion.frame_ids, warped, mesh.vertices, mesh.faces, mesh.colors,
                    options.preview_frames, options.video)
    failed = sum(s == "failed" for s in status)
    log(f"{len(fusion.frame_ids)} frame(s) fused ({failed} failed solve(s)), {fusion.graph.num_nodes} nodes, "
        f"mesh {mesh.vertices.shape[0]} vertices / {mesh.faces.shape[0]} faces, outputs in "
        f"{time.perf_counter() - tick:.1f} s -> {os.path.abspath(out)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, checkpoint = parse_with_checkpoint(build_parser, argv, default_checkpoint_for)
        options = from_args(args, FusionOptions)
        # Only --device and --threads of the run options are flags here.
        device = setup_run(RunOptions(dataset_dir=".", device=args.device, threads=args.threads))
        if args.residual_only:   # the field on an existing OUT: no tracking, no fusion
            residual_after_fusion(args, options.out, options.sequence, options.resume, str(device),
                                  not args.quiet)
            return 0
        if not options.sequence:
            print("fuse.py: error: the following arguments are required: --sequence (see --help)", file=sys.stderr)
            return 2
        if pick_front_end(args, checkpoint) and not checkpoint:
            print("no checkpoint given or shipped: using --flow dis")
        try:
            tracker = build_tracker(args, checkpoint)
        except MissingCheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        tracker = tracker.to(device).eval()
        run_fusion(options, from_args(args, SolverOptions), tracker, device, progress=not args.quiet)
        residual_after_fusion(args, options.out, options.sequence, options.resume, str(device), not args.quiet)
        if options.show:
            show_sequence(options.out)
    except KeyboardInterrupt:
        return 130
    except (CheckpointError, OptionError, SequenceError, GraphError, FusionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
