"""The live GPU panel: a status table and four rolling plots, fed by `GpuSampler` (NVML)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from sd35fp8.gpu import GpuSampler, GpuSnapshot
from sd35fp8.settings import GIB

NO_GPU = "no GPU"
# (field of GpuSnapshot, plot title, scale)
PLOTS = (("temperature_c", "Temperature (°C)", 1.0), ("power_w", "Power (W)", 1.0),
         ("utilization_pct", "Utilisation (%)", 1.0), ("memory_used_bytes", "Memory used (GiB)", 1 / GIB))


def status_markdown(snap: GpuSnapshot) -> str:
    """The GPU's state as a one-row table (or why there is no GPU)."""
    if not snap.available:
        return (f"### No NVIDIA GPU\n{snap.reason or NO_GPU}.\n\nThe app runs on the CPU; GPU figures "
                f"(VRAM, energy, power, temperature) read “{NO_GPU}”.")

    def val(value, fmt, unit=""):
        return "n/a" if value is None else f"{format(value, fmt)}{unit}"

    power = val(snap.power_w, ".0f")
    if snap.power_limit_w is not None:
        power += f" / {snap.power_limit_w:.0f} W limit"
    memory = "n/a"
    if snap.memory_total_bytes:
        memory = f"{(snap.memory_used_bytes or 0) / GIB:.1f} / {snap.memory_total_bytes / GIB:.1f} GiB"
    throttles = [name for flag, name in ((snap.throttle_thermal, "thermal"), (snap.throttle_power, "power"),
                                         (snap.throttle_hw_slowdown, "hardware slowdown")) if flag]
    throttle = ("**throttling: " + ", ".join(throttles) + "**") if throttles else "not throttling"
    return (f"### {snap.name or 'GPU'}\n"
            "| Temperature | Power | Utilisation | Memory | SM clock | Throttle |\n|---|---|---|---|---|---|\n"
            f"| {val(snap.temperature_c, '.0f', ' °C')} | {power} | {val(snap.utilization_pct, '.0f', ' %')} "
            f"| {memory} | {val(snap.sm_clock_mhz, '.0f', ' MHz')} | {throttle} |")


def plot_frames(history: list[GpuSnapshot]) -> list[pd.DataFrame]:
    """One frame per plot: seconds relative to the newest point (x), the reading (y)."""
    now = history[-1].time if history else 0.0
    frames = []
    for key, label, scale in PLOTS:
        points = [(h.time - now, getattr(h, key) * scale) for h in history if getattr(h, key) is not None]
        frames.append(pd.DataFrame(points, columns=["seconds", label]))
    return frames


class GpuPanel:
    """The GPU tab's components and the timer that refreshes them."""

    def __init__(self, sampler: GpuSampler, history_seconds: float):
        self.sampler = sampler
        snap = sampler.snapshot()
        self.status = gr.Markdown(status_markdown(snap), elem_id="gpu-status")
        total_gib = (snap.memory_total_bytes or 0) / GIB
        y_limits = {"utilization_pct": [0, 100], "memory_used_bytes": [0, total_gib] if total_gib else None}
        frames = plot_frames(sampler.history())
        self.plots = []
        for row in (PLOTS[:2], PLOTS[2:]):
            with gr.Row(visible=sampler.available):
                for (key, label, _scale), frame in zip(row, frames[len(self.plots):]):
                    self.plots.append(gr.LinePlot(frame, x="seconds", y=label, title=label, height=220,
                                                  y_lim=y_limits.get(key), x_lim=[-history_seconds, 0],
                                                  x_title="seconds ago", elem_classes=["gpu-plot"]))
        self.timer = gr.Timer(1.0, active=sampler.available)

    def refresh(self) -> list:
        """New values for the status table and every plot."""
        return [status_markdown(self.sampler.snapshot()), *plot_frames(self.sampler.history())]

    def wire(self) -> None:
        """Refresh the panel every second (no queue slot: it never waits behind a generation)."""
        self.timer.tick(self.refresh, outputs=[self.status, *self.plots], concurrency_limit=None,
                        api_visibility="private", show_progress="hidden")
