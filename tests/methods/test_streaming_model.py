"""repro.methods.streaming.build_model / resolve_tile_size: the model of a params file and its
tile size."""

from __future__ import annotations

import pytest

from repro.methods.streaming import build_model, resolve_tile_size


@pytest.fixture
def model_params(make_params):
    """``model_params(**streaming)``: a random-init ResNet-18 over 768 px images."""
    return lambda **streaming: make_params(
        data={"input_size": 768},
        streaming={"arch": "resnet18", "weights": None, **streaming},
    )


def test_tile_size_from_params(model_params):
    params = model_params(tile_size=608)
    assert resolve_tile_size(params) == 608
    model = build_model(params)
    assert model.streamed.tile_size == (608, 608)
    assert len(model.streamed.plan((1, 3, 768, 768)).tiles) == 4


def test_tile_size_planned_from_the_memory_budget(model_params):
    small, large = model_params(memory_budget_gb=0.25), model_params(memory_budget_gb=1.0)
    tile_small, tile_large = resolve_tile_size(small), resolve_tile_size(large)
    assert tile_small % 16 == 0 and tile_large % 16 == 0
    assert 226 <= tile_small <= tile_large
    assert build_model(small).streamed.tile_size == (tile_small, tile_small)


def test_too_small_a_budget_is_an_error(model_params):
    with pytest.raises(ValueError, match="too small"):
        resolve_tile_size(model_params(memory_budget_gb=0.001))
