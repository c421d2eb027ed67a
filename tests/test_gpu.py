"""GpuSampler against a fake NVML (figures computed right) and against the real NVML of this machine."""

from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace

import pytest

from sd35fp8.gpu import GpuInterval, GpuSampler, GpuSnapshot


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """Enough of pynvml for GpuSampler: a GPU whose temperature rises on every reading."""

    NVMLError = FakeNVMLError

    def __init__(self, energy_counter: bool = True, fail_init: bool = False, reasons: int = 0x20 | 0x04):
        self.energy_counter = energy_counter
        self.fail_init = fail_init
        self.reasons = reasons
        self.temperatures_returned: list[int] = []
        self._temperatures = itertools.cycle([60, 62, 65, 71, 68])
        self._energy = iter([1_000_000, 1_012_500])  # mJ: 12.5 J between start and stop
        self.lock = threading.Lock()
        self.shutdown_called = False

    def nvmlInit(self):
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shutdown_called = True

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return b"Fake H100"

    def nvmlDeviceGetTemperature(self, handle, sensor):
        with self.lock:
            value = next(self._temperatures)
            self.temperatures_returned.append(value)
        return value

    def nvmlDeviceGetPowerUsage(self, handle):
        return 350_000  # mW

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=30 * 2**30, total=80 * 2**30, free=50 * 2**30)

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self.reasons

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.energy_counter:
            raise FakeNVMLError("Not Supported")
        return next(self._energy)


def test_snapshot_reads_every_figure():
    sampler = GpuSampler(nvml=FakeNVML())
    assert sampler.available and sampler.name == "Fake H100"
    snap = sampler.snapshot()
    assert snap.temperature_c == 60
    assert snap.power_w == pytest.approx(350.0)
    assert snap.power_limit_w == pytest.approx(700.0)
    assert snap.utilization_pct == 97
    assert snap.memory_used_bytes == 30 * 2**30 and snap.memory_total_bytes == 80 * 2**30
    assert snap.sm_clock_mhz == 1980
    assert snap.throttle_thermal is True and snap.throttle_power is True


def test_throttle_flags_follow_reason_bits():
    assert GpuSampler(nvml=FakeNVML(reasons=0)).snapshot().throttle_thermal is False
    snap = GpuSampler(nvml=FakeNVML(reasons=0x40)).snapshot()  # HW thermal slowdown only
    assert snap.throttle_thermal is True and snap.throttle_power is False


def test_start_stop_energy_from_counter_and_temperatures():
    fake = FakeNVML()
    sampler = GpuSampler(nvml=fake, rate_hz=100.0)
    sampler.start()
    threading.Event().wait(0.1)
    summary = sampler.stop()
    returned = fake.temperatures_returned
    assert summary.samples == len(returned) >= 3  # start + background + stop
    assert summary.energy_j == pytest.approx(12.5)
    assert summary.energy_source == "counter"
    assert summary.avg_power_w == pytest.approx(12.5 / summary.seconds)
    assert summary.peak_temperature_c == max(returned)
    assert summary.mean_temperature_c == pytest.approx(sum(returned) / len(returned))
    assert 0.05 < summary.seconds < 5


def test_energy_integrated_from_power_without_counter():
    ticks = itertools.count(start=0.0, step=0.5)  # every clock read advances 0.5 s
    sampler = GpuSampler(nvml=FakeNVML(energy_counter=False), rate_hz=1.0, clock=lambda: next(ticks))
    sampler.start()
    summary = sampler.stop()
    assert summary.energy_source == "integrated"
    # Two samples (start, stop) at a constant 350 W over 1.5 s of (fake) clock: 525 J.
    assert summary.samples == 2
    assert summary.seconds == pytest.approx(1.5)
    assert summary.avg_power_w == pytest.approx(350.0)
    assert summary.energy_j == pytest.approx(350.0 * 1.5)


def test_history_is_rolling_and_rate_limited():
    now = [0.0]
    sampler = GpuSampler(nvml=FakeNVML(), history_seconds=10, history_interval=1.0, clock=lambda: now[0])
    for step in range(40):
        now[0] = step * 0.5
        sampler.snapshot()
    history = sampler.history()
    assert len(history) == 11  # 10 s of 1 s points, plus the newest
    assert [h.time for h in history] == [float(t) for t in range(9, 20)]


def test_nvml_error_means_no_gpu():
    sampler = GpuSampler(nvml=FakeNVML(fail_init=True))
    assert not sampler.available
    assert "no GPU" in sampler.reason and "Driver Not Loaded" in sampler.reason
    assert sampler.snapshot() == GpuSnapshot(False, sampler.reason)
    sampler.start()
    assert sampler.stop().available is False


def test_close_releases_nvml():
    fake = FakeNVML()
    sampler = GpuSampler(nvml=fake)
    sampler.close()
    assert fake.shutdown_called and not sampler.available


def test_real_nvml_without_gpu():
    """On this CPU-only machine the real pynvml raises NVMLError_LibraryNotFound: no GPU, nothing breaks."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA GPU")
    except pynvml.NVMLError:
        pass
    sampler = GpuSampler()
    assert not sampler.available
    assert sampler.reason.startswith("no GPU")
    assert sampler.snapshot().available is False
    sampler.start()
    assert sampler.stop() == GpuInterval(False, sampler.reason)
    assert sampler.history() == []
