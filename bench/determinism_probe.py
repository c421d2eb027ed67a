"""Which of a tiny-shapes training step's gradients differ between two identical passes (GPU reproducibility).

    python -m bench.determinism_probe [--out results.json] [--device cuda]

Builds the default (untrained) pipeline and runs, twice from the same weights, inputs and random state, one VAE
training step and one transformer training step exactly as `shapes.train` computes them (eager), under
`torch.use_deterministic_algorithms(True)` with `warn_only` False and True. For each pass it records whether the
loss and every parameter's gradient came out bit-identical, the parameters that did not (largest absolute
difference), and, where the strict mode refused an operation, its one-line error: that names the kernel that has no
deterministic implementation. Nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

import torch

from shapes.model import ModelConfig, build_pipeline
from shapes.train import (
    PromptEncoder,
    TrainSettings,
    VelocityPredictor,
    _autocast,
    _images,
    noised_latents,
    set_kernels,
    vae_losses,
    velocity_loss,
)


def _vae_loss(pipe, images):
    rec, kl = vae_losses(pipe.vae, images)
    return rec + TrainSettings.kl_weight * kl


def _pass(module, loss_fn, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with _autocast(next(module.parameters()).device):
        loss = loss_fn()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return loss.detach().clone(), grads


def compare(module, loss_fn, seed: int = 0) -> dict:
    """Two passes of `loss_fn` through `module`; what differed between them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            (loss_a, grads_a), (loss_b, grads_b) = _pass(module, loss_fn, seed), _pass(module, loss_fn, seed)
        except RuntimeError as error:
            return {"refused": str(error).splitlines()[0],
                    "warnings": sorted({str(w.message).splitlines()[0] for w in caught})}
    differing = {name: float((grads_a[name].float() - grads_b[name].float()).abs().max())
                 for name in grads_a if not torch.equal(grads_a[name], grads_b[name])}
    worst = sorted(differing.items(), key=lambda item: -item[1])[:12]
    return {"loss_equal": bool(torch.equal(loss_a, loss_b)), "loss_difference": float((loss_a - loss_b).abs()),
            "parameters": len(grads_a), "parameters_differing": len(differing),
            "largest_differences": dict(worst),
            "warnings": sorted({str(w.message).splitlines()[0] for w in caught})}


def probe(device: torch.device, strict: bool) -> dict:
    """The VAE and transformer steps' comparisons under `use_deterministic_algorithms(True, warn_only=not strict)`."""
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    torch.manual_seed(0)
    pipe = build_pipeline(ModelConfig())
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
        module.to(device).eval().requires_grad_(False)
    images, captions = _images(random.Random(1), 64, 128, device)
    pipe.vae.train().requires_grad_(True)
    result = {"vae": compare(pipe.vae, lambda: _vae_loss(pipe, images))}
    pipe.vae.eval().requires_grad_(False)
    encode = PromptEncoder(pipe)
    encode.freeze(set(captions) | {""}, device)
    noisy, sigma, target = noised_latents(pipe, images, torch.Generator(device).manual_seed(3))
    with _autocast(device):
        embeds, pooled = encode(captions, device)
    pipe.transformer.train().requires_grad_(True)
    predict = VelocityPredictor(pipe.transformer)
    result["transformer"] = compare(pipe.transformer, lambda: velocity_loss(predict, noisy, sigma, target, embeds, pooled))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.determinism_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    set_kernels(device, deterministic=True)  # as training sets them; `probe` then sets warn_only
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {"device": name, "torch": torch.__version__, "weights": "untrained",
              "sdpa_backends": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}}
    for mode, strict in (("warn_only", False), ("strict", True)):
        result[mode] = probe(device, strict)
        print(mode, json.dumps(result[mode]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
