"""Heatmaps (paper IV-D, Fig. 4-6): SmoothGrad for the streaming model, patch probabilities for MIL.

SmoothGrad (Smilkov et al. 2017) averages the sensitivity map, the gradient of the model's output
(the cancer logit) with respect to the input, over ``n`` copies of the image with Gaussian noise;
the paper uses 25 copies and a noise standard deviation of 5% of the image-wide standard deviation.
The gradient of a whole 16384 x 16384 biopsy comes from the streaming engine
(:class:`repro.nn.streaming.StreamingModule` backpropagates to its input tile by tile when the input
requires grad), so one sample needs the device memory of a streamed training step with an input
gradient: the float input and its gradient (2 x 3 x H x W float32, 6 GiB at 16384^2) plus one
tile's activations. Measured on an H200 (``benchmarks/smoothgrad.py``, ResNet-34, tile 2800,
fp32): 13.1 GiB peak and 7.5 s per sample at 16384^2, against 12.2 GiB for the streamed training
step with input gradient of ``benchmarks/streaming.py``. Samples run one at a time; their mean is
accumulated on the CPU in float32 (3 GiB at 16384^2).

The heatmap shown is the absolute value of that mean, maximum over colour channels, averaged down
to the thumbnail size, smoothed and scaled to [0, 1] (:func:`sensitivity_heatmap`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from repro.config import Params
from repro.io.atomic import atomic_path
from repro.methods.streaming import biopsy_dataset
from repro.nn.pixels import unit_float

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

_CHUNK_PIXELS = 1 << 24  # rows are processed in chunks of about this many pixels


# ----------------------------------------------------------------------------- gradients


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block (restored afterwards), so the
    backward pass computes the input gradient only."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(training)


def _as_float_image(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(3, H, W) image as floats in [0, 1]: uint8 is divided by 255, floats are kept."""
    if image.dim() != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got shape {tuple(image.shape)}")
    return unit_float(image, dtype)


def _row_chunks(height: int, width: int) -> Iterator[slice]:
    step = max(1, _CHUNK_PIXELS // max(width, 1))
    for start in range(0, height, step):
        yield slice(start, min(start + step, height))


def image_std(image: torch.Tensor) -> float:
    """Standard deviation over all pixels and channels of an image in [0, 1] units (uint8 images
    are divided by 255), accumulated in float64 chunk by chunk."""
    if image.dim() != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got shape {tuple(image.shape)}")
    scale = 1.0 if image.is_floating_point() else float(torch.iinfo(image.dtype).max)
    total = total_sq = 0.0
    for rows in _row_chunks(image.shape[1], image.shape[2]):
        chunk = image[:, rows].to(torch.float64) / scale
        total += float(chunk.sum())
        total_sq += float((chunk * chunk).sum())
    count = image.numel()
    return math.sqrt(max(total_sq / count - (total / count) ** 2, 0.0))


def input_gradient(
    model: nn.Module, image: torch.Tensor, *, target: int = 0, device=None
) -> torch.Tensor:
    """Gradient of logit ``target`` with respect to the input image (a sensitivity map).

    Args:
        model: maps (1, 3, H, W) floats in [0, 1] to logits (1, K), e.g. a
            :class:`repro.nn.resnet.StreamingResNet`, whose streamed part then backpropagates to the
            input tile by tile. Its parameters get no gradients.
        image: (3, H, W), uint8 or float in [0, 1] (float64 for exactness checks).
        target: index of the output (0: the cancer logit of a binary model).
        device: where to run (default: the model's device).

    Returns:
        (3, H, W) gradient on the CPU, in the image's float dtype (float32 for uint8 images).
    """
    dtype = image.dtype if image.is_floating_point() else torch.float32
    device = _model_device(model) if device is None else torch.device(device)
    x = _as_float_image(image.to(device), dtype).unsqueeze(0).requires_grad_(True)
    with frozen(model), torch.enable_grad():
        logits = model(x)
        _check_logits(logits, target)
        (gradient,) = torch.autograd.grad(logits[0, target], x)
    return gradient[0].cpu()


def smoothgrad(
    model: nn.Module,
    image: torch.Tensor,
    *,
    n_samples: int = 25,
    noise: float = 0.05,
    seed: int = 0,
    target: int = 0,
    device=None,
    progress: bool = False,
) -> torch.Tensor:
    """SmoothGrad: the mean input gradient over ``n_samples`` noisy copies of ``image``.

    Noise is Gaussian with standard deviation ``noise * image_std(image)`` (paper: 5% of the
    image-wide std), added to the image in [0, 1] units without clipping. Sample ``i`` draws its
    noise from a generator seeded with ``seed + i`` on the device, so results are reproducible on
    one device. One sample is on the device at a time; the running mean is kept on the CPU.

    Args:
        model: see :func:`input_gradient`.
        image: (3, H, W) uint8 or float image in [0, 1].
        n_samples: number of noisy copies (paper: 25).
        noise: noise std as a fraction of the image-wide std (paper: 0.05).
        seed: seed of the noise.
        target: output index whose gradient is taken.
        device: where to run (default: the model's device).
        progress: show a progress bar over samples.

    Returns:
        (3, H, W) mean gradient, on the CPU (float32, or float64 for a float64 image).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    device = _model_device(model) if device is None else torch.device(device)
    source = image.to(device)
    sigma = noise * image_std(source)
    height, width = image.shape[-2:]
    mean = torch.zeros(image.shape, dtype=dtype)
    with frozen(model):
        for sample in tqdm(range(n_samples), desc="SmoothGrad", disable=not progress):
            generator = torch.Generator(device=device).manual_seed(seed + sample)
            x = _as_float_image(source, dtype)
            if x.data_ptr() == source.data_ptr():
                x = x.clone()
            for rows in _row_chunks(height, width):
                shape = (x.shape[0], rows.stop - rows.start, width)
                draw = torch.randn(shape, generator=generator, device=device, dtype=dtype)
                x[:, rows].add_(draw.mul_(sigma))
            x = x.unsqueeze(0).requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                _check_logits(logits, target)
                (gradient,) = torch.autograd.grad(logits[0, target], x)
            del x, logits
            for rows in _row_chunks(height, width):  # running mean, moved in chunks
                mean[:, rows] += (gradient[0, :, rows].cpu() - mean[:, rows]) / (sample + 1)
            del gradient
    return mean


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_logits(logits: torch.Tensor, target: int) -> None:
    if logits.dim() != 2 or logits.shape[0] != 1 or not 0 <= target < logits.shape[1]:
        raise ValueError(
            f"model must return logits of shape (1, K) with K > target={target}, "
            f"got shape {tuple(logits.shape)}"
        )


# ----------------------------------------------------------------------------- heatmaps


def heatmap_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of a map whose longer side is ``size`` (never larger than the image)."""
    scale = min(1.0, size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def reduce_gradient(gradient: torch.Tensor, size: int) -> np.ndarray:
    """``|gradient|``, maximum over channels, area-averaged to a longer side of ``size`` px."""
    if gradient.dim() != 3:
        raise ValueError(f"expected a gradient of shape (C, H, W), got {tuple(gradient.shape)}")
    magnitude = gradient.abs().amax(dim=0, keepdim=True).float()
    shape = heatmap_shape(*magnitude.shape[-2:], size)
    reduced = F.interpolate(magnitude[None], size=shape, mode="area")[0, 0]
    return reduced.numpy().astype(np.float32)


# ----------------------------------------------------------------------------- run files


def saliency_dir(params: Params) -> Path:
    """Cached SmoothGrad maps, one ``.npz`` per image, in the streaming run folder."""
    return params.layout.streaming.saliency


def smoothgrad_map(
    params: Params,
    model: nn.Module,
    image_id: str,
    image: torch.Tensor | None = None,
    *,
    device=None,
    force: bool = False,
) -> np.ndarray:
    """The reduced SmoothGrad map of one test image (:func:`reduce_gradient`), cached.

    The cache (``saliency_dir(params) / f"{image_id}.npz"``, written atomically) is reused when
    it was made with the same number of samples, noise, seed and size.

    Args:
        params: ``evaluation.smoothgrad_samples``, ``smoothgrad_noise``, ``heatmap_size`` and
            ``run.seed`` are used.
        model: the final streaming model (on its device).
        image_id: the biopsy.
        image: its (3, H, W) uint8 tensor; loaded with :func:`load_image` when None.
        force: recompute even when cached.
    """
    settings = params.evaluation
    meta = _cache_key(params)
    path = saliency_dir(params) / f"{image_id}.npz"
    cached = None if force else cached_smoothgrad_map(params, image_id)
    if cached is not None:
        return cached
    if image is None:
        image = load_image(params, image_id)
    gradient = smoothgrad(
        model,
        image,
        n_samples=settings.smoothgrad_samples,
        noise=settings.smoothgrad_noise,
        seed=params.run.seed,
        device=device,
    )
    reduced = reduce_gradient(gradient, settings.heatmap_size)
    del gradient
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, heatmap=reduced, **meta)
    return reduced


def load_image(params: Params, image_id: str) -> torch.Tensor:
    """The prepared image as the model sees it at test time: uint8 (3, H, W), no augmentation."""
    rows = pd.DataFrame({"image_id": [image_id], "label": [0]})
    return biopsy_dataset(params, rows, augment=False)[0]["image"]


# ----------------------------------------------------------------------------- figures


def cached_smoothgrad_map(params: Params, image_id: str) -> np.ndarray | None:
    """The cached reduced SmoothGrad map of ``image_id`` for the current settings, or None."""
    path = saliency_dir(params) / f"{image_id}.npz"
    if not path.exists():
        return None
    with np.load(path) as cached:
        if all(float(cached[k]) == float(v) for k, v in _cache_key(params).items()):
            return cached["heatmap"]
    return None


def _cache_key(params: Params) -> dict[str, float]:
    settings = params.evaluation
    return {
        "n_samples": settings.smoothgrad_samples,
        "noise": settings.smoothgrad_noise,
        "seed": params.run.seed,
        "size": settings.heatmap_size,
    }
