"""Streaming vs. conventional train step of a ResNet, plain vs. content-aware (issues 3, 14).

A train step is forward, BCE loss, backward, with every parameter trainable. Two input layouts:
``dense`` (uniform noise in [0, 1], float, input gradient requested by default, as SmoothGrad
needs it) and ``biopsy`` (a prepared synthetic biopsy: the tissue box of
:func:`repro.data.synthetic.render_biopsy`, drawn at half the image's width and a quarter of
its height, centred on white padding; uint8, as in training, so no input gradient). Each
streaming configuration runs plain (``content_aware=False``) and content-aware, in the same
run, and reports the tiles computed/reused in the forward pass and backpropagated/skipped in
the backward pass.

Every measurement runs in a fresh subprocess (``--worker``), so each peak memory is that
configuration's own: on CUDA the synchronised time and ``torch.cuda.max_memory_allocated``
minus what was allocated before the step; on CPU the wall time and the peak RSS minus the RSS
before the step (the peak is reset through ``/proc/self/clear_refs``). That step memory is
printed next to the planner's prediction (:func:`repro.nn.streaming.estimate_peak_bytes`, whole
step with the head, minus the weights and the input, which are resident before the step).
The process CPU time and the load average are recorded too: on a shared CPU wall time depends
on the other load, so compare within one run. On CPU the RSS also holds memory that glibc keeps
after tensors are freed: tensors below its mmap threshold (which adapts up to 32 MiB) come from
the heap, which it rarely returns, so at small tiles the RSS exceeds the live tensors. Run with
``MALLOC_MMAP_THRESHOLD_=1048576`` (a fixed threshold; recorded in each row) to measure what the
planner predicts, the live tensors, as CUDA's ``max_memory_allocated`` does. With
``--repeats N`` each time is the median of N steps.

Example::

    python benchmarks/streaming.py --layouts biopsy dense --sizes 4096 8192 --tile-sizes 2800
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    GIB,
    device_name,
    load_average,
    peak_bytes,
    reset_peak_rss,
    rss_bytes,
    run_worker,
    serve_worker,
    start_measuring,
    synchronize,
    write_results,
)


def biopsy_image(size: int, seed: int = 0):
    """A prepared synthetic biopsy, uint8 (size, size, 3), cached under the temp folder: tissue
    of ``render_biopsy`` (size/2 x size/4, trimmed to its tissue box) centred on white."""
    import numpy as np

    from repro.data.synthetic import render_biopsy

    path = Path(tempfile.gettempdir()) / "repro-bench" / f"biopsy_{size}_{seed}.npy"
    if path.is_file():
        return np.load(path)
    rng = np.random.default_rng(seed)
    pixels, tissue, _ = render_biopsy(rng, size // 2, size // 4, 4, 3, return_masks=True)
    rows, cols = np.flatnonzero(tissue.any(1)), np.flatnonzero(tissue.any(0))
    box = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    image = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - box.shape[0]) // 2, (size - box.shape[1]) // 2
    image[top : top + box.shape[0], left : left + box.shape[1]] = box
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{time.time_ns()}.npy")
    np.save(partial, image)
    partial.replace(path)
    return image


def _input(spec: dict, device):
    import torch

    size = spec["size"]
    if spec["layout"] == "biopsy":
        image = torch.from_numpy(biopsy_image(size, spec["seed"]))
        return image.permute(2, 0, 1).unsqueeze(0).contiguous().to(device)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(spec["seed"]))
    return x.to(device).requires_grad_(spec["input_grad"])


def _worker(spec: dict) -> dict:
    """One measurement in this process; returns the result row."""
    import torch

    from repro.nn.resnet import build_streaming_resnet

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    model = build_streaming_resnet(spec["arch"], tile_size=spec["tile"] or 2800).to(device)
    memory_format = (
        torch.channels_last if cuda and spec["channels_last"] else torch.contiguous_format
    )
    model = model.to(memory_format=memory_format)
    streaming = spec["mode"] == "streaming"
    model.streamed.content_aware = bool(spec["content_aware"])

    def conventional(x):
        if not x.is_floating_point():
            x = x.float().div(255)
        return model.head(model.streamed.module(x))

    forward = model if streaming else conventional
    target = torch.ones(1, 1, device=device)
    x = _input(spec, device).to(memory_format=memory_format)
    spec = dict(spec, input_grad=x.requires_grad)

    def step(x) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda and spec["amp"]):
            logits = forward(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    warm = x if cuda else x[..., :1024, :1024]  # warm-up: kernels, allocator
    step(warm.detach().requires_grad_(x.requires_grad))
    gc.collect()
    start_measuring(device)
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    peak_reset = cuda or reset_peak_rss()
    load_before = load_average()
    walls, cpus = [], []
    for _ in range(spec["repeats"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(x)
        synchronize(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    peak = peak_bytes(device)
    row = dict(spec, seconds=statistics.median(walls), cpu_seconds=statistics.median(cpus))
    row.update(all_seconds=walls, all_cpu_seconds=cpus, peak_bytes=peak)
    row.update(before_step_bytes=before, load_before=load_before, load_after=load_average())
    row["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if peak_reset:
        row["step_bytes"] = peak - before
    if spec["layout"] == "biopsy":
        row["white_fraction"] = float((x == 255).all(1).float().mean())
    if streaming:
        shape = tuple(x.shape)
        plan = model.streamed.plan(shape)
        row.update(tiles=len(plan.tiles), coverage=plan.coverage)
        row["stats"] = dataclasses.asdict(model.streamed.last_stats)
        row.update(_prediction(row, model))
    return row


def _prediction(row: dict, model=None) -> dict:
    """The planner's whole-step prediction for a streaming row, and that minus the weights and
    the input (resident before the step, so not in the measured step memory)."""
    import torch

    from repro.nn.resnet import build_streaming_resnet
    from repro.nn.streaming import estimate_peak_bytes

    if model is None:
        model = build_streaming_resnet(row["arch"], tile_size=row["tile"])
    shape = (1, 3, row["size"], row["size"])
    dtype = torch.uint8 if row["layout"] == "biopsy" else torch.float32
    predicted = estimate_peak_bytes(
        model.streamed, shape, row["tile"], input_dtype=dtype, input_grad=row["input_grad"]
    )
    resident = math.prod(shape) * dtype.itemsize
    resident += sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(predicted_bytes=predicted, predicted_step_bytes=predicted - resident)


def repredict(path: Path) -> None:
    """Recompute the predictions of the streaming rows of a results file with the current
    planner (a prediction is computed, not measured, so it may be redone after the run)."""
    import json

    results = json.loads(path.read_text())
    for row in results["results"]:
        if row.get("mode") == "streaming" and "error" not in row:
            row.update(_prediction(row))
    write_results(path, results)
    print(_table(results["results"]))


def _table(rows: list[dict]) -> str:
    head = (
        "size   layout mode          tile tiles comp reuse  bwd skip  seconds  cpu s  "
        "step GiB  pred GiB  peak GiB  ratio"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mode = (
            r["mode"]
            if r["mode"] == "conventional"
            else ("aware" if r["content_aware"] else "plain")
        )
        start = f"{r['size']:<6} {r['layout']:<6} {mode:<12} {r['tile'] or '-':>5}"
        if "error" in r:
            lines.append(f"{start}  failed: {r['error']}")
            continue
        stats = r.get("stats")
        counts = (
            f"{r['tiles']:>5} {stats['computed']:>4} {stats['reused']:>5} "
            f"{stats['backpropagated']:>4} {stats['skipped']:>4}"
            if stats
            else f"{'-':>5} {'-':>4} {'-':>5} {'-':>4} {'-':>4}"
        )
        step = f"{r['step_bytes'] / GIB:8.2f}" if "step_bytes" in r else "       -"
        pred = f"{r['predicted_step_bytes'] / GIB:8.2f}" if "predicted_bytes" in r else "       -"
        ratio = f"{r['ratio']:5.2f}" if "ratio" in r else "    -"
        lines.append(
            f"{start} {counts}  {r['seconds']:7.1f}  {r['cpu_seconds']:5.0f}  {step}  {pred}  "
            f"{r['peak_bytes'] / GIB:8.2f}  {ratio}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--include-16384", action="store_true", help="also run 16384 x 16384")
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[1024, 2048, 2800])
    parser.add_argument("--layouts", nargs="+", choices=["dense", "biopsy"], default=["dense"])
    parser.add_argument(
        "--streaming",
        nargs="+",
        choices=["plain", "aware"],
        default=["plain", "aware"],
        help="streaming paths to run: plain (content_aware=False) and/or content-aware",
    )
    parser.add_argument(
        "--conventional-max",
        type=int,
        default=4096,
        help="run the conventional step only up to this size (default 4096: 8192 needs ~45 GiB)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--no-input-grad", dest="input_grad", action="store_false")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last (CUDA only)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="measured steps per configuration; median reported"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the input image")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (written after each row)")
    parser.add_argument(
        "--repredict", type=Path, help="only recompute the predictions in this results file"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(_worker, args.worker)
        return
    if args.repredict:
        repredict(args.repredict)
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = sorted(set(args.sizes) | ({16384} if args.include_16384 else set()))
    common = dict(
        device=device,
        arch=args.arch,
        input_grad=args.input_grad,
        amp=args.amp,
        channels_last=args.channels_last,
        repeats=args.repeats,
        seed=args.seed,
    )
    out = args.out or Path(__file__).parent / "results" / f"streaming_{device}.json"
    meta = dict(device=device, device_name=device_name(device), torch=torch.__version__)
    meta.update(args=vars(args), load_at_start=load_average())
    rows: list[dict] = []

    def record(row: dict) -> dict:
        rows.append(row)
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
        write_results(out, dict(meta, results=rows), quiet=True)
        return row

    for layout in args.layouts:
        for size in sizes:
            base = dict(common, layout=layout, size=size)
            conventional = None
            if size <= args.conventional_max:
                spec = dict(base, mode="conventional", tile=None, content_aware=False)
                conventional = record(run_worker(__file__, spec))
            for tile in args.tile_sizes:
                plain = None
                for path in args.streaming:
                    spec = dict(base, mode="streaming", tile=tile, content_aware=path == "aware")
                    row = run_worker(__file__, spec)
                    ok = "error" not in row
                    if path == "plain" and ok:
                        plain = row
                    if ok and path == "aware" and plain:
                        row["ratio"] = row["seconds"] / plain["seconds"]
                    elif ok and conventional and "error" not in conventional:
                        row["ratio"] = row["seconds"] / conventional["seconds"]
                    record(row)
    print(_table(rows))
    write_results(out, dict(meta, results=rows, load_at_end=load_average()))


if __name__ == "__main__":
    main()
