"""Public path of the ResNet builders; the code lives in :mod:`repro.nn.resnet`."""

from repro.nn.resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    ResNetClassifier,
    StreamingResNet,
    build_resnet,
    build_streaming_resnet,
    calibrate_batchnorm,
    freeze_streamed,
    unfreeze_streamed,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "ResNetClassifier",
    "StreamingResNet",
    "build_resnet",
    "build_streaming_resnet",
    "calibrate_batchnorm",
    "freeze_streamed",
    "unfreeze_streamed",
]
