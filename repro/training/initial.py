"""The weights a run starts from, made once and shared by every rank and every restart.

Both methods start the same way: rank 0 builds the model, sets what the data decides (the
streaming model's input normalisation; the batch-norm statistics of a randomly initialised
network, :func:`calibrate_if_random`) and saves the result as ``init.pt`` together with the
settings it depends on; every rank then loads it. A restart loads the same file instead of
recomputing it, and a restart with other settings is an error, not a silent mix of two runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from repro.exceptions import CheckpointError
from repro.io.atomic import write_text_atomic
from repro.io.checkpoints import load_checkpoint, save_checkpoint
from repro.layout import MethodLayout
from repro.nn.resnet import calibrate_batchnorm
from repro.training.runtime import DistributedContext, barrier, seed_everything


def initial_weights(
    model: nn.Module,
    files: MethodLayout,
    made_with: Any,
    prepare: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int,
    context: DistributedContext | None = None,
) -> None:
    """Load the run's initial weights into ``model``, making ``init.pt`` first if needed.

    Args:
        model: freshly built (same weights on every rank for a given seed).
        files: the method's run folder.
        made_with: plain values the initial weights depend on, stored in ``init.pt`` and checked
            on every later start.
        prepare: run by rank 0 when ``init.pt`` is missing: sets up ``model`` (normalisation,
            batch-norm statistics) and returns plain values to store beside the weights.
        seed: the global RNGs are re-seeded afterwards, so training starts from the same state
            whether or not ``init.pt`` was made in this process.
        context: rank 0 makes the file, every rank loads it.

    Raises:
        CheckpointError: ``init.pt`` (and so the checkpoints) were made with other settings.
    """
    context = context or DistributedContext()
    if context.is_main and not files.init.exists():
        extra = prepare(model)
        save_checkpoint({**extra, "model": model.state_dict(), "made_with": made_with}, files.init)
    barrier(context)
    state = load_checkpoint(files.init)
    if state.get("made_with") != made_with:
        raise CheckpointError(
            f"{files.init} was made with other settings ({state.get('made_with')}) than these "
            f"({made_with}); use the params of that run to resume it, or delete {files.root} to "
            "start over"
        )
    model.load_state_dict(state["model"])
    seed_everything(seed)


def calibrate_if_random(
    model: nn.Module,
    files: MethodLayout,
    *,
    pretrained: bool,
    count: int,
    count_key: str,
    batches: Callable[[int], tuple[Iterable[torch.Tensor], dict[str, Any]]],
) -> dict[str, Any]:
    """Batch-norm statistics from ``count`` training images when the network is randomly
    initialised (pretrained weights keep theirs, as in the paper); the record is written to
    ``batchnorm_calibration.json`` and returned.

    Args:
        pretrained: the weights came from ImageNet or a file.
        count: images to estimate the statistics from (``<section>.calibrate_batchnorm_images``);
            0 keeps mean 0, variance 1.
        count_key: the params key of ``count``, for the record.
        batches: ``batches(count)`` gives float image batches in [0, 1] and plain values saying
            what they are (which images, which crops).
    """
    if pretrained or count == 0:
        reason = (
            "pretrained weights: their batch-norm statistics are kept (paper)"
            if pretrained
            else f"{count_key} is 0: batch norm keeps mean 0, variance 1"
        )
        record: dict[str, Any] = {"calibrated": False, "reason": reason}
    else:
        images, details = batches(count)
        calibrate_batchnorm(model, images)
        record = {
            "calibrated": True,
            "reason": "random initialisation: frozen batch norm needs statistics of this data",
            **details,
        }
    write_text_atomic(files.batchnorm_calibration, json.dumps(record, indent=2) + "\n")
    return record
