"""Where a tiny-shapes training iteration spends its time, phase by phase (GPU).

    python -m bench.train_profile [--out results.json] [--iterations 12] [--device cuda] [--batch 256]

Builds the default (untrained) pipeline and runs `shapes.train`'s transformer iteration at each training
resolution with the batch sizes training uses, synchronizing after each phase: render the scenes, VAE encode,
text encoders (or their frozen table's lookup), transformer forward with the loss, backward + optimizer + EMA,
through the same functions training calls. Eager, as a time-limited run trains (compiling the
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

from shapes import data
from shapes.model import ModelConfig, build_pipeline
from shapes.train import (
    BATCH_SCALE,
    PromptEncoder,
    TrainSettings,
    VelocityPredictor,
    _autocast,
    _batch_size,
    _images,
    graphed_predictors,
    noised_latents,
    set_kernels,
    update,
    velocity_loss,
)


def _timed(device: torch.device, times: dict, name: str, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times.setdefault(name, []).append((time.perf_counter() - start) * 1000)
    return result


def profile(device: torch.device, iterations: int, base_batch: int = TrainSettings.batch,
            frozen_text_encoders: bool = False, cuda_graphs: bool = False) -> list[dict]:
    """One row per training resolution: median milliseconds per phase of one transformer iteration."""
    pipe = build_pipeline(ModelConfig())
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
        module.to(device)
    trained = [pipe.transformer] + ([] if frozen_text_encoders else
                                    [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3])
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.eval().requires_grad_(False)
    for module in trained:
        module.train().requires_grad_(True)
    params = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params]
    encode = PromptEncoder(pipe)
    captions = data.all_captions("train") | {""}
    encode.freeze(captions, device) if frozen_text_encoders else encode.warm(captions)
    rng = random.Random(0)
    rows = []
    for resolution in sorted(BATCH_SCALE):
        batch = _batch_size(base_batch, resolution)
        times: dict[str, list[float]] = {}
        predict = VelocityPredictor(pipe.transformer)
        if cuda_graphs:
            predict = graphed_predictors(pipe.transformer, encode, device, {resolution: batch},
                                         not frozen_text_encoders)[resolution]
        for step in range(iterations + 2):
            images, captions = _timed(device, times, "render", lambda: _images(rng, batch, resolution, device))
            noisy, sigma, target = _timed(device, times, "vae_encode", lambda: noised_latents(pipe, images))
            with _autocast(device):
                embeds, pooled = _timed(device, times, "text_encoders", lambda: encode(captions, device))
            loss = _timed(device, times, "transformer_forward",
                          lambda: velocity_loss(predict, noisy, sigma, target, embeds, pooled))
            _timed(device, times, "backward_optimizer_ema", lambda: update(params, optimizer, loss, ema, 0.001))
        ms = {name: round(statistics.median(values[2:]), 2) for name, values in times.items()}
        rows.append({"resolution": resolution, "batch": batch, "tokens": batch * ((resolution // 16) ** 2 + 77 + 256),
                     "frozen_text_encoders": frozen_text_encoders, "cuda_graphs": cuda_graphs, "ms": ms,
                     "iteration_ms": round(sum(ms.values()), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=TrainSettings.batch, help="batch at 128 px (training's: %(default)s)")
    parser.add_argument("--train-text-encoders", action="store_true",
                        help="as `shapes.train --train-text-encoders` (default: frozen, their embeddings looked up)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels, as training's default")
    parser.add_argument("--cuda-graphs", action="store_true", help="the transformer's step replayed as CUDA graphs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    set_kernels(device, args.deterministic)
    rows = profile(device, args.iterations, args.batch, not args.train_text_encoders, args.cuda_graphs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {"device": name, "torch": torch.__version__, "weights": "untrained (timing only)",
              "deterministic": args.deterministic, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
