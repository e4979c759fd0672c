"""Content-aware streaming (issue 14) is exact: identical tiles computed once, zero-gradient
tiles skipped, partly zero gradients recomputed on part of a tile.

Every check compares, in float64, the whole step (streamed part and a max-pool head) with the
same layers run untiled: output, every parameter gradient (streamed part and head) and the
input gradient, to 1e-10. The inputs have large constant regions (white padding around a
textured "tissue" patch), so tiles repeat and the max-pool head's gradient is sparse.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_streaming import TOL64, plain_net, rel_err, resnet_part
from torch import nn

from repro.streaming import StreamingModule, _boxes

WHITE = 0.9


def biopsy_like(shape, tissue, seed: int = 0, background: float = WHITE) -> torch.Tensor:
    """A constant (``background``) image with a texture rectangle ``tissue`` ((r0, r1), (c0, c1)).

    The texture has a much larger contrast than the border of the image (constant next to zero
    padding), so that the head's maxima lie in the tissue: in a constant region many positions
    tie for a maximum (of the head or of a max pool inside the streamed part), and which of them
    gets the gradient then depends on rounding, in the untiled computation as in any tiling.
    """
    x = torch.full(shape, background, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    (r0, r1), (c0, c1) = tissue
    texture = torch.randn(*shape[:-2], r1 - r0, c1 - c0, generator=gen, dtype=torch.float64)
    x[..., r0:r1, c0:c1] += 4 * texture
    return x


def max_pool_head(channels: int) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1),
    ).double()


def step(stream, head, x, input_grad):
    """Loss, gradients of all trainable parameters (stream, head) and of the input."""
    x = x.detach().requires_grad_(input_grad)
    params = [p for p in (*stream.parameters(), *head.parameters()) if p.requires_grad]
    out = stream(x)
    loss = head(out).square().sum()
    grads = torch.autograd.grad(loss, [*params, x] if input_grad else params)
    return out, grads


def check_exact(module, x, tile, *, input_grad=True, **kwargs):
    """Errors of content-aware streaming vs. untiled; returns the streaming stats and the
    untiled gradient of the streamed output."""
    with torch.no_grad():
        channels = module(x[:1, :, :64, :64]).shape[1]
    head = max_pool_head(channels)
    ref_out, ref_grads = step(module, head, x, input_grad)
    streaming = StreamingModule(module, tile, **kwargs)
    out, grads = step(streaming, head, x, input_grad)
    assert rel_err(out, ref_out) <= TOL64
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= TOL64
    ref = module(x.detach())
    (map_grad,) = torch.autograd.grad(head(ref).square().sum(), ref)
    return streaming, map_grad


def zero_gradient_tiles(plan, map_grad) -> int:
    return sum(not map_grad[..., slice(*t.out_rows), slice(*t.out_cols)].any() for t in plan.tiles)


CASES = {
    # name: (factory, shape, tile, tissue, background); sizes are not multiples of the stride or
    # the tile. The ResNet's background is its padding value (0): with random batch-norm
    # statistics, a constant next to zero padding makes strong, tied responses in the corners.
    "plain-net": (plain_net, (2, 3, 613, 701), 160, ((250, 400), (300, 460)), WHITE),
    "resnet18-layer2": (
        lambda: resnet_part("resnet18", "layer2"),
        (2, 3, 613, 597),
        192,
        ((230, 400), (150, 330)),
        0.0,
    ),
}


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "params-only"])
@pytest.mark.parametrize("case", CASES)
def test_content_aware_is_exact_and_skips(case, input_grad):
    factory, shape, tile, tissue, background = CASES[case]
    module = factory().double()
    x = biopsy_like(shape, tissue, background=background)
    streaming, map_grad = check_exact(module, x, tile, input_grad=input_grad)
    plan, stats = streaming.plan(shape), streaming.last_stats
    rows = {t.rows for t in plan.tiles}
    assert len(rows) >= 4 and any(t.rows[0] > 0 and t.rows[1] < shape[-2] for t in plan.tiles)
    # the fast path ran: identical background tiles reused, zero-gradient tiles skipped
    assert stats.tiles == len(plan.tiles) == stats.computed + stats.reused
    assert stats.reused >= 4
    assert stats.skipped == zero_gradient_tiles(plan, map_grad) >= 4
    # every tile with a gradient is backpropagated, in one or more boxes
    assert stats.backpropagated >= stats.tiles - stats.skipped - (
        stats.reused if not input_grad else 0
    )
    crops = sum((t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in plan.tiles)
    assert stats.recomputed_pixels < crops / 2


def test_plain_path_computes_everything():
    factory, shape, tile, tissue, _ = CASES["plain-net"]
    module = factory().double()
    streaming, _ = check_exact(module, biopsy_like(shape, tissue), tile, content_aware=False)
    stats = streaming.last_stats
    assert stats.computed == stats.tiles and stats.reused == stats.skipped == 0
    assert stats.backpropagated == stats.tiles and stats.recomputed == stats.tiles - 1


@pytest.mark.parametrize("keep_last_tile", [True, False])
def test_border_tissue_and_kept_last_tile(keep_last_tile):
    """Tissue in the bottom-right corner: the kept last tile has a gradient, and the tiles that
    touch the border are the ones backpropagated."""
    shape = (1, 3, 533, 611)
    x = biopsy_like(shape, ((440, 533), (500, 611)), seed=3)
    streaming, _ = check_exact(plain_net().double(), x, 160, keep_last_tile=keep_last_tile)
    stats = streaming.last_stats
    assert stats.reused > 0 and stats.skipped > 0
    assert stats.recomputed == stats.backpropagated - keep_last_tile


def test_uint8_white_padding():
    """uint8 images (the training input): white padding 255 around tissue."""
    module = resnet_part("resnet18", "layer2").double()
    shape = (2, 3, 613, 597)
    x = torch.full(shape, 255, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(5)
    x[..., 230:400, 150:330] = torch.randint(0, 256, (2, 3, 170, 180), generator=gen).to(
        torch.uint8
    )
    head = max_pool_head(128)
    params = [*module.parameters(), *head.parameters()]
    ref = head(module(x.double() / 255)).square().sum()
    ref_grads = torch.autograd.grad(ref, params)
    streaming = StreamingModule(module, 192)
    loss = head(streaming(x)).square().sum()
    grads = torch.autograd.grad(loss, params)
    assert rel_err(loss, ref) <= TOL64
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)) <= TOL64
    assert streaming.last_stats.reused > 0 and streaming.last_stats.skipped > 0


def test_dense_input_reuses_nothing():
    module = plain_net().double()
    x = torch.rand(1, 3, 401, 377, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    streaming, _ = check_exact(module, x, 160)
    assert streaming.last_stats.reused == 0


def test_inference_reuses_tiles():
    module = plain_net().double()
    _, shape, tile, tissue, _ = CASES["plain-net"]
    x = biopsy_like(shape, tissue)
    streaming = StreamingModule(module, tile)
    with torch.no_grad():
        assert rel_err(streaming(x), module(x)) <= TOL64
    assert streaming.last_stats.reused > 0


def test_counts_are_logged(caplog):
    module = plain_net().double()
    _, shape, tile, tissue, _ = CASES["plain-net"]
    with caplog.at_level(logging.DEBUG, logger="repro.streaming"):
        check_exact(module, biopsy_like((1, *shape[1:]), tissue), tile)
    text = caplog.text
    assert "computed" in text and "reused" in text and "zero-gradient tiles skipped" in text


def test_boxes_cover_the_nonzeros_once_and_save_pixels():
    mask = torch.zeros(140, 130, dtype=torch.bool)
    for r, c in [(5, 5), (100, 10), (60, 107), (117, 100), (61, 104)]:
        mask[r : r + 23, c : c + 23] = True

    def pixels(rows, cols):
        return (rows * 16 + 546) * (cols * 16 + 546)

    boxes = _boxes(mask, pixels)
    covered = torch.zeros(mask.shape, dtype=torch.int64)
    for (r0, r1), (c0, c1) in boxes:
        covered[r0:r1, c0:c1] += 1
    assert covered.max() == 1 and (covered[mask] == 1).all()
    assert sum(pixels(r1 - r0, c1 - c0) for (r0, r1), (c0, c1) in boxes) < pixels(140, 130) / 2
    assert _boxes(torch.ones(7, 9, dtype=torch.bool), pixels) == [((0, 7), (0, 9))]
