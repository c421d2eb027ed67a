"""The Gradio UI: Generate | FP16 vs FP8 | GPU, built by `build_demo(models)`.

Handlers validate every setting on the server (through `GenerationRequest`), run one GPU job at a time
(one queue slot shared by all GPU events), and report which FP8 path ran. The GPU functions carry
`@spaces.GPU`, a no-op everywhere but on ZeroGPU Spaces.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlencode, urlsplit, urlunsplit  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import spaces  # noqa: E402
import torch  # noqa: E402
from gradio import route_utils  # noqa: E402
from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from sd35fp8 import metrics  # noqa: E402
from sd35fp8.generate import (  # noqa: E402
    GUIDANCE_RANGE,
    MAX_SEED,
    SIZE_RANGE,
    STEPS_RANGE,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    OutOfMemory,
)
from sd35fp8.gpu import GpuSampler  # noqa: E402

from .runtime import GIB, PRECISION_LABELS, Models  # noqa: E402

log = logging.getLogger(__name__)

QUEUE_MAX_SIZE = 20
GPU_QUEUE = "gpu"  # one concurrency slot shared by every event that runs a model
NO_GPU = "no GPU"
HISTORY_SECONDS = 300
EXAMPLES = [
    "a photo of an astronaut riding a horse",
    "a painting of a city at night with a red sky",
    "a portrait of a cat with green eyes",
    "a blue dog on the moon, photo",
]
PRECISION_ALIASES = {"fp8": "fp8", "bf16": "bf16", "16-bit": "bf16", "16bit": "bf16", "fp16": "bf16"}
TABLE_HEADERS = ["Precision", "Latency (s)", "s/step", "Peak VRAM (GiB)", "Energy (J)", "Avg power (W)",
                 "Peak temp (°C)", "Mean temp (°C)", "SSIM", "PSNR (dB)"]
CSS = """
#title { margin-bottom: 0; }
.notice { border-left: 4px solid #f59e0b; padding: 0.25rem 0.75rem !important; }
#result-info, #compare-info { font-size: 0.95em; }
/* Scale results to their frame, so that small images (the tiny model's) are not lost in it. */
#result-image img, #fp8-image img, #ref-image img, #heatmap img { width: 100%; height: 100%; object-fit: contain; }
"""


def launch_kwargs() -> dict:
    """Arguments of `demo.launch()` that shape the page (gradio 6 takes theme and css there)."""
    return {"theme": gr.themes.Soft(primary_hue="indigo"), "css": CSS, "show_error": True}


def setting_slider(minimum: float, maximum: float, **kwargs) -> gr.Slider:
    """A slider whose range the handler checks, so that a bad value sent through the API is refused with a
    message naming the setting (from `GenerationRequest`) rather than gradio's unnamed bound message.

    (An instance override, not a subclass: gradio writes a .pyi stub next to any module defining one.)
    """
    slider = gr.Slider(minimum, maximum, **kwargs)
    slider.preprocess = lambda payload: payload
    return slider


# ---------------------------------------------------------------------------------------- validation


def _whole(value, label: str) -> int:
    if value is None or value == "":
        raise gr.Error(f"{label} is missing.", title="Invalid setting")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{label} must be a whole number, not {value!r}.", title="Invalid setting") from None
    if not math.isfinite(number) or number != int(number):
        raise gr.Error(f"{label} must be a whole number, not {value}.", title="Invalid setting")
    return int(number)


def _real(value, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{label} must be a number, not {value!r}.", title="Invalid setting") from None
    if not math.isfinite(number):
        raise gr.Error(f"{label} must be a finite number, not {value}.", title="Invalid setting")
    return number


def make_request(prompt, negative, seed, randomize, steps, guidance, width, height, max_size: int) -> GenerationRequest:
    """A validated GenerationRequest from raw UI/API values; every problem becomes a gr.Error naming it."""
    if prompt is not None and not isinstance(prompt, str):
        raise gr.Error("The prompt must be text.", title="Invalid setting")
    seed = random.randint(0, MAX_SEED) if randomize else _whole(seed, "Seed")
    try:
        request = GenerationRequest(
            prompt=prompt or "", negative_prompt=negative or "", seed=seed, steps=_whole(steps, "Steps"),
            guidance=_real(guidance, "Guidance"), width=_whole(width, "Width"), height=_whole(height, "Height"),
        )
    except InvalidRequest as error:
        raise gr.Error(str(error), title="Invalid setting") from None
    if max(request.width, request.height) > max_size:
        raise gr.Error(f"{request.width}x{request.height} is larger than this model allows: use at most {max_size} "
                       "pixels a side.", title="Invalid setting")
    return request


# ------------------------------------------------------------------------------------------ outputs


class ImageStore:
    """Writes result PNGs (with the generation parameters in their `parameters` text chunk) to a temp folder,
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


def _gib(count: int | None) -> str:
    return NO_GPU if count is None else f"{count / GIB:.2f}"


def _gpu_figures(result: GenerationResult) -> dict[str, str]:
    gpu = result.gpu or {}
    if not gpu.get("available"):
        return dict.fromkeys(("energy", "power", "peak_temp", "mean_temp"), NO_GPU)

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    return {"energy": fmt(gpu.get("energy_j"), ".1f"), "power": fmt(gpu.get("avg_power_w"), ".0f"),
            "peak_temp": fmt(gpu.get("peak_temperature_c"), ".0f"), "mean_temp": fmt(gpu.get("mean_temperature_c"), ".1f")}


def _failure(result: GenerationResult) -> str:
    return "non-finite (NaN or Inf values)" if not result.finite else "blank (a flat, empty image)"


def page_url(request: gr.Request | None) -> str:
    """The address of the page the user is on (no query), for permalinks; "" when unknown."""
    if request is None:
        return ""
    headers = {k.lower(): v for k, v in dict(getattr(request, "headers", None) or {}).items()}
    referer = headers.get("referer")
    if referer and "/gradio_api/" not in referer:
        parts = urlsplit(referer)
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))
    try:
        raw = request.request
        if raw is not None:
            return route_utils.get_root_url(raw, route_utils.get_api_call_path(raw), None) + "/"
    except (AttributeError, ValueError):
        pass
    host = headers.get("x-forwarded-host") or headers.get("host")
    proto = headers.get("x-forwarded-proto", "http").split(",")[0]
    return f"{proto}://{host}/" if host else ""


def permalink_query(request: GenerationRequest, precision: str | None = None, tab: str | None = None) -> str:
    params = {"prompt": request.prompt}
    if request.negative_prompt:
        params["negative"] = request.negative_prompt
    params.update(seed=request.seed, steps=request.steps, guidance=f"{request.guidance:g}",
                  width=request.width, height=request.height)
    if precision:
        params["precision"] = precision
    if tab:
        params["tab"] = tab
    return "?" + urlencode(params)


def result_line(result: GenerationResult, models: Models) -> str:
    """What a person needs to read next to the image: precision, FP8 path, speed, memory, energy, seed."""
    parts = [f"**{PRECISION_LABELS[result.precision]}**"]
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
    for result, label in ((fp8, f"FP8 ({fp8.fp8_path})"), (ref, "16-bit (BF16)")):
        gpu = _gpu_figures(result)
        is_fp8 = result is fp8
        rows.append([
            label, f"{result.latency_s:.3f}", f"{result.seconds_per_step:.4f}", _gib(result.peak_vram_bytes),
            gpu["energy"], gpu["power"], gpu["peak_temp"], gpu["mean_temp"],
            f"{ssim:.4f}" if is_fp8 else "reference",
            (f"{psnr:.2f}" if math.isfinite(psnr) else "inf (identical)") if is_fp8 else "reference",
        ])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


# ------------------------------------------------------------------------------------------ GPU panel


def gpu_status_markdown(snap: dict) -> str:
    if not snap.get("available"):
        return (f"### No NVIDIA GPU\n{snap.get('reason', NO_GPU)}.\n\nThe app runs on the CPU; GPU figures "
                f"(VRAM, energy, power, temperature) read “{NO_GPU}”.")

    def val(key, fmt, unit=""):
        value = snap.get(key)
        return "n/a" if value is None else f"{format(value, fmt)}{unit}"

    power = val("power_w", ".0f")
    if snap.get("power_limit_w") is not None:
        power += f" / {snap['power_limit_w']:.0f} W limit"
    memory = "n/a"
    if snap.get("memory_total_bytes"):
        memory = f"{snap['memory_used_bytes'] / GIB:.1f} / {snap['memory_total_bytes'] / GIB:.1f} GiB"
    throttles = [name for key, name in (("throttle_thermal", "thermal"), ("throttle_power", "power"),
                                        ("throttle_hw_slowdown", "hardware slowdown")) if snap.get(key)]
    throttle = ("**throttling: " + ", ".join(throttles) + "**") if throttles else "not throttling"
    return (f"### {snap.get('name', 'GPU')}\n"
            "| Temperature | Power | Utilisation | Memory | SM clock | Throttle |\n|---|---|---|---|---|---|\n"
            f"| {val('temperature_c', '.0f', ' °C')} | {power} | {val('utilization_pct', '.0f', ' %')} | {memory} "
            f"| {val('sm_clock_mhz', '.0f', ' MHz')} | {throttle} |")


PLOTS = (("temperature_c", "Temperature (°C)", 1.0), ("power_w", "Power (W)", 1.0),
         ("utilization_pct", "Utilisation (%)", 1.0), ("memory_used_bytes", "Memory used (GiB)", 1 / GIB))


def gpu_plot_frames(history: list[dict]) -> list[pd.DataFrame]:
    """One frame per plot: seconds relative to the newest point (x), the reading (y)."""
    now = history[-1]["time"] if history else 0.0
    frames = []
    for key, label, scale in PLOTS:
        points = [(h["time"] - now, h[key] * scale) for h in history if h.get(key) is not None]
        frames.append(pd.DataFrame(points, columns=["seconds", label]))
    return frames


# --------------------------------------------------------------------------------------------- page


def _header(models: Models) -> str:
    lines = ["# SD3.5 FP8 — generate, compare with 16-bit, watch the GPU"]
    ref = f"16-bit reference: `{models.base}`" if models.reference is not None else "no 16-bit reference"
    lines.append(f"Model: `{models.fp8.label}` · {ref} · FP8 path: **{models.fp8.fp8_path}** "
                 f"({models.fp8_path_label}) · device: {models.fp8.device}")
    return "\n\n".join(lines)


TINY_NOTICE = (
    "**Built-in tiny model with random weights.** No model was given (`--model` / `MODEL_ID`), so the app runs a "
    "tiny SD3-shaped pipeline built offline. Its images are noise by design — they are not meant to look like "
    "anything. Everything else (timings, FP8 vs 16-bit comparison, GPU panel, API) works as with a real model."
)


def build_demo(models: Models, sampler: GpuSampler | None = None, *, store: ImageStore | None = None) -> gr.Blocks:
    """The whole app: Generate | FP16 vs FP8 | GPU tabs, API endpoints /generate, /compare, /gpu_stats, a bounded queue."""
    if sampler is None:
        sampler = GpuSampler(index=torch.cuda.current_device() if torch.cuda.is_available() else 0,
                             history_seconds=HISTORY_SECONDS)
    store = store or ImageStore()
    defaults = models.defaults
    has_reference = models.reference is not None

    def run(precision: str, request: GenerationRequest, on_step) -> GenerationResult:
        try:
            return models.run(precision, request, on_step=on_step, sampler=sampler)
        except OutOfMemory as error:
            raise gr.Error(str(error), title="Out of GPU memory") from None
        except gr.Error:
            raise
        except Exception as error:  # a failure inside the pipeline: show it, keep the app alive
            log.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(error).__name__}: {error}") from None

    def precision_of(value) -> str:
        key = PRECISION_ALIASES.get(str(value).strip().lower()) if value is not None else None
        if key is None:
            raise gr.Error(f"Precision {value!r} is unknown: use fp8 or bf16.", title="Invalid setting")
        if key not in models.precisions:
            raise gr.Error(f"No 16-bit model is loaded ({models.base_note}); start the app with --base.",
                           title="Invalid setting")
        return key

    def png_extra(result: GenerationResult) -> dict[str, str]:
        extra = {"model": models.fp8.label if result.precision == "fp8" else str(models.base),
                 "precision": result.precision}
        if result.fp8_path:
            extra["fp8_path"] = result.fp8_path
        return extra

    def stepper(progress, label: str, stage: int = 0, stages: int = 1):
        def on_step(done: int, total: int) -> None:
            progress((stage * total + done) / (stages * total), desc=f"{label}: step {done}/{total}")
        return on_step

    @spaces.GPU(duration=120)
    def generate_image(prompt, negative, seed, randomize, steps, guidance, width, height, precision,
                       request: gr.Request = None, progress=gr.Progress()):
        """Generate one image. Returns the PNG (parameters embedded), the seed used, a result line and a permalink."""
        precision = precision_of(precision)
        req = make_request(prompt, negative, seed, randomize, steps, guidance, width, height, models.max_size)
        result = run(precision, req, stepper(progress, PRECISION_LABELS[precision]))
        for warning in result.warnings:
            gr.Warning(warning)
        notes = [f"⚠️ {warning}" for warning in result.warnings]
        if not result.ok:
            what = _failure(result)
            if precision == "fp8" and has_reference:
                message = (f"The FP8 image came out {what} on path `{result.fp8_path}`; showing the 16-bit "
                           "result of the same settings instead.")
                gr.Warning(message.replace("`", ""))
                notes.append("⚠️ " + message)
                result = run("bf16", req, stepper(progress, "16-bit fallback"))
            if not result.ok:
                raise gr.Error(f"The {PRECISION_LABELS[result.precision]} image came out {_failure(result)}; "
                               "there is nothing worth showing. Try another seed or more steps.")
        path = store.save(result.image, req, result.precision, png_extra(result))
        link = page_url(request) + permalink_query(req, precision)
        return path, req.seed, "\n\n".join([result_line(result, models), *notes]), link

    @spaces.GPU(duration=240)
    def compare(prompt, negative, seed, randomize, steps, guidance, width, height,
                request: gr.Request = None, progress=gr.Progress()):
        """Run the same settings through FP8 and 16-bit; images, slider, difference heatmap, figures table."""
        if not has_reference:
            raise gr.Error(f"No 16-bit reference is loaded ({models.base_note}). Start the app with "
                           "--base REPO_OR_DIR to compare.", title="Comparison unavailable")
        req = make_request(prompt, negative, seed, randomize, steps, guidance, width, height, models.max_size)
        fp8 = run("fp8", req, stepper(progress, "FP8", 0, 2))
        ref = run("bf16", req, stepper(progress, "16-bit", 1, 2))
        fp8_path = store.save(fp8.image, req, "fp8", png_extra(fp8))
        ref_path = store.save(ref.image, req, "bf16", png_extra(ref))
        ssim, psnr = metrics.ssim(fp8.image, ref.image), metrics.psnr(fp8.image, ref.image)
        notes = [f"Same prompt, seed and settings; only the transformer differs (text encoders and VAE are shared). "
                 f"FP8 path: `{fp8.fp8_path}` ({models.fp8_path_label}). SSIM **{ssim:.4f}**, PSNR **"
                 + (f"{psnr:.2f} dB" if math.isfinite(psnr) else "inf (identical)") + "**."]
        for warning in fp8.warnings:
            gr.Warning(warning)
            notes.append(f"⚠️ {warning}")
        for result in (fp8, ref):
            if not result.ok:
                message = f"The {PRECISION_LABELS[result.precision]} image came out {_failure(result)}"
                if result is fp8:
                    message += f" on path `{fp8.fp8_path}`: use the 16-bit image"
                gr.Warning(message.replace("`", "") + ".")
                notes.append(f"⚠️ {message}.")
        link = page_url(request) + permalink_query(req, tab="compare")
        return (fp8_path, ref_path, (fp8_path, ref_path), metrics.difference_heatmap(fp8.image, ref.image),
                comparison_table(fp8, ref, ssim, psnr), "\n\n".join(notes), req.seed, link)

    def gpu_panel():
        snap = sampler.snapshot()
        return [gpu_status_markdown(snap), *gpu_plot_frames(sampler.history())]

    def gpu_stats() -> dict:
        """Current GPU readings: temperature, power and limit, utilisation, memory, SM clock, throttling."""
        snap = dict(sampler.snapshot())
        snap["status"] = "ok" if snap.get("available") else NO_GPU
        return snap

    def prefill(request: gr.Request):
        """Fill the settings from the page's query string (?prompt=&seed=&steps=...); bad values are skipped."""
        params = dict(getattr(request, "query_params", None) or {}) if request else {}
        updates = {name: gr.skip() for name in ("prompt", "negative", "seed", "randomize", "steps", "guidance",
                                               "width", "height", "precision", "tabs", "link_note",
                                               "settings_box")}
        if not params:
            return list(updates.values())

        parsed: set[str] = set()

        def number(name, parse, low, high, step=None):
            raw = params.get(name)
            if raw is None:
                return
            try:
                value = parse(raw)
                if not low <= value <= high or (step and value % step):
                    raise ValueError
            except (TypeError, ValueError):
                gr.Warning(f"Ignored {name}={raw!r} from the link: out of range or not a number.")
                return
            updates[name] = value
            parsed.add(name)

        if "prompt" in params:
            updates["prompt"] = params["prompt"]
        if "negative" in params:
            updates["negative"] = params["negative"]
        number("seed", int, 0, MAX_SEED)
        if "seed" in parsed:
            updates["randomize"] = False
        number("steps", int, *STEPS_RANGE)
        number("guidance", float, *GUIDANCE_RANGE)
        number("width", int, SIZE_RANGE[0], models.max_size, 16)
        number("height", int, SIZE_RANGE[0], models.max_size, 16)
        if "precision" in params:
            key = PRECISION_ALIASES.get(params["precision"].strip().lower())
            if key in models.precisions:
                updates["precision"] = key
            else:
                gr.Warning(f"Ignored precision={params['precision']!r} from the link.")
        if params.get("tab") in ("generate", "compare", "gpu"):
            updates["tabs"] = gr.Tabs(selected=params["tab"])
        updates["link_note"] = gr.Markdown(
            "Settings loaded from the link. Press **Generate** (or **Compare**) to make the image.", visible=True)
        updates["settings_box"] = gr.Accordion(open=True)
        return list(updates.values())

    with gr.Blocks(title="SD3.5 FP8", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(_header(models), elem_id="title")
        if models.is_tiny:
            gr.Markdown(TINY_NOTICE, elem_classes=["notice"], elem_id="tiny-notice")
        with gr.Accordion("Model details: load time and memory per component", open=False):
            gr.Markdown("```\n" + "\n".join(models.summary_lines()) + "\n```")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="Describe the image, then press Enter", lines=1,
                                max_lines=4, scale=4, elem_id="prompt", autofocus=True)
            with gr.Column(scale=1, min_width=220):
                precision = gr.Radio([(PRECISION_LABELS[p], p) for p in models.precisions], value="fp8",
                                     label="Precision (Generate)", elem_id="precision")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                compare_btn = gr.Button("Compare FP8 vs 16-bit", elem_id="compare-btn", interactive=has_reference)
        link_note = gr.Markdown(visible=False, elem_id="link-note")
        with gr.Accordion("Advanced settings", open=False, elem_id="settings") as settings_box:
            with gr.Row():
                negative = gr.Textbox(label="Negative prompt", lines=1, scale=3, elem_id="negative")
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=None, maximum=None, elem_id="seed",
                                 info=f"0 to {MAX_SEED}", scale=1)
                randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize", scale=1)
            with gr.Row():
                steps = setting_slider(STEPS_RANGE[0], STEPS_RANGE[1], value=defaults.steps, step=1, label="Steps",
                                      elem_id="steps")
                guidance = setting_slider(GUIDANCE_RANGE[0], GUIDANCE_RANGE[1], value=defaults.guidance, step=0.1,
                                         label="Guidance", elem_id="guidance")
                width = setting_slider(SIZE_RANGE[0], models.max_size, value=defaults.width, step=16, label="Width",
                                      elem_id="width")
                height = setting_slider(SIZE_RANGE[0], models.max_size, value=defaults.height, step=16,
                                       label="Height", elem_id="height")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    image = gr.Image(label="Result (PNG, settings embedded)", type="filepath", format="png",
                                     interactive=False, buttons=["download", "fullscreen"], height=480, scale=3,
                                     elem_id="result-image")
                    with gr.Column(scale=2):
                        result_info = gr.Markdown("Results appear here: latency, s/step, peak VRAM, FP8 path.",
                                                  elem_id="result-info")
                        link = gr.Textbox(label="Link to this image (settings + seed)", buttons=["copy"],
                                          interactive=False, elem_id="permalink")
                        gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts")
            with gr.Tab("FP16 vs FP8", id="compare"):
                if not has_reference:
                    gr.Markdown(f"**Comparison off:** {models.base_note}. Start with `--base REPO_OR_DIR`.")
                compare_info = gr.Markdown("Runs the same prompt, seed and settings through FP8 and 16-bit.",
                                           elem_id="compare-info")
                with gr.Row():
                    fp8_image = gr.Image(label="FP8", type="filepath", format="png", interactive=False, height=300,
                                         elem_id="fp8-image")
                    ref_image = gr.Image(label="16-bit (BF16)", type="filepath", format="png", interactive=False,
                                         height=300, elem_id="ref-image")
                    heatmap = gr.Image(label="Difference ×4 (black = identical)", type="pil", format="png",
                                       interactive=False, height=300, elem_id="heatmap")
                table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="Figures", elem_id="table")
                with gr.Row():
                    slider = gr.ImageSlider(label="FP8 ⟷ 16-bit (drag)", type="filepath", format="png",
                                            max_height=360, scale=2, elem_id="slider")
                    compare_link = gr.Textbox(label="Link to this comparison", buttons=["copy"], interactive=False,
                                              scale=1, elem_id="compare-link")
            with gr.Tab("GPU", id="gpu"):
                snap = sampler.snapshot()
                gpu_md = gr.Markdown(gpu_status_markdown(snap), elem_id="gpu-status")
                frames = gpu_plot_frames(sampler.history())
                total_gib = (snap.get("memory_total_bytes") or 0) / GIB
                y_limits = {"utilization_pct": [0, 100], "memory_used_bytes": [0, total_gib] if total_gib else None}
                plots = []
                for rows in (PLOTS[:2], PLOTS[2:]):
                    with gr.Row(visible=sampler.available):
                        for (key, label, _scale), frame in zip(rows, frames[len(plots):]):
                            plots.append(gr.LinePlot(frame, x="seconds", y=label, title=label, height=220,
                                                     y_lim=y_limits.get(key),
                                                     x_lim=[-HISTORY_SECONDS, 0], x_title="seconds ago",
                                                     elem_classes=["gpu-plot"]))
                timer = gr.Timer(1.0, active=sampler.available)

        settings = [prompt, negative, seed, randomize, steps, guidance, width, height]
        gr.on([generate_btn.click, prompt.submit], lambda: gr.Tabs(selected="generate"), outputs=tabs, queue=False,
              api_visibility="private").then(
            generate_image, inputs=[*settings, precision], outputs=[image, seed, result_info, link],
            api_name="generate", concurrency_limit=1, concurrency_id=GPU_QUEUE)
        compare_btn.click(lambda: gr.Tabs(selected="compare"), outputs=tabs, queue=False, api_visibility="private").then(
            compare, inputs=settings,
            outputs=[fp8_image, ref_image, slider, heatmap, table, compare_info, seed, compare_link],
            api_name="compare", concurrency_limit=1, concurrency_id=GPU_QUEUE)
        timer.tick(gpu_panel, outputs=[gpu_md, *plots], concurrency_limit=None, api_visibility="private",
                   show_progress="hidden")
        gr.api(gpu_stats, api_name="gpu_stats", concurrency_limit=None)
        demo.load(prefill, outputs=[*settings, precision, tabs, link_note, settings_box], api_visibility="private",
                  queue=False)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo
