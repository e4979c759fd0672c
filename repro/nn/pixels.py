"""Pixel values as the networks take them."""

from __future__ import annotations

import torch


def unit_float(image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``image`` as floats in [0, 1]: integer images (uint8) are divided by their maximum value,
    float images are taken to be in [0, 1] already and only cast."""
    if image.is_floating_point():
        return image.to(dtype)
    return image.to(dtype).div_(torch.iinfo(image.dtype).max)
