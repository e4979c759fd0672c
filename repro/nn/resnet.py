"""ResNet with frozen batch norm, split into a streamed part and a conventionally run head.

Pinckaers et al. 2021 (Sec. IV-A) train an ImageNet-initialised ResNet-34 end to end on 16384^2
biopsies: the first layers run through :class:`repro.nn.streaming.StreamingModule`, the
reconstructed feature map goes through the remaining layers as usual. Batch norm is frozen (eval
mode) throughout, which is what makes tiling exact.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from repro.nn.pixels import unit_float
from repro.nn.streaming import StreamingModule

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
}
_STEM = ("conv1", "bn1", "relu", "maxpool")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for images with values in [0, 1].

    Integer (uint8) images are scaled to [0, 1] before this by :class:`StreamingModule`; a float
    image must already be in [0, 1]. Pointwise, so the streaming engine can tile it.
    """

    streaming_pointwise = True

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.empty(len(mean), 1, 1))
        self.register_buffer("std", torch.empty(len(std), 1, 1))
        self.set_stats(mean, std)

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Replace the statistics, e.g. by the training set's per-channel mean and std."""
        mean, std = torch.as_tensor(mean).reshape(-1, 1, 1), torch.as_tensor(std).reshape(-1, 1, 1)
        if mean.shape != self.mean.shape or std.shape != self.std.shape or (std <= 0).any():
            raise ValueError(
                f"expected {self.mean.shape[0]} means and positive stds, got {mean}, {std}"
            )
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class StreamingResNet(nn.Module):
    """A ResNet whose first layers are streamed; batch norm stays in eval mode even in ``train()``.

    Attributes:
        streamed: :class:`StreamingModule` over ``normalize`` + stem + stages up to the split.
        head: the remaining stages, global pooling, flatten and the linear classifier.
        normalize: the :class:`Normalize` at the start of the streamed part.
        stream_until: the last streamed stage or block, e.g. ``"layer3"``.
    """

    def __init__(self, streamed: StreamingModule, head: nn.Sequential, stream_until: str):
        super().__init__()
        self.streamed = streamed
        self.head = head
        self.stream_until = stream_until

    @property
    def normalize(self) -> Normalize:
        return self.streamed.module.normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, 3, H, W): uint8, or float in [0, 1]."""
        return self.head(self.streamed(x))

    def train(self, mode: bool = True) -> StreamingResNet:
        """Set train/eval mode; batch norm layers stay in eval mode (frozen statistics)."""
        super().train(mode)
        return _freeze_batchnorm(self)


class ResNetClassifier(nn.Module):
    """A ResNet run conventionally (not streamed), with frozen batch norm: the MIL baseline's
    patch classifier (paper IV-B: ResNet-34, ImageNet weights, frozen batch norm).

    Attributes:
        normalize: :class:`Normalize` (ImageNet mean and std by default, as in the paper for MIL).
        features: stem and the four stages.
        head: global pooling, flatten and the linear classifier.
    """

    def __init__(self, normalize: Normalize, features: nn.Sequential, head: nn.Sequential):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, 3, H, W): uint8, or float in [0, 1]."""
        return self.head(self.features(self.normalize(unit_float(x, self.normalize.mean.dtype))))

    def train(self, mode: bool = True) -> ResNetClassifier:
        """Set train/eval mode; batch norm layers stay in eval mode (frozen statistics)."""
        super().train(mode)
        return _freeze_batchnorm(self)


class PooledStandardize(nn.modules.batchnorm._BatchNorm):
    """Per-feature ``(x - mean) / std`` of globally pooled features (N, C), with statistics
    across images: a frozen batch norm without affine weights, between pooling and classifier.

    Our choice for random initialisation (``streaming.standardize_pooled``,
    ``mil.standardize_pooled``): randomly initialised features come with arbitrary offsets and
    scales, which leave a linear classifier ill-conditioned. Its statistics are estimated with
    the others by :func:`calibrate_batchnorm`; in training mode (calibration only: the models keep
    batch norm in eval mode) it adds each batch's rows to its running mean and variance
    (Chan et al.'s pairwise update), so one image per batch suffices.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, momentum=None, affine=False)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 2:
            raise ValueError(f"expected pooled features (N, C), got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.training:
            self._accumulate(input.detach())
        mean, var = self.running_mean, self.running_var
        return (input - mean) / torch.sqrt(var + self.eps)

    def _accumulate(self, rows: torch.Tensor) -> None:
        count, added = int(self.num_batches_tracked), rows.shape[0]  # here: rows seen so far
        total = count + added
        batch_mean = rows.mean(dim=0)
        batch_sq = ((rows - batch_mean) ** 2).sum(dim=0)
        squares = self.running_var * (count - 1) if count > 1 else torch.zeros_like(batch_sq)
        delta = batch_mean - self.running_mean
        squares = squares + batch_sq + delta**2 * (count * added / total)
        self.running_mean += delta * (added / total)
        self.running_var.copy_(squares / max(total - 1, 1))
        self.num_batches_tracked += added


def _freeze_batchnorm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def _split_point(stream_until: str, model: torchvision.models.ResNet) -> tuple[int, int]:
    """(stage 1..4, blocks of that stage streamed) for ``"layerK"`` or ``"layerK.J"``."""
    stage, _, block = stream_until.partition(".")
    stages = {f"layer{k}": k for k in range(1, 5)}
    if stage not in stages or (block and not block.isdigit()):
        raise ValueError(f"stream_until must be 'layerK' or 'layerK.J', got {stream_until!r}")
    depth = len(getattr(model, stage))
    blocks = int(block) + 1 if block else depth
    if blocks > depth:
        raise ValueError(f"stream_until={stream_until!r}: {stage} has only {depth} blocks")
    return stages[stage], blocks


def _state_dict(arch: str, weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """ImageNet weights via torchvision's weights API, or a local torchvision state_dict."""
    if weights != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"weights must be None, 'imagenet' or a state_dict file; no file {path}"
            )
        return torch.load(path, map_location="cpu", weights_only=True)
    enum = _ARCHS[arch][1]
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except OSError as err:  # URLError and HTTPError are OSErrors
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name
        raise RuntimeError(
            f"could not download the ImageNet weights of {arch} ({err}). Offline? Put the file "
            f"from {enum.url} at {target}, or pass weights=<path to a torchvision state_dict>."
        ) from err


def build_streaming_resnet(
    arch: str = "resnet34",
    *,
    weights: str | os.PathLike | None = None,
    stream_until: str = "layer3",
    tile_size: int | tuple[int, int] = 2800,
    num_classes: int = 1,
    head_pool: str = "max",
    standardize_pooled: bool = False,
) -> StreamingResNet:
    """A torchvision ResNet with frozen batch norm, streamed up to ``stream_until``.

    The default split follows the paper's settings file: conv1..layer3 (stride 16; 16384^2 input
    gives a 256 x 1024 x 1024 map for ResNet-34) are streamed, layer4 runs normally. The paper's
    text describes a 512 x 512 x 512 map, which is ``stream_until="layer4.0"`` (stride 32; what the
    authors' code streams in fp32). The head pools globally with max (the authors' code) or avg.

    Args:
        arch: "resnet18", "resnet34" or "resnet50".
        weights: None (random init), "imagenet" (torchvision ``IMAGENET1K_V1``; offline, the file
            must already be in torch hub's checkpoint folder) or a path to a torchvision state_dict.
            The classifier is always newly initialised.
        stream_until: last streamed stage or block, "layerK" or "layerK.J" (e.g. "layer4.0").
        tile_size: input tile size of the streamed part; 2800 as in the paper.
        num_classes: outputs of the linear classifier (1 for binary cancer vs. negative).
        head_pool: "max" or "avg" global pooling.
        standardize_pooled: put a :class:`PooledStandardize` between pooling and classifier.
    """
    net = _torchvision_resnet(arch, weights, head_pool)
    stage, blocks = _split_point(stream_until, net)
    streamed = OrderedDict([("normalize", Normalize())])
    streamed.update((name, getattr(net, name)) for name in _STEM)
    streamed.update((f"layer{k}", getattr(net, f"layer{k}")) for k in range(1, stage))
    layer = getattr(net, f"layer{stage}")
    named = list(layer.named_children())
    streamed[f"layer{stage}"] = nn.Sequential(OrderedDict(named[:blocks]))
    head = OrderedDict()
    if blocks < len(named):
        head[f"layer{stage}"] = nn.Sequential(OrderedDict(named[blocks:]))
    head.update((f"layer{k}", getattr(net, f"layer{k}")) for k in range(stage + 1, 5))
    head.update(_classifier(net, head_pool, num_classes, standardize_pooled))
    head = nn.Sequential(head)
    streaming = StreamingModule(nn.Sequential(streamed), tile_size, head=head)  # head: planning
    model = StreamingResNet(streaming, head, stream_until)
    return model.train()


def build_resnet(
    arch: str = "resnet34",
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int = 1,
    head_pool: str = "avg",
    standardize_pooled: bool = False,
) -> ResNetClassifier:
    """A torchvision ResNet with frozen batch norm, run conventionally (e.g. on patches).

    Args:
        arch: "resnet18", "resnet34" or "resnet50".
        weights: None (random init), "imagenet" or a path to a torchvision state_dict, as for
            :func:`build_streaming_resnet`. The classifier is always newly initialised.
        num_classes: outputs of the linear classifier (1 for binary cancer vs. negative).
        head_pool: "avg" (torchvision's ResNet, as Campanella et al. use it) or "max".
        standardize_pooled: put a :class:`PooledStandardize` between pooling and classifier.
    """
    net = _torchvision_resnet(arch, weights, head_pool)
    features = OrderedDict((name, getattr(net, name)) for name in _STEM)
    features.update((f"layer{k}", getattr(net, f"layer{k}")) for k in range(1, 5))
    head = nn.Sequential(_classifier(net, head_pool, num_classes, standardize_pooled))
    return ResNetClassifier(Normalize(), nn.Sequential(features), head).train()


def _torchvision_resnet(
    arch: str, weights: str | os.PathLike | None, head_pool: str
) -> torchvision.models.ResNet:
    """The torchvision network with ``weights`` loaded except its classifier ``fc``."""
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    if head_pool not in ("max", "avg"):
        raise ValueError(f"head_pool must be 'max' or 'avg', got {head_pool!r}")
    net = _ARCHS[arch][0](weights=None)
    if weights is not None:
        state = {k: v for k, v in _state_dict(arch, weights).items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(
                f"weights do not fit {arch}: missing {missing}, unexpected {unexpected}"
            )
    return net


def _classifier(
    net: torchvision.models.ResNet, head_pool: str, num_classes: int, standardize: bool
) -> OrderedDict[str, nn.Module]:
    """Global pooling, flatten, optionally :class:`PooledStandardize`, and a new linear layer."""
    pool = nn.AdaptiveMaxPool2d(1) if head_pool == "max" else nn.AdaptiveAvgPool2d(1)
    layers = OrderedDict([("pool", pool), ("flatten", nn.Flatten(1))])
    if standardize:
        layers["standardize"] = PooledStandardize(net.fc.in_features)
    layers["fc"] = nn.Linear(net.fc.in_features, num_classes)
    return layers


def _set_streamed_trainable(model: StreamingResNet, trainable: bool) -> StreamingResNet:
    for param in model.streamed.parameters():
        param.requires_grad_(trainable)
    return model


def freeze_streamed(model: StreamingResNet) -> StreamingResNet:
    """Stage 1: freeze the streamed part; its backward pass is then skipped entirely."""
    return _set_streamed_trainable(model, False)


def unfreeze_streamed(model: StreamingResNet) -> StreamingResNet:
    """Stage 2: train the whole network."""
    return _set_streamed_trainable(model, True)


@torch.no_grad()
def calibrate_batchnorm(
    model: StreamingResNet | ResNetClassifier, images: Iterable[torch.Tensor]
) -> StreamingResNet | ResNetClassifier:
    """Estimate every batch norm's running statistics from training images, then freeze them.

    For random initialisation, where frozen batch norm would otherwise normalise with mean 0 and
    variance 1. The network runs conventionally (not streamed) over ``images`` with batch norm in
    training mode and ``momentum=None`` (cumulative average over the batches), without gradients;
    a :class:`PooledStandardize` gets a second pass, over the network with the others frozen.

    Args:
        model: the model to calibrate in place.
        images: float tensors (N, 3, h, w) in [0, 1], e.g. downscaled crops of training images.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    pooled = [bn for bn in norms if isinstance(bn, PooledStandardize)]
    layers = [bn for bn in norms if not isinstance(bn, PooledStandardize)]
    phases = [layers, pooled] if pooled else [layers]  # pooled: over the frozen network's features
    if isinstance(model, StreamingResNet):
        net = nn.Sequential(model.streamed.module, model.head)
    else:
        net = model
    param = next(model.parameters())
    images = list(images) if pooled else images  # only a second pass needs them held
    batches = 0
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.eval()
        for phase in phases:
            for bn in phase:
                bn.train()
            batches = 0
            for batch in images:
                if not batch.is_floating_point():
                    raise TypeError(
                        f"calibration images must be float in [0, 1], got {batch.dtype}"
                    )
                net(batch.to(param.device, param.dtype))
                batches += 1
            for bn in phase:
                bn.eval()
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
            bn.eval()
    if batches == 0:
        raise ValueError("calibrate_batchnorm needs at least one batch of images")
    logger.info("calibrated %d batch norm layers on %d batches", len(norms), batches)
    return model
