"""What the page's events run: `Handlers` holds the replicas (models + GPU samplers) and the result store.

Every setting is checked on the server (`sd35fp8.request`), GPU jobs run one at a time with a time limit
and stop at their next step when the user cancels, and every failure becomes a message on the page while
the app keeps serving. The GPU functions are wrapped in `@spaces.GPU`, a no-op everywhere but on ZeroGPU.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
import math
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import anyio
import gradio as gr
import pandas as pd
import spaces
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd35fp8 import metrics
from sd35fp8.errors import BadInput, one_line
from sd35fp8.generate import GenerationResult, OutOfMemory, Stopped
from sd35fp8.request import GenerationRequest, parse_setting, request_from_raw
from sd35fp8.settings import GIB, LIMITS, PRECISIONS, AppSettings, parse_precision

from .gpu_panel import NO_GPU
from .links import CUT_MARK, escape_markdown, page_url, permalink_query
from .replicas import Replicas

log = logging.getLogger(__name__)

TABLE_HEADERS = ["Precision", "Latency (s)", "s/step", "Peak VRAM (GiB)", "Energy (J)", "Avg power (W)",
                 "Peak temp (°C)", "Mean temp (°C)", "SSIM", "PSNR (dB)"]
LINK_FIELDS = ("prompt", "negative", "seed", "randomize", "steps", "guidance", "width", "height", "precision",
               "tabs", "link_note", "settings_box")
TABS = ("generate", "compare", "gpu")


# ------------------------------------------------------------------------------------------- files


class ImageStore:
    """Writes result PNGs (generation parameters in their `parameters` text chunk) to a temp folder,
    keeping only the newest `keep` files (gradio copies what it serves into its own cache)."""

    def __init__(self, keep: int = 200):
        self.folder = Path(tempfile.mkdtemp(prefix="sd35fp8-app-"))
        self._paths: deque[Path] = deque()
        self._keep = keep
        self._lock = threading.Lock()

    def save(self, image: Image.Image, request: GenerationRequest, tag: str, extra: dict[str, str]) -> str:
        info = PngInfo()
        info.add_text("parameters", request.parameters_text)
        for key, value in extra.items():
            info.add_text(key, value)
        path = self.folder / f"sd35-{tag}-seed{request.seed}-{uuid.uuid4().hex[:8]}.png"
        image.save(path, format="PNG", pnginfo=info)
        with self._lock:
            self._paths.append(path)
            while len(self._paths) > self._keep:
                self._paths.popleft().unlink(missing_ok=True)
        return str(path)


# ----------------------------------------------------------------------------------------- figures


def _gib(count: int | None) -> str:
    return NO_GPU if count is None else f"{count / GIB:.2f}"


def _gpu_figures(result: GenerationResult) -> dict[str, str]:
    gpu = result.gpu
    if gpu is None or not gpu.available:
        return dict.fromkeys(("energy", "power", "peak_temp", "mean_temp"), NO_GPU)

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    return {"energy": fmt(gpu.energy_j, ".1f"), "power": fmt(gpu.avg_power_w, ".0f"),
            "peak_temp": fmt(gpu.peak_temperature_c, ".0f"), "mean_temp": fmt(gpu.mean_temperature_c, ".1f")}


def _psnr_text(psnr: float) -> str:
    return f"{psnr:.2f}" if math.isfinite(psnr) else "inf (identical)"


def failure_text(result: GenerationResult) -> str:
    return "non-finite (NaN or Inf values)" if not result.finite else "blank (a flat, empty image)"


def result_line(result: GenerationResult, models: Replicas) -> str:
    """What a person needs to read next to the image: precision, FP8 path, speed, memory, energy, seed."""
    parts = [f"**{PRECISIONS[result.precision].label}**"]
    if result.precision == "fp8":
        parts.append(f"FP8 path: `{result.fp8_path}` ({models.fp8_path_label})")
    parts += [f"latency {result.latency_s:.2f} s", f"{result.seconds_per_step:.3f} s/step",
              f"peak VRAM {_gib(result.peak_vram_bytes)}" + (" GiB" if result.peak_vram_bytes is not None else "")]
    gpu = _gpu_figures(result)
    if gpu["energy"] != NO_GPU:
        parts.append(f"{gpu['energy']} J, {gpu['power']} W avg, peak {gpu['peak_temp']} °C")
    parts.append(f"seed {result.request.seed}")
    return " · ".join(parts)


def comparison_table(fp8: GenerationResult, ref: GenerationResult, ssim: float, psnr: float) -> pd.DataFrame:
    rows = []
    for result, label in ((fp8, f"FP8 ({fp8.fp8_path})"), (ref, PRECISIONS[ref.precision].label)):
        gpu = _gpu_figures(result)
        is_fp8 = result is fp8
        rows.append([
            label, f"{result.latency_s:.3f}", f"{result.seconds_per_step:.4f}", _gib(result.peak_vram_bytes),
            gpu["energy"], gpu["power"], gpu["peak_temp"], gpu["mean_temp"],
            f"{ssim:.4f}" if is_fp8 else "reference", _psnr_text(psnr) if is_fp8 else "reference",
        ])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


# ---------------------------------------------------------------------------------------- handlers


class Handlers:
    """The functions behind the page's events and the API endpoints /generate, /compare and /gpu_stats."""

    def __init__(self, models: Replicas, settings: AppSettings, store: ImageStore):
        self.models = models
        self.settings = settings
        self.store = store
        # ZeroGPU lends a GPU for as long as each call asks; the request decides how long that is.
        self._gpu_generate = spaces.GPU(duration=self._generate_seconds)(self._generate)
        self._gpu_compare = spaces.GPU(duration=self._compare_seconds)(self._compare)

    @property
    def has_reference(self) -> bool:
        return self.models.reference is not None

    # -------------------------------------------------------------------------- GPU jobs (public API)

    async def generate_image(self, prompt, negative="", seed=0, randomize=True, steps=None, guidance=None,
                             width=None, height=None, precision="fp8", request: gr.Request = None,
                             progress=gr.Progress()):
        """Generate one image. Returns the PNG (parameters embedded), the seed used, a result line and a permalink."""
        raw = (prompt, negative, seed, randomize, steps, guidance, width, height)
        return await self._cancellable(self._gpu_generate, raw, precision, page_url(request), progress)

    async def compare(self, prompt, negative="", seed=0, randomize=True, steps=None, guidance=None,
                      width=None, height=None, request: gr.Request = None, progress=gr.Progress()):
        """The same settings through FP8 and 16-bit: both images, a slider, a difference heatmap, a figures table."""
        raw = (prompt, negative, seed, randomize, steps, guidance, width, height)
        return await self._cancellable(self._gpu_compare, raw, page_url(request), progress)

    def gpu_stats(self) -> dict:
        """Current GPU readings: temperature, power and limit, utilisation, memory, SM clock, throttling
        (of the first GPU; `gpus` lists every GPU the replicas run on)."""
        snaps = [sampler.snapshot().as_dict() for sampler in self.models.samplers]
        stats = dict(snaps[0], status="ok" if snaps[0]["available"] else NO_GPU)
        stats["gpus"] = snaps
        return stats

    # ------------------------------------------------------------------------------------ plumbing

    async def _cancellable(self, job, *args):
        """Run `job(*args, stop=event)` in a worker thread; a cancelled event sets `stop`, so the job ends
        at its next step instead of holding the GPU (and the queue) to the end."""
        stop = threading.Event()
        try:
            return await anyio.to_thread.run_sync(functools.partial(job, *args, stop=stop), abandon_on_cancel=True)
        finally:
            stop.set()

    def _request(self, raw) -> GenerationRequest:
        defaults = self.models.defaults
        prompt, negative, seed, randomize, steps, guidance, width, height = raw
        steps, guidance = _or(steps, defaults.steps), _or(guidance, defaults.guidance)
        width, height = _or(width, defaults.width), _or(height, defaults.height)
        try:
            return request_from_raw(prompt, negative, seed, randomize, steps, guidance, width, height,
                                    max_size=self.models.max_size)
        except BadInput as error:
            raise gr.Error(str(error), title="Invalid setting") from None

    def _precision(self, value) -> str:
        if str(value).strip().lower() == "fp16":  # the page calls the reference "FP16"; it runs in bf16
            value = "bf16"
        try:
            return parse_precision(value, self.models.precisions)
        except BadInput as error:
            if str(value).strip().lower() in PRECISIONS and not self.has_reference:
                raise gr.Error(f"No 16-bit model is loaded ({self.models.base_note}); start the app with --base.",
                               title="Invalid setting") from None
            raise gr.Error(str(error), title="Invalid setting") from None

    def _stopper(self, stop: threading.Event):
        """`should_stop` for one job: cancelled by the user, or past the time limit."""
        deadline = time.monotonic() + self.settings.job_timeout_s

        def should_stop() -> str | None:
            if stop.is_set():
                return "The job was cancelled."
            if time.monotonic() > deadline:
                return (f"The job passed its time limit of {self.settings.job_timeout_s:.0f} s (JOB_TIMEOUT_S) and "
                        "was stopped: lower the steps or the size.")
            return None

        return should_stop

    def _run(self, precision: str, request: GenerationRequest, progress, label: str,
             stop: threading.Event) -> GenerationResult:
        def on_step(done: int, total: int) -> None:
            progress(done / total, desc=f"{label}: step {done}/{total}")

        with self._errors_shown():
            return self.models.run(precision, request, on_step=on_step, should_stop=self._stopper(stop))

    def _run_pair(self, request: GenerationRequest, progress, stop: threading.Event):
        done = {"fp8": 0, "bf16": 0}
        where = "at the same time on two GPUs" if self.models.size > 1 else "one after the other"

        def on_step_for(precision: str):
            def on_step(step: int, total: int) -> None:
                done[precision] = step
                progress(sum(done.values()) / (2 * total), desc=f"FP8 and 16-bit, {where}: "
                                                               f"{done['fp8']}/{total} and {done['bf16']}/{total}")
            return on_step

        with self._errors_shown():
            return self.models.run_pair(request, on_step_for=on_step_for, should_stop=self._stopper(stop))

    @contextmanager
    def _errors_shown(self):
        """Failures inside a job become messages on the page; the app keeps serving."""
        try:
            yield
        except OutOfMemory as error:
            raise gr.Error(str(error), title="Out of GPU memory") from None
        except Stopped as error:
            raise gr.Error(str(error), title="Stopped") from None
        except gr.Error:
            raise
        except Exception as error:  # a failure inside the pipeline: show it, keep the app alive
            log.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(error).__name__}: {one_line(error)}") from None

    def _png_extra(self, result: GenerationResult) -> dict[str, str]:
        extra = {"model": self.models.fp8.label if result.precision == "fp8" else str(self.models.base),
                 "precision": result.precision}
        if result.fp8_path:
            extra["fp8_path"] = result.fp8_path
        return extra

    # ------------------------------------------------------------------------------ ZeroGPU durations

    def _generate_seconds(self, raw, precision, *_args, **_kwargs) -> float:
        try:
            request, precision = self._request(raw), self._precision(precision)
        except gr.Error:
            return 10.0  # refused before any GPU work
        return self.models.gpu_seconds([precision], request, self.settings)

    def _compare_seconds(self, raw, *_args, **_kwargs) -> float:
        try:
            request = self._request(raw)
        except gr.Error:
            return 10.0
        return self.models.gpu_seconds(self.models.precisions, request, self.settings)

    # ------------------------------------------------------------------------------------ GPU bodies

    def _generate(self, raw, precision, page: str, progress, stop: threading.Event):
        precision = self._precision(precision)
        req = self._request(raw)
        label = PRECISIONS[precision].label
        result = self._run(precision, req, progress, label, stop)
        for warning in result.warnings:
            gr.Warning(warning)
        notes = [f"⚠️ {warning}" for warning in result.warnings]
        if not result.ok:
            what = failure_text(result)
            if precision == "fp8" and self.has_reference:
                message = (f"The FP8 image came out {what} on path `{result.fp8_path}`; showing the 16-bit "
                           "result of the same settings instead.")
                gr.Warning(message.replace("`", ""))
                notes.append("⚠️ " + message)
                result = self._run("bf16", req, progress, "16-bit fallback", stop)
            if not result.ok:
                raise gr.Error(f"The {PRECISIONS[result.precision].label} image came out {failure_text(result)}; "
                               "there is nothing worth showing. Try another seed or more steps.")
        path = self.store.save(result.image, req, result.precision, self._png_extra(result))
        link = page + permalink_query(req, precision)
        return path, req.seed, "\n\n".join([result_line(result, self.models), *notes]), link

    def _compare(self, raw, page: str, progress, stop: threading.Event):
        if not self.has_reference:
            raise gr.Error(f"No 16-bit reference is loaded ({self.models.base_note}). Start the app with "
                           "--base REPO_OR_DIR to compare.", title="Comparison unavailable")
        req = self._request(raw)
        fp8, ref = self._run_pair(req, progress, stop)
        fp8_path = self.store.save(fp8.image, req, "fp8", self._png_extra(fp8))
        ref_path = self.store.save(ref.image, req, "bf16", self._png_extra(ref))
        ssim, psnr = metrics.ssim(fp8.image, ref.image), metrics.psnr(fp8.image, ref.image)
        notes = [f"Same prompt, seed and settings; only the transformer differs (text encoders and VAE are shared). "
                 f"FP8 path: `{fp8.fp8_path}` ({self.models.fp8_path_label}). SSIM **{ssim:.4f}**, PSNR **"
                 + (f"{psnr:.2f} dB" if math.isfinite(psnr) else "inf (identical)") + "**."]
        for warning in fp8.warnings:
            gr.Warning(warning)
            notes.append(f"⚠️ {warning}")
        for result in (fp8, ref):
            if not result.ok:
                message = f"The {PRECISIONS[result.precision].label} image came out {failure_text(result)}"
                if result is fp8:
                    message += f" on path `{fp8.fp8_path}`: use the 16-bit image"
                gr.Warning(message.replace("`", "") + ".")
                notes.append(f"⚠️ {message}.")
        link = page + permalink_query(req, tab="compare")
        return (fp8_path, ref_path, (fp8_path, ref_path), metrics.difference_heatmap(fp8.image, ref.image),
                comparison_table(fp8, ref, ssim, psnr), "\n\n".join(notes), req.seed, link)

    # ------------------------------------------------------------------------------------ page links

    def prefill(self, request: gr.Request):
        """Fill the settings from the page's query string (?prompt=&seed=&steps=...).

        Values that cannot be used are skipped and named in a note on the page; a prompt longer than the
        limit is cut to it.
        """
        params = dict(getattr(request, "query_params", None) or {}) if request else {}
        updates = {name: gr.skip() for name in LINK_FIELDS}
        if not params:
            return list(updates.values())
        problems = []
        if CUT_MARK in params:
            problems.append(f"the link was too long: its prompt was cut to the first {LIMITS.prompt_chars} characters")
        for name in ("prompt", "negative"):
            if name in params:
                text = str(params[name])
                if len(text) > LIMITS.prompt_chars:
                    problems.append(f"the {name} had {len(text)} characters: cut to the first {LIMITS.prompt_chars}")
                    text = text[: LIMITS.prompt_chars]
                updates[name] = text
        for name in ("seed", "steps", "guidance", "width", "height"):
            if name in params:
                try:
                    updates[name] = parse_setting(name, params[name], self.models.max_size)
                except BadInput as error:
                    problems.append(f"ignored {name}: {error}")
                else:
                    if name == "seed":
                        updates["randomize"] = False
        if "precision" in params:
            try:
                updates["precision"] = parse_precision(params["precision"], self.models.precisions)
            except BadInput as error:
                problems.append(f"ignored precision: {error}")
        if params.get("tab") in TABS:
            updates["tabs"] = gr.Tabs(selected=params["tab"])
        elif "tab" in params:
            problems.append(f"ignored tab: use one of {', '.join(TABS)}")
        note = "Settings loaded from the link. Press **Generate** (or **Compare**) to make the image."
        if problems:
            note += "\n\n" + "\n".join(f"- ⚠️ {escape_markdown(p)}" for p in problems)
        updates["link_note"] = gr.Markdown(note, visible=True)
        updates["settings_box"] = gr.Accordion(open=True)
        return list(updates.values())


def _or(value, default):
    return default if value is None else value

