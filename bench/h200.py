"""H200 benchmark of the FP8 speed pieces (issues 10 and 11), full-size SD3.5 Large / Medium with RANDOM weights.

Every configuration goes through the project's own path: `sd35fp8.loading.load_pipeline(pipeline_object, ...)`
with its speed options, then `sd35fp8.generate.generate`. The pipelines are built in memory from the published
configs (bench/configs/) with the libraries' random init, on the GPU; for "fp8", `load_pipeline` quantizes the
16-bit transformer and T5 in memory with the converter's arithmetic (`Fp8Linear.from_linear` is bit-identical
to quanto's qfloat8 that `python -m convert` writes, tests/test_fp8_speed.py), so no checkpoint is written.

Writes, as it goes, under --out: gpu_h200_speed.json (issue 10 rows), gpu_h200_everywhere.json (issue 11 rows),
gpu_h200_checks.json (environment, attention micro-benchmark, kernel profiles), inductor_fp8_kernels.txt (the
generated kernels that write FP8, to check what the activation quantization fused into).

    python -m bench.h200 --out /tmp/h200 --deadline-s 540                       # on the H200
    python -m bench.h200 --tiny --out /tmp/h200-tiny                            # CPU dry run, tiny shapes
    python -m bench.h200 --plan large:bf16_eager,fp8_best --out ...            # a subset

Configurations (priority order of the default plan; each is skipped if the deadline would not allow it):
see PLANS and CONFIGS below. On the H200, compiling torchao's model (regional, dynamic shapes) and the forced
tensor-wise FP8 path did not finish within 250-350 s and took the rest of the run with them, so those run in child
processes (`*_child`) with a timeout; run the default plan in two or three calls of <= 9 minutes each.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.runner import (RANDOM_WEIGHTS_NOTE, Deadline, Rows, Stages, cuda_graph_ms, cuda_median_ms, environment, gb,
                          log, print_table, rounded, write_json)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "bench" / "configs"
MODEL_DIRS = {"large": "sd35_large", "medium": "sd35_medium"}
PROMPT = "a photo of an astronaut riding a horse on the moon"
SECOND_SIZE = (768, 1344)  # width, height: another size the app allows


@dataclass(frozen=True)
class Config:
    name: str
    precision: str  # "bf16" | "fp8"
    options: dict = field(default_factory=dict)  # load_pipeline keyword options
    peer: bool = False  # torchao
    issue: str = "speed"  # "speed" -> gpu_h200_speed.json, "everywhere" -> gpu_h200_everywhere.json, "both"
    estimate: dict = field(default_factory=dict)  # model -> seconds
    extra: tuple[str, ...] = ()  # "second_size", "profile", "kernels", "warm_child", "cudagraphs", "repeat_prompt"

    @property
    def compiled(self) -> bool:
        return self.options.get("compile", False) not in (False, "off")


# Each configuration says whether it captures CUDA graphs ("auto" would for every compiled one)
FUSED = dict(fuse_projections=True, attention="sdpa", cuda_graphs=False)
REGIONAL = dict(compile="regional", cuda_graphs=False)
# torchao's model compiled the way its README shows (static shapes): with dynamic token/batch dims the compilation
# did not finish on the H200 within 340 s (bench/NOTES.md)
TORCHAO_COMPILE = dict(fuse_projections=False, fuse_gelu=False, fuse_norm=False, attention="sdpa", compile_dynamic=False,
                       **REGIONAL)
# the app's default on Hopper (fp8_triton_cudagraphs): fused q/k/v, the FP8 attention kernel, CUDA graphs
DEFAULT_FP8 = dict(REGIONAL, fuse_projections=True, attention="fp8_triton", cuda_graphs=True)
CONFIGS = {c.name: c for c in [
    Config("bf16_eager", "bf16", dict(fuse_projections=False, fuse_gelu=False, fuse_norm=False, attention="sdpa",
                                      compile=False),
           estimate={"large": 20, "medium": 15}),
    Config("fp8_best", "fp8", {**FUSED, **REGIONAL}, issue="both", estimate={"large": 65, "medium": 55},
           extra=("second_size", "profile", "kernels")),
    Config("fp8_warm_cache", "fp8", {**FUSED, **REGIONAL}, issue="everywhere", estimate={"large": 45, "medium": 35},
           extra=("child:fp8_best_plain",)),
    Config("fp8_best_plain", "fp8", {**FUSED, **REGIONAL}, issue="both", estimate={"large": 55, "medium": 55}),
    Config("fp8_no_gelu_fusion", "fp8", {**FUSED, **REGIONAL, "fuse_gelu": False}, estimate={"large": 45, "medium": 35},
           extra=("profile",)),
    Config("fp8_no_norm_fusion", "fp8", {**FUSED, **REGIONAL, "fuse_norm": False}, estimate={"large": 45, "medium": 35},
           extra=("profile",)),
    Config("fp8_aot_child", "fp8", {**FUSED, "compile": "aot"}, issue="everywhere", estimate={"large": 200, "medium": 150},
           extra=("child:fp8_aot", "reference")),
    Config("fp8_tensorwise_compile_child", "fp8", {**FUSED, **REGIONAL, "fp8_path": "scaled_mm_tensorwise"},
           issue="everywhere", estimate={"large": 70, "medium": 50},
           extra=("child:fp8_tensorwise_compile", "reference")),
    # the forced tensor-wise path compiled the way "auto" compiles the row-wise one
    Config("fp8_tensorwise_precompiled_child", "fp8", {**DEFAULT_FP8, "compile": "precompiled",
                                                       "fp8_path": "scaled_mm_tensorwise"},
           issue="everywhere", estimate={"large": 120, "medium": 80},
           extra=("child:fp8_tensorwise_precompiled", "reference")),
    Config("fp8_tensorwise_precompiled", "fp8", {**DEFAULT_FP8, "compile": "precompiled",
                                                 "fp8_path": "scaled_mm_tensorwise"},
           issue="everywhere", estimate={"large": 100, "medium": 70}),
    Config("fp8_tensorwise_eager", "fp8", {**FUSED, "compile": False, "fp8_path": "scaled_mm_tensorwise"},
           issue="everywhere", estimate={"large": 25, "medium": 20}),
    Config("bf16_compile_fused", "bf16", {**FUSED, **REGIONAL}, estimate={"large": 35, "medium": 30},
           extra=("profile",)),
    Config("fp8_fp8attn_compile", "fp8", {**REGIONAL, "fuse_projections": True, "attention": "fp8_cudnn"},
           estimate={"large": 60, "medium": 45}, extra=("profile",)),
    Config("fp8_triton_attention", "fp8", {**REGIONAL, "fuse_projections": True, "attention": "fp8_triton"},
           estimate={"large": 60, "medium": 50}, extra=("profile",)),
    Config("fp8_triton_cudagraphs", "fp8", DEFAULT_FP8, estimate={"large": 60, "medium": 50}),
    # the default with its compiled blocks saved to disk, then an app restart that loads them (no tracing)
    Config("fp8_precompiled", "fp8", {**DEFAULT_FP8, "compile": "precompiled"}, issue="both",
           estimate={"large": 60, "medium": 50}, extra=("second_size",)),
    Config("fp8_precompiled_profile", "fp8", {**DEFAULT_FP8, "compile": "precompiled"}, issue="both",
           estimate={"large": 60, "medium": 50}, extra=("profile",)),
    Config("fp8_precompiled_separate_modulation", "fp8", {**DEFAULT_FP8, "compile": "precompiled",
                                                          "fuse_modulation": False}, estimate={"large": 60, "medium": 50},
           extra=("profile",)),
    Config("fp8_precompiled_promoted_accum", "fp8", {**DEFAULT_FP8, "compile": "precompiled", "fast_accum": False},
           estimate={"large": 60, "medium": 50}, extra=("profile",)),
    Config("fp8_precompiled_no_row_kernel", "fp8", {**DEFAULT_FP8, "compile": "precompiled", "row_kernel": False},
           estimate={"large": 60, "medium": 50}, extra=("profile",)),
    Config("fp8_precompiled_warm", "fp8", {**DEFAULT_FP8, "compile": "precompiled"}, issue="everywhere",
           estimate={"large": 45, "medium": 35}, extra=("child:fp8_precompiled",)),
    Config("bf16_compile_cudagraphs", "bf16", {**FUSED, **REGIONAL, "cuda_graphs": True},
           estimate={"large": 35, "medium": 30}),
    Config("torchao_fp8_compile", "bf16", TORCHAO_COMPILE, peer=True, estimate={"large": 45, "medium": 35}),
    Config("torchao_fp8_compile_child", "bf16", TORCHAO_COMPILE, peer=True,
           estimate={"large": 120, "medium": 90}, extra=("child:torchao_fp8_compile", "reference")),
    Config("fp8_eager", "fp8", dict(FUSED, compile=False), estimate={"large": 30, "medium": 20}),
    Config("fp8_tensorwise_compile", "fp8", {**FUSED, **REGIONAL, "fp8_path": "scaled_mm_tensorwise"},
           issue="everywhere", estimate={"large": 60, "medium": 45}),
    Config("fp8_cudagraphs", "fp8", {**FUSED, **REGIONAL, "cuda_graphs": True}, estimate={"large": 25, "medium": 20},
           extra=("reuse_best",)),
    Config("fp8_16gb", "fp8", {**FUSED, **REGIONAL, "text_encoders": "on_demand"}, issue="everywhere",
           estimate={"large": 30, "medium": 25}, extra=("reuse_best", "repeat_prompt")),
    Config("fp8_compile_unfused", "fp8", {"fuse_projections": False, "attention": "sdpa", **REGIONAL},
           estimate={"large": 60, "medium": 45}),
    Config("fp8_aot", "fp8", {**FUSED, "compile": "aot"}, issue="everywhere", estimate={"large": 150, "medium": 110},
           extra=("reload_aot",)),
    Config("fp8_offload", "fp8", {**FUSED, **REGIONAL, "offload": True}, issue="everywhere",
           estimate={"large": 45, "medium": 35}),
    Config("fp8_max_autotune", "fp8", {**FUSED, **REGIONAL, "compile_mode": "max-autotune-no-cudagraphs"},
           estimate={"large": 200, "medium": 150}),
    Config("fp8_default_max_autotune", "fp8", {**DEFAULT_FP8, "compile_mode": "max-autotune-no-cudagraphs"},
           estimate={"large": 240, "medium": 150}),
    Config("fp8_full_compile", "fp8", {**FUSED, "compile": "full"}, issue="everywhere",
           estimate={"large": 200, "medium": 120}),
]}
# Measured on the H200 (bench/NOTES.md): estimates above are first-image times plus the timed runs; the AOT child
# was still compiling at 109 s. The plan puts first what has not been measured with the shipped code.
PLANS = {  # compilations that hung on the H200 (torchao, tensor-wise) run in child processes with a timeout
    "large": ["bf16_eager", "fp8_best", "bf16_compile_fused", "fp8_warm_cache", "fp8_cudagraphs", "fp8_16gb",
              "fp8_aot_child", "fp8_no_norm_fusion", "fp8_no_gelu_fusion", "torchao_fp8_compile_child", "fp8_eager", "fp8_tensorwise_eager",
              "fp8_offload", "fp8_tensorwise_compile_child", "fp8_fp8attn_compile", "fp8_triton_attention", "fp8_compile_unfused",
              "fp8_max_autotune", "fp8_full_compile"],
    "medium": ["bf16_eager", "fp8_best_plain", "bf16_compile_fused", "fp8_triton_attention", "fp8_eager", "torchao_fp8_compile_child",
               "fp8_fp8attn_compile"],
}
WARM_CHILDREN = {"fp8_best_plain": "fp8_best", "fp8_precompiled": "fp8_precompiled"}  # child -> what wrote its cache
CARD_16GB = 16 * 2**30  # the 16 GB placement is sized for this card (fp8_16gb)
BUILD_ESTIMATE = {"large": 45, "medium": 25, "tiny": 1}


# ------------------------------------------------------------------------------------------------ building


def component_configs(model: str) -> dict[str, dict]:
    configs = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"):
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        for folder in (CONFIG_DIR / MODEL_DIRS[model] / name, CONFIG_DIR / "sd35_common" / name):
            if (folder / filename).is_file():
                configs[name] = json.loads((folder / filename).read_text())
                break
        else:
            raise FileNotFoundError(f"no {name}/{filename} under bench/configs")
    return configs


def build_components(torch, model: str, device) -> dict:
    """Every component with the libraries' own random init, built on `device` in bf16 (tiny: sd35fp8.tiny)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35fp8.tiny import _clip_tokenizer, _t5_tokenizer, build_tiny_pipeline

    if model == "tiny":
        pipe = build_tiny_pipeline(dtype=torch.bfloat16)
        return dict(pipe.components)
    configs = component_configs(model)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            parts = dict(
                transformer=SD3Transformer2DModel.from_config(configs["transformer"]),
                vae=AutoencoderKL.from_config(configs["vae"]),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder"])),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])),
                text_encoder_3=T5EncoderModel(T5Config.from_dict(configs["text_encoder_3"])),
            )
    finally:
        torch.set_default_dtype(previous)
    for module in parts.values():
        module.to(torch.bfloat16).eval().requires_grad_(False)
    parts.update(scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
                 tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), tokenizer_3=_t5_tokenizer())
    return parts


def gpu_bytes(torch, modules) -> int:
    """Bytes of the modules' tensors on the GPU (a tensor subclass, e.g. torchao's, counts its inner tensors)."""
    seen, total = set(), 0

    def leaves(tensor):
        inner = getattr(tensor, "__tensor_flatten__", None)
        if inner is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            for name in inner()[0]:
                yield from leaves(getattr(tensor, name))
        else:
            yield tensor

    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            for leaf in leaves(tensor):
                if leaf.device.type == "cuda" and leaf.data_ptr() not in seen:
                    seen.add(leaf.data_ptr())
                    total += leaf.numel() * leaf.element_size()
    return total


# ------------------------------------------------------------------------------------------------ measuring


class ModelBench:
    """Builds one model's components once and measures configurations on them, one row per configuration."""

    def __init__(self, torch, args, model: str, device, env: dict, rows: dict, checks: dict, save_checks):
        self.torch, self.args, self.model, self.device, self.env = torch, args, model, device, env
        self.rows, self.checks, self.save_checks = rows, checks, save_checks
        self.cuda = device.type == "cuda"
        self.size = args.size
        self.steps = args.steps
        self.parts = build_components(torch, model, device)
        self.t5_fp8 = None
        self.reference_step = None
        self.inputs = None
        self.deadline = None
        self.best = None  # the loaded fp8_best pipeline, reused by configs that only change placement/graphs
        from sd35fp8.gpu import GpuSampler

        self.sampler = GpuSampler(device.index or 0) if self.cuda else None

    # -- pipelines
    def pipeline(self, precision: str, peer: bool = False, own_copies: bool = False):
        """A pipeline on the shared components with its own copy of the transformer (and of everything with
        `own_copies`, for placements that move components around)."""
        from diffusers import StableDiffusion3Pipeline

        torch = self.torch
        parts = dict(self.parts)
        parts["transformer"] = copy.deepcopy(self.parts["transformer"])
        parts["scheduler"] = self.parts["scheduler"].__class__.from_config(self.parts["scheduler"].config)
        if precision == "fp8" and self.cuda:
            if self.t5_fp8 is None:  # T5 in FP8 blocks, as convert writes it and load_pipeline keeps it on a GPU
                from sd35fp8.loading import _quantize_text_encoders_like_convert

                holder = type("Holder", (), {})()
                holder.text_encoder_3 = copy.deepcopy(self.parts["text_encoder_3"])
                _quantize_text_encoders_like_convert(holder)
                self.t5_fp8 = holder.text_encoder_3
            parts["text_encoder_3"] = self.t5_fp8
        if peer:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            quantize_(parts["transformer"], Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        if own_copies:
            parts = {name: copy.deepcopy(part) if isinstance(part, torch.nn.Module) and name != "transformer" else part
                     for name, part in parts.items()}
        pipe = StableDiffusion3Pipeline(**parts)
        if self.cuda:
            torch.cuda.empty_cache()
        return pipe

    def request(self, **overrides):
        from sd35fp8.request import GenerationRequest

        settings = dict(prompt=PROMPT, seed=42, steps=self.steps, guidance=4.5, width=self.size, height=self.size)
        return GenerationRequest(**(settings | overrides))

    def step_inputs(self, pipe):
        torch = self.torch
        with torch.no_grad():
            pe, npe, ppe, nppe = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, prompt_3=None, device=self.device,
                                                    do_classifier_free_guidance=True, negative_prompt="",
                                                    max_sequence_length=256)
        generator = torch.Generator().manual_seed(1234)
        latents = torch.randn(1, pipe.transformer.config.in_channels, self.size // 8, self.size // 8,
                              generator=generator)
        return {"latents": latents.to(torch.bfloat16), "embeds": torch.cat([npe, pe]), "pooled": torch.cat([nppe, ppe])}

    def transformer_step(self, pipe):
        torch = self.torch
        inputs = self.inputs
        latents = inputs["latents"].to(self.device)
        latent_input = torch.cat([latents] * 2)
        timestep = torch.full((2,), 500.0, device=self.device)
        with torch.no_grad():
            return pipe.transformer(hidden_states=latent_input, timestep=timestep,
                                    encoder_hidden_states=inputs["embeds"].to(self.device),
                                    pooled_projections=inputs["pooled"].to(self.device), return_dict=False)[0]

    def step_ms(self, pipe, iters: int) -> float | None:
        if not self.cuda:
            return None
        return cuda_median_ms(self.torch, lambda: self.transformer_step(pipe), iters=iters, warmup=2)

    def encode_profile(self, loaded, prompt: str) -> dict:
        """One text encoding under the profiler: its wall time against the GPU time of its host-to-device copies
        and of its kernels (wall ~ their sum: the copies do not overlap the compute)."""
        from torch.profiler import ProfilerActivity, profile

        from sd35fp8.prompts import encode

        torch = self.torch
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            encode(loaded.pipe, self.device, prompt, None, True)
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
        copies = compute = 0.0
        kernels = []
        for event in prof.key_averages():
            us = getattr(event, "self_device_time_total", 0) or 0
            if "memcpy htod" in event.key.lower():
                copies += us
            else:
                compute += us
                kernels.append((us, event.count, event.key[:100]))
        return {"wall_ms": round(1000 * wall, 1), "h2d_copies_ms": round(copies / 1000, 1),
                "kernels_ms": round(compute / 1000, 1),
                "top_kernels": [[name, calls, round(us / 1000, 2)] for us, calls, name in sorted(kernels)[::-1][:8]]}

    def profile(self, pipe) -> dict:
        from torch.profiler import ProfilerActivity, profile

        torch = self.torch
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.transformer_step(pipe)
            torch.cuda.synchronize()
        kernels = []
        for event in prof.key_averages():
            us = getattr(event, "self_device_time_total", 0) or 0
            if us > 0:
                kernels.append((event.key, us, event.count))
        kernels.sort(key=lambda k: -k[1])
        busy_us, span_us = self.kernel_timeline(prof)

        def family(name: str) -> str:
            low = name.lower()
            if "sdpa_fp8" in low or any(s in low for s in ("flash", "fmha", "attention", "sdpa", "cudnn")):
                return "attention"
            if low.startswith("triton_"):
                return "fused elementwise/norm/quantize (triton)"
            if low.startswith("_gelu_quantize"):
                return "GELU + quantize kernel (sd35fp8.kernels)"
            if low.startswith("_norm_quantize"):
                return "adaLN + quantize kernels (sd35fp8.kernels)"
            if any(s in low for s in ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm", "sm90_", "matmul", "f8f8")):
                return "matmul"
            return "other"

        families: dict[str, float] = {}
        for name, us, _ in kernels:
            families[family(name)] = families.get(family(name), 0) + us
        quantize = [(n, us, c) for n, us, c in kernels if n.startswith("triton_") and any(
            s in n for s in ("clamp", "to_copy", "abs", "amax", "div", "reciprocal"))]
        return {
            "step_gpu_ms": round(sum(us for _, us, _ in kernels) / 1000, 2),
            "by_family_ms": {k: round(v / 1000, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "quantizing_triton_kernels_ms": round(sum(us for _, us, _ in quantize) / 1000, 2),
            "top_kernels": [{"name": n[:160], "ms": round(us / 1000, 3), "calls": c} for n, us, c in kernels[:25]],
            "kernels_per_step": sum(c for _, _, c in kernels),
            "memsets_per_step": sum(c for n, _, c in kernels if n.startswith("Memset")),
            # the step's kernels laid end to end against first start to last end: the rest is gaps between them
            "timeline_busy_ms": round(busy_us / 1000, 2), "timeline_span_ms": round(span_us / 1000, 2),
            "all_kernels": [[n[:100], c, round(us / 1000, 4)] for n, us, c in kernels],
        }

    @staticmethod
    def kernel_timeline(prof) -> tuple[float, float]:
        """(GPU-busy microseconds: the union of the kernels' intervals, first start to last end) of a profile."""
        intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                           if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")
                           and e.time_range.end > e.time_range.start)
        if not intervals:
            return 0.0, 0.0
        busy, (start, end) = 0.0, intervals[0]
        for a, b in intervals[1:]:
            if a > end:
                busy += end - start
                start, end = a, b
            else:
                end = max(end, b)
        busy += end - start
        return busy, intervals[-1][1] - intervals[0][0]

    def own_peak(self, loaded, result) -> float | None:
        """Peak VRAM of this pipeline alone: the generation's peak minus memory held by other pipelines' weights
        that stayed allocated throughout (exact for allocated bytes)."""
        if not self.cuda or result.peak_vram_bytes is None:
            return None
        return gb(result.peak_vram_bytes - self._foreign)

    def _note_foreign(self, loaded):
        torch = self.torch
        torch.cuda.synchronize()
        own = gpu_bytes(torch, [c for c in loaded.pipe.components.values() if isinstance(c, torch.nn.Module)])
        self._foreign = torch.cuda.memory_allocated() - own

    def timed_generation(self, loaded, **overrides):
        from sd35fp8.generate import generate

        if self.cuda:
            self._note_foreign(loaded)
        result = generate(loaded, self.request(**overrides), sampler=self.sampler)
        gpu = result.gpu
        energy = None if gpu is None or not getattr(gpu, "available", False) else getattr(gpu, "energy_j", None)
        power = None if gpu is None or not getattr(gpu, "available", False) else getattr(gpu, "avg_power_w", None)
        return result, energy, power

    def ensure_reference(self) -> None:
        """The bf16 eager transformer's output on the fixed step inputs (when bf16_eager itself is not run)."""
        if self.reference_step is not None:
            return
        from sd35fp8.loading import load_pipeline

        loaded = load_pipeline(self.pipeline("bf16"), "bf16", device=self.device, dtype=self.torch.bfloat16,
                               prompt_cache=False, fuse_projections=False, attention="sdpa", compile=False)
        self.inputs = self.step_inputs(loaded.pipe)
        self.reference_step = self.transformer_step(loaded.pipe).float().cpu()
        del loaded
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # -- one configuration
    def run(self, config: Config) -> dict:
        from sd35fp8.compile import CudaGraphTransformer, compile_counters
        from sd35fp8.generate import generate
        from sd35fp8.loading import load_pipeline
        from sd35fp8.metrics import relative_error

        torch = self.torch
        args = self.args
        row = {"model": self.model, "config": config.name, "precision": "fp8" if config.peer else config.precision,
               "compiled": config.compiled, "peer": config.peer, "options": dict(config.options),
               "width": self.size, "height": self.size, "steps": self.steps, "guidance": 4.5}
        child = next((e.split(":", 1)[1] for e in config.extra if e.startswith("child:")), None)
        if child:  # measured in a fresh process (warm cache, or a risky compile that must not stop this run)
            row.update(self.child(child, reference="reference" in config.extra))
            return row
        options = dict(config.options)
        if args.tiny and options.get("compile") in ("regional", "precompiled", "full"):
            options.setdefault("compile_backend", "eager")  # dry run: trace, do not generate kernels
        if args.tiny and options.get("compile_mode"):
            options.pop("compile_mode")
        if "reuse_best" in config.extra:
            if self.best is None:
                raise RuntimeError("needs fp8_best first")
            loaded = self.best
            if options.get("cuda_graphs"):
                wrapper = CudaGraphTransformer.install(loaded.pipe.transformer) if self.cuda else None
            if options.get("text_encoders") == "on_demand":
                from sd35fp8.loading import on_demand_keep_bytes
                from sd35fp8.prompts import OnDemandEncoders, PromptCache

                # what the placement keeps of T5 on a 16 GB card (the H200 has room for everything)
                keep = on_demand_keep_bytes(loaded.pipe, self.device, budget_bytes=CARD_16GB) if self.cuda else 0
                loaded.encoders = OnDemandEncoders(loaded.pipe, self.device, keep_bytes=keep)
                row["t5_kept_gb"] = gb(loaded.encoders.kept_bytes())
                loaded.prompt_cache = PromptCache()
                loaded.pieces["text_encoders"] = loaded.encoders.describe()
                if self.cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
        else:
            started = time.perf_counter()
            pipe = self.pipeline(config.precision, config.peer, own_copies=bool(options.get("offload")))
            row["build_s"] = round(time.perf_counter() - started, 2)
            precision = "bf16" if config.peer else config.precision
            loaded = load_pipeline(pipe, precision, device=self.device, dtype=torch.bfloat16, prompt_cache=False,
                                   **options)
        row["load_s"] = round(loaded.load_seconds, 2)
        row["fp8_path"] = loaded.fp8_path if not config.peer else "torchao Float8DynamicActivationFloat8WeightConfig(PerRow)"
        row["pieces"] = {k: v for k, v in loaded.pieces.items() if k != "compile_cache"}
        cache = loaded.pieces.get("compile_cache") or {}
        row["cache"] = None if not cache.get("cache_dir") else ("cold" if not self.args.cache_used else "partly warm")
        row["cache_note"] = ("cold: first compilation of this process into a fresh cache folder" if row["cache"] == "cold"
                             else "other configurations' kernels were already cached" if row["cache"] else None)
        if cache.get("cache_dir"):
            self.args.cache_used = True
        counters_before = compile_counters()
        # first image (compiles here for compiled configs), full size and steps
        result, energy, power = self.timed_generation(loaded)
        row["first_image_s"] = round(result.latency_s, 2)
        row["first_image_peak_vram_gb"] = self.own_peak(loaded, result)
        row["first_image_prompt_cache_hit"] = result.prompt_cache_hit
        row["encoder_graphs_after_first_image"] = encoder_graphs_report(loaded.pipe)
        row["compile_counters_after_first_image"] = {k: v - counters_before[k] for k, v in compile_counters().items()}
        if config.compiled:
            row["compile_seconds_so_far"] = compile_breakdown()
        if "second_size" in config.extra:
            before = compile_counters()
            width, height = SECOND_SIZE if not args.tiny else (96, 128)
            first_other = generate(loaded, self.request(width=width, height=height))
            again = generate(loaded, self.request(width=width, height=height))
            row["second_size"] = {"width": width, "height": height, "first_s": round(first_other.latency_s, 2),
                                  "steady_s": round(again.latency_s, 2),
                                  "extra_first_s": round(first_other.latency_s - again.latency_s, 2),
                                  "compile_counters": {k: v - before[k] for k, v in compile_counters().items()}}
        # single-step error against bf16 eager, identical inputs
        if self.inputs is None:
            self.inputs = self.step_inputs(loaded.pipe)
        out = self.transformer_step(loaded.pipe).float()
        if config.name == "bf16_eager":
            self.reference_step = out.cpu()
        elif self.reference_step is not None:
            row["step_rel_error_vs_bf16"] = round(relative_error(out.cpu(), self.reference_step), 5)
        row["step_output_finite"] = bool(torch.isfinite(out).all())
        # transformer ms/step (CUDA events, median), then the timed end-to-end generation
        with garbage_collections() as collections:
            row["transformer_ms_per_step"] = rounded(self.step_ms(loaded.pipe, args.step_iters), 2)
        row["gc_during_steps"] = collections
        if self.cuda:  # the same with everything that exists now out of the collector's sight (gc.freeze)
            gc.collect()
            gc.freeze()
            try:
                row["transformer_ms_per_step_gc_frozen"] = rounded(self.step_ms(loaded.pipe, args.step_iters), 2)
            finally:
                gc.unfreeze()
        result, energy, power = self.timed_generation(loaded)
        row.update(latency_s=round(result.latency_s, 3), generation_ms_per_step=round(1000 * result.seconds_per_step, 2),
                   peak_vram_gb=self.own_peak(loaded, result), peak_vram_process_gb=gb(result.peak_vram_bytes),
                   energy_per_image_j=rounded(energy, 1), avg_power_w=rounded(power, 1), image_finite=result.finite,
                   encode_s=rounded(result.encode_s, 3))
        if "repeat_prompt" in config.extra:
            again, energy2, _ = self.timed_generation(loaded)  # the prompt cache now has it: encoders skipped
            row["repeat_prompt"] = {"latency_s": round(again.latency_s, 3), "prompt_cache_hit": again.prompt_cache_hit,
                                    "peak_vram_gb": self.own_peak(loaded, again), "encode_s": rounded(again.encode_s, 4)}
            fresh, _, _ = self.timed_generation(loaded, prompt=PROMPT + ", oil painting")  # not in the cache
            row["new_prompt"] = {"latency_s": round(fresh.latency_s, 3), "prompt_cache_hit": fresh.prompt_cache_hit,
                                 "peak_vram_gb": self.own_peak(loaded, fresh), "encode_s": rounded(fresh.encode_s, 4)}
            if self.cuda:
                row["new_prompt"]["encode_profile"] = self.encode_profile(loaded, PROMPT + ", watercolour")
        if self.cuda and "profile" in config.extra and not args.no_profile:
            row["kernel_profile"] = self.profile(loaded.pipe)
            row["encode_profile"] = self.encode_profile(loaded, PROMPT + ", ink drawing")
        if "kernels" in config.extra:
            row["fp8_kernels_file"] = dump_fp8_kernels(args.out / "inductor_fp8_kernels.txt")
        if "reload_aot" in config.extra:  # a restarted app: packages found on disk, load + first image
            started = time.perf_counter()
            again = load_pipeline(self.pipeline("fp8"), "fp8", device=self.device, dtype=torch.bfloat16,
                                  prompt_cache=False, **options)
            load_s = time.perf_counter() - started
            reload_result, _, _ = self.timed_generation(again)
            row["reload"] = {"load_s": round(load_s, 2), "first_image_s": round(reload_result.latency_s, 2),
                             "loaded_from_disk": again.pieces.get("aot", {}).get("loaded_from_disk"),
                             "load_plus_first_image_s": round(load_s + reload_result.latency_s, 2)}
            del again
        row["pieces_line"] = __import__("sd35fp8.speed", fromlist=["describe_pieces"]).describe_pieces(loaded.pieces)
        # keep / release
        if config.name in ("fp8_best", "fp8_best_plain"):
            self.best = loaded
        elif "reuse_best" in config.extra:
            if options.get("cuda_graphs") and self.cuda:
                wrapper.uninstall()
            if options.get("text_encoders") == "on_demand":  # back on the GPU for the configurations after this
                loaded.encoders.remove()
                for module in loaded.encoders.modules:
                    module.to(self.device)
                loaded.encoders, loaded.prompt_cache = None, None
        else:
            del loaded
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        return row

    def child(self, name: str, reference: bool) -> dict:
        """Run configuration `name` in a fresh process sharing the compile cache; returns its row."""
        out = self.args.out / f"child_{name}.json"
        timeout = min(self.args.child_timeout, max(20.0, self.deadline.left() - 10)) if self.deadline else \
            self.args.child_timeout
        command = [sys.executable, "-X", "faulthandler", "-m", "bench.h200", "--child", self.model, "--child-config", name,
                   "--out", str(self.args.out), "--size", str(self.size), "--steps", str(self.steps)] + \
            (["--tiny"] if self.args.tiny else []) + (["--child-reference"] if reference else [])
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            failure = None if done.returncode == 0 else f"exit code {done.returncode}: " + crash_report(done.stderr)
        except subprocess.TimeoutExpired as expired:
            failure = f"child timed out after {timeout:.0f} s: " + str(expired.stderr or "")[-2000:]
        row = json.loads(out.read_text()) if out.is_file() else {}
        row = {k: v for k, v in row.items() if k not in ("model", "config")}
        row["child"] = {"config": name, "process_s": round(time.perf_counter() - started, 1), "error": failure}
        if name in WARM_CHILDREN:
            row["cache"] = "warm"
            row["cache_note"] = f"fresh process, compile cache written by this run's {WARM_CHILDREN[name]} (an app restart)"
        return row


def encoder_graphs_report(pipe) -> dict:
    """Per text encoder: the CUDA graphs `CudaGraphEncoder` captured and the signatures it could not capture."""
    from sd35fp8.compile import CudaGraphEncoder
    from sd35fp8.prompts import text_encoders_of

    report = {}
    for name, encoder in text_encoders_of(pipe).items():
        wrapper = CudaGraphEncoder.installed(encoder)
        if wrapper is not None:
            report[name] = {"graphs": len(wrapper.graphs), "failures": list(wrapper.failures.values())}
    return report


def crash_report(stderr: str) -> str:
    """What to keep of a failed child's stderr: faulthandler's stack of a crash (before its list of extension
    modules), else the tail."""
    start = stderr.find("Fatal Python error")
    return stderr[start:start + 3000] if start >= 0 else stderr[-3000:]


COMPILE_PHASES = {  # torch._dynamo.utils.compile_times() entries: where a (warm-cache) first image spends its time
    "_compile.compile_inner": "dynamo_total", "bytecode_tracing": "dynamo_tracing",
    "create_aot_dispatcher_function": "aot_autograd", "fx_codegen_and_compile": "inductor_codegen",
    "PyCodeCache.load_by_key_path": "load_compiled_modules", "async_compile.wait": "triton_compile_wait",
    "build_guards": "guards"}


@contextmanager
def garbage_collections():
    """Yields a dict filled, on exit, with the collector's runs per generation and their seconds: launch-bound
    steps (SD3.5 Medium) measured slower right after a compilation, when the heap holds the compiler's objects."""
    report = {"runs": {0: 0, 1: 0, 2: 0}, "seconds": 0.0}
    started = {}

    def callback(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            report["runs"][info["generation"]] += 1
            report["seconds"] += time.perf_counter() - started.get("t", time.perf_counter())

    gc.callbacks.append(callback)
    try:
        yield report
    finally:
        gc.callbacks.remove(callback)
        report["seconds"] = round(report["seconds"], 3)
        report["objects_tracked"] = len(gc.get_objects())


def compile_breakdown() -> dict:
    """Seconds this process spent in each compile phase (cumulative) and its compile-cache hits and misses."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = {label: round(sum(compilation_time_metrics.get(name, [])), 2) for name, label in COMPILE_PHASES.items()}
    caches = {f"{group}.{key}": value for group in ("inductor", "aot_autograd")
              for key, value in counters[group].items() if "cache" in key}
    return {"seconds": seconds, "caches": caches}


def dump_fp8_kernels(path: Path) -> dict:
    """Copy inductor's generated kernels that write float8 into one file; count what they fused."""
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"))
    kernels = []
    for file in cache.rglob("*.py"):
        try:
            text = file.read_text(errors="replace")
        except OSError:
            continue
        if "@triton.jit" in text and ("float8" in text or "fp8e4" in text):
            kernels.append((file, text))
    fused = {"layer_norm_or_rms_into_fp8": 0, "gelu_into_fp8": 0, "plain_quantize": 0}
    with open(path, "w") as handle:
        for file, text in kernels:
            name = text.split("def triton_", 1)[1].split("(", 1)[0] if "def triton_" in text else file.name
            if "rsqrt" in text:
                fused["layer_norm_or_rms_into_fp8"] += 1
            elif "tanh" in text or "erf" in text:
                fused["gelu_into_fp8"] += 1
            else:
                fused["plain_quantize"] += 1
            handle.write(f"# ===== {file.name}: triton_{name}\n{text[:6000]}\n\n")
    return {"kernels_writing_fp8": len(kernels), **fused, "file": path.name}


def kernel_entry(torch, inductor, ours, moved_bytes: int) -> dict:
    """inductor's kernel vs ours, each returning (..., FP8 data, float32 scales): GPU time from a CUDA graph of 20
    calls (`*_ms`), timed call by call with their eager Python launches (`*_launched_ms`, what an uncompiled caller
    pays), our bandwidth, and how far our FP8 bytes and scales are from inductor's."""
    from sd35fp8 import kernels

    entry = {}
    for name, fn in (("inductor", inductor), ("kernel", ours)):
        graphed = cuda_graph_ms(torch, fn)
        entry[f"{name}_ms"] = None if graphed is None else round(graphed, 4)
        entry[f"{name}_launched_ms"] = round(cuda_median_ms(torch, fn, iters=20), 4)
    *_, data, scale = ours()
    *_, expected_data, expected_scale = inductor()
    same, scale_error = kernels.agreement(data, expected_data, scale, expected_scale)
    entry["bytes_equal_fraction"], entry["scale_max_rel_diff"] = round(same, 6), scale_error
    entry["kernel_gb_per_s"] = round(moved_bytes / (entry["kernel_ms"] or entry["kernel_launched_ms"]) / 1e6, 1)
    return entry


def gelu_quantize_micro(torch, device) -> dict:
    """tanh-GELU + row-wise FP8 quantization of the MLP activation at SD3.5's shapes (`gelu_kernel_sweep.SHAPES`):
    what inductor generates vs `sd35fp8.kernels.gelu_quantize_rows`, time and agreement of the FP8 bytes and scales."""
    import torch.nn.functional as F

    from sd35fp8 import kernels
    from sd35fp8.fp8 import _quantize_rows_eager

    if device.type != "cuda" or not kernels.available():
        return {"skipped": "needs CUDA and triton"}
    from bench.gelu_kernel_sweep import SHAPES  # imports triton: only here

    inductor = torch.compile(lambda x: _quantize_rows_eager(F.gelu(x, approximate="tanh")), dynamic=True)
    report = {}
    for name, (rows, cols) in SHAPES.items():
        x = (torch.randn(rows, cols, device=device) * 2).to(torch.bfloat16)
        moved = rows * cols * 3  # read bf16, write FP8
        report[name] = {"shape": [rows, cols],
                        **kernel_entry(torch, lambda: inductor(x), lambda: kernels.gelu_quantize_rows(x), moved)}
    return report


def norm_quantize_micro(torch, device) -> dict:
    """adaLN (LayerNorm + modulation, with and without the gated residual add) + row-wise FP8 quantization at SD3.5's
    image-token shapes: what inductor generates for `kernels.norm_quantize_reference` vs the kernels."""
    from sd35fp8 import kernels

    if device.type != "cuda" or not kernels.available():
        return {"skipped": "needs CUDA and triton"}
    inductor = torch.compile(kernels.norm_quantize_reference, dynamic=True)
    report = {}
    for name, cols in (("large", 2432), ("medium", 1536)):
        h, y = ((torch.randn(2, 4096, cols, device=device) * 2).to(torch.bfloat16) for _ in range(2))
        shift, scale, gate = (torch.randn(2, cols, device=device).to(torch.bfloat16) for _ in range(3))
        for variant, extra, ours in (
                ("norm", (), lambda: kernels.norm_quantize_rows(h, shift, scale, 1e-6)),
                ("add_norm", (y, gate), lambda: kernels.add_norm_quantize_rows(h, y, gate, shift, scale, 1e-6))):
            moved = h.numel() * (3 + (4 if extra else 0))  # read h, write FP8 (+ read y, write the new h)
            report[f"{name}_{variant}"] = {"shape": [2, 4096, cols], **kernel_entry(
                torch, lambda: inductor(h, shift, scale, 1e-6, *extra), ours, moved)}
    return report


T5_XXL_LINEARS = {"attention": ((4096, 4096), 4), "wi": ((10240, 4096), 2), "wo": ((4096, 10240), 1)}  # a block's


def dequantize_blocks_micro(torch, device) -> dict:
    """T5-XXL's FP8 weight expansion (128 x 128 blocks to bf16) at its three layer shapes: eager torch (what
    `Fp8BlockLinear` ran before the kernel) vs `kernels.dequantize_blocks` at a few tile and warp settings (GPU time
    from CUDA graphs, bandwidth at 3 bytes an element, bitwise agreement), and the total for one T5 pass (24 blocks)."""
    from sd35fp8 import kernels
    from sd35fp8.fp8 import dequantize_blockwise, quantize_blockwise

    if device.type != "cuda" or not kernels.available():
        return {"skipped": "needs CUDA and triton"}

    def graphed_ms(fn):
        ms = cuda_graph_ms(torch, fn)
        return None if ms is None else round(ms, 4)

    report, per_pass = {}, {"eager": 0.0, "kernel": 0.0}
    for name, ((rows, cols), per_block) in T5_XXL_LINEARS.items():
        data, scale_inv = quantize_blockwise(torch.randn(rows, cols, device=device))
        eager = lambda: dequantize_blockwise(data, scale_inv, (128, 128), torch.bfloat16)  # noqa: E731
        default = lambda: kernels.dequantize_blocks(data, scale_inv, 128, 128, torch.bfloat16)  # noqa: E731
        expected = eager()
        entry = {"shape": [rows, cols], "eager_ms": graphed_ms(eager), "default_ms": graphed_ms(default),
                 "default_launched_ms": round(cuda_median_ms(torch, default, iters=20), 4),
                 "default_bitwise_equal": bool(torch.equal(default(), expected))}
        for tile in ((32, 128), (64, 128), (128, 128)):
            for warps in (4, 8):
                out = torch.empty(rows, cols, dtype=torch.bfloat16, device=device)
                launch = lambda: kernels.launch_dequantize_blocks(data, scale_inv, (128, 128), out, tile, warps)  # noqa: E731
                ms = graphed_ms(launch)
                launch()
                entry[f"tile{tile[0]}x{tile[1]}_w{warps}"] = {
                    "ms": ms, "gb_per_s": ms and round(rows * cols * 3 / ms / 1e6, 1),
                    "bitwise_equal": bool(torch.equal(out, expected))}
        for key, ms in (("eager", entry["eager_ms"]), ("kernel", entry["default_ms"])):
            per_pass[key] += 24 * per_block * (ms or float("nan"))
        report[name] = entry
    report["one_t5_pass_ms"] = {k: round(v, 2) for k, v in per_pass.items()}
    return report


# SD3.5 Large's FP8 GEMMs of one block (M = CFG batch 2 x 4096 image tokens, or x 333 text tokens): (M, K, N)
LARGE_GEMMS = {"qkv": (8192, 2432, 7296), "out": (8192, 2432, 2432), "ff_in": (8192, 2432, 9728),
               "ff_out": (8192, 9728, 2432), "context_qkv": (666, 2432, 7296), "context_ff_out": (666, 9728, 2432)}


def scaled_mm_micro(torch, device) -> dict:
    """Row-wise `torch._scaled_mm` at SD3.5 Large's GEMM shapes with and without `use_fast_accum` (no float32
    promotion inside the GEMM): GPU time from CUDA graphs, TFLOP/s, relative error against the float32 product of
    the same E4M3 operands, and the kernel each one ran."""
    from sd35fp8.fp8 import _quantize_rows_eager, quantize_weight_rows

    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    report = {}
    for name, (m, k, n) in LARGE_GEMMS.items():
        x8, x_scale = _quantize_rows_eager(torch.randn(m, k, device=device).to(torch.bfloat16))
        w8, w_scale = quantize_weight_rows((torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16))
        w_scale = w_scale.reshape(1, -1).float()
        exact = (x8.float() * x_scale) @ (w8.float() * w_scale.reshape(-1, 1)).t()
        entry = {"shape_mkn": [m, k, n]}
        for label, fast in (("promoted", False), ("fast_accum", True)):
            def gemm(fast=fast):
                return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            ms = cuda_graph_ms(torch, gemm)
            error = float((gemm().float() - exact).norm() / exact.norm())
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                gemm()
                torch.cuda.synchronize()
            kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
            entry[label] = {"ms": ms and round(ms, 4), "tflops": ms and round(2 * m * k * n / ms / 1e9, 1),
                            "rel_error": round(error, 6), "kernels": kernels}
        report[name] = entry
    return report


def vae_decode_micro(torch, device) -> dict:
    """SD3.5's VAE decode of one 1024x1024 latent (bf16, random weights; the same VAE for Large and Medium) as the
    pipelines run it, and with channels-last memory, CUDA graphs and torch.compile of the channels-last decoder; plus
    diffusers' post-processing to a float32 NumPy image. Milliseconds (CUDA events, median of 10)."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(component_configs("large")["vae"]).to(device, torch.bfloat16).eval()
    latents = torch.randn(1, 16, 128, 128, device=device, dtype=torch.bfloat16)
    processor = VaeImageProcessor(vae_scale_factor=8)
    report = {}

    def decode():
        with torch.inference_mode():
            return vae.decode(latents, return_dict=False)[0]

    reference = decode().float()
    report["eager_ms"] = round(cuda_median_ms(torch, decode), 2)
    report["postprocess_np_ms"] = round(cuda_median_ms(torch, lambda: processor.postprocess(decode(), output_type="np"))
                                        - report["eager_ms"], 2)
    graphed = lambda: rounded(cuda_graph_ms(torch, decode, repeat=3), 2)  # noqa: E731
    report["eager_graphed_ms"] = graphed()
    vae.to(memory_format=torch.channels_last)
    report["channels_last_ms"] = round(cuda_median_ms(torch, decode), 2)
    report["channels_last_rel_diff"] = round(float((decode().float() - reference).norm() / reference.norm()), 6)
    report["channels_last_graphed_ms"] = graphed()
    log(f"vae_decode_micro so far: {json.dumps(report)}")
    vae.decoder = torch.compile(vae.decoder, dynamic=False)
    started = time.perf_counter()
    compiled = decode().float()
    report["compiled_channels_last_first_s"] = round(time.perf_counter() - started, 1)
    report["compiled_channels_last_ms"] = round(cuda_median_ms(torch, decode), 2)
    report["compiled_channels_last_rel_diff"] = round(float((compiled - reference).norm() / reference.norm()), 6)
    return report


def attention_micro(torch, device, tiny: bool) -> dict:
    """16-bit SDPA (PyTorch's pick, cuDNN on Hopper) vs cuDNN FP8 sdpa_fp8 at SD3.5's shapes: kernel time, time with
    quantization, error against float32 attention."""
    import torch.nn.functional as F

    from sd35fp8.attention import FALLBACKS, cudnn_fp8_available, fp8_attention
    from sd35fp8.metrics import relative_error

    report = {"cudnn_frontend": cudnn_fp8_available() or "ok"}
    shapes = {"large": (2, 38, 4429, 64), "medium": (2, 24, 4429, 64)} if not tiny else {"tiny": (2, 2, 80, 64)}
    kernel = "cudnn" if device.type == "cuda" else "reference"
    for name, (b, h, s, d) in shapes.items():
        entry = {}
        generator = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = ((torch.randn(b, s, h, d, generator=generator)).to(device, torch.bfloat16) for _ in range(3))
        q = F.rms_norm(q, (d,))
        k = F.rms_norm(k, (d,))
        bound = torch.tensor(8.0 * 1.01, device=device)
        flops = 4 * b * h * s * s * d
        reference = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        bf16 = lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))  # noqa: E731
        entry["bf16_rel_error"] = round(relative_error(bf16().transpose(1, 2).float(), reference), 5)
        fp8_out = fp8_attention(q, k, v, bound, bound, kernel)
        entry["fp8_rel_error"] = round(relative_error(fp8_out.float(), reference), 5)
        entry["fp8_fallback"] = dict(FALLBACKS) or None
        if device.type == "cuda":
            entry["bf16_sdpa_ms"] = round(cuda_median_ms(torch, bf16, iters=20), 4)
            from sd35fp8.attention import _quantize_per_tensor

            q8, qs = _quantize_per_tensor(q, bound)
            k8, ks = _quantize_per_tensor(k, bound)
            v8, vs = _quantize_per_tensor(v, None)
            only = lambda: torch.ops.sd35fp8.sdpa_fp8(q8, k8, v8, 1 / qs, 1 / ks, 1 / vs, vs * 0.5,  # noqa: E731
                                                      1 / d ** 0.5, "cudnn")
            entry["fp8_kernel_ms"] = round(cuda_median_ms(torch, only, iters=20), 4)
            compiled = torch.compile(lambda q, k, v: fp8_attention(q, k, v, bound, bound, "cudnn"), dynamic=False)
            entry["fp8_with_quantize_compiled_ms"] = round(cuda_median_ms(torch, lambda: compiled(q, k, v), iters=20), 4)
            for key in ("bf16_sdpa_ms", "fp8_kernel_ms", "fp8_with_quantize_compiled_ms"):
                entry[key.replace("_ms", "_tflops")] = round(flops / entry[key] / 1e9, 1)
        report[name] = entry
    return report


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=None)
    parser.add_argument("--plan", default=None, help="model:config,config;model:... (default: PLANS for large,medium)")
    parser.add_argument("--models", default=None, help="comma-separated models of the default plan")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--step-iters", type=int, default=10)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-micro", action="store_true", help="skip the kernel micro-benchmarks")
    parser.add_argument("--no-attention-micro", action="store_true", help="skip the attention micro-benchmark")
    parser.add_argument("--micros", default=None, help="comma-separated micro-benchmarks to run (default: all)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-timeout", type=float, default=240)
    parser.add_argument("--child-config", default="fp8_best_plain", help=argparse.SUPPRESS)
    parser.add_argument("--child-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-used", action="store_true", help="the compile cache folder is not fresh")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (3 if args.tiny else 28)
    return args


def plan_of(args) -> list[tuple[str, list[str]]]:
    if args.plan:
        plan = []
        for part in args.plan.split(";"):
            model, _, names = part.partition(":")
            plan.append((model, names.split(",") if names else PLANS[model]))
        return plan
    models = args.models.split(",") if args.models else ["large", "medium"]
    return [(m, PLANS[m]) for m in models]


def child_main(args) -> int:
    """Fresh process: build the model, (optionally) its bf16 reference step, run one configuration, write its row."""
    import torch

    device = torch.device("cpu" if args.tiny else "cuda")
    started = time.perf_counter()
    bench = ModelBench(torch, args, "tiny" if args.tiny else args.child, device, {}, {}, {}, lambda: None)
    if args.child_reference:
        bench.ensure_reference()
    row = bench.run(CONFIGS[args.child_config])
    row["process_build_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out / f"child_{args.child_config}.json", row)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child_main(args)
    deadline = Deadline(args.deadline_s)
    if "SD35FP8_COMPILE_CACHE" not in os.environ:
        # a fresh cache folder (read by sd35fp8.settings at import): the first compiled config measures "cold",
        # and the warm-cache child process started later inherits it
        folder = args.out.resolve().parent / f"{args.out.name}-compile-cache"
        args.cache_used = folder.exists() and any(folder.rglob("*.py"))
        os.environ["SD35FP8_COMPILE_CACHE"] = str(folder)
    import torch

    # the project is imported now, once: the tree may change while a long run goes on
    import sd35fp8.generate  # noqa: F401
    import sd35fp8.loading  # noqa: F401

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda:0")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("full-size models need a GPU; use --tiny on the CPU")
    env = environment(torch, device)
    log(f"environment: {json.dumps(env)}")
    common = {"gpu": env.get("gpu") or "cpu (tiny dry run)", "random_weights": True, "note": RANDOM_WEIGHTS_NOTE}
    rows = {"speed": Rows(args.out / "gpu_h200_speed.json", common),
            "everywhere": Rows(args.out / "gpu_h200_everywhere.json", common)}
    checks = {"environment": env, "stages": {}}

    def save_checks():
        write_json(args.out / "gpu_h200_checks.json", checks)

    save_checks()
    current = {"model": None}

    def record_failure(name, info):
        model, _, config_name = name.partition("/")
        config = CONFIGS.get(config_name)
        targets = ["speed", "everywhere"] if config is None or config.issue == "both" else [config.issue]
        for target in targets:
            rows[target].add({"model": model, "config": config_name, **info})

    stages = Stages(deadline, record_failure)
    micros = [("gelu_quantize_micro", lambda: gelu_quantize_micro(torch, device), True),
              ("norm_quantize_micro", lambda: norm_quantize_micro(torch, device), True),
              ("attention_micro", lambda: attention_micro(torch, device, args.tiny), not args.no_attention_micro),
              ("dequantize_blocks_micro", lambda: dequantize_blocks_micro(torch, device), True),
              ("scaled_mm_micro", lambda: scaled_mm_micro(torch, device), True),
              ("vae_decode_micro", lambda: vae_decode_micro(torch, device), True)]
    for key, measure, wanted in micros:
        if args.no_micro or not wanted or (args.micros and key not in args.micros.split(",")):
            continue
        with stages.stage(f"checks/{key}", 25) as ok:
            if ok:
                checks[key] = measure()
                log(f"{key}: {json.dumps(checks[key])}")
                save_checks()
    for model, names in plan_of(args):
        model_name = "tiny" if args.tiny else model
        current["model"] = model_name
        bench = None
        with stages.stage(f"{model}/build", BUILD_ESTIMATE.get(model_name, 30)) as ok:
            if ok:
                started = time.perf_counter()
                bench = ModelBench(torch, args, model_name, device, env, rows, checks, save_checks)
                bench.deadline = deadline
                if "bf16_eager" not in names:
                    bench.ensure_reference()
                checks.setdefault("build_s", {})[model] = round(time.perf_counter() - started, 1)
        if bench is None:
            continue
        for name in names:
            config = CONFIGS[name]
            estimate = config.estimate.get(model_name, 5 if args.tiny else 60)
            with stages.stage(f"{model}/{name}", estimate) as ok:
                if ok:
                    row = bench.run(config)
                    targets = ["speed", "everywhere"] if config.issue == "both" else [config.issue]
                    for target in targets:
                        rows[target].add(row)
                    log(f"{model}/{name}: " + ", ".join(f"{k}={row.get(k)}" for k in (
                        "first_image_s", "latency_s", "transformer_ms_per_step", "peak_vram_gb", "energy_per_image_j",
                        "step_rel_error_vs_bf16", "fp8_path")))
            checks["stages"] = stages.done
            save_checks()
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    columns = ("model", "config", "first_image_s", "latency_s", "transformer_ms_per_step", "peak_vram_gb",
               "energy_per_image_j", "step_rel_error_vs_bf16", "cache")
    for target in ("speed", "everywhere"):
        print(f"== {target}")
        print_table(rows[target].rows, columns)
    log(f"all done in {deadline.elapsed():.0f} s; stages: {json.dumps(stages.done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
