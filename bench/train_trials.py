"""Which tiny-shapes training recipe learns fastest per second? Short transformer runs from scratch, one per recipe.

    python -m bench.train_trials --out trials.json --seconds 90 \
        --trial "default:" --trial "b256:batch=256" --trial "lr1e-3:lr=1e-3" --trial "eager:cuda_graphs=0" ...

Each trial builds a fresh, untrained pipeline, takes the shipped model's trained VAE (so every trial learns on the
same latents and only the transformer recipe differs), and runs `shapes.train.train_transformer` for `--seconds`
with the given `TrainSettings` overrides (a time-limited run: warm-up and cosine decay fitted to the time;
non-deterministic kernels unless `deterministic=1`).
Reported per trial: iterations, ms per iteration, the loss curve, and a validation loss (the EMA weights' velocity
loss on fixed 128 px batches of fresh training scenes, the same noise for every trial), written as it goes.
A way to rank recipes cheaply before spending a 15-minute run on one; short runs can favour small batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch

from sd35fp8.tiny import SHAPES_DIR
from shapes.model import ModelConfig, build_pipeline
from shapes.train import (
    UNBOUNDED,
    Checkpointer,
    PromptEncoder,
    TrainSettings,
    VelocityPredictor,
    _autocast,
    _images,
    load_weights,
    noised_latents,
    probe,
    set_kernels,
    train_transformer,
    velocity_loss,
)


def parse_trial(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, TrainSettings overrides with the fields' types)."""
    name, _, body = text.partition(":")
    types = {field.name: type(getattr(TrainSettings(), field.name)) for field in dataclasses.fields(TrainSettings)}
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in types or types[key] in (tuple, type(None)):
            raise SystemExit(f"--trial {text!r}: {key!r} is not a settable TrainSettings field")
        overrides[key] = bool(int(value)) if types[key] is bool else types[key](value)
    return name, overrides


@torch.no_grad()
def validation_loss(pipe, device: torch.device, batches: int = 4, batch: int = 256) -> float:
    """The velocity loss of the pipeline's (EMA) transformer on fixed 128 px batches, fixed noise."""
    rng, generator = random.Random(999), torch.Generator(device).manual_seed(999)
    encode = PromptEncoder(pipe)
    losses = []
    for _ in range(batches):
        images, captions = _images(rng, batch, 128, device)
        noisy, sigma, target = noised_latents(pipe, images, generator)
        with _autocast(device):
            embeds, pooled = encode(captions, device)
        losses.append(float(velocity_loss(VelocityPredictor(pipe.transformer), noisy, sigma, target, embeds, pooled)))
    return round(sum(losses) / len(losses), 5)


def run_trial(name: str, overrides: dict, seconds: float, device: torch.device, probe_count: int) -> dict:
    settings = TrainSettings(**{"iterations": UNBOUNDED, "vae_iterations": 0, "vae_share": 0.0, "time_limit": seconds,
                                "deterministic": False, **overrides})
    set_kernels(device, settings.deterministic)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    pipe = build_pipeline(ModelConfig())
    pipe.set_progress_bar_config(disable=True)
    trained_vae = build_pipeline(ModelConfig())
    load_weights(trained_vae, SHAPES_DIR)
    pipe.vae.load_state_dict(trained_vae.vae.state_dict())
    pipe.vae.register_to_config(scaling_factor=trained_vae.vae.config.scaling_factor,
                                shift_factor=trained_vae.vae.config.shift_factor)
    pipe.vae.to(device).eval().requires_grad_(False)
    log: dict = {}
    train_transformer(pipe, settings, device, log, Checkpointer(None, 0, ModelConfig(), settings))
    elapsed = log["transformer_seconds"]
    pipe.to(device)
    losses = log["transformer_loss"]
    row = {"trial": name, "overrides": overrides, "seconds": round(elapsed, 1), "iterations": log["iterations_done"],
           "ms_per_iteration": round(1000 * elapsed / max(1, log["iterations_done"]), 1),
           "final_loss": round(sum(v for _, v, _ in losses[-10:]) / len(losses[-10:]), 5),
           "validation_loss": validation_loss(pipe, device), "loss_curve": losses[:: max(1, len(losses) // 60)]}
    if probe_count:
        row["probe"] = probe(pipe, device, probe_count)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_trials", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=90.0, help="training time per trial")
    parser.add_argument("--trial", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--probe", type=int, default=0, metavar="N", help="also score N captions per split after each")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    trials = [parse_trial(text) for text in args.trial]
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "seconds_per_trial": args.seconds,
              "vae": "the shipped tiny-shapes VAE (trained); transformer and text encoders from scratch", "rows": []}
    for name, overrides in trials:
        result["rows"].append(run_trial(name, overrides, args.seconds, device, args.probe))
        row = result["rows"][-1]
        print(f"TRIAL {name}: {row['iterations']} iterations, {row['ms_per_iteration']} ms each, "
              f"loss {row['final_loss']}, validation {row['validation_loss']}", flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
