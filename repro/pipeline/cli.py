"""Command line of the package.

- ``python -m repro run params/demo.yaml [--only 03,05] [--out runs/] [--force] [--verbose]``:
  the numbered notebooks (``--verbose`` also shows papermill's log and the kernel's output).
- ``python -m repro train streaming|mil params/full.yaml [--out DIR] [--no-progress]``: one
  method's training outside the notebooks, also under ``torchrun`` (README, multi-GPU).
- ``python -m repro synth [params.yaml] [--task plain|local|context] ...``: a synthetic
  PANDA-format biopsy set.

Commands import what they need when they run, so ``run`` and ``synth`` start without torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from repro.config import SYNTHETIC_TASKS
from repro.exceptions import ParamsError
from repro.pipeline.runner import NotebookFailedError, run_pipeline


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m repro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the numbered notebooks for params files")
    run.add_argument("params", nargs="+", help="params YAML files, run one after another")
    run.add_argument("--only", help="comma-separated notebook numbers, e.g. 03,05")
    run.add_argument("--out", help="output root instead of run.out_dir (default runs/)")
    run.add_argument("--force", action="store_true", help="re-run notebooks already complete")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="also show papermill's log and the kernel's output (always in runs/<exp>/run.log)",
    )
    train = commands.add_parser("train", help="train one method (also under torchrun)")
    train.add_argument("method", choices=("streaming", "mil"), help="which method to train")
    train.add_argument("params", help="params YAML, e.g. params/full.yaml")
    train.add_argument("--out", help="output root instead of run.out_dir")
    train.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    synth = commands.add_parser("synth", help="generate a synthetic PANDA-format biopsy set")
    synth.add_argument("params", nargs="?", help="params YAML giving data.panda_dir, size, seed")
    synth.add_argument("--out", help="output folder (default: the params' data.panda_dir)")
    synth.add_argument("--images", type=int, help="number of biopsies (data.synthetic_images)")
    synth.add_argument("--size", type=int, help="level-0 width in px (data.synthetic_size)")
    synth.add_argument("--seed", type=int, help="random seed (run.seed)")
    synth.add_argument(
        "--task",
        choices=SYNTHETIC_TASKS,
        help="what separates the classes (data.synthetic_task; default plain)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "synth":
        return _synth(args)
    if args.command == "train":
        from repro.pipeline.training import train_command

        try:
            return train_command(args)
        except (ParamsError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    only = args.only.split(",") if args.only else None
    try:
        for params_path in args.params:
            run_dir = run_pipeline(
                params_path, only=only, out_dir=args.out, force=args.force, verbose=args.verbose
            )
            print(f"{params_path}: executed notebooks and run.log are in {run_dir}")
    except (ParamsError, NotebookFailedError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _synth(args: argparse.Namespace) -> int:
    """``python -m repro synth [params.yaml] [--out DIR] [--images N] [--size PX] [--seed S]
    [--task T]``."""
    from repro.config import load_params, resolve_path
    from repro.data.synthetic import generate_synthetic_panda

    try:
        if args.params is None and None in (args.out, args.images, args.size):
            raise ValueError("give a params file, or all of --out, --images and --size")
        params = load_params(args.params) if args.params else None
        out = args.out or params.data.panda_dir
        images = args.images if args.images is not None else params.data.synthetic_images
        size = args.size if args.size is not None else params.data.synthetic_size
        seed = args.seed if args.seed is not None else (params.run.seed if params else 0)
        task = args.task or (params.data.synthetic_task if params else "plain")
        root = generate_synthetic_panda(resolve_path(out), images, size, seed, task)
    except (ParamsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"synthetic PANDA-format set ({task} task, {images} biopsies, {size} px, seed {seed}): "
        f"{root}"
    )
    return 0
