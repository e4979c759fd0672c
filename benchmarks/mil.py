"""Throughput of the MIL baseline: patches per second in the inference and the training phase.

The phases are measured as :class:`repro.training.loop.Trainer` runs them with
:class:`repro.methods.mil.TopOnePatches` (issue 6): patches read from prepared tiled TIFFs by
``--workers`` spawned processes, augmented per patch, scored in batches of 64 without gradients
(inference phase), then the top-1 patch of every biopsy trained in mini-batches of 16 (forward,
backward, step; training phase, negatives oversampled). A synthetic set is generated and prepared in
a temporary folder first. The first epoch (worker start-up, allocator warm-up) is not counted; the
numbers are the mean of the next ``--epochs``. For comparison the model alone (random uint8 patches
already on the device) is timed too.

Configurations: ``demo`` (ResNet-18, 64 px patches, as ``params/demo.yaml``) and ``paper``
(ResNet-34, 224 px patches at 0.96 um/px, our default for the paper). CUDA runs use mixed precision
and channels_last (``run.*`` defaults). The process CPU time is recorded too (on a shared CPU it
varies less than the wall time).

Example::

    python benchmarks/mil.py                       # CPU (and CUDA when present), both configs
    python benchmarks/mil.py --device cuda --images 96 --workers 8
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from _common import synchronize, write_results

CONFIGS = {
    "demo": {"arch": "resnet18", "patch": 64, "input_size": 768},
    "paper": {"arch": "resnet34", "patch": 224, "input_size": 1024},
}
RESULTS = Path(__file__).with_name("results")


def _params(root: Path, config: dict, images: int, device: str, workers: int):
    from repro.config import build_params

    return build_params(
        {
            "experiment": "bench",
            "run": {"out_dir": str(root / "runs"), "device": device, "num_workers": workers},
            "data": {
                "source": "synthetic",
                "panda_dir": str(root / "raw"),
                "prepared_dir": str(root / "prepared"),
                "input_size": config["input_size"],
                "synthetic_images": images,
                "synthetic_size": 2 * config["input_size"],
                "tissue_downsample": 8,  # as params/demo.yaml, for these small images
                "tissue_min_object_px": 1,
            },
            "splits": {"tune_fraction": 0.1, "test_fraction": 0.1},
            "mil": {
                "arch": config["arch"],
                "weights": None,
                "patch_size": config["patch"],
                "patch_stride": config["patch"],
                "min_tissue_fraction": 0.0,  # every patch with some tissue
                "optimizer": "adam",
                "lr": 1e-4,
            },
        }
    )


def _phases(params, epochs: int) -> dict:
    """Inference- and training-phase throughput of MIL epochs 2 .. epochs + 1."""
    from repro.data.patches import PatchDataset, PatchLoader
    from repro.data.prepare import prepare_dataset
    from repro.data.sampling import BalancedSampler
    from repro.data.splits import load_split, make_splits
    from repro.methods import mil
    from repro.training.loop import Trainer
    from repro.training.runtime import Runtime, select_device
    from repro.training.schedule import EpochRun

    make_splits(prepare_dataset(params, progress=False), params)
    train_rows = load_split(params, "train")
    train = mil.experiment_patches(params, train_rows)
    tune = mil.experiment_patches(params, load_split(params, "tune"))
    device = select_device(params.run.device)
    run = params.run
    runtime = Runtime(device, mixed_precision=run.mixed_precision,
                      channels_last=run.channels_last, progress=False)  # fmt: skip
    model = runtime.place(mil.build_model(params))
    sampler = BalancedSampler(train_rows["label"].tolist(), seed=0)
    dataset = PatchDataset(params.prepared, params.mil.patch_size, params.augmentation, seed=0)
    loader = PatchLoader(dataset, num_workers=run.num_workers, pin_memory=device.type == "cuda")
    data = mil.TopOnePatches(
        train, tune, sampler, loader, batch_size=params.mil.batch_size,
        inference_batch_size=params.mil.inference_batch_size, runtime=runtime,
    )  # fmt: skip
    trainer = Trainer(model, data, batch_size=params.mil.batch_size, optimizer=params.mil.optimizer,
                      momentum=params.mil.momentum, runtime=runtime)  # fmt: skip
    trainer.begin_stage(1, params.mil.lr)
    rows = []
    for epoch in range(1, epochs + 2):
        cpu = time.process_time()
        metrics = trainer.train_epoch(EpochRun(1, epoch, epoch, params.mil.lr))
        metrics["cpu_seconds"] = time.process_time() - cpu
        rows.append(metrics)
    loader.close()
    measured = rows[1:]

    def mean(key: str) -> float:
        return sum(row[key] for row in measured) / len(measured)

    return {
        "biopsies": len(train_rows),
        "inference_patches": int(measured[0]["inference_patches"]),
        "inference_per_s": mean("inference_patches") / mean("inference_seconds"),
        "training_patches": int(measured[0]["train_images"]),
        "training_per_s": mean("train_images") / mean("seconds"),
        "main_cpu_s_per_epoch": mean("cpu_seconds"),
    }


def _model_only(params, batches: int = 5) -> dict:
    """Forward (batch 64, no grad) and train step (batch 16) on random patches on the device."""
    import torch

    from repro.methods import mil
    from repro.training.runtime import autocast, select_device, use_channels_last

    device = select_device(params.run.device)
    model = mil.build_model(params).to(device)
    memory_format = torch.contiguous_format
    if use_channels_last(device, params.run.channels_last):
        memory_format = torch.channels_last
        model.to(memory_format=memory_format)
    amp = params.run.mixed_precision
    size = params.mil.patch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def patches(n):
        x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
        return x.contiguous(memory_format=memory_format)

    def forward():
        with torch.no_grad(), autocast(device, amp):
            model.eval()(patches(64))

    def step():
        model.train()
        with autocast(device, amp):
            logits = model(patches(16)).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {}
    for name, call, n in (("forward", forward, 64), ("train_step", step, 16)):
        call()  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            call()
        synchronize(device)
        result[f"model_{name}_per_s"] = batches * n / (time.perf_counter() - start)
    return result


def _table(rows: list[dict]) -> str:
    head = (
        "device  config  arch      patch  workers  inference/s  training/s  "
        "model fwd/s  model train/s  patches  cpu s/epoch"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['device']:<7} {r['config']:<7} {r['arch']:<9} {r['patch']:>5}  {r['workers']:>7}  "
            f"{r['inference_per_s']:11.1f}  {r['training_per_s']:10.1f}  "
            f"{r['model_forward_per_s']:11.1f}  {r['model_train_step_per_s']:13.1f}  "
            f"{r['inference_patches']:7d}  {r['main_cpu_s_per_epoch']:11.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: both)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--images", type=int, default=24, help="synthetic biopsies (>= 10)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="data workers")
    parser.add_argument("--epochs", type=int, default=1, help="measured epochs (after one)")
    parser.add_argument("--torch-threads", type=int, default=0, help="CPU threads (0: default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)

    import torch

    from repro.training.runtime import set_torch_threads

    set_torch_threads(args.torch_threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="mil-bench-") as folder:
        for name in args.configs:
            config = CONFIGS[name]
            for device in devices:
                for workers in args.workers:
                    params = _params(Path(folder) / name, config, args.images, device, workers)
                    row = {"device": device, "config": name, "arch": config["arch"]}
                    row.update(patch=config["patch"], workers=workers, images=args.images)
                    row.update(_phases(params, args.epochs))
                    row.update(_model_only(params))
                    rows.append(row)
                    print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(_table(rows))
    out = args.out or RESULTS / f"mil-{'-'.join(devices)}.json"
    meta = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    write_results(out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
