"""Instant-NK's residual field over a whole fused sequence: fit, checkpoint, refined meshes.

    python -m fusion.residual --out OUT [--sequence DIR] [--resume] [--residual-* flags]

(`fuse.py --residual` runs the same after fusion, `fuse.py --residual-only` on an existing OUT.)
Reads the fusion's output OUT/canonical.ply and OUT/frames/NNNNNN.ply (the canonical mesh
warped by the graph into every frame) and the sequence DIR (`depth/`, `color/`,
`intrinsics.txt`; DIR is OUT/fusion_options.json's `sequence` unless --sequence says), fits one
field d(x_c, t) over all frames (model/sequence_residual.py: mini-batches of frames and
vertices, Adam with an exponentially decaying learning rate) and writes
    OUT/frames_refined/NNNNNN.ply   the canonical mesh moved by graph warp + d, same topology
    OUT/residual.pt                 field, optimiser, schedule, sampler state, step, options
                                    (atomically every --residual-checkpoint-every steps;
                                    --resume continues from it)
    OUT/residual_tensorboard/       every term, the total and the learning rate
    OUT/residual_errors.png         per frame, the mean point-to-plane distance of the visible
                                    vertices to the frame's depth, graph-only against refined
    OUT/residual_summary.json       those figures, the temporal jitter, time and steps
    OUT/preview_refined.png         input | refined mesh | overlay for a few frames, and
    OUT/fusion_refined.mp4          every frame (without --no-residual-video), as fuse.py's
Ground truth is never read.
"""
import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dataset import io
from dataset.fileio import atomic_open, atomic_write_bytes
from fusion import export
from fusion.sequence import Sequence as RGBDSequence
from model.ext import DeviceError, resolve_device
from model.residual import ResidualDeformer
from model.sequence_residual import SequenceData, frame_errors, residuals, sequence_losses, total_loss
from options import (ArgumentParser, FusionOptions, OptionError, SequenceResidualOptions, add_options, check_flag, from_args,
                     from_dict, to_dict)

CHECKPOINT = "residual.pt"
REFINED_DIR = "frames_refined"
# What may change between an interrupted run and its --resume (how long and how often, not
# what is fitted).
RUN_LENGTH_FIELDS = ("iterations", "time_budget", "checkpoint_every", "log_every", "threads", "video")


class ResidualError(ValueError):
    """The reconstruction or sequence cannot be refined (missing or inconsistent files)."""


# ----------------------------------------------------------------------------------------------
# Inputs


def _frame_file(folder: str, name: str, suffixes: Sequence[str], what: str) -> str:
    for suffix in suffixes:
        path = os.path.join(folder, name + suffix)
        if os.path.isfile(path):
            return path
    raise ResidualError(f"{os.path.join(folder, name + suffixes[0])}: {what} of frame {name} not found")


def sequence_of(out_dir: str, sequence_dir: Optional[str]) -> str:
    """The sequence folder: given, or the one OUT/fusion_options.json records."""
    if sequence_dir is not None:
        return sequence_dir
    path = os.path.join(out_dir, "fusion_options.json")
    if not os.path.isfile(path):
        raise ResidualError(f"{path}: not found, so the sequence is unknown; give --sequence DIR")
    with open(path) as handle:
        recorded = json.load(handle).get("sequence")
    if not isinstance(recorded, str):
        raise ResidualError(f"{path}: no 'sequence' entry; give --sequence DIR")
    return recorded


def load_inputs(out_dir: str, sequence_dir: str, max_depth: float = 6.0) -> Dict:
    """Reads the reconstruction in OUT and the frames of the sequence it was made from.

    Returns names (T frame names, sorted), canonical (V, 3), faces (F, 3), warped (T, V, 3), depths (T, H, W) metres, colors (T, 3, H, W) in [0, 1],
    intrinsics, times (T,) (frame numbers mapped to [0, 1]). Any missing or inconsistent file is
    a one-line ResidualError naming it.
    """
    frames_dir = os.path.join(out_dir, "frames")
    if not os.path.isdir(sequence_dir):
        raise ResidualError(f"{sequence_dir}: sequence folder not found")
    if not os.path.isdir(frames_dir):
        raise ResidualError(f"{frames_dir}: folder of per-frame meshes not found (run fuse.py first)")
    names = sorted(f[:-4] for f in os.listdir(frames_dir) if f.endswith(".ply"))
    if not names:
        raise ResidualError(f"{frames_dir}: no NNNNNN.ply meshes")
    canonical_path = os.path.join(out_dir, "canonical.ply")
    canonical, faces = io.read_ply(canonical_path)
    warped = []
    for name in names:
        vertices, frame_faces = io.read_ply(os.path.join(frames_dir, name + ".ply"))
        if vertices.shape != canonical.shape or not np.array_equal(frame_faces, faces):
            raise ResidualError(f"{os.path.join(frames_dir, name + '.ply')}: topology differs from "
                                f"{canonical_path} ({vertices.shape[0]} vs {canonical.shape[0]} vertices)")
        warped.append(vertices)
    intrinsics = io.read_intrinsics(os.path.join(sequence_dir, "intrinsics.txt"))
    depths, colors = [], []
    for name in names:
        depth_path = _frame_file(os.path.join(sequence_dir, "depth"), name, (".png",), "depth")
        color_path = _frame_file(os.path.join(sequence_dir, "color"), name, (".jpg", ".png", ".jpeg"),
                                 "colour image")
        depth, color = io.read_depth(depth_path), io.read_color(color_path)
        if depth.shape != color.shape[:2] or (depths and depth.shape != depths[0].shape):
            raise ResidualError(f"{depth_path}: size {depth.shape[::-1]} differs from "
                                f"{color_path} or the first frame")
        depths.append(depth)
        colors.append(color)
    try:
        numbers = np.array([int(n) for n in names], dtype=np.float64)
    except ValueError:
        numbers = np.arange(len(names), dtype=np.float64)
    span = numbers[-1] - numbers[0]
    times = (numbers - numbers[0]) / span if span > 0 else np.zeros_like(numbers)
    return {"names": names, "canonical": torch.from_numpy(canonical), "faces": torch.from_numpy(faces),
            "warped": torch.from_numpy(np.stack(warped)), "depths": torch.from_numpy(np.stack(depths)),
            "colors": torch.from_numpy(np.stack(colors)).permute(0, 3, 1, 2).float() / 255.0,
            "intrinsics": intrinsics, "times": torch.from_numpy(times).float(), "max_depth": max_depth}


def build_data(inputs: Dict, options: SequenceResidualOptions, device: str = "cpu") -> SequenceData:
    data = SequenceData.build(inputs["canonical"], inputs["faces"], inputs["warped"], inputs["times"],
                              inputs["depths"], inputs["colors"], inputs["intrinsics"], options,
                              None, inputs["max_depth"])
    for name in ("canonical", "faces", "warped", "times", "previous", "geometry", "color",
                 "vertex_color", "colored"):
        value = getattr(data, name)
        if value is not None:
            setattr(data, name, value.to(device))
    return data


# ----------------------------------------------------------------------------------------------
# The fit


def new_field(data: SequenceData, options: SequenceResidualOptions, generator: torch.Generator
              ) -> ResidualDeformer:
    canonical = data.canonical.cpu()
    reference = float(data.times[0]) if options.pin_reference else None
    return ResidualDeformer(canonical.min(dim=0).values, canonical.max(dim=0).values, options, generator,
                            pinned=False, reference_time=reference).to(data.canonical.device)


def _optimiser(field: ResidualDeformer, options: SequenceResidualOptions):
    # Instant-NGP's Adam settings (beta2 0.99, tiny epsilon: rarely hit table rows still take
    # full steps), and an exponential decay to final_learning_rate at the last step.
    # Fused: one pass over the table per step instead of one per elementwise op (the dense
    # update of a 2^17-row table was half of a CPU step).
    optimiser = torch.optim.Adam(field.parameters(), lr=options.learning_rate, betas=(0.9, 0.99), eps=1e-15,
                                 fused=True)
    decay = options.final_learning_rate ** (1.0 / max(options.iterations - 1, 1))
    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: decay ** step)


def save_state(path: str, field: ResidualDeformer, optimiser, scheduler, generator: torch.Generator,
               iteration: int, options: SequenceResidualOptions, names: List[str], seconds: float) -> None:
    payload = {"kind": "sequence_residual", "options": to_dict(options), "field": field.state_dict(),
               "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
               "generator": generator.get_state(), "iteration": iteration, "frames": list(names),
               "side": field.side, "seconds": seconds}
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def load_state(path: str) -> Dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ResidualError(f"{path}: not a readable residual checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("kind") != "sequence_residual":
        raise ResidualError(f"{path}: not a sequence residual checkpoint (no kind 'sequence_residual')")
    return state


def load_field(path: str, data: SequenceData) -> Tuple[ResidualDeformer, SequenceResidualOptions]:
    """The fitted field stored in a checkpoint, on data's device."""
    state = load_state(path)
    options = from_dict(SequenceResidualOptions, state["options"], source=path)
    field = new_field(data, options, torch.Generator().manual_seed(options.seed))
    field.load_state_dict(state["field"])
    return field, options


def fit(data: SequenceData, options: SequenceResidualOptions, names: List[str],
        checkpoint: Optional[str] = None, resume: bool = False, log_dir: Optional[str] = None,
        progress: bool = True, stop_after: Optional[int] = None, log=print
        ) -> Tuple[ResidualDeformer, Dict]:
    """Fits the field over the sequence; returns it and stats (iterations, seconds, last terms).

    checkpoint: where the state goes (atomically, every checkpoint_every steps and at the end);
    resume: continue from it (its options rule, except how long and how often: RUN_LENGTH_FIELDS
    come from `options`). stop_after: stop after this many steps of this call, as an
    interruption would (after writing the checkpoint); for tests.
    """
    generator = torch.Generator().manual_seed(options.seed)
    iteration, seconds_before = 0, 0.0
    state = None
    if resume and checkpoint and os.path.isfile(checkpoint):
        state = load_state(checkpoint)
        if state["frames"] != list(names):
            raise ResidualError(f"{checkpoint}: fitted to other frames ({len(state['frames'])} from "
                                f"{state['frames'][0]}) than these ({len(names)} from {names[0]})")
        stored = from_dict(SequenceResidualOptions, state["options"], source=checkpoint)
        options = SequenceResidualOptions(**{**to_dict(stored), **{k: getattr(options, k)
                                                                     for k in RUN_LENGTH_FIELDS}})
    elif resume:
        log(f"no {checkpoint} to resume from: fitting from the start")
    field = new_field(data, options, generator)
    optimiser, scheduler = _optimiser(field, options)
    if state is not None:
        field.load_state_dict(state["field"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        iteration, seconds_before = int(state["iteration"]), float(state["seconds"])
        log(f"resuming the residual fit at step {iteration} of {options.iterations} from {checkpoint}")

    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir, purge_step=iteration or None)
    threads = torch.get_num_threads()
    if options.threads > 0 and data.canonical.device.type == "cpu":
        torch.set_num_threads(options.threads)
    start, steps, terms = time.perf_counter(), 0, {}
    bar = tqdm(total=options.iterations, initial=iteration, desc="residual field", disable=not progress,
               leave=False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            while iteration < options.iterations:
                if options.time_budget > 0 and time.perf_counter() - start >= options.time_budget:
                    log(f"residual fit: time budget of {options.time_budget:g} s reached at step "
                        f"{iteration} of {options.iterations} (--resume goes on)")
                    break
                if stop_after is not None and steps >= stop_after:
                    break
                frames, chosen, neighbours = data.draw(options, generator)
                if frames.numel() == 0:
                    log("residual fit: no frame sees the mesh under the graph warp; nothing to fit")
                    break
                values = sequence_losses(field, data, frames, chosen, neighbours, options)
                total = total_loss(values, options)
                optimiser.zero_grad(set_to_none=True)
                total.backward()
                optimiser.step()
                scheduler.step()
                iteration += 1
                steps += 1
                terms = {name: float(value.detach()) for name, value in values.items()}
                terms["total"] = float(total.detach())
                bar.update(1)
                bar.set_postfix(total=f"{terms['total']:.3g}", plane=f"{terms['plane']:.3g}", refresh=False)
                if writer is not None and (iteration % options.log_every == 0 or iteration == options.iterations):
                    for name, value in terms.items():
                        writer.add_scalar(f"residual/{name}", value, iteration)
                    writer.add_scalar("residual/learning_rate", scheduler.get_last_lr()[0], iteration)
                if checkpoint and iteration % options.checkpoint_every == 0:
                    save_state(checkpoint, field, optimiser, scheduler, generator, iteration, options, names,
                               seconds_before + time.perf_counter() - start)
    finally:
        bar.close()
        torch.set_num_threads(threads)
        if writer is not None:
            writer.close()
    seconds = seconds_before + time.perf_counter() - start
    if checkpoint and steps:
        save_state(checkpoint, field, optimiser, scheduler, generator, iteration, options, names, seconds)
    field.eval()
    return field, {"iterations": iteration, "steps_this_run": steps, "seconds": seconds,
                   "terms": terms, "options": to_dict(options)}


# ----------------------------------------------------------------------------------------------
# Outputs


def temporal_jitter(residual: torch.Tensor, warped: torch.Tensor) -> Tuple[float, float]:
    """(mean |d(x, t) - d(x, t-1)|, mean |w_t(x) - w_{t-1}(x)|) over vertices and frame pairs,
    millimetres: the residual's frame-to-frame change against the graph motion's."""
    if residual.shape[0] < 2:
        return 0.0, 0.0
    jitter = (residual[1:] - residual[:-1]).norm(dim=-1).mean()
    motion = (warped[1:] - warped[:-1]).norm(dim=-1).mean()
    return 1000.0 * float(jitter), 1000.0 * float(motion)


def error_plot(before: np.ndarray, after: np.ndarray, width: int = 900, height: int = 360) -> np.ndarray:
    """A line chart (RGB uint8) of per-frame errors in mm: graph-only red, refined green."""
    image = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 60, 20, 30, 40
    values = np.concatenate((before, after))
    high = float(np.nanmax(values)) * 1.1 if np.isfinite(values).any() and np.nanmax(values) > 0 else 1.0
    T = len(before)

    def xy(i: int, v: float) -> Tuple[int, int]:
        x = left + (width - left - right) * (i / max(T - 1, 1))
        return int(round(x)), int(round(height - bottom - (height - top - bottom) * v / high))

    cv2.rectangle(image, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    for k in range(5):
        value = high * k / 4
        y = xy(0, value)[1]
        cv2.line(image, (left - 4, y), (left, y), (0, 0, 0), 1)
        cv2.putText(image, f"{value:.1f}", (4, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for i in range(0, T, max(1, T // 10)):
        x = xy(i, 0)[0]
        cv2.putText(image, str(i), (x - 6, height - bottom + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for series, colour in ((before, (220, 40, 40)), (after, (30, 160, 60))):
        points = [xy(i, v) for i, v in enumerate(series) if np.isfinite(v)]
        for a, b in zip(points[:-1], points[1:]):
            cv2.line(image, a, b, colour, 2)
        for p in points:
            cv2.circle(image, p, 3, colour, -1)
    cv2.putText(image, "mean |point-to-plane| of visible vertices (mm) per frame:  graph-only",
                (left, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 40, 40), 1)
    cv2.putText(image, "refined", (left + 560, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (30, 160, 60), 1)
    cv2.putText(image, "frame", (width // 2, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return image


def write_refined(out_dir: str, names: List[str], refined: np.ndarray, faces: np.ndarray) -> str:
    folder = os.path.join(out_dir, REFINED_DIR)
    os.makedirs(folder, exist_ok=True)
    for name, vertices in zip(names, refined):
        io.write_ply(os.path.join(folder, name + ".ply"), vertices, faces)
    return folder


def run_residual(out_dir: str, sequence_dir: Optional[str] = None,
                 options: SequenceResidualOptions = SequenceResidualOptions(), resume: bool = False,
                 device: str = "cpu", progress: bool = True, stop_after: Optional[int] = None,
                 log=print) -> Dict:
    """Fits the field to the reconstruction in out_dir and writes every output (module docstring).
    Returns the summary written to OUT/residual_summary.json."""
    sequence_dir = sequence_of(out_dir, sequence_dir)
    inputs = load_inputs(out_dir, sequence_dir)
    data = build_data(inputs, options, device)
    names = inputs["names"]
    field, stats = fit(data, options, names, os.path.join(out_dir, CHECKPOINT), resume,
                       os.path.join(out_dir, "residual_tensorboard"), progress, stop_after, log)
    options = SequenceResidualOptions(**stats["options"])
    residual = residuals(field, data)
    refined = data.warped + residual
    before = frame_errors(data, data.warped, options.occlusion).cpu().numpy()
    after = frame_errors(data, refined, options.occlusion).cpu().numpy()
    jitter, motion = temporal_jitter(residual, data.warped)
    refined_np = refined.cpu().numpy().astype(np.float32)
    if not np.isfinite(refined_np).all():
        raise ResidualError(f"{out_dir}: the refined meshes hold non-finite vertices; nothing written")
    folder = write_refined(out_dir, names, refined_np, inputs["faces"].numpy())
    # The refined meshes' preview and video beside the graph-only ones (fuse.py's pictures),
    # coloured by each vertex's colour over the frames that see it.
    export.pictures(out_dir, RGBDSequence(sequence_dir), [int(name) for name in names], list(refined_np),
                    inputs["canonical"].numpy(), inputs["faces"].numpy(), data.vertex_color.cpu().numpy(),
                    FusionOptions.preview_frames, options.video, suffix="_refined")
    ok, png = cv2.imencode(".png", cv2.cvtColor(error_plot(before, after), cv2.COLOR_RGB2BGR))
    atomic_write_bytes(os.path.join(out_dir, "residual_errors.png"), png.tobytes())
    summary = {"sequence": os.path.abspath(sequence_dir), "frames": names, "refined": folder,
               "iterations": stats["iterations"], "seconds": stats["seconds"], "terms": stats["terms"],
               "plane_error_mm": {"graph": [float(v) for v in before], "refined": [float(v) for v in after]},
               "mean_plane_error_mm": {"graph": float(np.nanmean(before)), "refined": float(np.nanmean(after))},
               "mean_residual_mm": 1000.0 * float(residual.norm(dim=-1).mean()),
               "temporal_jitter_mm": jitter, "graph_motion_per_frame_mm": motion,
               "options": to_dict(options)}
    atomic_write_bytes(os.path.join(out_dir, "residual_summary.json"),
                       (json.dumps(summary, indent=1) + "\n").encode())
    log(f"residual field: {stats['iterations']} steps in {stats['seconds']:.1f} s; mean point-to-plane "
        f"distance {summary['mean_plane_error_mm']['graph']:.2f} mm (graph) -> "
        f"{summary['mean_plane_error_mm']['refined']:.2f} mm (refined); jitter {jitter:.3f} mm/frame "
        f"(graph motion {motion:.2f} mm/frame); meshes in {folder}")
    return summary


def add_residual_options(parser: argparse.ArgumentParser) -> None:
    """The --residual-* flags (SequenceResidualOptions), for this module and fuse.py."""
    add_options(parser, SequenceResidualOptions, "residual field (--residual-*)", prefix="residual_")


def add_fuse_flags(parser: argparse.ArgumentParser) -> None:
    """What fuse.py adds: --residual, --residual-only and the --residual-* flags."""
    group = parser.add_argument_group("residual field after fusion")
    group.add_argument("--residual", action="store_true",
                       help="after fusion, fit the 4D residual field over the sequence and write "
                            "OUT/frames_refined/NNNNNN.ply (python -m fusion.residual --help)")
    group.add_argument("--residual-only", action="store_true",
                       help="skip fusion: fit the residual field to the existing OUT (its canonical.ply "
                            "and frames/); with --resume it continues OUT/residual.pt")
    add_residual_options(parser)


def residual_after_fusion(args: argparse.Namespace, out: str, sequence: str, resume: bool, device: str,
                          progress: bool = True, log=print) -> Optional[Dict]:
    """fuse.py's hook: runs the field when --residual or --residual-only was given (flags of
    add_fuse_flags); returns its summary, or None when neither was."""
    if not (getattr(args, "residual", False) or getattr(args, "residual_only", False)):
        return None
    options = from_args(args, SequenceResidualOptions, prefix="residual_")
    return run_residual(out, sequence, options, resume, device, progress, log=log)


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fusion.residual", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the fusion's output folder (canonical.ply, frames/)")
    parser.add_argument("--sequence", default=None,
                        help="the sequence folder (default: the one OUT/fusion_options.json records)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/residual.pt")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda[:K], or auto (cuda when it can run here; default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_residual_options(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        check_flag("--out", args.out, str, path="dir")
        check_flag("--sequence", args.sequence, str, path="dir")
        options = from_args(args, SequenceResidualOptions, prefix="residual_")
        device = str(resolve_device(args.device))
        run_residual(args.out, args.sequence, options, args.resume, device, not args.quiet)
    except (OptionError, ResidualError, io.FormatError, DeviceError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
