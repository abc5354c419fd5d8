"""Checkpoints: loading ours and the reference's, saving, releasing, and building the tracker a
script runs (`parse_with_checkpoint` + `build_tracker`, shared by generate.py, example_viz.py and
train.py).

Reference-layout checkpoints (DeformableFriends/NeuralTracking):

* a full tracker state dict with keys ``flow_net.*`` (PWC-Net) and ``mask_net.*`` (MaskNet),
  as in ``model_A_0.pt``, possibly wrapped in a dict under ``"state_dict"`` or ``"model"``;
* a flow-only PWC-Net state dict (the ``chairs_things`` file) with bare keys
  (``moduleExtractor.moduleOne.0.weight``, ...).

``load_reference_state_dicts`` turns either into bare-key state dicts for ``model.pwcnet.PWCNet``
and ``model.masknet.MaskNet``; ``check_state_dict`` refuses anything that would not load
exactly, naming the tensor, the expected and found shapes and the file.
"""
import argparse
import dataclasses
import os
import sys
from collections import OrderedDict
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from dataset.fileio import atomic_open
from model.ext import DeviceError, resolve_device
from model.tracker import Tracker
from options import (SOLVER_MACHINE_FIELDS, ArgumentParser, OptionError, RunOptions, SolverOptions, TrackerOptions,
                     check_flag, from_args, from_dict)

FLOW_PREFIX = "flow_net."
MASK_PREFIX = "mask_net."
HYBRID_PREFIX = "hybrid_head."   # ours only: the hybrid front-end's head (model/hybrid.py)
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
DATA_PARALLEL_PREFIX = "module."
# Every PWC-Net tensor name starts with one of these: how a bare flow-only state dict is recognised.
FLOW_BARE_ROOTS = ("moduleExtractor.", "moduleTwo.", "moduleThr.", "moduleFou.", "moduleFiv.",
                   "moduleSix.", "moduleRefiner.")

StateDict = "OrderedDict[str, torch.Tensor]"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the network it is loaded into."""


def _describe(source) -> str:
    return source if isinstance(source, str) else "<in-memory state dict>"


def _unwrap(obj, where: str) -> Mapping:
    """Returns the state dict inside ``obj`` (itself, or one level under a wrapper key)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def load_reference_state_dicts(path_or_dict: Union[str, Mapping]) -> Tuple[StateDict, Optional[StateDict]]:
    """Reads a reference-layout checkpoint.

    Args:
        path_or_dict: a file path (``torch.load``-able; loaded on CPU with ``weights_only=True``)
            or an already loaded object.
    Returns:
        (flow_state, mask_state): bare-key state dicts for ``PWCNet`` and ``MaskNet``;
        ``mask_state`` is None for a flow-only checkpoint.
    Raises:
        CheckpointError: unreadable file, non-tensor entries, or keys of neither layout.
    """
    where = _describe(path_or_dict)
    if isinstance(path_or_dict, str):
        if not os.path.isfile(path_or_dict):
            raise CheckpointError(f"{where}: no such checkpoint file")
        obj = read_checkpoint(path_or_dict)
    else:
        obj = path_or_dict
    state = _unwrap(obj, where)
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
    # A state dict saved from nn.DataParallel has every key under "module.".
    if state and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state):
        state = OrderedDict((key[len(DATA_PARALLEL_PREFIX):], value) for key, value in state.items())
    if any(key.startswith(FLOW_PREFIX) for key in state):
        flow, mask, other = OrderedDict(), OrderedDict(), []
        for key, value in state.items():
            if key.startswith(FLOW_PREFIX):
                flow[key[len(FLOW_PREFIX):]] = value
            elif key.startswith(MASK_PREFIX):
                mask[key[len(MASK_PREFIX):]] = value
            else:
                other.append(key)
        if other:
            raise CheckpointError(f"{where}: unexpected tensor {other[0]!r} (a tracker checkpoint holds only "
                                  f"'{FLOW_PREFIX}*' and '{MASK_PREFIX}*'; {len(other)} such keys)")
        return flow, (mask or None)
    if state and all(key.startswith(FLOW_BARE_ROOTS) for key in state):
        return OrderedDict(state), None
    sample = next(iter(state), None)
    raise CheckpointError(f"{where}: not a reference tracker or PWC-Net checkpoint "
                          f"({len(state)} tensors; first key {sample!r})")


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuses a state dict that does not match ``module`` exactly.

    Args:
        module: the network the state is meant for.
        state: bare-key state dict.
        what: where the state came from (a file name and part), used in messages.
    Raises:
        CheckpointError: naming the first missing, unexpected or mis-shaped tensor, with the
            expected and the found shape.
    """
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"{what}: missing tensor {key!r} (expected shape {tuple(tensor.shape)}, found none)")
        found = state[key]
        if not torch.is_tensor(found):
            raise CheckpointError(f"{what}: tensor {key!r} is a {type(found).__name__} (expected shape {tuple(tensor.shape)})")
        if tuple(found.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{what}: tensor {key!r} has shape {tuple(found.shape)}, "
                                  f"expected {tuple(tensor.shape)}")
        if found.is_floating_point() and not bool(torch.isfinite(found).all()):
            bad = int((~torch.isfinite(found)).sum())
            raise CheckpointError(f"{what}: tensor {key!r} has {bad} non-finite value(s); the "
                                  f"weights are broken (e.g. trained with a diverging learning rate)")
    for key, found in state.items():
        if key not in expected:
            shape = tuple(found.shape) if torch.is_tensor(found) else type(found).__name__
            raise CheckpointError(f"{what}: unexpected tensor {key!r} (found shape {shape}, expected none)")


def load_reference_checkpoint(flow_net: nn.Module, mask_net: Optional[nn.Module],
                              path_or_dict: Union[str, Mapping]) -> bool:
    """Loads a reference-layout checkpoint into the networks after checking every tensor.

    Args:
        flow_net: a ``PWCNet``.
        mask_net: a ``MaskNet``, or None to load the flow part only.
        path_or_dict: as for ``load_reference_state_dicts``.
    Returns:
        True if mask weights were loaded, False for a flow-only checkpoint (``mask_net`` is
        then left as it was).
    Raises:
        CheckpointError: see ``load_reference_state_dicts`` and ``check_state_dict``.
    """
    where = _describe(path_or_dict)
    flow_state, mask_state = load_reference_state_dicts(path_or_dict)
    check_state_dict(flow_net, flow_state, f"{where} (flow_net)")
    if mask_net is not None and mask_state is not None:
        check_state_dict(mask_net, mask_state, f"{where} (mask_net)")
    flow_net.load_state_dict(flow_state)
    if mask_net is None or mask_state is None:
        return False
    mask_net.load_state_dict(mask_state)
    return True


# ----------------------------------------------------------------------------------------------
# Our checkpoints: the tracker's weights together with the options that built it, so that a
# model is rebuilt from the file alone; training state (optimiser, scheduler, RNG, iteration)
# rides along for --resume.

FORMAT = "nnrt-tracker"
FORMAT_VERSION = 1


def save_checkpoint(path: str, tracker: nn.Module, extra: Optional[dict] = None) -> None:
    """Writes the tracker (state dict with reference key names, tracker and solver options)
    and `extra` (training state) atomically."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION,
               "tracker_options": dataclasses.asdict(tracker.options),
               "solver_options": dataclasses.asdict(tracker.solver_options),
               "model": tracker.state_dict()}
    payload.update(extra or {})
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


# What a released checkpoint keeps of a training checkpoint: the model, the options that built
# and trained it, and where it stood; not the optimiser, scheduler or RNG states (two thirds of
# the file), which only --resume needs.
RELEASE_KEYS = ("format", "version", "tracker_options", "solver_options", "model", "iteration",
                "best", "stats", "train_options", "data_options")


def export_checkpoint(source: str, out: str, history: Optional[list] = None,
                      training_solver: bool = False) -> dict:
    """Writes the weights-only release of training checkpoint `source` to `out` (atomically).

    `history` (e.g. the training checkpoints of the earlier stages, with their options) is stored
    under "history", so the release says how it was made. The release solves as in training (the
    match count sets the data/ARAP balance the weighting head learned) but with the default
    robust reweighting, which training leaves off to keep the reference's gradients: on our
    real-frame synthetic pairs it lowered EPE 3D from 28.1 to 26.9 mm. `training_solver` keeps the
    training options as they were; either way they are also stored under
    "training_solver_options". Returns the written payload."""
    obj = read_checkpoint(source)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not one of our training checkpoints (format "
                              f"{obj.get('format')!r}, expected {FORMAT!r})")
    payload = {key: obj[key] for key in RELEASE_KEYS if key in obj}
    if not training_solver and "solver_options" in payload:
        payload["training_solver_options"] = dict(payload["solver_options"])
        defaults = SolverOptions()
        payload["solver_options"].update(robust_loss=defaults.robust_loss, robust_scale=defaults.robust_scale)
    payload["exported_from"] = os.path.basename(source)
    if history:
        payload["history"] = history
    with atomic_open(out, "wb") as handle:
        torch.save(payload, handle)
    return payload


def read_checkpoint(path: str) -> dict:
    """Loads a checkpoint file (ours or the reference's) on CPU, with a clear error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch's message runs over several lines of advice about weights_only; its first line
        # says what failed.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"not a checkpoint: {path} ({first[:160]})") from error


def checkpoint_options(obj: Mapping, source: Optional[str] = None) -> Tuple[dict, dict]:
    """(tracker options, solver options) stored in one of our checkpoints; ({}, {}) for a
    reference-layout checkpoint. With `source` (the file), the stored values are checked first:
    CheckpointError naming the file and the option out of range."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        tracker, solver = dict(obj.get("tracker_options", {})), dict(obj.get("solver_options", {}))
        if source is not None:
            try:
                from_dict(TrackerOptions, tracker, source)
                from_dict(SolverOptions, solver, source)
            except (TypeError, ValueError) as error:   # OptionError, or a field of another type
                raise CheckpointError(f"{source}: stored options unusable ({error})") from error
        for name in SOLVER_MACHINE_FIELDS:
            solver.pop(name, None)
        return tracker, solver
    return {}, {}


def load_tracker(path: str, tracker_options=None, solver_options=None, log=print):
    """Builds a network tracker from a checkpoint: ours (options stored in it; `tracker_options`
    and `solver_options`, when given, replace them) or a reference-layout one (a full tracker
    state dict, or a flow-only PWC-Net one, which disables the weighting head)."""
    obj = read_checkpoint(path)
    stored_tracker, stored_solver = checkpoint_options(obj)
    try:
        options = tracker_options or from_dict(TrackerOptions, stored_tracker, path)
        solver = solver_options or from_dict(SolverOptions, stored_solver, path)
    except ValueError as error:   # OptionError: a stored option out of range
        raise CheckpointError(str(error)) from error
    # The cost volume is part of what the weights mean: the checkpoint's own choice wins, and a
    # reference-layout checkpoint (no options stored) was trained with the product volume. Only
    # overriding a stored choice is worth a message: for reference checkpoints the flag's
    # default simply does not apply.
    cost_volume = stored_tracker.get("cost_volume", "product")
    if tracker_options is not None and "cost_volume" in stored_tracker and options.cost_volume != cost_volume:
        log(f"{path}: using the checkpoint's '{cost_volume}' cost volume (not '{options.cost_volume}')")
    options = dataclasses.replace(options, flow="network", cost_volume=cost_volume)
    obj, hybrid_state = split_hybrid_state(obj)
    try:
        flow_state, mask_state = load_reference_state_dicts(obj)
    except CheckpointError as error:
        raise CheckpointError(str(error).replace(_describe(obj), path)) from error
    if mask_state is None and options.use_mask:
        log(f"{path}: flow-only checkpoint, so the weighting head is off (every weight is 1)")
        options = dataclasses.replace(options, use_mask=False)
    tracker = Tracker(options, solver)
    check_state_dict(tracker.flow_net, flow_state, f"{path} (flow_net)")
    tracker.flow_net.load_state_dict(flow_state)
    if mask_state is not None:
        check_state_dict(tracker.mask_net, mask_state, f"{path} (mask_net)")
        tracker.mask_net.load_state_dict(mask_state)
    if options.network_flow == "hybrid":
        if hybrid_state:
            check_state_dict(tracker.hybrid_head, hybrid_state, f"{path} (hybrid_head)")
            tracker.hybrid_head.load_state_dict(hybrid_state)
        else:
            log(f"{path}: no hybrid head in this checkpoint, so it starts untrained (its "
                f"hand-made rule: DIS where consistent, else PWC-Net)")
    return tracker


def split_hybrid_state(obj: Mapping) -> Tuple[Mapping, "OrderedDict[str, torch.Tensor]"]:
    """(the checkpoint without its hybrid head's tensors, those tensors with bare keys). Only
    our checkpoints hold a hybrid head; anything else comes back as it was, with none."""
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT and isinstance(obj.get("model"), Mapping)):
        return obj, OrderedDict()
    rest, hybrid = OrderedDict(), OrderedDict()
    for key, value in obj["model"].items():
        if key.startswith(HYBRID_PREFIX):
            hybrid[key[len(HYBRID_PREFIX):]] = value
        else:
            rest[key] = value
    return {**obj, "model": rest}, hybrid


SHIPPED_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "checkpoints", "nnrt_hybrid.pt")


def default_checkpoint() -> Optional[str]:
    """The checkpoint shipped in checkpoints/, when there is one."""
    return SHIPPED_CHECKPOINT if os.path.isfile(SHIPPED_CHECKPOINT) else None


def stage_summary(path: str) -> dict:
    """What `history` records of one training checkpoint: file, iteration, best score, options."""
    obj = read_checkpoint(path)
    return {"file": path, "iteration": obj.get("iteration"), "best": obj.get("best"),
            "train_options": obj.get("train_options"), "data_options": obj.get("data_options")}


# ----------------------------------------------------------------------------------------------
# The tracker a script runs. Options stored in the checkpoint become the defaults of the tracker
# and solver flags (flags given still win); then the front-end is picked and the tracker built.


class MissingCheckpointError(CheckpointError):
    """--flow network without a checkpoint given or shipped."""


def default_checkpoint_for(args: argparse.Namespace) -> Optional[str]:
    """--checkpoint, else the shipped checkpoint when the network front-end may be wanted."""
    return args.checkpoint or (default_checkpoint() if args.flow in (None, "network") else None)


def parse_with_checkpoint(make_parser: Callable[..., argparse.ArgumentParser], argv: Sequence[str],
                          checkpoint_of: Callable[[argparse.Namespace], Optional[str]]
                          ) -> Tuple[argparse.Namespace, Optional[str]]:
    """Parses `argv` twice: a first pass (``make_parser(None, {}, {})``, unknown flags allowed)
    names the checkpoint (``checkpoint_of(first)``); its stored tracker options (but the
    front-end) and solver options then become the defaults of the second, full pass
    (``make_parser(first, stored_tracker, stored_solver)``). Returns (args, checkpoint)."""
    first, _ = make_parser(None, {}, {}).parse_known_args(argv)
    checkpoint = checkpoint_of(first)
    stored_tracker, stored_solver = (checkpoint_options(read_checkpoint(checkpoint), checkpoint)
                                     if checkpoint else ({}, {}))
    stored_tracker.pop("flow", None)
    return make_parser(first, stored_tracker, stored_solver).parse_args(argv), checkpoint


def pick_front_end(args: argparse.Namespace, checkpoint: Optional[str]) -> bool:
    """Without --flow: the network front-end when there is a checkpoint, DIS otherwise (sets
    args.flow). Returns whether the choice was made here (the scripts then say so)."""
    if args.flow is not None:
        return False
    args.flow = "network" if checkpoint else "dis"
    return True


def build_tracker(args: argparse.Namespace, checkpoint: Optional[str], log=print) -> Tracker:
    """The tracker of parsed tracker and solver flags (after `pick_front_end`); the network
    front-end loads `checkpoint` (MissingCheckpointError without one)."""
    pick_front_end(args, checkpoint)
    tracker_options, solver_options = from_args(args, TrackerOptions), from_args(args, SolverOptions)
    if args.flow != "network":
        return Tracker(tracker_options, solver_options)
    if not checkpoint:
        raise MissingCheckpointError("--flow network needs --checkpoint (no checkpoint is shipped)")
    return load_tracker(checkpoint, tracker_options, solver_options, log=log)


def setup_run(run: RunOptions) -> str:
    """Applies --threads and returns the torch device --device names ("auto": cuda when torch
    sees a GPU and nnrt_ext has its CUDA launchers, see model.ext.resolve_device)."""
    if run.threads:
        torch.set_num_threads(run.threads)
    try:
        return str(resolve_device(run.device))
    except DeviceError as error:
        raise OptionError(str(error)) from None


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m utils.checkpoints",
        description="Export a training checkpoint as a weights-only release (model and the "
                    "options that built and trained it; no optimiser state), e.g. for checkpoints/.")
    parser.add_argument("source", help="training checkpoint (WORKSPACE/EXPERIMENT/checkpoints/best.pt)")
    parser.add_argument("out", help="release file to write")
    parser.add_argument("--history", nargs="*", default=[],
                        help="training checkpoints of the earlier stages, recorded in the release")
    parser.add_argument("--training-solver", action="store_true",
                        help="solve with the training options as they are (plain least squares) "
                             "instead of adding the default robust reweighting")
    args = parser.parse_args(argv)
    try:
        check_flag("OUT", args.out, str, path="out_file")
        history = [stage_summary(path) for path in args.history] + [stage_summary(args.source)]
        payload = export_checkpoint(args.source, args.out, history, args.training_solver)
    except (CheckpointError, OptionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.out) / 2 ** 20
    print(f"wrote {args.out} ({size:.1f} MiB): iteration {payload.get('iteration')} of stage "
          f"{(payload.get('train_options') or {}).get('stage')}, best validation EPE 3D "
          f"{payload.get('best')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
