"""Making a split of pairs: one seeded draw per pair, retried until usable, in worker processes,
resumable; and the command line of `python -m dataset.synthetic`."""
import concurrent.futures
import multiprocessing
import os
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from dataset import io
from options import ArgumentParser, GraphOptions, SyntheticOptions, add_options, from_args
from dataset.graph import GraphError
from dataset.synthetic import geometry
from dataset.synthetic.motion import MOTIONS
from dataset.synthetic.pair import family_names, make_pair
from dataset.synthetic.real import RealFrame, load_real_frames
from dataset.synthetic.scene import SHAPES, SceneError
from dataset.synthetic.writer import finished_label, pair_settings, write_pair

MAX_ATTEMPTS = 30

def pair_rng(seed: int, split: str, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index), int(attempt)])


_REAL_FRAMES: Dict[Tuple, List[RealFrame]] = {}


def _real_frames(options: SyntheticOptions) -> Optional[List[RealFrame]]:
    """The real frames of options.real_frames, loaded once per process."""
    if not options.real_frames:
        return None
    key = (os.path.abspath(options.real_frames), options.width, options.height, options.real_depth_threshold)
    if key not in _REAL_FRAMES:
        _REAL_FRAMES[key] = load_real_frames(options.real_frames, options.width, options.height,
                                             options.real_depth_threshold)
    return _REAL_FRAMES[key]


def make_and_write(out: str, split: str, index: int, seed: int, options: SyntheticOptions,
                   graph_options: GraphOptions = GraphOptions()) -> Dict:
    """Makes pair `index` (resuming: an existing complete pair is only read back) and returns
    its label. Draws that give no usable pair are replaced by the next attempt."""
    settings = pair_settings(options, graph_options)
    label = finished_label(out, split, index, settings)
    if label is not None:
        return label
    errors = []
    for attempt in range(MAX_ATTEMPTS):
        try:
            pair = make_pair(pair_rng(seed, split, index, attempt), options, index,
                             _real_frames(options), graph_options)
        except (SceneError, GraphError) as error:
            errors.append(str(error))
            continue
        return write_pair(out, split, index, pair, options, graph_options, settings)
    raise RuntimeError(f"pair {index}: no usable draw in {MAX_ATTEMPTS} attempts; the last "
                       f"reasons: {errors[-3:]}")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    geometry.RAY_THREADS = threads


def _work(job) -> Dict:
    return make_and_write(*job)


def generate(out: str, split: str, pairs: int, seed: int, options: SyntheticOptions = SyntheticOptions(),
             graph_options: GraphOptions = GraphOptions(), progress: bool = True) -> List[Dict]:
    """Makes pairs 0..pairs-1 of `split` under `out` (skipping finished ones) with
    options.workers processes, writes out/<split>_graphs.json and returns the labels."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, found {pairs}")
    family_names(options.motions, MOTIONS, "motion")
    if not options.real_frames:
        family_names(options.shapes, SHAPES, "shape")
    jobs = [(out, split, i, seed, options, graph_options) for i in range(pairs)]
    bar = tqdm(total=pairs, desc=f"{split} pairs", unit="pair", disable=not progress)
    labels = []
    if options.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // options.workers)
        with concurrent.futures.ProcessPoolExecutor(
                options.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(threads,)) as pool:
            for label in pool.map(_work, jobs):
                labels.append(label)
                bar.update()
    else:
        for job in jobs:
            labels.append(_work(job))
            bar.update()
    bar.close()
    io.write_labels(os.path.join(out, f"{split}_graphs.json"), labels)
    return labels


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    parser = ArgumentParser(
        prog="python -m dataset.synthetic",
        description="Makes synthetic training or test pairs in the DeepDeform format: a textured "
                    "surface (or the object of real RGB-D frames) under a known smooth non-rigid "
                    "motion, rendered with a z-buffer, depth noise and holes, with exact optical "
                    "flow, scene flow and graph ground truth.")
    add_options(parser, SyntheticOptions, "synthetic data")
    add_options(parser, GraphOptions, "deformation graph")
    args = parser.parse_args(argv)
    try:
        options, graph_options = from_args(args, SyntheticOptions), from_args(args, GraphOptions)
        labels = generate(options.out, options.split, options.pairs, options.seed, options, graph_options)
    except (ValueError, OSError) as error:   # OptionError, FormatError, GraphError, unwritable --out
        raise SystemExit(f"error: {error}") from None
    for motion in sorted({label["motion"] for label in labels}):
        stats = [label["stats"] for label in labels if label["motion"] == motion]
        print(f"{motion:>6}: {len(stats)} pairs, mean optical flow "
              f"{np.mean([s['mean_flow_px'] for s in stats]):.1f} px, mean 3D motion "
              f"{100 * np.mean([s['mean_motion_m'] for s in stats]):.1f} cm, valid "
              f"{100 * np.mean([s['valid_fraction'] for s in stats]):.0f} % of the object")
    print(f"wrote {len(labels)} pairs to {os.path.join(options.out, options.split + '_graphs.json')}")
    return labels

