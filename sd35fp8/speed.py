"""The speed pieces a transformer can run with, each with a switch, and the record of which ones ran.

`load_pipeline(...)` and `with_transformer(...)` take these options as keyword arguments (see `SpeedOptions`);
"auto" means the fastest configuration measured on that hardware (bench/results/gpu_h200_speed.json), and
every piece is off on the CPU unless asked for. `prepare_transformer` applies them in a fixed order: fused
projections -> GELU + quantization fusion -> the row quantization kernel -> attention backend -> adaLN +
quantization fusion -> fast accumulation -> compilation
(regional / precompiled / full / AOTInductor) -> CUDA graphs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from . import attention_kernel, kernels
from .blocks import fuse_norm_quantize, modulation_fused, norm_fused
from .attention import ATTENTION_BACKENDS, ATTENTION_LABELS, FALLBACKS, attention_of, cudnn_fp8_available, set_attention
from .compile import COMPILE_CHOICES, PRECOMPILE_AVAILABLE, CudaGraphTransformer, apply_aot_packages, \
    aot_compile_blocks, blocks_of, compile_transformer, configure_compile_cache, package_load_failure, \
    precompile_blocks
from .fp8 import FAST_ACCUM_PROBES, FP8_GEMM_MODES, fast_accum_layers, fp8_path_of, fuse_gelu_quantize, \
    fuse_projections, gelu_fused, probe_scaled_mm, projections_fused, row_kernel_layers, use_fast_accum, use_row_kernel
from .settings import SPEED

# What "auto" picks on a CUDA GPU, from the H200 measurements (bench/NOTES.md, gpu_h200_*.json). Attention of FP8
# transformers: the project's Triton FP8 kernel ("fp8_triton", its Q/K/V preparation in one more kernel) on the GPU
# family it was measured on, Hopper (SM 9.0): 94.95 / 95.76 vs 102.08 ms a Large step with 16-bit SDPA (two
# processes), 47.2 vs 45.0-61.6 ms for Medium (launch-bound there), step error 4.37% vs 4.30%. Elsewhere (Ada SM 8.9,
# Blackwell) it builds but is not measured, so 16-bit SDPA; a load-time check falls back to SDPA wherever the
# kernels disagree with torch. cuDNN's FP8 sdpa ("fp8_cudnn") was slower than its 16-bit kernel at head_dim 64
# (1.16 vs 1.01 ms at 2x38x4429x64) and is never chosen by "auto". 16-bit transformers keep SDPA.
AUTO_FP8_ATTENTION_CAPABILITIES = {(9, 0)}
# CUDA graphs of the whole step, where the transformer is compiled on CUDA and memory is not tight (no 16 GB
# placement, no offload): faster in every H200 comparison (same process): Large FP8 92.7 vs 95.0 ms with the FP8
# attention, 99.0 vs 102.1 with SDPA; Medium FP8 40.6 vs 47.2 and 43.5 vs 45.0-61.6 ms (its steps wait on Python
# launches; graphs also make them steady); Medium bf16 50.7 vs 52.6. Each new image size warms up once and captures
# one more graph (one shared memory pool); moving the transformer drops its graphs (`CudaGraphTransformer`).
AUTO_CUDA_GRAPHS = True
# FP8 GEMMs with fast accumulation (`fast_accum`, `torch._scaled_mm(use_fast_accum=True)`: no periodic promotion of the
# tensor cores' FP8 accumulator to float32; torchao's row-wise FP8 default) on CUDA: H200, SD3.5 Large, same process
# (random weights): 86.1 -> 81.2 ms a step, 2.57 -> 2.42 s an image, the GEMMs 39.7 -> 34.3 ms, step error 4.367% ->
# 4.363% vs bf16; a GEMM's error vs the float32 product of its E4M3 operands 0.17% -> 0.19-0.28% (bench/NOTES.md,
# session 17).
# The text encoders (`encoder_graphs`) are replayed from CUDA graphs for both precisions wherever they stay on the GPU:
# T5-XXL's eager call is host-bound (H200: ~25 ms of kernels in a 100-150 ms call, bench/NOTES.md, session 16).
TORCH_COMPILES = ("regional", "precompiled", "full")  # the compile choices that run torch.compile's code
# What compile="auto" runs on CUDA: regional compile with the compiled blocks saved to disk, where torch can save them.
# H200, SD3.5 Large FP8 default pieces (random weights): first image 15.1 s from a fresh cache (regional: 26.8 s),
# 4.0-4.4 s in a restarted process (regional from a warm cache: 13.5 s), 90.7-91.7 vs 91.9 ms a step; Medium: 2.9 s
# restarted, 39.5-39.8 vs 39.7 ms (bench/NOTES.md, session 13).
AUTO_COMPILE = "precompiled" if PRECOMPILE_AVAILABLE else "regional"


@dataclass(frozen=True)
class SpeedOptions:
    """Switches of the speed pieces. `True`/`"auto"`/`False` as documented per field."""

    fuse_projections: bool | str = "auto"  # concatenate q/k/v (and add_q/k/v) into one GEMM; auto: on CUDA
    fuse_gelu: bool | str = "auto"  # FP8 MLPs: GELU + activation quantization in one Triton kernel; auto: on CUDA
    fuse_norm: bool | str = "auto"  # FP8 blocks: adaLN (+ residual) + activation quantization in one kernel; auto: CUDA
    row_kernel: bool | str = "auto"  # FP8 attention outputs quantized in one Triton pass, read in place; auto: CUDA
    fuse_modulation: bool | str = "auto"  # with fuse_norm: a block's two adaLN projections in one GEMM; auto: CUDA
    fast_accum: bool | str = "auto"  # FP8 GEMMs in the tensor cores' accumulator, no float32 promotion; auto: CUDA
    attention: str = "auto"  # "sdpa" | "fp8_cudnn" | "fp8_triton" | "fp8_reference"; auto: fastest measured
    compile: bool | str = False  # False/"off" | True/"regional" | "precompiled" (regional, saved to disk) | "full" |
    # "aot" | "auto" (AUTO_COMPILE on CUDA)
    compile_mode: str | None = None  # inductor mode, e.g. "max-autotune-no-cudagraphs"
    compile_dynamic: bool = True  # symbolic token/batch dims: a new size or batch does not recompile
    compile_backend: str = "inductor"  # "eager" / "aot_eager" trace without generating kernels (tests, dry runs)
    compile_cache: str | bool | None = "auto"  # folder for inductor/Triton caches; auto: SPEED.compile_cache_dir
    cuda_graphs: bool | str = "auto"  # capture whole steps; auto: on CUDA when compiled and memory is not tight
    encoder_graphs: bool | str = "auto"  # text encoders replayed from CUDA graphs; auto: on CUDA unless memory is tight
    aot_dir: str | None = None  # AOTInductor packages (compile="aot"); None: under the compile cache
    compile_requested: bool | str | None = None  # what the caller passed for `compile` (set by `resolved`)

    def __post_init__(self):
        if self.attention != "auto" and self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention {self.attention!r}; choose auto or one of {', '.join(ATTENTION_BACKENDS)}")
        if self.compile not in (True, False, "auto") and self.compile not in COMPILE_CHOICES:
            raise ValueError(f"unknown compile {self.compile!r}; choose one of auto, {', '.join(COMPILE_CHOICES)}")

    def resolved(self, device: torch.device, fp8_weights: bool = False,
                 memory_tight: bool = False) -> SpeedOptions:
        """Every "auto" replaced by what it means on `device`, for an FP8 transformer if `fp8_weights`;
        `memory_tight`: the 16 GB placement or offload is in use (no CUDA graphs, whose pool keeps its memory)."""
        cuda = torch.device(device).type == "cuda"
        fuse = cuda if self.fuse_projections == "auto" else bool(self.fuse_projections)
        kernels_run = cuda and kernels.available()  # "auto" for each of `sd35fp8.kernels`' pieces
        fuse_gelu = kernels_run if self.fuse_gelu == "auto" else bool(self.fuse_gelu)
        fuse_norm = kernels_run if self.fuse_norm == "auto" else bool(self.fuse_norm)
        row_kernel = kernels_run if self.row_kernel == "auto" else bool(self.row_kernel)
        fuse_modulation = cuda if self.fuse_modulation == "auto" else bool(self.fuse_modulation)
        fast_accum = cuda if self.fast_accum == "auto" else bool(self.fast_accum)
        attention = self.attention
        if attention == "auto":
            measured = fp8_weights and cuda and \
                torch.cuda.get_device_capability(device) in AUTO_FP8_ATTENTION_CAPABILITIES
            attention = "fp8_triton" if measured and attention_kernel.available() else "sdpa"
        compile_choice = {True: "regional", False: "off", "auto": AUTO_COMPILE if cuda else "off"}.get(
            self.compile, self.compile)
        graphs = (cuda and AUTO_CUDA_GRAPHS and compile_choice in TORCH_COMPILES and not memory_tight) \
            if self.cuda_graphs == "auto" else bool(self.cuda_graphs) and cuda
        encoder_graphs = (cuda and not memory_tight) if self.encoder_graphs == "auto" else \
            bool(self.encoder_graphs) and cuda
        cache = self.compile_cache
        if cache == "auto" or cache is True:
            cache = SPEED.compile_cache_dir if compile_choice != "off" else None
        return replace(self, fuse_projections=fuse, fuse_gelu=fuse_gelu, fuse_norm=fuse_norm, row_kernel=row_kernel,
                       fuse_modulation=fuse_modulation, fast_accum=fast_accum, attention=attention,
                       compile=compile_choice, cuda_graphs=graphs, encoder_graphs=encoder_graphs,
                       compile_cache=cache or None,
                       compile_requested=self.compile)


def speed_options(speed: dict) -> SpeedOptions:
    """`SpeedOptions(**speed)`, refusing unknown names with the list of known ones."""
    known = {f.name for f in fields(SpeedOptions)} - {"compile_requested"}
    unknown = sorted(set(speed) - known)
    if unknown:
        raise TypeError(f"unknown speed option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return SpeedOptions(**speed)


# The modules whose code ends up inside compiled blocks: saved compiled functions and AOTInductor packages embed
# their kernels, so a new version of any of them must not load code compiled from the old one
_COMPILED_SOURCES = ("attention.py", "attention_kernel.py", "blocks.py", "fp8.py", "kernels.py")


@functools.cache
def _source_digest() -> str:
    folder = Path(__file__).parent
    return hashlib.sha256(b"".join((folder / name).read_bytes() for name in _COMPILED_SOURCES)).hexdigest()[:16]


def aot_fingerprint(transformer: torch.nn.Module, device: torch.device) -> str:
    """Folder name for compiled block code of this transformer (AOTInductor packages, precompiled functions): its
    config, the fusions and attention it runs, dtypes, FP8 modes, device, torch version and the source of the
    modules compiled into the blocks (`_COMPILED_SOURCES`)."""
    # (not diffusers' private keys: `_use_default_values` lists a set, in a different order in each process)
    config = {key: value for key, value in dict(getattr(transformer, "config", {})).items() if not key.startswith("_")}
    dtypes = sorted({str(p.dtype) for p in transformer.parameters()})
    capability = torch.cuda.get_device_capability(device) if torch.device(device).type == "cuda" else "cpu"
    text = json.dumps([config, dtypes, fp8_path_of(transformer), attention_of(transformer),
                       projections_fused(transformer), gelu_fused(transformer), norm_fused(transformer),
                       row_kernel_layers(transformer), modulation_fused(transformer), fast_accum_layers(transformer),
                       str(capability), torch.__version__, _source_digest()],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


KERNEL_LABELS = {"gelu": "GELU + quantization kernel", "norm": "adaLN + quantization kernels",
                 "rows": "row quantization kernel"}


def _kernel_piece(pieces: dict, transformer: torch.nn.Module, device: torch.device, kernel: str, wanted: bool,
                  fuse, count) -> None:
    """Rewire the transformer for one of `sd35fp8.kernels` if asked, unless the kernel fails its check on the
    device (then record why in pieces["fused_<kernel>_fallback"]); pieces["fused_<kernel>"] counts the rewired
    parts. The kernels run only in FP8-GEMM layers on CUDA: they are checked there (once per device) only."""
    runs = torch.device(device).type == "cuda" and fp8_path_of(transformer) in FP8_GEMM_MODES
    reason = kernels.check(device, kernel) if wanted and runs else None
    if reason is not None:
        pieces[f"fused_{kernel}_fallback"] = f"{KERNEL_LABELS[kernel]} unavailable ({reason}); separate kernels instead"
    elif wanted:
        fuse(transformer)
    pieces[f"fused_{kernel}"] = count(transformer)


def prepare_transformer(transformer: torch.nn.Module, device: torch.device, options: SpeedOptions,
                        run_once=None) -> dict:
    """Apply the (resolved) speed options to a transformer already on `device`; returns what ran.

    `run_once()` must run the pipeline once (one step at a representative size); only compile="aot" needs it, to
    capture the blocks' inputs for export.
    """
    pieces: dict[str, object] = {}
    started = time.perf_counter()
    if options.fuse_projections:
        fuse_projections(transformer)
    pieces["fused_projections"] = projections_fused(transformer)
    _kernel_piece(pieces, transformer, device, "gelu", options.fuse_gelu, fuse_gelu_quantize, gelu_fused)
    _kernel_piece(pieces, transformer, device, "rows", options.row_kernel, use_row_kernel, row_kernel_layers)
    backend = options.attention
    if backend == "fp8_cudnn":
        reason = cudnn_fp8_available()
        if reason is not None:
            pieces["attention_fallback"] = f"fp8_cudnn unavailable ({reason}); 16-bit sdpa instead"
            backend = "sdpa"
    if backend == "fp8_triton":
        reason = (attention_kernel.unavailable(device, transformer.config.attention_head_dim)
                  or attention_kernel.check(device))
        if reason is not None:
            pieces["attention_fallback"] = f"fp8_triton unavailable ({reason}); 16-bit sdpa instead"
            backend = "sdpa"
    if options.compile == "aot" and backend not in ("sdpa", "fp8_triton"):
        pieces["attention_fallback"] = f"{backend} is a Python custom op, which AOTInductor packages cannot call; sdpa"
        backend = "sdpa"
    set_attention(transformer, backend)
    pieces["attention"] = attention_of(transformer)
    _kernel_piece(pieces, transformer, device, "norm", options.fuse_norm,
                  lambda model: fuse_norm_quantize(model, modulation=options.fuse_modulation), norm_fused)
    pieces["fused_modulation"] = modulation_fused(transformer)
    path = fp8_path_of(transformer)
    if options.fast_accum and path in FP8_GEMM_MODES:
        probe = probe_scaled_mm(device)[FAST_ACCUM_PROBES[path]]
        if probe == "ok":
            use_fast_accum(transformer)
        else:
            pieces["fast_accum_fallback"] = f"fast accumulation {probe}; FP8 GEMMs with float32 promotion instead"
    pieces["fast_accum"] = fast_accum_layers(transformer)
    pieces["checks_s"] = round(time.perf_counter() - started, 2)  # the kernels' load-time checks, mostly
    cache = configure_compile_cache(options.compile_cache) if options.compile != "off" else {"cache_dir": None}
    pieces["compile_cache"] = cache
    if options.compile == "aot":
        if run_once is None:
            raise ValueError("compile='aot' needs run_once to capture the blocks' inputs")
        root = Path(options.aot_dir or Path(cache.get("cache_dir") or SPEED.compile_cache_dir) / "aot")
        folder = root / aot_fingerprint(transformer, device)
        built = {}
        if not any(folder.glob("*.pt2")):
            built = aot_compile_blocks(transformer, run_once, folder, dynamic=options.compile_dynamic)
        pieces["aot"] = {"folder": str(folder), "built": built, "loaded_from_disk": not built}
        failure = package_load_failure(sorted(folder.glob("*.pt2")))
        if failure is None:
            patched = apply_aot_packages(transformer, folder)
            pieces["compile"] = f"aot: {sum(patched.values())} blocks through {len(patched)} AOTInductor packages"
        else:  # regional torch.compile below: the same kernels, compiled in this process
            pieces["compile_fallback"] = f"AOTInductor packages do not load here ({failure}); regional compile instead"
            options = replace(options, compile="regional")
    if options.compile == "precompiled":
        if PRECOMPILE_AVAILABLE:
            loading = time.perf_counter()
            root = Path(cache.get("cache_dir") or SPEED.compile_cache_dir) / "precompiled"
            mode = None if options.compile_mode in (None, "default") else options.compile_mode
            name = f"{aot_fingerprint(transformer, device)}-{options.compile_backend}" + (f"-{mode}" if mode else "")
            folder = root / name
            kinds = precompile_blocks(transformer, folder, options.compile_backend, mode)
            loaded = sum(kind.loaded for kind in kinds.values())
            pieces["precompiled"] = {"folder": str(folder), "loaded": {name: k.loaded for name, k in kinds.items()},
                                     "load_s": round(time.perf_counter() - loading, 2),
                                     "unreadable": [f for k in kinds.values() for f in k.failures]}
            pieces["compile"] = (f"precompiled: {len(blocks_of(transformer))} blocks, {len(kinds)} kinds, "
                                 f"{loaded} saved functions loaded" + ("" if loaded else ", compiles and saves them"))
        else:
            pieces["compile_fallback"] = f"torch {torch.__version__} cannot save compiled functions; regional compile"
            options = replace(options, compile="regional")
    if options.compile in ("regional", "full"):
        pieces["compile"] = compile_transformer(transformer, options.compile, mode=options.compile_mode,
                                                dynamic=options.compile_dynamic, backend=options.compile_backend)
    elif options.compile == "off":
        pieces["compile"] = "off"
    pieces["cuda_graphs"] = False
    if options.cuda_graphs:
        CudaGraphTransformer.install(transformer)
        pieces["cuda_graphs"] = True
    return pieces


def describe_pieces(pieces: dict) -> str:
    """One line for the app: which speed pieces this pipeline runs."""
    parts = []
    if pieces.get("fp8_path"):
        parts.append(f"FP8 {pieces['fp8_path']}")
    if pieces.get("fused_projections"):
        parts.append(f"fused q/k/v in {pieces['fused_projections']} attentions")
    if pieces.get("fused_gelu"):
        parts.append(f"GELU + FP8 quantization in one kernel in {pieces['fused_gelu']} MLPs")
    if pieces.get("fused_norm"):
        parts.append(f"adaLN + FP8 quantization in one kernel in {pieces['fused_norm']} blocks")
    if pieces.get("fused_modulation"):
        parts.append(f"both adaLN projections in one GEMM in {pieces['fused_modulation']} blocks")
    if pieces.get("fused_rows"):
        parts.append(f"attention outputs quantized in one pass in {pieces['fused_rows']} layers")
    if pieces.get("fast_accum"):
        parts.append(f"FP8 GEMMs accumulated in the tensor cores (fast accumulation) in {pieces['fast_accum']} layers")
    if pieces.get("attention"):
        parts.append(ATTENTION_LABELS.get(pieces["attention"], str(pieces["attention"])))
    if pieces.get("compile") and pieces["compile"] != "off":
        cache = pieces.get("compile_cache") or {}
        parts.append(f"torch.compile {pieces['compile']}" + (" (warm cache)" if cache.get("warm") else ""))
    if pieces.get("cuda_graphs"):
        parts.append("CUDA graphs")
    if pieces.get("text_encoders") and pieces["text_encoders"] != "gpu":
        parts.append(str(pieces["text_encoders"]))
    if pieces.get("encoder_graphs"):
        parts.append(f"{pieces['encoder_graphs']} text encoders replayed from CUDA graphs")
    if pieces.get("text_encoder_fp8"):
        parts.append(str(pieces["text_encoder_fp8"]))
    if pieces.get("prompt_cache"):
        parts.append(f"prompt cache ({pieces['prompt_cache']})")
    if FALLBACKS:
        parts.append(f"FP8 attention fell back on {len(FALLBACKS)} shape(s)")
    return " · ".join(parts) if parts else "no speed pieces"
