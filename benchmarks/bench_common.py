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
