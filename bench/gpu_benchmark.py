"""GPU benchmark: full-size SD3.5 Large / Medium with RANDOM weights, bf16 vs FP8, through the project's own code.

What it does, in order (each stage through the code users run, no benchmark-only model path):
  1. checks the FP8 tensor-core layer (`sd35fp8.fp8.Fp8Linear`, torch._scaled_mm, row-wise scales, bias)
     against a bf16 linear and measures the GPU's matmul / attention ceilings;
  2. builds each model's pipeline from the configs in bench/configs/ (published SD3.5 shapes: MMDiT, T5-XXL,
     CLIP-L/G, SD3 VAE) with random weights and writes it as a diffusers folder (16-bit safetensors);
  3. converts that folder with the project's converter (`python -m convert SRC --out DST --device cuda`);
  4. loads each configuration with `sd35fp8.loading.load_pipeline` and generates with `sd35fp8.generate.generate`
     (1024x1024, 28 steps, CFG 4.5): latency, transformer ms/step, images/min at batch 4, model memory and peak
     VRAM, energy/power/temperature (NVML via `sd35fp8.gpu.GpuSampler`), load time, and fidelity against bf16
     on identical inputs (relative error of one transformer step, SSIM/PSNR of the final images).

The weights are random, so the images are noise and the fidelity figures only say how far FP8 arithmetic moves
the same computation; they say nothing about image quality of the real model.

Each configuration's row is written to RESULTS/gpu_<model>.json as soon as it is measured.
`--tiny` runs the same stages end to end on the CPU with the tiny pipeline's shapes (for testing this script).

Usage (GPU):   python bench/gpu_benchmark.py --work /root/work --deadline-s 1380
Usage (CPU):   python bench/gpu_benchmark.py --tiny --work /tmp/benchwork
Poll mode (no torch import): python bench/gpu_benchmark.py --poll /root/work --poll-seconds 540 --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CONFIG_DIR = ROOT / "bench" / "configs"
MODEL_DIRS = {"large": "sd35_large", "medium": "sd35_medium", "tiny": "tiny"}
PROMPT = "a photo of an astronaut riding a horse on the moon"
GIB = 2**30


@dataclass(frozen=True)
class BenchConfig:
    name: str
    precision: str  # "bf16" or "fp8"
    fp8_path: str | None  # "scaled_mm", "quanto", "dequant" for fp8
    compiled: bool

    @property
    def label(self) -> str:
        return self.name


ALL_CONFIGS = {
    "bf16": BenchConfig("bf16", "bf16", None, False),
    "fp8_scaled_mm": BenchConfig("fp8_scaled_mm", "fp8", "scaled_mm", False),
    "fp8_quanto": BenchConfig("fp8_quanto", "fp8", "quanto", False),
    "bf16_compile": BenchConfig("bf16_compile", "bf16", None, True),
    "fp8_scaled_mm_compile": BenchConfig("fp8_scaled_mm_compile", "fp8", "scaled_mm", True),
}
# Priority order (the issue's): Large first, all five; then Medium without compile.
DEFAULT_PLAN = {
    "large": ["bf16", "fp8_scaled_mm", "fp8_quanto", "bf16_compile", "fp8_scaled_mm_compile"],
    "medium": ["bf16", "fp8_scaled_mm", "fp8_quanto"],
    "tiny": ["bf16", "fp8_scaled_mm", "fp8_quanto", "bf16_compile", "fp8_scaled_mm_compile"],
}
# Rough seconds each stage takes on an H100 (for the deadline; see bench/NOTES.md).
ESTIMATE_S = {
    "large": {"prepare": 330, "eager": 75, "compiled": 170, "batch4_compiled": 110},
    "medium": {"prepare": 160, "eager": 45, "compiled": 120, "batch4_compiled": 60},
    "tiny": {"prepare": 1, "eager": 1, "compiled": 1, "batch4_compiled": 1},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ poll mode


def poll(work: Path, seconds: float, out: Path | None) -> int:
    """Wait until the background run writes DONE (or `seconds` pass); copy results and the log tail to `out`."""
    started = time.monotonic()
    done = work / "DONE"
    while time.monotonic() - started < seconds and not done.exists():
        time.sleep(3)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted((work / "results").glob("gpu_*.json")):
            shutil.copy2(path, out / path.name)
        log_path = work / "log"
        if log_path.exists():
            data = log_path.read_bytes()
            (out / "log_tail.txt").write_bytes(data[-400_000:])
    log_path = work / "log"
    if log_path.exists():
        lines = log_path.read_text(errors="replace").splitlines()
        print("\n".join(line[-300:] for line in lines[-45:]))
    print("DONE" if done.exists() else f"still running after {time.monotonic() - started:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------------ helpers


class Deadline:
    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, needed: float, reserve: float = 0.0) -> bool:
        return self.left() >= needed + reserve


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def gb(value) -> float | None:
    return None if value is None else round(value / 1e9, 3)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def environment(torch, device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for package in ("diffusers", "transformers", "optimum-quanto", "accelerate", "safetensors", "huggingface-hub",
                    "triton"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    sm_count=props.multi_processor_count, gpu_memory_gb=gb(props.total_memory))
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            info["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
        except Exception as error:  # noqa: BLE001 - report, don't fail
            info["driver"] = f"unknown ({error})"
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ------------------------------------------------------------------------------------------------ shims


def disable_quanto_cuda_extension() -> str:
    """Keep quanto from JIT-building its CUDA extension (Marlin FP8) when weights move to the GPU.

    With the extension registered, `.to("cuda")` turns every qfloat8 weight into a MarlinF8QBytesTensor: it compiles
    the extension with nvcc first (minutes) and repacks `_data` into Marlin's int32 layout, which
    `Fp8Linear.from_quanto` would then read as if it were plain E4M3 (see bench/NOTES.md). Without it quanto runs
    its portable path: dequantize each weight, then a bf16 matmul.
    """
    try:
        from optimum.quanto.library.extensions import extension
    except ImportError:
        return "optimum-quanto not installed"
    removed = extension._extensions.pop("quanto_cuda", None)
    return "quanto_cuda extension disabled (dequantize + bf16 matmul)" if removed else "no quanto_cuda extension"


# ------------------------------------------------------------------------------------------------ stage 1: checks


def cuda_median_ms(torch, fn, iters: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_fp8_linear(torch, device) -> dict:
    """Fp8Linear (scaled_mm) vs a bf16 linear and vs the exact product of its own quantized operands; bias check."""
    from torch import nn

    from sd35fp8.fp8 import FP8_MAX, Fp8Linear, quanto_quantize
    from sd35fp8.metrics import relative_error

    report = {}
    generator = torch.Generator().manual_seed(0)
    for rows, k, n in ((666, 2432, 9728), (8192, 2432, 2432), (2, 2432, 14592)):
        key = f"M{rows}_K{k}_N{n}"
        try:
            linear = nn.Linear(k, n, bias=True)
            with torch.no_grad():
                linear.weight.normal_(0, 0.02, generator=generator)
                linear.bias.normal_(0, 0.5, generator=generator)
            linear = linear.to(torch.bfloat16)
            bias = linear.bias.detach().clone()
            reference_linear = nn.Linear(k, n).to(torch.bfloat16)
            reference_linear.load_state_dict(linear.state_dict())
            holder = nn.Sequential(linear)
            quanto_quantize(holder)
            fp8 = Fp8Linear.from_quanto(holder[0], "scaled_mm").to(device)
            reference_linear = reference_linear.to(device)
            x = (torch.randn(rows, k, generator=generator) * 3).to(device, torch.bfloat16)
            with torch.no_grad():
                out = fp8(x)
                ref = reference_linear(x)
                # exact product of the quantized operands (what the kernel should compute), in float64
                xs = (x.double().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
                xq = (x.double() / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * xs
                wq = fp8.weight.double() * fp8.weight_scale.double().reshape(-1, 1)
                exact = xq @ wq.t() + fp8.bias.double()
                fp8.bias = None
                no_bias = fp8(x)
            report[key] = {
                "rel_error_vs_bf16_linear": relative_error(out, ref),
                "rel_error_vs_exact_quantized_product": relative_error(out, exact),
                "bias_applied_rel_error": relative_error(out - no_bias, bias.to(device).expand_as(out)),
                "finite": bool(torch.isfinite(out).all()),
            }
        except Exception as error:  # noqa: BLE001 - the exact error is the finding
            report[key] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
    return report


def measure_ceilings(torch, device) -> dict:
    """bf16 matmul, FP8 row-wise _scaled_mm, SDPA at the Large attention shape, and device copy bandwidth."""
    import torch.nn.functional as F

    out = {}
    try:
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = cuda_median_ms(torch, lambda: a @ b)
        out["bf16_matmul_8192_tflops"] = round(2 * n**3 / ms / 1e9, 1)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        sa = torch.ones(n, 1, device=device)
        sb = torch.ones(1, n, device=device)
        ms = cuda_median_ms(torch, lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
        out["fp8_rowwise_scaled_mm_8192_tflops"] = round(2 * n**3 / ms / 1e9, 1)
        for name, heads in (("large", 38), ("medium", 24)):
            q = torch.randn(2, heads, 4429, 64, device=device, dtype=torch.bfloat16)
            ms = cuda_median_ms(torch, lambda: F.scaled_dot_product_attention(q, q, q))
            out[f"sdpa_{name}_2x{heads}x4429x64_tflops"] = round(4 * 2 * heads * 4429**2 * 64 / ms / 1e9, 1)
        big = torch.empty(2**30, dtype=torch.uint8, device=device)
        other = torch.empty_like(big)
        ms = cuda_median_ms(torch, lambda: other.copy_(big))
        out["copy_tb_s_read_plus_write"] = round(2 * 2**30 / ms / 1e9, 2)
    except Exception as error:  # noqa: BLE001
        out["error"] = f"{type(error).__name__}: {error}"
    torch.cuda.empty_cache()
    return out


def transformer_flops(torch, transformer_config: dict, height: int, width: int, text_tokens: int = 333) -> dict:
    """FLOPs of one CFG step (batch 2), counted by torch's FlopCounterMode on a meta-device copy of the model."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(transformer_config)
    cfg = model.config
    lat = torch.empty(2, cfg.in_channels, height // 8, width // 8, device="meta")
    text = torch.empty(2, text_tokens, cfg.joint_attention_dim, device="meta")
    pooled = torch.empty(2, cfg.pooled_projection_dim, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(hidden_states=lat, encoder_hidden_states=text, pooled_projections=pooled,
              timestep=torch.empty(2, device="meta"))
    by_op = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    attention = by_op.get("aten.bmm", 0) + sum(v for k, v in by_op.items() if "attention" in k)
    params = sum(p.numel() for p in model.parameters())
    total = counter.get_total_flops()
    return {"params": params, "flops_per_cfg_step": total, "attention_flops": attention,
            "linear_flops": total - attention, "by_op": by_op}


# ------------------------------------------------------------------------------------------------ stage 2: build


def component_configs(model: str) -> dict[str, dict]:
    """Config dicts of every component: bench/configs/<model>/<component>/, else bench/configs/sd35_common/."""
    if model == "tiny":
        from sd35fp8.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
        configs = {name: dict(getattr(pipe, name).config) for name in ("transformer", "vae")}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            configs[name] = getattr(pipe, name).config.to_dict()
        configs["scheduler"] = dict(pipe.scheduler.config)
        return configs
    configs = {}
    for name, filename in (("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                           ("text_encoder_2", "config.json"), ("text_encoder_3", "config.json"),
                           ("scheduler", "scheduler_config.json")):
        for folder in (CONFIG_DIR / MODEL_DIRS[model] / name, CONFIG_DIR / "sd35_common" / name):
            if (folder / filename).is_file():
                configs[name] = json.loads((folder / filename).read_text())
                break
        else:
            raise FileNotFoundError(f"no {name}/{filename} under bench/configs/{MODEL_DIRS[model]} or sd35_common")
    return configs


def write_random_pipeline(torch, model: str, out: Path, device, dtype) -> dict:
    """Build every component from its config with the libraries' own random init, on `device`, and save the
    pipeline as a 16-bit diffusers folder (what a base SD3.5 repo holds)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35fp8.tiny import _clip_tokenizer, _t5_tokenizer

    configs = component_configs(model)
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            transformer = SD3Transformer2DModel.from_config(configs["transformer"])
            vae = AutoencoderKL.from_config(configs["vae"])
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder"]))
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
            t5 = T5EncoderModel(T5Config.from_dict(configs["text_encoder_3"]))
    finally:
        torch.set_default_dtype(previous)
    modules = {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g,
               "text_encoder_3": t5}
    for module in modules.values():
        module.to(dtype).eval()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    built = time.perf_counter() - started
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        text_encoder=clip_l, tokenizer=_clip_tokenizer(), text_encoder_2=clip_g, tokenizer_2=_clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=_t5_tokenizer(),
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    del pipe, modules, transformer, vae, clip_l, clip_g, t5
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "build_s": round(built, 1), "build_and_write_s": round(time.perf_counter() - started, 1),
            "disk_bytes": disk_bytes(out)}


def run_converter(src: Path, dst: Path, device) -> dict:
    """`python -m convert SRC --out DST --device cuda|cpu --overwrite`, in this process (same shims)."""
    from convert.cli import main as convert_main

    started = time.perf_counter()
    code = convert_main([str(src), "--out", str(dst), "--device", device.type, "--overwrite"])
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"python -m convert exited with {code}")
    report_path = dst / "fp8_conversion.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return {"convert_s": round(seconds, 1), "disk_bytes": disk_bytes(dst), "report": report}


# ------------------------------------------------------------------------------------------------ stage 3: measure


def step_inputs(torch, pipe, device, height: int, width: int) -> dict:
    """Fixed inputs of one CFG transformer step, from the bf16 pipeline's own prompt encoding (kept on the CPU)."""
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, prompt_3=None, device=device,
                                                do_classifier_free_guidance=True, negative_prompt="",
                                                max_sequence_length=256)
    generator = torch.Generator().manual_seed(1234)
    channels = pipe.transformer.config.in_channels
    latents = torch.randn(1, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor,
                          generator=generator)
    return {"latents": latents.to(pe.dtype), "embeds": torch.cat([npe, pe]).cpu(),
            "pooled": torch.cat([nppe, ppe]).cpu(), "timestep": 500.0}


def transformer_step(torch, pipe, inputs: dict, device):
    """One CFG step exactly as the pipeline calls the transformer (same kwargs, dtypes and strides)."""
    latents = inputs["latents"].to(device, inputs["embeds"].dtype)
    latent_model_input = torch.cat([latents] * 2)
    timestep = torch.tensor(inputs["timestep"], device=device).expand(latent_model_input.shape[0])
    with torch.no_grad():
        return pipe.transformer(
            hidden_states=latent_model_input, timestep=timestep,
            encoder_hidden_states=inputs["embeds"].to(device), pooled_projections=inputs["pooled"].to(device),
            joint_attention_kwargs=pipe.joint_attention_kwargs, return_dict=False,
        )[0]


def kernel_profile(torch, pipe, inputs: dict, device, top: int = 14) -> dict:
    """Where one transformer step's GPU time goes: totals per kernel family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        transformer_step(torch, pipe, inputs, device)
        torch.cuda.synchronize(device)
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = getattr(event, "self_cuda_time_total", 0)
        if us and us > 0:
            kernels.append((event.key, us, event.count))
    kernels.sort(key=lambda item: -item[1])

    def family(name: str) -> str:
        lowered = name.lower()
        if lowered.startswith("triton_"):  # inductor's fused kernels (their names list the ops they absorbed)
            return "other (elementwise, norms, quantize, copies)"
        if any(s in lowered for s in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
            return "attention"
        if any(s in lowered for s in ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm", "sm90_", "matmul", "f8f8")):
            return "matmul"
        return "other (elementwise, norms, quantize, copies)"

    families: dict[str, float] = {}
    for name, us, _ in kernels:
        families[family(name)] = families.get(family(name), 0.0) + us
    total = sum(us for _, us, _ in kernels)
    return {
        "step_gpu_ms": round(total / 1000, 2),
        "by_family_ms": {k: round(v / 1000, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:140], "ms": round(us / 1000, 3), "calls": count}
                        for name, us, count in kernels[:top]],
    }


def release(torch, *objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelBench:
    """Measures every configuration of one model, writing RESULTS/gpu_<model>.json after each one."""

    def __init__(self, torch, args, model: str, bf16_dir: Path, fp8_dir: Path, device, env: dict, prep: dict,
                 results_path: Path, deadline: Deadline, reserve_s: float):
        self.torch, self.args, self.model = torch, args, model
        self.bf16_dir, self.fp8_dir, self.device, self.env, self.prep = bf16_dir, fp8_dir, device, env, prep
        self.results_path, self.deadline, self.reserve_s = results_path, deadline, reserve_s
        self.rows: list[dict] = []
        self.inputs: dict | None = None
        self.reference_step = None
        self.reference_images: dict[str, list] = {}
        self.cuda = device.type == "cuda"
        from sd35fp8.gpu import GpuSampler

        self.sampler = GpuSampler(device.index or 0)

    def request(self, **overrides):
        from sd35fp8.generate import GenerationRequest

        settings = dict(prompt=PROMPT, seed=42, steps=self.args.steps, guidance=4.5,
                        width=self.args.size, height=self.args.size, batch_size=1)
        settings.update(overrides)
        return GenerationRequest(**settings)

    def save(self) -> None:
        write_json(self.results_path, self.rows)

    def run(self, names: list[str]) -> None:
        est = ESTIMATE_S[self.model]
        for name in names:
            config = ALL_CONFIGS[name]
            needed = est["compiled"] if config.compiled else est["eager"]
            if not self.deadline.allows(needed, self.reserve_s):
                log(f"{self.model}/{name}: skipped, {self.deadline.left():.0f} s left, needs ~{needed} s "
                    f"+ {self.reserve_s:.0f} s reserved")
                self.rows.append(self.base_row(config) | {"skipped": "device-time budget ran short"})
                self.save()
                continue
            log(f"{self.model}/{name}: start ({self.deadline.left():.0f} s left)")
            try:
                row = self.measure(config)
            except Exception as error:  # noqa: BLE001 - record and go on with the next configuration
                log(f"{self.model}/{name}: FAILED {type(error).__name__}: {error}")
                traceback.print_exc()
                row = self.base_row(config) | {"error": f"{type(error).__name__}: {error}",
                                               "traceback": traceback.format_exc()[-3000:]}
            self.rows.append(row)
            self.save()
            if config.compiled:
                self.torch._dynamo.reset()
            release(self.torch)
            log(f"{self.model}/{name}: done; " + ", ".join(
                f"{k}={row.get(k)}" for k in ("latency_s", "transformer_ms_per_step", "peak_vram_gb",
                                              "energy_per_image_j", "step_rel_error_vs_bf16", "ssim_vs_bf16")))

    def base_row(self, config: BenchConfig) -> dict:
        return {
            "model": self.model, "config": config.name, "precision": config.precision, "fp8_path": config.fp8_path,
            "compiled": config.compiled, "width": self.args.size, "height": self.args.size, "steps": self.args.steps,
            "guidance": 4.5, "random_weights": True,
            "note": "random weights: images are noise; fidelity figures measure FP8 arithmetic, not image quality",
        }

    def measure(self, config: BenchConfig) -> dict:
        torch = self.torch
        from sd35fp8.generate import generate
        from sd35fp8.loading import load_pipeline
        from sd35fp8.metrics import psnr, relative_error, ssim

        row = self.base_row(config)
        cuda, device = self.cuda, self.device
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        source = self.bf16_dir if config.precision == "bf16" else self.fp8_dir
        loaded = load_pipeline(str(source), config.precision, device=device, dtype=torch.bfloat16,
                               fp8_path=config.fp8_path or "auto")
        row["load_s"] = round(loaded.load_seconds, 2)
        row["fp8_path_loaded"] = loaded.fp8_path
        row["component_bytes"] = loaded.component_bytes
        row["model_bytes_stored"] = sum(loaded.component_bytes.values())
        row["model_memory_gb"] = gb(torch.cuda.memory_allocated(device)) if cuda else gb(row["model_bytes_stored"])
        row["load_peak_vram_gb"] = gb(torch.cuda.max_memory_allocated(device)) if cuda else None
        pipe = loaded.pipe
        if config.compiled:
            transformer = pipe.transformer
            transformer.forward = torch.compile(transformer.forward, mode=self.args.compile_mode, dynamic=False)
            row["compile_mode"] = self.args.compile_mode
        # warm-up: same shapes as the measured runs, fewer steps (compiles here for the compiled configs)
        started = time.perf_counter()
        warm = generate(loaded, self.request(steps=self.args.warmup_steps))
        row["warmup_s"] = round(time.perf_counter() - started, 2)
        row["warmup_finite"] = warm.finite
        # fidelity: one transformer step on identical inputs
        if self.inputs is None:
            if config.precision != "bf16" or config.compiled:
                log("warning: step inputs come from a non-reference pipeline (bf16 eager was not run first)")
            self.inputs = step_inputs(torch, pipe, device, self.args.size, self.args.size)
        out = transformer_step(torch, pipe, self.inputs, device).float().cpu()
        row["step_output_finite"] = bool(torch.isfinite(out).all())
        if config.name == "bf16":
            self.reference_step = out
        elif self.reference_step is not None:
            row["step_rel_error_vs_bf16"] = round(relative_error(out, self.reference_step), 6)
        if cuda and self.args.profile:
            try:
                row["kernel_profile"] = kernel_profile(torch, pipe, self.inputs, device)
            except Exception as error:  # noqa: BLE001
                row["kernel_profile"] = {"error": f"{type(error).__name__}: {error}"}
        # timed generations, batch 1
        results = [generate(loaded, self.request(), sampler=self.sampler) for _ in range(self.args.repeats)]
        latencies = [r.latency_s for r in results]
        best = results[len(results) // 2]
        row.update(
            latency_s=round(statistics.median(latencies), 3), latency_runs_s=[round(v, 3) for v in latencies],
            transformer_ms_per_step=round(1000 * statistics.median(r.seconds_per_step for r in results), 2),
            peak_vram_gb=gb(max((r.peak_vram_bytes or 0) for r in results)) if cuda else None,
            peak_vram_reserved_gb=gb(torch.cuda.max_memory_reserved(device)) if cuda else None,
            image_finite=all(r.finite for r in results),
        )
        gpu = best.gpu or {}
        if gpu.get("available"):
            row.update(energy_per_image_j=_round(gpu.get("energy_j"), 1), avg_power_w=_round(gpu.get("avg_power_w"), 1),
                       peak_temperature_c=gpu.get("peak_temperature_c"), energy_source=gpu.get("energy_source"))
        else:
            row["gpu_sampler"] = gpu.get("reason", "no sampler")
        image = results[0].image
        if config.name == "bf16":
            self.reference_images["batch1"] = [image]
        elif self.reference_images.get("batch1"):
            reference = self.reference_images["batch1"][0]
            row["ssim_vs_bf16"] = round(ssim(image, reference), 5)
            row["psnr_vs_bf16_db"] = round(psnr(image, reference), 2)
        del results, warm
        # throughput at batch 4
        est = ESTIMATE_S[self.model]
        if config.compiled and not self.deadline.allows(est["batch4_compiled"], self.reserve_s):
            row["batch4_skipped"] = "device-time budget ran short (batch 4 recompiles the transformer)"
        elif self.args.batch4:
            started = time.perf_counter()
            if config.compiled:  # first call at the new shape compiles; measure the second
                generate(loaded, self.request(batch_size=4, steps=self.args.warmup_steps))
                row["batch4_compile_s"] = round(time.perf_counter() - started, 2)
            batch = generate(loaded, self.request(batch_size=4), sampler=self.sampler)
            row.update(latency_batch4_s=round(batch.latency_s, 3),
                       images_per_min_batch4=round(4 * 60 / batch.latency_s, 2),
                       transformer_ms_per_step_batch4=round(1000 * batch.seconds_per_step, 2),
                       peak_vram_batch4_gb=gb(batch.peak_vram_bytes) if cuda else None)
            gpu = batch.gpu or {}
            if gpu.get("available"):
                row.update(energy_per_image_batch4_j=_round(gpu.get("energy_j") / 4 if gpu.get("energy_j") else None, 1),
                           avg_power_batch4_w=_round(gpu.get("avg_power_w"), 1),
                           peak_temperature_batch4_c=gpu.get("peak_temperature_c"))
            row["batch4_images_finite"] = batch.finite
            del batch
        row.update(self.env)
        del loaded, pipe
        return row


def _round(value, digits):
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (tests this script end to end)")
    parser.add_argument("--models", default=None, help="comma-separated: large,medium (default both; tiny with --tiny)")
    parser.add_argument("--configs", default=None, help="comma-separated configuration names (default: the plan)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work", help="where pipelines and results go")
    parser.add_argument("--results", type=Path, default=None, help="results folder (default WORK/results)")
    parser.add_argument("--deadline-s", type=float, default=None, help="skip what would not finish within this")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-batch4", dest="batch4", action="store_false")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--keep", action="store_true", help="keep written pipelines (default: delete after each model)")
    parser.add_argument("--poll", type=Path, default=None, help="poll a background run's WORK folder and exit")
    parser.add_argument("--poll-seconds", type=float, default=540)
    parser.add_argument("--out", type=Path, default=None, help="with --poll: copy results and log tail here")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 128 if args.tiny else 1024
    if args.steps is None:
        args.steps = 4 if args.tiny else 28
    if args.warmup_steps > args.steps:
        args.warmup_steps = args.steps
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.poll is not None:
        return poll(args.poll, args.poll_seconds, args.out)
    deadline = Deadline(args.deadline_s)
    work = args.work.resolve()
    results_dir = (args.results or work / "results").resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "DONE").unlink(missing_ok=True)
    try:
        return _main(args, deadline, work, results_dir)
    finally:
        (work / "DONE").write_text(f"{deadline.elapsed():.0f} s\n")


def _main(args, deadline: Deadline, work: Path, results_dir: Path) -> int:
    import torch

    # import the project now: the tree on disk may change while this long run goes on
    import convert.cli  # noqa: F401
    import sd35fp8.generate  # noqa: F401
    import sd35fp8.gpu  # noqa: F401
    import sd35fp8.loading  # noqa: F401

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda:0")
    shims = {"quanto": disable_quanto_cuda_extension()}
    log(f"device {device}; shims: {shims}")
    env = environment(torch, device) | {"shims": shims}
    log(f"environment: {json.dumps(env)}")
    checks = {"environment": env}
    checks["fp8_linear"] = check_fp8_linear(torch, device)
    log(f"Fp8Linear check: {json.dumps({k: {kk: vv for kk, vv in v.items() if kk != 'traceback'} for k, v in checks['fp8_linear'].items()})}")
    if device.type == "cuda":
        checks["ceilings"] = measure_ceilings(torch, device)
        log(f"ceilings: {json.dumps(checks['ceilings'])}")
    write_json(results_dir / "gpu_checks.json", checks)

    models = (args.models.split(",") if args.models else (["tiny"] if args.tiny else ["large", "medium"]))
    for index, model in enumerate(models):
        later = models[index + 1:]
        reserve = sum(ESTIMATE_S[m]["prepare"] + len(DEFAULT_PLAN[m]) * ESTIMATE_S[m]["eager"] for m in later)
        names = args.configs.split(",") if args.configs else DEFAULT_PLAN[model]
        if device.type == "cpu" and not args.tiny:
            raise SystemExit("full-size models need a GPU; use --tiny on the CPU")
        est = ESTIMATE_S[model]
        if not deadline.allows(est["prepare"] + est["eager"], reserve if index == 0 else 0):
            log(f"{model}: skipped entirely, {deadline.left():.0f} s left")
            write_json(results_dir / f"gpu_{MODEL_DIRS[model]}.json",
                       [{"model": model, "skipped": "device-time budget ran short"}])
            continue
        bf16_dir, fp8_dir = work / f"{MODEL_DIRS[model]}-bf16", work / f"{MODEL_DIRS[model]}-fp8"
        prep: dict = {"model": model}
        try:
            flops = transformer_flops(torch, component_configs(model)["transformer"], args.size, args.size)
            prep["flops"] = flops
            log(f"{model}: transformer {flops['params'] / 1e9:.3f} B params, "
                f"{flops['flops_per_cfg_step'] / 1e12:.2f} TFLOP per CFG step")
        except Exception as error:  # noqa: BLE001
            prep["flops"] = {"error": f"{type(error).__name__}: {error}"}
        log(f"{model}: writing random-weight pipeline to {bf16_dir}")
        prep["write"] = write_random_pipeline(torch, model, bf16_dir, device, torch.bfloat16)
        log(f"{model}: written {prep['write']}")
        log(f"{model}: converting with python -m convert")
        prep["convert"] = run_converter(bf16_dir, fp8_dir, device)
        log(f"{model}: converted in {prep['convert']['convert_s']} s, {prep['convert']['disk_bytes'] / 1e9:.2f} GB")
        checks.setdefault("prepare", {})[model] = prep
        write_json(results_dir / "gpu_checks.json", checks)
        bench = ModelBench(torch, args, model, bf16_dir, fp8_dir, device, env, prep,
                           results_dir / f"gpu_{MODEL_DIRS[model]}.json", deadline, reserve)
        bench.run(names)
        for row in bench.rows:
            row.setdefault("prepare", {"write_s": prep["write"]["build_and_write_s"],
                                       "convert_s": prep["convert"]["convert_s"],
                                       "bf16_disk_gb": gb(prep["write"]["disk_bytes"]),
                                       "fp8_disk_gb": gb(prep["convert"]["disk_bytes"])})
        bench.save()
        print_table(bench.rows)
        del bench
        release(torch)
        if not args.keep:
            shutil.rmtree(bf16_dir, ignore_errors=True)
            shutil.rmtree(fp8_dir, ignore_errors=True)
    log(f"all done in {deadline.elapsed():.0f} s")
    return 0


def print_table(rows: list[dict]) -> None:
    columns = ("config", "load_s", "latency_s", "transformer_ms_per_step", "images_per_min_batch4", "model_memory_gb",
               "peak_vram_gb", "energy_per_image_j", "avg_power_w", "peak_temperature_c", "step_rel_error_vs_bf16",
               "ssim_vs_bf16", "psnr_vs_bf16_db")
    print(" | ".join(columns))
    for row in rows:
        if "skipped" in row or "error" in row:
            print(f"{row.get('config')} | {str(row.get('skipped') or row.get('error'))[:100]}")
            continue
        print(" | ".join(str(row.get(c, "-")) for c in columns))


if __name__ == "__main__":
    sys.exit(main())
