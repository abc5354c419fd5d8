"""Predictions on a dataset split (what generate.py runs), resumable and shardable.

Per pair `<name>` it writes, each atomically (temporary file, then rename):
    <out>/<name>_node_translations.bin   one row per graph node (graph_node_deformations layout)
    <out>/<name>_sceneflow.sflow         (3, H, W) scene flow at the full input size for every
                                         source pixel with 4 anchors and valid depth; -inf elsewhere
Pairs whose two files exist are skipped, so an interrupted run resumes. A failed solve is
reported and written as the identity motion (zero translations), never stopping the run; a
pair whose files cannot be read (or fail their checks) is listed in `bad_pairs` and skipped.

With residual options (generate.py --residual) each solved pair's graph warp is refined by a
freshly fitted 4D hash-grid residual deformer (model/residual.py): the scene flow written then
includes the residual, while the node translations stay the graph's (the residual moves points,
not nodes). Pairs whose solve failed keep the identity motion, without a residual.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from dataset import io
from dataset.deepdeform import DatasetError, DeepDeformDataset, collate, make_subset
from dataset.fileio import atomic_write_bytes
from model.residual import fit_residual
from model.tracker import Tracker
from options import ResidualOptions


@dataclass
class GenerationSummary:
    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed_solves: Dict[str, str] = field(default_factory=dict)   # name -> reason
    bad_pairs: Dict[str, str] = field(default_factory=dict)       # name -> why it cannot be read
    seconds: float = 0.0
    residual_seconds: Dict[str, float] = field(default_factory=dict)   # name -> fitting seconds
    residual_iterations: Dict[str, int] = field(default_factory=dict)  # name -> Adam steps run


def generate(dataset: DeepDeformDataset, tracker: Tracker, out_dir: str, shard: int = 0,
             num_shards: int = 1, overwrite: bool = False, device: str = "cpu",
             limit: Optional[int] = None, progress: bool = True, log=print,
             residual: Optional[ResidualOptions] = None) -> GenerationSummary:
    """Runs the tracker on shard `shard` of `num_shards` of the dataset and writes predictions;
    with `residual`, refines each solved pair's scene flow by a fitted residual deformer."""
    os.makedirs(out_dir, exist_ok=True)
    summary = GenerationSummary()
    start = time.perf_counter()
    indices = make_subset(dataset, shard, num_shards, limit)
    tracker.eval().to(device)
    bar = tqdm(indices, desc=f"generate {dataset.split} [{shard + 1}/{num_shards}]", disable=not progress)
    for index in bar:
        name = dataset.name(index)
        if not overwrite and all(os.path.isfile(p) for p in io.prediction_paths(out_dir, name)):
            summary.skipped.append(name)
            continue
        try:
            batch = collate([dataset[index]])
        except DatasetError as error:
            # A pair whose files are broken is listed and skipped; the others still run.
            summary.bad_pairs[name] = str(error)
            (bar.write if progress else log)(f"skipped: {error}")
            continue
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        # A fixed generator makes the match subsampling (if enabled) repeatable per pair.
        generator = torch.Generator().manual_seed(index)
        with torch.inference_mode():
            out = tracker(batch, generator=generator)
        result = out["solver"]
        num_nodes = int(batch["num_nodes"][0])
        if not bool(result.valid[0]):
            summary.failed_solves[name] = result.messages[0]
            (bar.write if progress else log)(f"{name}: solve failed ({result.messages[0]}); "
                                             "writing the identity motion")
        scene_flow = out["scene_flow"]
        if residual is not None and bool(result.valid[0]):
            fit = fit_residual(batch, out, residual, max_depth=tracker.solver_options.max_depth)
            scene_flow = fit["scene_flow"]
            summary.residual_seconds[name] = fit["stats"][0]["seconds"]
            summary.residual_iterations[name] = fit["stats"][0]["iterations"]
            bar.set_postfix(residual=f"{fit['stats'][0]['seconds']:.1f}s")
        io.write_prediction(out_dir, name, out["translations"][0, :num_nodes].cpu().numpy(),
                         scene_flow[0].cpu().numpy())
        summary.written.append(name)
    summary.seconds = time.perf_counter() - start
    record = {"split": dataset.split, "shard": shard, "num_shards": num_shards,
              "written": len(summary.written), "skipped": len(summary.skipped),
              "failed_solves": summary.failed_solves, "bad_pairs": summary.bad_pairs,
              "seconds": round(summary.seconds, 2)}
    if residual is not None:
        record["residual"] = {"options": {"residual_" + k: v for k, v in dataclasses.asdict(residual).items()},
                              "seconds": {k: round(v, 2) for k, v in summary.residual_seconds.items()},
                              "iterations": summary.residual_iterations}
    atomic_write_bytes(os.path.join(out_dir, f"generate_{dataset.split}_shard{shard}of{num_shards}.json"),
                       (json.dumps(record, indent=1) + "\n").encode())
    return summary
