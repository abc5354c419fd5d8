"""Fits the sequence residual field (fusion/residual.py) to an oracle graph-only reconstruction
and reports its cost on the CPU and what it gains.

    python benchmarks/bench_residual_sequence.py [--sequence DIR | --frames 40 --seed 0 --object cloth]
        [--work DIR] [--residual-* flags]

The sequence: DIR (a synthetic sequence with gt/), or, without --sequence, one made by the
sequence generator with --detail (travelling wrinkles finer than a 5 cm graph) from --frames,
--seed, --object, --width, --height. The graph-only reconstruction is the oracle of
fusion/oracle.py (node motions fitted to the ground truth: exactly graph-expressible motion),
so that what the field recovers is the detail finer than the nodes. Prints
  * setup seconds (reading the frames, smoothing their depth, visibility), fitting seconds,
    per 1k steps and per frame of the sequence;
  * the hash encoding's share of a step: forward + backward of the encoder alone on the inputs
    of one step, against a whole step (the same number of repeats, one after the other);
  * the sequence scorer's accuracy (mean distance of the mesh's vertices to the true surface,
    mm; per frame and mean) and deformation error of frames/ (graph only) and frames_refined/,
    the worst frame's change, and the temporal jitter against the graph motion's
    frame-to-frame difference;
and last `accuracy_gain=X` (relative improvement of the mean accuracy).
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

from fusion.oracle import write_oracle
from fusion.residual import add_residual_options, build_data, load_inputs, new_field, run_residual
from model.sequence_residual import sequence_losses, total_loss
from dataset.synthetic_sequence import generate_sequence
from options import SequenceOptions, SequenceResidualOptions, from_args
from utils.sequence_metrics import evaluate_sequence


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence", default=None, help="a synthetic sequence folder with gt/gt.npz "
                        "(default: generate one with --detail)")
    parser.add_argument("--frames", type=int, default=40, help="frames of the generated sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated sequence")
    parser.add_argument("--object", default="cloth", choices=("cloth", "blob"), help="generated object")
    parser.add_argument("--width", type=int, default=640, help="width of the generated frames")
    parser.add_argument("--height", type=int, default=480, help="height of the generated frames")
    parser.add_argument("--work", default=None, help="folder for the sequence and the reconstruction "
                        "(default: a temporary folder)")
    parser.add_argument("--node-coverage", type=float, default=0.05, help="the oracle graph's node spacing")
    parser.add_argument("--share-repeats", type=int, default=20,
                        help="repeats of the step / encoder timing for the hash encoding's share")
    add_residual_options(parser)
    return parser.parse_args()


def encoder_share(data, options: SequenceResidualOptions, repeats: int):
    """(seconds of a whole step, seconds of the encoder's forward + backward on its inputs)."""
    generator = torch.Generator().manual_seed(options.seed)
    field = new_field(data, options, generator)
    optimiser = torch.optim.Adam(field.parameters(), lr=options.learning_rate)
    step_times, encoder_times = [], []
    for _ in range(repeats):
        frames, chosen, neighbours = data.draw(options, generator)
        start = time.perf_counter()
        loss = total_loss(sequence_losses(field, data, frames, chosen, neighbours, options), options)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step_times.append(time.perf_counter() - start)
        # The encoder's inputs of that step: vertex, mesh neighbour, previous frame (x2 pinned).
        count = 3 * chosen.numel() * (2 if options.pin_reference else 1)
        x = torch.rand(count, 4, generator=generator)
        start = time.perf_counter()
        features = field.encoder(x)
        features.backward(torch.ones_like(features))
        encoder_times.append(time.perf_counter() - start)
    return statistics.median(step_times), statistics.median(encoder_times)


def main() -> None:
    args = parse_args()
    options = from_args(args, SequenceResidualOptions, prefix="residual_")
    torch.set_num_threads(max(options.threads, 1))
    work = args.work or tempfile.mkdtemp(prefix="bench_residual_sequence_")
    sequence = args.sequence
    if sequence is None:
        sequence = os.path.join(work, "sequence")
        generate_sequence(SequenceOptions(out=sequence, frames=args.frames, seed=args.seed, object=args.object,
                                          width=args.width, height=args.height, detail=True), progress=False)
    out = os.path.join(work, "oracle")
    write_oracle(sequence, out, args.node_coverage)

    start = time.perf_counter()
    inputs = load_inputs(out, sequence)
    data = build_data(inputs, options)
    setup = time.perf_counter() - start
    T, V = data.num_frames, data.canonical.shape[0]
    H, W = data.geometry.shape[2:]
    step, encoder = encoder_share(data, options, args.share_repeats)
    del data

    summary = run_residual(out, sequence, options, progress=False)
    fit = summary["seconds"]
    graph = evaluate_sequence(sequence, out)
    refined = evaluate_sequence(sequence, out, "frames_refined")
    before, after = graph.per_frame["accuracy_mm"], refined.per_frame["accuracy_mm"]
    print(f"\nsequence {sequence}: {T} frames of {W}x{H}, {V} canonical vertices; "
          f"{options.iterations} steps of {options.frames_per_step} frames x {options.points} vertices, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"setup {setup:.1f} s; fit {fit:.1f} s = {1000 * fit / max(summary['iterations'], 1):.1f} s per 1k "
          f"steps = {fit / T:.2f} s per frame")
    print(f"one step {1000 * step:.1f} ms, of which the hash encoding (forward + backward) "
          f"{1000 * encoder:.1f} ms = {100 * encoder / step:.0f}%")
    print("frame | accuracy graph-only (mm) | refined (mm) | change")
    for t, (b, a) in enumerate(zip(before, after)):
        print(f"{t:5d} | {b:8.3f} | {a:8.3f} | {100 * (a - b) / max(b, 1e-9):+7.1f}%")
    gain = 1 - refined.accuracy / graph.accuracy
    rises = [(a - b) / b for a, b in zip(after, before) if b > 0.1]
    print(f"accuracy graph-only {1000 * graph.accuracy:.3f} mm, refined {1000 * refined.accuracy:.3f} mm "
          f"({100 * gain:.1f}% better); worst frame change among frames whose graph-only accuracy is above "
          f"0.1 mm: {100 * max(rises or [0]):+.1f}%")
    print(f"deformation error graph-only {1000 * graph.deformation_error:.3f} mm, refined "
          f"{1000 * refined.deformation_error:.3f} mm "
          f"({100 * (refined.deformation_error / graph.deformation_error - 1):+.1f}%)")
    print(f"temporal jitter {summary['temporal_jitter_mm']:.3f} mm/frame against graph motion "
          f"{summary['graph_motion_per_frame_mm']:.3f} mm/frame")
    print(f"accuracy_gain={gain:.3f}")


if __name__ == "__main__":
    main()
