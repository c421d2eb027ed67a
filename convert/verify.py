"""Reload what was written, through the libraries users load it with, and prove it is what was computed.

Each converted component is reloaded on its own (every written tensor must come back as written, FP8 T5 weights
that transformers expands to 16-bit to within rounding; a forward pass must be finite). Then the whole pipeline is
loaded exactly as the model card says (stock diffusers, `variant="fp8"`, the card's dtype) and generates a small
image in a few steps, at a size the model takes (derived from its configs).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from sd35fp8.errors import BadInput, Failure
from sd35fp8.fp8 import dequantize_blockwise
from sd35fp8.loading import VARIANT, check_loaded, module_bytes
from sd35fp8.metrics import psnr, ssim
from sd35fp8.settings import CONVERSION, LIMITS, VERIFY_PROMPTS

from .checkpoint import SafetensorsReader, read_json_object
from .quantize import ComponentResult, tensor_digest
from .source import Source

GUIDANCE = 4.5
T5_TOKENS, CLIP_TOKENS, PROBE_TEXT_TOKENS, PROBE_PATCHES = 256, 77, 8, 4


class VerificationError(Failure):
    """What was written does not reload to what was computed; nothing may be published."""


@dataclass(frozen=True)
class ImageSizes:
    """The square image sizes a pipeline takes: multiples of `unit` from `unit` to `largest` pixels."""

    unit: int  # transformer patch size x VAE scale factor
    largest: int  # the positional embedding's size x unit (or the project's largest size)

    @classmethod
    def of(cls, source: Source) -> ImageSizes:
        """The sizes the source's transformer and VAE allow (from their configs; no weight is read)."""
        config = source.components["transformer"].config()
        patch, grid = config.get("patch_size", 2), config.get("pos_embed_max_size")
        vae = source.components.get("vae")
        scale = 2 ** (len(vae.config().get("block_out_channels", [0] * 4)) - 1) if vae else 8
        unit = patch * scale
        largest = grid * unit if grid else LIMITS.size[1] // unit * unit
        return cls(unit, max(unit, largest))

    def fit(self, target: int) -> int:
        """The allowed size nearest to `target`."""
        return min(max(self.unit, round(target / self.unit) * self.unit), self.largest)

    def check(self, size: int, setting: str) -> int:
        """`size` if the pipeline takes it, else BadInput naming `setting` and the allowed sizes."""
        if not (self.unit <= size <= self.largest and size % self.unit == 0):
            raise BadInput(f"{setting} {size}: this pipeline takes multiples of {self.unit} from {self.unit} to "
                           f"{self.largest} (e.g. {self.fit(size)}).")
        return size

    def tokens(self, size: int) -> int:
        """Image tokens the transformer sees at `size` x `size` (one per patch of the latent)."""
        return (size // self.unit) ** 2


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
    """Every written tensor must be on disk as computed and reload unchanged (in the dtype loaded; FP8 layers that
    the library dequantized: to within rounding); every tensor of the model must have been written."""
    name_of = result.plan.component.name
    state = model.state_dict()
    written = SafetensorsReader([f for f in result.files if f.suffix == ".safetensors"])
    exact, dequantized, worst = 0, 0, 0.0
    for name, expected_digest in result.digests.items():
        disk = written.read(name)
        if tensor_digest(disk) != expected_digest:
            raise VerificationError(f"{name_of}: '{name}' reads back from disk different from what was written "
                                    "(a disk or memory fault?): nothing was published; run the conversion again.")
        if name.endswith(".weight_scale_inv") and name not in state:
            continue
        if name not in state:
            raise VerificationError(f"{name_of}: '{name}' was written but is not in the reloaded model.")
        loaded = state[name]
        if loaded.device.type == "meta":
            raise VerificationError(f"{name_of}: '{name}' was left on 'meta' after reloading.")
        loaded = loaded.cpu()
        if loaded.dtype == disk.dtype and tensor_digest(loaded) == expected_digest:
            exact += 1
            continue
        if loaded.dtype != disk.dtype and disk.dtype.itemsize > 1 and torch.equal(loaded, disk.to(loaded.dtype)):
            exact += 1
            continue
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        if scale_name in result.digests:  # transformers dequantizes FP8 weights where it has no FP8 kernel
            reference = dequantize_blockwise(disk, written.read(scale_name))
            error = float((loaded.float() - reference).norm() / reference.norm().clamp(min=1e-30))
            worst = max(worst, error)
            if error < 1e-2:
                dequantized += 1
                continue
        raise VerificationError(f"{name_of}: '{name}' reloads with different values.")
    written_storage = {state[n].untyped_storage().data_ptr() for n in result.digests if n in state}
    unwritten = [n for n, t in state.items()
                 if n not in result.digests and t.untyped_storage().data_ptr() not in written_storage]
    if unwritten:
        raise VerificationError(f"{name_of}: the reloaded model has {len(unwritten)} tensors the files do not hold "
                                f"(e.g. '{unwritten[0]}'), left at their initial values: the source lacks them.")
    return {"tensors_identical": exact, "tensors_dequantized_on_load": dequantized, "worst_dequant_error": worst}


@torch.no_grad()
def _probe(model: torch.nn.Module) -> torch.Tensor | None:
    """One forward pass on fixed inputs, for the models we know how to feed."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    weight = next(p for p in model.parameters() if p.is_floating_point() and p.element_size() > 1)
    device, dtype = weight.device, weight.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if model.__class__.__name__ == "SD3Transformer2DModel":
        size = min(PROBE_PATCHES, config.pos_embed_max_size or PROBE_PATCHES) * config.patch_size
        latents = randn(1, config.in_channels, size, size)
        text = randn(1, PROBE_TEXT_TOKENS, config.joint_attention_dim)
        pooled = randn(1, config.pooled_projection_dim)
        return model(latents, text, pooled, torch.tensor([500.0], device=device)).sample
    if hasattr(model, "encoder") and hasattr(config, "vocab_size"):
        ids = torch.randint(2, config.vocab_size, (1, PROBE_TEXT_TOKENS), generator=generator).to(device)
        return model(ids).last_hidden_state
    return None


def verify_component(out_dir: Path, result: ComponentResult, dtype: torch.dtype, device: torch.device) -> dict:
    """Reload one converted component from disk onto `device` and check its tensors and a forward pass."""
    started = time.perf_counter()
    try:
        model = _reload(out_dir, result, dtype, device).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise VerificationError(f"{result.plan.component.name}: the written files do not reload: "
                                f"{type(error).__name__}: {error}") from None
    reloaded = time.perf_counter()
    report = _compare_tensors(model, result)
    probe_started = time.perf_counter()
    output = _probe(model)
    if output is not None:
        if not torch.isfinite(output).all():
            raise VerificationError(f"{result.plan.component.name}: the reloaded model's output is not finite.")
        report["probe_output_finite"] = True
    report["probe_seconds"] = round(time.perf_counter() - probe_started, 3)
    report["reload_seconds"] = round(reloaded - started, 3)
    report["reloaded_bytes"] = module_bytes(model)
    del model
    _free(device)
    return report


def estimate_seconds(components: dict[str, dict], total_bytes: int, sizes: ImageSizes, size: int, steps: int,
                     images: int = 1, loads: int = 1) -> float:
    """Roughly how long loading the pipeline `loads` times and making `images` images takes, from how long the
    component checks took: loading scales with bytes, a step with the transformer's tokens (two passes: CFG)."""
    reloaded = sum(c["reloaded_bytes"] for c in components.values())
    load = sum(c["reload_seconds"] for c in components.values()) * total_bytes / max(reloaded, 1)
    seconds = load * loads
    transformer, t5 = components.get("transformer"), components.get("text_encoder_3")
    if transformer:
        per_token = transformer["probe_seconds"] / (PROBE_PATCHES**2 + PROBE_TEXT_TOKENS)
        seconds += images * steps * 2 * per_token * (sizes.tokens(size) + CLIP_TOKENS + T5_TOKENS)
    if t5:
        seconds += images * 2 * t5["probe_seconds"] * T5_TOKENS / PROBE_TEXT_TOKENS
    return seconds


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fits_in_ram(out_dir: Path, device: torch.device) -> bool:
    if device.type != "cpu":
        return True
    needed = sum(f.stat().st_size for f in out_dir.rglob("*.safetensors")) * 2.2  # FP8 T5 dequantizes on CPU
    return needed < psutil.virtual_memory().available


def absent_components(folder: Path) -> list[str]:
    """The components model_index.json sets to null that diffusers still wants named (`text_encoder_3=None` for a
    pipeline without T5): the card's snippet passes them, as `load_as_card_says` does."""
    from diffusers import StableDiffusion3Pipeline

    index = read_json_object(Path(folder) / "model_index.json", "pipeline index")
    return [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
            and value[:1] == [None] and name not in StableDiffusion3Pipeline._optional_components]


def load_as_card_says(folder: Path, dtype: torch.dtype, device: torch.device, fp8: bool = True):
    """The pipeline in `folder`, loaded with stock diffusers exactly as the model card's snippet does."""
    from diffusers import StableDiffusion3Pipeline

    absent = dict.fromkeys(absent_components(folder))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), variant=VARIANT if fp8 else None, dtype=dtype, **absent)
    check_loaded(pipe)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            stray = sorted({str(p.dtype).removeprefix("torch.") for p in component.parameters()
                            if p.is_floating_point() and p.element_size() > 1 and p.dtype != dtype})
            if stray:
                raise VerificationError(f"{name} loads partly as {', '.join(stray)} although the card asks for "
                                        f"{str(dtype).removeprefix('torch.')}: its first prompt would fail.")
    if device.type != "cpu":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt: str, seed: int, size: int, steps: int, what: str) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=GUIDANCE,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    if not np.isfinite(image).all():
        raise VerificationError(f"the {what} pipeline produced a non-finite image for {prompt!r}.")
    return image


def verify_pipeline(out_dir: Path, source: Source, device: torch.device, sizes: ImageSizes, images: int,
                    size: int, steps: int) -> Verification:
    """Load the whole FP8 pipeline as the model card says and generate a small image; with `images`, also
    compare FP8 with 16-bit images of the same prompts and seeds (SSIM, PSNR)."""
    report = Verification()
    if not _fits_in_ram(out_dir, device):
        report.pipeline = {"skipped": "not enough free RAM to load the whole pipeline on the CPU; run with --device cuda"}
        return report
    dtype = CONVERSION.variant_dtype
    check_size, check_steps = sizes.fit(CONVERSION.load_check_size), CONVERSION.load_check_steps
    started = time.perf_counter()
    try:
        pipe = load_as_card_says(out_dir, dtype, device)
        loaded = time.perf_counter()
        _image(pipe, VERIFY_PROMPTS[0], 0, check_size, check_steps, "FP8")
    except VerificationError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise VerificationError(f"the written pipeline does not load and run as the model card says: "
                                f"{type(error).__name__}: {error}") from None
    report.pipeline = {"loaded": True, "image_finite": True, "dtype": str(dtype).removeprefix("torch."),
                       "size": check_size, "steps": check_steps, "load_seconds": round(loaded - started, 2),
                       "generate_seconds": round(time.perf_counter() - loaded, 2)}
    if images:
        prompts = [(VERIFY_PROMPTS[i % len(VERIFY_PROMPTS)], i) for i in range(images)]
        fp8_images = [_image(pipe, prompt, seed, size, steps, "FP8") for prompt, seed in prompts]
        del pipe
        _free(device)
        try:
            pipe = load_as_card_says(source.path, dtype, device, fp8=False)
        except VerificationError:
            raise
        except (OSError, ValueError) as error:
            raise VerificationError(f"the 16-bit source does not load for the comparison: {error}") from None
        base_images = [_image(pipe, prompt, seed, size, steps, "16-bit") for prompt, seed in prompts]
        report.images = [
            {"prompt": prompt, "seed": seed, "ssim": ssim(a, b), "psnr": psnr(a, b)}
            for (prompt, seed), a, b in zip(prompts, fp8_images, base_images)
        ]
    del pipe
    _free(device)
    return report
