"""Times the synthetic sequence generator and scores its two reference reconstructions; times the
sequence scorer against the brute-force reference of tests/reference/ in the same run.

    python benchmarks/bench_sequence.py [--frames 40] [--width 640 --height 480] [--seed 0]
                                        [--out DIR] [--write [--note TEXT]]

For each object (cloth, blob, both with --detail) it makes a fresh sequence (timed end to end,
files included), writes the two reference reconstructions, the ground truth itself and the first
frame's visible surface never moved, as OUT/frames/NNNNNN.ply, scores them with the scorer of
`evaluate.py --sequence`, and prints a table. Then it times our scorer and the brute-force
reference on a coarse 4 cm mesh of 8 frames (the reference is quadratic) and prints, last,
`speedup_vs_reference=X`. --write puts the figures into BENCHMARKS.md.
"""
import argparse
import os
import platform
import re
import shutil
import tempfile
import time

import numpy as np
import torch

from dataset import io
from dataset.fileio import atomic_open
from dataset.synthetic_sequence import generate_sequence, read_ground_truth
from options import SequenceOptions
from tests.reference import sequence_metrics_reference as reference
from utils.sequence_metrics import evaluate_sequence, score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench_sequence:start -->", "<!-- bench_sequence:end -->"


def reference_reconstructions(sequence: str, out: str) -> dict:
    """Writes OUT/gt and OUT/static (frames/NNNNNN.ply) and returns their folders."""
    faces, truth, visible = read_ground_truth(sequence)
    keep = visible[0][faces].all(axis=1)
    used = np.flatnonzero(visible[0])
    new_id = np.full(visible.shape[1], -1)
    new_id[used] = np.arange(used.size)
    folders = {"ground truth": os.path.join(out, "gt"), "static first frame": os.path.join(out, "static")}
    for t in range(truth.shape[0]):
        io.write_ply(os.path.join(folders["ground truth"], "frames", f"{t:06d}.ply"), truth[t], faces)
        io.write_ply(os.path.join(folders["static first frame"], "frames", f"{t:06d}.ply"), truth[0, used],
                     new_id[faces[keep]])
    return folders


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=40, help="frames per sequence")
    parser.add_argument("--width", type=int, default=640, help="image width")
    parser.add_argument("--height", type=int, default=480, help="image height")
    parser.add_argument("--seed", type=int, default=0, help="seed of both sequences")
    parser.add_argument("--out", default=None, help="keep the sequences here (default: a temporary folder)")
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    parser.add_argument("--note", default="", help="with --write: a note on the conditions of the run")
    args = parser.parse_args(argv)
    root = args.out or tempfile.mkdtemp(prefix="bench_sequence.")
    rows, lines = [], []
    try:
        for shape in ("cloth", "blob"):
            folder = os.path.join(root, shape)
            shutil.rmtree(folder, ignore_errors=True)
            options = SequenceOptions(out=folder, frames=args.frames, seed=args.seed, width=args.width,
                                      height=args.height, object=shape, detail=True)
            start = time.perf_counter()
            summary = generate_sequence(options, progress=False)
            seconds = time.perf_counter() - start
            for name, recon in reference_reconstructions(folder, os.path.join(root, shape + "_recon")).items():
                s = evaluate_sequence(folder, recon)
                rows.append(f"| {shape} | {name} | {s.deformation_error * 1000:.3f} | "
                            f"{s.deformation_error_last * 1000:.3f} | {s.drift * 1000:.3f} | {s.accuracy * 1000:.3f} | "
                            f"{s.completeness:.4f} | {s.chamfer * 1000:.3f} |")
            lines.append(f"{shape}: {summary['vertices']} vertices, {summary['faces']} faces, "
                         f"{100 * summary['visible_share']:.0f} % visible per frame; {args.frames} frames of "
                         f"{args.width}x{args.height} generated in {seconds:.1f} s ({seconds / args.frames:.2f} s/frame)")

        coarse = os.path.join(root, "coarse")
        shutil.rmtree(coarse, ignore_errors=True)
        generate_sequence(SequenceOptions(out=coarse, frames=8, seed=args.seed, width=160, height=120, size=0.4,
                                          spacing=0.04, object="blob", speed=4.0), progress=False)
        faces, truth, visible = read_ground_truth(coarse)
        truth = truth.astype(np.float64)
        recon = truth + np.random.default_rng(0).normal(0, 0.003, truth.shape)
        start = time.perf_counter()
        ours = score(faces, truth, visible, recon)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = reference.score(faces, truth, visible, recon)
        theirs_s = time.perf_counter() - start
        agree = abs(ours.chamfer - theirs["chamfer"]) < 1e-6 and abs(ours.accuracy - theirs["accuracy"]) < 1e-6
        lines.append(f"scorer on a coarse blob ({truth.shape[1]} vertices, 8 frames, jittered reconstruction): "
                     f"ours {1000 * ours_s:.1f} ms, brute-force reference {1000 * theirs_s:.1f} ms, figures "
                     f"{'agree' if agree else 'DIFFER'}; speedup_vs_reference={theirs_s / ours_s:.1f}")
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)

    table = ["| object | reconstruction | deformation error (mm) | last frame (mm) | drift (mm/frame) | "
             "accuracy (mm) | completeness | Chamfer (mm) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"] + rows
    machine = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
               f"{time.strftime('%Y-%m-%d')}. {args.note}").strip()
    text = "\n".join(table) + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + machine + "\n"
    print(text, end="")
    print(lines[-1].split("; ")[-1])
    if args.write:
        path = os.path.join(REPO, "BENCHMARKS.md")
        with open(path) as handle:
            current = handle.read()
        block = f"{START}\n{text}{END}"
        if START in current:
            current = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, current, flags=re.S)
        else:
            current += ("\n## Synthetic sequences (`python benchmarks/bench_sequence.py --write`)\n\n" + block
                        + "\n")
        with atomic_open(path, "w") as handle:
            handle.write(current)


if __name__ == "__main__":
    main()
