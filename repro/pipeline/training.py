"""Training from the command line (``python -m repro train streaming|mil params/X.yaml``), also
under ``torchrun``: read the params, join the process group torchrun set up (or run alone), train,
leave the group again. The README's multi-GPU section shows the launch lines."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from repro.config import load_params
from repro.methods.mil import train_mil
from repro.methods.streaming import train_streaming
from repro.training.runtime import init_distributed, shutdown_distributed

TRAINERS = {"streaming": train_streaming, "mil": train_mil}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's arguments."""
    parser.add_argument("method", choices=sorted(TRAINERS), help="which method to train")
    parser.add_argument("params", help="params YAML, e.g. params/full.yaml")
    parser.add_argument("--out", help="output root instead of run.out_dir")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def train_command(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {"run": {"out_dir": str(Path(args.out).resolve())}} if args.out else None
    params = load_params(args.params, overrides=overrides)
    context = init_distributed(params.run.device)
    try:
        result = TRAINERS[args.method](params, progress=not args.no_progress, context=context)
        if context.is_main:
            print(f"final weights: {result.final_path}")
    finally:
        shutdown_distributed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m repro.pipeline.training streaming params/X.yaml``."""
    parser = argparse.ArgumentParser(prog="python -m repro train", description=__doc__)
    add_arguments(parser)
    return train_command(parser.parse_args(argv))
