"""repro.training.runtime on one CPU process: devices, the Runtime's batches and switches."""

from __future__ import annotations

import pytest
import torch

from repro.training.runtime import (
    DistributedContext,
    Runtime,
    make_grad_scaler,
    select_device,
    use_channels_last,
    use_mixed_precision,
)


def test_select_device_cpu_and_bad_specs():
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda:0")
    expected = r"run\.device must be auto, cpu, cuda or cuda:N, got 'gpu'"
    with pytest.raises(ValueError, match=expected):
        select_device("gpu")


def test_runtime_batch_stacks_images_on_the_device_unchanged():
    images = [torch.randint(0, 256, (3, 8, 6), dtype=torch.uint8) for _ in range(3)]
    runtime = Runtime(channels_last=True)  # CUDA only: a no-op on the CPU
    batch = runtime.batch(images)
    assert batch.shape == (3, 3, 8, 6) and batch.dtype == torch.uint8
    assert batch.device == torch.device("cpu") and batch.is_contiguous()
    assert torch.equal(batch, torch.stack(images))
    assert torch.equal(runtime.batch(batch), batch)  # an already stacked batch is kept


def test_cuda_switches_are_off_on_the_cpu():
    cpu = torch.device("cpu")
    assert not use_mixed_precision(cpu, True) and not use_channels_last(cpu, True)
    assert not make_grad_scaler(cpu, True).is_enabled()
    runtime = Runtime(mixed_precision=True)
    with runtime.autocast():
        assert not torch.is_autocast_enabled()


def test_progress_bars_on_the_main_process_only():
    assert Runtime().shows_progress
    assert not Runtime(progress=False).shows_progress
    assert not Runtime(context=DistributedContext(rank=1, world_size=2)).shows_progress
