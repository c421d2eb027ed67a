"""Reload what was written, through the libraries users load it with, and prove it is what was computed."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from sd35fp8.fp8 import dequantize_blockwise
from sd35fp8.generate import GenerationRequest, generate
from sd35fp8.loading import VARIANT, LoadError, load_pipeline, module_bytes
from sd35fp8.metrics import psnr, ssim

from .checkpoint import SafetensorsReader
from .quantize import ComponentResult, tensor_digest

VERIFY_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a red fox in a snowy forest",
    "a close-up portrait of an old fisherman, dramatic light",
    "a futuristic city skyline at night, neon reflections on wet streets",
]


class VerificationError(RuntimeError):
    """What was written does not reload to what was computed; nothing may be published."""


@dataclass
class Verification:
    components: dict[str, dict] = field(default_factory=dict)
    pipeline: dict = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)

    @property
    def mean_ssim(self) -> float | None:
        return sum(i["ssim"] for i in self.images) / len(self.images) if self.images else None

    @property
    def mean_psnr(self) -> float | None:
        return sum(i["psnr"] for i in self.images) / len(self.images) if self.images else None


def _reload(out_dir: Path, result: ComponentResult, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    component = result.plan.component
    if component.library == "diffusers":
        import diffusers

        model = getattr(diffusers, component.class_name).from_pretrained(
            out_dir, subfolder=component.name, variant=VARIANT, dtype=dtype)
        # On the CPU, `.to("cpu")` would make quanto copy every FP8 weight out of the memory-mapped files (2x RSS).
        return model if device.type == "cpu" else model.to(device)
    import transformers

    model_class = getattr(transformers, component.class_name)
    return model_class.from_pretrained(out_dir / component.name, variant=VARIANT, dtype=dtype, device_map=str(device))


def _compare_tensors(model: torch.nn.Module, result: ComponentResult) -> dict:
    """Every written tensor must reload unchanged (FP8 layers that the library dequantized: to within rounding)."""
    state = model.state_dict()
    written = SafetensorsReader([f for f in result.files if f.suffix == ".safetensors"])
    exact, dequantized, worst = 0, 0, 0.0
    for name, expected_digest in result.digests.items():
        if name.endswith(".weight_scale_inv") and name not in state:
            continue
        if name not in state:
            raise VerificationError(f"{result.plan.component.name}: '{name}' was written but is not in the reloaded model.")
        loaded = state[name]
        if loaded.device.type == "meta":
            raise VerificationError(f"{result.plan.component.name}: '{name}' was left on 'meta' after reloading.")
        if tensor_digest(loaded.cpu()) == expected_digest:
            exact += 1
            continue
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        if scale_name in result.digests:  # transformers dequantizes FP8 weights where it has no FP8 kernel
            reference = dequantize_blockwise(written.read(name), written.read(scale_name))
            error = float((loaded.cpu().float() - reference).norm() / reference.norm().clamp(min=1e-30))
            worst = max(worst, error)
            if error < 1e-2:
                dequantized += 1
                continue
        raise VerificationError(f"{result.plan.component.name}: '{name}' reloads with different values.")
    return {"tensors_identical": exact, "tensors_dequantized_on_load": dequantized, "worst_dequant_error": worst}


@torch.no_grad()
def _probe(model: torch.nn.Module) -> torch.Tensor | None:
    """One forward pass on fixed inputs, for the models we know how to feed."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    weight = next(p for p in model.parameters() if p.is_floating_point())
    device, dtype = weight.device, weight.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if model.__class__.__name__ == "SD3Transformer2DModel":
        size = 4 * config.patch_size
        latents, text = randn(1, config.in_channels, size, size), randn(1, 8, config.joint_attention_dim)
        pooled = randn(1, config.pooled_projection_dim)
        return model(latents, text, pooled, torch.tensor([500.0], device=device)).sample
    if hasattr(model, "encoder") and hasattr(config, "vocab_size"):
        ids = torch.randint(2, config.vocab_size, (1, 8), generator=generator).to(device)
        return model(ids).last_hidden_state
    return None


def verify_component(out_dir: Path, result: ComponentResult, dtype: torch.dtype, device: torch.device) -> dict:
    """Reload one converted component from disk onto `device` and check its tensors and a forward pass."""
    model = _reload(out_dir, result, dtype, device).eval()
    report = _compare_tensors(model, result)
    output = _probe(model)
    if output is not None:
        if not torch.isfinite(output).all():
            raise VerificationError(f"{result.plan.component.name}: the reloaded model's output is not finite.")
        report["probe_output_finite"] = True
    report["reloaded_bytes"] = module_bytes(model)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def _fits_in_ram(out_dir: Path, device: torch.device) -> bool:
    if device.type != "cpu":
        return True
    needed = sum(f.stat().st_size for f in out_dir.rglob("*.safetensors")) * 2.2  # FP8 T5 dequantizes on CPU
    return needed < psutil.virtual_memory().available


def verify_pipeline(out_dir: Path, source: str, device: torch.device, dtype: torch.dtype,
                    images: int, size: int, steps: int) -> Verification:
    """Load the whole FP8 pipeline as users will, generate once; with `images`, compare FP8 vs 16-bit images."""
    report = Verification()
    if not _fits_in_ram(out_dir, device):
        report.pipeline = {"skipped": "not enough free RAM to load the whole pipeline on the CPU; run with --device cuda"}
        return report
    settings = dict(steps=steps, width=size, height=size, guidance=4.5)
    prompts = [(VERIFY_PROMPTS[i % len(VERIFY_PROMPTS)], i) for i in range(max(images, 1))]
    fp8_images = _generate_all(str(out_dir), "fp8", device, dtype, prompts, settings, report)
    if images:
        precision = "fp16" if dtype == torch.float16 else "bf16"
        base_images = _generate_all(source, precision, device, dtype, prompts, settings, None)
        report.images = [
            {"prompt": prompt, "seed": seed, "ssim": ssim(a, b), "psnr": psnr(a, b)}
            for (prompt, seed), a, b in zip(prompts, fp8_images, base_images)
        ]
    return report


def _generate_all(source, precision, device, dtype, prompts, settings, report: Verification | None):
    try:
        loaded = load_pipeline(source, precision, device=device, dtype=dtype, fp8_path="quanto")
    except LoadError as error:
        raise VerificationError(f"the written pipeline does not load: {error}") from None
    images = []
    for prompt, seed in prompts:
        result = generate(loaded, GenerationRequest(prompt, seed=seed, **settings))
        if not result.finite:
            raise VerificationError(f"the {precision} pipeline produced a non-finite image for {prompt!r}.")
        images.append(result.image)
    if report is not None:
        report.pipeline = {"loaded": True, "image_finite": True, "load_seconds": round(loaded.load_seconds, 2)}
    del loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images
