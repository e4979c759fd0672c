"""Command line: ``python -m repro run params/demo.yaml [--only 03,05] [--out runs/] [--force]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from repro.config import ParamsError
from repro.pipeline import NotebookFailedError, run_pipeline


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m repro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the numbered notebooks for params files")
    run.add_argument("params", nargs="+", help="params YAML files, run one after another")
    run.add_argument("--only", help="comma-separated notebook numbers, e.g. 03,05")
    run.add_argument("--out", help="output root instead of run.out_dir (default runs/)")
    run.add_argument("--force", action="store_true", help="re-run notebooks already complete")
    synth = commands.add_parser("synth", help="generate a synthetic PANDA-format biopsy set")
    synth.add_argument("params", nargs="?", help="params YAML giving data.panda_dir, size, seed")
    synth.add_argument("--out", help="output folder (default: the params' data.panda_dir)")
    synth.add_argument("--images", type=int, help="number of biopsies (data.synthetic_images)")
    synth.add_argument("--size", type=int, help="level-0 width in px (data.synthetic_size)")
    synth.add_argument("--seed", type=int, help="random seed (run.seed)")
    synth.add_argument(
        "--task",
        choices=["local", "context", "plain"],
        help="what separates the classes (data.synthetic_task)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "synth":
        return _synth(args)
    only = args.only.split(",") if args.only else None
    try:
        for params_path in args.params:
            run_dir = run_pipeline(params_path, only=only, out_dir=args.out, force=args.force)
            print(f"{params_path}: executed notebooks are in {run_dir}")
    except (ParamsError, NotebookFailedError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _synth(args: argparse.Namespace) -> int:
    """``python -m repro synth [params.yaml] [--out DIR] [--images N] [--size PX] [--seed S]
    [--task local|context]``."""
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
        task = args.task or (params.data.synthetic_task if params else "local")
        root = generate_synthetic_panda(resolve_path(out), images, size, seed, task)
    except (ParamsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"synthetic PANDA-format set ({task} task, {images} biopsies, {size} px, "
        f"seed {seed}): {root}"
    )
    return 0
