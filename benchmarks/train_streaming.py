"""Streaming training throughput: images/hour of a stage-1 and a stage-2 epoch, with peak memory.

Each measurement runs :class:`repro.training.loop.Trainer` (streaming side) for a short epoch
(``--images`` images, after one warm-up mini-batch that is not timed) in a fresh subprocess, so the
peak memory is that configuration's own: on CUDA ``torch.cuda.max_memory_allocated`` (mixed
precision and channels_last as in the params file), on CPU the process's peak RSS. Images are random
uint8 tensors of the input size held in memory: this measures the training step (streamed forward,
backward, gradient accumulation, optimiser step), not reading or augmenting slides. Weights are
random (no download); the speed does not depend on their values.

Sizes: the demo (``params/demo.yaml``: its input size, architecture and tile size) and, with
``--include-16384``, the paper's setting (``params/full.yaml``: ResNet-34, 16384 px, tile 2800).

Example::

    python benchmarks/train_streaming.py                     # demo size, CPU or CUDA
    python benchmarks/train_streaming.py --include-16384 --images 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import (
    GIB,
    device_name,
    peak_bytes,
    run_worker,
    serve_worker,
    start_measuring,
    synchronize,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent


def _worker(spec: dict) -> dict:
    """One stage's short epoch in this process; returns the result row."""
    import torch

    from repro.config import load_params
    from repro.data.sampling import BalancedSampler
    from repro.methods.streaming import WholeBiopsies, build_model, freeze_for_stage
    from repro.training.loop import Trainer
    from repro.training.runtime import Runtime, select_device
    from repro.training.schedule import EpochRun

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    params = load_params(ROOT / spec["params"])
    size = params.data.input_size
    device = select_device(spec["device"])
    torch.manual_seed(0)
    model = build_model(params, weights=None).to(device)
    if device.type == "cuda" and params.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = params.train.batch_size
    count = spec["images"] + batch  # the first mini-batch is a warm-up
    labels = [index % 2 for index in range(count)]
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
        for _ in range(2)
    ]
    data = [
        {"image": images[i % 2], "label": torch.tensor(float(labels[i])), "image_id": str(i)}
        for i in range(count)
    ]
    runtime = Runtime(
        device,
        mixed_precision=params.run.mixed_precision,
        channels_last=params.run.channels_last,
        progress=False,
    )
    trainer = Trainer(
        model,
        WholeBiopsies(data, data, BalancedSampler(labels, seed=0), runtime=runtime),
        batch_size=batch,
        momentum=params.train.momentum,
        optimizer=params.train.optimizer,
        freeze=freeze_for_stage,
        runtime=runtime,
        epoch_images=batch,
    )
    stage = spec["stage"]
    trainer.begin_stage(stage, params.train.lr if stage == 1 else params.train.stage2_lr)
    trainer.train_epoch(EpochRun(stage, 1, 1, 1e-4))  # warm-up: thread pools, kernels
    trainer.epoch_images = spec["images"]
    start_measuring(device)
    start = time.perf_counter()
    metrics = trainer.train_epoch(EpochRun(stage, 2, 2, 1e-4))
    synchronize(device)
    seconds = time.perf_counter() - start
    return dict(
        spec,
        size=size,
        arch=params.streaming.arch,
        tile=int(model.streamed.tile_size[0]),
        tiles=len(model.streamed.plan((1, 3, size, size)).tiles),
        batch_size=batch,
        images_timed=metrics["train_images"],
        seconds=seconds,
        images_per_hour=metrics["train_images"] / seconds * 3600,
        mixed_precision=device.type == "cuda" and params.run.mixed_precision,
        peak_bytes=peak_bytes(device),
    )


def _table(rows: list[dict]) -> str:
    head = "size   arch      stage  tile  tiles  images  seconds  images/hour  peak GiB"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['params']:<16} stage {r['stage']}  failed: {r['error']}")
            continue
        lines.append(
            f"{r['size']:<6} {r['arch']:<9} {r['stage']:>5}  {r['tile']:>4}  {r['tiles']:>5}  "
            f"{r['images_timed']:>6}  {r['seconds']:7.1f}  {r['images_per_hour']:11.0f}  "
            f"{r['peak_bytes'] / GIB:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-params", default="params/demo.yaml")
    parser.add_argument("--full-params", default="params/full.yaml")
    parser.add_argument("--include-16384", action="store_true", help="also the paper's setting")
    parser.add_argument("--images", type=int, default=8, help="timed images per stage")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(_worker, args.worker)
        return

    import torch

    from repro.training.runtime import select_device

    device = select_device(args.device)
    files = [args.demo_params] + ([args.full_params] if args.include_16384 else [])
    rows = []
    for params in files:
        for stage in (1, 2):
            spec = dict(
                params=params,
                stage=stage,
                images=args.images,
                device=str(device),
                threads=args.threads,
            )
            rows.append(run_worker(__file__, spec, cwd=ROOT))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    out = args.out or Path(__file__).parent / "results" / f"train_streaming_{device.type}.json"
    meta = dict(device=str(device), device_name=device_name(device), torch=torch.__version__)
    write_results(out, dict(meta, args=vars(args), results=rows))


if __name__ == "__main__":
    main()
