"""Benchmark plumbing shared by the GPU benchmarks: deadlines, JSON rows written as they come, logging, the
environment record and a CUDA timing helper. No measurement lives here.

Run benchmarks from the repository root as modules (`python -m bench.h200 ...`); nothing here edits sys.path.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

RANDOM_WEIGHTS_NOTE = ("random weights of the published shapes: speed and memory hold for the real model; images are "
                       "noise, and error figures measure FP8 arithmetic on this network, not image quality")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Deadline:
    """Seconds left of a run's budget; stages ask `allows(estimate)` before they start."""

    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, needed: float, reserve: float = 0.0) -> bool:
        return self.left() >= needed + reserve


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


class Rows:
    """A JSON file of result rows, rewritten after every row so that a killed run keeps what it measured."""

    def __init__(self, path: Path, common: dict | None = None):
        self.path, self.common, self.rows = path, dict(common or {}), []

    def add(self, row: dict) -> dict:
        row = {**row, **{k: v for k, v in self.common.items() if k not in row}}
        self.rows.append(row)
        write_json(self.path, self.rows)
        return row


class Stages:
    """Runs named stages in order under a deadline; a stage that fails or does not fit is recorded, not fatal."""

    def __init__(self, deadline: Deadline, record):
        self.deadline, self.record = deadline, record
        self.done: dict[str, str] = {}

    @contextmanager
    def stage(self, name: str, estimate_s: float, reserve_s: float = 0.0):
        """`with stages.stage(...) as ok:` — the body runs only if `ok`; errors are logged and recorded."""
        if not self.deadline.allows(estimate_s, reserve_s):
            log(f"{name}: skipped ({self.deadline.left():.0f} s left, needs ~{estimate_s:.0f} s)")
            self.done[name] = "skipped: device-time budget"
            self.record(name, {"skipped": f"device-time budget ({self.deadline.left():.0f} s left, needed ~{estimate_s:.0f} s)"})
            yield False
            return
        log(f"{name}: start ({self.deadline.left():.0f} s left)")
        started = time.monotonic()
        try:
            yield True
            self.done[name] = f"ok in {time.monotonic() - started:.0f} s"
            log(f"{name}: done in {time.monotonic() - started:.1f} s")
        except Exception as error:  # noqa: BLE001 - record and go on with the next stage
            log(f"{name}: FAILED {type(error).__name__}: {error}")
            traceback.print_exc()
            self.done[name] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            self.record(name, {"error": f"{type(error).__name__}: {str(error)[:2000]}",
                               "traceback": traceback.format_exc()[-3000:]})


def gb(value) -> float | None:
    return None if value is None else round(value / 1e9, 3)


def rounded(value, digits: int = 3):
    return None if value is None else round(value, digits)


def pinned_upload_rate(torch, device, size: int = 2**30) -> float:
    """GB/s of one copy from pinned CPU memory to `device` (what the 16 GB placement's T5 streaming rides on)."""
    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    target = torch.empty(size, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return round(size / (time.perf_counter() - started) / 1e9, 1)


def environment(torch, device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for package in ("diffusers", "transformers", "optimum-quanto", "torchao", "nvidia-cudnn-frontend", "triton",
                    "spaces"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    sm_count=props.multi_processor_count, gpu_memory_gb=gb(props.total_memory),
                    cudnn=torch.backends.cudnn.version(), pinned_upload_gb_per_s=pinned_upload_rate(torch, device))
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            info["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
        except Exception as error:  # noqa: BLE001 - report, don't fail
            info["driver"] = f"unknown ({error})"
    else:
        info["gpu"] = None
    info["cpu"] = cpu_model()
    return info


def cpu_model() -> str:
    """The host CPU's model name and thread count (launch-bound steps depend on it)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} threads"


def cuda_median_ms(torch, fn, iters: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `iters` runs, timed with CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_graph_ms(torch, fn, repeat: int = 20) -> float | None:
    """GPU milliseconds of one `fn()`: `repeat` calls captured in one CUDA graph and replayed, so a short kernel's
    Python launch cost (which `cuda_median_ms` includes) is not timed. None if `fn` cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeat):
                fn()
        return cuda_median_ms(torch, graph.replay, iters=10, warmup=1) / repeat
    except Exception:  # noqa: BLE001 - a benchmark figure, not a failure of the run
        return None


def print_table(rows: list[dict], columns: tuple[str, ...]) -> None:
    print(" | ".join(columns))
    for row in rows:
        if "skipped" in row or "error" in row:
            print(f"{row.get('model')}/{row.get('config')} | {str(row.get('skipped') or row.get('error'))[:120]}")
            continue
        print(" | ".join(str(row.get(c, "-")) for c in columns))
    sys.stdout.flush()
