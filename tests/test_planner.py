"""The whole-step memory planner (issue 14): streamed part plus head, counted on the meta device.

Whether the predictions match measured peaks is the benchmark's business
(benchmarks/streaming.py prints both); these tests check what the planner counts.
"""

from __future__ import annotations

import torch
from test_streaming import resnet_part
from torch import nn

from repro.models import build_streaming_resnet
from repro.streaming import (
    StreamingModule,
    _analyze,
    _MemoryModel,
    _probe,
    estimate_peak_bytes,
    plan_tile_size,
)

SHAPE = (1, 3, 2048, 2048)


def test_quadratic_fit_is_exact_for_square_tiles():
    """The fit through three probes predicts a fourth square tile's saved bytes exactly."""
    module = resnet_part("resnet18", "layer2").to("meta")
    model = _MemoryModel(module, SHAPE, torch.float32, False, None, None)
    side, saved, largest, _ = _probe(module, _analyze(module), SHAPE, 13)
    assert abs(model._tile(side, side, model.saved) - saved) <= 1e-6 * saved
    assert abs(model._tile(side, side, model.largest) - largest) <= 1e-6 * largest


def test_head_is_counted_and_found_on_the_streaming_module():
    model = build_streaming_resnet("resnet18", tile_size=1024)
    assert model.streamed.head is model.head
    assert "head" not in dict(model.streamed.named_children())  # not registered twice
    alone = estimate_peak_bytes(model.streamed.module, SHAPE, 1024)
    whole = estimate_peak_bytes(model.streamed, SHAPE, 1024)
    assert whole == estimate_peak_bytes(model.streamed.module, SHAPE, 1024, model.head)
    assert whole > alone
    # the head's share grows with the image (its activations cover the whole map)
    big = (1, 3, 8192, 8192)
    head_big = estimate_peak_bytes(model.streamed, big, 1024) - estimate_peak_bytes(
        model.streamed.module, big, 1024
    )
    assert head_big > 4 * (whole - alone) > 0


def test_kept_tile_and_input_gradient_cost_memory():
    module = resnet_part("resnet18", "layer2")
    head = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.AdaptiveMaxPool2d(1))
    kept = estimate_peak_bytes(module, SHAPE, 512, head)
    assert estimate_peak_bytes(module, SHAPE, 512, head, keep_last_tile=False) < kept
    streaming = StreamingModule(module, 512, keep_last_tile=False, head=head)
    assert estimate_peak_bytes(streaming, SHAPE, 512) < kept
    # the input gradient exists while the streamed part runs backward, the kept tile before
    alone = estimate_peak_bytes(module, SHAPE, 512, keep_last_tile=False)
    grad = estimate_peak_bytes(module, SHAPE, 512, input_grad=True, keep_last_tile=False)
    assert grad - alone == 2048 * 2048 * 3 * 4
    assert estimate_peak_bytes(module, SHAPE, 512, head, input_grad=True) - kept >= 0
    uint8 = estimate_peak_bytes(module, SHAPE, 512, head, input_dtype=torch.uint8)
    assert kept - uint8 == 2048 * 2048 * 3 * 3


def test_plan_tile_size_leaves_room_for_the_head():
    model = build_streaming_resnet("resnet18", tile_size=1024)
    budget = 2**30
    alone = plan_tile_size(model.streamed.module, SHAPE, budget)
    whole = plan_tile_size(model.streamed, SHAPE, budget)
    assert whole <= alone
    assert estimate_peak_bytes(model.streamed, SHAPE, whole) <= budget
    assert estimate_peak_bytes(model.streamed, SHAPE, whole + 16) > budget
