"""The generation function shared by the app and the benchmarks, with validated settings and measured figures."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .loading import LoadedPipeline

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
SIZE_RANGE = (64, 2048)
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 20.0)
BATCH_RANGE = (1, 8)


class InvalidRequest(ValueError):
    """A generation setting is out of range; the message names it and the allowed values."""


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; memory has been freed and the message says what to lower."""


@dataclass(frozen=True)
class GenerationRequest:
    """Settings of one generation, checked on construction."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 28
    guidance: float = 4.5
    width: int = 1024
    height: int = 1024
    batch_size: int = 1

    def __post_init__(self):
        if not self.prompt or not self.prompt.strip():
            raise InvalidRequest("The prompt is empty: describe the image you want.")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise InvalidRequest(
                    f"The {name.replace('_', ' ')} has {len(getattr(self, name))} characters; "
                    f"the limit is {MAX_PROMPT_CHARS} (the text encoders read at most 77 + 256 tokens)."
                )
        for name in ("width", "height"):
            value = getattr(self, name)
            if not SIZE_RANGE[0] <= value <= SIZE_RANGE[1] or value % 16:
                raise InvalidRequest(
                    f"{name.capitalize()} {value} is not allowed: use a multiple of 16 from "
                    f"{SIZE_RANGE[0]} to {SIZE_RANGE[1]}."
                )
        _check_range("Steps", self.steps, STEPS_RANGE)
        _check_range("Guidance", self.guidance, GUIDANCE_RANGE)
        _check_range("Seed", self.seed, (0, MAX_SEED))
        _check_range("Batch size", self.batch_size, BATCH_RANGE)

    @property
    def parameters_text(self) -> str:
        """The A1111-style `parameters` text other SD tools read from a PNG."""
        text = self.prompt
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return text + (
            f"\nSteps: {self.steps}, Sampler: FlowMatchEuler, CFG scale: {self.guidance}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}"
        )


def _check_range(label: str, value: float, bounds: tuple[float, float]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidRequest(f"{label} {value} is out of range: use {bounds[0]} to {bounds[1]}.")


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
) -> GenerationResult:
    """Run `request` through `loaded`, timing it end to end and per transformer step.

    `on_step(done, total)` is called after each denoising step; `sampler` (a `GpuSampler`) is started and
    stopped around the call so that energy and temperature figures cover exactly this generation.
    Raises `OutOfMemory` (with memory freed) when the GPU runs out.
    """
    pipe, device = loaded.pipe, loaded.device
    cuda = device.type == "cuda"
    marks: dict[str, float] = {}

    def sync_time() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def first_step(*_):
        marks.setdefault("denoise_start", sync_time())

    def step_end(_pipe, index, _timestep, kwargs):
        marks["denoise_end"] = sync_time()
        if on_step:
            on_step(index + 1, request.steps)
        return kwargs

    hook = pipe.transformer.register_forward_pre_hook(first_step)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if sampler is not None:
        sampler.start()
    started = sync_time()
    try:
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.batch_size,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
            callback_on_step_end=step_end,
        )
    except torch.OutOfMemoryError as error:
        del error
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
    )
