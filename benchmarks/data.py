"""The paper-scale data path: prepare, augment and load one 16384 x 16384 biopsy; decode speed.

One synthetic biopsy at the paper's size is written first (not timed): level 0 at 0.48 um/px,
``--length`` px long (default 32768) and 3/8 of that wide, in PANDA's layout (tiled JPEG pages
at 1, 1/4, 1/16, see :func:`repro.data.slides.save_pyramid`), its texture a rendered synthetic
biopsy enlarged 8x plus pixel noise (so that JPEG tiles cost what real tissue costs). Then each
measurement runs in a fresh process (its peak RSS is its own):

- ``prepare``: :func:`repro.data.prepare.prepare_image` with the default data settings (read at
  0.96 um/px, tissue mask at 1/32, trim, pad to 16384 x 16384, write the prepared TIFF + mask);
- ``augment``: one item of :class:`repro.data.datasets.BiopsyDataset` with augmentation (the
  default :class:`repro.config.AugmentationSettings` pipeline), i.e. decode + augment into the
  uint8 ``(3, 16384, 16384)`` tensor a training step gets;
- ``load``: the same item without augmentation (decode into the tensor only);
- ``decode-pyvips`` / ``decode-openslide``: level 0 of the raw slide read through
  :meth:`repro.data.slides.Slide.read_region` in strips of 1024 rows, by each backend: MP/s.

Aims (issue 12): preparation <= 30 s and <= 4 GiB, augmentation <= 20 s and <= 4 GiB on two
cores. libvips uses ``--threads`` threads (``VIPS_CONCURRENCY``). The machine's load average is
recorded before and after each measurement, and each process's CPU seconds next to its wall
seconds, since a shared machine slows the wall clock and not the CPU time.

Example::

    nice -n 5 python benchmarks/data.py              # writes benchmarks/results/data.json
    python benchmarks/data.py --length 8192          # a quick, smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from _common import GIB, run_worker, serve_worker, write_results

RESULTS = Path(__file__).with_name("results")
MPP = 0.48
AIMS = {"prepare": (30.0, 4.0), "augment": (20.0, 4.0)}
PHASES = ("prepare", "augment", "load", "augment-parts", "decode-pyvips", "decode-openslide")


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: Linux carries the parent's peak into a child across fork and exec, so
    every child would report at least the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_raw_slide(path: Path, length: int, seed: int = 0) -> dict:
    """The raw biopsy: ``length`` x ``3/8 length`` px at 0.48 um/px, PANDA's page layout."""
    import numpy as np
    import pyvips

    from repro.data.slides import save_pyramid
    from repro.data.synthetic import render_biopsy

    rng = np.random.default_rng(seed)
    width, height = length // 8, (3 * length // 8) // 8
    small = render_biopsy(rng, width, height, primary=4, secondary=3)
    image = pyvips.Image.new_from_array(small, interpretation="srgb").resize(8, kernel="linear")
    noise = pyvips.Image.gaussnoise(image.width, image.height, sigma=6, mean=0)
    image = (image + noise).cast("uchar").copy(interpretation="srgb")
    level0 = path.with_suffix(".v")
    image.write_to_file(str(level0))  # materialised once, so the three pages do not redo it
    try:
        save_pyramid(pyvips.Image.new_from_file(str(level0)), path, MPP, layout="panda")
    finally:
        level0.unlink()
    return {"width": image.width, "height": image.height, "bytes": path.stat().st_size}


def _params(root: Path):
    from repro.config import build_params

    return build_params(
        {
            "experiment": "bench-data",
            "data": {
                "prepared_dir": str(root / "prepared"),
                "source": "synthetic",
                "synthetic_images": 10,
            },
            "run": {"out_dir": str(root / "runs")},
        }
    )


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import pyvips

    pyvips.concurrency_set(spec["threads"])
    root = Path(spec["root"])
    raw = root / "raw.tiff"
    phase = spec["phase"]
    start_cpu, start = _cpu_seconds(), time.perf_counter()
    row: dict = {"phase": phase}
    if phase == "raw":
        row |= write_raw_slide(raw, spec["length"])
    elif phase == "prepare":
        from repro.data.prepare import PrepareSettings, prepare_image, prepared_paths

        params = _params(root)
        paths = prepared_paths(params.data.prepared_dir, "biopsy")
        for key in ("image", "mask"):
            paths[key].parent.mkdir(parents=True, exist_ok=True)
        geometry = prepare_image(
            raw, paths["image"], paths["mask"], PrepareSettings.from_params(params)
        )
        row |= {
            k: geometry[k]
            for k in (
                "scaled_width",
                "scaled_height",
                "trim_width",
                "trim_height",
                "width",
                "height",
                "level",
            )
        }
    elif phase in ("augment", "load"):
        import pandas as pd

        from repro.data.datasets import BiopsyDataset

        params = _params(root)
        rows = pd.DataFrame({"image_id": ["biopsy"], "label": [1]})
        dataset = BiopsyDataset(
            rows, params.prepared, params.augmentation, seed=params.run.seed,
            augment=phase == "augment",
        )  # fmt: skip
        item = dataset[0]
        tensor = item["image"]
        row |= {"shape": list(tensor.shape), "dtype": str(tensor.dtype)}
    elif phase == "augment-parts":
        row |= augmentation_parts(_params(root))
    elif phase.startswith("decode-"):
        from repro.data.slides import open_slide

        slide = open_slide(raw, backend=phase.removeprefix("decode-"))
        width, height = slide.dimensions
        rows_per_read = 1024
        for top in range(0, height, rows_per_read):
            slide.read_region(0, top, width, min(rows_per_read, height - top))
        seconds = time.perf_counter() - start
        row |= {"megapixels": width * height / 1e6, "mp_per_s": width * height / 1e6 / seconds}
    else:
        raise ValueError(f"unknown phase {phase!r}")
    row["seconds"] = time.perf_counter() - start
    row["cpu_seconds"] = _cpu_seconds() - start_cpu
    row["peak_rss_gib"] = peak_rss_bytes() / GIB
    return row


def augmentation_parts(params) -> dict:
    """CPU and wall seconds of the default augmentation, built up step by step, each decoded
    into a uint8 array: decode only, + flips/quarter turns, + rotation and elastic field
    (``mapim``, bilinear), + colour in LCh (the whole pipeline)."""
    import pyvips

    from repro.data.augment import WHITE, Augmenter, adjust_colour, augmentation_rng, flip_rotate
    from repro.data.store import open_prepared

    augmenter = Augmenter(params.augmentation)
    parts = {}
    for stop in ("decode", "flip_rotate", "mapim", "colour"):
        start_cpu, start = _cpu_seconds(), time.perf_counter()
        rng = augmentation_rng(params.run.seed, 0, "biopsy")
        image = open_prepared(params.prepared, "biopsy")
        choice = augmenter.draw(rng)
        if stop != "decode":
            image = flip_rotate(
                image, choice.flip_horizontal, choice.flip_vertical, choice.quarter_turns
            )
        if stop in ("mapim", "colour"):
            index = augmenter.displacement_map(image.width, image.height, choice.angle, rng)
            image = image.mapim(
                index,
                interpolate=pyvips.Interpolate.new("bilinear"),
                extend="background",
                background=WHITE[: image.bands],
            ).cast("uchar")
        if stop == "colour":
            image = adjust_colour(image, choice.lightness, choice.chroma, choice.hue)
        image.numpy()
        parts[stop] = {
            "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu_seconds() - start_cpu,
        }
    return {"parts": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=32768, help="level-0 length in px")
    parser.add_argument("--threads", type=int, default=2, help="libvips threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "data.json")
    parser.add_argument("--root", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker, args.worker)
        return
    os.environ["VIPS_CONCURRENCY"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=args.root) as folder:
        root = Path(folder)
        common = {"root": str(root), "threads": args.threads, "length": args.length}
        raw = run_worker(__file__, {"phase": "raw", **common}, cwd=Path(__file__).parent)
        if "error" in raw:
            raise SystemExit(f"writing the raw slide failed: {raw['error']}")
        print(
            f"raw slide {raw['width']} x {raw['height']} at {MPP} um/px, "
            f"{raw['bytes'] / 2**20:.0f} MiB, written in {raw['seconds']:.0f} s"
        )
        rows = []
        for phase in PHASES:
            load_before = os.getloadavg()
            spec = {"phase": phase, **common}
            row = run_worker(__file__, spec, cwd=Path(__file__).parent)
            row["loadavg_before"] = [round(v, 2) for v in load_before]
            row["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'phase':18} {'seconds':>8} {'cpu s':>8} {'peak GiB':>9} {'MP/s':>7} {'aim':>14} load")
    for row in rows:
        aim = AIMS.get(row["phase"])
        if "error" in row:
            print(f"{row['phase']:18} error: {row['error']}")
            continue
        verdict = ""
        if aim:
            ok = row["seconds"] <= aim[0] and row["peak_rss_gib"] <= aim[1]
            verdict = f"{aim[0]:.0f}s/{aim[1]:.0f}GiB " + ("ok" if ok else "MISS")
        rate = f"{row['mp_per_s']:.1f}" if "mp_per_s" in row else ""
        print(
            f"{row['phase']:18} {row['seconds']:8.1f} {row['cpu_seconds']:8.1f} "
            f"{row['peak_rss_gib']:9.2f} {rate:>7} {verdict:>14} {row['loadavg_before'][0]:.1f}"
        )
    write_results(
        args.out,
        {
            "benchmark": "data",
            "raw_slide": {k: raw[k] for k in ("width", "height", "bytes", "seconds")}
            | {"mpp": MPP, "layout": "panda (1, 1/4, 1/16)"},
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "aims": {k: {"seconds": s, "peak_rss_gib": g} for k, (s, g) in AIMS.items()},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
