"""Streaming vs. conventional train step of a ResNet (issue 3, acceptance 2 and 3).

A train step is forward, BCE loss, backward, with every parameter trainable and (by default) the
gradient with respect to the input requested, as SmoothGrad needs it. Every measurement runs in a
fresh subprocess (``--worker``), so each peak memory is that configuration's own: on CUDA the
synchronised time and ``torch.cuda.max_memory_allocated``; on CPU the wall time and the peak RSS.
The process CPU time is recorded too (on a shared CPU it varies less than the wall time, but it
counts the threads' spin-waiting). The ratio is streaming / conventional wall time, same run; with
``--repeats N`` each is the median of N steps (on CPU the first touch of fresh memory, i.e. page
faults, varies a lot between runs).

Example::

    python benchmarks/streaming.py --sizes 4096 8192 --tile-sizes 1024 2048 2800
"""

from __future__ import annotations

import argparse
import statistics
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


def _worker(spec: dict) -> dict:
    """One measurement in this process; returns the result row."""
    import torch

    from repro.nn.resnet import build_streaming_resnet
    from repro.nn.streaming import estimate_peak_bytes

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    model = build_streaming_resnet(spec["arch"], tile_size=spec["tile"] or 2800).to(device)
    memory_format = (
        torch.channels_last if cuda and spec["channels_last"] else torch.contiguous_format
    )
    model = model.to(memory_format=memory_format)
    streaming = spec["mode"] == "streaming"
    forward = model if streaming else lambda x: model.head(model.streamed.module(x))
    target = torch.ones(1, 1, device=device)

    def step(size: int) -> None:
        x = torch.rand(1, 3, size, size, device=device).to(memory_format=memory_format)
        x.requires_grad_(spec["input_grad"])
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda and spec["amp"]):
            logits = forward(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(spec["size"] if cuda else min(spec["size"], 1024))  # warm-up: kernels, allocator
    start_measuring(device)
    walls, cpus = [], []
    for _ in range(spec["repeats"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(spec["size"])
        synchronize(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    row = dict(spec, seconds=statistics.median(walls), cpu_seconds=statistics.median(cpus))
    row.update(all_seconds=walls, all_cpu_seconds=cpus, peak_bytes=peak_bytes(device))
    if streaming:
        shape = (1, 3, spec["size"], spec["size"])
        plan = model.streamed.plan(shape)
        row.update(tiles=len(plan.tiles), coverage=plan.coverage)
        row["predicted_bytes"] = estimate_peak_bytes(
            model.streamed, shape, spec["tile"], input_grad=spec["input_grad"]
        )
    return row


def _table(rows: list[dict]) -> str:
    head = "size   mode          tile  tiles  coverage  seconds  cpu s  peak GiB  pred GiB  ratio"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['size']:<6} {r['mode']:<12} {r['tile'] or '-':>5}  failed: {r['error']}"
            )
            continue
        tiles = f"{r['tiles']:>5}" if "tiles" in r else "    -"
        coverage = f"{r['coverage']:8.3f}" if "coverage" in r else "       -"
        pred = f"{r['predicted_bytes'] / GIB:8.2f}" if "predicted_bytes" in r else "       -"
        ratio = f"{r['ratio']:5.2f}" if "ratio" in r else "    -"
        lines.append(
            f"{r['size']:<6} {r['mode']:<12} {r['tile'] or '-':>5}  {tiles}  {coverage}  "
            f"{r['seconds']:7.1f}  {r['cpu_seconds']:5.0f}  {r['peak_bytes'] / GIB:8.2f}  "
            f"{pred}  {ratio}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--include-16384", action="store_true", help="also run 16384 x 16384")
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[1024, 2048, 2800])
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
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(_worker, args.worker)
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
    )
    rows = []
    for size in sizes:
        conventional = None
        if size <= args.conventional_max:
            conventional = run_worker(
                __file__, dict(common, size=size, mode="conventional", tile=None)
            )
            rows.append(conventional)
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
        for tile in args.tile_sizes:
            row = run_worker(__file__, dict(common, size=size, mode="streaming", tile=tile))
            if conventional and "error" not in conventional and "error" not in row:
                row["ratio"] = row["seconds"] / conventional["seconds"]
            rows.append(row)
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    out = args.out or Path(__file__).parent / "results" / f"streaming_{device}.json"
    meta = dict(device=device, device_name=device_name(device), torch=torch.__version__)
    write_results(out, dict(meta, args=vars(args), results=rows))


if __name__ == "__main__":
    main()
