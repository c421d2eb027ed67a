"""What the UI runs on: the FP8 pipeline and its 16-bit reference, sharing text encoders and VAE.

No gradio here: `Models` loads both precisions through the core loader, decides where the idle transformer
waits (GPU, or CPU when the GPU cannot hold both), and runs one generation at a time.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from dataclasses import dataclass

import torch

from sd35fp8.errors import error_summary
from sd35fp8.fp8 import FP8_PATH_LABELS
from sd35fp8.generate import GenerationResult, OutOfMemory, generate
from sd35fp8.hub import base_model_of
from sd35fp8.loading import (
    BUILT_IN, SHAPES, TINY, LoadedPipeline, LoadError, default_device, format_bytes, load_pipeline, load_transformer, module_bytes, with_transformer,
)
from sd35fp8.request import GenerationRequest
from sd35fp8.settings import LIMITS, AppSettings
from sd35fp8.speed import AUTO_COMPILE, describe_pieces
from sd35fp8.tiny import SHAPES_GUIDANCE, SHAPES_STEPS
from sd35fp8.zerogpu import gpu_duration, zerogpu_compile


@dataclass(frozen=True)
class Defaults:
    """Initial settings of the UI for a model."""

    width: int
    height: int
    steps: int
    guidance: float
    examples: tuple[str, ...] = (
        "a photo of an astronaut riding a horse",
        "a painting of a city at night with a red sky",
        "a portrait of a cat with green eyes",
        "a blue dog on the moon, photo",
    )


TINY_DEFAULTS = Defaults(width=128, height=128, steps=4, guidance=4.5)
SHAPES_DEFAULTS = Defaults(width=128, height=128, steps=SHAPES_STEPS, guidance=SHAPES_GUIDANCE, examples=(
    "a red circle on a blue background",
    "a large yellow triangle on a black background",
    "a small white circle on the left on a green background",
    "a blue square on the top on a yellow background",
    "an orange square on the right on a blue background",
    "a red circle and a yellow square on a black background",
))
SD35_DEFAULTS = Defaults(width=1024, height=1024, steps=28, guidance=4.5)
TURBO_DEFAULTS = Defaults(width=1024, height=1024, steps=4, guidance=0.0)

BUILT_IN_NOTICES = {
    SHAPES: (
        "**Built-in tiny model trained on synthetic shapes.** No model was given (`--model` / `MODEL_ID`), so the app "
        "runs a 10.8 M-parameter SD3 pipeline shipped with it, trained on rendered coloured shapes. It understands "
        "captions like “a red circle on a blue background” or “a small white circle on the left on a green "
        "background” (colours, sizes, positions, two objects) and draws about 19 in 20 unseen captions exactly as "
        "asked; shapes are where it still errs (circles and squares come out soft). Everything else "
        "(timings, FP8 vs 16-bit comparison, GPU panel, API) works as with a real model."
    ),
    TINY: (
        "**Built-in tiny model with random weights.** The app runs a tiny SD3-shaped pipeline built offline. Its "
        "images are noise by design. Everything else (timings, FP8 vs 16-bit comparison, GPU panel, API) works as "
        "with a real model."
    ),
}


def defaults_for(model: str, base: str | None = None) -> Defaults:
    """Small settings for the built-in models (fast on a CPU), SD3.5's own for real ones (Turbo: 4 steps, no CFG)."""
    if model == TINY:
        return TINY_DEFAULTS
    if model == SHAPES:
        return SHAPES_DEFAULTS
    if "turbo" in f"{model} {base or ''}".lower():
        return TURBO_DEFAULTS
    return SD35_DEFAULTS


def resolve_base(model: str, base: str | None) -> tuple[str | None, str]:
    """Where the 16-bit reference comes from, and a sentence saying how it was found."""
    if model in BUILT_IN and not base:
        return model, "the built-in model's own 16-bit weights"
    if base:
        return base, "given with --base / BASE_MODEL_ID"
    found, how = base_model_of(model)
    if found:
        return found, how
    return None, f"no --base given and {how}"


def max_image_size(loaded: LoadedPipeline) -> int:
    """The largest side the transformer's position embedding allows, capped at the request limit."""
    config = loaded.pipe.transformer.config
    pos = getattr(config, "pos_embed_max_size", None)
    if not pos:
        return LIMITS.size[1]
    return min(LIMITS.size[1], int(pos) * int(config.patch_size) * int(loaded.pipe.vae_scale_factor))


def _needs_swap(device: torch.device, transformer: torch.nn.Module, headroom_bytes: int) -> bool:
    """True when the GPU has no room for a second transformer beside the loaded pipeline."""
    if device.type != "cuda":
        return False
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except RuntimeError:  # e.g. ZeroGPU before a GPU is attached: assume the (large) GPU it will lend
        return False
    return free < module_bytes(transformer) + headroom_bytes


class Models:
    """The FP8 pipeline plus (when a base is known) a 16-bit one sharing its text encoders, tokenizers and VAE."""

    def __init__(self, fp8: LoadedPipeline, reference: LoadedPipeline | None = None, *,
                 base: str | None = None, base_note: str = "", swap: bool = False, offload: bool = False):
        self.fp8 = fp8
        self.reference = reference
        self.base = base
        self.base_note = base_note
        self.swap = swap
        self.offload = offload
        self.defaults = defaults_for(fp8.source, base)
        self.max_size = max_image_size(fp8)
        self._lock = threading.Lock()
        self._last: str | None = None

    @classmethod
    def load(cls, model: str = SHAPES, base: str | None = None, *, offload: bool = False,
             device: torch.device | str | None = None, compile: str = "auto",
             settings: AppSettings | None = None) -> Models:
        """Load `model` (an FP8 variant, or a built-in model: "shapes", "tiny") and its 16-bit reference transformer.

        A `base` passed explicitly must load; one found in the model card that fails to load only
        disables the comparison (the reason is kept in `base_note`). `compile` ("auto", "on", "off"):
        "auto" applies the fastest configuration measured (regional torch.compile with the compiled blocks kept on
        disk, `sd35fp8.speed.AUTO_COMPILE`, on CUDA GPUs; nothing on the CPU); on ZeroGPU, where torch.compile's
        code does not persist, call `compile_ahead_of_time()` inside a `@spaces.GPU` call instead. The other speed pieces take `load_pipeline`'s "auto".
        """
        settings = settings or AppSettings()
        device = torch.device(device) if device is not None else default_device()
        compile_option = {"auto": "auto", "on": AUTO_COMPILE, "off": False}[compile]
        if settings.on_zerogpu:
            compile_option = False
        fp8 = load_pipeline(model, "fp8", device=device, offload=offload, compile=compile_option)
        base_source, note = resolve_base(model, base)
        if base_source is None:
            return cls(fp8, None, base=None, base_note=note, offload=offload)
        started = time.perf_counter()
        try:
            transformer = load_transformer(base_source, "bf16", device=device)
        except LoadError as error:
            if base:
                raise
            return cls(fp8, None, base=None, base_note=f"the 16-bit reference {base_source} did not load: {error}",
                       offload=offload)
        swap = not offload and _needs_swap(fp8.device, transformer, settings.activation_headroom_bytes)
        # Build the reference with the transformer left on the CPU when it must wait there (swap, offload);
        # a transformer that moves between devices is not compiled.
        parked = offload or swap
        host = dataclasses.replace(fp8, device=torch.device("cpu")) if parked else fp8
        reference = with_transformer(host, transformer, "bf16", source=base_source,
                                     compile=False if parked else compile_option)
        reference = dataclasses.replace(reference, device=fp8.device, load_seconds=time.perf_counter() - started)
        return cls(fp8, reference, base=base_source, base_note=note, swap=swap, offload=offload)

    def compile_ahead_of_time(self, spaces_module=None) -> list[dict]:
        """ZeroGPU: compile both transformers ahead of time with `spaces` (call inside one `@spaces.GPU`). A
        transformer whose export or compilation fails keeps serving: its blocks not compiled run eagerly, and its
        report and `pieces["compile"]` say why."""
        reports = []
        for loaded in (self.fp8, self.reference):
            if loaded is None:
                continue
            try:
                reports.append(zerogpu_compile(loaded, spaces_module=spaces_module))
            except Exception as error:  # any refusal of export/AOTInductor: slower requests beat no Space
                reason = error_summary(error)
                loaded.pieces["compile"] = f"eager (ahead-of-time compile failed: {reason})"
                reports.append({"error": reason, "fallback": "eager"})
        return reports

    # ------------------------------------------------------------------------------------------ facts

    @property
    def built_in(self) -> str | None:
        """"shapes" or "tiny" for the built-in models, else None."""
        return self.fp8.source if self.fp8.source in BUILT_IN else None

    @property
    def precisions(self) -> list[str]:
        return ["fp8", "bf16"] if self.reference is not None else ["fp8"]

    @property
    def fp8_path_label(self) -> str:
        return FP8_PATH_LABELS.get(self.fp8.fp8_path or "", str(self.fp8.fp8_path))

    def placement(self) -> str:
        device = self.fp8.device
        if device.type != "cuda":
            return f"everything on the {device.type.upper()}"
        if self.offload:
            return "model CPU offload (components move to the GPU only while they run)"
        if self.swap:
            return "the idle transformer waits on the CPU (the GPU cannot hold both)"
        return "both transformers on the GPU"

    def summary_lines(self) -> list[str]:
        """Load time and memory per component, for the console and the page."""
        lines = [f"FP8 model: {self.fp8.label} on {self.fp8.device} ({self.placement()})",
                 f"FP8 compute path: {self.fp8.fp8_path} — {self.fp8_path_label}",
                 f"FP8 speed pieces: {describe_pieces(self.fp8.pieces)}",
                 f"FP8 pipeline loaded in {self.fp8.load_seconds:.1f} s"]
        for name, count in self.fp8.component_bytes.items():
            lines.append(f"  {name:<16} {format_bytes(count):>12}")
        lines.append(f"  {'total':<16} {format_bytes(sum(self.fp8.component_bytes.values())):>12}")
        if self.reference is not None:
            lines.append(f"16-bit reference: {self.base} ({self.base_note}), loaded in {self.reference.load_seconds:.1f} s")
            lines.append(f"16-bit speed pieces: {describe_pieces(self.reference.pieces)}")
            lines.append(f"  {'transformer':<16} {format_bytes(self.reference.component_bytes.get('transformer')):>12}"
                         "  (text encoders and VAE shared with the FP8 pipeline)")
        else:
            lines.append(f"16-bit reference: none ({self.base_note}); the comparison is off")
        return lines

    # -------------------------------------------------------------------------------------------- runs

    def pipeline(self, precision: str) -> LoadedPipeline:
        if precision == "fp8":
            return self.fp8
        if precision == "bf16" and self.reference is not None:
            return self.reference
        raise KeyError(precision)

    def _activate(self, precision: str) -> LoadedPipeline:
        target = self.pipeline(precision)
        if self._last == precision:
            return target
        try:
            if self.offload and target.device.type == "cuda":
                target.pipe.enable_model_cpu_offload(device=target.device)
            elif self.swap:
                other = self.reference if target is self.fp8 else self.fp8
                other.pipe.transformer.to("cpu")
                gc.collect()
                torch.cuda.empty_cache()
                target.pipe.transformer.to(target.device)
        except torch.OutOfMemoryError:
            self._last = None
            gc.collect()
            torch.cuda.empty_cache()
            raise OutOfMemory("The GPU ran out of memory while moving a transformer onto it; try again.") from None
        self._last = precision
        return target

    def run(self, precision: str, request: GenerationRequest, on_step=None, sampler=None,
            should_stop=None) -> GenerationResult:
        """One generation in `precision` ("fp8" or "bf16"); one at a time across threads."""
        with self._lock:
            loaded = self._activate(precision)
            return generate(loaded, request, on_step=on_step, sampler=sampler, should_stop=should_stop)

    def gpu_seconds(self, precisions: list[str], request: GenerationRequest, settings: AppSettings) -> int:
        """How long ZeroGPU must lend a GPU for `request` in each of `precisions` (sd35fp8.zerogpu.gpu_duration)."""
        return gpu_duration(request, [self.pipeline(p) for p in precisions],
                            margin_s=settings.zerogpu_margin_s, max_s=settings.zerogpu_max_s)
