"""Checkpoints: atomic saves and safe loads (the window pick and weight averaging that use them
are :mod:`repro.training.selection`).

Checkpoints are written atomically (:func:`repro.io.atomic.atomic_path`), so a process killed at any
moment leaves either the old file or the new one, never half of one. Loading always uses
``torch.load(weights_only=True)``: checkpoints hold tensors and plain Python values only, never
pickled objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from repro.exceptions import CheckpointError
from repro.io.atomic import PathLike, atomic_path


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` (tensors and plain values) to ``path`` atomically.

    The bytes go to a temporary file next to ``path``, are fsynced, and the file is renamed over
    ``path``; the directory is fsynced too, so the rename survives a power cut.

    Returns:
        The path written.
    """
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        torch.save(dict(state), stream)
    return Path(path)


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file does not exist or cannot be read as a safe checkpoint.
    """
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"checkpoint {source} does not exist")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:  # re-raised with the path
        raise CheckpointError(f"cannot load checkpoint {source}: {error}") from error


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors in ``state`` holding NaN or inf (empty when all finite)."""
    return [
        name
        for name, tensor in state.items()
        if torch.is_tensor(tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]
