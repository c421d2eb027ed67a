"""The generation function shared by the app and the benchmarks, with validated settings and measured figures."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .compile import CudaGraphModule
from .errors import Failure
from .loading import LoadedPipeline
from .request import GenerationRequest


class OutOfMemory(Failure):
    """The GPU ran out of memory; memory has been freed and the message says what to lower."""


class Stopped(Failure):
    """The generation was stopped between two steps (cancelled, or past its time limit); the message says why."""


@dataclass
class GenerationResult:
    """Images plus the figures measured while making them."""

    images: list[Image.Image]
    request: GenerationRequest
    precision: str
    fp8_path: str | None
    latency_s: float
    seconds_per_step: float
    peak_vram_bytes: int | None
    finite: bool
    blank: bool
    gpu: dict | None = None
    warnings: list[str] = field(default_factory=list)
    encode_s: float | None = None  # prompt encoding (0 when the prompt cache had it)
    prompt_cache_hit: bool = False
    vae_tiling: bool = False

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def ok(self) -> bool:
        """False when the output was non-finite or blank, i.e. not worth showing."""
        return self.finite and not self.blank


def prompt_warnings(loaded: LoadedPipeline, request: GenerationRequest) -> list[str]:
    """Warnings for prompts that the text encoders will truncate."""
    warnings = []
    pipe = loaded.pipe
    for tokenizer, limit, label in ((pipe.tokenizer, 77, "CLIP"), (pipe.tokenizer_3, 256, "T5")):
        if tokenizer is None:
            continue
        count = len(tokenizer(request.prompt, truncation=False)["input_ids"])
        if count > limit:
            warnings.append(f"The prompt is {count} {label} tokens long; {label} reads only the first {limit}.")
    return warnings


def generate(
    loaded: LoadedPipeline,
    request: GenerationRequest,
    on_step: Callable[[int, int], None] | None = None,
    sampler=None,
    should_stop: Callable[[], str | None] | None = None,
) -> GenerationResult:
    """Run `request` through `loaded`, timing it end to end and per transformer step.

    `on_step(done, total)` is called as each denoising step is known to be done (on CUDA one step late: the host
    queues the next step before it waits); `sampler` (a `GpuSampler`) is started and
    stopped around the call so that energy and temperature figures cover exactly this generation.
    `should_stop()` is asked after each step; a reason it returns ends the run with `Stopped(reason)`.
    Raises `OutOfMemory` (with memory freed) when the GPU runs out.

    Prompts are encoded once through `loaded.prompt_cache` (a repeated prompt, or the same prompt on a pipeline
    made by `with_transformer`, skips the text encoders); the VAE decodes in tiles above
    `SPEED.vae_tiling_above_pixels`; the measured seconds per step are kept in `loaded.step_seconds`.
    """
    from .prompts import encode
    from .settings import SPEED

    pipe, device = loaded.pipe, loaded.device
    cuda = device.type == "cuda"
    marks: dict[str, float] = {}

    def sync_time() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def first_step(*_):
        marks.setdefault("denoise_start", sync_time())

    pending = {"previous": None, "reported": 0}  # the last queued step's CUDA event; steps reported done

    def step_end(_pipe, index, _timestep, kwargs):
        # On CUDA the host waits for the step *before* this one, so that the GPU works on this step while the host
        # queues the next (waiting for each step left the GPU idle while the host queued the next one); progress
        # and stop requests lag one step. The last step is waited for: its end is the denoising time.
        if cuda and index + 1 < request.steps:
            event = torch.cuda.Event()
            event.record()
            if pending["previous"] is not None:
                pending["previous"].synchronize()
            pending["previous"] = event
            done = index
        else:
            marks["denoise_end"] = sync_time()
            done = index + 1
        if on_step:
            for step in range(pending["reported"] + 1, done + 1):
                on_step(step, request.steps)
        pending["reported"] = done
        reason = should_stop() if should_stop else None
        if reason:
            raise Stopped(reason)
        return kwargs

    hook = pipe.transformer.register_forward_pre_hook(first_step)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if sampler is not None:
        sampler.start()
    started = sync_time()
    cfg = request.guidance > 1
    tiling = request.width * request.height > SPEED.vae_tiling_above_pixels
    if tiling:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    try:
        embeddings, cache_hit, encode_s = encode(pipe, device, request.prompt, request.negative_prompt or None, cfg,
                                                 cache=loaded.prompt_cache)
        output = pipe(
            **embeddings.pipeline_kwargs(request.batch_size),
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            num_images_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
            callback_on_step_end=step_end,
        )
    except torch.OutOfMemoryError as error:
        del error
        for module in pipe.components.values():  # give the captured graphs' memory pools back too
            graphs = CudaGraphModule.installed(module) if isinstance(module, torch.nn.Module) else None
            if graphs is not None:
                graphs.reset()
        gc.collect()
        torch.cuda.empty_cache()
        raise OutOfMemory(
            f"The GPU ran out of memory at {request.width}x{request.height}, batch {request.batch_size}. "
            "Lower the size or batch, or start the app with --offload."
        ) from None
    finally:
        hook.remove()
        gpu = sampler.stop() if sampler is not None else None
    latency = sync_time() - started
    arrays = output.images
    finite = bool(np.isfinite(arrays).all())
    images = [Image.fromarray((np.nan_to_num(a).clip(0, 1) * 255).round().astype(np.uint8)) for a in arrays]
    denoise = marks.get("denoise_end", started) - marks.get("denoise_start", started)
    if denoise > 0:
        loaded.step_seconds[(request.width, request.height, request.batch_size)] = denoise / request.steps
    return GenerationResult(
        images=images,
        request=request,
        precision=loaded.precision,
        fp8_path=loaded.fp8_path,
        latency_s=latency,
        seconds_per_step=denoise / request.steps,
        peak_vram_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        finite=finite,
        blank=finite and float(np.std(arrays)) < 1e-3,
        gpu=gpu,
        warnings=prompt_warnings(loaded, request),
        encode_s=encode_s,
        prompt_cache_hit=cache_hit,
        vae_tiling=tiling,
    )
