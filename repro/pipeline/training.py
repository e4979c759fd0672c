"""``python -m repro train streaming|mil params/X.yaml``, also under ``torchrun``: read the params,
join the process group torchrun set up (or run alone), train, leave the group again. The README's
multi-GPU section shows the launch lines."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from repro.config import load_params
from repro.methods.mil import train_mil
from repro.methods.streaming import train_streaming
from repro.training.runtime import init_distributed, shutdown_distributed

TRAINERS = {"streaming": train_streaming, "mil": train_mil}


def train_command(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand (``args.method``, ``args.params``, ``args.out``,
    ``args.no_progress``); returns the exit code."""
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
