"""Time per SmoothGrad sample through the streaming engine, at a few image sizes (issue 7).

One sample is a noisy copy of the image, a streamed forward pass and a streamed backward pass to the
input (:func:`repro.evaluation.saliency.smoothgrad`); the running mean lives on the CPU. Each size
runs in a fresh subprocess so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` (the device budget, which must hold the float input and its
gradient, 2 x 3 x H x W x 4 bytes, plus one tile's activations), on CPU the peak RSS.

Examples::

    python benchmarks/smoothgrad.py --sizes 2048 4096             # CPU
    python benchmarks/smoothgrad.py --device cuda --sizes 4096 8192 16384

The tile must be much larger than the streamed part's receptive-field margin (ResNet-34 up to
layer3: a 640 px tile on a 512 px image already needs 49 tiles), so the default is the paper's
2800. Measured on one H200 (fp32, 1 sample): 4096^2 0.61 s / 3.9 GiB, 8192^2 2.2 s / 6.0 GiB,
16384^2 7.5 s / 13.1 GiB peak device memory (64 tiles).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from _common import (
    GIB,
    peak_bytes,
    peak_rss_bytes,
    run_worker,
    serve_worker,
    start_measuring,
    synchronize,
)


def _worker(spec: dict) -> dict:
    import torch

    from repro.evaluation.saliency import smoothgrad
    from repro.nn.resnet import build_streaming_resnet

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    model = build_streaming_resnet(spec["arch"], weights=None, tile_size=spec["tile"]).to(device)
    size = spec["size"]
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    smoothgrad(model, image[:, : min(size, 512), : min(size, 512)], n_samples=1)  # warm-up
    start_measuring(device)
    start = time.perf_counter()
    result = smoothgrad(model, image, n_samples=spec["samples"], noise=0.05, seed=0)
    synchronize(device)
    seconds = time.perf_counter() - start
    row = dict(spec, seconds_per_sample=seconds / spec["samples"])
    row["tiles"] = len(model.streamed.plan((1, 3, size, size)).tiles)
    if device.type == "cuda":
        row["peak_device_gib"] = peak_bytes(device) / GIB
    row["peak_rss_gib"] = peak_rss_bytes() / GIB
    row["finite"] = bool(torch.isfinite(result).all())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--tile-size", type=int, default=2800, help="paper: 2800")
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=2, help="timed samples per size")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(_worker, args.worker)
        return 0
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, device {args.device}")
    for size in args.sizes:
        spec = {
            "size": size,
            "tile": args.tile_size,
            "arch": args.arch,
            "device": args.device,
            "samples": args.samples,
        }
        print(json.dumps(run_worker(__file__, spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
