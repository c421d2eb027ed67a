"""GPU statistics from NVML: live snapshots for a dashboard, and energy/temperature over one generation.

`GpuSampler` is safe to create anywhere: with no NVIDIA GPU (or no driver, or no `pynvml`) it reports
`available = False` with a `reason`, `snapshot()` says so, and `start()`/`stop()` cost nothing. Readings
come back as `GpuSnapshot` and `GpuInterval` dataclasses (`.as_dict()` for JSON). The NVML module is
injectable (`GpuSampler(nvml=fake)`) so that tests run without a GPU.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# NVML clock-event ("throttle") reason bits, as in nvml.h.
_SW_POWER_CAP = 0x04
_HW_SLOWDOWN = 0x08
_SW_THERMAL = 0x20
_HW_THERMAL = 0x40
_HW_POWER_BRAKE = 0x80
THERMAL_REASONS = _SW_THERMAL | _HW_THERMAL
POWER_REASONS = _SW_POWER_CAP | _HW_POWER_BRAKE
_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
_CLOCK_SM = 1  # NVML_CLOCK_SM


@dataclass(frozen=True)
class GpuSnapshot:
    """One reading of the GPU; every figure is None where this GPU does not report it."""

    available: bool
    reason: str = ""  # why not available
    name: str | None = None
    time: float = 0.0  # the sampler's clock, seconds
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    sm_clock_mhz: float | None = None
    throttle_thermal: bool | None = None
    throttle_power: bool | None = None
    throttle_hw_slowdown: bool | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GpuInterval:
    """What the GPU did between `start()` and `stop()`: energy, power, temperatures."""

    available: bool
    reason: str = ""
    name: str | None = None
    seconds: float = 0.0
    samples: int = 0
    energy_j: float | None = None
    energy_source: str | None = None  # "counter" (NVML's energy counter) or "integrated" (from power samples)
    avg_power_w: float | None = None
    peak_temperature_c: float | None = None
    mean_temperature_c: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _load_pynvml():
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py not installed
        return None
    return pynvml


class GpuSampler:
    """Reads one NVIDIA GPU through NVML.

    * `snapshot()` -> `GpuSnapshot`: the current temperature, power (and its limit), utilisation, memory, SM clock
      and thermal/power throttling; every snapshot also feeds a rolling `history()` (one point per
      `history_interval` seconds, `history_seconds` long) for live plots.
    * `start()` ... `stop()` -> `GpuInterval`, the interval in between: energy (from NVML's total-energy counter,
      or integrated power where the GPU lacks that counter), average power, peak and mean temperature,
      sampled by a background thread at `rate_hz`.
    """

    def __init__(self, index: int = 0, *, nvml: Any = None, rate_hz: float = 10.0,
                 history_seconds: float = 300.0, history_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.index = index
        self.rate_hz = rate_hz
        self.history_interval = history_interval
        self._clock = clock
        self._nvml = nvml if nvml is not None else _load_pynvml()
        self._handle = None
        self._lock = threading.Lock()
        self._history: deque[GpuSnapshot] = deque(maxlen=max(1, int(history_seconds / history_interval) + 1))
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._samples: list[GpuSnapshot] = []
        self._started_at = 0.0
        self._energy_start_mj: int | None = None
        self.available = False
        self.name: str | None = None
        self.reason = ""
        if self._nvml is None:
            self.reason = "no GPU: the NVML bindings (nvidia-ml-py) are not installed"
            return
        try:
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            name = self._nvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.available = True
        except self._nvml.NVMLError as error:
            self.reason = f"no GPU: NVML says {error}"

    # ------------------------------------------------------------------------------------ live readings

    def _read(self, function: str, *args, scale: float = 1.0):
        """One NVML reading, or None where this GPU does not support it."""
        fn = getattr(self._nvml, function, None)
        if fn is None:
            return None
        try:
            value = fn(self._handle, *args)
        except self._nvml.NVMLError:
            return None
        return value * scale if scale != 1.0 else value

    def snapshot(self) -> GpuSnapshot:
        """The GPU's state now (`available=False` with a `reason` without a GPU)."""
        if not self.available:
            return GpuSnapshot(False, self.reason)
        reasons = self._read("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None:
            reasons = self._read("nvmlDeviceGetCurrentClocksThrottleReasons")
        utilization = self._read("nvmlDeviceGetUtilizationRates")
        memory = self._read("nvmlDeviceGetMemoryInfo")
        snap = GpuSnapshot(
            available=True,
            name=self.name,
            time=self._clock(),
            temperature_c=self._read("nvmlDeviceGetTemperature", _TEMPERATURE_GPU),
            power_w=self._read("nvmlDeviceGetPowerUsage", scale=1e-3),
            power_limit_w=self._read("nvmlDeviceGetEnforcedPowerLimit", scale=1e-3),
            utilization_pct=None if utilization is None else utilization.gpu,
            memory_used_bytes=None if memory is None else memory.used,
            memory_total_bytes=None if memory is None else memory.total,
            sm_clock_mhz=self._read("nvmlDeviceGetClockInfo", _CLOCK_SM),
            throttle_thermal=None if reasons is None else bool(reasons & THERMAL_REASONS),
            throttle_power=None if reasons is None else bool(reasons & POWER_REASONS),
            throttle_hw_slowdown=None if reasons is None else bool(reasons & _HW_SLOWDOWN),
        )
        with self._lock:
            if not self._history or snap.time - self._history[-1].time >= self.history_interval * 0.9:
                self._history.append(snap)
        return snap

    def history(self) -> list[GpuSnapshot]:
        """Snapshots of the last `history_seconds`, oldest first."""
        with self._lock:
            return list(self._history)

    # ------------------------------------------------------------------------------- one generation

    def _energy_mj(self) -> int | None:
        return self._read("nvmlDeviceGetTotalEnergyConsumption")

    def _sample(self) -> None:
        snap = self.snapshot()
        with self._lock:
            self._samples.append(snap)

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        while not self._stop_event.wait(period):
            self._sample()

    def start(self) -> None:
        """Begin measuring (restarts a measurement already running). No-op without a GPU."""
        if not self.available:
            return
        if self._thread is not None:
            self._halt()
        with self._lock:
            self._samples = []
        self._energy_start_mj = self._energy_mj()
        self._started_at = self._clock()
        self._sample()
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join()
        self._thread = None

    def stop(self) -> GpuInterval:
        """End the measurement begun by `start()` and summarise it (`available=False` without a GPU)."""
        if not self.available:
            return GpuInterval(False, self.reason)
        if self._thread is None:
            raise RuntimeError("GpuSampler.stop() called without start()")
        self._halt()
        self._sample()
        seconds = self._clock() - self._started_at
        energy_end_mj = self._energy_mj()
        with self._lock:
            samples = list(self._samples)
        temperatures = [s.temperature_c for s in samples if s.temperature_c is not None]
        if self._energy_start_mj is not None and energy_end_mj is not None:
            energy_j, source = (energy_end_mj - self._energy_start_mj) / 1000.0, "counter"
        else:
            mean_power = _mean_power(samples)
            energy_j = None if mean_power is None else mean_power * seconds
            source = "integrated"
        return GpuInterval(
            available=True,
            name=self.name,
            seconds=seconds,
            samples=len(samples),
            energy_j=energy_j,
            energy_source=source if energy_j is not None else None,
            avg_power_w=energy_j / seconds if energy_j is not None and seconds > 0 else None,
            peak_temperature_c=max(temperatures) if temperatures else None,
            mean_temperature_c=sum(temperatures) / len(temperatures) if temperatures else None,
        )

    def close(self) -> None:
        """Stop any measurement and release NVML."""
        if self._thread is not None:
            self._halt()
        if self.available:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self.available = False
            self.reason = "no GPU: the sampler was closed"


def _mean_power(samples: list[GpuSnapshot]) -> float | None:
    """Time-weighted mean power (trapezoid rule) of power samples, for GPUs without an energy counter."""
    points = [(s.time, s.power_w) for s in samples if s.power_w is not None]
    if not points:
        return None
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return sum(p for _, p in points) / len(points)
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:])) / span
