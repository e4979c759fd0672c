"""Devices, seeding, mixed precision and torch.distributed: what every trainer needs.

Shared by both methods (:mod:`repro.methods.streaming`, :mod:`repro.methods.mil`).

- :func:`select_device` turns ``run.device`` ("auto", "cpu", "cuda", "cuda:N") into a device.
- :func:`seed_everything`, :func:`get_rng_state` / :func:`set_rng_state`: reproducible runs and
  exact resume. The state is made of plain Python values and tensors, so checkpoints holding it
  load with ``torch.load(..., weights_only=True)``.
- :func:`autocast` and :func:`make_grad_scaler`: mixed precision, on CUDA only (the authors'
  code trains with ``torch.cuda.amp``); on CPU both are no-ops.
- :class:`DistributedContext` / :func:`init_distributed`: one process per GPU, launched by
  ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); NCCL on
  CUDA, gloo on CPU. Gradients are summed over ranks with :func:`all_reduce_gradients`, as the
  authors' code does (an all-reduce of the accumulated gradients, not DDP hooks, since one
  mini-batch is many backward passes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from repro.config import RunSettings

logger = logging.getLogger(__name__)

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def select_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device named by ``run.device``.

    Args:
        spec: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        local_rank: under torchrun, "auto" and "cuda" pick ``cuda:<local_rank>``.

    Raises:
        ValueError: an unknown spec, or CUDA asked for where there is none.
    """
    if _DEVICE_PATTERN.fullmatch(spec) is None:
        raise ValueError(f"run.device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"run.device={spec!r} but CUDA is not available on this machine")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", local_rank or 0)
    index = int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"run.device={spec!r} but this machine has {torch.cuda.device_count()} CUDA devices"
        )
    return torch.device(spec)


def set_torch_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch's operators (``run.torch_threads``; 0 keeps torch's
    default of one per core). On a machine shared with other jobs, one thread per process is
    often much faster than several that wait for each other."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and all CUDA devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain values (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`get_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def use_mixed_precision(device: torch.device, enabled: bool) -> bool:
    """Mixed precision is used only on CUDA (``run.mixed_precision``)."""
    return enabled and device.type == "cuda"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when ``enabled``; a no-op context otherwise."""
    if use_mixed_precision(device, enabled):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler, active only with mixed precision on CUDA (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=use_mixed_precision(device, enabled))


def use_channels_last(device: torch.device, enabled: bool) -> bool:
    """channels_last memory format is used only on CUDA (``run.channels_last``)."""
    return enabled and device.type == "cuda"


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and shows progress bars."""
        return self.rank == 0


_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: device, process group, CUDA switches, progress bars.

    ``mixed_precision`` and ``channels_last`` take effect on CUDA only (``run.*``).
    """

    device: torch.device = _CPU
    context: DistributedContext = DistributedContext()
    mixed_precision: bool = False
    channels_last: bool = False
    progress: bool = True

    @classmethod
    def of_run(
        cls,
        settings: RunSettings,
        device: torch.device,
        context: DistributedContext | None = None,
        *,
        progress: bool = True,
    ) -> Runtime:
        """The runtime of ``run.*`` settings (mixed precision, channels_last) on ``device``."""
        return cls(
            device,
            context or DistributedContext(),
            settings.mixed_precision,
            settings.channels_last,
            progress,
        )

    def batch(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images ``(3, H, W)`` (or a stacked batch) as one batch on the device, in the memory
        format the model runs in."""
        batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        batch = batch.to(self.device, non_blocking=True)
        if use_channels_last(self.device, self.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device, in the memory format it runs in."""
        model = model.to(self.device)
        if use_channels_last(self.device, self.channels_last):
            model = model.to(memory_format=torch.channels_last)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        """:func:`autocast` with this runtime's device and switch."""
        return autocast(self.device, self.mixed_precision)

    @property
    def shows_progress(self) -> bool:
        """Progress bars are drawn by the main process only."""
        return self.progress and self.context.is_main


def launched_by_torchrun() -> bool:
    """True when torchrun (or a launcher that mimics it) set the process-group variables."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device_spec: str = "auto", timeout_s: float = 1800) -> DistributedContext:
    """Join the process group that torchrun set up, or run as a single process.

    Backend: NCCL when the job runs on CUDA, gloo on CPU. Already-initialised groups are reused
    (the caller owns them). Returns the rank, world size and local rank.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    context = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)
    logger.info("rank %d of %d (%s, %s)", context.rank, context.world_size, backend, device)
    return context


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if context.enabled:
        dist.barrier()


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], context: DistributedContext):
    """Sum the accumulated gradients over ranks, in place, in one flat buffer per dtype.

    Each rank scales its per-image losses by 1 / (images in the whole mini-batch), so the sum is
    the gradient of the mini-batch mean, as if one process had seen every image.
    """
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in group:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def all_reduce_sum(value: float | int, context: DistributedContext) -> float:
    """Sum of a number over ranks (float64 on CPU tensors; works with gloo and NCCL)."""
    if not context.enabled:
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else "cpu"
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def all_gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` for one process)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_parameters(module: torch.nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start on every rank)."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in _tensors(module):
            dist.broadcast(tensor, src=0)


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _nccl() -> bool:
    return dist.get_backend() == "nccl"
