"""StreamingResNet: the same network as torchvision's, split, streamed, with frozen batch norm."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from test_streaming import randomize_batchnorm, rel_err
from torch import nn

from repro.nn.resnet import (
    Normalize,
    StreamingResNet,
    build_streaming_resnet,
    calibrate_batchnorm,
    freeze_streamed,
    unfreeze_streamed,
)


def torchvision_reference(arch: str, num_classes: int, head_pool: str) -> nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=num_classes)
    if head_pool == "max":
        net.avgpool = nn.AdaptiveMaxPool2d(1)
    return randomize_batchnorm(net)


def torchvision_name(name: str) -> str:
    """Our parameter name -> torchvision's (streamed.module.layer1.0... -> layer1.0...)."""
    return name.removeprefix("streamed.module.").removeprefix("head.")


@pytest.mark.parametrize(
    ("stream_until", "head_pool", "shape", "tile"),
    [
        ("layer2", "max", (1, 3, 300, 180), 160),
        ("layer3", "max", (1, 3, 130, 700), 900),
        ("layer4.0", "avg", (1, 3, 650, 100), 900),
    ],
)
def test_model_equals_torchvision_network(tmp_path, stream_until, head_pool, shape, tile):
    ref_net = torchvision_reference("resnet18", 2, head_pool).double()
    torch.save(ref_net.state_dict(), tmp_path / "weights.pt")
    model = build_streaming_resnet(
        "resnet18",
        weights=tmp_path / "weights.pt",
        stream_until=stream_until,
        tile_size=tile,
        num_classes=2,
        head_pool=head_pool,
    ).double()
    model.head.fc.load_state_dict(ref_net.fc.state_dict())
    assert len(model.streamed.plan(shape).tiles) >= 2
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()
    ref = ref_net(model.normalize(x))
    ref_params = dict(ref_net.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    ref_grads = torch.autograd.grad(
        ref.sum(), [ref_params[torchvision_name(n)] for n in names] + [x]
    )
    out = model(x)
    grads = torch.autograd.grad(out.sum(), [*model.parameters(), x])
    assert out.shape == (1, 2)
    assert rel_err(out, ref) <= 1e-10
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)) <= 1e-10


@pytest.mark.parametrize(
    ("stream_until", "out_size", "channels", "head_first"),
    [
        ("layer2", 2048, 128, "layer3"),
        ("layer3", 1024, 256, "layer4"),
        ("layer4.0", 512, 512, "layer4"),
    ],
)
def test_split_point(stream_until, out_size, channels, head_first):
    model = build_streaming_resnet("resnet34", stream_until=stream_until)
    plan = model.streamed.plan((1, 3, 16384, 16384))
    assert plan.output_size == (out_size, out_size)
    assert list(model.streamed.module.children())[-1][-1].conv2.out_channels == channels
    assert next(iter(model.head.named_children()))[0] == head_first
    assert model.streamed.tile_size == (2800, 2800)
    model.streamed.tile_size = 1024
    assert model.streamed.tile_size == (1024, 1024)


def test_layer4_0_split_keeps_every_block_once():
    model = build_streaming_resnet("resnet34", stream_until="layer4.0")
    names = {n for n, _ in model.named_parameters()}
    assert "streamed.module.layer4.0.conv1.weight" in names
    assert "head.layer4.1.conv1.weight" in names and "head.layer4.0.conv1.weight" not in names
    assert len(names) == len(dict(torchvision.models.resnet34().named_parameters()))


def test_batchnorm_stays_frozen_in_train_mode():
    model = build_streaming_resnet("resnet18").train()
    assert model.training and model.head.fc.training
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model(torch.rand(1, 3, 64, 64))  # tiling accepts it: no batch norm in training mode


def test_freeze_and_unfreeze_streamed():
    model = freeze_streamed(build_streaming_resnet("resnet18", tile_size=600))
    assert not any(p.requires_grad for p in model.streamed.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    x = torch.rand(1, 3, 96, 96)
    assert model.streamed(x).grad_fn is None
    model(x).sum().backward()
    assert model.head.fc.weight.grad is not None
    unfreeze_streamed(model)
    assert all(p.requires_grad for p in model.parameters())


def test_uint8_images_match_float_images():
    model = build_streaming_resnet("resnet18", tile_size=600).eval()
    x = torch.randint(0, 256, (1, 3, 120, 90), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.float() / 255), rtol=0, atol=1e-6)


def test_imagenet_weights_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_streaming_resnet("resnet18", weights="imagenet")
    assert torch.equal(model.streamed.module.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.head.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_imagenet_weights_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    expected = str(tmp_path / "checkpoints" / "resnet34-b627a593.pth")
    with pytest.raises(RuntimeError, match=expected):
        build_streaming_resnet("resnet34", weights="imagenet")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        build_streaming_resnet("resnet99")
    with pytest.raises(ValueError, match="head_pool"):
        build_streaming_resnet("resnet18", head_pool="median")
    for bad in ("layer5", "layer4.2", "layer3.x", "fc"):
        with pytest.raises(ValueError, match="stream_until"):
            build_streaming_resnet("resnet18", stream_until=bad)
    with pytest.raises(FileNotFoundError):
        build_streaming_resnet("resnet18", weights=tmp_path / "missing.pt")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ValueError, match="do not fit"):
        build_streaming_resnet("resnet18", weights=tmp_path / "r34.pt")
    with pytest.raises(ValueError, match="positive"):
        Normalize().set_stats([0.5, 0.5, 0.5], [0.1, 0.0, 0.1])


def test_normalize_stats_are_settable():
    model = build_streaming_resnet("resnet18")
    model.normalize.set_stats([0.8, 0.6, 0.7], [0.1, 0.2, 0.15])
    x = torch.full((1, 3, 2, 2), 0.8)
    assert torch.allclose(model.normalize(x)[0, 0], torch.zeros(2, 2))
    assert "streamed.module.normalize.mean" in model.state_dict()


def test_calibrate_batchnorm_matches_hand_computed_statistics():
    model: StreamingResNet = build_streaming_resnet("resnet18")
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(2, 3, 48, 40, generator=gen) for _ in range(2)]
    calibrate_batchnorm(model, images)
    bn1 = model.streamed.module.bn1
    with torch.no_grad():
        conv = [model.streamed.module.conv1(model.normalize(x)) for x in images]
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv])
    variances = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in conv])
    assert torch.allclose(bn1.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(bn1.running_var, variances.mean(0), rtol=1e-5)
    assert bn1.num_batches_tracked.item() == 2 and bn1.momentum == 0.1
    last = model.head.layer4[-1].bn2
    assert not torch.allclose(last.running_var, torch.ones_like(last.running_var))
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(TypeError, match="float"):
        calibrate_batchnorm(model, [torch.zeros(1, 3, 8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="at least one"):
        calibrate_batchnorm(model, [])


def test_pooled_standardize_statistics_across_images_one_at_a_time():
    """Rows added in batches of 1, 3 and 5 give the mean and (unbiased) variance of all rows;
    in eval mode the output is those rows standardised; frozen afterwards."""
    from repro.nn.resnet import PooledStandardize

    rows = torch.randn(9, 4, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1, 10.0]) + 5
    norm = PooledStandardize(4).double()
    norm.reset_running_stats()
    norm.train()
    for batch in (rows[:1], rows[1:4], rows[4:]):
        norm(batch)
    assert torch.allclose(norm.running_mean, rows.mean(0), atol=1e-12)
    assert torch.allclose(norm.running_var, rows.var(0), atol=1e-12)
    norm.eval()
    out = norm(rows)
    assert torch.allclose(out.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-6)
    expected = rows.var(0) / (rows.var(0) + norm.eps)
    assert torch.allclose(out.var(0), expected, atol=1e-10)
    with pytest.raises(ValueError, match="pooled features"):
        norm(rows[None])


def test_standardize_pooled_is_calibrated_with_batch_norm_and_frozen():
    """calibrate_batchnorm, one image per batch, sets the head's standardisation to the pooled
    features' statistics over those images; training mode leaves it untouched."""
    torch.manual_seed(0)
    model = build_streaming_resnet(
        "resnet18", stream_until="layer1", tile_size=64, standardize_pooled=True
    )
    images = [torch.rand(1, 3, 64, 64) for _ in range(6)]
    calibrate_batchnorm(model, images)
    pooled = []
    model.head.fc.register_forward_hook(lambda module, args, out: pooled.append(args[0]))
    model.train()
    with torch.no_grad():
        for image in images:
            model(image)
    standardized = torch.cat(pooled)
    assert torch.allclose(standardized.mean(0), torch.zeros(512), atol=1e-4)
    assert torch.allclose(standardized.var(0), torch.ones(512), atol=1e-3)
    assert model.head.standardize.num_batches_tracked.item() == 6  # not updated in train mode
