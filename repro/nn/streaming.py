"""Streaming: exact tiled forward and backward passes of fully convolutional modules.

Streaming (Pinckaers et al., "Streaming convolutional neural networks for end-to-end learning
with multi-megapixel images", used in Pinckaers et al. 2021, Sec. IV-A2) computes the output of
the first layers of a CNN tile by tile, so that only one tile's activations are in memory, and
stitches the tiles' outputs into the full feature map. The backward pass recomputes each tile with
gradients on (gradient checkpointing) and backpropagates that tile's slice of the output gradient.
The result equals the untiled computation up to floating-point summation order.

The tiling is derived from the module itself: each supported layer maps an output position ``o``
to the input window ``[o * stride - left, o * stride + right]``. A tile's input crop starts at a
multiple of the stride (so its outputs lie on the image's output grid) and carries enough margin
that the outputs kept from it never see the zero padding of the crop's inner edges. Inside a tile,
every layer's output is cut to the region the following layers need.

Content-aware (the default) it also skips work that cannot change the result: a tile whose input
crop and geometry equal those of a tile computed before copies that tile's output, and the
backward pass skips tiles whose output gradient is all zeros, backpropagates identical tiles once
and recomputes only the boxes of a tile where the gradient is not zero. See docs/streaming.md.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from repro.nn.pixels import unit_float

logger = logging.getLogger(__name__)

Range = tuple[int, int]

_POINTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    FrozenBatchNorm2d,
)
_WHOLE_MAP = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Linear,
    nn.Flatten,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
)


@dataclass(frozen=True)
class AxisGeometry:
    """How a module maps one spatial axis.

    Output position ``o`` reads input positions ``[o * stride - left, o * stride + right]``; an
    input of length ``n`` gives ``(n - 1 + shift) // stride + 1`` outputs (PyTorch's floor rule).
    """

    stride: int = 1
    left: int = 0
    right: int = 0
    shift: int = 0

    def then(self, nxt: AxisGeometry) -> AxisGeometry:
        """The geometry of this module followed by ``nxt``."""
        s = self.stride
        return AxisGeometry(
            s * nxt.stride,
            self.left + s * nxt.left,
            self.right + s * nxt.right,
            self.shift + s * nxt.shift,
        )

    def out_len(self, n: int) -> int:
        """Output length for an input of length ``n``."""
        return (n - 1 + self.shift) // self.stride + 1

    def needs(self, lo: int, hi: int, n: int) -> Range:
        """Input range that outputs ``[lo, hi)`` read; the start may be negative (padding)."""
        return lo * self.stride - self.left, min(n, (hi - 1) * self.stride + self.right + 1)


def _aligned(start: int, step: int) -> int:
    """``start`` rounded down to a multiple of ``step``, at least 0: where a crop may begin."""
    return max(0, start // step * step)


def _conv_like(kernel, stride, padding, dilation) -> tuple[AxisGeometry, AxisGeometry]:
    pair = nn.modules.utils._pair
    return tuple(
        AxisGeometry(s, p, d * (k - 1) - p, 2 * p - d * (k - 1))
        for k, s, p, d in zip(
            pair(kernel), pair(stride), pair(padding), pair(dilation), strict=True
        )
    )


@dataclass(frozen=True)
class _Node:
    """A module with its (rows, cols) geometry; ``children`` set for an ``nn.Sequential``."""

    module: nn.Module
    name: str
    geometry: tuple[AxisGeometry, AxisGeometry]
    children: tuple[_Node, ...] = ()


def _unsupported(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"cannot stream layer '{name or 'root'}' ({type(module).__name__}): {why}")


def _leaf_geometry(module: nn.Module, name: str) -> tuple[AxisGeometry, AxisGeometry]:
    """Geometry of a single layer, or a ValueError naming it and saying why it cannot be tiled."""
    if isinstance(module, _POINTWISE) or getattr(module, "streaming_pointwise", False):
        return AxisGeometry(), AxisGeometry()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None:
            raise _unsupported(
                name,
                module,
                "batch norm that uses batch statistics normalises each tile with that tile's "
                "statistics, not the image's; put it in eval mode (frozen batch norm)",
            )
        return AxisGeometry(), AxisGeometry()
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.training and module.p > 0:
            raise _unsupported(
                name, module, "dropout in training mode draws different masks per tile"
            )
        return AxisGeometry(), AxisGeometry()
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise _unsupported(name, module, f"padding_mode={module.padding_mode!r}; only 'zeros'")
        if module.padding == "same":
            if any(s != 1 for s in module.stride):
                raise _unsupported(name, module, "padding='same' with stride > 1")
            return tuple(
                AxisGeometry(1, d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2, 0)
                for k, d in zip(module.kernel_size, module.dilation, strict=True)
            )
        padding = 0 if module.padding == "valid" else module.padding
        return _conv_like(module.kernel_size, module.stride, padding, module.dilation)
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        if module.ceil_mode:
            raise _unsupported(name, module, "ceil_mode=True; use ceil_mode=False")
        if getattr(module, "return_indices", False):
            raise _unsupported(name, module, "return_indices=True")
        dilation = getattr(module, "dilation", 1)
        return _conv_like(module.kernel_size, module.stride, module.padding, dilation)
    if isinstance(module, _WHOLE_MAP):
        raise _unsupported(
            name, module, "its output depends on the whole feature map, not a window"
        )
    raise _unsupported(
        name,
        module,
        "unknown to the streaming engine (supported: Conv2d, MaxPool2d, AvgPool2d, eval-mode "
        "BatchNorm2d, pointwise activations, Dropout in eval mode, nn.Sequential and torchvision "
        "BasicBlock/Bottleneck; a per-pixel module may set streaming_pointwise = True)",
    )


def _chain(nodes: Sequence[_Node]) -> tuple[AxisGeometry, AxisGeometry]:
    rows, cols = AxisGeometry(), AxisGeometry()
    for node in nodes:
        rows, cols = rows.then(node.geometry[0]), cols.then(node.geometry[1])
    return rows, cols


def _residual(block: nn.Module, name: str, main: Sequence[str]) -> _Node:
    """A residual block: a main branch and a shortcut whose outputs are added."""
    branch = _chain([_analyze(getattr(block, part), f"{name}.{part}") for part in main])
    shortcut = (AxisGeometry(), AxisGeometry())
    if block.downsample is not None:
        shortcut = _analyze(block.downsample, f"{name}.downsample").geometry
    geometry = []
    for a, b in zip(branch, shortcut, strict=True):
        if (a.stride, a.shift) != (b.stride, b.shift):
            raise _unsupported(name, block, "its branches differ in stride or output size")
        geometry.append(AxisGeometry(a.stride, max(a.left, b.left), max(a.right, b.right), a.shift))
    return _Node(block, name, tuple(geometry))


def _analyze(module: nn.Module, name: str = "") -> _Node:
    """The geometry tree of ``module``; raises ValueError for a layer that cannot be tiled."""
    if type(module) is nn.Sequential:
        children = tuple(
            _analyze(child, f"{name}.{key}" if name else key)
            for key, child in module.named_children()
        )
        return _Node(module, name, _chain(children), children)
    if type(module) is BasicBlock:
        return _residual(module, name, ("conv1", "bn1", "relu", "conv2", "bn2"))
    if type(module) is Bottleneck:
        return _residual(module, name, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"))
    return _Node(module, name, _leaf_geometry(module, name))


def _lengths(node: _Node, axis: int, n: int) -> list[int]:
    """Input length of each child of a sequential node, then its output length."""
    lengths = [n]
    for child in node.children:
        lengths.append(child.geometry[axis].out_len(lengths[-1]))
    return lengths


def _child_needs(node: _Node, axis: int, lo: int, hi: int, n: int, align: int):
    """For a sequential node: the input range of each child, then (lo, hi); and each child's
    alignment, the stride of the layers after it."""
    lengths = _lengths(node, axis, n)
    ranges, aligns = [(lo, hi)], []
    for child, n_in in zip(reversed(node.children), reversed(lengths[:-1]), strict=True):
        aligns.insert(0, align)
        ranges.insert(0, _needs(child, axis, *ranges[0], n_in))
        align *= child.geometry[axis].stride
    return ranges, aligns


def _needs(node: _Node, axis: int, lo: int, hi: int, n: int) -> Range:
    """Input range (of an input of length ``n``) that outputs ``[lo, hi)`` read.

    The start is exact, before alignment: a crop starts at ``_aligned(start, stride * align)``
    with the total stride of the node and of the layers after it, so that every layer's input
    lies on the image's grid while the input crop's margin is rounded up only once.
    """
    if not node.children:
        return node.geometry[axis].needs(lo, hi, n)
    return _child_needs(node, axis, lo, hi, n, 1)[0][0]


@dataclass(frozen=True)
class _Step:
    """One layer of a tile's computation: ``module(x[crop])[keep]``, where ``crop`` is a window
    of the layer's input and ``keep`` one of its output, both relative to those tensors."""

    module: nn.Module
    crop: tuple[Range, Range]
    keep: tuple[Range, Range]


def _schedule(
    node: _Node,
    origin: tuple[int, int],
    size: tuple[int, int],
    target: tuple[Range, Range],
    align: tuple[int, int] = (1, 1),
) -> list[_Step]:
    """The layers that compute output rows/cols ``target`` of ``node`` (starts aligned by
    ``align``) from an input held from ``origin`` on; ``size`` is the node's full input size.

    Every layer's output is cut to what the next layers need, so invalid borders (which saw the
    crop's zero padding) never reach the kept region. The steps depend on the tile's position
    only through these relative windows: two tiles with equal steps and equal input crops compute
    the same thing.
    """
    if node.children:
        plans = [_child_needs(node, a, *target[a], size[a], align[a]) for a in (0, 1)]
        lengths = [_lengths(node, a, size[a]) for a in (0, 1)]
        steps = []
        for i, child in enumerate(node.children):
            sub = (plans[0][0][i + 1], plans[1][0][i + 1])
            sub_align = (plans[0][1][i], plans[1][1][i])
            steps += _schedule(child, origin, (lengths[0][i], lengths[1][i]), sub, sub_align)
            origin = tuple(_aligned(sub[a][0], sub_align[a]) for a in (0, 1))
        return steps
    strides = [node.geometry[a].stride for a in (0, 1)]
    crops = [node.geometry[a].needs(*target[a], size[a]) for a in (0, 1)]
    starts = [_aligned(crops[a][0], strides[a] * align[a]) for a in (0, 1)]
    keep = [_aligned(target[a][0], align[a]) - starts[a] // strides[a] for a in (0, 1)]
    return [
        _Step(
            node.module,
            tuple((starts[a] - origin[a], crops[a][1] - origin[a]) for a in (0, 1)),
            tuple((keep[a], target[a][1] - starts[a] // strides[a]) for a in (0, 1)),
        )
    ]


def _execute(steps: Sequence[_Step], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = _crop(step.module(_crop(x, step.crop)), step.keep)
    return x


def _run(
    node: _Node,
    x: torch.Tensor,
    origin: tuple[int, int],
    size: tuple[int, int],
    target: tuple[Range, Range],
    align: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Output rows/cols ``target`` of ``node`` from its input ``x`` held from ``origin`` on
    (see :func:`_schedule`)."""
    return _execute(_schedule(node, origin, size, target, align), x)


def _crop(x: torch.Tensor, window: Sequence[Range]) -> torch.Tensor:
    """``x[..., rows, cols]``, or ``x`` itself when the window covers it (pointwise layers): an
    identity slice would cost a zero-filled gradient copy in the backward pass."""
    (r0, r1), (c0, c1) = window
    if r0 == 0 and c0 == 0 and r1 >= x.shape[-2] and c1 >= x.shape[-1]:
        return x
    return x[..., r0:r1, c0:c1]


@dataclass(frozen=True)
class Tile:
    """One tile: input crop ``rows`` x ``cols`` produces output ``out_rows`` x ``out_cols``."""

    rows: Range
    cols: Range
    out_rows: Range
    out_cols: Range


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one input size, in the order they are computed (row-major)."""

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    stride: tuple[int, int]
    margin: tuple[int, int]
    tiles: tuple[Tile, ...]

    @property
    def coverage(self) -> float:
        """Input pixels computed in all tiles divided by the image's pixels."""
        area = sum((t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in self.tiles)
        return area / (self.input_size[0] * self.input_size[1])


def _margin(node: _Node, axis: int) -> int:
    """Crop length beyond ``count * stride`` for an interior tile of ``count`` outputs."""
    n = 1 << 40
    mid = node.geometry[axis].out_len(n) // 2
    stride = node.geometry[axis].stride
    lo, hi = _needs(node, axis, mid, mid + 1, n)
    return hi - _aligned(lo, stride) - stride


def _axis_tiles(node: _Node, axis: int, n: int, tile: int) -> list[tuple[Range, Range]]:
    """Balanced (input crop, output range) pairs along one axis."""
    m = node.geometry[axis].out_len(n)
    if m < 1:
        raise ValueError(f"input size {n} is too small for this module: its output would be empty")
    stride, margin = node.geometry[axis].stride, _margin(node, axis)
    count = (tile - margin) // stride
    if count < 1:
        last = node.children[-1].name if node.children else node.name or "root"
        raise ValueError(
            f"tile_size={tile} is smaller than the receptive-field margin {margin} px of the "
            f"streamed module (up to '{last}', stride {stride}): tile_size must be at least "
            f"{margin + stride}, and several times that to avoid mostly recomputing margins"
        )
    k = math.ceil(m / count)
    bounds = [m * i // k for i in range(k + 1)]
    return [(_crop_for(node, axis, a, b, n), (a, b)) for a, b in itertools.pairwise(bounds)]


def _plan(node: _Node, size: tuple[int, int], tile_size: tuple[int, int]) -> TilePlan:
    rows = _axis_tiles(node, 0, size[0], tile_size[0])
    cols = _axis_tiles(node, 1, size[1], tile_size[1])
    tiles = tuple(Tile(r, c, ro, co) for r, ro in rows for c, co in cols)
    out = tuple(node.geometry[a].out_len(size[a]) for a in (0, 1))
    stride = tuple(node.geometry[a].stride for a in (0, 1))
    return TilePlan(size, out, stride, (_margin(node, 0), _margin(node, 1)), tiles)


def _crop_for(node: _Node, axis: int, lo: int, hi: int, n: int) -> Range:
    """The input crop (start aligned to the stride) that computes outputs ``[lo, hi)``."""
    start, end = _needs(node, axis, lo, hi, n)
    return _aligned(start, node.geometry[axis].stride), end


def _tile(node: _Node, size: tuple[int, int], out_rows: Range, out_cols: Range) -> Tile:
    """The tile that computes outputs ``out_rows`` x ``out_cols`` of an input of ``size``."""
    rows = _crop_for(node, 0, *out_rows, size[0])
    return Tile(rows, _crop_for(node, 1, *out_cols, size[1]), out_rows, out_cols)


def _float_dtype(module: nn.Module) -> torch.dtype:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _window(t: torch.Tensor, rows: Range, cols: Range) -> torch.Tensor:
    return t[..., rows[0] : rows[1], cols[0] : cols[1]]


@dataclass
class TileStats:
    """What one streamed call did (``StreamingModule.last_stats``; the backward pass fills in
    its part when it runs).

    Attributes:
        tiles: tiles in the plan.
        computed: tiles computed in the forward pass.
        reused: tiles whose output was copied from an identical tile (same crop, same geometry).
        backpropagated: backpropagations in the backward pass (one per group of identical tiles
            with a non-zero output gradient; one per such tile when the input gradient is needed).
        recomputed: of these, the ones that recomputed their tile (the rest used the kept tile).
        skipped: tiles skipped in the backward pass because their output gradient is all zeros.
        recomputed_pixels: input pixels of the recomputed crops (smaller than the tiles' when the
            non-zero gradient covers only part of a tile).
    """

    tiles: int
    computed: int = 0
    reused: int = 0
    backpropagated: int = 0
    recomputed: int = 0
    skipped: int = 0
    recomputed_pixels: int = 0


class _Tiler:
    """Crops, converts and runs the tiles of one forward call.

    ``content_aware``: a tile whose input crop and steps equal those of a tile computed before
    copies that tile's output instead of computing it, and the backward pass skips zero gradients
    (see :meth:`backward_work`).
    """

    def __init__(self, root: _Node, plan: TilePlan, dtype: torch.dtype, content_aware: bool):
        self.root, self.plan, self.dtype, self.content_aware = root, plan, dtype, content_aware
        self.steps = [self.schedule(tile) for tile in plan.tiles]
        self.source = list(range(len(plan.tiles)))  # the tile whose output each tile has
        self.stats = TileStats(len(plan.tiles))

    def schedule(self, tile: Tile) -> list[_Step]:
        origin = (tile.rows[0], tile.cols[0])
        return _schedule(self.root, origin, self.plan.input_size, (tile.out_rows, tile.out_cols))

    def tile_input(self, x: torch.Tensor, tile: Tile, requires_grad: bool = False) -> torch.Tensor:
        """The tile's input crop; integer images become floats in [0, 1] of the module's dtype."""
        crop = _window(x, tile.rows, tile.cols)
        if not crop.is_floating_point():
            crop = unit_float(crop, self.dtype)
        return crop.detach().requires_grad_(requires_grad)

    def run(self, crop: torch.Tensor, tile: Tile, steps: Sequence[_Step] | None = None):
        return _execute(self.schedule(tile) if steps is None else steps, crop)

    def _key(self, i: int) -> tuple:
        tile = self.plan.tiles[i]
        shape = (tile.rows[1] - tile.rows[0], tile.cols[1] - tile.cols[0])
        return shape, tuple((step.crop, step.keep) for step in self.steps[i])

    def _identical(self, x: torch.Tensor, i: int, j: int) -> bool:
        """Whether tiles ``i`` and ``j`` (same key) have equal input crops: a sparse sample first
        (rejects differing crops at almost no cost), then every pixel."""
        a = _window(x, self.plan.tiles[i].rows, self.plan.tiles[i].cols)
        b = _window(x, self.plan.tiles[j].rows, self.plan.tiles[j].cols)
        step = max(1, min(a.shape[-2:]) // 64)
        return torch.equal(a[..., ::step, ::step], b[..., ::step, ::step]) and torch.equal(a, b)

    def forward(self, x: torch.Tensor, keep_grad: bool | None = None):
        """All tiles, stitched into the full output map; ``(map, kept)``.

        Tiles run without autograd, except the last one when ``keep_grad`` is not None: it runs
        with autograd (input gradient if ``keep_grad``) and ``kept`` is its (input, output), so
        that the backward pass need not recompute it (unless it copied an identical tile).
        """
        tiles, stats = self.plan.tiles, self.stats
        out, kept, last = None, None, len(tiles) - 1
        computed: dict[tuple, list[int]] = {}
        for i, tile in enumerate(tiles):
            if self.content_aware:
                same = computed.setdefault(self._key(i), [])
                src = next((j for j in same if self._identical(x, i, j)), None)
                if src is not None:
                    _window(out, tile.out_rows, tile.out_cols).copy_(
                        _window(out, tiles[src].out_rows, tiles[src].out_cols)
                    )
                    self.source[i] = src
                    stats.reused += 1
                    continue
                same.append(i)
            with torch.set_grad_enabled(i == last and keep_grad is not None):
                crop = self.tile_input(x, tile, requires_grad=i == last and bool(keep_grad))
                y = self.run(crop, tile, self.steps[i])
            stats.computed += 1
            if y.requires_grad:
                kept, y = (crop, y), y.detach()
            if out is None:
                shape = (*y.shape[:-2], *self.plan.output_size)
                out = torch.empty(
                    shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(x)
                )
            _window(out, tile.out_rows, tile.out_cols).copy_(y)
        logger.debug(
            "streamed %s: %d tiles, %d computed, %d reused",
            tuple(x.shape),
            stats.tiles,
            stats.computed,
            stats.reused,
        )
        return out, kept

    def backward_work(self, grad_out: torch.Tensor, input_grad: bool, kept_last: bool):
        """The backpropagations the backward pass needs: ``(tile, cotangent, member)`` in reverse
        tile order, where ``tile`` is the (possibly smaller) tile to recompute, or None for the
        kept last tile, and ``member`` the tile whose input gradient it gives.

        Plain: every tile with its gradient slice. Content-aware: tiles whose gradient slice is
        all zeros are skipped; identical tiles are backpropagated once with the sum of their
        slices (parameter gradients are linear in it), except when the input gradient is needed
        (each tile's crop has its own); the tile is cut to the outputs whose gradient is not zero
        (the bounding box), since the others contribute nothing.
        """
        tiles, last = self.plan.tiles, len(self.plan.tiles) - 1
        slices = [_window(grad_out, t.out_rows, t.out_cols) for t in tiles]
        if not self.content_aware:
            for i in reversed(range(len(tiles))):
                yield (None if i == last and kept_last else tiles[i]), slices[i], i
            return
        members: dict[int, list[int]] = {}
        for i, src in enumerate(self.source):
            members.setdefault(src, []).append(i)
        for src in sorted(members, reverse=True):
            live = [i for i in members[src] if bool(slices[i].ne(0).any())]
            self.stats.skipped += len(members[src]) - len(live)
            if not live:
                continue
            if src == last and kept_last:  # nothing copies the last tile
                yield None, slices[src], src
            elif input_grad:
                for i in reversed(live):
                    yield from self._trimmed(i, slices[i])
            else:
                yield from self._trimmed(src, sum(slices[i] for i in live[1:]) + slices[live[0]])

    def _trimmed(self, i: int, g: torch.Tensor):
        """(tile, cotangent, i) for each part of tile ``i`` where ``g`` is not zero: the tile cut
        to the bounding box of the non-zeros, split further where that saves pixels."""
        tile = self.plan.tiles[i]
        nonzero = g.ne(0).flatten(0, -3).any(0)
        if bool(nonzero.all()):
            yield tile, g, i
            return
        for (r0, r1), (c0, c1) in _boxes(nonzero, self._box_pixels):
            out_rows = (tile.out_rows[0] + r0, tile.out_rows[0] + r1)
            out_cols = (tile.out_cols[0] + c0, tile.out_cols[0] + c1)
            sub = _tile(self.root, self.plan.input_size, out_rows, out_cols)
            yield sub, g[..., r0:r1, c0:c1], i

    def _box_pixels(self, rows: int, cols: int) -> int:
        """Input pixels of an interior tile with ``rows`` x ``cols`` outputs: its cost."""
        (sr, sc), (mr, mc) = self.plan.stride, self.plan.margin
        return (rows * sr + mr) * (cols * sc + mc)


def _boxes(mask: torch.Tensor, pixels) -> list[tuple[Range, Range]]:
    """Boxes (rows, cols) that cover the True entries of the 2D ``mask``: its bounding box, split
    at the widest run of all-False rows or columns inside it when the two parts' bounding boxes
    cost fewer ``pixels(rows, cols)`` than the whole (recursively)."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    (r0, r1), (c0, c1) = (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)
    whole = [((r0, r1), (c0, c1))]
    best, best_cost = whole, pixels(r1 - r0, c1 - c0)
    for axis, (lo, hi) in enumerate(((r0, r1), (c0, c1))):
        used = mask.any(1 - axis)[lo:hi].tolist()
        gap = _widest_gap(used)
        if gap is None:
            continue
        parts = []
        for a, b in ((lo, lo + gap[0]), (lo + gap[1], hi)):
            part = mask[a:b] if axis == 0 else mask[:, a:b]
            dr, dc = (a, 0) if axis == 0 else (0, a)
            for (p, q), (u, v) in _boxes(part, pixels):
                parts.append(((p + dr, q + dr), (u + dc, v + dc)))
        cost = sum(pixels(r[1] - r[0], c[1] - c[0]) for r, c in parts)
        if cost < best_cost:
            best, best_cost = parts, cost
    return best


def _widest_gap(used: list[bool]) -> Range | None:
    """The widest run ``[a, b)`` of False in ``used`` (which starts and ends with True)."""
    best, start = None, None
    for i, u in enumerate(used):
        if not u and start is None:
            start = i
        elif u and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _StreamFunction(torch.autograd.Function):
    """Tiled forward without stored activations; tiled recompute-and-backpropagate backward."""

    @staticmethod
    def forward(ctx, tiler: _Tiler, keep_last: bool, x: torch.Tensor, *params) -> torch.Tensor:
        ctx.tiler = tiler
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, *params)
        out, ctx.kept = tiler.forward(x, keep_grad=x.requires_grad if keep_last else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        tiler: _Tiler = ctx.tiler
        kept, ctx.kept = ctx.kept, None
        input_grad = ctx.needs_input_grad[2]
        grad_x = torch.zeros_like(x) if input_grad else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        stats = tiler.stats
        for tile, g, member in tiler.backward_work(grad_out, input_grad, kept is not None):
            if tile is None:
                (crop, y), kept = kept, None
            else:
                with torch.enable_grad(), torch.autocast(x.device.type, dtype, enabled):
                    crop = tiler.tile_input(x, tile, requires_grad=input_grad)
                    y = tiler.run(crop, tile)
                stats.recomputed += 1
                stats.recomputed_pixels += crop.shape[-2] * crop.shape[-1]
            inputs = [*params, crop] if input_grad else params
            tile_grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
            stats.backpropagated += 1
            for i, tg in enumerate(tile_grads[: len(params)]):
                if tg is not None:
                    grads[i] = tg if grads[i] is None else grads[i].add_(tg)
            if input_grad:
                where = tiler.plan.tiles[member] if tile is None else tile
                _window(grad_x, where.rows, where.cols).add_(tile_grads[-1])
        logger.debug(
            "streamed backward: %d backpropagations (%d recomputed, %.2f of the image's pixels), "
            "%d zero-gradient tiles skipped",
            stats.backpropagated,
            stats.recomputed,
            stats.recomputed_pixels / math.prod(tiler.plan.input_size),
            stats.skipped,
        )
        return None, None, grad_x, *grads


class StreamingModule(nn.Module):
    """Runs a fully convolutional ``module`` tile by tile, exactly.

    ``forward(x)`` returns what ``module(x)`` returns for ``x`` of shape (N, C, H, W), any H and W,
    while only one tile's activations are alive. Backward recomputes each tile with gradients and
    accumulates the gradients of the trainable parameters and, when ``x.requires_grad``, of the
    input. With nothing to differentiate (frozen parameters, no input gradient, or grad mode off)
    the tiles simply run without autograd. Integer inputs (uint8 images) are converted per tile to
    floats in [0, 1] of the module's dtype, like torchvision's ``to_dtype(..., scale=True)``.

    Supported layers: Conv2d (zero padding), MaxPool2d/AvgPool2d (``ceil_mode=False``), BatchNorm2d
    in eval mode, pointwise activations, Identity, Dropout in eval mode, modules with the class
    attribute ``streaming_pointwise = True``, nn.Sequential, torchvision BasicBlock/Bottleneck.
    Tiles inherit the input's memory format (channels_last) and the autocast state.

    Args:
        module: the fully convolutional module to stream.
        tile_size: the largest input crop (pixels; int or (rows, cols)) a tile may use, margins
            included. Change it any time via ``self.tile_size``.
        keep_last_tile: when gradients are needed, run the last tile of the forward pass with
            autograd and keep its activations for the backward pass, which then recomputes one
            tile fewer. Costs one tile's activations while the layers after this module run.
        content_aware: skip work that cannot change the result (docs/streaming.md): a tile whose
            input crop and geometry equal those of a tile computed before copies its output, the
            backward pass skips tiles whose output gradient is all zeros, backpropagates identical
            tiles once, and recomputes only the part of a tile with a non-zero gradient. Exact
            like the plain path (``False``), which computes and backpropagates every tile.
        head: the layers that follow this module (not run or registered by it): counted by
            :func:`estimate_peak_bytes` and :func:`plan_tile_size` when given this module.

    Attributes:
        last_stats: :class:`TileStats` of the latest call (its backward pass included, once run).
    """

    def __init__(
        self,
        module: nn.Module,
        tile_size: int | tuple[int, int],
        *,
        keep_last_tile: bool = True,
        content_aware: bool = True,
        head: nn.Module | None = None,
    ):
        super().__init__()
        self.module = module
        self.tile_size = tile_size
        self.keep_last_tile = keep_last_tile
        self.content_aware = content_aware
        self._head = (head,)  # a tuple, so that nn.Module does not register the head
        self.last_stats: TileStats | None = None

    @property
    def tile_size(self) -> tuple[int, int]:
        return self._tile_size

    @tile_size.setter
    def tile_size(self, value: int | tuple[int, int]) -> None:
        size = nn.modules.utils._pair(value)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"tile_size must be a positive int or a pair of them, got {value!r}")
        self._tile_size = size

    @property
    def head(self) -> nn.Module | None:
        """The layers after this module, for memory planning only (not a submodule)."""
        return self._head[0]

    def plan(self, input_shape: Sequence[int]) -> TilePlan:
        """The tiles used for an input of shape (..., H, W)."""
        return _plan(_analyze(self.module), tuple(input_shape[-2:]), self.tile_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4D input (N, C, H, W), got shape {tuple(x.shape)}")
        root = _analyze(self.module)
        plan = _plan(root, tuple(x.shape[-2:]), self.tile_size)
        logger.debug(
            "streaming %s in %d tiles, coverage %.2f",
            tuple(x.shape),
            len(plan.tiles),
            plan.coverage,
        )
        tiler = _Tiler(root, plan, _float_dtype(self.module), self.content_aware)
        self.last_stats = tiler.stats
        params = [p for p in self.module.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (x.requires_grad or params):
            return _StreamFunction.apply(tiler, self.keep_last_tile, x, *params)
        with torch.no_grad():
            return tiler.forward(x)[0]

    def extra_repr(self) -> str:
        return (
            f"tile_size={self.tile_size}, keep_last_tile={self.keep_last_tile}, "
            f"content_aware={self.content_aware}"
        )


def _saved_bytes(run, exclude: Sequence[torch.Tensor]) -> tuple[int, int, torch.Tensor]:
    """(total, largest) bytes of the tensors autograd saves while ``run()`` runs, except those
    sharing storage with ``exclude`` (parameters, the input), and ``run()``'s result."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run()
    return sum(saved.values()), max(saved.values(), default=0), y


def _probe(
    module: nn.Module, node: _Node, shape: Sequence[int], count: int
) -> tuple[int, int, int, torch.Tensor]:
    """(tile side, saved bytes, largest saved tensor, output) of a square interior tile.

    The tile has ``count`` x ``count`` outputs; it runs on the meta device, so nothing is computed
    or allocated.
    """
    n = 1 << 20
    mids = [node.geometry[a].out_len(n) // 2 for a in (0, 1)]
    target = tuple((m, m + count) for m in mids)
    crop = [_crop_for(node, a, *target[a], n) for a in (0, 1)]
    sides = [hi - lo for lo, hi in crop]
    x = torch.zeros(*shape[:-2], *sides, device="meta", dtype=_float_dtype(module))
    x.requires_grad_()
    origin = (crop[0][0], crop[1][0])
    total, largest, y = _saved_bytes(
        lambda: _run(node, x, origin, (n, n), target), list(module.parameters())
    )
    return max(sides), total, largest, y


def _quadratic(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """(a, b, c) of ``a s^2 + b s + c`` through three points."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    a = (d12 - d01) / (x2 - x0)
    b = d01 - a * (x0 + x1)
    return a, b, y0 - a * x0 * x0 - b * x0


class _MemoryModel:
    """Predicts the peak memory of a train step: ``module`` streamed over inputs of
    ``input_shape``, then ``head``; see :func:`estimate_peak_bytes`."""

    def __init__(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        input_dtype: torch.dtype,
        input_grad: bool,
        head: nn.Module | None,
        keep_last_tile: bool | None,
    ):
        if isinstance(module, StreamingModule):
            head = module.head if head is None else head
            keep_last_tile = module.keep_last_tile if keep_last_tile is None else keep_last_tile
            module = module.module
        if len(input_shape) != 4:
            raise ValueError(f"expected input_shape (N, C, H, W), got {tuple(input_shape)}")
        self.node = _analyze(module)
        self.input_shape = tuple(input_shape)
        self.keep_last_tile = True if keep_last_tile is None else keep_last_tile
        meta = copy.deepcopy(module).to("meta")
        probes = [_probe(meta, _analyze(meta), input_shape, c) for c in (1, 9, 17)]
        sides = [p[0] for p in probes]
        # Saved bytes per layer are (a h + b)(a w + b) for an h x w crop: symmetric bilinear,
        # so the quadratic through square tiles gives any rectangle.
        self.saved = _quadratic(sides, [p[1] for p in probes])
        self.largest = _quadratic(sides, [p[2] for p in probes])
        out = probes[0][3]  # count 1: one output pixel
        self.out_channels, self.out_dtype = out.shape[1], out.dtype
        self.out_bytes_per_pixel = out.numel() * out.element_size()
        numel = math.prod(input_shape)
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        self.fixed = numel * input_dtype.itemsize
        self.input_grad = numel * _float_dtype(module).itemsize if input_grad else 0
        self.head_saved = self.head_largest = 0
        if head is not None:
            weights += sum(p.numel() * p.element_size() for p in head.parameters())
            self.head = copy.deepcopy(head).to("meta")
        else:
            self.head = None
        self.fixed += 3 * weights  # weights, gradients, a tile's gradients being added
        self._head_cache: dict[tuple[int, ...], tuple[int, int]] = {}

    def _tile(self, rows: int, cols: int, fit: tuple[float, float, float]) -> float:
        a, b, c = fit
        return a * rows * cols + b * (rows + cols) / 2 + c

    def _head_bytes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(saved, largest saved) bytes of the head's forward on the streamed output."""
        if self.head is None:
            return 0, 0
        if shape not in self._head_cache:
            fmap = torch.zeros(shape, device="meta", dtype=self.out_dtype)
            fmap.requires_grad_()
            total, largest, _ = _saved_bytes(
                lambda: self.head(fmap), [fmap, *self.head.parameters()]
            )
            self._head_cache[shape] = total, largest
        return self._head_cache[shape]

    def peak(self, tile_size: int | tuple[int, int]) -> int:
        """Predicted peak bytes of one step with tiles of ``tile_size``."""
        plan = _plan(self.node, self.input_shape[-2:], nn.modules.utils._pair(tile_size))
        shapes = [(t.rows[1] - t.rows[0], t.cols[1] - t.cols[0]) for t in plan.tiles]
        tile_peak = max(self._tile(*s, self.saved) + self._tile(*s, self.largest) for s in shapes)
        kept = self._tile(*shapes[-1], self.saved) if self.keep_last_tile else 0
        fmap = self.out_bytes_per_pixel * math.prod(plan.output_size)
        head_saved, head_largest = self._head_bytes(
            (self.input_shape[0], self.out_channels, *plan.output_size)
        )
        # The map, the kept tile and the head's activations while the head runs backward; the
        # map's gradient, the input gradient and one recomputed tile while the streamed part
        # runs backward.
        head = fmap + kept + max(head_saved + head_largest, fmap)
        stream = fmap + self.input_grad + tile_peak
        return int(self.fixed + max(head, stream))


def estimate_peak_bytes(
    module: nn.Module,
    input_shape: Sequence[int],
    tile_size: int | tuple[int, int],
    head: nn.Module | None = None,
    input_grad: bool = False,
    *,
    input_dtype: torch.dtype = torch.float32,
    keep_last_tile: bool | None = None,
) -> int:
    """Predicted peak memory (bytes) of a whole train step; computed, not measured.

    The step: the streamed forward, ``head`` forward, loss, ``head`` backward, the streamed
    backward, all parameters trainable. The activations autograd saves are counted on the meta
    device (nothing is computed): for one tile at three square tile sizes, fitted by a quadratic
    in the side (extended to rectangles, exact for interior tiles), and for the head on the
    whole output map. The peak is the larger of two moments: the head's backward (output map,
    the kept last tile, the head's saved activations plus the largest of them) and the streamed
    backward (output-map gradient, the input gradient if requested, one tile's saved activations
    plus its largest tensor, for the gradient in flight when the backward pass reaches it; the
    later layers' tensors are freed by then). Added throughout: the weights with two gradient
    buffers and the input (in ``input_dtype``). Not included: allocator overhead, library
    workspaces and the optimiser state; activations are counted in the module's dtype, so under
    autocast the estimate is conservative. It holds for the plain path, which the content-aware
    path never exceeds.

    Args:
        module: a fully convolutional module or a :class:`StreamingModule`.
        input_shape: (N, C, H, W) of the whole input batch.
        tile_size: the tile size to predict for.
        head: the layers after the streamed part (e.g. ``StreamingResNet.head``); default: the
            ``head`` of a :class:`StreamingModule` (set by ``build_streaming_resnet``), else none.
        input_grad: whether the gradient with respect to the input is computed.
        input_dtype: the input's dtype (``torch.uint8`` for images streamed as integers).
        keep_last_tile: default: the :class:`StreamingModule`'s setting, else True.
    """
    model = _MemoryModel(module, input_shape, input_dtype, input_grad, head, keep_last_tile)
    return model.peak(tile_size)


def plan_tile_size(
    module: nn.Module,
    input_shape: Sequence[int],
    memory_budget_bytes: int,
    *,
    head: nn.Module | None = None,
    input_dtype: torch.dtype = torch.float32,
    input_grad: bool = False,
    keep_last_tile: bool | None = None,
) -> int:
    """The largest stride-aligned tile size whose train step fits ``memory_budget_bytes``.

    The memory is computed by :func:`estimate_peak_bytes` (a prediction, not a measurement; the
    head is included when given or known to the :class:`StreamingModule`): leave headroom for
    the optimiser state and allocator overhead. The result is never larger than one tile
    covering the whole image.

    Raises:
        ValueError: if even the smallest useful tile is predicted not to fit.
    """
    model = _MemoryModel(module, input_shape, input_dtype, input_grad, head, keep_last_tile)
    rows, cols = model.node.geometry
    if rows.stride != cols.stride:
        raise ValueError("plan_tile_size needs a module with equal row and column strides")
    stride, margin = rows.stride, max(_margin(model.node, 0), _margin(model.node, 1))
    most = max(rows.out_len(input_shape[-2]), cols.out_len(input_shape[-1]))

    def size(count: int) -> int:
        return -(-(count * stride + margin) // stride) * stride

    if model.peak(size(1)) > memory_budget_bytes:
        raise ValueError(
            f"memory_budget_bytes={memory_budget_bytes} is too small: the smallest tile "
            f"({size(1)} px) is predicted to need {model.peak(size(1))} bytes"
        )
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if model.peak(size(mid)) <= memory_budget_bytes else (lo, mid - 1)
    return size(lo)
