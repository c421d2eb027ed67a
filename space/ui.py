"""The page: Generate | FP16 vs FP8 | GPU. `build_demo(models, settings)` lays it out top to bottom and wires it.

What the events run lives in `space.handlers` (`Handlers`), the GPU tab in `space.gpu_panel`, the models
in `space.runtime`, every limit and knob in `sd35fp8.settings`.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from sd35fp8.gpu import GpuSampler  # noqa: E402
from sd35fp8.settings import LIMITS, PRECISIONS, AppSettings  # noqa: E402
from sd35fp8.speed import describe_pieces  # noqa: E402

from .gpu_panel import GpuPanel  # noqa: E402
from .handlers import TABLE_HEADERS, Handlers, ImageStore  # noqa: E402
from .links import LongLinkGuard  # noqa: E402
from .replicas import Replica, Replicas, default_sampler  # noqa: E402
from .runtime import BUILT_IN_NOTICES, Models  # noqa: E402

GPU_QUEUE = "gpu"  # one concurrency slot per replica, shared by every event that runs a model
CSS = """
#title { margin-bottom: 0; }
.notice { border-left: 4px solid #f59e0b; padding: 0.25rem 0.75rem !important; }
#result-info, #compare-info { font-size: 0.95em; }
/* Scale results to their frame, so that small images (the tiny model's) are not lost in it. */
#result-image img, #fp8-image img, #ref-image img, #heatmap img { width: 100%; height: 100%; object-fit: contain; }
"""


def launch_kwargs(settings: AppSettings | None = None) -> dict:
    """Arguments of `demo.launch()` that shape the page (gradio 6 takes theme and css there)."""
    settings = settings or AppSettings()
    return {"theme": gr.themes.Soft(primary_hue="indigo"), "css": CSS, "show_error": True,
            "max_file_size": settings.max_upload_bytes,
            "app_kwargs": {"middleware": [Middleware(LongLinkGuard)]}}


def checked_by_handler(component: gr.components.Component) -> gr.components.Component:
    """`component` passing its raw value on, so that a bad value sent through the API is refused with a message
    naming the setting (from `sd35fp8.request`) instead of being rounded (Number rounds 1.5 to 2), overflowing
    (Number turns 10**400 into an unnamed float error) or refused with gradio's unnamed bound message (Slider).

    (An instance override, not a subclass: gradio writes a .pyi stub next to any module defining one.)
    """
    component.preprocess = lambda payload: payload
    return component


def header_markdown(models: Replicas, settings: AppSettings) -> str:
    ref = f"16-bit reference: `{models.base}`" if models.reference is not None else "no 16-bit reference"
    devices = ", ".join(r.name for r in models.replicas)
    at_once = "one at a time" if models.size == 1 else f"{models.size} at a time, one per replica"
    return (
        "# SD3.5 FP8 — generate, compare with 16-bit, watch the GPU\n\n"
        f"Model: `{models.fp8.label}` · {ref} · FP8 path: **{models.fp8.fp8_path}** ({models.fp8_path_label}) "
        f"· device: {devices}\n\nSpeed pieces: {describe_pieces(models.fp8.pieces)}\n\n"
        f"Jobs run {at_once} (up to {settings.queue_max_size} wait in line); each may run for "
        f"{settings.job_timeout_s:.0f} s at most, and **Stop** ends yours at its next step."
    )


def build_demo(models: Models | Replicas, settings: AppSettings | None = None, *, sampler: GpuSampler | None = None,
               store: ImageStore | None = None) -> gr.Blocks:
    """The whole app: Generate | FP16 vs FP8 | GPU tabs, API endpoints /generate, /compare, /gpu_stats, a bounded queue.

    `models` is one `Models` (measured by `sampler`, by default its GPU's) or a pool of `Replicas`.
    """
    settings = settings or AppSettings()
    if isinstance(models, Models):
        models = Replicas([Replica(models, sampler or default_sampler(settings)(models.fp8.device))])
    handlers = Handlers(models, settings, store or ImageStore(keep=settings.kept_images))
    defaults = models.defaults

    with gr.Blocks(title="SD3.5 FP8", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(header_markdown(models, settings), elem_id="title")
        if models.built_in:
            gr.Markdown(BUILT_IN_NOTICES[models.built_in], elem_classes=["notice"], elem_id="tiny-notice")
        with gr.Accordion("Model details: load time and memory per component", open=False):
            gr.Markdown("```\n" + "\n".join(models.summary_lines()) + "\n```")

        # ---- prompt and buttons
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="Describe the image, then press Enter", lines=1,
                                max_lines=4, scale=4, elem_id="prompt", autofocus=True,
                                max_length=LIMITS.prompt_chars)
            with gr.Column(scale=1, min_width=220):
                precision = gr.Radio([(PRECISIONS[p].label, p) for p in models.precisions], value="fp8",
                                     label="Precision (Generate)", elem_id="precision")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                compare_btn = gr.Button("Compare FP8 vs 16-bit", elem_id="compare-btn",
                                        interactive=handlers.has_reference)
                stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="stop-btn")
        link_note = gr.Markdown(visible=False, elem_id="link-note")

        # ---- settings
        with gr.Accordion("Advanced settings", open=False, elem_id="settings") as settings_box:
            with gr.Row():
                negative = gr.Textbox(value="", label="Negative prompt", lines=1, scale=3, elem_id="negative",
                                      max_length=LIMITS.prompt_chars)
                seed = checked_by_handler(gr.Number(label="Seed", value=0, precision=0, minimum=None, maximum=None,
                                                    elem_id="seed", info=f"0 to {LIMITS.max_seed}", scale=1))
                randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize", scale=1)
            with gr.Row():
                steps = checked_by_handler(gr.Slider(*LIMITS.steps, value=defaults.steps, step=1, label="Steps",
                                                     elem_id="steps"))
                guidance = checked_by_handler(gr.Slider(*LIMITS.guidance, value=defaults.guidance, step=0.1,
                                                        label="Guidance", elem_id="guidance"))
                width = checked_by_handler(gr.Slider(LIMITS.size[0], models.max_size, value=defaults.width,
                                                     step=LIMITS.size_multiple, label="Width", elem_id="width"))
                height = checked_by_handler(gr.Slider(LIMITS.size[0], models.max_size, value=defaults.height,
                                                      step=LIMITS.size_multiple, label="Height", elem_id="height"))

        with gr.Tabs() as tabs:
            # ---- Generate
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
                        gr.Examples([[e] for e in defaults.examples], inputs=[prompt], label="Example prompts")
            # ---- FP16 vs FP8
            with gr.Tab("FP16 vs FP8", id="compare"):
                if not handlers.has_reference:
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
            # ---- GPU
            with gr.Tab("GPU", id="gpu"):
                panels = []
                for sampler_of_gpu in models.samplers:
                    if len(models.samplers) > 1:
                        gr.Markdown(f"#### GPU {sampler_of_gpu.index}")
                    panels.append(GpuPanel(sampler_of_gpu, settings.gpu_history_s))

        # ---- wiring
        settings_inputs = [prompt, negative, seed, randomize, steps, guidance, width, height]
        generate_event = gr.on([generate_btn.click, prompt.submit], lambda: gr.Tabs(selected="generate"),
                               outputs=tabs, queue=False, api_visibility="private").then(
            handlers.generate_image, inputs=[*settings_inputs, precision], outputs=[image, seed, result_info, link],
            api_name="generate", concurrency_limit=models.size, concurrency_id=GPU_QUEUE)
        compare_event = compare_btn.click(lambda: gr.Tabs(selected="compare"), outputs=tabs, queue=False,
                                          api_visibility="private").then(
            handlers.compare, inputs=settings_inputs,
            outputs=[fp8_image, ref_image, slider, heatmap, table, compare_info, seed, compare_link],
            api_name="compare", concurrency_limit=models.size, concurrency_id=GPU_QUEUE)
        stop_btn.click(None, cancels=[generate_event, compare_event], queue=False, api_visibility="private")
        for panel in panels:
            panel.wire()
        gr.api(handlers.gpu_stats, api_name="gpu_stats", concurrency_limit=None)
        demo.load(handlers.prefill, outputs=[*settings_inputs, precision, tabs, link_note, settings_box],
                  api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=1, max_size=settings.queue_max_size)
    return demo
