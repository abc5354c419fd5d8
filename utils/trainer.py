"""Staged training of the tracker (docs/DESIGN.md 5.5): what train.py runs.

One process, or several under `torchrun` (DistributedDataParallel: gloo on CPU, NCCL on GPU;
a distributed sampler; TensorBoard, checkpoints and validation on rank 0 only).

Nothing is lost: WORKSPACE/EXPERIMENT/checkpoints/last.pt is written atomically every
--checkpoint-every steps and at the end, with the model, optimiser, scheduler, RNG states, the
iteration and the data position; --resume continues from it. best.pt keeps the weights with the
lowest validation EPE 3D. A sample whose solve failed is left out of the solver losses and
counted; it never stops the run.
"""
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from dataset.deepdeform import DeepDeformDataset, collate
from model import losses
from model.correspondences import bilinear_sample, pixel_grid
from model.tracker import Tracker
from options import DataOptions, SolverOptions, TrackerOptions, TrainOptions, to_dict
from utils.checkpoints import CheckpointError, load_tracker, read_checkpoint, save_checkpoint, setup_run
from utils.metrics import pair_errors, pooled
from utils.visualization import flow_to_color, gray_to_rgb, tensor_image


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (also for one process) that can start inside an epoch."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])


def _to(batch: Dict, device) -> Dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class TrainingError(ValueError):
    """Training cannot go on without keeping a broken model (non-finite loss, gradient or
    weights), or ended without a usable best.pt; the message says why."""


def _finite_norm(parameters, grads: bool = False) -> bool:
    """Whether every parameter (or its gradient) is finite, with one reduction per device."""
    tensors = [(p.grad if grads else p).detach() for p in parameters if not grads or p.grad is not None]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def non_finite_tensor(tree, prefix: str = "") -> Optional[str]:
    """The name of the first floating-point tensor in a nested dict/list with a non-finite
    value, or None."""
    if torch.is_tensor(tree):
        return prefix if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    if isinstance(tree, float) and not math.isfinite(tree):
        return prefix
    return None


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM, after the step in flight and a save of last.pt."""


class StopRequests:
    """While active, SIGINT (Ctrl-C) and SIGTERM (a batch system's pre-emption) only set
    `signal`; the training loop reads it after each step, writes last.pt and stops, so nothing
    is lost and --resume continues exactly there. A second signal acts at once, as usual."""

    def __enter__(self) -> "StopRequests":
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        self.signal = signal.Signals(number).name
        self._restore()
        print(f"\n{self.signal}: stopping after this step and saving last.pt (send it again to "
              f"stop at once)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


class Trainer:
    def __init__(self, train: TrainOptions, tracker_options: TrackerOptions,
                 solver_options: SolverOptions, data: DataOptions, log=print):
        self.opt = train
        self.data_options = data
        self.log = log
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cuda = setup_run(train).startswith("cuda")   # OptionError when CUDA is asked for and absent
        if self.distributed:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
            if cuda:
                torch.cuda.set_device(self.device)
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device(train.device if train.device.startswith("cuda")
                                       else "cuda" if cuda else "cpu")
        self.main = self.rank == 0
        self.dir = os.path.join(train.workspace, train.experiment)
        self.checkpoint_dir = os.path.join(self.dir, "checkpoints")
        self._seed(train.seed + self.rank)

        # Training steps use the reference's solver settings with a subset of matches.
        self.train_solver = dataclasses.replace(solver_options, max_matches=train.train_max_matches)
        self.val_solver = solver_options
        tracker_options = dataclasses.replace(tracker_options, flow="network")
        if train.init:
            self.tracker = load_tracker(train.init, tracker_options, self.train_solver, log=self.log)
            if self.main:
                self.log(f"initialised from {train.init}")
        else:
            self.tracker = Tracker(tracker_options, self.train_solver)
        self.tracker.to(self.device)
        for p in self.tracker.flow_net.parameters():
            p.requires_grad_(not train.freeze_flow)
        for p in self.tracker.mask_net.parameters():
            p.requires_grad_(not train.freeze_mask and tracker_options.use_mask)
        trainable = [p for p in self.tracker.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("every parameter is frozen: nothing to train in this stage")
        if train.optimizer == "adam":
            self.optimizer = torch.optim.Adam(trainable, lr=train.learning_rate,
                                              betas=(train.momentum, 0.999), weight_decay=train.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(trainable, lr=train.learning_rate, momentum=train.momentum,
                                             weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, train.lr_step, train.lr_gamma)
        self.model = self.tracker
        if self.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.tracker, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)

        self.train_set = DeepDeformDataset(train.dataset_dir, train.train_split, data,
                                           require_ground_truth=True, augment=True, seed=train.seed)
        if len(self.train_set) < train.batch_size * self.world:
            raise ValueError(f"split '{train.train_split}' has {len(self.train_set)} pairs, fewer than one "
                             f"batch of {train.batch_size} x {self.world} process(es)")
        self.val_set = None
        if train.val_split:
            self.val_set = DeepDeformDataset(train.dataset_dir, train.val_split,
                                             dataclasses.replace(data, color_jitter=0.0, rotation_augmentation=0.0),
                                             require_ground_truth=True)
            if len(self.val_set) == 0:
                raise ValueError(f"--val-split {train.val_split}: {self.val_set.labels_file} has no "
                                 "pairs; give a split with pairs (or an empty --val-split for no "
                                 "validation)")
        self.sampler = ResumableSampler(self.train_set, self.world, self.rank, train.seed)
        # best: (failed solves, EPE 3D mm) of the best validation so far; fewer failures first.
        self.iteration, self.epoch, self.best, self.best_failed = 0, 0, math.inf, math.inf
        self.bad_steps = 0   # steps in a row skipped for a non-finite loss or gradient
        self.stats = {"failed_solves": 0, "samples": 0, "skipped_steps": 0}
        self.writer = None

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    @staticmethod
    def _rng_state() -> dict:
        """Every random state as tensors and numbers (checkpoints load with weights_only)."""
        _, keys, pos, has_gauss, cached = np.random.get_state()
        version, state, gauss = random.getstate()
        return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
                "python_version": version, "python_state": torch.tensor(state, dtype=torch.int64),
                "python_gauss": gauss,
                # One state per visible GPU (dropout, random match subsets drawn on the device).
                "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []}

    @staticmethod
    def _set_rng_state(rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"],
                             rng["numpy_has_gauss"], rng["numpy_cached"]))
        random.setstate((rng["python_version"], tuple(rng["python_state"].tolist()), rng["python_gauss"]))
        cuda_states = rng.get("cuda", [])
        if cuda_states and torch.cuda.is_available():
            # A resume on a machine with fewer GPUs restores those it has.
            torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])

    def _state(self) -> dict:
        # No validation yet is stored as None: a checkpoint holds no non-finite number.
        best_known = math.isfinite(self.best)
        return {"iteration": self.iteration, "epoch": self.epoch,
                "best": self.best if best_known else None,
                "best_failed": int(self.best_failed) if best_known else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": self._rng_state(),
                "stats": dict(self.stats), "train_options": to_dict(self.opt),
                "data_options": to_dict(self.data_options), "sampler_start": self.sampler.start}

    def save(self, name: str) -> str:
        """Writes checkpoints/NAME atomically; refuses (TrainingError) when a weight or an
        optimiser state is not finite, so no checkpoint of any kind holds a broken model."""
        path = os.path.join(self.checkpoint_dir, name)
        state = self._state()
        broken = non_finite_tensor({"model": self.tracker.state_dict(), "optimizer": state["optimizer"]})
        if broken:
            raise TrainingError(f"not writing {path}: {broken} is not finite at iteration {self.iteration}")
        save_checkpoint(path, self.tracker, state)
        return path

    def resume(self) -> bool:
        path = os.path.join(self.checkpoint_dir, "last.pt")
        if not os.path.isfile(path):
            if self.main:
                self.log(f"--resume: no {path} yet, starting from the beginning")
            return False
        obj = read_checkpoint(path)
        broken = non_finite_tensor({"model": obj.get("model", {}), "optimizer": obj.get("optimizer", {})})
        if broken:
            raise CheckpointError(f"{path}: {broken} is not finite; cannot resume from a broken model")
        try:
            self.tracker.load_state_dict(obj["model"])
            self.optimizer.load_state_dict(obj["optimizer"])
            self.scheduler.load_state_dict(obj["scheduler"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot resume from it ({error})") from error
        self.iteration, self.epoch = obj["iteration"], obj["epoch"]
        self.best = math.inf if obj.get("best") is None else obj["best"]
        self.best_failed = math.inf if obj.get("best_failed") is None else obj["best_failed"]
        if math.isfinite(self.best) and obj.get("best_failed") is None:
            self.best_failed = 0   # a checkpoint of before failed solves were ranked
        self.stats = dict(obj.get("stats", self.stats))
        self.sampler.start = int(obj.get("sampler_start", 0))
        self._set_rng_state(obj["rng"])
        if self.main:
            self.log(f"resumed {path} at iteration {self.iteration} (epoch {self.epoch}, best EPE 3D "
                     f"{self.best:.2f} mm)")
        return True

    # ------------------------------------------------------------------------------------------
    # One step

    def _losses(self, batch: Dict, out: Dict) -> Dict[str, torch.Tensor]:
        o = self.opt
        terms, values = [], {}
        if o.use_flow_loss:
            value, _ = losses.flow_loss(out["flow_pyramid"], batch["optical_flow"], out["network_frame"],
                                        o.flow_loss_type)
            terms.append((o.flow_loss_weight, value))
            values["flow"] = value
        # The hybrid front-end's two passes (hybrid_passes 2): each solve is scored, with half
        # the weight, so that the shared head keeps serving the first pass (whose solve the
        # second starts from) as well as the second; the logged values are the final pass's.
        passes = [out] + ([out["first_pass"]] if "first_pass" in out else [])
        share = 1.0 / len(passes)
        for index, one in enumerate(passes if "solver" in out else []):
            result = one["solver"]
            valid = result.valid
            if o.use_graph_loss:
                value, _ = losses.graph_loss(one["translations"], batch["node_deformations"], result.node_valid, valid)
                terms.append((share * o.graph_loss_weight, value))
                if index == 0:
                    values["graph"] = value
            if o.use_warp_loss:
                value, _ = losses.warp_loss(one["warped_points"], batch["source_points"], batch["scene_flow"],
                                            one["warp_mask"], valid)
                terms.append((share * o.warp_loss_weight, value))
                if index == 0:
                    values["warp"] = value
        if o.use_mask_loss and out["weights"] is not None:
            labels, labelled = self._mask_labels(batch, out)
            value, _ = losses.mask_loss(out["weights"], labels, labelled)
            terms.append((o.mask_loss_weight, value))
            values["mask"] = value
        if not terms:
            raise ValueError("no loss is enabled for this stage")
        values["total"] = losses.sum_losses(terms)
        return values

    @staticmethod
    def _mask_labels(batch: Dict, out: Dict):
        flow = out["flow"]
        B, _, H, W = flow.shape
        pixels = pixel_grid(H, W, flow.device, flow.dtype)[None] + torch.nan_to_num(flow).permute(0, 2, 3, 1)
        flowed = bilinear_sample(batch["target_points"], pixels).permute(0, 2, 3, 1)
        truth = (batch["source_points"] + batch["scene_flow"]).permute(0, 2, 3, 1)
        flowed = torch.where(out["match_mask"][..., None], flowed, torch.full_like(flowed, float("nan")))
        return losses.mask_labels(flowed.detach(), truth)

    def step(self, batch: Dict) -> Dict[str, float]:
        self.model.train()
        generator = torch.Generator().manual_seed(self.opt.seed * 1000003 + self.iteration * 97 + self.rank)
        out = self.model(batch, run_solver=self.opt.run_solver, generator=generator)
        values = self._losses(batch, out)
        self.optimizer.zero_grad(set_to_none=True)
        values["total"].backward()
        trainable = [p for p in self.tracker.parameters() if p.requires_grad]
        # Under DDP the gradients are already averaged, so every process sees the same verdict;
        # the loss is reduced too so that a process with a finite one still skips with the rest.
        bad = torch.tensor(float(not bool(torch.isfinite(values["total"].detach()))), device=self.device)
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        what = "loss" if bool(bad) else ("gradient" if not _finite_norm(trainable, grads=True) else None)
        if what is not None:
            self._skip_step(what, values)
        else:
            self.bad_steps = 0
            if self.opt.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, self.opt.grad_clip)
            self.optimizer.step()
            if not _finite_norm(trainable):
                raise TrainingError(
                    f"the weights became non-finite at iteration {self.iteration + 1} after a "
                    f"finite gradient (learning rate {self.scheduler.get_last_lr()[0]:g} too high?); "
                    f"nothing non-finite was saved")
        self.scheduler.step()
        if "solver" in out:
            failed = int((~out["solver"].valid).sum())
            self.stats["failed_solves"] += failed
            values["failed_solves"] = torch.tensor(float(failed))
        self.stats["samples"] += batch["source_color"].shape[0]
        return {k: float(v.detach()) for k, v in values.items()}

    def _skip_step(self, what: str, values: Dict[str, torch.Tensor]) -> None:
        """A step whose loss or gradient is not finite changes no weight; too many in a row
        stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.stats["skipped_steps"] = self.stats.get("skipped_steps", 0) + 1
        terms = ", ".join(f"{k} {float(v):.4g}" for k, v in values.items())
        if self.bad_steps >= self.opt.max_bad_steps:
            raise TrainingError(f"stopped at iteration {self.iteration + 1}: {self.bad_steps} steps in "
                                f"a row with a non-finite {what} (last: {terms}); check the data and "
                                f"--learning-rate (--max-bad-steps {self.opt.max_bad_steps})")
        if self.main:
            tqdm.write(f"warning: iteration {self.iteration + 1}: non-finite {what} ({terms}); step "
                       f"skipped ({self.bad_steps} in a row, --max-bad-steps {self.opt.max_bad_steps})",
                       file=sys.stderr)

    # ------------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        self.tracker.eval()
        saved_solver = self.tracker.solver_options
        self.tracker.solver_options = self.val_solver
        count = len(self.val_set) if not self.opt.val_pairs else min(self.opt.val_pairs, len(self.val_set))
        errors, flow_epe, failed = [], [], 0
        images = []
        try:
            for index in tqdm(range(count), desc="validate", leave=False, disable=not self.main):
                batch = _to(collate([self.val_set[index]]), self.device)
                generator = torch.Generator().manual_seed(index)
                out = self.tracker(batch, generator=generator)
                result = out["solver"]
                n = int(batch["num_nodes"][0])
                translations = out["translations"][0, :n].cpu().numpy()
                # A failed solve is a failure, not a pair of zero motion: it is counted and left
                # out of the errors (so is a solve whose motion is not finite).
                if not bool(result.valid[0]) or not np.isfinite(translations).all():
                    failed += 1
                else:
                    errors.append(pair_errors(batch["name"][0], translations,
                                              batch["node_deformations"][0, :n].cpu().numpy(),
                                              np.nan_to_num(out["scene_flow"][0].cpu().numpy()),
                                              batch["scene_flow"][0].cpu().numpy(),
                                              batch["source_points"][0, 2].cpu().numpy(),
                                              batch["pixel_anchors"][0].cpu().numpy()))
                gt, pred = batch["optical_flow"][0], out["flow"][0]
                ok = torch.isfinite(gt).all(0) & torch.isfinite(pred).all(0)
                if ok.any():
                    flow_epe.append(float((gt - pred).norm(dim=0)[ok].mean()))
                if len(images) < 3:
                    images.append((batch, out))
        finally:
            self.tracker.solver_options = saved_solver
        graph, epe = pooled(errors)
        metrics = {"graph_error_3d_mm": graph, "epe_3d_mm": epe,
                   "flow_epe_2d_px": float(np.mean(flow_epe)) if flow_epe else float("nan"),
                   "failed_solves": failed, "pairs": count}
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, self.iteration)
            for i, (batch, out) in enumerate(images):
                gt = batch["optical_flow"][0].cpu().numpy()
                pred = out["flow"][0].cpu().numpy()
                scale = float(np.nanpercentile(np.linalg.norm(gt, axis=0), 99)) if np.isfinite(gt).any() else None
                panel = np.concatenate([flow_to_color(gt, scale), flow_to_color(pred, scale),
                                        gray_to_rgb(out["weights"][0].cpu().numpy())], axis=1)
                self.writer.add_image(f"val/flow_gt_pred_weights_{i}", tensor_image(panel), self.iteration)
        return metrics

    # ------------------------------------------------------------------------------------------

    def run(self) -> Dict[str, float]:
        """Trains to --max-iterations, validating and saving on the way; returns the last
        validation metrics. Raises TrainingError, Interrupted or a data error, with the progress
        bar closed first so that the message stands on its own line."""
        self._bar = None
        try:
            return self._run()
        finally:
            if self._bar is not None:
                self._bar.close()

    def _run(self) -> Dict[str, float]:
        o = self.opt
        if o.resume:
            self.resume()
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.checkpoint_dir, exist_ok=True)
            self.writer = SummaryWriter(os.path.join(self.dir, "tensorboard"), purge_step=self.iteration or None)
        if self.iteration >= o.max_iterations:
            if self.main:
                self.log(f"already at iteration {self.iteration} of {o.max_iterations}: nothing to do")
            return {}
        bar = self._bar = tqdm(total=o.max_iterations, initial=self.iteration, desc=f"train {o.stage}",
                   disable=not self.main, dynamic_ncols=True)
        start = time.perf_counter()
        last_metrics: Dict[str, float] = {}
        with StopRequests() as stop:
            while self.iteration < o.max_iterations:
                self.sampler.set_epoch(self.epoch)
                self.train_set.epoch = self.epoch
                loader = DataLoader(self.train_set, batch_size=o.batch_size, sampler=self.sampler,
                                    collate_fn=collate, num_workers=o.num_workers, drop_last=True,
                                    persistent_workers=False)
                for batch in loader:
                    values = self.step(_to(batch, self.device))
                    self.iteration += 1
                    self.sampler.start += o.batch_size
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['total']:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.1e}")
                    if self.main and self.iteration % o.log_every == 0:
                        for key, value in values.items():
                            self.writer.add_scalar(f"train/{key}", value, self.iteration)
                        self.writer.add_scalar("train/learning_rate", self.scheduler.get_last_lr()[0], self.iteration)
                        self.writer.add_scalar("train/failed_solves_total", self.stats["failed_solves"], self.iteration)
                    done = self.iteration >= o.max_iterations
                    if self.val_set is not None and (self.iteration % o.val_every == 0 or done):
                        if self.main:
                            last_metrics = self.validate()
                            bar.write(f"iteration {self.iteration}: " + ", ".join(
                                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in last_metrics.items()))
                            if last_metrics["failed_solves"]:
                                bar.write(f"validation: {last_metrics['failed_solves']} of "
                                          f"{last_metrics['pairs']} solves failed (left out of the "
                                          f"errors)")
                            score = (last_metrics["failed_solves"], last_metrics["epe_3d_mm"])
                            if math.isfinite(score[1]) and score < (self.best_failed, self.best):
                                self.best_failed, self.best = score
                                self.save("best.pt")
                        if self.distributed:
                            dist.barrier()
                    if self.main and (self.iteration % o.checkpoint_every == 0 or done
                                      or stop.signal is not None):
                        self.save("last.pt")
                    if stop.signal is not None:
                        bar.close()
                        if self.main:
                            self.writer.flush()
                        raise Interrupted(f"{stop.signal} at iteration {self.iteration}: saved "
                                          f"{os.path.join(self.checkpoint_dir, 'last.pt')}; "
                                          f"--resume continues from it")
                    if done:
                        break
                else:
                    self.epoch += 1
                    self.sampler.start = 0
        bar.close()
        if self.main:
            if self.val_set is None:
                self.save("best.pt")   # without validation the last weights are the best we know
            self.writer.flush()
            if not os.path.isfile(os.path.join(self.checkpoint_dir, "best.pt")):
                raise TrainingError(f"no validation gave a finite EPE 3D (last: {last_metrics}), so "
                                    f"there is no best.pt in {self.checkpoint_dir}; last.pt holds "
                                    f"the last weights")
            self.log(f"done: {self.iteration} iterations in {time.perf_counter() - start:.0f} s, "
                     f"{self.stats['failed_solves']} failed solves in {self.stats['samples']} samples; "
                     f"best validation EPE 3D {self.best:.2f} mm; checkpoints in {self.checkpoint_dir}")
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()
        return last_metrics
