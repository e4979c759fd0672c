"""repro.evaluation.saliency: input gradients through the streaming engine equal plain autograd;
SmoothGrad, the gradient's reduction to a map, and the map cache."""

import numpy as np
import pytest
import torch
from torch import nn

import repro.evaluation.saliency as saliency
from repro.config import Params
from repro.evaluation.saliency import (
    frozen,
    image_std,
    input_gradient,
    reduce_gradient,
    smoothgrad,
    smoothgrad_map,
)
from repro.nn.resnet import build_streaming_resnet
from repro.nn.streaming import StreamingModule


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)


class TinyStreamingNet(nn.Module):
    """A small streamed conv net + head: fast enough to check SmoothGrad's bookkeeping."""

    def __init__(self, tile_size: int):
        super().__init__()
        body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        )
        self.streamed = StreamingModule(body, tile_size)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1), nn.Linear(4, 1))

    def forward(self, x):
        return self.head(self.streamed(x))

    def plain(self) -> nn.Module:
        return nn.Sequential(self.streamed.module, self.head)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = build_streaming_resnet("resnet18", weights=None, stream_until="layer1", tile_size=96)
    randomise_batchnorm(model)
    return model.double()


def test_input_gradient_through_streaming_equals_plain_gradient(resnet):
    image = torch.rand(3, 128, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert len(resnet.streamed.plan(image.shape).tiles) > 1  # really tiled
    streamed = input_gradient(resnet, image)
    plain = input_gradient(nn.Sequential(resnet.streamed.module, resnet.head), image)
    assert streamed.shape == image.shape and streamed.dtype == torch.float64
    scale = plain.abs().max()
    assert scale > 0
    assert (streamed - plain).abs().max() / scale <= 1e-10


def test_input_gradient_leaves_model_untouched():
    model = TinyStreamingNet(tile_size=24)
    model.streamed.module[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    input_gradient(model, torch.rand(3, 40, 36))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_frozen_restores_on_error():
    model = nn.Linear(2, 1)
    model.train()
    with pytest.raises(RuntimeError), frozen(model):
        assert not model.training and not model.weight.requires_grad
        raise RuntimeError
    assert model.training and model.weight.requires_grad


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyStreamingNet(tile_size=24).double()


def test_smoothgrad_streamed_equals_plain_and_manual_mean(tiny):
    image = torch.rand(3, 40, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert len(tiny.streamed.plan(image.shape).tiles) > 1
    result = smoothgrad(tiny, image, n_samples=3, noise=0.1, seed=5)
    plain = smoothgrad(tiny.plain(), image, n_samples=3, noise=0.1, seed=5)
    assert (result - plain).abs().max() / plain.abs().max() <= 1e-10
    sigma = 0.1 * image.std(unbiased=False).item()
    manual = torch.zeros_like(image)
    for sample in range(3):
        generator = torch.Generator().manual_seed(5 + sample)
        noisy = image + sigma * torch.randn(image.shape, generator=generator, dtype=torch.float64)
        manual += input_gradient(tiny.plain(), noisy) / 3
    torch.testing.assert_close(result, manual, rtol=1e-10, atol=1e-12)


def test_smoothgrad_without_noise_is_the_gradient(tiny):
    image = torch.rand(3, 40, 36, dtype=torch.float64)
    torch.testing.assert_close(
        smoothgrad(tiny, image, n_samples=2, noise=0.0), input_gradient(tiny, image)
    )


def test_smoothgrad_uint8_image_is_scaled(tiny):
    image = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8)
    model = TinyStreamingNet(tile_size=24)  # float32
    result = smoothgrad(model, image, n_samples=1, noise=0.0)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, input_gradient(model.plain(), image.float() / 255))
    assert torch.equal(image, image.clone())  # source not modified in place


def test_smoothgrad_does_not_modify_a_float_image(tiny):
    image = torch.rand(3, 40, 36, dtype=torch.float64)
    copy = image.clone()
    smoothgrad(tiny, image, n_samples=2, noise=0.5)
    assert torch.equal(image, copy)


def test_smoothgrad_chunked_noise_is_deterministic(tiny, monkeypatch):
    image = torch.rand(3, 40, 36, dtype=torch.float64)
    first = smoothgrad(tiny, image, n_samples=2, seed=3)
    monkeypatch.setattr(saliency, "_CHUNK_PIXELS", 36 * 7)  # rows in chunks of 7
    chunked = smoothgrad(tiny, image, n_samples=2, seed=3)
    assert torch.equal(chunked, smoothgrad(tiny, image, n_samples=2, seed=3))
    assert not torch.equal(chunked, smoothgrad(tiny, image, n_samples=2, seed=4))
    assert chunked.shape == first.shape


@pytest.mark.parametrize("n_samples, noise", [(0, 0.05), (2.5, 0.05), (2, -0.1)])
def test_smoothgrad_rejects_bad_settings(tiny, n_samples, noise):
    with pytest.raises(ValueError, match="got"):
        smoothgrad(tiny, torch.rand(3, 8, 8, dtype=torch.float64), n_samples=n_samples, noise=noise)


def test_input_gradient_rejects_bad_shapes(tiny):
    with pytest.raises(ValueError, match=r"shape \(C, H, W\), got shape \(1, 3, 8, 8\)"):
        input_gradient(tiny, torch.rand(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="K > target=1"):
        input_gradient(tiny, torch.rand(3, 8, 8, dtype=torch.float64), target=1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_image_std_matches_torch(dtype, monkeypatch):
    monkeypatch.setattr(saliency, "_CHUNK_PIXELS", 50)
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 31, 17), dtype=torch.uint8, generator=generator)
    if dtype.is_floating_point:
        image = image.to(dtype) / 255
    expected = (image.double() / (255 if dtype == torch.uint8 else 1)).std(unbiased=False)
    assert image_std(image) == pytest.approx(expected.item(), rel=1e-12)


def test_reduce_gradient_abs_max_and_area_average():
    gradient = torch.zeros(3, 4, 8)
    gradient[0, 0, 0] = -4.0  # the absolute value counts
    gradient[1, 0, 0] = 1.0  # max over channels: 4
    gradient[2, 3, 7] = 2.0
    reduced = reduce_gradient(gradient, size=4)  # longer side 8 -> 4: 2x2 blocks
    assert reduced.shape == (2, 4) and reduced.dtype == np.float32
    np.testing.assert_allclose(reduced, [[1, 0, 0, 0], [0, 0, 0, 0.5]])
    assert reduce_gradient(gradient, size=100).shape == (4, 8)  # never upsampled


def test_smoothgrad_map_is_cached(tmp_path, tiny, monkeypatch):
    params = Params(experiment="cache")
    params.run.out_dir = str(tmp_path)
    params.evaluation.smoothgrad_samples = 2
    params.evaluation.heatmap_size = 20
    image = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8)
    model = TinyStreamingNet(tile_size=24)
    first = smoothgrad_map(params, model, "img1", image)
    assert first.shape == (20, 18)
    assert (params.layout.streaming.saliency / "img1.npz").exists()
    assert saliency.saliency_dir(params) == params.layout.streaming.saliency

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(saliency, "smoothgrad", fail)
    np.testing.assert_array_equal(smoothgrad_map(params, model, "img1", image), first)
    params.evaluation.smoothgrad_samples = 3  # other settings: recomputed
    with pytest.raises(AssertionError, match="recomputed"):
        smoothgrad_map(params, model, "img1", image)
