"""What the benchmarks share: device-aware median timing, machine info, result records."""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

import torch


def median_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_CYCLES_PER_MS = None  # measured once, at the first device_ms


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of torch.cuda._sleep, measured once."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # load the kernel
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS = 10_000_000 / start.elapsed_time(end)
    return _CYCLES_PER_MS


def device_ms(fn, reps: int, host_ms: float, warmup: int = 2) -> float:
    """Median GPU time of ``fn`` with the host ahead of the GPU, as inside a training loop.

    A spin kernel longer than ``fn``'s host time is queued first, so every launch of
    ``fn`` is queued before the GPU reaches the start event: the events then time the
    GPU's work and its gaps between kernels, not the Python and launch costs (which
    ``median_ms`` from an idle GPU includes). A host sync inside ``fn`` shows up anyway.
    """
    cycles = int(_sleep_cycles_per_ms() * (2 * host_ms + 0.5))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn, reps: int = 5) -> float:
    """Median host time of enqueueing ``fn`` (no sync at the end): what ``device_ms`` must hide."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def kernel_ms(fn, device: torch.device, reps: int) -> float:
    """The GPU's own time on CUDA (``device_ms``), the host's wall time elsewhere: for
    bandwidth baselines such as one large copy, whose launch cost is no part of it."""
    if device.type == "cuda":
        return device_ms(fn, reps, host_ms(fn))
    return median_ms(fn, device, reps)


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["gpu"] = None
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = "unknown"
    return info


def record_meta(argv) -> dict:
    """The date and the exact command, for every record a benchmark writes."""
    return dict(date=datetime.date.today().isoformat(),
                command="python " + " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])))


def write_records(path: str, records: list) -> None:
    """Writes the records as JSON atomically: a killed run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {len(records)} records to {path}")
