"""The one loader: every caller (app, converter's verification, tests, benchmarks) goes through here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from .fp8 import FP8_PATHS, apply_block_fp8, apply_fp8_path, fp8_path_of, keep_fp8_config, quanto_quantize, select_fp8_path
from .errors import BadInput
from .settings import PRECISIONS
from .tiny import TINY_MODEL_NAME, build_tiny_pipeline

TINY = "tiny"
VARIANT = "fp8"


class LoadError(BadInput):
    """A model could not be loaded, or loaded incompletely; the message says what to do."""


@dataclass
class LoadedPipeline:
    """A pipeline plus what the app and benchmarks report about it."""

    pipe: StableDiffusion3Pipeline
    source: str
    precision: str
    device: torch.device
    fp8_path: str | None
    load_seconds: float
    component_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return TINY_MODEL_NAME if self.source == TINY else self.source


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers as stored (FP8 data counts one byte an element)."""
    seen, total = set(), 0
    for tensor in module.state_dict().values():
        key = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def format_bytes(size: int | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the Hub shows file sizes); None -> 'n/a'."""
    if size is None:
        return "n/a"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= factor:
            return f"{size / factor:,.2f} GB" if unit == "GB" else f"{size / factor:,.1f} {unit}"
    return f"{size} B"


def component_bytes(pipe: StableDiffusion3Pipeline) -> dict[str, int]:
    return {name: module_bytes(c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def check_loaded(pipe: StableDiffusion3Pipeline) -> None:
    """Raise LoadError if any weight was left on the `meta` device (the sign of a mismatched checkpoint)."""
    missing = [
        f"{name}.{tensor_name}"
        for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)
        for tensor_name, tensor in component.state_dict().items() if tensor.device.type == "meta"
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoadError(f"weights were not loaded (left on 'meta'): {shown}. The checkpoint does not match its config.")


def _fp8_text_encoders(source: str, index: dict, dtype: torch.dtype, revision: str | None) -> dict:
    """The pipeline's fine-grained-FP8 transformers components, loaded as FP8 and computing with `Fp8BlockLinear`.

    Their configs say `dequantize: true` so that stock transformers works everywhere; on a GPU we keep
    them FP8 instead (half the memory). On a CPU transformers always dequantizes, so this is GPU-only.
    """
    import transformers

    encoders = {}
    for name, value in index.items():
        if not (isinstance(value, list) and value[0] == "transformers" and name.startswith("text_encoder")):
            continue
        config = transformers.AutoConfig.from_pretrained(source, subfolder=name, revision=revision)
        stored = getattr(config, "quantization_config", None) or {}
        stored = stored if isinstance(stored, dict) else stored.to_dict()
        if stored.get("quant_method") != "fp8":
            continue
        model = getattr(transformers, value[1]).from_pretrained(
            source, subfolder=name, variant=VARIANT, dtype=dtype, revision=revision, quantization_config=keep_fp8_config(stored)
        )
        apply_block_fp8(model)
        encoders[name] = model.eval()
    return encoders


def _from_pretrained(source: str, precision: str, dtype: torch.dtype, revision: str | None,
                     device: torch.device) -> StableDiffusion3Pipeline:
    variant = VARIANT if precision == "fp8" else None
    try:
        index = StableDiffusion3Pipeline.load_config(source, revision=revision)
        given = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
        if variant and device.type == "cuda":
            given |= _fp8_text_encoders(source, index, dtype, revision)
        return StableDiffusion3Pipeline.from_pretrained(source, variant=variant, dtype=dtype, revision=revision, **given)
    except (OSError, ValueError) as error:
        hint = f" Make an FP8 variant with `python -m convert {source} --out DIR`." if variant and "variant" in str(error) else ""
        raise LoadError(f"could not load an SD3 pipeline from {source!r}: {error}{hint}") from error


def load_pipeline(
    source: str = TINY,
    precision: str = "fp8",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    fp8_path: str = "auto",
    revision: str | None = None,
    offload: bool = False,
    compile: bool = False,
) -> LoadedPipeline:
    """Load an SD3 pipeline in `precision` ("fp8", "bf16", "fp16") from a Hub id, a folder, or "tiny".

    "fp8" loads the `fp8` variant written by `python -m convert` (for "tiny", quantizes in memory) and
    runs its transformer on `fp8_path`: "auto" picks FP8 tensor cores where the GPU has them and
    per-layer dequantization elsewhere. `compile` wraps the transformer in torch.compile (the fastest
    configuration measured on an H100; the first generation at each size pays the compilation).
    Every load is checked: no weight may be left on `meta`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if fp8_path != "auto" and fp8_path not in FP8_PATHS:
        raise ValueError(f"unknown FP8 path {fp8_path!r}; choose auto or one of {', '.join(FP8_PATHS)}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or PRECISIONS[precision].dtype or torch.bfloat16
    started = time.perf_counter()
    if source == TINY:
        pipe = build_tiny_pipeline(dtype=dtype)
        if precision == "fp8":
            quanto_quantize(pipe.transformer)
    else:
        pipe = _from_pretrained(source, precision, dtype, revision, device)
    check_loaded(pipe)
    path = None
    if precision == "fp8":
        if fp8_path_of(pipe.transformer) is None:
            raise LoadError(f"{source!r} has no FP8 transformer: make one with `python -m convert {source} --out DIR`.")
        path = select_fp8_path(device) if fp8_path == "auto" else fp8_path
        apply_fp8_path(pipe.transformer, path)  # before placing: on CUDA quanto would repack its weights
    pipe = _place(pipe, device, offload)
    if compile:
        pipe.transformer.compile()
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe, source, precision, device, path, time.perf_counter() - started, component_bytes(pipe))


def _place(pipe: StableDiffusion3Pipeline, device: torch.device, offload: bool) -> StableDiffusion3Pipeline:
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def load_transformer(source: str, precision: str, *, dtype: torch.dtype | None = None,
                     revision: str | None = None) -> SD3Transformer2DModel:
    """Load only the transformer of `source` in a 16-bit precision (the reference for a comparison)."""
    dtype = dtype or PRECISIONS[precision].dtype
    if source == TINY:
        return build_tiny_pipeline(dtype=dtype).transformer
    try:
        return SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", dtype=dtype, revision=revision)
    except (OSError, ValueError) as error:
        raise LoadError(f"could not load the transformer of {source!r}: {error}") from error


def with_transformer(loaded: LoadedPipeline, transformer: SD3Transformer2DModel, precision: str,
                     source: str | None = None) -> LoadedPipeline:
    """A second pipeline that shares `loaded`'s text encoders, tokenizers, VAE and scheduler config."""
    started = time.perf_counter()
    scheduler = loaded.pipe.scheduler.__class__.from_config(loaded.pipe.scheduler.config)
    components = dict(loaded.pipe.components, transformer=transformer.to(loaded.device), scheduler=scheduler)
    pipe = StableDiffusion3Pipeline(**components)
    check_loaded(pipe)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe, source or loaded.source, precision, loaded.device, fp8_path_of(transformer),
                          time.perf_counter() - started, component_bytes(pipe))
