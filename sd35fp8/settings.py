"""Every knob of the project, in one file: request limits, precisions, the app's settings, conversion constants.

* `LIMITS`: the allowed range of each generation setting, checked by `GenerationRequest` and shown by the UI.
* `PRECISIONS`: the precision names the loader, the app and the API accept.
* `AppSettings`: what `app.py` fills from its command line and the environment (queue size, ZeroGPU
  durations, memory headroom, time limits ...).
* Conversion constants: the prompts and sizes the converter verifies with, T5's FP8 block size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import torch

from .errors import BadInput

GIB = 2**30

def _require_numbers(settings, names: tuple[str, ...], *, whole: bool = False, zero_ok: bool = False) -> None:
    """BadInput naming the first of `settings`' fields `names` that is not a finite number > 0 (>= 0 with
    `zero_ok`; a whole number with `whole`)."""
    for name in names:
        value = getattr(settings, name)
        kinds = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
                or not (value >= 0 if zero_ok else value > 0):
            kind, bound = ("whole number" if whole else "number"), (">= 0" if zero_ok else "> 0")
            raise BadInput(f"{type(settings).__name__}.{name} must be a {kind} {bound}, not {value!r}.")


# ---------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Limits:
    """The allowed values of each generation setting."""

    size: tuple[int, int] = (64, 2048)
    size_multiple: int = 16
    steps: tuple[int, int] = (1, 100)
    guidance: tuple[float, float] = (0.0, 20.0)
    batch: tuple[int, int] = (1, 8)
    seed: tuple[int, int] = (0, 2**32 - 1)
    prompt_chars: int = 2000  # the text encoders read at most 77 + 256 tokens

    @property
    def max_seed(self) -> int:
        return self.seed[1]


LIMITS = Limits()


# -------------------------------------------------------------------------------------- precisions


@dataclass(frozen=True)
class Precision:
    """One precision a pipeline can run in."""

    name: str  # what the loader, the API and links take
    label: str  # what the page shows
    dtype: torch.dtype | None  # compute dtype; None: FP8 weights with 16-bit activations (bf16 unless asked)


PRECISIONS = {
    "fp8": Precision("fp8", "FP8", None),
    "bf16": Precision("bf16", "16-bit (BF16)", torch.bfloat16),
    "fp16": Precision("fp16", "16-bit (FP16)", torch.float16),
}
# Other spellings accepted from the API and from links; the app's 16-bit reference runs in bf16.
PRECISION_ALIASES = {"16-bit": "bf16", "16bit": "bf16"}


def parse_precision(value, allowed: list[str] | tuple[str, ...] | None = None) -> str:
    """The precision name `value` stands for (BadInput naming the setting if unknown or not `allowed`)."""
    key = str(value).strip().lower() if value is not None else ""
    key = PRECISION_ALIASES.get(key, key)
    choices = list(allowed) if allowed is not None else list(PRECISIONS)
    if key not in choices:
        raise BadInput(f"Precision {value!r} is not available: use {' or '.join(choices)}.")
    return key


# --------------------------------------------------------------------------------------------- app


@dataclass(frozen=True)
class AppSettings:
    """The app's settings; `from_environment` fills them from the environment (Spaces' variables)."""

    model: str = "shapes"  # FP8 variant (Hub id or folder), or a built-in model: "shapes" (trained), "tiny" (random)
    base: str | None = None  # 16-bit reference; None: the model card's base_model
    share: bool = False
    offload: bool = False
    compile: str = "auto"  # "auto" | "on" | "off"
    devices: str = "auto"  # "auto" (every GPU, one replica each) or a list such as "cuda:0,cuda:1"
    host: str = "127.0.0.1"
    port: int = 7860
    queue_max_size: int = 20  # requests waiting beyond this are told the queue is full
    job_timeout_s: float = 600.0  # a generation running longer is stopped at its next step
    zerogpu_margin_s: float = 30.0  # added to the measured time of a request when asking ZeroGPU for a GPU
    zerogpu_max_s: float = 300.0  # the longest GPU lease ZeroGPU grants one call
    zerogpu_startup_s: float = 900.0  # the start-up lease for compiling ahead of time (a guess, not measured)
    activation_headroom_bytes: int = 4 * GIB  # room kept for activations when placing both transformers
    gpu_history_s: float = 300.0  # how far back the GPU panel's plots go
    kept_images: int = 200  # result PNGs kept on disk for download
    max_upload_bytes: int = 1_000_000  # the app takes no uploads; anything larger is refused by gradio

    ENVIRONMENT = {  # field -> environment variables, first found wins
        "model": ("MODEL_ID",), "base": ("BASE_MODEL_ID",), "share": ("SHARE",), "offload": ("OFFLOAD",),
        "compile": ("COMPILE",), "devices": ("DEVICES",), "host": ("HOST", "GRADIO_SERVER_NAME"), "port": ("PORT", "GRADIO_SERVER_PORT"),
        "queue_max_size": ("QUEUE_MAX_SIZE",), "job_timeout_s": ("JOB_TIMEOUT_S",),
    }

    def __post_init__(self):
        if self.compile not in ("auto", "on", "off"):
            raise BadInput(f"COMPILE / --compile {self.compile!r}: use auto, on or off.")
        if not 0 < self.port < 65536:
            raise BadInput(f"PORT / --port {self.port}: use a port from 1 to 65535.")
        _require_numbers(self, ("queue_max_size", "job_timeout_s", "zerogpu_max_s", "kept_images"))

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None, **given) -> AppSettings:
        """Settings from `given` (command-line values), else the environment, else the defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for item in fields(cls):
            if item.name in given and given[item.name] is not None:
                values[item.name] = given[item.name]
                continue
            raw = next((environ[v] for v in cls.ENVIRONMENT.get(item.name, ()) if environ.get(v, "").strip()), None)
            if raw is not None:
                values[item.name] = _parse_env(item, raw.strip())
        return cls(**values)

    @property
    def on_zerogpu(self) -> bool:
        return bool(os.environ.get("SPACES_ZERO_GPU"))

    @property
    def zerogpu_ahead_of_time(self) -> bool:
        """Compile ahead of time at start-up on ZeroGPU (its requests keep no torch.compile code); COMPILE=off skips
        it, e.g. where AOTInductor packages fail to load (bench/NOTES.md: a segfault while loading on the H200)."""
        return self.on_zerogpu and self.compile != "off"


def _parse_env(item, raw: str):
    kind = type(item.default) if item.default is not None else str
    variable = AppSettings.ENVIRONMENT[item.name][0]
    if kind is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except ValueError:
        raise BadInput(f"{variable}={raw!r} is not a {kind.__name__}.") from None


# ------------------------------------------------------------------------------------- conversion

T5_BLOCK = (128, 128)  # transformers' fine-grained FP8 layout: one scale per 128x128 block of T5's weights
VERIFY_PROMPTS = (  # the prompts the converter's FP16-vs-FP8 image check uses (--verify-images)
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a red fox in a snowy forest",
    "a close-up portrait of an old fisherman, dramatic light",
    "a futuristic city skyline at night, neon reflections on wet streets",
)


@dataclass(frozen=True)
class ConversionSettings:
    """The converter's knobs (`python -m convert`)."""

    # The dtype the model card loads the fp8 variant with. transformers (5.23) leaves every 16-bit tensor of a
    # fine-grained-FP8 checkpoint in the dtype it was written in, whatever dtype is asked for, so the converter
    # writes T5's 16-bit tensors (embeddings, norms, `wo`) in this dtype.
    variant_dtype: torch.dtype = torch.bfloat16
    load_check_size: int = 64  # px; the final whole-pipeline check, rounded to a size the model takes
    load_check_steps: int = 2
    verify_size: int = 512  # px; default of --verify-images, rounded to a size the model takes
    verify_steps: int = 20
    max_verify_images: int = 16
    min_shard_bytes: int = 100_000  # --max-shard-size below this is refused ...
    max_shards: int = 1000  # ... and so is one that would split a component into more files than this

    def __post_init__(self):
        _require_numbers(self, ("load_check_size", "load_check_steps", "verify_size", "verify_steps",
                                "max_verify_images", "min_shard_bytes", "max_shards"), whole=True)


CONVERSION = ConversionSettings()


# ------------------------------------------------------------------------------------------ speed


def _default_compile_cache() -> str:
    return os.environ.get("SD35FP8_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sd35fp8", "compile")


@dataclass(frozen=True)
class SpeedSettings:
    """The FP8 speed pieces' knobs (`load_pipeline`, `generate`, `sd35fp8.zerogpu`).

    The per-step seconds are what ZeroGPU asks for before the first request has been measured: H200 figures
    (bench/results/gpu_h200_speed.json) at 1024x1024 with CFG, times `unmeasured_safety` for slower GPUs.
    """

    compile_cache_dir: str = field(default_factory=_default_compile_cache)  # env SD35FP8_COMPILE_CACHE
    prompt_cache_entries: int = 32  # LRU prompt embeddings kept (CPU memory)
    prompt_cache_bytes: int = 256 * 2**20  # ... and at most this many bytes (one SD3 prompt with CFG: ~5.5 MB)
    vae_tiling_above_pixels: int = 1024 * 1024  # decode in tiles above this many pixels
    # The 16 GB placement keeps as much of T5 on the GPU as the card leaves after the transformer, the VAE, the CLIP
    # encoders and this much room for activations, the VAE decode and the CUDA context; only the rest streams per
    # new prompt. Sized for a 16 GiB card, SD3.5 Large FP8 at 1024² with CFG peaked at 15.24 GB (H200, session 7)
    on_demand_headroom_bytes: int = 4 * GIB
    seconds_per_step_1024: float = 0.14  # one CFG step of SD3.5 Large FP8 at 1024² (H200 compiled ~0.09-0.11)
    unmeasured_safety: float = 2.0  # multiplies seconds_per_step_1024 until a request has been measured
    fixed_overhead_s: float = 3.0  # prompt encoding, VAE decode, transfers of one request
    size_exponent: float = 1.3  # step time grows about as pixels ** this (attention is quadratic in tokens)

    def __post_init__(self):
        _require_numbers(self, ("prompt_cache_entries", "prompt_cache_bytes", "vae_tiling_above_pixels",
                                "on_demand_headroom_bytes"),
                         whole=True, zero_ok=True)
        _require_numbers(self, ("seconds_per_step_1024", "unmeasured_safety", "fixed_overhead_s", "size_exponent"))


SPEED = SpeedSettings()
