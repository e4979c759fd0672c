"""What the benchmarks share: one measurement per fresh subprocess, its time and peak memory.

A benchmark script calls :func:`run_worker` with a spec; the subprocess (the same script with
``--worker <spec>``) measures and answers through :func:`serve_worker`, so each peak memory is
that configuration's own: on CUDA ``torch.cuda.max_memory_allocated`` since
:func:`start_measuring`, on CPU the process's peak RSS.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 2**30


def run_worker(script: str, spec: dict, cwd: Path | None = None) -> dict:
    """``python <script> --worker <spec as JSON>`` in a fresh process; its last line of output
    (JSON) is the result row, or ``spec`` with ``error`` (its last line of stderr) if it failed."""
    command = [sys.executable, script, "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return dict(spec, error=reason[0])
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_worker(worker: Callable[[dict], dict], spec: str) -> None:
    """In the subprocess: run ``worker`` on the JSON ``spec`` and print its row as JSON."""
    print(json.dumps(worker(json.loads(spec))))


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (CUDA only), so that a timer sees all of it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def start_measuring(device: Any) -> None:
    """Synchronise and restart the count of peak device memory (CUDA only)."""
    import torch

    synchronize(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: Any) -> int:
    """Peak device memory since :func:`start_measuring` on CUDA; on CPU the peak RSS."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` (which :func:`reset_peak_rss` resets),
    else ``ru_maxrss`` (Linux reports it in KiB)."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident memory now (``VmRSS``; 0 where /proc is missing)."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the peak resident memory to the current one (Linux: ``/proc/self/clear_refs``), so
    that :func:`peak_rss_bytes` measures from here; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(key: str) -> int:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where unknown): how quiet it was."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def device_name(device: Any) -> str:
    """The GPU's name, or the CPU's."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def write_results(out: Path, results: dict, quiet: bool = False) -> None:
    """``results`` as indented JSON at ``out`` (folders created, written atomically); says where
    unless ``quiet``."""
    from repro.atomic import write_text_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(results, indent=2, default=str) + "\n")
    if not quiet:
        print(f"wrote {out}")
