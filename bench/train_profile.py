"""Where a tiny-shapes training iteration spends its time, phase by phase (GPU).

    python -m bench.train_profile [--out results.json] [--iterations 12] [--device cuda] [--batch 256]

Builds the default (untrained) pipeline and runs `shapes.train`'s transformer iteration at each training
resolution with the batch sizes training uses, synchronizing after each phase: render the scenes, VAE encode,
text encoders, transformer forward, backward, optimizer + EMA. Also times the VAE encode with channels-last
activations (cuDNN's faster layout for 16-bit convolutions). Eager, as a time-limited run trains (compiling the
three shapes costs ~4 minutes on a cold H200, more than it saves in a 15-minute run). Writes one JSON row per
resolution with milliseconds per phase (medians over the iterations after two warm-up iterations).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shapes import data
from shapes.model import ModelConfig, build_pipeline
from shapes.train import BATCH_SCALE, PromptEncoder, TrainSettings, _autocast, _batch_size, _images


def _timed(device: torch.device, times: dict, name: str, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times.setdefault(name, []).append((time.perf_counter() - start) * 1000)
    return result


def profile(device: torch.device, iterations: int, base_batch: int = TrainSettings.batch) -> list[dict]:
    """One row per training resolution: median milliseconds per phase of one transformer iteration."""
    pipe = build_pipeline(ModelConfig())
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
        module.to(device)
    trained = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    for module in trained:
        module.train().requires_grad_(True)
    pipe.vae.eval().requires_grad_(False)
    params = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params]
    encode = PromptEncoder(pipe)
    encode.warm(data.all_captions("train") | {""})
    rng = random.Random(0)
    rows = []
    for resolution in sorted(BATCH_SCALE):
        batch = _batch_size(base_batch, resolution)
        times: dict[str, list[float]] = {}
        for step in range(iterations + 2):
            images, captions = _timed(device, times, "render", lambda: _images(rng, batch, resolution, device))
            with torch.no_grad(), _autocast(device):
                x0 = _timed(device, times, "vae_encode", lambda: pipe.vae.encode(images).latent_dist.sample().float())
                channels_last = images.contiguous(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
                _timed(device, times, "vae_encode_channels_last", lambda: pipe.vae.encode(channels_last).latent_dist.sample())
                pipe.vae.to(memory_format=torch.contiguous_format)
            noise = torch.randn_like(x0)
            sigma = torch.sigmoid(torch.randn(batch, device=device))
            noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
            with _autocast(device):
                embeds, pooled = _timed(device, times, "text_encoders", lambda: encode(captions, device))
                prediction = _timed(device, times, "transformer_forward", lambda: pipe.transformer(
                    hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                    timestep=sigma * 1000, return_dict=False)[0])
            loss = F.mse_loss(prediction.float(), noise - x0)
            _timed(device, times, "backward", loss.backward)

            def update():
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch._foreach_lerp_(ema, params, 0.001)

            _timed(device, times, "optimizer_and_ema", update)
        ms = {name: round(statistics.median(values[2:]), 2) for name, values in times.items()}
        training = sum(v for k, v in ms.items() if k != "vae_encode_channels_last")
        rows.append({"resolution": resolution, "batch": batch, "tokens": batch * ((resolution // 16) ** 2 + 77 + 256),
                     "ms": ms, "iteration_ms": round(training, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=TrainSettings.batch, help="batch at 128 px (training's: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    rows = profile(device, args.iterations, args.batch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {"device": name, "torch": torch.__version__, "weights": "untrained (timing only)", "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
