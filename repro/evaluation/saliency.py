"""Heatmaps (paper IV-D, Fig. 4-6): SmoothGrad for the streaming model, patch probabilities for MIL.

SmoothGrad (Smilkov et al. 2017) averages the sensitivity map, the gradient of the model's output
(the cancer logit) with respect to the input, over ``n`` copies of the image with Gaussian noise;
the paper uses 25 copies and a noise standard deviation of 5% of the image-wide standard deviation.
The gradient of a whole 16384 x 16384 biopsy comes from the streaming engine
(:class:`repro.streaming.StreamingModule` backpropagates to its input tile by tile when the input
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
from scipy.ndimage import gaussian_filter
from torch import nn
from tqdm.auto import tqdm

from repro.atomic import atomic_path
from repro.config import Params

if TYPE_CHECKING:
    from repro.figures import HeatmapExample

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
    if image.is_floating_point():
        return image.to(dtype)
    return image.to(dtype).div_(torch.iinfo(image.dtype).max)


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
            :class:`repro.models.StreamingResNet`, whose streamed part then backpropagates to the
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


def sensitivity_heatmap(
    reduced: np.ndarray, *, sigma: float | None = None, percentile: float = 99.5
) -> np.ndarray:
    """Display map in [0, 1]: Gaussian-smoothed (``sigma`` in map px; default 1/256 of the longer
    side, our choice) and divided by its ``percentile`` (gradients are heavy-tailed), clipped."""
    reduced = np.asarray(reduced, dtype=np.float32)
    if sigma is None:
        sigma = max(reduced.shape) / 256
    smooth = gaussian_filter(reduced, sigma) if sigma > 0 else reduced
    top = float(np.percentile(smooth, percentile)) if smooth.size else 0.0
    if top <= 0:
        return np.zeros_like(smooth)
    return np.clip(smooth / top, 0, 1).astype(np.float32)


def patch_probability_map(
    patches: pd.DataFrame, image_size: tuple[int, int], patch_size: int, size: int
) -> np.ndarray:
    """MIL heatmap: each patch's probability painted over its area, NaN where there is no patch.

    Args:
        patches: columns x, y (top-left, image px) and score of one biopsy's patches.
        image_size: (height, width) of the prepared image.
        patch_size: patch side in image px (``mil.patch_size``).
        size: longer side of the map.

    Returns:
        (h, w) float32 map; where patches overlap, the highest probability.
    """
    missing = [c for c in ("x", "y", "score") if c not in patches.columns]
    if missing:
        raise ValueError(f"patches: missing columns {missing}, got {list(patches.columns)}")
    height, width = image_size
    shape = heatmap_shape(height, width, size)
    scale_y, scale_x = shape[0] / height, shape[1] / width
    heatmap = np.full(shape, np.nan, dtype=np.float32)
    for x, y, score in patches[["x", "y", "score"]].itertuples(index=False):
        top, left = math.floor(y * scale_y), math.floor(x * scale_x)
        bottom = max(top + 1, math.ceil((y + patch_size) * scale_y))
        right = max(left + 1, math.ceil((x + patch_size) * scale_x))
        region = heatmap[top:bottom, left:right]
        np.fmax(region, np.float32(score), out=region)
    return heatmap


# ----------------------------------------------------------------------------- run files


def saliency_dir(params: Params) -> Path:
    """``runs/<experiment>/streaming/saliency``: cached SmoothGrad maps, one ``.npz`` per image."""
    return params.run_dir / "streaming" / "saliency"


def load_thumbnail(params: Params, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The prepared image shrunk to exactly ``shape`` (h, w): uint8 (h, w, 3)."""
    import pyvips

    from repro.data.dataset import prepared_path

    path = prepared_path(params, image_id)
    height, width = shape
    image = pyvips.Image.thumbnail(str(path), width, height=height, size="force")
    array = image.numpy()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


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
    from repro.data.dataset import BiopsyDataset

    rows = pd.DataFrame({"image_id": [image_id], "label": [0]})
    return BiopsyDataset(rows, params, augment=False)[0]["image"]


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


def choose_examples(predictions: dict[str, pd.DataFrame], count: int) -> list[str]:
    """Image ids for Fig. 6: biopsies every method predicts correctly at its maximum-accuracy
    threshold; cancers first (highest mean score), then negatives (lowest), ``count`` in all."""
    from repro.metrics import max_accuracy_threshold

    correct = None
    merged = None
    for method, frame in predictions.items():
        threshold, _ = max_accuracy_threshold(frame["label"], frame["score"])
        right = frame.loc[(frame["score"] >= threshold) == frame["label"].astype(bool)]
        ids = set(right["image_id"])
        correct = ids if correct is None else correct & ids
        part = frame[["image_id", "label", "score"]].rename(columns={"score": method})
        merged = part if merged is None else merged.merge(part, on=["image_id", "label"])
    if merged is None:
        return []
    merged = merged[merged["image_id"].isin(correct)]
    merged = merged.assign(mean=merged[list(predictions)].mean(axis=1))
    positives = merged[merged["label"] == 1].sort_values("mean", ascending=False, kind="stable")
    negatives = merged[merged["label"] == 0].sort_values("mean", kind="stable")
    return [*positives["image_id"], *negatives["image_id"]][:count]


def heatmap_examples(
    params: Params,
    image_ids: list[str],
    predictions: dict[str, pd.DataFrame],
    patches: pd.DataFrame | None,
    model: nn.Module | None = None,
) -> list[HeatmapExample]:
    """:class:`repro.figures.HeatmapExample` per image: thumbnail, SmoothGrad map (computed or
    from the cache; the final streaming model is loaded on the first cache miss when ``model`` is
    None) and MIL patch probabilities (None without patch scores)."""
    from repro.figures import HeatmapExample
    from repro.runtime import set_torch_threads

    set_torch_threads(params.run.torch_threads)
    size = params.evaluation.heatmap_size
    image_shape = (params.data.input_size, params.data.input_size)
    examples = []
    for image_id in image_ids:
        reduced = cached_smoothgrad_map(params, image_id)
        if reduced is None and "streaming" in predictions:
            if model is None:
                from repro.train import load_final_model

                model = load_final_model(params)
            reduced = smoothgrad_map(params, model, image_id)
        shape = reduced.shape if reduced is not None else heatmap_shape(*image_shape, size)
        mil_map = None
        if patches is not None:
            mine = patches[patches["image_id"] == image_id]
            if len(mine):
                mil_map = patch_probability_map(mine, image_shape, params.mil.patch_size, size)
        examples.append(
            HeatmapExample(
                image_id=image_id,
                caption=_caption(image_id, predictions),
                thumbnail=load_thumbnail(params, image_id, shape),
                saliency=None if reduced is None else sensitivity_heatmap(reduced),
                patches=mil_map,
            )
        )
    return examples


def _caption(image_id: str, predictions: dict[str, pd.DataFrame]) -> str:
    parts = []
    label = None
    for method, frame in predictions.items():
        row = frame[frame["image_id"] == image_id]
        if len(row):
            label = int(row["label"].iloc[0])
            parts.append(f"{'MIL' if method == 'mil' else method} {row['score'].iloc[0]:.2f}")
    head = [f"label {label}"] if label is not None else []
    return ", ".join(head + parts)


def write_figure_6(params: Params, count: int | None = None) -> tuple[list[Path], list[str]]:
    """Fig. 6 for this experiment (``fig6_heatmaps_<experiment>.png`` / ``.pdf``): correctly
    predicted biopsies with the SmoothGrad map of the streaming model and the MIL patch
    probabilities. Returns the files and the image ids shown."""
    from repro.evaluation import figures_dir, load_patch_scores, load_run_predictions
    from repro.figures import heatmap_figure, save_figure

    predictions = load_run_predictions(params)
    if not predictions:
        raise FileNotFoundError(
            f"no test predictions in {params.run_dir}: run notebook 05 (evaluate) first"
        )
    count = params.evaluation.heatmap_examples if count is None else count
    image_ids = choose_examples(predictions, count)
    if not image_ids:
        raise ValueError(f"{params.experiment}: no biopsy is predicted correctly by every model")
    patches = load_patch_scores(params.run_dir) if "mil" in predictions else None
    examples = heatmap_examples(params, image_ids, predictions, patches)
    figure = heatmap_figure(
        examples, title=f"{params.experiment}: correctly predicted test biopsies (cf. Fig. 6)"
    )
    files = save_figure(figure, figures_dir(params) / f"fig6_heatmaps_{params.experiment}")
    return files, image_ids
