"""repro.saliency: input gradients through the streaming engine equal plain autograd; SmoothGrad,
heatmap reduction and the MIL patch map."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import repro.saliency as saliency
from repro.config import Params
from repro.models import build_streaming_resnet
from repro.saliency import (
    frozen,
    image_std,
    input_gradient,
    patch_probability_map,
    reduce_gradient,
    sensitivity_heatmap,
    smoothgrad,
    smoothgrad_map,
)
from repro.streaming import StreamingModule


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


def test_sensitivity_heatmap_range():
    rng = np.random.default_rng(0)
    heat = sensitivity_heatmap(rng.exponential(size=(64, 48)).astype(np.float32))
    assert heat.shape == (64, 48) and heat.min() >= 0 and heat.max() == 1
    assert (sensitivity_heatmap(np.zeros((8, 8))) == 0).all()


def test_patch_probability_map_hand_checked():
    patches = pd.DataFrame({"x": [0, 50, 50], "y": [0, 0, 25], "score": [0.2, 0.9, 0.4]})
    heat = patch_probability_map(patches, image_size=(100, 200), patch_size=50, size=20)
    assert heat.shape == (10, 20)
    assert np.allclose(heat[0:5, 0:5], 0.2)
    assert np.allclose(heat[0:5, 5:10], 0.9)  # overlap: the highest probability
    assert np.allclose(heat[5:8, 5:10], 0.4)
    assert np.isnan(heat[:, 10:]).all() and np.isnan(heat[8:, :]).all()


def test_smoothgrad_map_is_cached(tmp_path, tiny, monkeypatch):
    params = Params(experiment="cache")
    params.run.out_dir = str(tmp_path)
    params.evaluation.smoothgrad_samples = 2
    params.evaluation.heatmap_size = 20
    image = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8)
    model = TinyStreamingNet(tile_size=24)
    first = smoothgrad_map(params, model, "img1", image)
    assert first.shape == (20, 18)
    assert (tmp_path / "cache" / "streaming" / "saliency" / "img1.npz").exists()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(saliency, "smoothgrad", fail)
    np.testing.assert_array_equal(smoothgrad_map(params, model, "img1", image), first)
    params.evaluation.smoothgrad_samples = 3  # other settings: recomputed
    with pytest.raises(AssertionError, match="recomputed"):
        smoothgrad_map(params, model, "img1", image)


# ----------------------------------------------------------------------------- figures from runs


@pytest.fixture
def evaluated_run(tmp_path):
    """A run with saved predictions, MIL patch scores, cached SmoothGrad maps and prepared
    images, as notebooks 01-05 leave it (no model needed: every map is cached)."""
    import pyvips

    from repro.evaluation import patch_scores_path, predictions_path, write_csv

    params = Params(experiment="fig")
    params.run.out_dir = str(tmp_path / "runs")
    params.data.prepared_dir = str(tmp_path / "prepared")
    params.data.input_size = 64
    params.mil.patch_size = 16
    params.evaluation.heatmap_size = 32
    params.evaluation.heatmap_examples = 2
    params.evaluation.figures_dir = str(tmp_path / "figures")
    params.evaluation.labels_dir = str(tmp_path / "labels")
    ids = ["a", "b", "c", "d"]
    streaming = pd.DataFrame(
        {"image_id": ids, "label": [1, 1, 0, 0], "score": [0.9, 0.3, 0.2, 0.6]}
    )
    mil = streaming.assign(score=[0.8, 0.7, 0.1, 0.85])  # b FN of streaming, d FP of MIL
    write_csv(streaming, predictions_path(params.run_dir, "streaming"))
    write_csv(mil, predictions_path(params.run_dir, "mil"))
    patches = pd.DataFrame(
        [(i, x, y, 0.1 + 0.05 * x / 16) for i in ids for x in (0, 16, 32) for y in (16, 32)],
        columns=["image_id", "x", "y", "score"],
    )
    write_csv(patches, patch_scores_path(params.run_dir))
    (tmp_path / "prepared" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in ids:
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        pyvips.Image.new_from_array(pixels, interpretation="srgb").tiffsave(
            str(tmp_path / "prepared" / "images" / f"{image_id}.tiff"), tile=True, pyramid=True
        )
        reduced = rng.random((32, 32)).astype(np.float32)
        path = saliency.saliency_dir(params) / f"{image_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, heatmap=reduced, **saliency._cache_key(params))
    return params


def test_choose_examples_prefers_correct_cancers():
    streaming = pd.DataFrame(
        {"image_id": list("abcde"), "label": [1, 1, 0, 0, 1], "score": [0.9, 0.3, 0.2, 0.6, 0.8]}
    )
    mil = streaming.assign(score=[0.8, 0.7, 0.1, 0.75, 0.95])
    # streaming: threshold 0.8 (a, e right; b FN; d right); MIL: threshold 0.7 (d FP)
    chosen = saliency.choose_examples({"streaming": streaming, "mil": mil}, 3)
    assert chosen == ["e", "a", "c"]


def test_write_figure_6_from_cached_maps(evaluated_run, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was needed although every map is cached")

    monkeypatch.setattr(saliency, "smoothgrad", no_model)
    files, shown = saliency.write_figure_6(evaluated_run)
    assert shown == ["a", "c"]
    assert [p.name for p in files] == ["fig6_heatmaps_fig.png", "fig6_heatmaps_fig.pdf"]
    assert files[0].read_bytes().startswith(b"\x89PNG")


def test_heatmap_examples_maps_align_with_thumbnail(evaluated_run):
    from repro.evaluation import load_patch_scores, load_run_predictions

    (example,) = saliency.heatmap_examples(
        evaluated_run,
        ["b"],
        load_run_predictions(evaluated_run),
        load_patch_scores(evaluated_run.run_dir),
    )
    assert example.thumbnail.shape == (32, 32, 3) and example.thumbnail.dtype == np.uint8
    assert example.saliency.shape == example.patches.shape == (32, 32)
    assert np.isnan(example.patches[:8]).all()  # no patch in the top 16 image px
    assert example.patches[8:24, 0:8] == pytest.approx(0.1)
    assert example.caption == "label 1, streaming 0.30, MIL 0.70"


def test_error_figures_and_table_iii(evaluated_run):
    from repro.errors import errors_at_max_accuracy, write_error_figures, write_table_iii
    from repro.evaluation import load_run_predictions

    predictions = load_run_predictions(evaluated_run)
    errors = errors_at_max_accuracy(predictions)
    written = write_error_figures(evaluated_run, errors)
    assert sorted(written) == ["false negative", "false positive"]
    assert written["false positive"][0].name == "fig4_false_positives_fig.png"
    only_negatives = errors[errors["error"] == "false negative"]
    assert sorted(write_error_figures(evaluated_run, only_negatives)) == ["false negative"]
    assert not any(p.exists() for p in written["false positive"]), "stale Fig. 4 must go"
    result = write_table_iii(evaluated_run, predictions)
    assert result["labelled"] == 0
    assert [p.name for p in result["files"]] == ["table3_fig.csv", "table3_fig.md"]
