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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    only = args.only.split(",") if args.only else None
    try:
        for params_path in args.params:
            run_dir = run_pipeline(params_path, only=only, out_dir=args.out, force=args.force)
            print(f"{params_path}: executed notebooks are in {run_dir}")
    except (ParamsError, NotebookFailedError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
