"""The model card (README.md) of an FP8 variant: Hub metadata, what was done, measured figures, load snippet."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from sd35fp8.hub import model_card_data
from sd35fp8.loading import format_bytes
from sd35fp8.settings import CONVERSION

from .quantize import ComponentResult
from .verify import Verification

HARDWARE_NOTE = (
    "FP8 tensor cores need compute capability 8.9 or newer (Ada: RTX 40xx, L4, L40S; Hopper: H100, H200; "
    "Blackwell). Stock diffusers runs the transformer with quanto's weight-only FP8 (memory halves, speed does "
    "not improve) and transformers expands T5 to 16-bit at load. On a CUDA GPU, optimum-quanto (0.2.7) repacks the "
    "FP8 weights for its Marlin kernel when they move to the GPU, which first compiles quanto's CUDA extension "
    "(it needs the CUDA toolkit's nvcc and ninja, and can take minutes, once per torch version). The SD3.5 FP8 "
    "project's `load_pipeline` needs neither: it keeps both in FP8 on the GPU and, on compute capability 8.9+, "
    "runs the transformer on FP8 tensor cores (on Hopper its attention too, through the project's FP8 attention "
    "kernel), compiled (the compiled blocks are kept on disk, so a restarted process skips compilation: first "
    "image of SD3.5 Large in about 4 s on an H200, measured with random weights) and replayed as CUDA graphs."
)


DTYPE_NAME = str(CONVERSION.variant_dtype).removeprefix("torch.")
T5_NOTE = f"""- **T5 encoder**: E4M3 with one scale per 128×128 block, in transformers' own FP8 checkpoint format
  (`model.fp8*.safetensors`), because transformers cannot load quanto checkpoints; its config says
  `dequantize: true`, so stock transformers expands it to 16-bit at load and needs no FP8 kernel download.
  Its other tensors (embeddings, norms, `wo`) are stored in {DTYPE_NAME}, which transformers keeps whatever dtype
  is asked for: hence the `text_encoder_3.to(dtype)` line above.
"""
TAGS = ["stable-diffusion-3.5", "fp8", "quanto", "text-to-image", "diffusers"]


def load_snippet(load_id: str, fp8_t5: bool, absent: list[str]) -> str:
    """The card's stock-diffusers load code; `fp8_t5`: T5 is stored FP8 and needs its dtype matched; `absent`:
    components the pipeline lacks, which diffusers wants named as None."""
    t5_line = (f"pipe.text_encoder_3.to(dtype)  # transformers keeps T5's 16-bit layers as stored ({DTYPE_NAME}): "
               "match the dtype asked for\n") if fp8_t5 else ""
    nones = "".join(f", {name}=None" for name in absent)
    return f"""import torch
from diffusers import StableDiffusion3Pipeline

dtype = torch.{DTYPE_NAME}  # torch.float16 and torch.float32 work too
pipe = StableDiffusion3Pipeline.from_pretrained({json.dumps(load_id)}, variant="fp8", dtype=dtype{nones})
{t5_line}pipe.to("cuda" if torch.cuda.is_available() else "cpu")
image = pipe("a photo of an astronaut riding a horse on the moon", num_inference_steps=28).images[0]
image.save("astronaut.png")
"""


def render_model_card(base_id: str, load_id: str, results: list[ComponentResult], verification: Verification,
                      license_fields: dict, exclude: list[str], absent: list[str]) -> str:
    """The README.md text of the converted repo; `load_id` is the Hub id (or local folder) in the load snippet,
    `absent` the components it lacks (see `load_snippet`)."""
    data = model_card_data(base_id, tags=TAGS, license_fields=license_fields)
    fp8_t5 = any(r.plan.quantize and r.plan.component.library == "transformers" for r in results)
    rows = []
    for result in results:
        plan = result.plan
        if not plan.component.is_model:
            continue
        how = (f"FP8 E4M3, {len(plan.quantized_layers)} linear layers" if plan.quantize else "kept 16-bit (copied as is)")
        rows.append(f"| {plan.component.name} | {plan.component.class_name} | {how} | {format_bytes(plan.bytes_before)} | {format_bytes(result.bytes_after)} |")
    total_before = sum(r.plan.bytes_before for r in results)
    total_after = sum(r.bytes_after for r in results)
    checks = [f"- `{name}`: {c['tensors_identical']} tensors reload exactly as written"
              + (f", {c['tensors_dequantized_on_load']} FP8 weights dequantized on load (max rel. error "
                 f"{c['worst_dequant_error']:.1e})" if c.get("tensors_dequantized_on_load") else "")
              + (", forward pass finite" if c.get("probe_output_finite") else "")
              for name, c in verification.components.items()]
    pipeline = verification.pipeline
    if pipeline.get("loaded"):
        checks.append(f"- the whole pipeline loads with stock diffusers exactly as above "
                      f"(`dtype=torch.{pipeline['dtype']}`) and generates a finite {pipeline['size']}×{pipeline['size']} "
                      f"image in {pipeline['steps']} steps")
    image_lines = ""
    if verification.images:
        image_lines = (
            f"\nFP8 vs 16-bit on the same prompts and seeds ({len(verification.images)} images): "
            f"mean SSIM **{verification.mean_ssim:.3f}**, mean PSNR **{verification.mean_psnr:.1f} dB**.\n\n"
            "| prompt | seed | SSIM | PSNR (dB) |\n|---|---|---|---|\n"
            + "\n".join(f"| {i['prompt']} | {i['seed']} | {i['ssim']:.3f} | {i['psnr']:.1f} |" for i in verification.images)
            + "\n"
        )
    exclude_line = f" Layers kept 16-bit by request: `{', '.join(exclude)}`." if exclude else ""
    body = f"""
# {load_id.split('/')[-1]}: FP8 weights of [{base_id}](https://huggingface.co/{base_id})

The transformer and the T5 text encoder of {base_id} quantized to **FP8 (E4M3)**; CLIP-L, CLIP-G and the
VAE stay 16-bit, as published guidance recommends (CLIP-G and the VAE degrade under FP8).
Total weights: **{format_bytes(total_before)} → {format_bytes(total_after)}**.

## Load it (stock diffusers)

```python
{load_snippet(load_id, fp8_t5, absent)}```

Needs `pip install diffusers transformers accelerate optimum-quanto`.

## What was done

| component | class | treatment | before | after |
|---|---|---|---|---|
{chr(10).join(rows)}

- **transformer**: optimum-quanto `qfloat8`, one scale per output channel, stored through diffusers'
  `QuantoConfig` (`diffusion_pytorch_model.fp8*.safetensors`).{exclude_line}
{T5_NOTE if fp8_t5 else ""}- Only safetensors files; no pickle.

## Verification (run before upload)

{chr(10).join(checks)}
{image_lines}
## Hardware

{HARDWARE_NOTE}

Made with the `convert` tool of the SD3.5 FP8 project (`python -m convert {base_id} --out DIR`).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content
