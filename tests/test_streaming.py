"""Streaming equals the untiled computation (issue 3): outputs, parameter and input gradients.

Exactness is checked in float64, where a correct tiling agrees to ~1e-14 and a margin one pixel
short shows up as ~1e-7 or worse; every reference is the same module run without tiling.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from repro.streaming import (
    AxisGeometry,
    StreamingModule,
    _analyze,
    _Tiler,
    estimate_peak_bytes,
    plan_tile_size,
)

TOL64 = 1e-10


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Frozen batch norm with random statistics and affine parameters, so it is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)
    return module.eval()


def resnet_part(arch: str, until: str) -> nn.Sequential:
    """conv1 .. ``until`` of a randomly initialised torchvision ResNet, frozen batch norm."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)()
    layers = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
    stop = {"layer1": 5, "layer2": 6, "layer3": 7, "layer4.0": 7}[until]
    part = nn.Sequential(*layers[:stop], *([net.layer4[:1]] if until == "layer4.0" else []))
    return randomize_batchnorm(part)


def plain_net() -> nn.Sequential:
    """A small conv net with odd kernels, strides, paddings, dilation and both pooling kinds."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=2),
        nn.Sequential(nn.Conv2d(6, 8, (3, 5), stride=(1, 2), padding=(0, 1)), nn.LeakyReLU(0.1)),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 4, 1),
    )
    return randomize_batchnorm(net)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def compare(
    module: nn.Module, x: torch.Tensor, tile_size, input_grad: bool = True, **kwargs
) -> dict:
    """Relative errors of streaming vs. ``module(x)``: output, worst parameter grad, input grad."""
    params = [p for p in module.parameters() if p.requires_grad]
    x = x.detach().requires_grad_(input_grad)
    ref = module(x)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=ref.dtype).to(ref.device)
    ref_grads = torch.autograd.grad(ref, [*params, x] if input_grad else params, grad_out)
    out = StreamingModule(module, tile_size, **kwargs)(x)
    grads = torch.autograd.grad(out, [*params, x] if input_grad else params, grad_out)
    errors = {"output": rel_err(out, ref)}
    errors["params"] = max(
        (rel_err(g, r) for g, r in zip(grads, ref_grads, strict=False)), default=0.0
    )
    if input_grad:
        errors["input"] = rel_err(grads[-1], ref_grads[-1])
    return errors


EXACT_CASES = {
    # name: (module factory, input shape, tile size); sizes are not multiples of stride or tile
    "plain": (plain_net, (1, 3, 733, 1100), 320),
    "resnet18-layer2": (lambda: resnet_part("resnet18", "layer2"), (1, 3, 253, 301), 256),
    "resnet34-layer3": (lambda: resnet_part("resnet34", "layer3"), (1, 3, 97, 667), 900),
    "resnet18-layer4.0": (lambda: resnet_part("resnet18", "layer4.0"), (1, 3, 611, 71), 900),
}


@pytest.mark.parametrize("case", EXACT_CASES)
def test_streaming_is_exact_float64(case):
    factory, shape, tile = EXACT_CASES[case]
    module = factory().double()
    plan = StreamingModule(module, tile).plan(shape)
    assert len(plan.tiles) >= 2
    assert any(t.cols[0] > 0 for t in plan.tiles) or any(t.rows[0] > 0 for t in plan.tiles)
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = compare(module, x, tile)
    assert max(errors.values()) <= TOL64, errors


@pytest.mark.parametrize("keep_last_tile", [True, False])
def test_streaming_batch2_float64(keep_last_tile):
    x = torch.rand(2, 3, 201, 333, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = compare(plain_net().double(), x, 160, keep_last_tile=keep_last_tile)
    assert max(errors.values()) <= TOL64, errors


def test_streaming_float32_shallow_net():
    x = torch.rand(1, 3, 517, 389, generator=torch.Generator().manual_seed(0))
    errors = compare(plain_net(), x, 200)
    assert max(errors.values()) <= 1e-4, errors


class ShortMarginTiler(_Tiler):
    """The engine's tiler with a margin one pixel short: the last pixel of each crop's inner
    bottom/right edge is zeroed, as if the crop ended one pixel earlier."""

    def tile_input(self, x, tile, requires_grad=False):
        crop = super().tile_input(x, tile).clone()
        if tile.rows[1] < self.plan.input_size[0]:
            crop[..., -1:, :] = 0
        if tile.cols[1] < self.plan.input_size[1]:
            crop[..., -1:] = 0
        return crop.requires_grad_(requires_grad)


@pytest.mark.parametrize("content_aware", [True, False])
@pytest.mark.parametrize(
    "factory",
    [plain_net, lambda: resnet_part("resnet18", "layer2")],
    ids=["plain", "resnet18-layer2"],
)
def test_margin_one_pixel_short_is_detected(factory, content_aware):
    """Zeroing the last pixel of each tile's inner margin must break exactness: the margin is
    as small as it can be, and the comparison sees errors at that level."""
    module = factory().double()
    x = torch.rand(1, 3, 253, 301, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    streaming = StreamingModule(module, 192, content_aware=content_aware)
    plan = streaming.plan(x.shape)
    short = ShortMarginTiler(_analyze(module), plan, torch.float64, content_aware)
    with torch.no_grad():
        ref = module(x)
        assert rel_err(streaming(x), ref) <= TOL64
        assert rel_err(short.forward(x)[0], ref) > 1e-8


def test_image_smaller_than_one_tile():
    module = resnet_part("resnet18", "layer2").double()
    shape = (2, 3, 61, 97)
    plan = StreamingModule(module, 512).plan(shape)
    assert [(t.rows, t.cols) for t in plan.tiles] == [((0, 61), (0, 97))]
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert max(compare(module, x, 512).values()) <= TOL64


def test_frozen_module_input_gradient_only():
    module = plain_net().double().requires_grad_(False)
    x = torch.rand(1, 3, 201, 333, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = compare(module, x, 160, input_grad=True)
    assert errors["input"] <= TOL64 and errors["output"] <= TOL64
    out = StreamingModule(module, 160)(x.requires_grad_())
    out.sum().backward()
    assert all(p.grad is None for p in module.parameters())


def test_nothing_to_differentiate_builds_no_graph():
    module = plain_net()
    x = torch.rand(1, 3, 200, 300)
    streaming = StreamingModule(module, 128)
    with torch.no_grad():
        assert streaming(x).grad_fn is None
    module.requires_grad_(False)
    out = streaming(x)
    assert out.grad_fn is None and not out.requires_grad


def test_uint8_input_is_scaled_per_tile():
    module = plain_net().double()
    x = torch.randint(0, 256, (1, 3, 201, 333), dtype=torch.uint8)
    ref = module(x.double() / 255)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, list(module.parameters()), grad_out)
    out = StreamingModule(module, 160)(x)
    grads = torch.autograd.grad(out, list(module.parameters()), grad_out)
    assert rel_err(out, ref) <= TOL64
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)) <= TOL64


def test_channels_last_and_autocast_are_inherited():
    module = plain_net()
    x = torch.rand(1, 3, 301, 437).to(memory_format=torch.channels_last)
    out = StreamingModule(module, 256)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, module(x)) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = module(x)
        out = StreamingModule(module, 256)(x.requires_grad_())
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out.float(), ref.float()) <= 3e-2
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape", [(1, 3, 1100, 733), (1, 3, 5000, 17), (1, 3, 16, 4100)])
@pytest.mark.parametrize("tile", [320, (416, 608)])
def test_plan_partitions_the_output(shape, tile):
    module = resnet_part("resnet18", "layer2")
    plan = StreamingModule(module, tile).plan(shape)
    tile = nn.modules.utils._pair(tile)
    covered = torch.zeros(plan.output_size, dtype=torch.int64)
    for t in plan.tiles:
        covered[slice(*t.out_rows), slice(*t.out_cols)] += 1
        assert t.rows[1] - t.rows[0] <= tile[0] and t.cols[1] - t.cols[0] <= tile[1]
        assert t.rows[0] % plan.stride[0] == 0 and t.cols[0] % plan.stride[1] == 0
    assert (covered == 1).all()
    meta = copy.deepcopy(module).to("meta")
    assert plan.output_size == meta(torch.zeros(shape, device="meta")).shape[-2:]
    counts = {(t.out_rows[1] - t.out_rows[0], t.out_cols[1] - t.out_cols[0]) for t in plan.tiles}
    assert max(r for r, _ in counts) - min(r for r, _ in counts) <= 1
    assert max(c for _, c in counts) - min(c for _, c in counts) <= 1
    assert list(plan.tiles) == sorted(plan.tiles, key=lambda t: (t.out_rows, t.out_cols))


def test_paper_tile_size_on_16384():
    module = resnet_part("resnet34", "layer3")
    plan = StreamingModule(module, 2800).plan((1, 3, 16384, 16384))
    assert plan.stride == (16, 16) and plan.output_size == (1024, 1024)
    assert len(plan.tiles) == 64
    assert max(t.rows[1] - t.rows[0] for t in plan.tiles) <= 2800


@pytest.mark.parametrize(
    ("layer", "n"),
    [
        (nn.Conv2d(1, 1, 3, stride=2, padding=1), 17),
        (nn.Conv2d(1, 1, 4, stride=3, padding=2, dilation=2), 29),
        (nn.Conv2d(1, 1, 5, padding="same"), 12),
        (nn.Conv2d(1, 1, 4, padding="same", dilation=3), 12),
        (nn.MaxPool2d(3, stride=2, padding=1, dilation=2), 30),
        (nn.AvgPool2d(3, stride=3), 31),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_output_length_matches_pytorch(layer, n):
    geometry = StreamingModule(layer, 64).plan((n, n))
    assert geometry.output_size == tuple(layer(torch.zeros(1, 1, n, n)).shape[-2:])


def test_axis_geometry_composes():
    a, b = AxisGeometry(2, 3, 3, 0), AxisGeometry(2, 1, 1, 0)
    assert a.then(b) == AxisGeometry(4, 5, 5, 0)


class Custom(nn.Module):
    def forward(self, x):
        return x


def _train(module: nn.Module) -> nn.Module:
    return module.train()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), _train(nn.BatchNorm2d(4))),
            r"'1' \(BatchNorm2d\).*eval",
        ),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)), "'1'.*whole feature map"),
        (nn.Sequential(nn.Flatten(), nn.Linear(3, 4)), "'0' .*whole feature map"),
        (nn.Sequential(_train(nn.Dropout(0.5))), "'0'.*dropout in training mode"),
        (nn.Sequential(nn.Sequential(Custom())), r"'0.0' \(Custom\): unknown"),
        (nn.MaxPool2d(2, ceil_mode=True), "'root'.*ceil_mode"),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
    ],
)
def test_unsupported_layers_are_named(module, message):
    with pytest.raises(ValueError, match=message):
        StreamingModule(module, 64)(torch.zeros(1, 3, 32, 32))


def test_tile_smaller_than_margin():
    module = resnet_part("resnet34", "layer3")
    with pytest.raises(
        ValueError, match=r"tile_size=32 is smaller than the receptive-field margin 546"
    ):
        StreamingModule(module, 32).plan((1, 3, 1000, 1000))


def test_bad_inputs():
    streaming = StreamingModule(plain_net(), 128)
    with pytest.raises(ValueError, match=r"4D input.*\(3, 100, 100\)"):
        streaming(torch.zeros(3, 100, 100))
    with pytest.raises(ValueError, match="too small"):
        streaming(torch.zeros(1, 3, 4, 100))
    with pytest.raises(ValueError, match="tile_size"):
        streaming.tile_size = 0


def test_plan_tile_size_fits_budget():
    module = resnet_part("resnet18", "layer2")
    shape = (1, 3, 4096, 4096)
    budget = 2**30
    tile = plan_tile_size(module, shape, budget, input_grad=True)
    assert tile % 8 == 0
    assert estimate_peak_bytes(module, shape, tile, input_grad=True) <= budget
    assert estimate_peak_bytes(module, shape, tile + 8, input_grad=True) > budget
    assert plan_tile_size(module, shape, 2 * budget, input_grad=True) > tile
    assert plan_tile_size(module, (1, 3, 500, 500), 100 * 2**30) >= 500
    with pytest.raises(ValueError, match="too small"):
        plan_tile_size(module, shape, 2**20)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_float64_exact():
    module = resnet_part("resnet18", "layer3").double().cuda()
    x = torch.rand(1, 3, 400, 1333, dtype=torch.float64).cuda()
    errors = compare(module, x, 900)
    assert max(errors.values()) <= TOL64, errors


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_channels_last(dtype):
    """Under autocast, streaming is as close to the fp32 result as the untiled autocast run."""
    module = resnet_part("resnet34", "layer3").cuda().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 1500, 1100, device="cuda").to(memory_format=torch.channels_last)
    x.requires_grad_()
    exact = module(x)
    with torch.autocast("cuda", dtype=dtype):
        ref = module(x)
        out = StreamingModule(module, 900)(x)
    assert out.dtype == ref.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(exact) * 1e-3  # fp16 gradients overflow without loss scaling
    grads = [
        torch.autograd.grad(y, [x, *module.parameters()], g.to(y.dtype)) for y in (exact, ref, out)
    ]
    for i in range(len(grads[0])):
        ref_err = rel_err(grads[1][i].float(), grads[0][i])
        assert rel_err(grads[2][i].float(), grads[0][i]) <= 2 * ref_err + 1e-3, i
    assert rel_err(out.float(), exact) <= 2 * rel_err(ref.float(), exact) + 1e-3
