"""Staged training of the tracker (docs/DESIGN.md 5.5).

    python train.py --stage {0_flow,1_solver,2_mask,3_refine} --dataset-dir D --train-split S
                    --val-split V --experiment NAME --workspace W [--init CKPT] [--resume]
                    [--max-iterations N] [--batch-size B] [...]

Each stage is a named preset (options.STAGES) of which losses run, which parts are frozen and
whether the solver runs; flags override it. Tracker options stored in the --init checkpoint
(network input size, ...) carry over. Outputs: W/NAME/checkpoints/{last,best}.pt and
W/NAME/tensorboard. Several processes: `torchrun --nproc_per_node=2 train.py ...`.
"""
import argparse
import sys

from options import (STAGES, TRAIN_SOLVER_DEFAULTS, ArgumentParser, DataOptions, SolverOptions,
                     TrackerOptions, TrainOptions, add_options, from_args)
from utils.checkpoints import CheckpointError, parse_with_checkpoint
from utils.trainer import Interrupted, Trainer


def build_parser(first=None, stored_tracker=None, stored_solver=None) -> argparse.ArgumentParser:
    """The flags of train.py; the stage named in a first pass (`first`) sets the presets."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage = first.stage if first is not None else "0_flow"
    preset = STAGES[stage]
    add_options(parser, TrainOptions, "training", defaults={"stage": stage, **preset.get("train", {})})
    add_options(parser, TrackerOptions, "tracker",
                defaults={**(stored_tracker or {}), **preset.get("tracker", {}), "flow": "network"})
    add_options(parser, SolverOptions, "solver", defaults={**(stored_solver or {}), **TRAIN_SOLVER_DEFAULTS})
    add_options(parser, DataOptions, "data")
    return parser


def one_line(error: Exception) -> str:
    """The message of an error; for one re-raised from a data-loading worker (which carries the
    worker's traceback), the original error's own line."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # Tracker options stored in the --init checkpoint become the defaults.
        args, _ = parse_with_checkpoint(build_parser, argv, lambda first: first.init)
        trainer = Trainer(from_args(args, TrainOptions), from_args(args, TrackerOptions),
                          from_args(args, SolverOptions), from_args(args, DataOptions))
        try:
            trainer.run()
        except Interrupted as stop:
            print(f"interrupted: {stop}", file=sys.stderr)
            return 130  # what a shell reports for Ctrl-C, so run_train.sh stops here too
    except (CheckpointError, ValueError) as error:   # OptionError, DatasetError, TrainingError
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
