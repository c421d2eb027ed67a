"""The one loader: every caller (app, converter's verification, tests, benchmarks) goes through here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from .compile import CudaGraphEncoder
from .errors import BadInput
from .fp8 import (FP8_PATHS, apply_block_fp8, apply_fp8_path, describe_block_fp8, fp8_path_of, keep_fp8_config,
                  probe_scaled_mm, quantize_linears, select_fp8_path)
from .prompts import OnDemandEncoders, PromptCache, text_encoders_of
from .settings import PRECISIONS, SPEED
from .speed import prepare_transformer, speed_options
from .tiny import SHAPES_DIR, SHAPES_MODEL_NAME, TINY_MODEL_NAME, build_tiny_pipeline, load_shapes_pipeline

TINY = "tiny"  # the random tiny pipeline the tests use
SHAPES = "shapes"  # the trained tiny-shapes pipeline shipped in the package: the app's default
BUILT_IN = {TINY: TINY_MODEL_NAME, SHAPES: SHAPES_MODEL_NAME}
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
    pieces: dict[str, object] = field(default_factory=dict)  # which speed pieces ran (sd35fp8.speed.describe_pieces)
    prompt_cache: object | None = None  # sd35fp8.prompts.PromptCache, shared with pipelines made by with_transformer
    encoders: object | None = None  # sd35fp8.prompts.OnDemandEncoders when text encoders live in CPU memory
    step_seconds: dict[tuple[int, int, int], float] = field(default_factory=dict)  # (w, h, batch) -> measured s/step
    offload: bool = False  # accelerate's model CPU offload

    @property
    def memory_tight(self) -> bool:
        return is_memory_tight(self.offload, self.encoders)

    @property
    def label(self) -> str:
        if not isinstance(self.source, str):
            return "in-memory"
        return BUILT_IN.get(self.source, self.source)


def is_memory_tight(offload: bool, encoders: object | None) -> bool:
    """The 16 GB placement (`encoders` in CPU memory) or model CPU offload is in use ("auto" then captures no
    CUDA graphs, whose pool keeps its memory)."""
    return offload or encoders is not None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers as stored (FP8 data counts one byte an element)."""
    seen, total = set(), 0
    for tensor in module.state_dict().values():
        try:
            key = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else id(tensor)
        except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses (torchao) have no plain storage
            key = id(tensor)
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
    them FP8 instead (half the memory). Where transformers dequantizes regardless (CPU, GPUs below SM 8.9),
    it leaves the checkpoint's 16-bit tensors in the dtype they were written in; they are matched to `dtype`
    here (modules the model keeps in float32 for float16 aside), so the result computes in `dtype` anywhere.
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
        keep_fp32 = (dtype == torch.float16 and model._keep_in_fp32_modules) or []
        for module_name, module in model.named_modules():
            target = torch.float32 if any(part in keep_fp32 for part in module_name.split(".")) else dtype
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.element_size() > 1 and param.dtype != target:
                    param.data = param.data.to(target)
        encoders[name] = model.eval()
    return encoders


def _from_pretrained(source: str, precision: str, dtype: torch.dtype, revision: str | None,
                     device: torch.device) -> StableDiffusion3Pipeline:
    variant = VARIANT if precision == "fp8" else None
    try:
        index = StableDiffusion3Pipeline.load_config(source, revision=revision)
        given = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
        if variant:  # FP8 on GPUs that keep it; on any device, T5's leftover 16-bit tensors in `dtype`
            given |= _fp8_text_encoders(source, index, dtype, revision)
        return StableDiffusion3Pipeline.from_pretrained(source, variant=variant, dtype=dtype, revision=revision, **given)
    except (OSError, ValueError) as error:
        hint = f" Make an FP8 variant with `python -m convert {source} --out DIR`." if variant and "variant" in str(error) else ""
        raise LoadError(f"could not load an SD3 pipeline from {source!r}: {error}{hint}") from error


def load_pipeline(
    source: str | StableDiffusion3Pipeline = TINY,
    precision: str = "fp8",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    fp8_path: str = "auto",
    revision: str | None = None,
    offload: bool = False,
    text_encoders: str = "auto",
    prompt_cache: bool | object = True,
    **speed,
) -> LoadedPipeline:
    """Load an SD3 pipeline in `precision` ("fp8", "bf16", "fp16") from a Hub id, a folder, "tiny", or a
    `StableDiffusion3Pipeline` object (in memory; for "fp8" its 16-bit transformer is quantized exactly as
    `python -m convert` would, and on a GPU its T5 too). It computes in `dtype`, by default `compute_dtype`: bf16
    (fp16 for "fp16"), float32 on a CPU without native bf16.

    "fp8" loads the `fp8` variant written by `python -m convert` (for "tiny", quantizes in memory) and runs its
    transformer on `fp8_path`: "auto" probes the GPU once (`probe_scaled_mm`) and picks row-wise FP8 tensor
    cores, else tensor-wise ones, else per-layer dequantization (always on the CPU).

    Speed pieces: `speed` takes the fields of `sd35fp8.speed.SpeedOptions` as keywords (fuse_projections, attention,
    compile, cuda_graphs, fast_accum, ...; each documented there). Each can be switched off; "auto" = fastest
    measured on this hardware, off on the CPU. `compile` is off unless asked for; the first generation at each new kind of input pays the
    compilation, a new size does not; with compile="precompiled" (what "auto" picks on CUDA) the compiled blocks are
    saved, and a later process loads them instead of compiling.
    Placement: `offload` (accelerate's model CPU offload, for 12 GB cards), `text_encoders` ("gpu", "on_demand":
    the CLIP encoders on the GPU, T5 in pinned CPU memory streamed to the GPU block by block while it encodes;
    "auto": on demand on GPUs of 24 GB or less).
    `prompt_cache`: True for a new LRU cache of prompt embeddings, a `PromptCache` to share one, False for none.
    `LoadedPipeline.pieces` records which pieces ran. Every load is checked: no weight may be left on `meta`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if fp8_path != "auto" and fp8_path not in FP8_PATHS:
        raise ValueError(f"unknown FP8 path {fp8_path!r}; choose auto or one of {', '.join(FP8_PATHS)}")
    if text_encoders not in ("auto", "gpu", "on_demand"):
        raise ValueError(f"unknown text_encoders {text_encoders!r}; choose auto, gpu or on_demand")
    options = speed_options(speed)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype(precision, device)
    started = time.perf_counter()
    in_memory = isinstance(source, StableDiffusion3Pipeline) or source == SHAPES
    if isinstance(source, StableDiffusion3Pipeline):
        pipe = source
    elif source == SHAPES:
        if not (SHAPES_DIR / "model_index.json").is_file():
            raise LoadError(f"the built-in tiny-shapes model is not installed here ({SHAPES_DIR} is missing): "
                            "pass --model (MODEL_ID) with an FP8 repo or folder, or --model tiny.")
        pipe = load_shapes_pipeline(dtype)
    elif source == TINY:
        pipe = build_tiny_pipeline(dtype=dtype)
    else:
        pipe = _from_pretrained(source, precision, dtype, revision, device)
    check_loaded(pipe)
    seconds: dict[str, float] = {}  # where the load's time went (pieces["load_seconds"])

    def lap(name: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 2)

    lap("weights")
    path, probe = None, None
    if precision == "fp8":
        if device.type == "cuda" and fp8_path == "auto":
            probe = probe_scaled_mm(device)
        path = select_fp8_path(device) if fp8_path == "auto" else fp8_path
        if (in_memory or source == TINY) and fp8_path_of(pipe.transformer) is None:
            quantize_linears(pipe.transformer, "dequant" if path == "quanto" else path)  # what convert writes
            if in_memory and device.type == "cuda":
                _quantize_text_encoders_like_convert(pipe)
        if fp8_path_of(pipe.transformer) is None:
            raise LoadError(f"{source!r} has no FP8 transformer: make one with `python -m convert {source} --out DIR`.")
        apply_fp8_path(pipe.transformer, path)  # before placing: on CUDA quanto would repack its weights
    lap("fp8")
    placement = _resolve_text_encoders(text_encoders, device, offload)
    encoders = None
    if placement == "on_demand":
        encoders = OnDemandEncoders(pipe, device, keep_bytes=on_demand_keep_bytes(pipe, device))
        pipe = _place(pipe, device, offload, skip=("text_encoder", "text_encoder_2", "text_encoder_3"))
    else:
        pipe = _place(pipe, device, offload)
    pipe.set_progress_bar_config(disable=True)
    cache = prompt_cache if isinstance(prompt_cache, PromptCache) else (
        PromptCache(SPEED.prompt_cache_entries, SPEED.prompt_cache_bytes) if prompt_cache else None)
    pieces = {"fp8_path": path, "fp8_probe": probe}
    options = options.resolved(device, fp8_weights=precision == "fp8", memory_tight=is_memory_tight(offload, encoders))
    pieces["encoder_graphs"] = graph_encoders(pipe) if options.encoder_graphs else 0
    lap("placement")
    pieces |= prepare_transformer(pipe.transformer, device, options, run_once=warmup_call(pipe))
    lap("speed_pieces")
    pieces["load_seconds"] = seconds
    pieces["text_encoders"] = encoders.describe() if encoders else ("model CPU offload" if offload else "gpu")
    pieces["text_encoder_fp8"] = describe_block_fp8(list(text_encoders_of(pipe).values()), device)
    pieces["prompt_cache"] = cache.describe() if cache is not None else None
    pieces["vae_tiling_above_pixels"] = SPEED.vae_tiling_above_pixels
    return LoadedPipeline(pipe, source if isinstance(source, str) else "in-memory", precision, device, path,
                          time.perf_counter() - started, component_bytes(pipe), pieces, cache, encoders,
                          offload=offload)


def graph_encoders(pipe: StableDiffusion3Pipeline) -> int:
    """Replay the pipeline's text encoders from CUDA graphs (`CudaGraphEncoder`; once per encoder, which pipelines of
    both precisions share); returns how many run that way."""
    encoders = text_encoders_of(pipe).values()
    for encoder in encoders:
        if CudaGraphEncoder.installed(encoder) is None:
            CudaGraphEncoder.install(encoder)
    return len(encoders)


def on_demand_keep_bytes(pipe: StableDiffusion3Pipeline, device: torch.device, budget_bytes: int | None = None) -> int:
    """How many bytes of T5 the 16 GB placement keeps on the GPU: what `budget_bytes` (default: the device's memory)
    leaves after the transformer, the VAE, the CLIP encoders and `SPEED.on_demand_headroom_bytes` for activations."""
    if budget_bytes is None:
        if device.type != "cuda":
            return 0
        budget_bytes = torch.cuda.get_device_properties(device).total_memory
    placed = sum(module_bytes(part) for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
                 if part is not None)
    return max(0, budget_bytes - placed - SPEED.on_demand_headroom_bytes)


def _resolve_text_encoders(choice: str, device: torch.device, offload: bool) -> str:
    if device.type != "cuda" or offload:
        return "gpu"
    if choice == "auto":
        return "on_demand" if torch.cuda.get_device_properties(device).total_memory <= 24 * 2**30 else "gpu"
    return choice


def _quantize_text_encoders_like_convert(pipe: StableDiffusion3Pipeline) -> None:
    """T5 in FP8 blocks, the layers `convert` writes (transformers' rule keeps `_keep_in_fp32_modules` 16-bit)."""
    from .fp8 import block_quantize_linears

    t5 = getattr(pipe, "text_encoder_3", None)
    if t5 is None:
        return
    keep = set(getattr(t5, "_keep_in_fp32_modules", None) or [])
    names = [name for name, module in t5.named_modules()
             if isinstance(module, torch.nn.Linear) and not (set(name.split(".")) & keep)]
    block_quantize_linears(t5, names)


def warmup_size(pipe: StableDiffusion3Pipeline) -> int:
    """A representative image side for compiling: 1024 px, 64 px for tiny models."""
    return 1024 if pipe.transformer.config.sample_size >= 64 else 64


def warmup_call(pipe: StableDiffusion3Pipeline, size: int | None = None):
    """A function running one denoising step at `size` (default `warmup_size`), to capture inputs for AOT."""
    size = size or warmup_size(pipe)

    def run():
        pipe(prompt="warm-up", num_inference_steps=1, guidance_scale=4.5, width=size, height=size,
             output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
    return run


def _place(pipe: StableDiffusion3Pipeline, device: torch.device, offload: bool,
           skip: tuple[str, ...] = ()) -> StableDiffusion3Pipeline:
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    if not skip:
        return pipe.to(device)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in skip:
            component.to(device)
    return pipe


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); without them torch emulates bf16 arithmetic."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype a `precision` pipeline computes in on `device`: its own (bf16 for FP8 weights), but float32 on a CPU
    without native bf16, where bf16 arithmetic is emulated (the built-in model, 4 steps at 128²: 26.7 s in bf16, 1.1 s
    in float32 on a 2-core AMD EPYC). The weights keep their values: bf16 and FP8 both convert exactly to float32."""
    dtype = PRECISIONS[precision].dtype or torch.bfloat16
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return torch.float32
    return dtype


def load_transformer(source: str, precision: str, *, dtype: torch.dtype | None = None,
                     revision: str | None = None, device: torch.device | str | None = None) -> SD3Transformer2DModel:
    """Load only the transformer of `source` in a 16-bit precision (the reference for a comparison), in the dtype it
    computes in on `device` (default: as `load_pipeline`'s) unless `dtype` is given (`compute_dtype`)."""
    dtype = dtype or compute_dtype(precision, device if device is not None else default_device())
    if source == TINY:
        return build_tiny_pipeline(dtype=dtype).transformer
    try:
        return SD3Transformer2DModel.from_pretrained(SHAPES_DIR if source == SHAPES else source, subfolder="transformer",
                                                     dtype=dtype, revision=revision).eval()
    except (OSError, ValueError) as error:
        raise LoadError(f"could not load the transformer of {source!r}: {error}") from error


def with_transformer(loaded: LoadedPipeline, transformer: SD3Transformer2DModel, precision: str,
                     source: str | None = None, **speed) -> LoadedPipeline:
    """A second pipeline that shares `loaded`'s text encoders (and their placement), tokenizers, VAE, prompt cache
    and scheduler config. `speed` takes `load_pipeline`'s speed options (the fields of `SpeedOptions`) for the new
    transformer; the same "auto" defaults apply."""
    started = time.perf_counter()
    scheduler = loaded.pipe.scheduler.__class__.from_config(loaded.pipe.scheduler.config)
    components = dict(loaded.pipe.components, transformer=transformer.to(loaded.device), scheduler=scheduler)
    pipe = StableDiffusion3Pipeline(**components)
    check_loaded(pipe)
    pipe.set_progress_bar_config(disable=True)
    options = speed_options(speed).resolved(loaded.device, fp8_weights=precision == "fp8",
                                            memory_tight=loaded.memory_tight)
    pieces = {"fp8_path": fp8_path_of(transformer), "fp8_probe": None}
    pieces |= prepare_transformer(transformer, loaded.device, options,
                                  run_once=warmup_call(pipe))
    for key in ("text_encoders", "text_encoder_fp8", "encoder_graphs", "prompt_cache", "vae_tiling_above_pixels"):
        pieces[key] = loaded.pieces.get(key)
    return LoadedPipeline(pipe, source or loaded.source, precision, loaded.device, fp8_path_of(transformer),
                          time.perf_counter() - started, component_bytes(pipe), pieces, loaded.prompt_cache,
                          loaded.encoders, offload=loaded.offload)
